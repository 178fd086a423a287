"""ssl_benchmark --task cls: classification arms (method/mode | scratch × label fraction × seed), the report on
fabricated results (cells, paired difference, plot), and a tiny end-to-end run with resume."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import subprocess_env

from ssl3d.evaluation.protocol import PRESETS, PRETRAIN_KEYS, ClsArm, plan_cls_arms
from ssl3d.evaluation.report import write_cls_reports
from ssl3d.evaluation.runner import BenchmarkConfig
from ssl3d.utils import BadInputError

BIN = Path(sys.executable).parent


def test_cls_arms_fractions_seeds_modes_and_scratch():
    fractions = [1, 0.5, 0.25, 0.1, 0.05]
    arms = plan_cls_arms(["spark", "hyspark"], True, True, fractions, range(5))
    # seeds × fractions × (one scratch per downstream network + 2 methods × {finetune, linear})
    assert len(arms) == 5 * 5 * (2 + 2 * 2) and len({a.id for a in arms}) == len(arms)
    assert {(a.base, a.mode) for a in arms if a.scratch} == {("spark", "scratch"), ("hyspark", "scratch")}
    assert {a.mode for a in arms if not a.scratch} == {"finetune", "linear"}
    assert [a.seed for a in arms] == sorted(a.seed for a in arms), "seed-major: a partial run is complete per seed"
    assert [a.fraction for a in arms[:6]] == [1.0] * 6 and arms[-1].fraction == 0.05
    assert ClsArm("spark", "spark", "linear", 0.25, 3).id == "spark-linear__f0.25__s3"
    assert ClsArm("scratch", "spark", "scratch", 1.0, 0).id == "scratch-spark__f1__s0"
    no_linear = plan_cls_arms(["spark"], False, False, [1, 0.5], [0, 1])
    assert [a.id for a in no_linear] == ["spark__f1__s0", "spark__f0.5__s0", "spark__f1__s1", "spark__f0.5__s1"]
    for bad in ([0.0], [1.5], [0.5, 0.5]):
        with pytest.raises(BadInputError):
            plan_cls_arms(["spark"], True, False, bad, [0])
    s = BenchmarkConfig("801", "803", ["spark"], Path("o"), task="cls", overrides={"ft_iters": 3}).setting()
    assert {k: s[k] for k in PRETRAIN_KEYS} == {k: PRESETS["small"][k] for k in PRETRAIN_KEYS}
    assert s["ft_iters"] == 3 and "l2" in s and "tta" not in s, "seg-only keys stay out of the cls setting"


def _arm(method, mode, fraction, seed, auc, bacc):
    base = "spark"
    rec = ClsArm(method, base, mode, fraction, seed)
    return {"method": method, "base": base, "mode": mode, "fraction": fraction, "seed": seed, "id": rec.id,
            "auc": auc, "balanced_accuracy": bacc}


def test_cls_report_cells_differences_and_plot(tmp_path):
    results = []
    for seed, (sc, sp, lin) in enumerate([(0.6, 0.8, 0.5), (0.5, 0.75, 0.4), (0.7, 0.85, 0.6)]):
        results += [_arm("scratch", "scratch", 1.0, seed, sc, 0.5), _arm("spark", "finetune", 1.0, seed, sp, 0.75),
                    _arm("spark", "linear", 1.0, seed, lin, 0.5)]
        results += [_arm("scratch", "scratch", 0.1, seed, 0.5, 0.5), _arm("spark", "finetune", 0.1, seed, 0.6, 0.5)]
    setting = {"ft_epochs": 2, "ft_iters": 3, "ft_batch": 2}
    summary = write_cls_reports(tmp_path, results, [], {}, ["spark"], 20, 5, setting)
    md = (tmp_path / "results.md").read_text(encoding="utf-8")
    assert "| method | 100 % (20 cases) | 10 % (2 cases) |" in md
    # spark AUC at 100 %: 0.8, 0.75, 0.85 -> 0.800 ± 0.050 over 3 seeds; at 10 %: 0.6 constant
    assert "| spark | 0.800 ± 0.050 (3) | 0.600 ± 0.000 (3) |" in md
    assert "| scratch | 0.600 ± 0.100 (3) | 0.500 ± 0.000 (3) |" in md
    # paired differences: spark − scratch = 0.2, 0.25, 0.15: mean 0.2, sd 0.05, t(0.975, 2) = 4.3027 -> ± 0.124;
    # linear − scratch = −0.1 each
    assert "| Δ spark − scratch | +0.200 [+0.076, +0.324] | +0.100 [+0.100, +0.100] |" in md
    assert "| Δ spark (linear) − scratch | -0.100 [-0.100, -0.100] | – |" in md
    assert "balanced accuracy:" in md and "| spark | 0.750 ± 0.000 (3) |" in md
    d = summary["difference_to_scratch"]["auc"]
    assert math.isclose(d["spark"]["1"]["mean"], 0.2) and d["spark"]["1"]["low"] > 0, "CI excludes 0"
    assert d["spark (linear)"]["1"]["mean"] < 0 and "0.1" not in d["spark (linear)"]
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk["summary"]["auc"]["spark"]["1"]["seeds"] == 3 and len(on_disk["arms"]) == len(results)
    assert (tmp_path / "label_efficiency.png").stat().st_size > 10_000


@pytest.fixture(scope="module")
def cls_data(tmp_path_factory):
    """Tiny pool (3 cases) + fatty-liver set (8 cases: 4 folds of 2, 6 training cases per fold)."""
    root = tmp_path_factory.mktemp("bench_cls")
    env = subprocess_env(root / "raw", root / "pre", root / "res")
    for cmd in (["ssl_make_demo_data", "-o", str(root / "raw"), "--size", "tiny", "-nu", "3", "-nl", "0",
                 "--classification", "fatty-liver", "-nc", "8", "--no-progress"],
                ["ssl_plan_and_preprocess", "-d", "801", "-np", "1", "--no-progress", "--patch-size", "16", "32", "32"]):
        r = subprocess.run([str(BIN / cmd[0]), *cmd[1:]], env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-2000:]
    return root, env


def _bench(env, out, *extra):
    cmd = [str(BIN / "ssl_benchmark"), "--task", "cls", "-u", "801", "-l", "803", "-m", "spark", "--seeds", "2",
           "--pretrain-epochs", "1", "--pretrain-iters", "2", "--ft-epochs", "1", "--ft-iters", "2", "--size", "tiny",
           "-device", "cpu", "-np", "1", "--no-progress", "-o", str(out), *extra]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_tiny_cls_benchmark_end_to_end_and_resume(cls_data):
    root, env = cls_data
    out = root / "out"
    r = _bench(env, out, "--scratch", "--fractions", "0.5")
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert not res["failures"] and sorted(a["id"] for a in res["arms"]) == [
        "scratch-spark__f0.5__s0", "scratch-spark__f0.5__s1", "spark__f0.5__s0", "spark__f0.5__s1"]
    protocol = json.loads((out / "protocol.json").read_text())
    test = sorted(protocol["test"])
    budget = {a["id"]: a["budget_cases"] for a in protocol["arms"]}
    for arm in res["arms"]:  # every arm, whatever its seed, scores the fold's held-out cases and trains on its budget
        assert sorted(arm["test_cases"]) == test and arm["n_budget"] == 3
        assert sorted(arm["train_cases"] + arm["val_cases"]) == sorted(budget[arm["id"]])
        assert not set(test) & set(budget[arm["id"]])
        assert 0 <= arm["auc"] <= 1 and sum(map(sum, arm["confusion_matrix"])) == len(test)
    by = {(a["method"], a["seed"]): a["auc"] for a in res["arms"]}
    md = (out / "results.md").read_text(encoding="utf-8")
    assert "| method | 50 % (3 cases) |" in md and "| Δ spark − scratch |" in md
    diff = (by["spark", 0] - by["scratch", 0] + by["spark", 1] - by["scratch", 1]) / 2
    assert f"{diff:+.3f}" in md
    assert res["pretraining"]["spark"]["reconstruction"]["psnr"] > 0
    assert (out / "label_efficiency.png").stat().st_size > 10_000

    # simulated kill after an arm finished but before the benchmark noted it; the rerun adds linear probes:
    # only the new arms run, the finished ones (and pretraining) are not redone
    logs = {p: p.stat().st_size for p in (out / "arms").glob("*/run.log")}
    pre_mtime = (out / "pretraining" / "spark.json").stat().st_mtime
    (out / "arms" / "spark__f0.5__s1" / "result.json").unlink()
    r = _bench(env, out, "--scratch", "--fractions", "0.5", "--linear")
    assert r.returncode == 0, r.stderr[-3000:]
    assert all(p.stat().st_size == size for p, size in logs.items()), "a finished arm was rerun"
    assert (out / "pretraining" / "spark.json").stat().st_mtime == pre_mtime
    again = json.loads((out / "results.json").read_text())
    assert len(again["arms"]) == 6 and not again["failures"]
    assert {a["mode"] for a in again["arms"]} == {"scratch", "finetune", "linear"}
    assert all(sorted(a["test_cases"]) == test for a in again["arms"])
    assert "| spark (linear) |" in (out / "results.md").read_text(encoding="utf-8")


def test_cls_benchmark_bad_input_is_one_line(cls_data, tmp_path, monkeypatch, capsys):
    from ssl3d.cli.benchmark import main

    _, env = cls_data
    for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.setenv(k, env[k])
    args = ["--task", "cls", "-u", "801", "-l", "803", "-m", "spark", "-device", "cpu", "-o", str(tmp_path / "o")]
    # a budget below one case per class (0.1 × 6 training cases); an option of the seg task
    for extra, expected in ((["--fractions", "0.1"], "--fractions 0.1"), (["--n-train", "1"], "--n-train")):
        assert main(args + extra) == 2
        lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
        assert len(lines) == 1 and expected in lines[0], lines
    assert not (tmp_path / "o").exists(), "bad input stops before anything is written"
