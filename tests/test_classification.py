"""Classification fine-tuning: metrics, stratified splits, synthetic class data, ssl_finetune_cls end to end."""
import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import subprocess_env
from ssl3d.data.case_labels import fold_split, label_subset, read_case_labels, stratified_folds
from ssl3d.training.finetuning.cls_metrics import (binary_auc, classification_metrics, fit_logistic_regression,
                                                   predict_logistic, probe_state)
from ssl3d.utils import BadInputError

BIN = Path(sys.executable).parent


def sh(args, env, ok=True, timeout=600):
    r = subprocess.run([str(BIN / args[0]), *map(str, args[1:])], env=env, capture_output=True, text=True,
                       timeout=timeout)
    if ok:
        assert r.returncode == 0, (args, r.stdout[-1500:], r.stderr[-3000:])
    return r


def test_auc_matches_hand_computed_with_ties():
    # pairs (pos, neg): scores pos [0.8, 0.4, 0.4], neg [0.4, 0.1]
    # 0.8 beats both (2), 0.4 vs 0.4 tie (0.5) and beats 0.1 (1) -> 1.5 each -> (2 + 1.5 + 1.5) / 6
    assert binary_auc([1, 1, 1, 0, 0], [0.8, 0.4, 0.4, 0.4, 0.1]) == pytest.approx(5 / 6)
    assert binary_auc([1, 0], [0.2, 0.9]) == 0.0
    assert np.isnan(binary_auc([1, 1], [0.2, 0.9]))
    m = classification_metrics([0, 0, 1, 1], np.array([[0.9, 0.1], [0.4, 0.6], [0.3, 0.7], [0.2, 0.8]]), ["a", "b"])
    assert m["confusion_matrix"] == [[1, 1], [0, 2]] and m["auc"] == 1.0
    assert m["balanced_accuracy"] == pytest.approx(0.75)
    assert m["f1_per_class"]["a"] == pytest.approx(2 / 3) and m["f1_per_class"]["b"] == pytest.approx(0.8)


def test_folds_stratified_and_fractions_nested():
    labels = {f"c{i:02d}": int(i % 3 == 0) for i in range(23)}  # 8 positives, 15 negatives
    folds = stratified_folds(labels, seed=1)
    assert len(folds) == 5 and sorted(sum(folds, [])) == sorted(labels)
    assert all(len(set(a) & set(b)) == 0 for i, a in enumerate(folds) for b in folds[i + 1:])
    assert max(map(len, folds)) - min(map(len, folds)) <= 1
    assert all(sum(labels[c] for c in f) in (1, 2) for f in folds)  # 8 positives over 5 folds
    train, test = fold_split(labels, 2, seed=1)
    assert not set(train) & set(test) and len(train) + len(test) == 23
    subsets = [label_subset(labels, train, 7, n_train=k) for k in range(2, len(train) + 1)]
    assert all(set(a) <= set(b) for a, b in zip(subsets, subsets[1:]))
    assert all({labels[c] for c in s} == {0, 1} for s in subsets)
    assert label_subset(labels, train, 7, fraction=0.25) == subsets[round(0.25 * len(train)) - 2]
    assert stratified_folds(labels, seed=1) == folds


def test_bad_labels_csv_names_the_file(tmp_path):
    (tmp_path / "dataset.json").write_text("{}")
    csv_path = tmp_path / "cases.csv"
    csv_path.write_text("case_id,label\na,0\nb,1\nzzz,1\nc,0\n")
    with pytest.raises(BadInputError, match="unknown case id 'zzz'") as e:
        read_case_labels(tmp_path / "dataset.json", ["a", "b", "c"], csv_path)
    assert str(csv_path) in e.value.line()


