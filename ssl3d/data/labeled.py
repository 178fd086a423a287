"""Labeled data through ssl3d's readers before nnU-Net sees it.

``ssl_finetune``, ``ssl_finetune_cls``, ``ssl_benchmark`` and ``ssl_predict`` hand images (and labels) to stock
nnU-Net, whose SimpleITK reader takes a truncated file for one half filled with zeros and NaN voxels as 0. Every
image is read here first with the pool reader's checks (:func:`~ssl3d.data.readers.read_case_images`), every
label is checked to exist, to share its image's voxel grid and to hold only values dataset.json declares. Cases
are checked in parallel (:func:`~ssl3d.utils.map_cases`); all problems are reported at once, one line each.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Sequence

import numpy as np
import SimpleITK as sitk

from ssl3d.data.readers import (CaseSource, discover_raw_dataset, geometry_problems, read_case_images,
                                read_dataset_json, read_image)
from ssl3d.utils import BadInputError, BadInputs, guarded_case, map_cases

# (case id, image file per channel, label file or None)
LabeledCase = tuple[str, list[str], "str | None"]


def label_values(dataset_json: dict, dj_path: str | os.PathLike) -> set[int]:
    """The integer label values dataset.json declares (region lists flattened, ``ignore`` included)."""
    labels = dataset_json.get("labels")
    values: set[int] = set()
    ok = isinstance(labels, dict) and bool(labels)
    for v in (labels or {}).values() if ok else ():
        for x in (v if isinstance(v, (list, tuple)) else [v]):
            if isinstance(x, bool) or not isinstance(x, int):
                ok = False
            else:
                values.add(x)
    if not ok or 0 not in values:
        raise BadInputError(dj_path, "dataset.json needs 'labels' as {name: integer value}, with background 0")
    return values


def encoder_channels(plans: dict) -> int:
    """Input channels of the network the plans describe (one normalization scheme per channel)."""
    return len(plans["configurations"]["3d_fullres"]["normalization_schemes"])


def check_encoder_channels(n_channels: int, n_encoder: int, dj_path: str | os.PathLike) -> None:
    """A dataset with another channel count than the pretrained encoder cannot be fine-tuned from it."""
    if n_channels != n_encoder:
        raise BadInputError(dj_path, f"{n_channels} channel(s) in 'channel_names' but the pretrained encoder takes "
                                     f"{n_encoder}")


def _check_label(label: str, image: sitk.Image, image_file: str, allowed: set[int]) -> None:
    if not os.path.isfile(label):
        raise BadInputError(label, f"missing label for image {os.path.basename(image_file)}")
    lab = read_image(label)
    problems = geometry_problems(lab, image)
    if problems:
        raise BadInputError(label, f"label geometry differs from its image {image_file} ({'; '.join(problems)})")
    arr = sitk.GetArrayViewFromImage(lab)
    if arr.dtype.kind == "f":
        if not np.isfinite(arr).all():
            raise BadInputError(label, "label contains NaN/Inf voxels")
        if (arr != np.round(arr)).any():
            raise BadInputError(label, "label has non-integer values")
    top = max(allowed)
    outside = (arr < 0) | (arr > top)
    found = set(np.unique(arr[outside]).astype(np.int64).tolist()) if outside.any() else set()
    counts = np.bincount(arr[~outside].astype(np.int64).ravel(), minlength=top + 1)
    found |= {int(v) for v in np.flatnonzero(counts) if int(v) not in allowed}
    if found:
        shown = sorted(found)
        raise BadInputError(label, f"label values {shown[:8]}{' ...' if len(shown) > 8 else ''} are not among "
                                   f"dataset.json's labels {sorted(allowed)}")


def _check_case(job: tuple) -> tuple[str, None, str | None]:
    (case_id, files, label), allowed = job

    def check() -> None:
        images = read_case_images(CaseSource(case_id, [[f] for f in files], "", "file"))
        if label is not None:
            _check_label(label, images[0], files[0], allowed)

    return guarded_case(case_id, files[0], "checking", check)


def check_cases(cases: Sequence[LabeledCase], allowed: set[int] | None, num_processes: int = 1,
                progress: bool = False, desc: str = "check inputs") -> None:
    """Read every case's images (and label, where given) with the readers' checks; raise one line per problem."""
    outs = map_cases(_check_case, [(c, allowed) for c in cases], num_processes, desc, progress)
    lines = [err for _, _, err in outs if err]
    raise_lines(lines)


def check_images(cases: Sequence[CaseSource], num_processes: int = 1, progress: bool = False) -> None:
    """Images only (classification cases, whose labels are per case): every file through the readers' checks."""
    check_cases([(c.case_id, [f[0] for f in c.channel_files], None) for c in cases], None, num_processes, progress)


