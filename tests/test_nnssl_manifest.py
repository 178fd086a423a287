"""nnssl pretrain_data.json manifests as ssl_plan_and_preprocess input: collections -> ... -> images, root
variables, relative paths, anatomy masks as the body mask, one-line errors."""
import json
import os
import pickle

import blosc2
import numpy as np
import pytest
from conftest import ct_volume, write_image

from ssl3d.cli.plan_and_preprocess import main as plan_main
from ssl3d.data.nnssl_manifest import read_manifest, resolve_manifest_path
from ssl3d.utils import BadInputError

SHAPE = (8, 24, 20)
SPACING_XYZ = (0.8, 0.8, 4.0)


def _image(name, path_field, modality="CT", mask=None):
    img = {"name": name, "image_path": path_field, "modality": modality, "image_info": {"scanner": "x"},
           "associated_masks": None}
    if mask is not None:
        img["associated_masks"] = {"anonymization_mask": None, "anatomy_mask": mask}
    return img


def _collection(name, index, datasets):
    """``Collection.to_dict()`` layout: datasets -> subjects -> sessions -> images."""
    return {"collection_index": index, "collection_name": name, "datasets": {
        key: {"dataset_index": key, "name": f"ds {key}", "dataset_info": None, "subjects": {
            subj: {"subject_id": subj, "subject_info": {"age": 40}, "sessions": {
                ses: {"session_id": ses, "session_info": None, "images": images}
                for ses, images in sessions.items()}}
            for subj, sessions in subjects.items()}}
        for key, subjects in datasets.items()}}


