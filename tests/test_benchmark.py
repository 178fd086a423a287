"""ssl_benchmark: statistics against a hand-computed example, arms and nested seed-matched subsets, a held-out
test set no arm trains on, and a tiny end-to-end run with its three outputs and resume."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import subprocess_env

from ssl3d.evaluation.protocol import Arm, HeldOutSplit, plan_arms, split_test, training_cases
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
           "--size", "tiny", "-device", "cpu", "-np", "1", "--no-progress", "-o", str(out), *extra]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)


def test_tiny_benchmark_end_to_end_and_resume(bench_data):
    root, env = bench_data
    out = root / "out"
    r = _bench(env, out, "--cka")
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert not res["failures"] and len(res["arms"]) == 2
    assert (out / "label_efficiency.png").stat().st_size > 10_000
    protocol = json.loads((out / "protocol.json").read_text())
    test_cases = set(protocol["split"]["test"])
    assert test_cases and all(not test_cases & set(a["train_cases"]) for a in res["arms"])
    for arm in res["arms"]:  # consistent numbers: mean Dice = mean over classes, table shows it
        assert len(arm["train_cases"]) == 1
        assert math.isclose(arm["mean_dice"], sum(arm["dice"].values()) / len(arm["dice"]), abs_tol=1e-9)
        # nnU-Net never saw a test case: its split lists training candidates only
        split = json.loads((out / "nnUNet_preprocessed" / "Dataset802_SynthCTOrgans" / "splits_final.json")
                           .read_text())
        assert not test_cases & set(split[0]["train"])
    md = (out / "results.md").read_text()
    by = {a["method"]: a["mean_dice"] for a in res["arms"]}
    assert f"| spark | {by['spark']:.3f} |" in md and f"| scratch | {by['scratch']:.3f} |" in md
    assert f"{by['spark'] - by['scratch']:+.3f}" in md
    pre = res["pretraining"]["spark"]
    assert pre["reconstruction"]["psnr"] > 0 and "masked PSNR" in md
    cka = json.loads((out / "cka.json").read_text())
    assert len(cka) == 2 and all(0 <= v <= 1.000001 for row in cka for v in row["cka"])
    assert (out / "cka.png").stat().st_size > 5_000

    # simulated kill: one arm's result and the reports are gone; the rerun redoes that arm only
    spark_log = out / "arms" / "spark__n1__s0" / "run.log"
    size, pre_mtime = spark_log.stat().st_size, (out / "pretraining" / "spark.json").stat().st_mtime
    (out / "arms" / "scratch-spark__n1__s0" / "result.json").unlink()
    for f in ("results.json", "results.md", "label_efficiency.png"):
        (out / f).unlink()
    r = _bench(env, out)
    assert r.returncode == 0, r.stderr[-3000:]
    assert spark_log.stat().st_size == size, "finished arm was rerun"
    assert (out / "pretraining" / "spark.json").stat().st_mtime == pre_mtime
    assert (out / "arms" / "scratch-spark__n1__s0" / "result.json").is_file()
    again = json.loads((out / "results.json").read_text())
    assert len(again["arms"]) == 2


def test_benchmark_bad_input_is_one_line(bench_data, tmp_path):
    root, env = bench_data
    r = _bench(env, tmp_path / "o", "--test", str(tmp_path / "nope"))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert len([l for l in r.stderr.splitlines() if l.strip()]) == 1, r.stderr