def test_multiclass_auc_and_f1_skip_absent_classes():
    # class 2 never occurs and is never predicted: its AUC is left out, its F1 is NaN (not 0)
    y = [0, 0, 1, 1]
    p = np.array([[0.6, 0.3, 0.1], [0.2, 0.7, 0.1], [0.1, 0.8, 0.1], [0.5, 0.4, 0.1]])
    m = classification_metrics(y, p, ["a", "b", "c"])
    assert m["auc"] == pytest.approx(np.mean([binary_auc([1, 1, 0, 0], p[:, 0]), binary_auc([0, 0, 1, 1], p[:, 1])]))
    assert m["confusion_matrix"] == [[1, 1, 0], [1, 1, 0], [0, 0, 0]] and np.isnan(m["f1_per_class"]["c"])
    assert m["macro_f1"] == pytest.approx(0.5) and m["balanced_accuracy"] == pytest.approx(0.5)
    empty = classification_metrics([], np.zeros((0, 2)), ["a", "b"])
    assert np.isnan(empty["auc"]) and np.isnan(empty["balanced_accuracy"]) and empty["n_cases"] == 0


def test_logistic_probe_separates_easy_task_and_minimises_its_documented_objective():
    rng = np.random.default_rng(0)
    y = np.array([0, 1] * 20)
    x = rng.normal(size=(40, 8)) + 1.5 * y[:, None] * np.eye(8)[0]
    model = fit_logistic_regression(x[:20], y[:20], l2=0.05)
    probs = predict_logistic(model, x[20:], 2)
    assert probs.shape == (20, 2) and binary_auc(y[20:], probs[:, 1]) > 0.8
    # mean cross-entropy + l2 ||w||^2 on standardized features is stationary at sklearn's solution
    state = probe_state(model)
    z = torch.as_tensor((x[:20] - state["mean"].numpy()) / state["scale"].numpy())
    w = state["coef"].clone().requires_grad_(True)
    b = state["intercept"].clone().requires_grad_(True)
    logit = z @ w[0] + b[0]
    obj = torch.nn.functional.binary_cross_entropy_with_logits(logit, torch.as_tensor(y[:20], dtype=z.dtype)) \
        + 0.05 * (w ** 2).sum()
    obj.backward()
    assert float(w.grad.abs().max()) < 1e-4 and float(b.grad.abs().max()) < 1e-4
    assert float(state["coef"][0, 0]) > 0.5 * float(state["coef"][0, 1:].abs().max()) + 0.1  # informative feature


@pytest.fixture(scope="module")
def cls_env(tmp_path_factory):
    """Tiny synthetic pool + fatty-liver set (10 cases) -> 2-iteration tiny SparK pretraining."""
    root = tmp_path_factory.mktemp("cls")
    env = subprocess_env(root / "raw", root / "pre", root / "res")
    sh(["ssl_make_demo_data", "-o", root / "raw", "--size", "tiny", "-nu", "4", "-nl", "0", "--classification",
        "fatty-liver", "-nc", "10", "--no-progress"], env)
    sh(["ssl_plan_and_preprocess", "-d", "801", "-np", "1", "--no-progress", "--patch-size", "16", "32", "32"], env)
    sh(["ssl_pretrain", "-d", "801", "-m", "spark", "-device", "cpu", "--size", "tiny", "--epochs", "1", "--iters",
        "2", "--val-iters", "1", "--no-progress", "--preview-every", "0"], env)
    return {"root": root, "env": env, "raw": root / "raw" / "Dataset803_SynthCTFattyLiver",
            "results": root / "res" / "Dataset801_SynthCTPool" / "SparKPretrainer__ssl3dPlans__3d_fullres"}


