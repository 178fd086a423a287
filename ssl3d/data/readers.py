"""Finding and reading the scans a user points ssl3d at.

Inputs are nnU-Net raw datasets (by id or name under ``$nnUNet_raw``) and plain folders searched
recursively for NIfTI/NRRD/MetaImage files and DICOM series. Every problem with an input surfaces as a
:class:`~ssl3d.utils.BadInputError` naming the file, so the CLI can print one line instead of a traceback.
"""
from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import SimpleITK as sitk

from ssl3d.data.nifti_checks import check_nifti
from ssl3d.utils import BadInputError, env_dir, read_json

logger = logging.getLogger(__name__)

SUPPORTED_ENDINGS = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")
# Files that never hold images; skipped silently when searching folders.
_IGNORED_ENDINGS = (".json", ".txt", ".md", ".csv", ".pkl", ".py", ".raw", ".zraw", ".tsv", ".log", ".png", ".jpg")
CANONICAL_ORIENTATION = "LPS"  # ITK's identity direction: array axes (z, y, x) run S, P, L


@dataclass
class CaseSource:
    """One case of the pretraining pool: its id, one file (or DICOM file list) per channel, where it came from."""

    case_id: str
    channel_files: list[list[str]]
    origin: str
    kind: str  # "nnunet_raw" | "file" | "dicom"
    extra: dict = field(default_factory=dict)

    @property
    def first_file(self) -> str:
        return self.channel_files[0][0] if self.kind != "dicom" else os.path.dirname(self.channel_files[0][0])

    def to_manifest(self) -> dict:
        files = [f[0] if self.kind != "dicom" else os.path.dirname(f[0]) for f in self.channel_files]
        return {"case_id": self.case_id, "source_files": files, "origin": self.origin, "kind": self.kind}


def file_ending(path: str) -> str | None:
    """The supported ending of a file name (case-insensitive), or None."""
    low = path.lower()
    for e in SUPPORTED_ENDINGS:
        if low.endswith(e):
            return e
    return None


def sanitize_case_id(name: str) -> str:
    """Case ids become file names: keep letters (including non-ASCII), digits, '.', '-', '_'."""
    cleaned = re.sub(r"[^\w.\-]+", "_", name, flags=re.UNICODE).strip("_")
    return cleaned or "case"


def find_raw_dataset(name_or_id: str) -> Path:
    """Resolve ``801`` / ``Dataset801_Name`` / a path to an nnU-Net raw dataset folder."""
    if os.path.isdir(name_or_id):
        return Path(name_or_id)
    raw = env_dir("nnUNet_raw")
    if raw is None:
        raise BadInputError(None, f"dataset {name_or_id}: nnUNet_raw is not set (export nnUNet_raw=/path/to/raw)")
    if not raw.is_dir():
        raise BadInputError(raw, "nnUNet_raw folder does not exist")
    if str(name_or_id).isdigit():
        prefix = f"Dataset{int(name_or_id):03d}_"
        hits = sorted(p for p in raw.iterdir() if p.is_dir() and p.name.startswith(prefix))
        if len(hits) > 1:
            raise BadInputError(raw, f"dataset id {name_or_id} is ambiguous: {', '.join(h.name for h in hits)}")
        if hits:
            return hits[0]
    elif (raw / name_or_id).is_dir():
        return raw / name_or_id
    raise BadInputError(raw / str(name_or_id), f"no nnU-Net raw dataset '{name_or_id}' under nnUNet_raw")


def read_dataset_json(path: Path, missing: str) -> dict:
    """An nnU-Net dataset.json with its channels and file ending; ``missing`` says why the file is needed."""
    if not path.is_file():
        raise BadInputError(path, missing)
    try:
        dataset_json = read_json(path)
    except (ValueError, OSError) as e:
        raise BadInputError(path, f"unreadable dataset.json ({e})") from None
    channels = dataset_json.get("channel_names", dataset_json.get("modality")) \
        if isinstance(dataset_json, dict) else None
    if not isinstance(channels, dict) or not channels or not dataset_json.get("file_ending"):
        raise BadInputError(path, "dataset.json needs 'channel_names' and 'file_ending'")
    return dataset_json