@pytest.fixture
def two_collections(tmp_path, monkeypatch):
    """Collection A under $nnssl_raw (a relative root: resolved from the working directory), two datasets;
    collection B with paths relative to its manifest and an anatomy mask on one image."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("nnssl_raw", "raw")
    raw = tmp_path / "raw" / "Dataset001_A"
    for i, rel in enumerate(["ds1/sub-01/ses-1/ct.nii.gz", "ds1/sub-02/ses-1/ct.nii.gz", "ds2/sub-01/ses-a/ct.nii.gz"]):
        write_image(raw / rel, ct_volume(i, SHAPE), SPACING_XYZ)
    a = _collection("Dataset001_A", 1, {
        "ds1": {"sub-01": {"ses-1": [_image("ct.nii.gz", "$nnssl_raw/Dataset001_A/ds1/sub-01/ses-1/ct.nii.gz")]},
                "sub-02": {"ses-1": [_image("ct.nii.gz", "$nnssl_raw/Dataset001_A/ds1/sub-02/ses-1/ct.nii.gz")]}},
        "ds2": {"sub-01": {"ses-a": [_image("ct.nii.gz", "$nnssl_raw/Dataset001_A/ds2/sub-01/ses-a/ct.nii.gz")]}}})
    (raw / "pretrain_data.json").write_text(json.dumps(a))
    b_dir = tmp_path / "elsewhere" / "B"
    write_image(b_dir / "imgs" / "scan.nii.gz", ct_volume(7, SHAPE), SPACING_XYZ)
    box = np.zeros(SHAPE, np.uint8)
    box[2:6, 5:18, 4:15] = 1  # an anatomy mask no intensity rule would produce
    write_image(b_dir / "imgs" / "scan_anat.nii.gz", box, SPACING_XYZ)
    b = _collection("Dataset002_B", 2, {
        "7": {"sub-9": {"1": [_image("scan.nii.gz", "imgs/scan.nii.gz", mask="imgs/scan_anat.nii.gz")]}}})
    (b_dir / "pretrain_data.json").write_text(json.dumps(b))
    return {"a": raw / "pretrain_data.json", "b": b_dir / "pretrain_data.json", "box": box, "root": tmp_path}


def test_relative_root_and_relative_paths_resolve(two_collections, monkeypatch):
    cases, name = read_manifest(two_collections["a"])
    assert name == "Dataset001_A" and len(cases) == 3
    assert cases[0].case_id == "Dataset001_A__ds1__sub-01__ses-1__ct"
    assert cases[0].channel_files[0][0] == str(two_collections["root"] / "raw/Dataset001_A/ds1/sub-01/ses-1/ct.nii.gz")
    (case,) = read_manifest(two_collections["b"])[0]
    assert case.extra["anatomy_mask"] == str(two_collections["b"].parent / "imgs/scan_anat.nii.gz")
    monkeypatch.delenv("nnssl_raw")
    with pytest.raises(BadInputError, match="needs the root variable nnssl_raw"):
        resolve_manifest_path("$nnssl_raw/x.nii.gz", two_collections["a"])


def test_two_collections_become_one_pool_with_the_anatomy_mask_as_body(two_collections, capsys):
    out = two_collections["root"] / "pre"
    rc = plan_main(["--manifest", str(two_collections["a"]), str(two_collections["b"]), "-o", str(out), "-od", "950",
                    "-np", "1", "--no-progress", "--spacing", "4.0", "0.8", "0.8", "--patch-size", "8", "16", "16"])
    assert rc == 0, capsys.readouterr().err
    pool = out / "Dataset950_SSLPool"
    manifest = json.loads((pool / "manifest.json").read_text())
    ids = sorted(c["case_id"] for c in manifest["cases"])
    assert ids == ["Dataset001_A__ds1__sub-01__ses-1__ct", "Dataset001_A__ds1__sub-02__ses-1__ct",
                   "Dataset001_A__ds2__sub-01__ses-a__ct", "Dataset002_B__7__sub-9__1__scan"]
    assert json.loads((pool / "dataset.json").read_text())["channel_names"] == {"0": "CT"}
    data_dir = pool / "ssl3dPlans_3d_fullres"
    cid = "Dataset002_B__7__sub-9__1__scan"
    seg = blosc2.open(str(data_dir / f"{cid}_seg.b2nd"), mode="r")[:]
    props = pickle.loads((data_dir / f"{cid}.pkl").read_bytes())
    assert props["shape_after_resampling"] == SHAPE  # same spacing, nothing cropped: the mask maps 1:1
    np.testing.assert_array_equal(seg[0], two_collections["box"].astype(np.int8))
    other = blosc2.open(str(data_dir / "Dataset001_A__ds1__sub-01__ses-1__ct_seg.b2nd"), mode="r")[:]
    assert other.sum() > two_collections["box"].sum()  # the intensity rule (body outline), not a box
    # a replaced anatomy mask is picked up by a rerun (the plans are unchanged); the other cases are kept
    smaller = two_collections["box"].copy()
    smaller[:, :, 10:] = 0
    write_image(two_collections["b"].parent / "imgs" / "scan_anat.nii.gz", smaller, SPACING_XYZ)
    os.utime(two_collections["b"].parent / "imgs" / "scan_anat.nii.gz", (1e9, 1e9))
    rc = plan_main(["--manifest", str(two_collections["a"]), str(two_collections["b"]), "-o", str(out), "-od", "950",
                    "-np", "1", "--no-progress", "--spacing", "4.0", "0.8", "0.8", "--patch-size", "8", "16", "16"])
    assert rc == 0
    seg = blosc2.open(str(data_dir / f"{cid}_seg.b2nd"), mode="r")[:]
    np.testing.assert_array_equal(seg[0], smaller.astype(np.int8))


def test_missing_file_is_one_line_and_writes_nothing(two_collections, capsys):
    (two_collections["root"] / "raw/Dataset001_A/ds2/sub-01/ses-a/ct.nii.gz").unlink()
    out = two_collections["root"] / "pre"
    rc = plan_main(["--manifest", str(two_collections["a"]), "-o", str(out), "-np", "1", "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert "ds2/sub-01/ses-a/ct.nii.gz" in err and "does not exist" in err
    assert not any(out.rglob("*.json")) if out.exists() else True
