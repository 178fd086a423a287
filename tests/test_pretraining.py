"""Pretraining: learning happens, masks are exact, masked input never leaks, resume, DDP on gloo, raw-folder entry."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import blob_batch, ct_volume, subprocess_env, write_image
from ssl3d.architectures.from_plans import scaled_architecture
from ssl3d.training.methods import build_method, method_specs

BIN = Path(sys.executable).parent
# every registered method in its tiny configuration (sparse ones on the reference backend)
TINY = {name: {**spec.tiny, **({"backend": "reference"} if spec.sparse else {})}
        for name, spec in method_specs().items()}
ARCH = {  # what the planner gives a 16x32x32 patch at 2x1x1 mm, as in tiny_pool
    "network_class_name": "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet",
    "arch_kwargs": {"n_stages": 4, "features_per_stage": [32, 64, 128, 256], "conv_op": "torch.nn.modules.conv.Conv3d",
                    "kernel_sizes": [[1, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3]],
                    "strides": [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2]], "n_blocks_per_stage": [1, 3, 4, 6],
                    "n_conv_per_stage_decoder": [1, 1, 1], "conv_bias": True,
                    "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
                    "norm_op_kwargs": {"eps": 1e-5, "affine": True}, "dropout_op": None, "dropout_op_kwargs": None,
                    "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True}},
    "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]}


# the ResEnc at 1/4 width, one block per stage (ssl_pretrain --size tiny): the learning tests' network
SMALL_ARCH = scaled_architecture(ARCH, "tiny")


def tiny_method(name, patch=(16, 32, 32), cell=(4, 8, 8), arch=ARCH):
    cfg = {"patch_size": list(patch), "architecture": arch,
           "ssl3d": {"mae_patch_size": list(cell), "mask_cell_size": list(cell), "vit_token_grid": [4, 4, 4],
                     "hybrid_junction_stage": 3}}
    return build_method(name, {}, cfg, 1, **TINY[name])


MASKED = sorted(n for n, s in method_specs().items() if s.mask_ratio != 0.0)  # methods that mask their input


def method_input(m, seed: int, batch: int = 2) -> torch.Tensor:
    """What the trainer's loader gives the method: a crop of its data patch, or two noisy views (B, 2, C, ...)."""
    if m.n_views == 2:
        x = blob_batch(seed, batch=batch, shape=m.patch_size)
        g = torch.Generator().manual_seed(seed)
        return torch.stack([x + 0.05 * torch.randn(x.shape, generator=g),
                            x.flip(-1) + 0.05 * torch.randn(x.shape, generator=g)], 1)
    return blob_batch(seed, batch=batch, shape=m.data_patch_size)


