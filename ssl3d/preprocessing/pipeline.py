"""Discover -> fingerprint -> plan -> preprocess, as one resumable call (used by the CLI and ``ssl_pretrain -i``)."""
from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from ssl3d.data.readers import CaseSource, check_unique_ids, discover_inputs
from ssl3d.planning.fingerprint import aggregate_fingerprint, modality_from_channel_name, run_fingerprints
from ssl3d.planning.planner import CONFIGURATION, PLANS_NAME, build_plans
from ssl3d.planning.summary import modality_rules, plan_summary
from ssl3d.preprocessing.preprocessor import (case_problem, output_case_ids, plans_hash, remove_case,
                                              run_preprocessing, verify_outputs)
from ssl3d.utils import BadInputError, BadInputs, env_dir, read_json, write_json

logger = logging.getLogger(__name__)

DEFAULT_POOL = "Dataset900_SSLPool"


@dataclass
class PlanOptions:
    datasets: Sequence[str] = ()
    folders: Sequence[str] = ()
    manifests: Sequence[str] = ()  # nnssl pretrain_data.json files
    output_root: str | None = None
    output_dataset: str | None = None
    num_processes: int = 4
    spacing: Sequence[float] | None = None
    patch_size: Sequence[int] | None = None
    patch_voxels: int | None = None
    mask_cell_size: Sequence[int] | None = None
    mask_ratio: float = 0.75
    ct_window: Sequence[float] | None = None
    modality: str | None = None
    skip_bad: bool = False
    verify: bool = False
    progress: bool = True


@dataclass
class PoolResult:
    dataset_dir: Path
    plans_file: Path
    data_dir: Path
    case_ids: list[str]
    skipped: dict[str, str] = field(default_factory=dict)
    preprocessed_now: list[str] = field(default_factory=list)
    already_done: list[str] = field(default_factory=list)
    summary: list[str] = field(default_factory=list)  # the plan's decisions and their rules, for the user


def resolve_output(options: PlanOptions) -> Path:
    """Output dataset folder: ``<root>/DatasetXXX_Name``, by default the single input's name or Dataset900_SSLPool."""
    root = Path(options.output_root) if options.output_root else env_dir("nnUNet_preprocessed")
    if root is None:
        raise BadInputError(None, "no output location: set nnUNet_preprocessed or pass -o FOLDER")
    name = options.output_dataset
    if name is None:
        if len(options.datasets) == 1 and not options.folders and not options.manifests:
            from ssl3d.data.readers import find_raw_dataset

            name = find_raw_dataset(str(options.datasets[0])).name
        else:
            name = DEFAULT_POOL
    if str(name).isdigit():
        name = f"Dataset{int(name):03d}_SSLPool"
    m = re.match(r"^Dataset(\d{3,})_(\S+)$", str(name))
    if not m:
        raise BadInputError(None, f"output dataset '{name}' must look like Dataset950_MyPool or be an id")
    if root.is_dir():
        clash = [p.name for p in root.iterdir() if p.name.startswith(f"Dataset{m.group(1)}_") and p.name != name]
        if clash:
            raise BadInputError(root / clash[0], f"dataset id {m.group(1)} is already used; pass -od with another id")
    return root / name


def _modalities(channel_names: dict, override: str | None) -> list[str | None]:
    if override:
        return [override.upper()] * len(channel_names)
    return [modality_from_channel_name(channel_names[k]) for k in sorted(channel_names, key=int)]


def _source_signature(cases: Sequence[CaseSource]) -> dict:
    """Ids, files, sizes and mtimes: a fingerprint is reused only when nothing about the inputs changed."""
    sig = {}
    for c in cases:
        files = [f for ch in c.channel_files for f in ch]
        sig[c.case_id] = [[f, os.path.getsize(f), int(os.path.getmtime(f))] for f in files if os.path.exists(f)]
    return sig


