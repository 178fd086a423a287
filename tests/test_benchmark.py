"""ssl_benchmark: statistics against a hand-computed example, arms and nested seed-matched subsets, a held-out
test set no arm trains on, and a tiny end-to-end run with its three outputs and resume."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import subprocess_env

from ssl3d.evaluation.protocol import PRESETS, Arm, HeldOutSplit, plan_arms, split_test, training_cases
from ssl3d.evaluation.runner import pretrain_command
from ssl3d.evaluation.stats import paired_difference, summarize
from ssl3d.utils import BadInputError

BIN = Path(sys.executable).parent


def test_paired_difference_matches_hand_computation():
    a = {0: 0.5, 1: 0.6, 2: 0.7}
    b = {0: 0.4, 1: 0.4, 2: 0.6, 3: 0.9}  # seed 3 has no partner and is ignored
    d = paired_difference(a, b)
    # differences 0.1, 0.2, 0.1: mean 0.13333, sd 0.057735, se 0.033333, t(0.975, 2) = 4.302653
    assert d.n == 3
    assert math.isclose(d.mean, 0.133333, abs_tol=1e-5)
    assert math.isclose(d.low, 0.133333 - 0.143422, abs_tol=1e-5)
    assert math.isclose(d.high, 0.133333 + 0.143422, abs_tol=1e-5)
    one = paired_difference({0: 0.5}, {0: 0.25})
    assert one.mean == 0.25 and math.isnan(one.low) and one.fmt() == "+0.250"
    s = summarize([0.5, 0.7, float("nan")])
    assert s.n == 2 and math.isclose(s.mean, 0.6) and math.isclose(s.sd, math.sqrt(0.02))


def test_linear_cka_properties():
    import torch

    from ssl3d.evaluation.similarity import linear_cka, stage_cka

    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 8, generator=g)
    q, _ = torch.linalg.qr(torch.randn(8, 8, generator=g))
    assert math.isclose(linear_cka(x, x), 1.0, abs_tol=1e-9)
    assert math.isclose(linear_cka(x, 3.0 * x @ q + 2.0), 1.0, abs_tol=1e-9), "invariant to rotation, scale, shift"
    assert linear_cka(x, torch.randn(500, 8, generator=g)) < 0.1, "independent features are dissimilar"
    # hand example: y = first column of x only -> CKA = ||x1||^4 / (||X^T X||_F ||x1||^2) for centered x
    a = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 2.0], [0.0, -2.0]])
    assert math.isclose(linear_cka(a, a[:, :1]), 2.0 ** 2 / (math.sqrt(2.0 ** 2 + 8.0 ** 2) * 2.0), rel_tol=1e-9)
    maps = [torch.randn(2, 4, 3, 4, 4, generator=g), torch.randn(2, 6, 2, 2, 2, generator=g)]
    assert [round(v, 9) for v in stage_cka(maps, maps)] == [1.0, 1.0]


def test_reconstruction_metrics():
    import torch

    from ssl3d.training.recon_metrics import masked_psnr, masked_ssim

    g = torch.Generator().manual_seed(0)
    y = torch.rand(1, 1, 8, 16, 16, generator=g)
    masked = torch.zeros_like(y, dtype=torch.bool)
    masked[..., :4, :, :] = True
    assert masked_psnr(y, y, masked) == float("inf") and math.isclose(masked_ssim(y, y, masked), 1.0, rel_tol=1e-6)
    noisy = y.clone()
    noisy[masked] += 0.1  # MSE 0.01 on masked voxels only
    peak = float(y.max() - y.min())
    assert math.isclose(masked_psnr(noisy, y, masked), 10 * math.log10(peak ** 2 / 0.01), rel_tol=1e-4)
    assert masked_ssim(noisy, y, masked) < 1.0
    assert masked_psnr(noisy, y, ~masked) == float("inf"), "visible voxels are not scored"


def test_arms_one_scratch_per_downstream_network_and_refused_counts():
    arms = plan_arms(["spark", "hyspark"], True, ["1", "2", "all"], [0, 1], n_trainable=4)
    assert len(arms) == 2 * 3 * (2 + 2)  # seeds × counts × (2 methods + 2 scratch baselines)
    scratch = {a.base for a in arms if a.scratch}
    assert scratch == {"spark", "hyspark"}
    assert {a.n_train for a in arms if a.n_label == "all"} == {4}
    assert len({a.id for a in arms}) == len(arms)
    with pytest.raises(BadInputError):
        plan_arms(["spark"], False, ["5"], [0], n_trainable=4)


def test_frozen_arms_and_a_fixed_number_of_test_cases(tmp_path):
    arms = plan_arms(["spark"], True, ["1", "all"], range(3), 4, ["finetune", "frozen"])
    assert len(arms) == 3 * 2 * 2 * 2 and len({a.id for a in arms}) == len(arms)
    assert {a.id for a in arms if a.seed == 0 and a.n_train == 1} == {
        "spark__n1__s0", "scratch-spark__n1__s0", "spark-frozen__n1__s0", "scratch-spark-frozen__n1__s0"}
    for bad in (["linear"], ["frozen", "frozen"], []):
        with pytest.raises(BadInputError):
            plan_arms(["spark"], True, ["1"], [0], 4, bad)
    ds = _raw_dataset(tmp_path, 15)
    split = split_test(ds, None, 1 / 3, 2, n_test=12)
    assert len(split.test_labels) == 12 and len(split.trainable) == 3
    assert sorted(split_test(ds, None, 1 / 3, 2, n_test=12).test_labels) == sorted(split.test_labels)
    with pytest.raises(BadInputError, match="12 test cases"):
        split_test(ds, None, 1 / 3, 4, n_test=12)


def test_small_preset_pretrains_at_a_short_schedule_lr_and_paper_at_the_methods_default():
    small = pretrain_command("Dataset801_X", "spark", "cpu", PRESETS["small"])
    assert small[small.index("--lr") + 1] == "0.001" and small[small.index("--iters") + 1] == "10"
    assert "--lr" not in pretrain_command("Dataset801_X", "spark", "cuda", PRESETS["paper"])
    override = {**PRESETS["paper"], "pretrain_lr": 3e-4}
    assert pretrain_command("Dataset801_X", "mae", "cuda", override)[-2:] == ["--lr", "0.0003"]


def test_few_shot_subsets_are_nested_and_seed_matched():
    split = HeldOutSplit([f"c{i:02d}" for i in range(12)])
    for seed in range(3):
        sets = [set(training_cases(split, Arm(m, m, n, str(n), seed))) for n in (1, 2, 4, 8) for m in ("spark",)]
        assert all(a < b for a, b in zip(sets, sets[1:])), "the 2-case set must contain the 1-case set"
        assert training_cases(split, Arm("spark", "spark", 2, "2", seed)) == \
            training_cases(split, Arm("scratch", "spark", 2, "2", seed)), "same seed, same cases for every arm"
    assert len({tuple(training_cases(split, Arm("spark", "spark", 4, "4", s))) for s in range(5)}) > 1


def _raw_dataset(root: Path, n: int) -> Path:
    ds = root / "Dataset802_X"
    for sub in ("imagesTr", "labelsTr"):
        (ds / sub).mkdir(parents=True)
    for i in range(n):
        (ds / "imagesTr" / f"case{i}_0000.nii.gz").write_bytes(b"")
        (ds / "labelsTr" / f"case{i}.nii.gz").write_bytes(b"")
    (ds / "dataset.json").write_text(json.dumps({"file_ending": ".nii.gz", "labels": {"background": 0, "a": 1}}))
    return ds


def test_held_out_test_set_is_fixed_and_disjoint(tmp_path):
    ds = _raw_dataset(tmp_path, 9)
    a, b = split_test(ds, None, 1 / 3, 2), split_test(ds, None, 1 / 3, 2)
    assert a.trainable == b.trainable and sorted(a.test_labels) == sorted(b.test_labels)
    assert len(a.test_labels) == 3 and not set(a.trainable) & set(a.test_labels)
    with pytest.raises(BadInputError):
        split_test(ds, None, 1 / 3, 7)  # 9 cases cannot give a test set and 7 training cases


@pytest.fixture(scope="module")
def bench_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    env = subprocess_env(root / "raw", root / "pre", root / "res")
    for cmd in (["ssl_make_demo_data", "-o", str(root / "raw"), "--size", "tiny", "-nu", "3", "-nl", "4",
                 "--no-progress"],
                ["ssl_plan_and_preprocess", "-d", "801", "-np", "1", "--no-progress", "--patch-size", "16", "32", "32"]):
        r = subprocess.run([str(BIN / cmd[0]), *cmd[1:]], env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-2000:]
    return root, env


def _bench(env, out, *extra):
    cmd = [str(BIN / "ssl_benchmark"), "-u", "801", "-l", "802", "-m", "spark", "--scratch", "--n-train", "1",
           "--seeds", "1", "--pretrain-epochs", "1", "--pretrain-iters", "2", "--ft-epochs", "1", "--ft-iters", "2",
           "--size", "tiny", "-device", "cpu", "-np", "1", "--no-progress", "--test-cases", "1", "-o", str(out),
           *extra]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_tiny_benchmark_end_to_end_and_resume(bench_data):
    root, env = bench_data
    out = root / "out"
    r = _bench(env, out, "--cka", "--arms", "frozen")  # the frozen arms (the fine-tuning path: test_finetune)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert not res["failures"] and len(res["arms"]) == 2
    assert {a["mode"] for a in res["arms"]} == {"frozen"}
    assert (out / "label_efficiency.png").stat().st_size > 10_000
    assert (out / "label_efficiency_per_class.png").stat().st_size > 10_000
    protocol = json.loads((out / "protocol.json").read_text())
    test_cases = set(protocol["split"]["test"])
    assert test_cases and all(not test_cases & set(a["train_cases"]) for a in res["arms"])
    for arm in res["arms"]:  # consistent numbers: mean Dice = mean over classes, table shows it
        assert len(arm["train_cases"]) == 1
        assert math.isclose(arm["mean_dice"], sum(arm["dice"].values()) / len(arm["dice"]), abs_tol=1e-9)
        assert [c["case"] for c in arm["cases"]] == sorted(test_cases)  # per-case Dice, NSD, HD95
        assert 0 <= arm["mean_nsd"] <= 1 and arm["mean_hd95"] > 0 and set(arm["hd95"]) == set(arm["dice"])
        # nnU-Net never saw a test case: its split lists training candidates only
        split = json.loads((out / "nnUNet_preprocessed" / "Dataset802_SynthCTOrgans" / "splits_final.json")
                           .read_text())
        assert not test_cases & set(split[0]["train"])
    md = (out / "results.md").read_text(encoding="utf-8")
    by = {a["method"]: a["mean_dice"] for a in res["arms"]}
    assert "### Frozen encoder" in md and "Mean foreground HD95 (mm)" in md
    assert f"| spark (frozen) | {by['spark']:.3f} |" in md and f"| scratch (frozen) | {by['scratch']:.3f} |" in md
    assert f"{by['spark'] - by['scratch']:+.3f}" in md
    import torch

    exported = torch.load(out / "nnUNet_preprocessed" / "Dataset802_SynthCTOrgans" /
                          "ssl3d_sparkPlans__pretrained_weights.pth", weights_only=False)["network_weights"]
    trained = torch.load(out / "arms" / "spark-frozen__n1__s0" / "nnUNet_results" / "Dataset802_SynthCTOrgans" /
                         "SSLFinetuneTrainer__ssl3d_sparkPlans__3d_fullres" / "fold_0" / "checkpoint_final.pth",
                         weights_only=False)["network_weights"]
    enc = [k for k in exported if k.startswith("encoder.")]
    assert enc and all(torch.equal(trained[k], exported[k]) for k in enc), "frozen encoder is not the exported one"
    assert any(not torch.equal(trained[k], exported[k]) for k in trained if k.startswith("decoder.stages"))
    pre = res["pretraining"]["spark"]
    assert pre["reconstruction"]["psnr"] > 0 and "masked PSNR" in md
    cka = json.loads((out / "cka.json").read_text())
    assert len(cka) == 2 and all(0 <= v <= 1.000001 for row in cka for v in row["cka"])
    assert (out / "cka.png").stat().st_size > 5_000

    # simulated kill: one arm's result and the reports are gone; the rerun redoes that arm only
    spark_log = out / "arms" / "spark-frozen__n1__s0" / "run.log"
    size, pre_mtime = spark_log.stat().st_size, (out / "pretraining" / "spark.json").stat().st_mtime
    (out / "arms" / "scratch-spark-frozen__n1__s0" / "result.json").unlink()
    for f in ("results.json", "results.md", "label_efficiency.png"):
        (out / f).unlink()
    r = _bench(env, out, "--arms", "frozen")
    assert r.returncode == 0, r.stderr[-3000:]
    assert spark_log.stat().st_size == size, "finished arm was rerun"
    assert (out / "pretraining" / "spark.json").stat().st_mtime == pre_mtime
    assert (out / "arms" / "scratch-spark-frozen__n1__s0" / "result.json").is_file()
    again = json.loads((out / "results.json").read_text())
    assert len(again["arms"]) == 2


def test_benchmark_bad_input_is_one_line(bench_data, tmp_path):
    root, env = bench_data
    r = _bench(env, tmp_path / "o", "--test", str(tmp_path / "nope"))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert len([l for l in r.stderr.splitlines() if l.strip()]) == 1, r.stderr


def _tiny_trainer_plans(ft: dict) -> dict:
    """A 3-stage ResEnc U-Net with BatchNorm (running statistics) for an in-process SSLFinetuneTrainer."""
    arch = {"network_class_name": "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet",
            "arch_kwargs": {"n_stages": 3, "features_per_stage": [4, 8, 8], "conv_op": "torch.nn.Conv3d",
                            "kernel_sizes": [[3, 3, 3]] * 3, "strides": [[1, 1, 1], [2, 2, 2], [2, 2, 2]],
                            "n_blocks_per_stage": [1, 1, 1], "n_conv_per_stage_decoder": [1, 1], "conv_bias": True,
                            "norm_op": "torch.nn.BatchNorm3d", "norm_op_kwargs": {"eps": 1e-5, "affine": True},
                            "dropout_op": None, "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU",
                            "nonlin_kwargs": {"inplace": True}},
            "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]}
    cfg = {"data_identifier": "tiny", "preprocessor_name": "DefaultPreprocessor", "batch_size": 2,
           "patch_size": [16, 16, 16], "median_image_size_in_voxels": [16, 16, 16], "spacing": [1.0, 1.0, 1.0],
           "normalization_schemes": ["ZScoreNormalization"], "use_mask_for_norm": [False], "architecture": arch,
           "batch_dice": False, "ssl3d_finetune": ft}
    return {"dataset_name": "Dataset990_Tiny", "plans_name": "tinyPlans", "original_median_spacing_after_transp":
            [1.0, 1.0, 1.0], "original_median_shape_after_transp": [16, 16, 16], "image_reader_writer": "SimpleITKIO",
            "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2], "configurations": {"3d_fullres": cfg},
            "experiment_planner_used": "ExperimentPlanner", "label_manager": "LabelManager",
            "foreground_intensity_properties_per_channel": {}}


def _train_tiny(tmp_path, freeze: bool, weights: Path | None = None):
    import torch
    from nnunetv2.run.load_pretrained_weights import load_pretrained_weights

    from ssl3d.training.finetuning.trainer import SSLFinetuneTrainer

    dj = {"channel_names": {"0": "CT"}, "labels": {"background": 0, "a": 1}, "numTraining": 2,
          "file_ending": ".nii.gz"}
    ft = {"freeze_encoder": freeze, "optimizer": "adamw", "lr": 1e-2, "weight_decay": 0.05, "seed": 3,
          "num_epochs": 2, "warmup_epochs": 0}
    trainer = SSLFinetuneTrainer(_tiny_trainer_plans(ft), "3d_fullres", 0, dj, torch.device("cpu"))
    trainer.initialize()
    if weights is not None:
        load_pretrained_weights(trainer.network, str(weights), verbose=False)  # what nnUNetv2_train does
    g = torch.Generator().manual_seed(0)
    for epoch in range(2):
        trainer.current_epoch = epoch
        trainer.on_train_epoch_start()
        modes = (trainer.network.encoder.training, trainer.network.decoder.stages.training)
        for _ in range(2):
            x = torch.randn(2, 1, 16, 16, 16, generator=g)
            seg = (x > 0.5).float()
            trainer.train_step({"data": x, "target": [seg, seg[:, :, ::2, ::2, ::2]]})
        trainer.network.eval()  # as nnU-Net's validation epoch does; the next epoch start must undo it
    return trainer, modes


def test_frozen_encoder_stays_bit_identical_through_training(tmp_path, monkeypatch):
    """SSLFinetuneTrainer with freeze_encoder: the encoder's parameters and BatchNorm running statistics are the
    loaded (exported) ones after AdamW steps with weight decay; the decoder trains. Without it they change."""
    import torch

    from ssl3d.training.finetuning.freeze import encoder_parameters, encoder_state

    for k in ("nnUNet_preprocessed", "nnUNet_results", "nnUNet_raw"):
        (tmp_path / k).mkdir()
        monkeypatch.setenv(k, str(tmp_path / k))
    data = tmp_path / "nnUNet_preprocessed" / "Dataset990_Tiny" / "tiny"
    data.mkdir(parents=True)
    (data / "none.b2nd").write_bytes(b"")  # initialize() infers the dataset class; no case is ever read
    probe, _ = _train_tiny(tmp_path / "a", freeze=True)  # a network of the right layout, to write "exported" weights
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # in place: decoder.encoder is the same module, its keys stay consistent
        for k, v in probe.network.state_dict().items():
            if v.is_floating_point():
                v.add_(0.1 * torch.rand(v.shape, generator=g))
    exported = {k: v.clone() for k, v in probe.network.state_dict().items()}
    weights = tmp_path / "exported.pth"
    torch.save({"network_weights": exported}, weights)
    enc_keys = [k for k in exported if k.startswith("encoder.")]
    assert any("running_mean" in k for k in enc_keys)

    frozen, modes = _train_tiny(tmp_path, freeze=True, weights=weights)
    after = encoder_state(frozen.network)
    assert sorted(after) == sorted(enc_keys)
    assert all(torch.equal(after[k], exported[k]) for k in enc_keys), "frozen encoder changed"
    assert modes == (False, True), "encoder in eval mode, decoder in train mode while training"
    enc_ids = {id(p) for p in encoder_parameters(frozen.network)[0]}
    assert not enc_ids & {id(p) for grp in frozen.optimizer.param_groups for p in grp["params"]}
    dec = {k: v for k, v in frozen.network.state_dict().items() if k.startswith("decoder.stages")}
    assert any(not torch.equal(v, exported[k]) for k, v in dec.items()), "decoder did not train"

    free = encoder_state(_train_tiny(tmp_path, freeze=False, weights=weights)[0].network)
    assert not all(torch.equal(free[k], exported[k]) for k in enc_keys if "running" in k)
    assert not all(torch.equal(free[k], exported[k]) for k in enc_keys if k.endswith("weight"))


def _record(method, mode, n, seed, dice, nsd, hd):
    arm = Arm(method, "spark", n, str(n), seed, mode)
    return {"method": method, "base": "spark", "n_train": n, "n_label": str(n), "seed": seed, "mode": mode,
            "id": arm.id, "mean_dice": dice, "dice": {"liver": dice, "aorta": dice}, "mean_nsd": nsd,
            "nsd": {"liver": nsd, "aorta": nsd}, "mean_hd95": hd, "hd95": {"liver": hd, "aorta": hd},
            "nsd_tolerance_mm": {"liver": 2.0, "aorta": 2.0}}


def test_report_frozen_and_finetune_tables_with_half_widths(tmp_path):
    """Synthetic records: each mode gets its own section of Dice / NSD / HD95 tables, the Δ rows give the paired
    difference with its scipy t-interval half-width, results.json and both plots are written; an arm scored before
    NSD/HD95 existed (Dice only) still reports."""
    from scipy import stats

    from ssl3d.evaluation.report import write_reports

    spark = {0: 0.80, 1: 0.75, 2: 0.85}
    scratch = {0: 0.60, 1: 0.50, 2: 0.70}  # differences 0.2, 0.25, 0.15
    results = []
    for mode, shift in (("finetune", 0.0), ("frozen", -0.3)):
        for s in range(3):
            results.append(_record("spark", mode, 2, s, spark[s] + shift, 0.9 + shift, 5.0 - s))
            results.append(_record("scratch", mode, 2, s, scratch[s] + shift, 0.7 + shift, 9.0))
    old = {k: v for k, v in _record("spark", "finetune", 1, 0, 0.4, 0, 0).items()
           if not k.startswith(("mean_nsd", "nsd", "mean_hd95", "hd95"))}
    summary = write_reports(tmp_path, results + [old], [], {}, ["spark"], 8, 12, {"ft_epochs": 3, "ft_iters": 2,
                                                                                 "ft_batch": 2})
    md = (tmp_path / "results.md").read_text(encoding="utf-8")
    fine, frozen = md.split("### Frozen encoder")
    assert "### Fine-tuned encoder" in fine and "12 held-out test case(s)" in fine
    half = float(stats.t.interval(0.95, 2, scale=stats.sem([0.2, 0.25, 0.15]))[1])
    assert math.isclose(half, 0.1242, abs_tol=1e-4)
    assert "| spark | 0.400 | 0.800 ± 0.050 |" in fine
    assert f"| Δ spark − scratch | +0.400 | +0.200 (±{half:.3f}) |" not in fine  # scratch has no 1-case arm
    assert f"| Δ spark − scratch | – | +0.200 (±{half:.3f}) |" in fine
    assert f"| Δ spark (frozen) − scratch (frozen) | +0.200 (±{half:.3f}) |" in frozen
    assert "| scratch (frozen) | 0.300 ± 0.100 |" in frozen and "| spark |" not in frozen
    assert "| Δ spark (frozen) − scratch (frozen) | +0.200 (±0.000) |" in frozen, "identical NSD gaps: zero width"
    assert "| spark (frozen) | 4.000 ± 1.000 |" in frozen and "HD95 (mm)" in frozen
    assert "Per-class NSD" in frozen and "| spark (frozen) | 2 | 0.600 ± 0.000 | 0.600 ± 0.000 |" in frozen
    assert "liver 2, aorta 2" in md
    d = summary["difference_to_scratch"]["mean_dice"]["spark (frozen)"]["2"]
    assert math.isclose(d["half_width"], half, rel_tol=1e-9) and d["n"] == 3
    assert json.loads((tmp_path / "results.json").read_text())["surface_summary"]["mean_hd95"]["scratch"]["2"][
        "mean"] == 9.0
    for png in ("label_efficiency.png", "label_efficiency_per_class.png"):
        assert (tmp_path / png).stat().st_size > 10_000


def test_segmentation_scores_match_monai_with_anisotropic_spacing_and_empty_masks(tmp_path):
    """score_folder on NIfTI files with 0.8 × 0.8 × 4 mm voxels: NSD and HD95 equal MONAI's on the arrays with
    the spacing in array (z, y, x) order (and differ with it reversed), nnU-Net's Dice equals MONAI's where the
    reference has the class, and the empty cases get the documented values."""
    import numpy as np
    import torch
    from conftest import write_image
    from monai.metrics import compute_dice, compute_hausdorff_distance, compute_surface_dice

    from ssl3d.evaluation.seg_metrics import nsd_tolerances, score_folder

    ref = np.zeros((10, 24, 28), np.uint8)
    ref[2:7, 4:18, 5:20] = 1
    ref[3:6, 19:23, 22:26] = 2  # missed by the prediction
    pred = np.zeros_like(ref)
    pred[4:9, 5:18, 5:21] = 1  # two slices (8 mm) up, one voxel off in-plane
    pred[8, 1:3, 1:3] = 3  # not in the reference
    for folder, arr in (("ref", ref), ("pred", pred)):
        write_image(tmp_path / folder / "c0.nii.gz", arr, spacing=(0.8, 0.8, 4.0))
    labels = {1: "liver", 2: "kidney", 3: "aorta", 4: "ivc"}
    with pytest.raises(BadInputError):
        nsd_tolerances({"ssl3d_nsd_tolerance_mm": {"lung": 1}}, labels)
    with pytest.raises(BadInputError):
        nsd_tolerances({"ssl3d_nsd_tolerance_mm": -1}, labels)
    tol = nsd_tolerances({"ssl3d_nsd_tolerance_mm": {"liver": 3.0}}, labels)
    assert tol == {1: 3.0, 2: 2.0, 3: 2.0, 4: 2.0}
    res = score_folder(tmp_path / "ref", tmp_path / "pred", labels, tol)
    case = res["cases"][0]
    assert case["case"] == "c0"

    def onehot(a, v):
        return torch.from_numpy(a == v)[None, None].float()

    spacing = (4.0, 0.8, 0.8)
    nsd = float(compute_surface_dice(onehot(pred, 1), onehot(ref, 1), [3.0], include_background=True,
                                     spacing=spacing, use_subvoxels=True))
    hd = float(compute_hausdorff_distance(onehot(pred, 1), onehot(ref, 1), include_background=True, percentile=95,
                                          spacing=spacing))
    hd_reversed = float(compute_hausdorff_distance(onehot(pred, 1), onehot(ref, 1), include_background=True,
                                                   percentile=95, spacing=spacing[::-1]))
    assert 0 < nsd < 1 and math.isclose(case["nsd"]["liver"], nsd, rel_tol=1e-6)
    assert math.isclose(case["hd95"]["liver"], hd, rel_tol=1e-6) and not math.isclose(hd, hd_reversed)
    for v, name in ((1, "liver"), (2, "kidney")):
        monai_dice = float(compute_dice(onehot(pred, v), onehot(ref, v), include_background=True, ignore_empty=False))
        assert math.isclose(case["dice"][name], monai_dice, rel_tol=1e-6)
    diagonal = math.sqrt((10 * 4.0) ** 2 + (24 * 0.8) ** 2 + (28 * 0.8) ** 2)
    for name in ("kidney", "aorta"):  # in only one of reference and prediction
        assert case["dice"][name] == 0 and case["nsd"][name] == 0
        assert math.isclose(case["hd95"][name], diagonal, rel_tol=1e-6)
    assert case["dice"]["ivc"] is None and case["nsd"]["ivc"] is None and case["hd95"]["ivc"] is None
    assert res["nsd"]["ivc"] is None, "a class absent from both is left out, not scored"
    assert math.isclose(res["mean_nsd"], nsd / 3, rel_tol=1e-6)
    assert math.isclose(res["mean_hd95"], (hd + 2 * diagonal) / 3, rel_tol=1e-6)
    assert res["nsd_tolerance_mm"]["liver"] == 3.0


def test_rerun_with_another_setting_or_test_set_is_refused(tmp_path):
    """A rerun resumes finished arms, so a changed preset/override or test set would mix two experiments."""
    from ssl3d.evaluation.runner import refuse_mixed_rerun
    from ssl3d.utils import BadInputError, write_json

    setting, split = {"ft_epochs": 100, "patch_size": None}, {"trainable": ["a", "b"], "test": ["c"]}
    write_json(tmp_path / "protocol.json", {"setting": setting, "split": {**split, "test_images": {"c": ["/x"]}}})
    refuse_mixed_rerun(tmp_path, setting={"ft_epochs": 50}, split=split)  # no finished arm yet: nothing to mix
    write_json(tmp_path / "arms" / "scratch__n1__s0" / "result.json", {"mean_dice": 0.5})
    refuse_mixed_rerun(tmp_path, setting={**setting, "arms": ["frozen"]}, split=split)  # more arms are fine
    with pytest.raises(BadInputError, match=r"ft_epochs 100 -> 50"):
        refuse_mixed_rerun(tmp_path, setting={**setting, "ft_epochs": 50}, split=split)
    with pytest.raises(BadInputError, match="the split cases"):
        refuse_mixed_rerun(tmp_path, setting=setting, split={**split, "test": ["b"]})


def test_reports_are_utf8_under_an_ascii_locale(tmp_path):
    """results.md holds ± and Δ: written as UTF-8 even where the locale's encoding is ASCII (LC_ALL=C, no
    coercion)."""
    import os
    import sys

    code = ("import sys; from ssl3d.utils import atomic_write, write_json; "
            "atomic_write(sys.argv[1], lambda f: f.write('0.2 \\u00b1 0.1, \\u0394'), mode='w'); "
            "write_json(sys.argv[2], {'\\u0394': '\\u00b1'})")  # escapes: an ASCII locale's argv is ASCII
    env = dict(os.environ, LC_ALL="C", LANG="C", PYTHONCOERCECLOCALE="0", PYTHONUTF8="0")
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "r.md"), str(tmp_path / "r.json")], env=env,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-1500:]
    assert (tmp_path / "r.md").read_bytes().decode("utf-8") == "0.2 ± 0.1, Δ"
    assert json.loads((tmp_path / "r.json").read_bytes().decode("utf-8")) == {"Δ": "±"}


def test_merging_runs_reports_their_union_and_refuses_mismatched_runs(tmp_path, capsys, monkeypatch):
    """benchmarks/merge_benchmark_runs.py: scratch from one run, spark from another gives ssl_benchmark's paired
    difference; runs on other test cases, of another setting, or with one arm scored twice differently are refused."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from merge_benchmark_runs import main

    cases = [{"case": f"organs_{i:04d}", "dice": {}, "nsd": {}, "hd95": {}} for i in range(3)]

    def run(name, records, setting, test=cases, val_loss=0.3):
        p = tmp_path / name / "results.json"
        p.parent.mkdir()
        p.write_text(json.dumps({"arms": [{**r, "cases": test} for r in records], "setting": setting,
                                 "n_trainable": 8, "n_test": 3,
                                 "pretraining": {"spark": {"wall_s": 1.0, "final_val_loss": val_loss}}}))
        return str(p)

    base = {"ft_epochs": 3, "ft_iters": 2, "ft_batch": 2}
    old, new = {**base, "pretrain_lr": None}, {**base, "pretrain_lr": 1e-3}
    a = run("a", [_record("scratch", "finetune", 1, s, d, 0.5, 9.0) for s, d in enumerate((0.6, 0.5, 0.7))], old)
    b = run("b", [_record("spark", "finetune", 1, s, d, 0.5, 9.0) for s, d in enumerate((0.8, 0.75, 0.85))], new)
    assert main([a + "::scratch*,x*", b, "-o", str(tmp_path / "m"), "--allow-setting", "pretrain_lr"]) == 0
    md = (tmp_path / "m" / "results.md").read_text(encoding="utf-8")
    assert "| Δ spark − scratch | +0.200 (±0.124) |" in md
    assert json.loads((tmp_path / "m" / "results.json").read_text())["setting"]["pretrain_lr"] == 1e-3
    assert main([a, b, "-o", str(tmp_path / "m2")]) == 2 and "pretrain_lr" in capsys.readouterr().err
    assert main([a + "::spark*", b, "-o", str(tmp_path / "m1"), "--allow-setting", "pretrain_lr"]) == 0
    assert "| scratch |" not in (tmp_path / "m1" / "results.md").read_text(encoding="utf-8"), "filtered out"
    other = run("c", [_record("spark", "finetune", 1, 0, 0.8, 0.5, 9.0)], new, test=cases[:2])
    assert main([a, other, "-o", str(tmp_path / "m3"), "--allow-setting", "pretrain_lr"]) == 2
    assert "different test cases" in capsys.readouterr().err
    twice = run("d", [_record("spark", "finetune", 1, 0, 0.1, 0.5, 9.0)], new)
    assert main([b, twice, "-o", str(tmp_path / "m4")]) == 2 and "two runs" in capsys.readouterr().err
    assert not (tmp_path / "m3").exists() and not (tmp_path / "m4").exists()
    # an output folder whose run has not written results.json yet: its finished arms and protocol.json
    folder = tmp_path / "running"
    for r in json.loads(Path(b).read_text())["arms"]:
        (folder / "arms" / r["id"]).mkdir(parents=True)
        (folder / "arms" / r["id"] / "result.json").write_text(json.dumps(r))
    (folder / "protocol.json").write_text(json.dumps({"setting": new, "split": {"trainable": [f"t{i}" for i in range(8)],
                                                                    "test": [c["case"] for c in cases]}}))
    assert main([a, str(folder), "-o", str(tmp_path / "m5"), "--allow-setting", "pretrain_lr"]) == 0
    merged = (tmp_path / "m5" / "results.md").read_text(encoding="utf-8")
    assert "| Δ spark − scratch | +0.200 (±0.124) |" in merged and "Scores on 3 held-out test case(s)" in merged
    # spark arms of two different pretrainings are merged, and the user is told which pretraining the report shows
    capsys.readouterr()
    n2 = run("e", [_record("spark", "finetune", 2, 0, 0.8, 0.5, 9.0)], new, val_loss=0.4)
    assert main([b, n2, "-o", str(tmp_path / "m6")]) == 0
    err = capsys.readouterr().err
    assert "spark arms come from 2 pretrainings" in err and "val loss 0.3" in err and "val loss 0.4" in err
    assert main([b, b, "-o", str(tmp_path / "m7")]) == 0 and "pretrainings" not in capsys.readouterr().err
