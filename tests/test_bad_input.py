"""Every bad input gets one line naming the file, exit code 2, no traceback and no output written."""
import gzip
import json
import struct

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import ct_volume, make_raw_dataset, write_image
from ssl3d.cli.plan_and_preprocess import main


def run(capsys, args):
    rc = main(args + ["-np", "1", "--no-progress"])
    err = capsys.readouterr().err
    return rc, err


def assert_bad(rc, err, out_root, needle, problem):
    assert rc == 2, err
    assert "Traceback" not in err
    errors = [ln for ln in err.splitlines() if ": error: " in ln]
    assert len(errors) == 1, err
    assert needle in errors[0] and problem in errors[0], errors[0]
    assert not any(out_root.iterdir()), "bad input must leave no output behind"


def folder_with(tmp_path, name, array=None, **kw):
    d = tmp_path / "scans"
    write_image(d / "good.nii.gz", ct_volume(1))
    if array is not None:
        write_image(d / name, array, **kw)
    return d


def zero_size_nifti(path):
    # NIfTI-1 header with dim = [3, 8, 8, 0]: SimpleITK cannot build such an image, so write the header by hand.
    hdr = bytearray(348)
    struct.pack_into("<i", hdr, 0, 348)
    struct.pack_into("<8h", hdr, 40, 3, 8, 8, 0, 1, 1, 1, 1)
    struct.pack_into("<hh", hdr, 70, 4, 16)  # datatype int16, bitpix
    struct.pack_into("<8f", hdr, 76, 1, 1, 1, 1, 1, 1, 1, 1)
    struct.pack_into("<f", hdr, 108, 352.0)
    hdr[344:348] = b"n+1\0"
    with gzip.open(path, "wb") as f:
        f.write(bytes(hdr) + b"\0\0\0\0")


CASES = {
    "2d": (lambda p: write_image(p, np.arange(64, dtype=np.int16).reshape(8, 8)), "2D image"),
    "4d": (lambda p: write_image(p, np.arange(4 * 5 * 6 * 7, dtype=np.int16).reshape(4, 5, 6, 7)), "4D image"),
    "nan": (lambda p: write_image(p, np.where(np.arange(6 * 7 * 8).reshape(6, 7, 8) == 5, np.nan, 1.0)
                                  .astype(np.float32)), "NaN/Inf"),
    "inf": (lambda p: write_image(p, np.where(np.arange(6 * 7 * 8).reshape(6, 7, 8) == 5, np.inf, 1.0)
                                  .astype(np.float32)), "NaN/Inf"),
    "vector": (lambda p: sitk.WriteImage(sitk.GetImageFromArray(
        np.arange(6 * 7 * 8 * 3, dtype=np.int16).reshape(6, 7, 8, 3), isVector=True), str(p)), "4D image"),
    "constant": (lambda p: write_image(p, np.full((6, 7, 8), 3, np.int16)), "constant image"),
    "zero": (zero_size_nifti, "zero-size image"),
}


@pytest.mark.parametrize("kind", sorted(CASES))
def test_bad_image_content(tmp_path, capsys, kind):
    d = tmp_path / "scans"
    write_image(d / "good.nii.gz", ct_volume(1))
    make, problem = CASES[kind]
    make(d / "bad.nii.gz")
    out = tmp_path / "out"
    out.mkdir()
    rc, err = run(capsys, ["-i", str(d), "-o", str(out)])
    assert_bad(rc, err, out, "bad.nii.gz", problem)