def plan_and_preprocess(options: PlanOptions) -> PoolResult:
    """Run the whole stage; raises BadInputError/BadInputs (CLI: exit 2) before writing anything on bad input."""
    out = resolve_output(options)
    cases, channel_names = discover_inputs(options.datasets, options.folders, options.manifests)
    bad: dict[str, str] = {}
    for case, err in check_unique_ids(cases):
        bad[f"{case.case_id}@{case.first_file}"] = err.line()
    dupes = {id(c) for c, _ in check_unique_ids(cases)}
    cases = [c for c in cases if id(c) not in dupes]
    modalities = _modalities(channel_names, options.modality)

    signature = _source_signature(cases)
    fp_file, manifest_file = out / "dataset_fingerprint.json", out / "manifest.json"
    fingerprint = None
    if fp_file.is_file() and manifest_file.is_file():
        old = read_json(manifest_file)
        if old.get("source_signature") == signature and old.get("modality_override") == options.modality:
            fingerprint = read_json(fp_file)
            bad.update(old.get("skipped", {}))
            logger.info("inputs unchanged since the last run: reusing %s", fp_file)
    if fingerprint is None:
        per_case, errors = run_fingerprints(cases, modalities, options.num_processes, options.progress)
        bad.update(errors)
        if bad and not options.skip_bad:
            raise BadInputs(list(bad.values()))
        if not per_case:
            raise BadInputs(list(bad.values()) or ["no usable cases"])
        fingerprint = aggregate_fingerprint(per_case, channel_names)
    elif bad and not options.skip_bad:
        raise BadInputs(list(bad.values()))
    good_ids = set(fingerprint["cases"])
    cases = [c for c in cases if c.case_id in good_ids]

    plans = build_plans(fingerprint, out.name, spacing=options.spacing, patch_size=options.patch_size,
                        patch_voxels=options.patch_voxels or 128 ** 3, mask_cell_size=options.mask_cell_size,
                        mask_ratio=options.mask_ratio, ct_window=options.ct_window)
    plans["ssl3d"]["modality_rules"] = modality_rules(fingerprint, options.modality)
    out.mkdir(parents=True, exist_ok=True)
    write_json(fp_file, fingerprint)
    plans_file = out / f"{PLANS_NAME}.json"
    write_json(plans_file, plans)
    write_json(out / "dataset.json", {
        "channel_names": channel_names, "labels": {"background": 0, "body": 1},
        "numTraining": len(cases), "file_ending": ".nii.gz", "name": out.name,
        "description": "ssl3d pretraining pool; the seg arrays hold a body mask, not annotations",
    })
    manifest = {
        "dataset": out.name, "inputs": {"datasets": list(options.datasets), "folders": [str(f) for f in options.folders],
                                       "manifests": [str(m) for m in options.manifests]},
        "cases": [c.to_manifest() for c in cases], "skipped": bad, "modality_override": options.modality,
        "source_signature": signature,
    }
    write_json(manifest_file, manifest)
    if bad:
        write_json(out / "skipped_cases.json", bad)
    data_dir = out / plans["configurations"][CONFIGURATION]["data_identifier"]
    now, finished, errors = run_preprocessing(cases, plans, CONFIGURATION, data_dir, options.num_processes,
                                              options.progress)
    if errors:
        if not options.skip_bad:
            raise BadInputs(list(errors.values()))
        bad.update(errors)
        write_json(out / "skipped_cases.json", bad)
        write_json(manifest_file, {**manifest, "skipped": bad})
    ids = [c.case_id for c in cases if c.case_id not in errors]
    stale = sorted(output_case_ids(data_dir) - set(ids))
    for cid in stale:  # cases that left the pool (source removed, now skipped): never loaded by pretraining
        remove_case(data_dir, cid)
    if stale:
        logger.info("removed the arrays of %d case(s) no longer in the pool (e.g. %s)", len(stale), stale[0])
    if options.verify:
        _verify_and_redo(cases, ids, plans, data_dir, options)
    summary = plan_summary(plans, fingerprint, options.modality, options.spacing is not None)
    return PoolResult(out, plans_file, data_dir, ids, bad, now, finished, summary)


