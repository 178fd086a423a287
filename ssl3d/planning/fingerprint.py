"""Dataset fingerprint for unlabeled data.

nnU-Net samples intensities under the labels; pretraining pools have none, so statistics are sampled from a
body/foreground mask instead (CT: largest component above -500 HU; MRI: Otsu threshold inside the nonzero
region). The aggregate keeps nnU-Net's fingerprint keys so nnU-Net code that reads one keeps working.
"""
from __future__ import annotations

import logging
from typing import Sequence

import numpy as np
from scipy import ndimage

from nnunetv2.preprocessing.cropping.cropping import crop_to_nonzero
from ssl3d.data.readers import CaseSource, read_case
from ssl3d.utils import guarded_case, map_cases

logger = logging.getLogger(__name__)

SAMPLES_PER_CASE = 10000
CT_BODY_THRESHOLD_HU = -500.0
_MRI_NAMES = ("t1", "t2", "flair", "mr", "adc", "dwi", "pd", "swi", "bold", "dti")


def modality_from_channel_name(name: str) -> str | None:
    """'CT' or 'MRI' from a dataset.json channel name, None when the name says nothing."""
    low = str(name).strip().lower()
    if low == "ct" or low.startswith("ct") or "computed tomography" in low:
        return "CT"
    if any(low.startswith(m) or m in low.split() for m in _MRI_NAMES) or "mri" in low:
        return "MRI"
    return None


AIR_MIN_HU, AIR_BELOW_HU, AIR_FRACTION = -800.0, -500.0, 0.01
AIR_RULE = f"minimum <= {AIR_MIN_HU:g} and > {AIR_FRACTION:.0%} of voxels below {AIR_BELOW_HU:g}"


def infer_modality(image: np.ndarray) -> str:
    """Guess CT vs MRI from intensities: CT has air near -1000 HU, MRI is non-negative."""
    sub = image[::2, ::4, ::4] if image.ndim == 3 else image
    low_fraction = float((sub < AIR_BELOW_HU).mean())
    return "CT" if sub.min() <= AIR_MIN_HU and low_fraction > AIR_FRACTION else "MRI"


def modality_rule(modality: str, channel_name: str, override: str | None, votes: Sequence[str]) -> str:
    """The rule that decided a channel's modality, as the user should read it."""
    if override:
        return f"--modality {override.upper()}"
    if modality_from_channel_name(channel_name):
        return f"dataset.json channel name '{channel_name}'"
    n, agree = len(votes), sum(v == modality for v in votes)
    if modality == "CT":
        return (f"inferred: air-like voxels ({AIR_RULE}) in {agree} of {n} cases; pass --modality MRI if this is "
                f"MRI")
    return (f"inferred: no air-like voxels ({AIR_RULE}) in {agree} of {n} cases; pass --modality CT if this is CT "
            f"(e.g. a CT whose background was set to 0)")


def largest_component(mask: np.ndarray) -> np.ndarray:
    """Largest 6-connected component of a boolean mask (the body, not the table or noise)."""
    labels, n = ndimage.label(mask)
    if n <= 1:
        return mask
    counts = np.bincount(labels.ravel())
    counts[0] = 0
    return labels == int(np.argmax(counts))


def foreground_mask(image: np.ndarray, modality: str) -> np.ndarray:
    """Voxels whose intensities describe the anatomy (3D array in, boolean array out)."""
    if modality == "CT":
        mask = largest_component(image > CT_BODY_THRESHOLD_HU)
    else:
        from skimage.filters import threshold_otsu

        nonzero = image != 0
        values = image[nonzero]
        mask = nonzero
        if values.size > 0 and values.min() != values.max():
            mask = nonzero & (image > threshold_otsu(values))
    if not mask.any():  # e.g. a CT without body above -500: fall back to all nonzero voxels
        mask = image != image.min()
    return mask


