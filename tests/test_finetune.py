"""Fine-tuning with stock nnU-Net: exported weights, ssl_finetune, stock predict, mismatches, few-shot, MedContext."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import subprocess_env
import SimpleITK as sitk
import torch

from ssl3d.architectures.from_plans import build_network_from_plans as build_downstream
from ssl3d.training.export import EncoderMismatchError, transfer_encoder
from ssl3d.training.finetuning.trainer import few_shot_subset
from ssl3d.training.methods import get_method_spec, method_specs

BIN = Path(sys.executable).parent


def sh(args, env, timeout=900):
    r = subprocess.run([str(BIN / args[0]), *args[1:]], env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, (args, r.stdout[-1500:], r.stderr[-3000:])
    return r


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """Tiny demo data -> pool -> 1-epoch tiny SparK pretraining -> ssl_finetune --prepare-only on Dataset802."""
    root = tmp_path_factory.mktemp("ft")
    env = subprocess_env(root / "raw", root / "pre", root / "res")
    for k in ("pre", "res"):
        (root / k).mkdir()
    sh(["ssl_make_demo_data", "-o", str(root / "raw"), "--size", "tiny", "-nu", "4", "-nl", "5", "--no-progress"], env)
    sh(["ssl_plan_and_preprocess", "-d", "801", "-np", "1", "--no-progress", "--patch-size", "16", "32", "32"], env)
    sh(["ssl_pretrain", "-d", "801", "-m", "spark", "-device", "cpu", "--size", "tiny", "--epochs", "1", "--iters",
        "2", "--val-iters", "1", "--no-progress"], env)
    results = root / "res" / "Dataset801_SynthCTPool" / "SparKPretrainer__ssl3dPlans__3d_fullres"
    sh(["ssl_finetune", "-d", "802", "-p", str(results), "-device", "cpu", "--epochs", "1", "--iters", "2",
        "--val-iters", "1", "--no-final-val", "-np", "1", "--prepare-only"], env)
    return {"root": root, "env": env, "results": results,
            "pre": root / "pre" / "Dataset802_SynthCTOrgans"}


def test_exported_weights_load_with_nnunets_loader(pretrained):
    from nnunetv2.run.load_pretrained_weights import load_pretrained_weights

    plans = json.loads((pretrained["pre"] / "ssl3d_sparkPlans.json").read_text())
    arch = plans["configurations"]["3d_fullres"]["architecture"]
    assert arch["network_class_name"].endswith("ResidualEncoderUNet")
    weights = pretrained["pre"] / "ssl3d_sparkPlans__pretrained_weights.pth"
    net = build_downstream(arch, 1, 8)
    load_pretrained_weights(net, str(weights))
    ckpt = torch.load(pretrained["results"] / "fold_0" / "checkpoint_final.pth", map_location="cpu",
                      weights_only=False)["network_weights"]
    enc = {k: v for k, v in ckpt.items() if k.startswith("encoder.")}
    assert len(enc) > 10
    sd = net.state_dict()
    assert all(torch.equal(sd[k], v) for k, v in enc.items()), "encoder at step 0 must equal the pretrained one"
    saved = torch.load(weights, weights_only=False)["network_weights"]
    assert all(v.device.type == "cpu" for v in saved.values())


def test_stock_train_and_predict(pretrained, tmp_path):
    env = pretrained["env"]
    r = sh(["ssl_finetune", "-d", "802", "-p", str(pretrained["results"]), "-device", "cpu", "--epochs", "1",
            "--iters", "2", "--val-iters", "1", "--no-final-val", "-np", "1"], env)
    assert "Loading pretrained weights" in r.stdout + r.stderr
    out = pretrained["root"] / "res" / "Dataset802_SynthCTOrgans" / "SSLFinetuneTrainer__ssl3d_sparkPlans__3d_fullres"
    assert (out / "fold_0" / "checkpoint_final.pth").is_file()
    images = pretrained["root"] / "raw" / "Dataset802_SynthCTOrgans" / "imagesTr"
    src = sorted(images.glob("*_0000.nii.gz"))[0]
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / src.name).symlink_to(src)
    penv = dict(env, nnUNet_extTrainer=sh(["ssl_nnunet_ext_path"], env).stdout.strip())
    sh(["nnUNetv2_predict", "-i", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "-d", "802", "-c",
        "3d_fullres", "-p", "ssl3d_sparkPlans", "-tr", "SSLFinetuneTrainer", "-f", "0", "-device", "cpu",
        "--disable_tta", "-npp", "1", "-nps", "1"], penv)
    pred = sitk.ReadImage(str(tmp_path / "out" / src.name.replace("_0000.nii.gz", ".nii.gz")))
    img = sitk.ReadImage(str(src))
    assert pred.GetSize() == img.GetSize() and pred.GetSpacing() == img.GetSpacing()
    assert pred.GetDirection() == img.GetDirection() and pred.GetOrigin() == img.GetOrigin()
    # the thin wrapper finds the model by itself and gives the same segmentation
    sh(["ssl_predict", "-i", str(tmp_path / "in"), "-o", str(tmp_path / "out2"), "-d", "802", "-device", "cpu",
        "--", "--disable_tta", "-npp", "1", "-nps", "1"], env)
    pred2 = sitk.ReadImage(str(tmp_path / "out2" / src.name.replace("_0000.nii.gz", ".nii.gz")))
    assert (sitk.GetArrayFromImage(pred2) == sitk.GetArrayFromImage(pred)).all()


def test_ssl_predict_bad_input_is_one_line(pretrained, tmp_path):
    env = pretrained["env"]
    for args, msg in [(["-i", str(tmp_path / "nope")], "input folder does not exist"),
                      (["-i", str(tmp_path), "-p", "ssl3d_nonePlans"], "no images named"),]:
        r = subprocess.run([str(BIN / "ssl_predict"), *args, "-o", str(tmp_path / "o"), "-d", "802"], env=env,
                           capture_output=True, text=True)
        assert r.returncode == 2 and msg in r.stderr and "Traceback" not in r.stderr, r.stderr
    (tmp_path / "a_0000.nii.gz").write_bytes(b"")
    r = subprocess.run([str(BIN / "ssl_predict"), "-i", str(tmp_path), "-o", str(tmp_path / "o"), "-d", "802",
                        "-p", "ssl3d_nonePlans"], env=env, capture_output=True, text=True)
    assert r.returncode == 2 and "no fine-tuned model here" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


# One pretraining → stock nnUNetv2_train run per distinct downstream network (spark's ResEnc is the fixture's);
# voco also covers the region loader. Every method's export into its network is checked without training below.
STOCK_RUNS = ["mae", "mim", "smit", "voco"]


def test_stock_runs_cover_every_downstream_network():
    specs = method_specs()
    assert {s.downstream for s in specs.values()} == {specs[m].downstream for m in ["spark", *STOCK_RUNS]}


@pytest.mark.parametrize("method", STOCK_RUNS)
@pytest.mark.slow
def test_stock_training_of_every_methods_downstream_network(pretrained, method):
    """Every downstream network (HybridUNet with deep supervision, dna's Primus without it, SwinUNETR, ...) goes
    through stock nnUNetv2_train with a pretrained encoder loaded."""
    env = pretrained["env"]
    trainer = get_method_spec(method).trainer_name
    sh(["ssl_pretrain", "-d", "801", "-m", method, "-device", "cpu", "--size", "tiny", "--epochs", "1", "--iters",
        "1", "--val-iters", "1", "--no-progress"], env)
    results = pretrained["root"] / "res" / "Dataset801_SynthCTPool" / f"{trainer}__ssl3dPlans__3d_fullres"
    r = sh(["ssl_finetune", "-d", "802", "-p", str(results), "-device", "cpu", "--epochs", "1", "--iters", "2",
            "--val-iters", "1", "--no-final-val", "-np", "1"], env)
    assert "Loading pretrained weights" in r.stdout + r.stderr
    out = (pretrained["root"] / "res" / "Dataset802_SynthCTOrgans" /
           f"SSLFinetuneTrainer__ssl3d_{method}Plans__3d_fullres" / "fold_0")
    ckpt = torch.load(out / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert ckpt["current_epoch"] == 1
    plans = json.loads((pretrained["pre"] / f"ssl3d_{method}Plans.json").read_text())
    assert plans["configurations"]["3d_fullres"]["ssl3d_finetune"]["method"] == method


def test_mismatched_encoder_fails_loudly(pretrained, tmp_path, capsys):
    plans = json.loads((pretrained["pre"] / "ssl3d_sparkPlans.json").read_text())
    arch = json.loads(json.dumps(plans["configurations"]["3d_fullres"]["architecture"]))
    arch["arch_kwargs"]["features_per_stage"] = [c * 2 for c in arch["arch_kwargs"]["features_per_stage"]]
    net = build_downstream(arch, 1, 2)
    enc = torch.load(pretrained["pre"] / "ssl3d_sparkPlans__pretrained_weights.pth",
                     weights_only=False)["network_weights"]
    with pytest.raises(EncoderMismatchError, match="shape mismatches"):
        transfer_encoder(net, {k: v for k, v in enc.items() if k.startswith("encoder.")})
    with pytest.raises(EncoderMismatchError, match="no pretrained encoder weights"):
        transfer_encoder(net, {})
    # a results folder whose description does not match its checkpoint: one line, exit code 2
    bad = tmp_path / "bad"
    import shutil

    shutil.copytree(pretrained["results"], bad)
    for desc in (bad / "ssl_method.json", bad / "fold_0" / "ssl_method.json"):  # shared and per-fold copies
        info = json.loads(desc.read_text())
        info["method_kwargs"] = {}
        desc.write_text(json.dumps(info))
    from ssl3d.cli.finetune import export_main

    rc = export_main(["-p", str(bad), "-o", str(tmp_path / "w.pth")])
    err = capsys.readouterr().err
    assert rc == 2 and "checkpoint does not match" in err and "Traceback" not in err
    assert not (tmp_path / "w.pth").exists()


def test_few_shot_subsets_are_deterministic_nested_and_from_training_only():
    train = [f"case{i:02d}" for i in range(20)]
    a, b = few_shot_subset(train, 0, n_train=5), few_shot_subset(train, 0, n_train=5)
    assert a == b and len(a) == 5 and set(a) <= set(train)
    assert set(few_shot_subset(train, 0, n_train=3)) <= set(a), "growing K keeps earlier cases"
    assert len(few_shot_subset(train, 0, fraction=0.25)) == 5
    assert few_shot_subset(train, 1, n_train=5) != a
    with pytest.raises(ValueError):
        few_shot_subset(train, 0, n_train=21)


@pytest.mark.slow
def test_medcontext_trains_with_stock_nnunet(pretrained):
    env = dict(pretrained["env"], nnUNet_extTrainer=sh(["ssl_nnunet_ext_path"], pretrained["env"]).stdout.strip())
    weights = pretrained["pre"] / "ssl3d_sparkPlans__pretrained_weights.pth"
    sh(["nnUNetv2_train", "802", "3d_fullres", "0", "-p", "ssl3d_sparkPlans", "-tr", "MedContextTrainer",
        "-device", "cpu", "-pretrained_weights", str(weights)], env)
    out = pretrained["root"] / "res" / "Dataset802_SynthCTOrgans" / "MedContextTrainer__ssl3d_sparkPlans__3d_fullres"
    ckpt = torch.load(out / "fold_0" / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert "medcontext" in ckpt["ssl3d"] and ckpt["ssl3d"]["medcontext"]["mask_token"].shape == (1,)
    assert ckpt["current_epoch"] == 1
    # the lean CPU plans' channels-last weights reach MedContext's network too (it builds its own student)
    log = next((out / "fold_0").glob("training_log_*.txt")).read_text(encoding="utf-8")
    assert "network weights: channels_last_3d" in log


@pytest.mark.parametrize("method", sorted(method_specs()))
def test_every_method_has_a_downstream_network_taking_its_encoder(method):
    from test_pretraining import tiny_method

    m = tiny_method(method)
    arch = m.downstream_architecture()
    net = build_downstream(arch, 1, 3)
    assert transfer_encoder(net, m.downstream_state_dict()) > 0
    sd = net.state_dict()
    assert all(torch.equal(sd[k], v) for k, v in m.downstream_state_dict().items())
    x = torch.randn(1, 1, *m.patch_size)
    with torch.no_grad():
        out = net(x)
    out = out[0] if isinstance(out, (list, tuple)) else out
    assert out.shape == (1, 3, *m.patch_size)


def test_few_shot_never_touches_validation_cases():
    from nnunetv2.utilities.crossval_split import generate_crossval_split

    keys = [f"c{i:02d}" for i in range(12)]
    for fold, split in enumerate(generate_crossval_split(keys, seed=12345, n_splits=5)):
        sub = few_shot_subset(split["train"], fold, n_train=4)
        assert not set(sub) & set(split["val"])


def _finetune_losses(pretrained, name, seed):
    env = dict(pretrained["env"], nnUNet_results=str(pretrained["root"] / f"repro_{name}"), nnUNet_n_proc_DA="1")
    sh(["ssl_finetune", "-d", "802", "-p", str(pretrained["results"]), "-device", "cpu", "--epochs", "2", "--iters",
        "10", "--val-iters", "1", "--no-final-val", "-np", "1", "--seed", str(seed), "--n-train", "2"], env)
    out = (pretrained["root"] / f"repro_{name}" / "Dataset802_SynthCTOrgans" /
           "SSLFinetuneTrainer__ssl3d_sparkPlans__3d_fullres" / "fold_0" / "checkpoint_final.pth")
    return [float(v) for v in torch.load(out, map_location="cpu", weights_only=False)["logging"]["train_losses"]]


@pytest.mark.slow
def test_finetuning_is_reproducible_given_a_seed(pretrained):
    """Two 20-iteration runs with the same seed (one augmentation worker, as in the demo) give identical losses."""
    a, b, c = (_finetune_losses(pretrained, n, s) for n, s in (("a", 5), ("b", 5), ("c", 6)))
    assert a == b, (a, b)
    assert a != c
