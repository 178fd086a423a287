"""One report from the finished arms of several ``ssl_benchmark`` (segmentation) runs on the same data.

A run that is too long for one sitting can be split over output folders (say, the 1-case arms in one session and
the all-case arms in another, or a scratch baseline reused from an earlier run). This writes ``results.md``,
``results.json``, ``label_efficiency.png`` and ``convergence.png`` for their union with the benchmark's own report
code (``ssl3d.evaluation.report.write_reports``), so the paired differences and intervals are computed exactly as
``ssl_benchmark`` computes them. Refused, in one line: runs scored on different test cases, an arm id finished in
two runs with different results, runs of different presets except for the keys named in ``--allow-setting``
(which the caller must justify; e.g. ``pretrain_lr``, which no scratch arm depends on).

    .venv/bin/python benchmarks/merge_benchmark_runs.py -o docs/small_benchmark 'run_a/results.json::scratch*' \
        run_b/ [--allow-setting pretrain_lr]
"""
from __future__ import annotations

import argparse
import fnmatch
import json
import sys
from pathlib import Path

from ssl3d.evaluation.protocol import setting_changes
from ssl3d.evaluation.report import write_reports


def read_run(path: Path) -> dict:
    """A ``results.json``, or a benchmark ``-o`` folder: its finished arms (``arms/*/result.json``, also those of a
    run still going or killed before it wrote ``results.json``), setting and case counts from ``protocol.json``,
    pretraining infos from ``pretraining/*.json``."""
    if path.is_file():
        return json.loads(path.read_text(encoding="utf-8"))
    protocol = json.loads((path / "protocol.json").read_text(encoding="utf-8"))
    arms = [json.loads(f.read_text(encoding="utf-8")) for f in sorted(path.glob("arms/*/result.json"))]
    pretraining = {f.stem: json.loads(f.read_text(encoding="utf-8")) for f in sorted(path.glob("pretraining/*.json"))}
    split = protocol["split"]  # case id lists
    return {"arms": arms, "setting": protocol["setting"], "pretraining": pretraining,
            "n_trainable": len(split["trainable"]), "n_test": len(split["test"])}


def split_run_arg(arg: str) -> tuple[Path, list[str]]:
    """``PATH`` or ``PATH::PATTERN,PATTERN``: the arm ids (fnmatch) to keep from that run (default: all)."""
    path, _, patterns = arg.partition("::")
    return Path(path), [p for p in patterns.split(",") if p]


def load_runs(args: list[str]) -> list[tuple[Path, dict, list[dict]]]:
    runs = []
    for arg in args:
        p, only = split_run_arg(arg)
        r = read_run(p)
        arms = [a for a in r["arms"] if not only or any(fnmatch.fnmatch(a["id"], pat) for pat in only)]
        runs.append((p, r, arms))
    return runs


def merge(runs: list[tuple[Path, dict, list[dict]]], allow_setting: set[str]) -> tuple[list[dict], dict, dict]:
    """The union of the runs' arms, the last run's setting and pretraining infos (refusals raise ValueError)."""
    tests = {p: sorted({c["case"] for a in arms for c in a["cases"]}) for p, _, arms in runs if arms}
    if len({tuple(t) for t in tests.values()}) > 1:
        raise ValueError(f"the runs were scored on different test cases: {', '.join(map(str, tests))}")
    setting = runs[-1][1]["setting"]
    for p, r, _ in runs:
        differ = setting_changes(r["setting"], setting, ignore=allow_setting)
        if differ:
            raise ValueError(f"{p}: another setting ({'; '.join(differ)}); pass --allow-setting only for keys its "
                             f"arms do not depend on")
    by_id: dict[str, dict] = {}
    for p, _, arms in runs:
        for a in arms:
            if a["id"] in by_id and by_id[a["id"]]["mean_dice"] != a["mean_dice"]:
                raise ValueError(f"{p}: arm {a['id']} is in two runs with different results")
            by_id[a["id"]] = a
    pretraining = {m: infos[-1][1] for m, infos in kept_pretrainings(runs).items()}
    return list(by_id.values()), setting, pretraining


def kept_pretrainings(runs: list[tuple[Path, dict, list[dict]]]) -> dict[str, list[tuple[Path, dict]]]:
    """Per method, in run order, the pretraining infos of the runs whose pretrained arms were kept (a scratch-only
    run's pretraining is not used)."""
    kept: dict[str, list[tuple[Path, dict]]] = {}
    for p, r, arms in runs:
        used = {a["method"] for a in arms}
        for m, info in r.get("pretraining", {}).items():
            if m in used:
                kept.setdefault(m, []).append((p, info))
    return kept


def pretraining_notes(runs: list[tuple[Path, dict, list[dict]]]) -> list[str]:
    """One line per method whose kept arms come from more than one pretraining (the report shows the last one's)."""
    notes = []
    for m, infos in kept_pretrainings(runs).items():
        distinct = [(p, i) for k, (p, i) in enumerate(infos) if all(i != j for _, j in infos[:k])]
        if len(distinct) > 1:
            each = ", ".join(f"{p}: val loss {i.get('final_val_loss')}" for p, i in distinct)
            notes.append(f"note: the {m} arms come from {len(distinct)} pretrainings ({each}); "
                         f"the report shows the last")
    return notes


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="ssl_benchmark results.json files or -o folders, each optionally "
                                            "followed by ::PATTERN,... (fnmatch) to keep only those arm ids")
    ap.add_argument("-o", required=True, type=Path, help="folder for the merged report")
    ap.add_argument("--allow-setting", nargs="*", default=[], help="preset keys that may differ between runs")
    a = ap.parse_args(argv)
    for p in (split_run_arg(r)[0] for r in a.runs):
        if not (p.is_file() or (p / "protocol.json").is_file()):
            print(f"merge_benchmark_runs: {p}: neither a results.json nor an ssl_benchmark output folder",
                  file=sys.stderr)
            return 2
    try:
        runs = load_runs(a.runs)
        results, setting, pretraining = merge(runs, set(a.allow_setting))
    except ValueError as e:
        print(f"merge_benchmark_runs: {e}", file=sys.stderr)
        return 2
    for line in pretraining_notes(runs):
        print(f"merge_benchmark_runs: {line}", file=sys.stderr)
    last = runs[-1][1]
    methods = sorted({r["base"] for r in results})
    a.o.mkdir(parents=True, exist_ok=True)
    write_reports(a.o, results, [], pretraining, methods, last["n_trainable"], last["n_test"], setting)
    print(f"{len(results)} arms -> {a.o / 'results.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
