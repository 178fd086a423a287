"""Preprocess a pretraining pool into nnU-Net's blosc2 layout.

Per case: read (canonical orientation) -> transpose -> crop to nonzero -> normalize -> resample (nnU-Net's
resampling, separate z for anisotropic data) -> ``<id>.b2nd`` (float32 C,Z,Y,X, chunked for the patch
size so random crops do not decompress whole volumes), ``<id>_seg.b2nd`` (1 = body/foreground, 0 =
background, -1 = outside the nonzero crop) and ``<id>.pkl`` (nnU-Net-style properties). The pkl is written
last and carries the hash of the plans, so a rerun skips exactly the cases that are finished and current.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import shutil
from pathlib import Path
from typing import Sequence

import blosc2
import numpy as np
import SimpleITK as sitk
from tqdm import tqdm

from acvl_utils.cropping_and_padding.bounding_boxes import bounding_box_to_slice
from nnunetv2.preprocessing.cropping.cropping import crop_to_nonzero
from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor
from nnunetv2.preprocessing.resampling.default_resampling import compute_new_shape, resample_data_or_seg_to_shape
from nnunetv2.training.dataloading.nnunet_dataset import comp_blosc2_params, nnUNetDatasetBlosc2
from ssl3d.data.readers import CANONICAL_ORIENTATION, CaseSource, geometry_problems, read_case, read_image
from ssl3d.planning.fingerprint import foreground_mask
from ssl3d.preprocessing.normalization import normalize_channels
from ssl3d.utils import BadInputError, guarded_case, map_cases, write_pickle

logger = logging.getLogger(__name__)

PARTIAL_DIR = ".partial"


def plans_hash(plans: dict, configuration: str) -> str:
    """Hash of everything in the plans that changes the preprocessed voxels."""
    c = plans["configurations"][configuration]
    keys = ("spacing", "normalization_schemes", "use_mask_for_norm", "resampling_fn_data",
            "resampling_fn_data_kwargs", "patch_size")
    relevant = {k: c[k] for k in keys}
    relevant["norm_kwargs"] = c.get("ssl3d", {}).get("normalization_kwargs")
    relevant["transpose_forward"] = plans["transpose_forward"]
    relevant["fg"] = plans["foreground_intensity_properties_per_channel"]
    return hashlib.sha1(json.dumps(relevant, sort_keys=True, default=str).encode()).hexdigest()[:16]


def preprocess_array(data: np.ndarray, props: dict, plans: dict, configuration: str,
                     body_mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, dict]:
    """The in-memory part: transpose, crop, normalize, resample. Returns (data, seg, properties).

    ``body_mask`` (Z, Y, X like ``data``, nonzero = anatomy; e.g. an nnssl anatomy mask) replaces the
    intensity rule for the body mask."""
    config = plans["configurations"][configuration]
    forward = plans["transpose_forward"]
    data = data.transpose([0, *[i + 1 for i in forward]])
    spacing = [props["spacing"][i] for i in forward]
    props = dict(props)
    props["shape_before_cropping"] = data.shape[1:]
    data, seg, bbox = crop_to_nonzero(data)
    props["bbox_used_for_cropping"] = bbox
    if body_mask is not None:
        body_mask = body_mask.transpose(forward)[bounding_box_to_slice(bbox)] != 0
    props["shape_after_cropping_and_before_resampling"] = data.shape[1:]
    modality = plans.get("ssl3d", {}).get("modalities", {}).get("0", "CT")
    body = foreground_mask(data[0], modality) if body_mask is None else body_mask
    seg = np.where(seg[0] < 0, np.int8(-1), body.astype(np.int8))[None]
    data = normalize_channels(data, seg if any(config["use_mask_for_norm"]) else None, config,
                              plans["foreground_intensity_properties_per_channel"])
    target = config["spacing"]
    new_shape = compute_new_shape(data.shape[1:], spacing, target)
    kw = config["resampling_fn_data_kwargs"]
    data = resample_data_or_seg_to_shape(data, new_shape, spacing, target, **kw)
    seg = resample_data_or_seg_to_shape(seg, new_shape, spacing, target, is_seg=True, order=1, order_z=0,
                                        force_separate_z=kw.get("force_separate_z"))
    props["shape_after_resampling"] = tuple(int(s) for s in data.shape[1:])
    props["spacing_after_resampling"] = list(target)
    return data.astype(np.float32, copy=False), seg.astype(np.int8, copy=False), props


def read_body_mask(case: CaseSource) -> np.ndarray | None:
    """A case's own anatomy mask (``extra["anatomy_mask"]``, from an nnssl manifest) in the canonical
    orientation, checked to lie on the image's grid; None when the case has none."""
    path = case.extra.get("anatomy_mask")
    if not path:
        return None
    mask = read_image(path)
    image = sitk.ImageFileReader()  # the header is enough to compare grids
    image.SetFileName(case.channel_files[0][0])
    image.ReadImageInformation()
    problems = geometry_problems(mask, image)
    if problems:
        raise BadInputError(path, f"anatomy mask does not lie on the grid of {case.first_file} ({'; '.join(problems)})")
    return sitk.GetArrayFromImage(sitk.DICOMOrient(mask, CANONICAL_ORIENTATION))