def discover_raw_dataset(folder: Path, id_prefix: str = "") -> tuple[list[CaseSource], dict]:
    """Cases of an nnU-Net raw dataset (imagesTr; labels are ignored) and its dataset.json."""
    dj_path = folder / "dataset.json"
    dataset_json = read_dataset_json(dj_path, "missing dataset.json (required for an nnU-Net raw dataset)")
    channels = dataset_json.get("channel_names", dataset_json.get("modality"))
    ending = dataset_json["file_ending"]
    if file_ending("x" + ending) is None:
        raise BadInputError(dj_path, f"unsupported file_ending '{ending}' (supported: {', '.join(SUPPORTED_ENDINGS)})")
    images = folder / "imagesTr"
    if not images.is_dir():
        raise BadInputError(images, "missing imagesTr folder")
    n_ch = len(channels)
    pattern = re.compile(r"^(.+)_(\d{4})" + re.escape(ending) + "$")
    ids: dict[str, set[int]] = {}
    for f in sorted(os.listdir(images)):
        m = pattern.match(f)
        if m:
            ids.setdefault(m.group(1), set()).add(int(m.group(2)))
        elif not f.startswith("."):
            logger.debug("ignoring %s (does not match <case>_XXXX%s)", images / f, ending)
    if not ids:
        raise BadInputError(images, f"empty folder: no <case>_0000{ending} images")
    cases = []
    for cid, chans in ids.items():
        for c in range(n_ch):
            if c not in chans:
                raise BadInputError(images / f"{cid}_{c:04d}{ending}",
                                    f"missing channel file for case '{cid}' (dataset.json lists {n_ch} channels)")
        files = [[str(images / f"{cid}_{c:04d}{ending}")] for c in range(n_ch)]
        cases.append(CaseSource(sanitize_case_id(id_prefix + cid), files, folder.name, "nnunet_raw"))
    return cases, dataset_json


def _dicom_series(directory: str) -> list[list[str]]:
    reader = sitk.ImageSeriesReader()
    out = []
    for sid in reader.GetGDCMSeriesIDs(directory) or ():
        files = list(reader.GetGDCMSeriesFileNames(directory, sid))
        if files:
            out.append(files)
    return out


def discover_folder(path: Path, id_prefix: str = "") -> list[CaseSource]:
    """Image files and DICOM series below ``path`` (or ``path`` itself if it is a file), one case each."""
    path = Path(path)
    if not path.exists():
        raise BadInputError(path, "path does not exist")
    if path.is_file():
        if file_ending(path.name) is None:
            raise BadInputError(path, f"unsupported extension (supported: {', '.join(SUPPORTED_ENDINGS)}, DICOM folders)")
        stem = path.name[: -len(file_ending(path.name))]
        return [CaseSource(sanitize_case_id(id_prefix + stem), [[str(path)]], str(path.parent), "file")]
    cases: list[CaseSource] = []
    for root, dirs, files in os.walk(path):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        rel = os.path.relpath(root, path)
        maybe_dicom = False
        for f in sorted(files):
            if f.startswith("."):
                continue
            e = file_ending(f)
            if e is not None:
                if e == ".nii" and os.path.exists(os.path.join(root, f + ".gz")):
                    continue
                cases.append(CaseSource(sanitize_case_id(id_prefix + f[: -len(e)]), [[os.path.join(root, f)]],
                                        str(path), "file"))
            elif f.lower().endswith(".dcm") or "." not in f:
                maybe_dicom = True
            elif not f.lower().endswith(_IGNORED_ENDINGS):
                logger.info("skipping %s: unsupported extension", os.path.join(root, f))
        if maybe_dicom:
            series = _dicom_series(root)
            base = path.name if rel == "." else rel
            for i, files_of_series in enumerate(series):
                suffix = f"_s{i}" if len(series) > 1 else ""
                cases.append(CaseSource(sanitize_case_id(id_prefix + base + suffix), [files_of_series], str(path),
                                        "dicom"))
    if not cases:
        raise BadInputError(path, f"empty folder: no {', '.join(SUPPORTED_ENDINGS)} files or DICOM series found")
    return cases


