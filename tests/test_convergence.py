"""Convergence curves: the intermediate-checkpoint schedule, the curve of an arm, iterations to 90 % of scratch."""
import math

import pytest

from ssl3d.evaluation.convergence import (convergence_markdown, convergence_rows, convergence_section,
                                          intermediate_checkpoints, iterations_to_reach, score_curve)
from ssl3d.training.finetune_schedule import checkpoint_epochs, free_cores_for_torch, intermediate_checkpoint_name


def test_checkpoint_schedule():
    assert checkpoint_epochs(100, [0.25, 0.5]) == [25, 50]
    assert checkpoint_epochs(35, [0.25, 0.5, 1.0]) == [9, 18]  # rounded; 100 % is checkpoint_final
    assert checkpoint_epochs(2, [0.1, 0.25, 0.5]) == [1]  # at least one epoch, each once, never the last
    assert checkpoint_epochs(10, []) == []
    for bad in (0, -0.5, 1.5):
        with pytest.raises(ValueError, match="must be in"):
            checkpoint_epochs(10, [bad])
    assert intermediate_checkpoint_name(25) == "checkpoint_ep25.pth"


def test_torch_threads_leave_one_core_per_worker():
    assert free_cores_for_torch(1, cores=2) == 1
    assert free_cores_for_torch(0, cores=2) == 2
    assert free_cores_for_torch(4, cores=2) == 1
    assert free_cores_for_torch(3, cores=16) == 13


def _curve(dices, iters=(250, 500, 1000)):
    return [{"iterations": i, "fraction": i / iters[-1], "mean_dice": d} for i, d in zip(iters, dices)]


def test_iterations_to_reach_synthetic_curves():
    assert iterations_to_reach(_curve([0.2, 0.5, 0.6]), 0.54) == 1000
    assert iterations_to_reach(_curve([0.6, 0.5, 0.7]), 0.54) == 250  # first point at or above, not the last
    assert iterations_to_reach(_curve([0.1, 0.2, 0.3]), 0.54) is None
    assert iterations_to_reach(list(reversed(_curve([0.2, 0.55, 0.6]))), 0.54) == 500  # training order, not list order
    assert iterations_to_reach(_curve([0.2, 0.54, 0.6]), 0.54) == 500  # "at least" the target


def _arm(method, seed, dices, mode="finetune", n=7):
    return {"id": f"{method}-{mode}-{seed}", "method": method, "base": "spark", "n_train": n, "n_label": "all",
            "seed": seed, "mode": mode, "mean_dice": dices[-1], "curve": _curve(dices)}


def test_rows_pair_each_arm_with_its_own_scratch_and_report():
    results = [_arm("scratch", 0, [0.3, 0.5, 0.6]), _arm("scratch", 1, [0.3, 0.4, 0.8]),
               _arm("spark", 0, [0.55, 0.6, 0.62]), _arm("spark", 1, [0.5, 0.6, 0.7]),
               _arm("scratch", 0, [0.1, 0.2, 0.4], mode="frozen"), _arm("spark", 0, [0.3, 0.35, 0.37], mode="frozen"),
               {"id": "old", "method": "spark", "base": "spark", "n_train": 7, "n_label": "all", "seed": 2,
                "mean_dice": 0.5}]  # an arm without a curve (e.g. run before checkpoints existed) has no row
    rows = {r["id"]: r for r in convergence_rows(results, lambda r: r["method"] + ("" if r["mode"] == "finetune"
                                                                                   else " (frozen)"))}
    assert "old" not in rows and len(rows) == 6
    assert math.isclose(rows["spark-finetune-0"]["target"], 0.54)  # 90 % of scratch seed 0's final 0.6
    assert rows["spark-finetune-0"]["iterations_to_target"] == 250
    assert rows["spark-finetune-1"]["iterations_to_target"] is None  # 90 % of 0.8 = 0.72 never reached
    assert rows["scratch-finetune-1"]["iterations_to_target"] == 1000
    assert math.isclose(rows["spark-frozen-0"]["target"], 0.36)  # frozen arms against frozen scratch
    assert rows["spark-frozen-0"]["iterations_to_target"] == 1000
    md = convergence_markdown(list(rows.values()))
    assert "| spark | 7 | 0.525 ± 0.035 | 0.600 ± 0.000 | 0.660 ± 0.057 | 250, >1000 |" in md, md
    assert md.index("| scratch |") < md.index("| spark |")
    assert convergence_markdown([]) == ""