def test_synthetic_cls_data_labels_in_both_places_and_deterministic(cls_env, tmp_path):
    from ssl3d.data.synthetic_cls import write_classification_dataset

    dj = json.loads((cls_env["raw"] / "dataset.json").read_text())
    rows = list(csv.DictReader(open(cls_env["raw"] / "cases.csv")))
    assert {r["case_id"]: int(r["label"]) for r in rows} == dj["ssl3d_case_labels"]
    assert sum(dj["ssl3d_case_labels"].values()) == 5 and dj["ssl3d_classes"] == {"0": "normal", "1": "fatty"}
    assert all(-60 <= s <= -30 for c, s in dj["ssl3d_liver_hu_shift"].items() if dj["ssl3d_case_labels"][c])
    a = write_classification_dataset(tmp_path / "a", n=2, seed=3, size="tiny", progress=False)
    b = write_classification_dataset(tmp_path / "b", n=2, seed=3, size="tiny", progress=False)
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert len(files) == 4 and all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    assert json.loads((a / "dataset.json").read_text())["ssl3d_case_labels"] in ({"liver_0000": 1, "liver_0001": 0},
                                                                                 {"liver_0000": 0, "liver_0001": 1})


def _cls(cls_env, *extra, ok=True):
    return sh(["ssl_finetune_cls", "-d", "803", "-p", cls_env["results"], "-device", "cpu", "--epochs", "1",
               "--iters", "2", "--no-progress", *extra], cls_env["env"], ok=ok)


def _check_outputs(folder: Path, n_test: int):
    rows = list(csv.DictReader(open(folder / "predictions.csv")))
    assert len(rows) == n_test and {"case_id", "true", "predicted", "p_normal", "p_fatty"} <= set(rows[0])
    metrics = json.loads((folder / "metrics.json").read_text())
    assert {"auc", "balanced_accuracy", "f1_per_class", "confusion_matrix"} <= set(metrics)
    assert sum(map(sum, metrics["confusion_matrix"])) == n_test
    assert (folder / "confusion_matrix.png").stat().st_size > 1000
    summary = json.loads((folder / "cls_results.json").read_text())
    assert not set(summary["test_cases"]) & set(summary["train_cases"] + summary["val_cases"])
    return summary


@pytest.mark.slow
def test_finetune_resume_and_linear(cls_env):
    _cls(cls_env, "--mode", "finetune")
    plans = "ssl3d_sparkClsPlans__3d_fullres"
    out = cls_env["root"] / "res" / "Dataset803_SynthCTFattyLiver" / f"ClsFinetuneTrainer__{plans}" / "fold_0"
    summary = _check_outputs(out, 2)
    assert len(summary["val_cases"]) == 2 and (out / "checkpoint_final.pth").is_file()
    assert torch.load(out / "checkpoint_final.pth", weights_only=False)["current_epoch"] == 1
    r = _cls(cls_env, "--mode", "finetune", "--c", "--epochs", "2")
    assert "continuing from" in r.stderr
    assert torch.load(out / "checkpoint_final.pth", weights_only=False)["current_epoch"] == 2
    assert torch.load(out / "checkpoint_final.pth", weights_only=False)["ssl3d"]["crop_size"] == [16, 32, 32]
    r = _cls(cls_env, "--mode", "finetune", "--c", "--epochs", "2", "--crop", "case", ok=False)  # patch-trained
    lines = [ln for ln in r.stderr.splitlines() if "error" in ln]
    assert r.returncode == 2 and len(lines) == 1 and "16 x 32 x 32 crops" in lines[0], r.stderr[-2000:]
    _cls(cls_env, "--mode", "linear", "--n-train", "4", "-f", "1")
    lin = cls_env["root"] / "res" / "Dataset803_SynthCTFattyLiver" / f"ClsLinearProbe__{plans}" / "fold_1_n4"
    summary = _check_outputs(lin, 2)
    assert len(summary["train_cases"]) == 4 and len(list((lin.parent / "embeddings").glob("*/*.npy"))) == 6
    assert json.loads((lin / "metrics.json").read_text())["mirror_tta"] is False  # embeddings are not mirrored
    r = _cls(cls_env, "--mode", "linear", "--n-train", "6", "-f", "1", "-v")  # embeds only the 2 new cases
    assert r.stderr.count("embedded ") == 2, r.stderr[-2000:]
    assert len(list((lin.parent / "embeddings").glob("*/*.npy"))) == 8


