"""Benchmark outputs: ``results.json`` (every arm with its per-case scores), ``results.md`` (mean ± sd over seeds,
paired difference to scratch with its 95 % interval) and ``label_efficiency.png`` (segmentation: Dice, NSD and
HD95 vs labeled cases, one row of panels per arm mode, fine-tuned or frozen encoder, plus per-class Dice in
``label_efficiency_per_class.png``; classification: AUC vs label fraction; log-x, sd bands).

Both tasks share one data shape, ``curves[label][x] = cell`` (x: labeled cases or label fraction; a cell maps a
metric name to ``{seed: value}``), and the table rows and plot lines built on it."""
from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import asdict
from pathlib import Path
from typing import Callable

from ssl3d.evaluation.convergence import convergence_section
from ssl3d.evaluation.protocol import SCRATCH, scratch_label
from ssl3d.evaluation.stats import paired_difference, summarize
from ssl3d.utils import atomic_write, save_figure, write_json


MODE_TITLES = {"finetune": "Fine-tuned encoder", "frozen": "Frozen encoder (only decoder and head trained)"}
SEG_METRICS = {"dice": "Dice", "nsd": "NSD", "hd95": "HD95 (mm)"}  # per class; the curves' means: mean_<key>


def curve_label(arm: dict, methods: list[str]) -> str:
    base = scratch_label(arm["base"], methods) if arm["method"] == SCRATCH else arm["method"]
    return base + ("" if arm.get("mode", "finetune") == "finetune" else f" ({arm['mode']})")


def curve_order(curves: dict) -> list[str]:
    """Scratch baselines first, then the methods alphabetically."""
    return sorted(curves, key=lambda k: (not k.startswith(SCRATCH), k))


def curve_rows(curves: dict, baseline: dict, xs: list, value: Callable[[dict], dict],
               with_n: bool = False, half_width: bool = False) -> list[str]:
    """Markdown rows: per curve mean ± sd over seeds at each x (``with_n``: and the number of seeds), and below a
    curve with a baseline the paired difference to it (same seeds) with its 95 % t interval over seeds (as
    ``[low, high]``, or with ``half_width`` as ``(±half-width)``)."""
    lines = []
    for label in curve_order(curves):
        cur = curves[label]
        row = [_fmt_summary(summarize(list(value(cur[x]).values())), with_n) if x in cur else "–" for x in xs]
        lines.append(f"| {label} | " + " | ".join(row) + " |")
        if label in baseline and baseline[label] in curves:
            base = curves[baseline[label]]
            diff = [paired_difference(value(cur[x]), value(base[x])) if x in cur and x in base else None
                    for x in xs]
            lines.append(f"| Δ {label} − {baseline[label]} | " + " | ".join(
                "–" if d is None else d.fmt_half() if half_width else d.fmt() for d in diff) + " |")
    return lines


def _fmt_summary(s, with_n: bool) -> str:
    return s.fmt() + (f" ({s.n})" if with_n and s.n else "")


def aggregate(results: list[dict], methods: list[str]) -> dict:
    """{label: {n_train: cell}} with cell = {"mean_dice" | "mean_nsd" | "mean_hd95": {seed: v}, "dice" | "nsd" |
    "hd95": {class: {seed: v}}}, the scratch label each curve is compared with, and each curve's mode."""
    def new_cell() -> dict:
        return {**{f"mean_{m}": {} for m in SEG_METRICS}, **{m: defaultdict(dict) for m in SEG_METRICS}}

    curves: dict = defaultdict(lambda: defaultdict(new_cell))
    baseline, modes = {}, {}
    for r in results:
        label = curve_label(r, methods)
        modes[label] = r.get("mode", "finetune")
        cell, seed = curves[label][int(r["n_train"])], int(r["seed"])
        for m in SEG_METRICS:  # arms scored before NSD/HD95 existed have Dice only
            cell[f"mean_{m}"][seed] = _float(r.get(f"mean_{m}"))
            for cls, v in (r.get(m) or {}).items():
                cell[m][cls][seed] = _float(v)
        if r["method"] != SCRATCH:
            baseline[label] = curve_label({**r, "method": SCRATCH}, methods)
    return {"curves": curves, "baseline": baseline, "modes": modes}


def _float(v) -> float:
    return float("nan") if v is None else float(v)