def intensity_stats(values: np.ndarray) -> dict:
    """Same keys as nnU-Net's foreground_intensity_properties_per_channel."""
    if values.size == 0:
        return {k: float("nan") for k in ("mean", "median", "std", "min", "max", "percentile_99_5", "percentile_00_5")}
    p = np.percentile(values, [50.0, 99.5, 0.5])
    return {"mean": float(values.mean()), "median": float(p[0]), "std": float(values.std()),
            "min": float(values.min()), "max": float(values.max()),
            "percentile_99_5": float(p[1]), "percentile_00_5": float(p[2])}


def fingerprint_case(case: CaseSource, modalities: Sequence[str | None], seed: int = 0) -> dict:
    """Per-case fingerprint; raises BadInputError for unusable input."""
    data, props = read_case(case)
    shape_before = data.shape[1:]
    cropped, _, bbox = crop_to_nonzero(data)
    rng = np.random.default_rng(seed)
    channels = []
    for c in range(data.shape[0]):
        modality = modalities[c] or infer_modality(data[c])
        mask = foreground_mask(data[c], modality)
        values = data[c][mask]
        n = min(SAMPLES_PER_CASE, values.size)
        samples = rng.choice(values, n, replace=False) if values.size > n else values
        body_bbox = [[int(a.min()), int(a.max()) + 1] for a in np.nonzero(mask)] if mask.any() else None
        channels.append({"modality": modality, "stats": intensity_stats(values), "samples": samples.astype(np.float32),
                         "foreground_fraction": float(mask.mean()), "foreground_bbox": body_bbox})
    return {
        "case_id": case.case_id,
        "spacing": props["spacing"],
        "shape_before_crop": list(shape_before),
        "shape_after_crop": list(cropped.shape[1:]),
        "bbox_nonzero": [[int(a), int(b)] for a, b in bbox],
        "relative_size_after_cropping": float(np.prod(cropped.shape[1:]) / np.prod(shape_before)),
        "direction": props["original_sitk_stuff"]["direction"],
        "original_orientation": props["original_orientation"],
        "channels": channels,
    }


def _worker(args: tuple) -> tuple[str, dict | None, str | None]:
    case, modalities, seed = args
    return guarded_case(case.case_id, case.first_file, "reading", fingerprint_case, case, modalities, seed)


def run_fingerprints(cases: Sequence[CaseSource], modalities: Sequence[str | None], num_processes: int = 1,
                     progress: bool = True) -> tuple[dict[str, dict], dict[str, str]]:
    """Fingerprint every case in parallel; returns (results by id, error line by id) in input order."""
    jobs = [(c, list(modalities), i) for i, c in enumerate(cases)]
    results: dict[str, dict] = {}
    errors: dict[str, str] = {}
    for cid, res, err in map_cases(_worker, jobs, num_processes, "fingerprint", progress):
        if err is not None:
            errors[cid] = err
        else:
            results[cid] = res
    return results, errors


def aggregate_fingerprint(per_case: dict[str, dict], channel_names: dict) -> dict:
    """Dataset-level fingerprint with nnU-Net's keys plus per-case details (without raw samples)."""
    ids = list(per_case)
    n_ch = len(channel_names)
    fg_props = {}
    modalities = {}
    for c in range(n_ch):
        pooled = np.concatenate([per_case[i]["channels"][c]["samples"] for i in ids])
        fg_props[str(c)] = intensity_stats(pooled)
        votes = [per_case[i]["channels"][c]["modality"] for i in ids]
        modalities[str(c)] = max(set(votes), key=votes.count)
    cases = {}
    for i in ids:
        d = dict(per_case[i])
        d["channels"] = [{k: v for k, v in ch.items() if k != "samples"} for ch in d["channels"]]
        cases[i] = d
    return {
        "spacings": [per_case[i]["spacing"] for i in ids],
        "shapes_after_crop": [per_case[i]["shape_after_crop"] for i in ids],
        "foreground_intensity_properties_per_channel": fg_props,
        "median_relative_size_after_cropping": float(np.median([per_case[i]["relative_size_after_cropping"]
                                                                for i in ids])),
        "channel_names": channel_names,
        "modalities": modalities,
        "foreground_mask_rule": {"CT": f"largest component above {CT_BODY_THRESHOLD_HU:g} HU",
                                 "MRI": "Otsu threshold inside the nonzero region"},
        "cases": cases,
    }