def check_unique_ids(cases: Sequence[CaseSource]) -> list[tuple[CaseSource, BadInputError]]:
    """Second and later cases sharing an id, each with the error that names both files."""
    seen: dict[str, CaseSource] = {}
    dupes = []
    for c in cases:
        if c.case_id in seen:
            dupes.append((c, BadInputError(c.first_file, f"duplicate case id '{c.case_id}' "
                                                         f"(also used by {seen[c.case_id].first_file})")))
        else:
            seen[c.case_id] = c
    return dupes


def discover_inputs(datasets: Sequence[str] = (), folders: Sequence[str] = (),
                    manifests: Sequence[str] = ()) -> tuple[list[CaseSource], dict]:
    """All cases of all inputs, merged into one pool, and the channel names of the pool.

    With more than one input, case ids get a prefix of their input's name so that pools merged from
    datasets with the same naming scheme do not collide (nnssl manifest ids already start with their
    collection's name).
    """
    n_inputs = len(datasets) + len(folders) + len(manifests)
    if n_inputs == 0:
        raise BadInputError(None, "no input: pass -d DATASET [...], -i FOLDER [...] and/or --manifest JSON [...]")
    cases: list[CaseSource] = []
    channel_names: dict | None = None
    for d in datasets:
        folder = find_raw_dataset(str(d))
        prefix = f"{folder.name}__" if n_inputs > 1 else ""
        c, dj = discover_raw_dataset(folder, prefix)
        names = {str(k): v for k, v in dj.get("channel_names", dj.get("modality")).items()}
        if channel_names is not None and len(names) != len(channel_names):
            raise BadInputError(folder / "dataset.json",
                                f"has {len(names)} channels but earlier inputs have {len(channel_names)}")
        channel_names = channel_names or names
        cases += c
    for f in folders:
        prefix = f"{sanitize_case_id(Path(f).name)}__" if n_inputs > 1 else ""
        c = discover_folder(Path(f), prefix)
        if channel_names is not None and len(channel_names) != 1:
            raise BadInputError(f, f"plain folders hold single-channel images but other inputs have "
                                   f"{len(channel_names)} channels")
        cases += c
    if manifests:
        from ssl3d.data.nnssl_manifest import manifest_channel_name, read_manifest

        listed = [c for m in manifests for c in read_manifest(m)[0]]
        if channel_names is not None and len(channel_names) != 1:
            raise BadInputError(manifests[0], f"nnssl manifests list single-channel images but other inputs have "
                                              f"{len(channel_names)} channels")
        channel_names = channel_names or {"0": manifest_channel_name(listed)}
        cases += listed
    if channel_names is None:
        channel_names = {"0": "unknown"}
    return cases, channel_names


def _read_one(files: list[str], kind: str) -> sitk.Image:
    shown = os.path.dirname(files[0]) if kind == "dicom" else files[0]
    if kind != "dicom" and not os.path.isfile(files[0]):
        raise BadInputError(shown, "file does not exist")
    try:
        if kind == "dicom":
            reader = sitk.ImageSeriesReader()
            reader.SetFileNames(files)
            img = reader.Execute()
        else:
            if files[0].lower().endswith((".nii", ".nii.gz")):
                check_nifti(files[0])
            # Header first: zero-size and >3D files are named precisely instead of failing inside the reader.
            info = sitk.ImageFileReader()
            info.SetFileName(files[0])
            info.ReadImageInformation()
            if any(s == 0 for s in info.GetSize()):
                raise BadInputError(shown, f"zero-size image (size {info.GetSize()})")
            img = sitk.ReadImage(files[0])
    except RuntimeError as e:
        msg = next((ln.strip() for ln in str(e).splitlines() if ln.strip() and "Exception" not in ln), str(e))
        raise BadInputError(shown, f"unreadable or truncated file ({msg[:160]})") from None
    dim = img.GetDimension()
    size = img.GetSize()
    if any(s == 0 for s in size):
        raise BadInputError(shown, f"zero-size image (size {size})")
    if dim == 2 or (dim == 3 and min(size) == 1):
        raise BadInputError(shown, f"2D image (size {size}); ssl3d pretrains on 3D volumes")
    if dim > 3:
        raise BadInputError(shown, f"{dim}D image (size {size}); split it into one 3D file per channel")
    if img.GetNumberOfComponentsPerPixel() > 1:
        raise BadInputError(shown, f"4D image stored as {img.GetNumberOfComponentsPerPixel()} components per voxel "
                                   f"(size {size}); split it into one 3D file per channel")
    return img