def test_section_writes_the_plot_only_with_curves(tmp_path):
    assert convergence_section(tmp_path, [{"id": "a", "method": "spark", "mean_dice": 0.5}], str) == ("", [])
    assert not (tmp_path / "convergence.png").exists()
    md, rows = convergence_section(tmp_path, [_arm("scratch", 0, [0.3, 0.5, 0.6])], lambda r: r["method"])
    assert rows and "Convergence" in md
    assert (tmp_path / "convergence.png").stat().st_size > 1000
    assert not list(tmp_path.glob(".tmp_*"))


def test_score_curve_scores_each_intermediate_checkpoint_in_order(tmp_path):
    for e in (50, 25, 100):  # 100 = the last epoch: never an intermediate one, checkpoint_final is scored instead
        (tmp_path / intermediate_checkpoint_name(e)).write_bytes(b"x")
    (tmp_path / "checkpoint_ep25.pth.partial").write_bytes(b"")  # a write that was killed is not a checkpoint
    (tmp_path / "checkpoint_best.pth").write_bytes(b"x")
    assert [e for e, _ in intermediate_checkpoints(tmp_path)] == [25, 50, 100]
    seen = []

    def score(path):
        seen.append(path.name)
        return {"mean_dice": {"checkpoint_ep25.pth": 0.2, "checkpoint_ep50.pth": 0.4}[path.name]}

    curve = score_curve(tmp_path, 100, 10, {"mean_dice": 0.5}, score)
    assert seen == ["checkpoint_ep25.pth", "checkpoint_ep50.pth"]
    assert [(p["iterations"], p["fraction"], p["mean_dice"]) for p in curve] == [(250, 0.25, 0.2), (500, 0.5, 0.4),
                                                                                 (1000, 1.0, 0.5)]


def test_benchmark_scores_each_intermediate_checkpoint_of_an_arm(tmp_path):
    """The runner's glue: the arm's fold folder, one prediction folder per checkpoint, the final scores last."""
    from ssl3d.evaluation.protocol import Arm
    from ssl3d.evaluation.runner import Benchmark

    bench = Benchmark.__new__(Benchmark)
    bench.s, bench.labeled = {"ft_epochs": 8, "ft_iters": 5}, "Dataset802_X"
    fold = tmp_path / "nnUNet_results" / "Dataset802_X" / "SSLFinetuneTrainer__ssl3d_sparkPlans__3d_fullres" / "fold_0"
    fold.mkdir(parents=True)
    for e in (2, 4):
        (fold / intermediate_checkpoint_name(e)).write_bytes(b"x")
    calls = []
    bench.predict = lambda arm, plans, chk, pred, env, log: calls.append((plans, chk, pred.name))
    bench.evaluate = lambda pred: {"mean_dice": {"predictions_ep2": 0.1, "predictions_ep4": 0.3}[pred.name]}
    curve = bench.convergence_curve(Arm("spark", "spark", 1, "1", 0), "ssl3d_sparkPlans", tmp_path, {}, tmp_path / "l",
                                    {"mean_dice": 0.4})
    assert calls == [("ssl3d_sparkPlans", "checkpoint_ep2.pth", "predictions_ep2"),
                     ("ssl3d_sparkPlans", "checkpoint_ep4.pth", "predictions_ep4")]
    assert [(p["iterations"], p["mean_dice"]) for p in curve] == [(10, 0.1), (20, 0.3), (40, 0.4)]