def _by_mode(agg: dict) -> list[tuple[str, dict]]:
    """(mode, the curves of that mode) for each mode present, fine-tuned first."""
    out = []
    for mode in MODE_TITLES:
        sub = {k: v for k, v in agg["curves"].items() if agg["modes"].get(k) == mode}
        if sub:
            out.append((mode, sub))
    return out


def markdown_table(agg: dict, n_trainable: int, n_test: int, setting: dict) -> str:
    baseline = agg["baseline"]
    lines = [f"Scores on {n_test} held-out test case(s): mean over test cases, then mean ± sd over seeds. Below each "
             f"method (Δ) its paired difference to its scratch baseline (same seeds, same few-shot cases): mean "
             f"(± half-width of the 95 % t interval over seeds). Fine-tuning: {setting['ft_epochs']}×"
             f"{setting['ft_iters']} iterations per arm (batch {setting['ft_batch']}); pretraining: see below. NSD: "
             f"normalized surface Dice at the per-class tolerance below; HD95: 95th-percentile Hausdorff distance "
             f"in mm (lower is better); a class missing from prediction or reference scores Dice 0, NSD 0 and HD95 "
             f"= the image diagonal; a class absent from both is left out."]
    for mode, curves in _by_mode(agg):
        counts = sorted({n for c in curves.values() for n in c})
        head = ("| method | " + " | ".join(f"{n} labeled" + (" (all)" if n == n_trainable else "") for n in counts)
                + " |")
        lines += ["", f"### {MODE_TITLES[mode]}"]
        for m, name in SEG_METRICS.items():
            lines += ["", f"Mean foreground {name}:", "", head, "|---|" + "---|" * len(counts)]
            lines += curve_rows(curves, baseline, counts, lambda cell, k=f"mean_{m}": cell[k], half_width=True)
        classes = sorted({c for cur in curves.values() for cell in cur.values() for c in cell["dice"]})
        for m, name in SEG_METRICS.items():
            if not classes:
                break
            lines += ["", f"Per-class {name} (mean ± sd over seeds):", "",
                      "| method | labeled | " + " | ".join(classes) + " |", "|---|---|" + "---|" * len(classes)]
            for label in curve_order(curves):
                for n in sorted(curves[label]):
                    cells = [summarize(list(curves[label][n][m].get(c, {}).values())).fmt() for c in classes]
                    lines.append(f"| {label} | {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(agg: dict, path: Path, title: str) -> None:
    """One row per arm mode (fine-tuned, frozen encoder), one column per metric (mean Dice, NSD, HD95) vs labeled
    cases (log-x), one line per method with a ±sd band; per-class Dice in ``<path stem>_per_class.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = _by_mode(agg)
    colors = {label: f"C{i}" for i, label in enumerate(curve_order(agg["curves"]))}
    classes = sorted({c for cur in agg["curves"].values() for cell in cur.values() for c in cell["dice"]})
    with matplotlib.rc_context({"font.size": 9}):
        fig, axes = plt.subplots(len(rows), len(SEG_METRICS), figsize=(4.2 * len(SEG_METRICS), 3.6 * len(rows)),
                                 squeeze=False)
        for (mode, curves), ax_row in zip(rows, axes):
            for (m, name), ax in zip(SEG_METRICS.items(), ax_row):
                for label in curve_order(curves):
                    _line(ax, curves[label], lambda cell, k=f"mean_{m}": cell[k], label, colors[label])
                _axes(ax, f"mean foreground {name}", curves, ylim=None if m == "hd95" else (-0.02, 1.0))
                ax.set_title(f"{MODE_TITLES[mode].split(' (')[0]}: {name}", fontsize=9)
            ax_row[0].legend(fontsize=8, loc="best")
        fig.suptitle(title, fontsize=10)
        save_figure(fig, path, dpi=110)
        if not classes:
            return
        fig, axes = plt.subplots(len(rows), len(classes), figsize=(2.6 * len(classes), 2.6 * len(rows)),
                                 squeeze=False)
        for (mode, curves), ax_row in zip(rows, axes):
            for cls, ax in zip(classes, ax_row):
                for label in curve_order(curves):
                    _line(ax, curves[label], lambda cell, c=cls: cell["dice"].get(c, {}), label, colors[label])
                _axes(ax, "Dice", curves)
                ax.set_title(f"{cls} ({mode})", fontsize=9)
            ax_row[0].legend(fontsize=7, loc="best")
        fig.suptitle(f"per-class Dice, {title}", fontsize=10)
        save_figure(fig, path.with_name(path.stem + "_per_class.png"), dpi=110)


def _line(ax, cur: dict, values, label, color) -> None:
    ns = sorted(cur)
    stats = [summarize(list(values(cur[n]).values())) for n in ns]
    mean = [s.mean for s in stats]
    sd = [0.0 if math.isnan(s.sd) else s.sd for s in stats]
    ax.plot(ns, mean, "o-", color=color, label=label, lw=1.6, ms=4)
    ax.fill_between(ns, [m - s for m, s in zip(mean, sd)], [m + s for m, s in zip(mean, sd)], color=color, alpha=0.18,
                    lw=0)


def _axes(ax, ylabel: str, curves: dict, xlabel: str = "labeled training cases",
          xfmt: Callable[[float], str] = str, ylim: tuple[float, float] | None = (-0.02, 1.0)) -> None:
    ns = sorted({n for c in curves.values() for n in c})
    ax.set_xscale("log")
    ax.set_xticks(ns)
    ax.set_xticklabels([xfmt(n) for n in ns])
    ax.minorticks_off()
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if ylim is not None:
        ax.set_ylim(*ylim)
    else:
        ax.set_ylim(bottom=0)
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


def _cell_summary(cell: dict, metric: str = "mean_dice") -> dict:
    s = summarize(list(cell[metric].values()))
    return {"mean": s.mean, "sd": s.sd, "seeds": len(cell[metric])}


def _pretraining_md(pretraining: dict) -> str:
    if not pretraining:
        return ""
    return ("\nPretraining (reconstruction of masked voxels on held-out pool cases; baseline = each masked voxel "
            "filled with the mean of the visible ones):\n\n" + pretraining_table(pretraining))


def _failures_md(failures: list[dict]) -> str:
    if not failures:
        return ""
    return "\nFailed steps (see their logs):\n\n" + "\n".join(f"- {f['step']}: {f['error']}" for f in failures) + "\n"


def _difference(a: dict, b: dict) -> dict:
    d = paired_difference(a, b)
    return asdict(d) | {"half_width": d.half_width}


def _tolerance_md(results: list[dict]) -> str:
    tol = next((r["nsd_tolerance_mm"] for r in results if r.get("nsd_tolerance_mm")), None)
    if not tol:
        return ""
    return ("\nNSD tolerance per class (mm; dataset.json ssl3d_nsd_tolerance_mm, else 2 mm): "
            + ", ".join(f"{k} {v:g}" for k, v in tol.items()) + "\n")


def write_reports(out: Path, results: list[dict], failures: list[dict], pretraining: dict, methods: list[str],
                  n_trainable: int, n_test: int, setting: dict, cka: list[dict] | None = None) -> dict:
    agg = aggregate(results, list(methods))
    curves, baseline = agg["curves"], agg["baseline"]
    means = [f"mean_{m}" for m in SEG_METRICS]
    diffs = {k: {label: {str(n): _difference(cur[n][k], curves[baseline[label]][n][k])
                         for n in cur if n in curves[baseline[label]]}
                 for label, cur in curves.items() if baseline.get(label) in curves} for k in means}
    summary = {"arms": sorted(results, key=lambda r: r["id"]), "failures": failures, "pretraining": pretraining,
               "n_trainable": n_trainable, "n_test": n_test, "setting": setting,
               "summary": {label: {str(n): _cell_summary(c) for n, c in cur.items()} for label, cur in curves.items()},
               "surface_summary": {k: {label: {str(n): _cell_summary(c, k) for n, c in cur.items()}
                                       for label, cur in curves.items()} for k in means[1:]},
               "difference_to_scratch": diffs}
    if cka is not None:
        summary["cka"] = cka
    convergence_md, summary["convergence"] = convergence_section(out, results, lambda r: curve_label(r, methods))
    write_json(out / "results.json", summary)
    md = markdown_table(agg, n_trainable, n_test, setting) + _tolerance_md(results) + convergence_md
    md += _pretraining_md(pretraining)
    if cka:
        md += "\nFeature reuse (linear CKA, pretrained vs fine-tuned encoder, mean over seeds): see cka.png / cka.json\n"
    md += _failures_md(failures)
    atomic_write(out / "results.md", lambda f: f.write(md), mode="w")
    if results:
        plot(agg, out / "label_efficiency.png", f"label efficiency, {n_test} test case(s)")
    return summary


# ---- classification (``--task cls``) -----------------------------------------------------------------------------
CLS_METRICS = {"auc": "AUC", "balanced_accuracy": "balanced accuracy"}


def cls_curve_label(arm: dict, methods: list[str]) -> str:
    if arm["method"] == SCRATCH:
        return scratch_label(arm["base"], methods)
    return arm["method"] + ("" if arm["mode"] == "finetune" else f" ({arm['mode']})")


def aggregate_cls(results: list[dict], methods: list[str]) -> dict:
    """{label: {fraction: {metric: {seed: v}}}} and the scratch label each method/mode is compared with."""
    curves: dict = defaultdict(lambda: defaultdict(lambda: {m: {} for m in CLS_METRICS}))
    baseline = {}
    for r in results:
        label = cls_curve_label(r, methods)
        cell = curves[label][float(r["fraction"])]
        for m in CLS_METRICS:
            cell[m][int(r["seed"])] = float(r[m]) if r.get(m) is not None else float("nan")
        if r["method"] != SCRATCH:
            baseline[label] = scratch_label(r["base"], methods)
    return {"curves": curves, "baseline": baseline}


def _percent(f: float) -> str:
    return f"{100 * f:g} %"


def cls_markdown(agg: dict, n_train: int, n_test: int, setting: dict) -> str:
    curves, baseline = agg["curves"], agg["baseline"]
    fractions = sorted({f for c in curves.values() for f in c}, reverse=True)
    head = "| method | " + " | ".join(f"{_percent(f)} ({int(round(f * n_train))} cases)" for f in fractions) + " |"
    lines = [f"Classification of {n_test} held-out case(s) (the fold's test cases, the same for every arm), label "
             f"budget = fraction of the fold's {n_train} training cases (stratified, nested per seed). Cells: mean ± "
             f"sd over seeds (number of seeds); below each method its paired difference to scratch (same seeds, same "
             f"budget cases) with a 95 % t interval over seeds. Fine-tuning: {setting['ft_epochs']}×"
             f"{setting['ft_iters']} iterations per arm (batch {setting['ft_batch']}); linear: logistic regression "
             f"on frozen-encoder embeddings."]
    for metric, name in CLS_METRICS.items():
        lines += ["", f"{name}:", "", head, "|---|" + "---|" * len(fractions)]
        lines += curve_rows(curves, baseline, fractions, lambda cell, m=metric: cell[m], with_n=True)
    return "\n".join(lines) + "\n"


def plot_cls(agg: dict, path: Path, title: str) -> None:
    """AUC vs label fraction (log-x), one line per method/mode with a ±sd band; chance at 0.5."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = agg["curves"]
    with matplotlib.rc_context({"font.size": 9}):
        fig, ax = plt.subplots(figsize=(6, 4.2))
        for i, label in enumerate(curve_order(curves)):
            _line(ax, curves[label], lambda cell: cell["auc"], label, f"C{i}")
        ax.axhline(0.5, color="grey", lw=0.8, ls="--")
        _axes(ax, "AUC (held-out cases)", curves, "label fraction of the fold's training cases", _percent)
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=8, loc="best")
        save_figure(fig, path, dpi=110)


