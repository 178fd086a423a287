"""Convergence speed: held-out Dice of each arm's intermediate fine-tuning checkpoints (``checkpoint_ep<E>.pth``,
written at fractions of the budget by ``SSLFinetuneTrainer``'s ``checkpoints_at``) and of its final one, and the
iterations an arm needs to reach 90 % of its scratch baseline's final Dice (the convergence-speed benefit the SMIT
benchmark reports). Resolution: only the checkpoints exist, so "iterations to 90 %" is the first checkpoint at or
above the target (an upper bound), or "not reached" within the budget."""
from __future__ import annotations

import math
import re
from collections import defaultdict
from pathlib import Path
from typing import Callable

from ssl3d.evaluation.protocol import SCRATCH
from ssl3d.evaluation.stats import summarize
from ssl3d.utils import save_figure

TARGET_FRACTION = 0.9  # of the scratch baseline's final Dice
_CKPT = re.compile(r"checkpoint_ep(\d+)\.pth$")
# what must match between an arm and its scratch baseline (besides method = scratch); absent keys match absent keys
_PAIR_KEYS = ("base", "n_label", "seed", "mode")


def intermediate_checkpoints(fold_dir: Path) -> list[tuple[int, Path]]:
    """``(epochs done, path)`` of the ``checkpoint_ep<E>.pth`` files in a fold folder, by epoch."""
    found = [(int(m.group(1)), p) for p in Path(fold_dir).glob("checkpoint_ep*.pth") if (m := _CKPT.search(p.name))]
    return sorted(found)


def score_curve(fold_dir: Path, num_epochs: int, iters_per_epoch: int, final: dict,
                score_checkpoint: Callable[[Path], dict]) -> list[dict]:
    """The arm's curve: each intermediate checkpoint scored with ``score_checkpoint(path) -> {"mean_dice": ...}``
    (prediction of the held-out test set), then the final checkpoint's scores ``final``."""
    points = [{"epochs": e, "iterations": e * iters_per_epoch, "fraction": e / num_epochs,
               "mean_dice": float(score_checkpoint(p)["mean_dice"])}
              for e, p in intermediate_checkpoints(fold_dir) if e < num_epochs]
    return points + [{"epochs": num_epochs, "iterations": num_epochs * iters_per_epoch, "fraction": 1.0,
                      "mean_dice": float(final["mean_dice"])}]


def iterations_to_reach(curve: list[dict], target: float) -> int | None:
    """Iterations of the first point (in training order) whose Dice is at least ``target``; None if none is."""
    for p in sorted(curve, key=lambda p: p["iterations"]):
        if p["mean_dice"] >= target:
            return int(p["iterations"])
    return None


def _baseline(arm: dict, results: list[dict]) -> dict | None:
    for r in results:
        if r["method"] == SCRATCH and all(r.get(k) == arm.get(k) for k in _PAIR_KEYS):
            return r
    return None


def convergence_rows(results: list[dict], label: Callable[[dict], str]) -> list[dict]:
    """Per arm with a curve: its label, the target (90 % of its paired scratch arm's final Dice: same base, label
    count, seed and mode) and the iterations it needed (None: not reached; no target without a scratch arm)."""
    rows = []
    for r in results:
        if not r.get("curve"):
            continue
        base = _baseline(r, results)
        target = TARGET_FRACTION * float(base["mean_dice"]) if base is not None else None
        rows.append({"id": r["id"], "label": label(r), "n_train": int(r["n_train"]), "seed": int(r["seed"]),
                     "curve": r["curve"], "target": target,
                     "iterations_to_target": None if target is None else iterations_to_reach(r["curve"], target),
                     "budget": max(p["iterations"] for p in r["curve"])})
    return rows


def _grouped(rows: list[dict]) -> dict:
    out: dict = defaultdict(list)
    for r in rows:
        out[(r["label"], r["n_train"])].append(r)
    return out