def test_truncated_file(tmp_path, capsys):
    d = tmp_path / "scans"
    write_image(d / "good.nii.gz", ct_volume(1))
    p = write_image(d / "trunc.nii.gz", ct_volume(2))
    raw = p.read_bytes()
    p.write_bytes(raw[: len(raw) // 2])
    out = tmp_path / "out"
    out.mkdir()
    rc, err = run(capsys, ["-i", str(d), "-o", str(out)])
    assert_bad(rc, err, out, "trunc.nii.gz", "unreadable or truncated")


def test_channels_with_different_geometry(tmp_path, capsys, nnunet_env):
    ds = make_raw_dataset(nnunet_env["nnUNet_raw"], n=2, n_channels=2)
    write_image(ds / "imagesTr" / "case001_0001.nii.gz", ct_volume(5), spacing=(1.0, 1.0, 3.0))
    rc, err = run(capsys, ["-d", "801"])
    assert_bad(rc, err, nnunet_env["nnUNet_preprocessed"], "case001_0001.nii.gz", "geometry differs")


def test_missing_dataset_json(tmp_path, capsys, nnunet_env):
    ds = make_raw_dataset(nnunet_env["nnUNet_raw"], n=2)
    (ds / "dataset.json").unlink()
    rc, err = run(capsys, ["-d", "801"])
    assert_bad(rc, err, nnunet_env["nnUNet_preprocessed"], "dataset.json", "missing dataset.json")


def test_missing_channel_file(tmp_path, capsys, nnunet_env):
    ds = make_raw_dataset(nnunet_env["nnUNet_raw"], n=2, n_channels=2)
    (ds / "imagesTr" / "case001_0001.nii.gz").unlink()
    rc, err = run(capsys, ["-d", "Dataset801_Test"])
    assert_bad(rc, err, nnunet_env["nnUNet_preprocessed"], "case001_0001.nii.gz", "missing channel file")


def test_duplicate_case_ids(tmp_path, capsys):
    d = tmp_path / "scans"
    write_image(d / "a" / "scan.nii.gz", ct_volume(1))
    write_image(d / "b" / "scan.nii.gz", ct_volume(2))
    out = tmp_path / "out"
    out.mkdir()
    rc, err = run(capsys, ["-i", str(d), "-o", str(out)])
    assert_bad(rc, err, out, "b/scan.nii.gz", "duplicate case id 'scan'")


def test_unsupported_extension(tmp_path, capsys):
    p = tmp_path / "scan.png"
    p.write_bytes(b"\x89PNG....")
    out = tmp_path / "out"
    out.mkdir()
    rc, err = run(capsys, ["-i", str(p), "-o", str(out)])
    assert_bad(rc, err, out, "scan.png", "unsupported extension")


def test_nonexistent_path(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    rc, err = run(capsys, ["-i", str(tmp_path / "nope"), "-o", str(out)])
    assert_bad(rc, err, out, "nope", "does not exist")


def test_empty_folder(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    out = tmp_path / "out"
    out.mkdir()
    rc, err = run(capsys, ["-i", str(tmp_path / "empty"), "-o", str(out)])
    assert_bad(rc, err, out, "empty", "empty folder")


def test_unknown_dataset_id(capsys, nnunet_env):
    rc, err = run(capsys, ["-d", "999"])
    assert_bad(rc, err, nnunet_env["nnUNet_preprocessed"], "999", "no nnU-Net raw dataset")


def test_spaces_and_non_ascii_paths_work(tmp_path, capsys):
    d = tmp_path / "my scans" / "Müller Ärzte"
    write_image(d / "pätient 1.nii.gz", ct_volume(1))
    write_image(d / "scan two.nii.gz", ct_volume(2))
    out = tmp_path / "out put"
    rc, err = run(capsys, ["-i", str(tmp_path / "my scans"), "-o", str(out), "--verify"])
    assert rc == 0, err
    data = out / "Dataset900_SSLPool" / "ssl3dPlans_3d_fullres"
    assert sorted(p.name for p in data.glob("*.pkl")) == ["pätient_1.pkl", "scan_two.pkl"]


def test_skip_bad_continues_and_reports(tmp_path, capsys):
    d = tmp_path / "scans"
    write_image(d / "good.nii.gz", ct_volume(1))
    write_image(d / "good2.nii.gz", ct_volume(3))
    write_image(d / "flat.nii.gz", np.full((6, 7, 8), 3, np.int16))
    out = tmp_path / "out"
    rc, err = run(capsys, ["-i", str(d), "-o", str(out), "--skip-bad"])
    assert rc == 0, err
    pool = out / "Dataset900_SSLPool"
    report = json.loads((pool / "skipped_cases.json").read_text())
    assert list(report) == ["flat"] and "constant image" in report["flat"]
    manifest = json.loads((pool / "manifest.json").read_text())
    assert sorted(c["case_id"] for c in manifest["cases"]) == ["good", "good2"]
    assert sorted(p.stem for p in (pool / "ssl3dPlans_3d_fullres").glob("*.pkl")) == ["good", "good2"]


@pytest.mark.parametrize("ending", [".nii", ".nrrd", ".mha"])
def test_truncated_other_formats(tmp_path, capsys, ending):
    d = tmp_path / "scans"
    write_image(d / "good.nii.gz", ct_volume(1))
    p = write_image(d / f"trunc{ending}", ct_volume(2))
    raw = p.read_bytes()
    p.write_bytes(raw[: len(raw) // 2])
    out = tmp_path / "out"
    out.mkdir()
    rc, err = run(capsys, ["-i", str(d), "-o", str(out)])
    assert_bad(rc, err, out, f"trunc{ending}", "unreadable or truncated")