def _verify_and_redo(cases: Sequence[CaseSource], ids: Sequence[str], plans: dict, data_dir: Path,
                     options: PlanOptions) -> None:
    """Re-read every output; a case that fails is removed and preprocessed again, then checked once more."""
    phash = plans_hash(plans, CONFIGURATION)
    problems = verify_outputs(data_dir, ids, phash, options.progress)
    if problems:
        for cid, why in problems.items():
            logger.warning("%s: %s; preprocessing it again", data_dir / cid, why)
            remove_case(data_dir, cid)
        redo = [c for c in cases if c.case_id in problems]
        _, _, errors = run_preprocessing(redo, plans, CONFIGURATION, data_dir, options.num_processes, options.progress)
        problems = {**verify_outputs(data_dir, [c.case_id for c in redo if c.case_id not in errors], phash,
                                     options.progress), **errors}
    if problems:
        raise BadInputs([f"{data_dir / k}: {v}" for k, v in problems.items()],
                        hint="verification failed after preprocessing these cases again")


def check_pool_complete(pool: Path, plans: dict) -> None:
    """Refuse a pool whose data folder does not hold exactly the finished, current cases of its manifest (a killed
    ``ssl_plan_and_preprocess``, arrays of removed cases, a truncated array)."""
    manifest_file = pool / "manifest.json"
    if not manifest_file.is_file():
        logger.warning("%s: no manifest.json (not written by ssl_plan_and_preprocess); pool completeness not checked",
                       pool)
        return
    try:
        manifest = read_json(manifest_file)
        skipped = set(manifest.get("skipped", {}))
        expected = {c["case_id"] for c in manifest["cases"]} - skipped
    except (ValueError, OSError, KeyError, TypeError) as e:
        raise BadInputError(manifest_file, f"unreadable manifest ({e}); rerun ssl_plan_and_preprocess") from None
    data_dir = pool / plans["configurations"][CONFIGURATION]["data_identifier"]
    rerun = "rerun ssl_plan_and_preprocess with the same inputs to finish it"
    present = output_case_ids(data_dir)
    missing, extra = sorted(expected - present), sorted(present - expected)
    if missing:
        raise BadInputError(data_dir, f"incomplete pool: {len(missing)} of {len(expected)} cases of manifest.json "
                                      f"have no preprocessed arrays (e.g. {missing[0]}); {rerun}")
    if extra:
        raise BadInputError(data_dir, f"{len(extra)} case(s) here are not in manifest.json (e.g. {extra[0]}; stale "
                                      f"arrays of removed cases); {rerun}")
    phash = plans_hash(plans, CONFIGURATION)
    for cid in sorted(expected):
        why = case_problem(data_dir, cid, phash)
        if why:
            raise BadInputError(data_dir / cid, f"{why}; {rerun}")


def find_preprocessed_dataset(dataset: str | int, root: Path | None = None) -> Path:
    """``$nnUNet_preprocessed/DatasetXXX_Name`` for an id or a name (what ``ssl_plan_and_preprocess`` wrote)."""
    root = root if root is not None else env_dir("nnUNet_preprocessed")
    if root is None:
        raise BadInputError(None, "nnUNet_preprocessed is not set")
    if str(dataset).isdigit():
        hits = sorted(root.glob(f"Dataset{int(dataset):03d}_*")) if root.is_dir() else []
        if not hits:
            raise BadInputError(root, f"no preprocessed dataset with id {dataset} (run ssl_plan_and_preprocess first)")
        return hits[0]
    if not (root / str(dataset)).is_dir():
        raise BadInputError(root / str(dataset), "preprocessed dataset not found (run ssl_plan_and_preprocess first)")
    return root / str(dataset)