def convergence_markdown(rows: list[dict]) -> str:
    """Held-out Dice at each checkpoint (mean ± sd over seeds) and the iterations to 90 % of scratch's final Dice
    (per seed, in seed order; '>N' = not reached within the budget of N iterations)."""
    if not rows:
        return ""
    fracs = sorted({p["fraction"] for r in rows for p in r["curve"]})
    at = ", ".join(f"{100 * f:g} %" for f in fracs)
    lines = [f"Convergence: mean foreground Dice on the held-out test cases at {at} of the fine-tuning budget "
             f"(mean ± sd over seeds), and the iterations each arm needed to reach "
             f"{100 * TARGET_FRACTION:g} % of its scratch baseline's final Dice (same label count and seed; first "
             f"checkpoint at or above it, per seed; >N: not reached within N iterations).", "",
             "| method | labeled | " + " | ".join(f"Dice at {100 * f:g} %" for f in fracs) +
             " | iterations to 90 % of scratch |", "|---|---|" + "---|" * (len(fracs) + 1)]
    for (label, n), group in sorted(_grouped(rows).items(), key=lambda kv: (not kv[0][0].startswith(SCRATCH), kv[0])):
        group = sorted(group, key=lambda r: r["seed"])
        cells = []
        for f in fracs:
            vals = [p["mean_dice"] for r in group for p in r["curve"] if math.isclose(p["fraction"], f)]
            cells.append(summarize(vals).fmt() if vals else "–")
        its = ", ".join("–" if r["target"] is None else str(r["iterations_to_target"])
                        if r["iterations_to_target"] is not None else f">{r['budget']}" for r in group)
        lines.append(f"| {label} | {n} | " + " | ".join(cells) + f" | {its} |")
    return "\n".join(lines) + "\n"


def plot_convergence(rows: list[dict], path: Path) -> None:
    """One panel per label count: held-out Dice vs fine-tuning iterations, mean over seeds per method (±sd band),
    the 90 %-of-scratch targets dotted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = _grouped(rows)
    counts = sorted({n for _, n in groups})
    labels = sorted({lab for lab, _ in groups}, key=lambda s: (not s.startswith(SCRATCH), s))
    colors = {lab: f"C{i}" for i, lab in enumerate(labels)}
    with matplotlib.rc_context({"font.size": 9}):
        fig, axes = plt.subplots(1, len(counts), figsize=(3.6 * len(counts) + 0.6, 3.6), squeeze=False)
        for ax, n in zip(axes[0], counts):
            for lab in labels:
                group = groups.get((lab, n))
                if not group:
                    continue
                its = sorted({p["iterations"] for r in group for p in r["curve"]})
                stats = [summarize([p["mean_dice"] for r in group for p in r["curve"] if p["iterations"] == i])
                         for i in its]
                mean = [s.mean for s in stats]
                sd = [0.0 if math.isnan(s.sd) else s.sd for s in stats]
                ax.plot(its, mean, "o-", color=colors[lab], label=lab, lw=1.5, ms=4)
                ax.fill_between(its, [m - s for m, s in zip(mean, sd)], [m + s for m, s in zip(mean, sd)],
                                color=colors[lab], alpha=0.15, lw=0)
                targets = [r["target"] for r in group if r["target"] is not None]
                if lab.startswith(SCRATCH) and targets:
                    ax.axhline(sum(targets) / len(targets), color=colors[lab], ls=":", lw=1)
            ax.set_title(f"{n} labeled", fontsize=9)
            ax.set_xlabel("fine-tuning iterations")
            ax.set_ylabel("held-out mean Dice")
            ax.set_ylim(-0.02, 1.0)
            ax.grid(alpha=0.3)
        axes[0][0].legend(fontsize=7, loc="best")
        save_figure(fig, path, dpi=110)


def convergence_section(out: Path, results: list[dict], label: Callable[[dict], str]) -> tuple[str, list[dict]]:
    """Markdown section and rows for ``results.md``/``results.json``; ``convergence.png`` when any arm has a curve."""
    rows = convergence_rows(results, label)
    if rows:
        plot_convergence(rows, Path(out) / "convergence.png")
    return ("\n" + convergence_markdown(rows) if rows else ""), rows