def write_cls_reports(out: Path, results: list[dict], failures: list[dict], pretraining: dict, methods: list[str],
                      n_train: int, n_test: int, setting: dict) -> dict:
    agg = aggregate_cls(results, list(methods))
    curves, baseline = agg["curves"], agg["baseline"]
    diffs = {m: {label: {f"{f:g}": asdict(paired_difference(cur[f][m], curves[baseline[label]][f][m]))
                         for f in cur if f in curves[baseline[label]]}
                 for label, cur in curves.items() if baseline.get(label) in curves} for m in CLS_METRICS}
    summary = {"task": "cls", "arms": sorted(results, key=lambda r: r["id"]), "failures": failures,
               "pretraining": pretraining, "n_train": n_train, "n_test": n_test, "setting": setting,
               "summary": {m: {label: {f"{f:g}": _cell_summary(c, m) for f, c in cur.items()}
                               for label, cur in curves.items()} for m in CLS_METRICS},
               "difference_to_scratch": diffs}
    write_json(out / "results.json", summary)
    md = cls_markdown(agg, n_train, n_test, setting) + _pretraining_md(pretraining) + _failures_md(failures)
    atomic_write(out / "results.md", lambda f: f.write(md), mode="w")
    if results:
        plot_cls(agg, out / "label_efficiency.png", f"label efficiency (classification), {n_test} test case(s)")
    return summary
