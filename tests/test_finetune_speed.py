"""``ssl_finetune --lean`` (the CPU speed options) and intermediate checkpoints of ``SSLFinetuneTrainer``: the same
training batches as nnU-Net's defaults for a fixed seed, checkpoints at fractions of the budget, no best checkpoint,
progress.png once at the end."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_raw_dataset, subprocess_env

from ssl3d.training.finetune_schedule import CPU_SPEED_OPTIONS, free_cores_for_torch

# ssl_finetune --prepare-only and two trainer runs: about 70 s on 2 cores, the slow tier
pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
DATASET = "Dataset802_Seg"
PLANS = "ssl3d_sparkPlans_scratch"


@pytest.fixture(scope="module")
def prepared(tiny_pretraining, tmp_path_factory):
    """A 2-case labeled dataset planned and preprocessed by ``ssl_finetune --prepare-only`` (lean default on CPU)."""
    root = tmp_path_factory.mktemp("ftspeed")
    make_raw_dataset(root / "raw", 802, "Seg", n=2, labels=True)
    env = subprocess_env(root / "raw", root / "pre", root / "res")
    for k in ("pre", "res"):
        (root / k).mkdir()
    r = subprocess.run([str(BIN / "ssl_finetune"), "-d", "802", "-p", str(tiny_pretraining), "-device", "cpu",
                        "--scratch", "--epochs", "4", "--iters", "1", "--val-iters", "1", "--no-final-val", "-np", "1",
                        "--seed", "3", "--checkpoints-at", "0.25", "0.5", "--prepare-only"], env=env,
                       capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, r.stderr[-2000:]
    return root


def _trainer(root, monkeypatch, **options):
    from ssl3d.training.finetuning.trainer import SSLFinetuneTrainer

    monkeypatch.setenv("nnUNet_preprocessed", str(root / "pre"))  # nnU-Net 2.8 reads its paths when used
    monkeypatch.setenv("nnUNet_results", str(root / "res"))
    monkeypatch.setenv("nnUNet_n_proc_DA", "1")  # one seeded worker per loader, as the benchmark runs
    plans = json.loads((root / "pre" / DATASET / f"{PLANS}.json").read_text())
    ft = plans["configurations"]["3d_fullres"]["ssl3d_finetune"]
    for k in CPU_SPEED_OPTIONS:
        ft.pop(k, None)
    ft.update(options)
    dj = json.loads((root / "pre" / DATASET / "dataset.json").read_text())
    return SSLFinetuneTrainer(plans, "3d_fullres", 0, dj, torch.device("cpu"))


def _flat(batch):
    t = batch["target"]
    return [batch["data"], *(t if isinstance(t, list) else [t])]


def test_ssl_finetune_writes_lean_and_checkpoint_options_on_cpu(prepared):
    ft = json.loads((prepared / "pre" / DATASET / f"{PLANS}.json").read_text())["configurations"]["3d_fullres"][
        "ssl3d_finetune"]
    assert {k: ft[k] for k in CPU_SPEED_OPTIONS} == CPU_SPEED_OPTIONS
    assert ft["checkpoints_at"] == [0.25, 0.5]


def test_lean_options_train_on_the_same_batches(prepared, monkeypatch):
    threads = torch.get_num_threads()
    batches, trainers = {}, {}
    try:
        for name, options in (("stock", {}), ("lean", CPU_SPEED_OPTIONS)):
            trainer = trainers[name] = _trainer(prepared, monkeypatch, **options)
            trainer.initialize()
            tr, val = trainer.get_dataloaders()
            batches[name] = [_flat(next(tr)) for _ in range(3)]
            tr._finish()
            val._finish()
            if name == "lean":
                assert torch.get_num_threads() == free_cores_for_torch(1)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(batches["stock"], batches["lean"]):
        assert len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(batches["stock"][0][0], batches["stock"][1][0])  # a real stream, not one batch repeated

    # channels_last: the lean network stores its conv weights channels-last and is the same function, forward and
    # backward (same seed, same initial values)
    convs = {n: p for n, p in trainers["lean"].network.named_parameters() if p.dim() == 5}
    assert convs and all(p.is_contiguous(memory_format=torch.channels_last_3d) for p in convs.values())
    assert not all(p.is_contiguous(memory_format=torch.channels_last_3d)
                   for n, p in trainers["stock"].network.named_parameters() if p.dim() == 5)
    data, *target = batches["stock"][0]
    grads = {}
    for name, trainer in trainers.items():
        trainer.network.zero_grad()
        loss = trainer.loss(trainer.network(data), target if len(target) > 1 else target[0])
        loss.backward()
        grads[name] = (loss.detach(), {n: p.grad for n, p in trainer.network.named_parameters()})
    torch.testing.assert_close(grads["lean"][0], grads["stock"][0], rtol=1e-4, atol=1e-5)
    for n, g in grads["stock"][1].items():
        torch.testing.assert_close(grads["lean"][1][n], g, rtol=1e-3, atol=1e-5, msg=n)


def test_lean_run_writes_intermediate_checkpoints_and_no_best(prepared, monkeypatch):
    threads = torch.get_num_threads()
    try:
        trainer = _trainer(prepared, monkeypatch, **CPU_SPEED_OPTIONS, checkpoints_at=[0.25, 0.5])
        trainer.run_training()
    finally:
        torch.set_num_threads(threads)
    out = Path(trainer.output_folder)
    names = {p.name for p in out.iterdir()}
    assert {"checkpoint_ep1.pth", "checkpoint_ep2.pth", "checkpoint_final.pth", "progress.png"} <= names, names
    assert "checkpoint_best.pth" not in names and "checkpoint_latest.pth" not in names
    assert not [n for n in names if n.endswith(".partial")]
    for epochs in (1, 2):
        ckpt = torch.load(out / f"checkpoint_ep{epochs}.pth", map_location="cpu", weights_only=False)
        assert ckpt["current_epoch"] == epochs and len(ckpt["logging"]["train_losses"]) == epochs
    final = torch.load(out / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert final["current_epoch"] == 4
    ep2 = torch.load(out / "checkpoint_ep2.pth", map_location="cpu", weights_only=False)["network_weights"]
    assert any(not torch.equal(v, final["network_weights"][k]) for k, v in ep2.items()), "training went on after ep2"