@pytest.mark.slow
def test_case_crop_is_the_rounded_largest_case_end_to_end(cls_env):
    """``--crop case``: crop = scoring tile = the largest preprocessed case of the run (budget + held out), rounded up
    to the encoder's total stride, recorded in cls_results.json, metrics.json and the checkpoint."""
    import pickle

    _cls(cls_env, "--mode", "scratch", "-f", "2", "--crop", "case", "--val-fraction", "0")
    pre = cls_env["root"] / "pre" / "Dataset803_SynthCTFattyLiver"
    plans = json.loads((pre / "ssl3d_sparkClsPlans.json").read_text())["configurations"]["3d_fullres"]
    out = cls_env["root"] / "res" / "Dataset803_SynthCTFattyLiver" / \
        "ClsScratchTrainer__ssl3d_sparkClsPlans__3d_fullres" / "fold_2"
    summary = _check_outputs(out, 2)
    cases = summary["train_cases"] + summary["val_cases"] + summary["test_cases"]
    biggest = np.max([pickle.load(open(pre / plans["data_identifier"] / f"{k}.pkl", "rb"))["shape_after_resampling"]
                      for k in cases], 0)
    stride = np.prod(np.array(plans["architecture"]["arch_kwargs"]["strides"]), 0)
    expected = [int(v) for v in np.ceil(biggest / stride) * stride]
    assert expected != plans["patch_size"] and summary["crop_size"] == expected
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["crop_size"] == expected and metrics["mirror_tta"] is True  # nnU-Net's test-time mirroring
    assert torch.load(out / "checkpoint_final.pth", weights_only=False)["ssl3d"]["crop_size"] == expected


def test_bad_labels_one_line_no_traceback(cls_env, tmp_path):
    bad = tmp_path / "cases.csv"
    bad.write_text("case_id,label\nliver_0000,1\nnot_a_case,0\n")
    r = _cls(cls_env, "--labels", bad, ok=False)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    lines = [ln for ln in r.stderr.splitlines() if "error" in ln]
    assert len(lines) == 1 and str(bad) in lines[0] and "not_a_case" in lines[0]


def test_classifier_training_loss_falls(cls_env):
    from ssl3d.training.finetuning.classification import build_classifier, classifier_param_groups

    arch = json.loads((cls_env["results"] / "ssl_method.json").read_text())["downstream_architecture"]
    torch.manual_seed(0)
    net = build_classifier(arch, 1, 2, (16, 32, 32))
    groups = classifier_param_groups(net, 0.0, encoder_lr_factor=0.5, layer_decay=0.8)
    assert {g["lr_factor"] for g in groups} >= {1.0} and min(g["lr_factor"] for g in groups) < 0.5
    for g in groups:
        g["lr"] = 1e-2 * g["lr_factor"]
    opt = torch.optim.AdamW(groups)
    y = torch.tensor([0, 1, 0, 1])
    x = torch.randn(4, 1, 16, 32, 32)
    x[1::2, :, 4:12, 8:24, 8:24] += 3.0  # a bright block (instance norms remove plain intensity offsets)
    losses = []
    for _ in range(25):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(net(x), y)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert np.mean(losses[-3:]) < 0.7 * losses[0], losses