ARRAY_SUFFIXES = (".b2nd", "_seg.b2nd")
CASE_SUFFIXES = (*ARRAY_SUFFIXES, ".pkl")


def case_problem(out_dir: Path, case_id: str, phash: str | None) -> str | None:
    """Why a case's outputs are not finished and current (missing file, other plans, array of another size than
    written, i.e. truncated), or None. Cheap: the pkl and two ``stat`` calls, no decompression."""
    out_dir = Path(out_dir)
    missing = [s for s in CASE_SUFFIXES if not (out_dir / f"{case_id}{s}").is_file()]
    if missing:
        return f"missing {case_id}{missing[0]}"
    try:
        with open(out_dir / f"{case_id}.pkl", "rb") as f:
            props = pickle.load(f)
    except Exception:  # a corrupt pkl means the case has to be redone
        return f"unreadable {case_id}.pkl"
    if phash is not None and props.get("ssl3d_plans_hash") != phash:
        return "preprocessed with other plans"
    for suffix, size in props.get("ssl3d_file_sizes", {}).items():
        actual = os.path.getsize(out_dir / f"{case_id}{suffix}")
        if actual != size:
            return f"{case_id}{suffix} has {actual} bytes, {size} were written (truncated or replaced)"
    return None


def _is_done(out_dir: Path, case_id: str, phash: str) -> bool:
    return case_problem(out_dir, case_id, phash) is None


def _body_mask_signature(case: CaseSource) -> list | None:
    path = case.extra.get("anatomy_mask")
    return None if not path else [str(path), os.path.getsize(path), int(os.path.getmtime(path))]


def _body_mask_changed(out_dir: Path, case: CaseSource) -> bool:
    """A case whose anatomy mask was replaced since it was preprocessed (the plans hash does not see masks)."""
    sig = _body_mask_signature(case)
    if sig is None:
        return False
    with open(Path(out_dir) / f"{case.case_id}.pkl", "rb") as f:
        return pickle.load(f).get("ssl3d_body_mask") != sig


def remove_case(out_dir: Path, case_id: str) -> None:
    """Delete a case's outputs, pkl first (without it the case counts as unfinished)."""
    for suffix in (".pkl", *ARRAY_SUFFIXES):
        (Path(out_dir) / f"{case_id}{suffix}").unlink(missing_ok=True)


def output_case_ids(out_dir: Path) -> set[str]:
    """Ids of every case with any output file in ``out_dir``."""
    ids = set()
    for p in Path(out_dir).iterdir() if Path(out_dir).is_dir() else ():
        for suffix in ("_seg.b2nd", ".b2nd", ".pkl"):
            if p.name.endswith(suffix) and not p.name.startswith("."):
                ids.add(p.name[: -len(suffix)])
                break
    return ids


