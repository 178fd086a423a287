"""Benchmark outputs: ``results.json`` (every arm), ``results.md`` (mean ± sd over seeds, paired difference to
scratch with a 95 % interval) and ``label_efficiency.png`` (Dice vs labeled cases, log-x, sd bands)."""
from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

from ssl3d.evaluation.protocol import SCRATCH, scratch_label
from ssl3d.evaluation.stats import paired_difference, summarize
from ssl3d.utils import atomic_write, save_figure, write_json


def curve_label(arm: dict, methods: list[str]) -> str:
    return scratch_label(arm["base"], methods) if arm["method"] == SCRATCH else arm["method"]


def aggregate(results: list[dict], methods: list[str]) -> dict:
    """{label: {n_train: {"mean_dice": {seed: v}, "dice": {class: {seed: v}}}}} plus the scratch label of each."""
    curves: dict = defaultdict(lambda: defaultdict(lambda: {"mean_dice": {}, "dice": defaultdict(dict)}))
    baseline = {}
    for r in results:
        label = curve_label(r, methods)
        cell = curves[label][int(r["n_train"])]
        cell["mean_dice"][int(r["seed"])] = float(r["mean_dice"])
        for cls, v in r["dice"].items():
            cell["dice"][cls][int(r["seed"])] = float(v)
        if r["method"] != SCRATCH:
            baseline[label] = scratch_label(r["base"], methods)
    return {"curves": curves, "baseline": baseline}


