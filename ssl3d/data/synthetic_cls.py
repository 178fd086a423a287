"""Synthetic CT *classification* datasets (one class per case) from the phantoms of :mod:`ssl3d.data.synthetic`.

``fatty-liver``: class 1 ("fatty") cases have their liver tissue value lowered by a random 30-60 HU (hepatic
steatosis lowers liver attenuation by roughly 1.5-2.5 HU per percent fat), class 0 ("normal") keep it. Noise
(10-25 HU), texture, the other organs (spleen 45-50 HU native) and the anatomy vary per case as usual, so the
task is learnable (a large organ is clearly darker) but not trivial (it needs the liver, not a global mean, and
the per-case noise and body composition overlap the shift). ``fatty-liver-easy`` shifts by 150-200 HU instead: a
sanity task any working classifier must solve.

Layout (nnU-Net raw): ``DatasetXXX_SynthCTFattyLiver/imagesTr/liver_0000_0000.nii.gz``, ``dataset.json`` with
``ssl3d_case_labels`` ({case: class}) and ``ssl3d_classes`` ({"0": "normal", "1": "fatty"}), and
``cases.csv`` (``case_id,label``). ``n // 2`` cases are positive, chosen by a seeded permutation; every case's
image comes from its own random stream (subset 2 of :func:`_case_rng`, never the pool's or the organ set's), so
the same seed always gives the same files.
"""
from __future__ import annotations

import csv
import io
import logging
import os
import re
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ssl3d.data.case_labels import CASE_LABELS_KEY, CLASSES_KEY
from ssl3d.data.synthetic import (FILE_ENDING, PHASES, SIZE_PRESETS, _case_rng, _files_to_drop, _write_image_atomic,
                                  make_phantom, phantom_to_sitk)
from ssl3d.utils import BadInputError, atomic_write, write_json

logger = logging.getLogger(__name__)

CLS_TASKS: dict[str, dict] = {
    "fatty-liver": {"name": "SynthCTFattyLiver", "prefix": "liver", "classes": {"0": "normal", "1": "fatty"},
                    "shift_hu": (30.0, 60.0)},
    # a check that the pipeline can solve its own task at all: the liver 150-200 HU darker (below fat-free tissue)
    "fatty-liver-easy": {"name": "SynthCTFattyLiverEasy", "prefix": "liver", "classes": {"0": "normal", "1": "fatty"},
                         "shift_hu": (150.0, 200.0)},
}
_SUBSET = 2  # random-stream subset of the classification cases (0: pool, 1: organ set)


def case_classes(n: int, seed: int) -> list[int]:
    """Class per case index: ``n // 2`` positives at seeded positions."""
    positives = set(np.random.default_rng([seed, _SUBSET, n]).permutation(n)[: n // 2].tolist())
    return [int(i in positives) for i in range(n)]


def write_classification_dataset(raw_dir: str | os.PathLike, task: str = "fatty-liver", n: int = 16, seed: int = 0,
                                 size: str = "small", dataset_id: int = 803, name: str | None = None,
                                 phase: str = "native", progress: bool = True) -> Path:
    """Write a synthetic classification dataset in nnU-Net raw format; returns its folder.

    ``dataset.json`` is written last (its presence marks a complete dataset); files are replaced atomically.
    """
    if task not in CLS_TASKS:
        raise BadInputError(None, f"unknown classification task {task!r}; choose from {', '.join(CLS_TASKS)}")
    if size not in SIZE_PRESETS or phase not in PHASES:
        raise BadInputError(None, f"unknown size {size!r} or phase {phase!r}")
    if n < 2 or seed < 0:
        raise BadInputError(None, "a classification dataset needs at least 2 cases (one per class) and seed >= 0")
    if not 1 <= dataset_id <= 999:
        raise BadInputError(None, f"dataset id {dataset_id} is outside nnU-Net's range 1-999")
    spec = CLS_TASKS[task]
    name = name or spec["name"]
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]*", name):
        raise BadInputError(None, f"dataset name {name!r} may only hold letters, digits, '_' and '-'")
    raw_dir = Path(raw_dir)
    folder = raw_dir / f"Dataset{dataset_id:03d}_{name}"
    prefix = spec["prefix"]
    cases = [f"{prefix}_{i:04d}" for i in range(n)]
    expected = {f"{c}_0000{FILE_ENDING}" for c in cases}
    drop = _files_to_drop(folder, raw_dir, dataset_id, rf"{prefix}_\d{{4,}}(_0000)?{re.escape(FILE_ENDING)}",
                          expected)
    for f in drop + [folder / "cases.csv"]:
        f.unlink(missing_ok=True)
    (folder / "imagesTr").mkdir(parents=True, exist_ok=True)

    labels = case_classes(n, seed)
    lo, hi = spec["shift_hu"]
    shifts = {}
    for i, case in enumerate(tqdm(cases, desc="synthetic CT (classes)", unit="case", disable=not progress)):
        # the shift has its own stream: a case's anatomy and noise do not depend on its class
        shift = -float(np.random.default_rng([seed, _SUBSET, i, 1]).uniform(lo, hi)) if labels[i] else 0.0
        shifts[case] = shift
        image, _ = phantom_to_sitk(make_phantom(_case_rng(seed, _SUBSET, i), size, phase, liver_hu_shift=shift))
        _write_image_atomic(image, folder / "imagesTr" / f"{case}_0000{FILE_ENDING}")

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["case_id", "label"])
    w.writerows([c, y] for c, y in zip(cases, labels))
    atomic_write(folder / "cases.csv", lambda f: f.write(buf.getvalue()), "w")
    write_json(folder / "dataset.json", {
        "channel_names": {"0": "CT"}, "labels": {"background": 0}, "numTraining": n, "file_ending": FILE_ENDING,
        "name": name, CASE_LABELS_KEY: dict(zip(cases, labels)), CLASSES_KEY: dict(spec["classes"]),
        "ssl3d_liver_hu_shift": shifts,
        "description": f"Synthetic abdomen-like CT ({size}, {phase} phase, seed {seed}) from ssl_make_demo_data; "
                       f"case classification task '{task}' ({sum(labels)} of {n} positive)",
        "licence": "CC0 (synthetic data)",
    })
    logger.debug("wrote %d classification case(s) to %s", n, folder)
    return folder