# mocov2: its loss rises while the queue fills with real keys (tested after that in test_contrastive); mim: its
# learning test is test_mim's (reconstruction and alignment separately), the costliest method on CPU (7 volumes/sample)
@pytest.mark.parametrize("method", sorted(n for n in TINY if n not in ("mocov2", "mim")))
def test_loss_falls(method):
    torch.manual_seed(0)
    m = tiny_method(method, arch=SMALL_ARCH)
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], 1e-3)
    g = torch.Generator().manual_seed(1)
    losses = []
    for i in range(60):
        m.set_progress(i, 60)
        loss = m(method_input(m, i % 4), m.random_mask(2, 0.75, g), generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
        m.after_optimizer_step()
        losses.append(loss.item())
    start, end = sum(losses[:5]) / 5, sum(losses[-10:]) / 10
    # 15 % in 60 iterations of a tiny network: a fall that chance and a constant loss cannot give
    assert end < 0.85 * start, (start, end)


@pytest.mark.parametrize("method", MASKED)
def test_mask_counts_exact_per_sample(method):
    m = tiny_method(method)
    vis = m.random_mask(5, 0.75, torch.Generator().manual_seed(0))
    n = vis[0].numel()
    assert vis.shape == (5, *m.mask_grid())
    assert (vis.flatten(1).sum(1) == n - round(0.75 * n)).all()
    assert len({tuple(v.flatten().tolist()) for v in vis}) == 5, "each sample gets its own mask"


def _perturb_masked(x, vis):
    voxel_vis = vis[:, None].repeat_interleave(4, 2).repeat_interleave(8, 3).repeat_interleave(8, 4)
    return voxel_vis, torch.where(voxel_vis, x, torch.randn_like(x) * 100)


def test_mae_masked_input_never_reaches_the_encoder():
    m = tiny_method("mae").eval()
    x = blob_batch(0)
    vis = m.random_mask(2, 0.75, torch.Generator().manual_seed(3))
    _, x2 = _perturb_masked(x, vis)
    with torch.no_grad():
        f1, _, _ = m.encode(x, vis)
        f2, _, _ = m.encode(x2, vis)
    assert torch.equal(f1, f2)
    assert not torch.equal(x, x2)


@pytest.mark.parametrize("method", sorted(n for n, s in method_specs().items() if s.sparse))
def test_cnn_masked_input_never_changes_visible_features(method):
    m = tiny_method(method).eval()
    x = blob_batch(0)
    vis = m.random_mask(2, 0.75, torch.Generator().manual_seed(3))
    _, x2 = _perturb_masked(x, vis)
    with torch.no_grad():
        f1, f2 = m.encode(x, vis), m.encode(x2, vis)
    from ssl3d.sparse import upsample_mask

    for a, b in zip(f1, f2):
        keep = upsample_mask(vis, a.shape[2:])[:, None]
        assert torch.allclose(a * keep, b * keep, atol=1e-5), "masked voxels leaked into visible features"
        assert (a * ~keep).abs().max() == 0, "masked positions must stay empty in the sparse encoder"


def _pretrain(pool, method, extra, env):
    args = [str(BIN / "ssl_pretrain"), "-d", pool.dataset_dir.name, "-m", method, "-device", "cpu",
            "--batch-size", "2", "--iters", "3", "--val-iters", "1", "--no-progress", "--save-every", "1",
            "--preview-every", "1", *extra]
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture
def results_env(tiny_pool, tmp_path):
    return subprocess_env(tmp_path / "raw", tiny_pool.dataset_dir.parent, tmp_path)


@pytest.mark.slow
def test_resume_continues_from_saved_epoch(tiny_pool, results_env, tmp_path):
    kw = ["--size", "tiny"]
    r = _pretrain(tiny_pool, "mae", ["--epochs", "2", *kw], results_env)
    assert r.returncode == 0, r.stderr[-2000:]
    out = tmp_path / tiny_pool.dataset_dir.name / "MAEPretrainer__ssl3dPlans__3d_fullres" / "fold_0"
    assert (out / "checkpoint_final.pth").is_file() and (out / "progress.png").is_file()
    assert sorted(p.name for p in (out / "previews").glob("*.png")) == ["epoch_0000.png", "epoch_0001.png"]
    first = torch.load(out / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert first["current_epoch"] == 2
    r = _pretrain(tiny_pool, "mae", ["--epochs", "4", "--c", *kw], results_env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "continuing from" in r.stderr and "Epoch 2" in r.stdout and "Epoch 0\n" not in r.stdout
    final = torch.load(out / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert final["current_epoch"] == 4 and len(final["logging"]["train_losses"]) == 4
    method = json.loads((out.parent / "ssl_method.json").read_text())
    assert method["name"] == "mae" and method["mask_ratio"] == 0.75


@pytest.mark.parametrize("method,trainer_name", [("mim", "MiMPretrainer"), ("smit", "SMITPretrainer"),
                                                 ("mocov2", "MoCoV2Pretrainer"), ("simclr", "SimCLRPretrainer"),
                                                 ("byol", "BYOLPretrainer"), ("voco", "VoCoPretrainer")])
def test_resume_restores_teacher_centers_and_mask_tokens(tiny_pool, results_env, tmp_path, monkeypatch, method,
                                                          trainer_name):
    """``--c``: the whole method state comes back exactly (SMIT: EMA teacher, DINO centers, mask token; MiM: region
    and mask tokens, projection heads), and the method's stats are in the training log."""
    r = _pretrain(tiny_pool, method, ["--epochs", "1", "--iters", "1", "--size", "tiny", "--preview-every", "0"],
                  results_env)  # one step moves every EMA teacher and the MoCo queue pointer
    assert r.returncode == 0, r.stderr[-2000:]
    out = tmp_path / tiny_pool.dataset_dir.name / f"{trainer_name}__ssl3dPlans__3d_fullres" / "fold_0"
    saved = torch.load(out / "checkpoint_final.pth", map_location="cpu", weights_only=False)["network_weights"]
    assert f"method stats: {method}_" in (next(out.glob("training_log_*.txt"))).read_text()
    for k, v in results_env.items():
        monkeypatch.setenv(k, v)
    from ssl3d.cli.pretrain import build_parser, make_trainer

    trainer = make_trainer(build_parser().parse_args(["-d", tiny_pool.dataset_dir.name, "-m", method, "-device", "cpu",
                                                      "--size", "tiny", "--epochs", "2", "--c"]))
    state = trainer.ssl_method.state_dict()
    assert state.keys() == saved.keys() and all(torch.equal(v, saved[k]) for k, v in state.items())
    assert trainer.current_epoch == 1
    if method == "mocov2":  # the queue of negatives and its pointer survive the restart
        assert int(saved["queue_ptr"]) > 0 and torch.equal(state["queue"], saved["queue"])
    if method == "smit":
        assert {"global_center.center", "local_center.center", "mask_token"} <= set(saved)
    ema = {"smit": ("teacher.", "student."), "byol": ("target.", ""), "voco": ("teacher.", "")}
    if method in ema:  # the restored teacher is the EMA that was saved, not a fresh copy of the student
        t, s = ema[method]
        teacher = {k: v for k, v in state.items() if k.startswith(t)}
        moved = [k for k, v in teacher.items() if not torch.equal(v, state[s + k[len(t):]])]
        assert teacher and moved, "the teacher is an EMA, not a copy of the student"


@pytest.mark.parametrize("method,port", [("mae", 29533), ("mim", 29534), ("smit", 29535), ("mocov2", 29536),
                                         ("byol", 29537), ("simclr", 29538), ("voco", 29539)])
@pytest.mark.slow
def test_ddp_gloo_two_ranks_keep_parameters_identical(tiny_pool, results_env, tmp_path, method, port):
    """Student, EMA teacher, centers and mask tokens stay identical on both ranks (parameters and buffers)."""
    out = tmp_path / "ddp.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           str(Path(__file__).parent / "ddp_worker.py"), str(out), "-d", tiny_pool.dataset_dir.name, "-m", method,
           "-device", "cpu", "--batch-size", "4", "--iters", "3", "--val-iters", "1", "--epochs", "1",
           "--no-progress", "--size", "tiny", "--preview-every", "0"]
    r = subprocess.run(cmd, env=results_env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["world"] == 2 and res["batch_per_rank"] == 2
    assert res["moved"] > 0 and res["max_diff"] == 0.0


def test_pretrain_from_raw_folder(tmp_path):
    for i in range(3):
        write_image(tmp_path / "raw scans" / f"s{i}.nii.gz", ct_volume(i, (16, 40, 40)), spacing=(1.0, 1.0, 2.0))
    env = subprocess_env(tmp_path / "raw", tmp_path / "pre", tmp_path / "res")
    args = [str(BIN / "ssl_pretrain"), "-i", str(tmp_path / "raw scans"), "-m", "mae", "-device", "cpu",
            "--size", "tiny", "--epochs", "1", "--iters", "2", "--val-iters", "1", "--batch-size", "2",
            "--no-progress", "-np", "1", "--preview-every", "0"]
    r = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "pre" / "Dataset900_SSLPool" / "ssl3dPlans.json").is_file()
    assert (tmp_path / "res" / "Dataset900_SSLPool" / "MAEPretrainer__ssl3dPlans__3d_fullres" / "fold_0" /
            "checkpoint_final.pth").is_file()
