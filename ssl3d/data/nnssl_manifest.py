"""nnssl's ``pretrain_data.json`` (MIC-DKFZ/nnssl ``Collection.to_dict``) as pool cases.

One file is one collection::

    {"collection_index": 745, "collection_name": "Dataset745_OpenMind",
     "datasets": {"<key>": {"dataset_index": "ds000001", "name": ..., "dataset_info": ...,
        "subjects": {"<subject>": {"subject_info": ..., "sessions": {"<session>": {"session_info": ...,
            "images": [{"name": "sub-01_T1w.nii.gz", "image_path": "$nnssl_raw/.../sub-01_T1w.nii.gz",
                        "modality": "T1w", "image_info": ...,
                        "associated_masks": {"anonymization_mask": ..., "anatomy_mask": ...}}]}}}}}}}

Paths are resolved like nnssl's ``resolve_relative_paths``: a first component ``$VAR`` is the environment
variable ``VAR`` (nnssl writes ``$nnssl_raw``); other relative paths are taken relative to the manifest's
folder (nnssl would use the working directory, which a moved manifest does not survive). Each image is one
single-channel case (nnssl treats every image independently), id ``collection__dataset__subject__session__image``
as nnssl's ``get_unique_id``; an ``anatomy_mask`` travels in ``CaseSource.extra`` and becomes the body mask.
Every problem (unreadable file, missing key, unset variable, missing image or mask) is one line naming it.
"""
from __future__ import annotations

import os
from pathlib import Path

from ssl3d.data.readers import CaseSource, file_ending, sanitize_case_id, SUPPORTED_ENDINGS
from ssl3d.utils import BadInputError, read_json

ANATOMY_MASK = "anatomy_mask"


def resolve_manifest_path(path: str, manifest: Path) -> Path:
    """``$VAR/rest`` from the environment, a relative path from the manifest's folder, an absolute one as is."""
    first, _, rest = str(path).partition("/")
    if first.startswith("$"):
        root = os.environ.get(first[1:])
        if not root:
            raise BadInputError(manifest, f"path {path!r} needs the root variable {first[1:]} "
                                          f"(export {first[1:]}=/path/to/its/root)")
        root_path = Path(root)
        if not root_path.is_absolute():
            root_path = Path.cwd() / root_path
        return root_path / rest if rest else root_path
    p = Path(path)
    return p if p.is_absolute() else manifest.parent / p


def _mapping(node, what: str, manifest: Path) -> dict:
    if not isinstance(node, dict):
        raise BadInputError(manifest, f"{what} must be a JSON object, got {type(node).__name__}")
    return node


def _image_file(value, what: str, manifest: Path, kind: str) -> Path:
    if not isinstance(value, str) or not value:
        raise BadInputError(manifest, f"{what}: no {kind} path")
    p = resolve_manifest_path(value, manifest)
    if file_ending(p.name) is None:
        raise BadInputError(p, f"{kind} listed in {manifest} has an unsupported extension "
                               f"(supported: {', '.join(SUPPORTED_ENDINGS)})")
    if not p.is_file():
        raise BadInputError(p, f"{kind} listed in {manifest} ({what}) does not exist")
    return p


def read_manifest(path: str | os.PathLike) -> tuple[list[CaseSource], str]:
    """``(cases, collection name)`` of one nnssl manifest; every image and anatomy mask checked to exist."""
    manifest = Path(path)
    if not manifest.is_file():
        raise BadInputError(manifest, "manifest (pretrain_data.json) does not exist")
    try:
        data = read_json(manifest)
    except (ValueError, OSError) as e:
        raise BadInputError(manifest, f"unreadable manifest ({e})") from None
    data = _mapping(data, "the manifest", manifest)
    if "datasets" not in data:
        raise BadInputError(manifest, "not an nnssl pretrain_data.json (no 'datasets')")
    collection = sanitize_case_id(str(data.get("collection_name") or manifest.parent.name))
    cases = []
    for ds_key, ds in _mapping(data["datasets"], "'datasets'", manifest).items():
        ds = _mapping(ds, f"dataset {ds_key}", manifest)
        ds_id = str(ds.get("dataset_index", ds_key))
        for subject, subj in _mapping(ds.get("subjects", {}), f"dataset {ds_key} 'subjects'", manifest).items():
            sessions = _mapping(_mapping(subj, f"subject {subject}", manifest).get("sessions", {}),
                                f"subject {subject} 'sessions'", manifest)
            for session, sess in sessions.items():
                images = _mapping(sess, f"session {subject}/{session}", manifest).get("images", [])
                if not isinstance(images, list):
                    raise BadInputError(manifest, f"session {subject}/{session}: 'images' must be a list")
                for img in images:
                    img = _mapping(img, f"an image of session {subject}/{session}", manifest)
                    where = f"{ds_key}/{subject}/{session}/{img.get('name', '?')}"
                    file = _image_file(img.get("image_path"), where, manifest, "image")
                    name = str(img.get("name") or file.name)
                    stem = name[: -len(file_ending(name))] if file_ending(name) else name
                    extra = {"modality": img.get("modality"), "collection": collection, "dataset": ds_id,
                             "subject": str(subject), "session": str(session)}
                    masks = img.get("associated_masks") or {}
                    if masks.get(ANATOMY_MASK):
                        extra[ANATOMY_MASK] = str(_image_file(masks[ANATOMY_MASK], where, manifest, "anatomy mask"))
                    cid = sanitize_case_id(f"{collection}__{ds_id}__{subject}__{session}__{stem}")
                    cases.append(CaseSource(cid, [[str(file)]], f"{manifest}:{collection}", "file", extra))
    if not cases:
        raise BadInputError(manifest, "manifest lists no images")
    return cases, collection


def manifest_channel_name(cases: list[CaseSource]) -> str:
    """The pool's one channel name: the images' shared modality; several MRI sequences (T1w, T2w, FLAIR ...)
    are "MRI". CT mixed with anything else is one line: one pool normalizes one modality per channel."""
    names = sorted({str(c.extra.get("modality") or "unknown") for c in cases})
    if len(names) == 1:
        return names[0]
    if any(n.lower().startswith("ct") for n in names):
        raise BadInputError(None, f"nnssl manifests mix CT with other modalities ({', '.join(names)}); "
                                  f"plan them as separate pools")
    return "MRI"