def markdown_table(agg: dict, n_trainable: int, n_test: int, setting: dict) -> str:
    curves, baseline = agg["curves"], agg["baseline"]
    counts = sorted({n for c in curves.values() for n in c})
    head = "| method | " + " | ".join(f"{n} labeled" + (" (all)" if n == n_trainable else "") for n in counts) + " |"
    lines = [f"Mean foreground Dice on {n_test} held-out test case(s), mean ± sd over seeds; below each method the "
             f"paired difference to its scratch baseline (same seeds, same few-shot cases) with a 95 % t "
             f"interval over seeds. Fine-tuning: {setting['ft_epochs']}×{setting['ft_iters']} iterations per arm "
             f"(batch {setting['ft_batch']}); pretraining: see below.", "", head,
             "|---|" + "---|" * len(counts)]
    order = sorted(curves, key=lambda k: (not k.startswith(SCRATCH), k))
    for label in order:
        row = [summarize(list(curves[label][n]["mean_dice"].values())).fmt() if n in curves[label] else "–"
               for n in counts]
        lines.append(f"| {label} | " + " | ".join(row) + " |")
        if label in baseline and baseline[label] in curves:
            base = curves[baseline[label]]
            diff = [paired_difference(curves[label][n]["mean_dice"], base[n]["mean_dice"]).fmt()
                    if n in curves[label] and n in base else "–" for n in counts]
            lines.append(f"| Δ {label} − {baseline[label]} | " + " | ".join(diff) + " |")
    classes = sorted({c for cur in curves.values() for cell in cur.values() for c in cell["dice"]})
    if classes:
        lines += ["", "Per-class Dice (mean ± sd over seeds):", "",
                  "| method | labeled | " + " | ".join(classes) + " |", "|---|---|" + "---|" * len(classes)]
        for label in order:
            for n in sorted(curves[label]):
                cells = [summarize(list(curves[label][n]["dice"].get(c, {}).values())).fmt() for c in classes]
                lines.append(f"| {label} | {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(agg: dict, path: Path, title: str) -> None:
    """Left: mean foreground Dice vs labeled cases (log-x), one line per method with a ±sd band; right: one small
    panel per class."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = agg["curves"]
    classes = sorted({c for cur in curves.values() for cell in cur.values() for c in cell["dice"]})
    ncols = max(1, math.ceil(math.sqrt(len(classes))))
    nrows = max(1, math.ceil(len(classes) / ncols))
    with matplotlib.rc_context({"font.size": 9}):
        fig = plt.figure(figsize=(5 + 2.6 * ncols, max(4.2, 2.3 * nrows)))
        grid = fig.add_gridspec(nrows, 1 + ncols, width_ratios=[2.2] + [1] * ncols)
        main = fig.add_subplot(grid[:, 0])
        colors = {label: f"C{i}" for i, label in enumerate(sorted(curves, key=lambda k: (not k.startswith(SCRATCH), k)))}
        for label, cur in curves.items():
            _line(main, cur, lambda cell: cell["mean_dice"], label, colors[label])
        _axes(main, "mean foreground Dice", curves)
        main.set_title(title, fontsize=10)
        main.legend(fontsize=8, loc="best")
        for i, cls in enumerate(classes):
            ax = fig.add_subplot(grid[i // ncols, 1 + i % ncols])
            for label, cur in curves.items():
                _line(ax, cur, lambda cell, c=cls: cell["dice"].get(c, {}), None, colors[label])
            _axes(ax, "Dice", curves)
            ax.set_title(cls, fontsize=9)
        save_figure(fig, path, dpi=110)


def _line(ax, cur: dict, values, label, color) -> None:
    ns = sorted(cur)
    stats = [summarize(list(values(cur[n]).values())) for n in ns]
    mean = [s.mean for s in stats]
    sd = [0.0 if math.isnan(s.sd) else s.sd for s in stats]
    ax.plot(ns, mean, "o-", color=color, label=label, lw=1.6, ms=4)
    ax.fill_between(ns, [m - s for m, s in zip(mean, sd)], [m + s for m, s in zip(mean, sd)], color=color, alpha=0.18,
                    lw=0)


def _axes(ax, ylabel: str, curves: dict) -> None:
    ns = sorted({n for c in curves.values() for n in c})
    ax.set_xscale("log")
    ax.set_xticks(ns)
    ax.set_xticklabels([str(n) for n in ns])
    ax.minorticks_off()
    ax.set_xlabel("labeled training cases")
    ax.set_ylabel(ylabel)
    ax.set_ylim(-0.02, 1.0)
    ax.grid(alpha=0.3)


def _num(v: float | None, digits: int = 2) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def pretraining_table(pretraining: dict) -> str:
    rows = ["| method | wall time | train loss first → last | val loss | masked PSNR (baseline) | masked SSIM (baseline) |",
            "|---|---|---|---|---|---|"]
    for m, p in sorted(pretraining.items()):
        if p.get("given"):
            rows.append(f"| {m} | given: {p['results']} | | | | |")
            continue
        r = p.get("reconstruction", {})
        rows.append(f"| {m} | {_num(p.get('wall_s'), 0)} s | {_num(p.get('first_train_loss'), 3)} → "
                    f"{_num(p.get('final_train_loss'), 3)} | {_num(p.get('final_val_loss'), 3)} | "
                    f"{_num(r.get('psnr'))} dB ({_num(r.get('baseline_psnr'))}) | {_num(r.get('ssim'), 3)} "
                    f"({_num(r.get('baseline_ssim'), 3)}) |")
    return "\n".join(rows) + "\n"


def _cell_summary(cell: dict) -> dict:
    s = summarize(list(cell["mean_dice"].values()))
    return {"mean": s.mean, "sd": s.sd, "seeds": len(cell["mean_dice"])}


def write_reports(out: Path, results: list[dict], failures: list[dict], pretraining: dict, methods: list[str],
                  n_trainable: int, n_test: int, setting: dict, cka: list[dict] | None = None) -> dict:
    agg = aggregate(results, list(methods))
    summary = {"arms": sorted(results, key=lambda r: r["id"]), "failures": failures, "pretraining": pretraining,
               "n_trainable": n_trainable, "n_test": n_test, "setting": setting,
               "summary": {label: {str(n): _cell_summary(c) for n, c in cur.items()}
                           for label, cur in agg["curves"].items()}}
    if cka is not None:
        summary["cka"] = cka
    write_json(out / "results.json", summary)
    md = markdown_table(agg, n_trainable, n_test, setting)
    if pretraining:
        md += ("\nPretraining (reconstruction of masked voxels on held-out pool cases; baseline = each masked voxel "
               "filled with the mean of the visible ones):\n\n" + pretraining_table(pretraining))
    if cka:
        md += "\nFeature reuse (linear CKA, pretrained vs fine-tuned encoder, mean over seeds): see cka.png / cka.json\n"
    if failures:
        md += "\nFailed steps (see their logs):\n\n" + "\n".join(f"- {f['step']}: {f['error']}" for f in failures) + "\n"
    atomic_write(out / "results.md", lambda f: f.write(md), mode="w")
    if results:
        plot(agg, out / "label_efficiency.png", f"label efficiency, {n_test} test case(s)")
    return summary
