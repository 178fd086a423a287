"""Per-case class labels (classification) and the case splits built on them.

Labels come from a CSV (``case_id,label``; the label is a class index or a class name) or from the raw
``dataset.json`` (``ssl3d_case_labels`` {case: class}, class names in ``ssl3d_classes`` {"0": name}); a CSV
wins. Every labeled case must exist in the dataset and every class needs at least 2 cases.

Splits, all deterministic:

* :func:`stratified_folds`: K folds with every class spread evenly (per class a permutation drawn from ``seed``
  dealt round-robin, each class starting at the fold after the previous class's last one, so fold sizes differ by
  at most one). ``K = min(5, smallest class size)``.
* :func:`stratified_order`: an order of the training cases in which every prefix is as close to the class
  proportions as possible (one case of each class first, then always the class furthest below its share).
  Subsets are prefixes, so a smaller label budget's cases are always a subset of a larger one's for the same seed.
"""
from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from ssl3d.utils import BadInputError, read_json

CASE_LABELS_KEY = "ssl3d_case_labels"
CLASSES_KEY = "ssl3d_classes"
MAX_FOLDS = 5


def read_case_labels(dataset_json: str | os.PathLike, case_ids: Sequence[str],
                     labels_csv: str | os.PathLike | None = None) -> tuple[dict[str, int], list[str]]:
    """``({case: class index}, class names)``; raises :class:`BadInputError` naming the file on any problem."""
    dj_path = Path(dataset_json)
    dj = read_json(dj_path) if dj_path.is_file() else {}
    names_map = {str(k): str(v) for k, v in dj.get(CLASSES_KEY, {}).items()}
    if labels_csv is not None:
        source = Path(labels_csv)
        raw = _read_csv(source)
    elif CASE_LABELS_KEY in dj:
        source, raw = dj_path, {str(k): str(v) for k, v in dj[CASE_LABELS_KEY].items()}
    else:
        raise BadInputError(dj_path, f"no case labels: pass --labels cases.csv or add '{CASE_LABELS_KEY}'")
    known = set(case_ids)
    unknown = sorted(set(raw) - known)
    if unknown:
        raise BadInputError(source, f"unknown case id '{unknown[0]}' ({len(unknown)} not in the dataset's "
                                    f"{len(known)} cases)")
    by_name = {v: int(k) for k, v in names_map.items()}
    labels: dict[str, int] = {}
    for case, value in raw.items():
        if value in by_name:
            labels[case] = by_name[value]
        elif value.lstrip("-").isdigit() and int(value) >= 0:
            labels[case] = int(value)
        else:
            raise BadInputError(source, f"case '{case}': label '{value}' is neither a class index nor a class name "
                                        f"({', '.join(by_name) or 'no ssl3d_classes in dataset.json'})")
    n_classes = max(max(labels.values()) + 1, len(names_map))
    names = [names_map.get(str(c), str(c)) for c in range(n_classes)]
    counts = np.bincount(list(labels.values()), minlength=n_classes)
    if n_classes < 2 or counts.min() < 2:
        raise BadInputError(source, f"every class needs at least 2 labeled cases (counts per class: "
                                    f"{dict(zip(names, counts.tolist()))})")
    return dict(sorted(labels.items())), names


def _read_csv(path: Path) -> dict[str, str]:
    if not path.is_file():
        raise BadInputError(path, "labels file not found")
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise BadInputError(path, f"unreadable labels CSV ({type(e).__name__})") from None
    rows = [r for r in rows if any(c.strip() for c in r)]
    if not rows or [c.strip().lower() for c in rows[0][:2]] != ["case_id", "label"]:
        raise BadInputError(path, "labels CSV must start with the header 'case_id,label'")
    out: dict[str, str] = {}
    for i, r in enumerate(rows[1:], start=2):
        if len(r) < 2 or not r[0].strip() or not r[1].strip():
            raise BadInputError(path, f"line {i}: expected 'case_id,label'")
        case = r[0].strip()
        if case in out:
            raise BadInputError(path, f"line {i}: case '{case}' is listed twice")
        out[case] = r[1].strip()
    if not out:
        raise BadInputError(path, "labels CSV lists no cases")
    return out


def stratified_folds(labels: dict[str, int], seed: int, n_folds: int | None = None) -> list[list[str]]:
    """Disjoint folds covering every case, each class spread over the folds (sizes differ by at most one)."""
    classes = sorted(set(labels.values()))
    smallest = min(sum(1 for v in labels.values() if v == c) for c in classes)
    k = n_folds or min(MAX_FOLDS, smallest)
    if k < 2:
        raise ValueError("stratified folds need at least 2 cases per class")
    folds: list[list[str]] = [[] for _ in range(k)]
    slot = 0
    for c in classes:
        members = sorted(cid for cid, v in labels.items() if v == c)
        for i in np.random.default_rng([seed, c]).permutation(len(members)):
            folds[slot % k].append(members[i])
            slot += 1
    return [sorted(f) for f in folds]


def fold_split(labels: dict[str, int], fold: int, seed: int) -> tuple[list[str], list[str]]:
    """``(training cases, held-out test cases)`` of one stratified fold."""
    folds = stratified_folds(labels, seed)
    if not 0 <= fold < len(folds):
        raise BadInputError(None, f"fold {fold} does not exist: {len(folds)} stratified folds (0-{len(folds) - 1})")
    test = folds[fold]
    return sorted(c for c in labels if c not in set(test)), test


def stratified_order(labels: dict[str, int], cases: Sequence[str], seed: int) -> list[str]:
    """Every prefix of the returned order is as stratified as possible (see the module docstring)."""
    pools: dict[int, list[str]] = {}
    for c in sorted(set(labels[k] for k in cases)):
        members = sorted(k for k in cases if labels[k] == c)
        perm = np.random.default_rng([seed, 7, c]).permutation(len(members))
        pools[c] = [members[i] for i in perm]
    share = {c: len(v) / len(cases) for c, v in pools.items()}
    taken = {c: 0 for c in pools}
    order: list[str] = []
    for c in sorted(pools, key=lambda c: (-len(pools[c]), c)):  # one of each class first
        order.append(pools[c][0])
        taken[c] = 1
    while len(order) < len(cases):
        t = len(order) + 1
        c = max((c for c in pools if taken[c] < len(pools[c])), key=lambda c: (share[c] * t - taken[c], -c))
        order.append(pools[c][taken[c]])
        taken[c] += 1
    return order


def label_subset(labels: dict[str, int], train: Sequence[str], seed: int, n_train: int | None = None,
                 fraction: float | None = None) -> list[str]:
    """The first ``n_train`` (or ``round(fraction * len(train))``) cases of :func:`stratified_order`; nested."""
    if n_train is None and fraction is None:
        return sorted(train)
    n_classes = len(set(labels[k] for k in train))
    k = int(n_train) if n_train is not None else int(round(float(fraction) * len(train)))
    if not n_classes <= k <= len(train):
        raise BadInputError(None, f"label budget {k} must be between {n_classes} (one case per class) and the "
                                  f"fold's {len(train)} training cases")
    return sorted(stratified_order(labels, train, seed)[:k])