def read_image(path: str | os.PathLike) -> sitk.Image:
    """One 3D image file with every check of the pool reader (truncated, zero-size, 2D, 4D, unreadable)."""
    return _read_one([str(path)], "file")


def _geometry(img: sitk.Image) -> dict:
    return {"spacing": list(img.GetSpacing()), "origin": list(img.GetOrigin()), "direction": list(img.GetDirection())}


def geometry_problems(img: sitk.Image, ref: sitk.Image) -> list[str]:
    """How the voxel grid of ``img`` differs from ``ref`` (size, spacing, direction, origin); empty if it does not."""
    problems = []
    if img.GetSize() != ref.GetSize():
        problems.append(f"size {img.GetSize()} vs {ref.GetSize()}")
    if not np.allclose(img.GetSpacing(), ref.GetSpacing(), rtol=1e-4, atol=1e-6):
        problems.append(f"spacing {img.GetSpacing()} vs {ref.GetSpacing()}")
    if not np.allclose(img.GetDirection(), ref.GetDirection(), atol=1e-4):
        problems.append("direction differs")
    if not np.allclose(img.GetOrigin(), ref.GetOrigin(), atol=1e-3 * max(ref.GetSpacing())):
        problems.append(f"origin {img.GetOrigin()} vs {ref.GetOrigin()}")
    return problems


def read_case_images(case: CaseSource) -> list[sitk.Image]:
    """Every channel of a case as read from disk, validated: each file readable and 3D, one geometry for all
    channels, no NaN/Inf, not constant. What every command that reads images goes through first."""
    images = [_read_one(f, case.kind) for f in case.channel_files]
    ref = images[0]
    shown = _shown_files(case)
    for i, img in enumerate(images[1:], start=1):
        problems = geometry_problems(img, ref)
        if problems:
            raise BadInputError(shown[i], f"channel {i} geometry differs from channel 0 ({'; '.join(problems)})")
    for i, img in enumerate(images):
        arr = sitk.GetArrayViewFromImage(img)
        finite = np.isfinite(arr) if arr.dtype.kind == "f" else None
        if finite is not None and not finite.all():
            raise BadInputError(shown[i], f"contains NaN/Inf voxels ({int((~finite).sum())} of {arr.size})")
        lo, hi = arr.min(), arr.max()
        if lo == hi:
            raise BadInputError(shown[i], f"constant image (every voxel is {float(lo):g})")
    return images


def _shown_files(case: CaseSource) -> list[str]:
    return [os.path.dirname(f[0]) if case.kind == "dicom" else f[0] for f in case.channel_files]


def read_case(case: CaseSource, reorient: bool = True) -> tuple[np.ndarray, dict]:
    """Read and validate every channel of a case (:func:`read_case_images`).

    Returns ``(data, properties)``: ``data`` is float32 (C, Z, Y, X) in the canonical orientation (when
    ``reorient``), ``properties`` holds the numpy-order spacing, the geometry before and after reorienting.
    """
    images = read_case_images(case)
    original = _geometry(images[0])
    if reorient:
        images = [sitk.DICOMOrient(img, CANONICAL_ORIENTATION) for img in images]
    data = np.stack([sitk.GetArrayViewFromImage(img).astype(np.float32) for img in images])
    geom = _geometry(images[0])
    props = {
        "spacing": [float(s) for s in geom["spacing"][::-1]],
        "sitk_stuff": geom,
        "original_sitk_stuff": original,
        "original_orientation": sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(original["direction"]),
        "source_files": _shown_files(case),
    }
    return data, props