def _fit_local_shift(pool_max: bool, steps: int = 30) -> float:
    """Train a tiny ResEnc classifier on 8 blob volumes whose class is a +0.5 shift inside one fixed box (a
    "darker organ"); return the final full-batch training loss."""
    import torch.nn.functional as F

    from conftest import blob_batch
    from ssl3d.training.finetuning.classification import build_classifier
    from test_pretraining import tiny_method

    spark = tiny_method("spark")
    torch.manual_seed(0)
    x = blob_batch(3, batch=8, shape=spark.patch_size)
    y = torch.tensor([0, 1] * 4)
    x[y == 1, :, 4:10, 8:20, 8:20] += 0.5
    net = build_classifier(spark.downstream_architecture(), 1, 2, spark.patch_size)
    if not pool_max:  # the average alone, for contrast
        net.head = torch.nn.Linear(net.head.in_features // 2, 2)
        net.embed = lambda v: net.backbone(v)[-1].mean((2, 3, 4))
    opt = torch.optim.AdamW(net.parameters(), 1e-3)
    for _ in range(steps):
        loss = F.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return float(F.cross_entropy(net(x), y))


def test_avg_max_head_learns_a_local_intensity_shift():
    """Instance-normed stages fix each channel's mean: the average-only head barely moves where avg ‖ max fits."""
    with_max = _fit_local_shift(True)
    assert with_max < 0.3, with_max
    assert with_max < 0.5 * _fit_local_shift(False)


def test_crop_patch_keeps_the_plan_case_rounds_the_largest_case_up_and_scores_in_one_tile():
    from ssl3d.architectures.primus import primus_architecture
    from ssl3d.architectures.swin import swin_arch_kwargs
    from ssl3d.training.finetuning.classification import (CASE_CROP_MAX_VOXELS, build_classifier, resolve_crop,
                                                          sliding_window_logits)
    from test_pretraining import tiny_method

    resenc = tiny_method("spark").downstream_architecture()  # strides 1, 1x2x2, 2x2x2 ... -> total 2^k per axis
    total = [int(np.prod([s[a] for s in resenc["arch_kwargs"]["strides"]])) for a in range(3)]
    shapes = [(17, 28, 33), (5, 9, 10), (11, 30, 21)]
    assert resolve_crop("patch", None, resenc, (16, 32, 32), shapes) == (16, 32, 32)
    case = resolve_crop("case", None, resenc, (16, 32, 32), shapes)
    assert case == tuple(-(-m // t) * t for m, t in zip((17, 30, 33), total)) and case >= (17, 30, 33)
    assert resolve_crop("patch", (8, 16, 16), resenc, (16, 32, 32)) == (8, 16, 16)
    with pytest.raises(BadInputError, match="multiple of"):
        resolve_crop("patch", (total[0] + 1, 32, 32), resenc, (16, 32, 32))
    big = round((CASE_CROP_MAX_VOXELS / 64) ** (1 / 2)) + 64
    with pytest.raises(BadInputError, match="--crop-size"):
        resolve_crop("case", None, resenc, (16, 32, 32), [(64, big, big)])
    swin = {"network_class_name": "ssl3d.architectures.swin.SwinUNETRNet", "arch_kwargs": swin_arch_kwargs("tiny")}
    assert resolve_crop("case", None, swin, (32, 32, 64), shapes) == (32, 32, 64)  # multiples of 32
    primus = primus_architecture(48, 1, 2, (8, 8, 8), (16, 32, 32))
    assert resolve_crop("patch", (16, 32, 32), primus, (16, 32, 32)) == (16, 32, 32)
    for crop, size in (("case", None), ("patch", (16, 32, 64))):
        with pytest.raises(BadInputError, match="fixed token grid"):
            resolve_crop(crop, size, primus, (16, 32, 32), shapes)
    # the case crop is the scoring tile: every case (zero-padded at the far end) in one window
    net = build_classifier(resenc, 1, 2, case).eval()
    calls = []
    sliding_window_logits(lambda x: calls.append(tuple(x.shape)) or net(x), np.zeros((1, 17, 28, 33), np.float32),
                          case, torch.device("cpu"))
    assert calls == [(1, 1, *case)]


def test_nnunet_augmentation_loads_a_larger_crop_returns_the_training_crop_and_is_seeded(cls_env, monkeypatch):
    """``augment="nnunet"``: nnU-Net's loader crop is larger than the training crop (room for rotation and
    scaling), nnU-Net's transforms return batches of the training crop, the same seed gives the same batches, and
    they differ from mirroring's; the network's weights are channels_last_3d on CPU; a bad value is refused."""
    from ssl3d.evaluation.classification import ClsOptions, prepare
    from ssl3d.training.finetuning.classification import ClsScratchTrainer

    for key, sub in (("nnUNet_raw", "raw"), ("nnUNet_preprocessed", "pre"), ("nnUNet_results", "res")):
        monkeypatch.setenv(key, str(cls_env["root"] / sub))
    p = prepare(ClsOptions(dataset="803", pretraining=str(cls_env["results"]), mode="scratch", device="cpu",
                           progress=False, crop="case"))
    dataset_json = json.loads((p["preprocessed"] / "dataset.json").read_text())

    def first_batch(augment: str):
        tr = ClsScratchTrainer(p["plans"], "3d_fullres", "aug", dataset_json, torch.device("cpu"))
        tr.case_labels, tr.class_names, tr.train_keys = p["labels"], p["names"], p["budget"]
        tr.crop_size, tr.augment = p["crop"], augment
        tr.initialize()
        conv = next(m for m in tr.network.modules() if isinstance(m, torch.nn.Conv3d))
        assert conv.weight.is_contiguous(memory_format=torch.channels_last_3d)
        loader_crop, _ = tr.training_transforms()
        data = next(tr.get_dataloaders()[0])["data"]
        assert tuple(data.shape) == (tr.batch_size, 1, *p["crop"])
        return loader_crop, data

    loader_crop, a = first_batch("nnunet")
    assert all(v >= c for v, c in zip(loader_crop, p["crop"])) and loader_crop != tuple(p["crop"])
    assert torch.equal(a, first_batch("nnunet")[1])
    mirror_crop, m = first_batch("mirror")
    assert mirror_crop == tuple(p["crop"]) and not torch.equal(a, m)
    with pytest.raises(BadInputError, match="--augment"):
        prepare(ClsOptions(dataset="803", pretraining=str(cls_env["results"]), mode="scratch", augment="elastic"))


def test_mirror_tta_averages_every_mirrored_tile_and_matches_plain_scoring_without_axes():
    """``mirror_axes``: the result is the mean of ``fn`` over all 2^k mirrorings of each tile (nnU-Net's test-time
    mirroring); without axes it is the plain sliding window."""
    import itertools

    from ssl3d.training.finetuning.classification import sliding_window_logits

    g = torch.Generator().manual_seed(0)
    weight = torch.randn(1, 8, 8, 8, generator=g)  # position-dependent: mirroring changes the output
    fn = lambda t: (t * weight).sum((1, 2, 3, 4))[:, None]  # noqa: E731
    image = torch.randn(1, 8, 8, 8, generator=g).numpy()  # one tile
    cpu = torch.device("cpu")
    x = torch.as_tensor(image)[None]
    plain = sliding_window_logits(fn, image, (8, 8, 8), cpu)
    assert torch.allclose(plain, fn(x)[0])
    flips = [list(c) for r in range(4) for c in itertools.combinations((2, 3, 4), r)]
    expected = torch.stack([fn(torch.flip(x, d) if d else x)[0] for d in flips]).mean(0)
    tta = sliding_window_logits(fn, image, (8, 8, 8), cpu, mirror_axes=(0, 1, 2))
    assert torch.allclose(tta, expected, atol=1e-5) and not torch.allclose(tta, plain, atol=1e-3)
    one_axis = sliding_window_logits(fn, image, (8, 8, 8), cpu, mirror_axes=(2,))
    assert torch.allclose(one_axis, (fn(x)[0] + fn(torch.flip(x, [4]))[0]) / 2, atol=1e-5)


def test_disable_tta_flag_in_both_spellings():
    from ssl3d.cli.finetune_cls import build_parser

    base = ["-d", "803", "-p", "x"]
    assert build_parser().parse_args(base).disable_tta is False
    assert build_parser().parse_args(base + ["--disable_tta"]).disable_tta is True  # nnUNetv2_predict's spelling
    assert build_parser().parse_args(base + ["--disable-tta"]).disable_tta is True