def raise_lines(lines: list[str]) -> None:
    if len(lines) == 1:
        raise BadInputError(None, lines[0])
    if lines:
        raise BadInputs(lines, hint="nothing was written; fix or remove these cases")


def check_labeled_dataset(folder: Path, n_channels: int | None = None, num_processes: int = 1,
                          progress: bool = False) -> tuple[list[CaseSource], dict]:
    """An nnU-Net raw segmentation dataset, fully: dataset.json (channels, labels, file ending), imagesTr,
    labelsTr, every image and every label. Returns its cases and dataset.json; raises naming the first culprit."""
    folder = Path(folder)
    if not (folder / "imagesTr").is_dir() and not (folder / "dataset.json").is_file():
        raise BadInputError(folder, "not a labeled nnU-Net raw dataset (needs dataset.json, imagesTr/, labelsTr/)")
    cases, dj = discover_raw_dataset(folder)
    dj_path = folder / "dataset.json"
    allowed = label_values(dj, dj_path)
    if n_channels is not None:
        check_encoder_channels(len(dj.get("channel_names", dj.get("modality"))), n_channels, dj_path)
    labels_dir = folder / "labelsTr"
    if not labels_dir.is_dir():
        raise BadInputError(labels_dir, "missing labelsTr folder (a labeled dataset needs one label per case)")
    ending = dj["file_ending"]
    jobs = []
    for c in cases:
        first = c.channel_files[0][0]
        stem = os.path.basename(first)[: -len(ending) - 5]  # <case>_0000<ending> -> <case>
        jobs.append((c.case_id, [f[0] for f in c.channel_files], str(labels_dir / f"{stem}{ending}")))
    check_cases(jobs, allowed, num_processes, progress)
    return cases, dj


def check_prediction_folder(folder: Path, channel_names: dict, file_ending: str, num_processes: int = 1,
                            progress: bool = False) -> list[str]:
    """Images nnU-Net's predictor would read from ``folder`` (``<case>_XXXX<file_ending>``): every case with
    exactly the model's channels, every file through the readers' checks. Returns the case ids."""
    folder = Path(folder)
    if not folder.is_dir():
        raise BadInputError(folder, "input folder does not exist")
    n_ch = len(channel_names)
    pattern = re.compile(r"^(.+)_(\d{4})" + re.escape(file_ending) + "$")
    cases: dict[str, dict[int, str]] = {}
    lines = []
    for f in sorted(os.listdir(folder)):
        if f.startswith(".") or not f.endswith(file_ending):
            continue
        m = pattern.match(f)
        if not m:
            lines.append(f"{folder / f}: not named <case>_XXXX{file_ending} (nnU-Net's channel naming)")
        elif int(m.group(2)) >= n_ch:
            lines.append(f"{folder / f}: channel {int(m.group(2))} but the model takes {n_ch} channel(s)")
        else:
            cases.setdefault(m.group(1), {})[int(m.group(2))] = str(folder / f)
    if not cases and not lines:
        raise BadInputError(folder, f"no images named <case>_0000{file_ending} (nnU-Net's channel naming)")
    for cid, chans in sorted(cases.items()):
        lines += [f"{folder / f'{cid}_{c:04d}{file_ending}'}: missing channel {c} of case '{cid}' (the model takes "
                  f"{n_ch})" for c in range(n_ch) if c not in chans]
    raise_lines(lines)
    check_cases([(cid, [chans[c] for c in range(n_ch)], None) for cid, chans in sorted(cases.items())], None,
                num_processes, progress)
    return sorted(cases)


def model_dataset_json(results_folder: Path) -> dict:
    """The dataset.json nnU-Net copied into a fine-tuned model's results folder."""
    return read_dataset_json(Path(results_folder) / "dataset.json", "missing (not an nnU-Net results folder?)")