def preprocess_case(case: CaseSource, plans: dict, configuration: str, out_dir: Path, phash: str) -> dict:
    """Preprocess and save one case atomically; returns a short summary."""
    data, props = read_case(case)
    data, seg, props = preprocess_array(data, props, plans, configuration, read_body_mask(case))
    # nnU-Net's dataloader reads class_locations unconditionally; body voxels let it oversample anatomy.
    props["class_locations"] = DefaultPreprocessor._sample_foreground_locations(seg, [1], seed=1234, verbose=False)
    props["ssl3d_plans_hash"] = phash
    props["source_files"] = case.to_manifest()["source_files"]
    props["ssl3d_body_mask"] = _body_mask_signature(case)
    patch = tuple(plans["configurations"][configuration]["patch_size"])
    blocks, chunks = comp_blosc2_params(data.shape, patch, data.itemsize)
    blocks_seg, chunks_seg = comp_blosc2_params(seg.shape, patch, seg.itemsize)
    partial = out_dir / PARTIAL_DIR
    partial.mkdir(exist_ok=True)
    tmp_base = partial / case.case_id
    for suffix in (".b2nd", "_seg.b2nd"):
        Path(str(tmp_base) + suffix).unlink(missing_ok=True)
    nnUNetDatasetBlosc2.save_case(data, seg, props, str(tmp_base), chunks=chunks, blocks=blocks,
                                  chunks_seg=chunks_seg, blocks_seg=blocks_seg)
    # save_case also wrote a pkl next to the tmp arrays; ours (with the hash) goes last, atomically.
    Path(str(tmp_base) + ".pkl").unlink(missing_ok=True)
    for suffix in ARRAY_SUFFIXES:
        os.replace(str(tmp_base) + suffix, out_dir / f"{case.case_id}{suffix}")
    # sizes as written: a later truncation (disk full, a copy cut short) is found without decompressing
    props["ssl3d_file_sizes"] = {s: os.path.getsize(out_dir / f"{case.case_id}{s}") for s in ARRAY_SUFFIXES}
    write_pickle(out_dir / f"{case.case_id}.pkl", props)
    return {"case_id": case.case_id, "shape": list(data.shape[1:])}


def _worker(args: tuple) -> tuple[str, dict | None, str | None]:
    case, plans, configuration, out_dir, phash = args
    return guarded_case(case.case_id, case.first_file, "preprocessing", preprocess_case, case, plans, configuration,
                        out_dir, phash)


def run_preprocessing(cases: Sequence[CaseSource], plans: dict, configuration: str, out_dir: Path,
                      num_processes: int = 1, progress: bool = True) -> tuple[list[str], list[str], dict[str, str]]:
    """Preprocess all cases not already done. Returns (done now, skipped as finished, errors by id)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(out_dir / PARTIAL_DIR, ignore_errors=True)  # leftovers of a killed run
    phash = plans_hash(plans, configuration)
    todo = [c for c in cases if not _is_done(out_dir, c.case_id, phash) or _body_mask_changed(out_dir, c)]
    finished = [c.case_id for c in cases if c not in todo]
    if finished:
        logger.info("%d of %d cases already preprocessed with these plans; skipping them", len(finished), len(cases))
    jobs = [(c, plans, configuration, out_dir, phash) for c in todo]
    done, errors = [], {}
    for cid, _, err in map_cases(_worker, jobs, num_processes, "preprocess", progress):
        if err:
            errors[cid] = err
        else:
            done.append(cid)
    shutil.rmtree(out_dir / PARTIAL_DIR, ignore_errors=True)
    return done, finished, errors


def verify_outputs(out_dir: Path, case_ids: Sequence[str], phash: str | None = None,
                   progress: bool = True) -> dict[str, str]:
    """Re-read every output fully; returns a problem description per broken case."""
    problems = {}
    for cid in tqdm(case_ids, desc="verify", unit="case", disable=not progress):
        try:
            with open(Path(out_dir) / f"{cid}.pkl", "rb") as f:
                props = pickle.load(f)
            data = blosc2.open(str(Path(out_dir) / f"{cid}.b2nd"), mode="r")[:]
            seg = blosc2.open(str(Path(out_dir) / f"{cid}_seg.b2nd"), mode="r")[:]
            if tuple(data.shape[1:]) != tuple(props["shape_after_resampling"]):
                problems[cid] = f"data shape {data.shape} does not match properties {props['shape_after_resampling']}"
            elif seg.shape[1:] != data.shape[1:]:
                problems[cid] = f"seg shape {seg.shape} does not match data {data.shape}"
            elif not np.isfinite(data).all():
                problems[cid] = "non-finite values in preprocessed data"
            elif phash is not None and props.get("ssl3d_plans_hash") != phash:
                problems[cid] = "preprocessed with different plans"
        except Exception as e:  # any read failure is a finding, reported per case
            problems[cid] = f"unreadable output ({type(e).__name__}: {e})"
    return problems
