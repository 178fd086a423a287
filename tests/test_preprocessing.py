"""Readers, preprocessing, resampling round trip, resume after a kill, agreement with nnU-Net's fingerprint."""
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import blosc2
import numpy as np
import pytest
import SimpleITK as sitk

from conftest import ct_volume, make_raw_dataset, write_image
from nnunetv2.preprocessing.resampling.default_resampling import resample_data_or_seg_to_shape
from ssl3d.data.readers import discover_inputs, read_case
from ssl3d.planning.fingerprint import aggregate_fingerprint, run_fingerprints
from ssl3d.preprocessing.pipeline import PlanOptions, plan_and_preprocess
from ssl3d.preprocessing.preprocessor import preprocess_array, verify_outputs

BIN = Path(sys.executable).parent


def write_dicom_series(folder: Path, array: np.ndarray, spacing=(0.7, 0.7, 2.5)):
    folder.mkdir(parents=True, exist_ok=True)
    uid = "1.2.826.0.1.3680043.2.1125.1.4242"
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for z in range(array.shape[0]):
        sl = sitk.GetImageFromArray(array[z:z + 1].astype(np.int16))
        sl.SetSpacing(spacing)
        for tag, value in {"0020|000e": uid, "0020|000d": uid + ".1", "0008|0060": "CT",
                           "0020|0032": f"0\\0\\{z * spacing[2]}", "0020|0037": "1\\0\\0\\0\\1\\0",
                           "0020|0013": str(z), "0028|0030": f"{spacing[1]}\\{spacing[0]}",
                           "0018|0050": str(spacing[2]), "0008|0018": f"{uid}.2.{z}"}.items():
            sl.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"IM{z:04d}.dcm"))
        writer.Execute(sl)


def test_dicom_series_is_one_case(tmp_path):
    vol = ct_volume(3, (12, 32, 30))
    write_dicom_series(tmp_path / "patient" / "series1", vol)
    cases, _ = discover_inputs(folders=[str(tmp_path)])
    assert len(cases) == 1 and cases[0].kind == "dicom" and len(cases[0].channel_files[0]) == 12
    data, props = read_case(cases[0])
    assert data.shape == (1, 12, 32, 30)
    assert props["spacing"] == pytest.approx([2.5, 0.7, 0.7])
    assert np.array_equal(data[0], vol.astype(np.float32))


def test_reorientation_makes_permuted_scans_consistent(tmp_path):
    vol = ct_volume(1, (10, 30, 24))
    write_image(tmp_path / "a.nii.gz", vol, spacing=(0.8, 0.8, 4.0))
    # same anatomy stored with the slice axis first in the file and a direction that says so
    perm = np.ascontiguousarray(np.transpose(vol, (2, 1, 0)))  # (x, y, z) array order
    write_image(tmp_path / "b.nii.gz", perm, spacing=(4.0, 0.8, 0.8), direction=(0, 0, 1, 0, 1, 0, 1, 0, 0))
    cases, _ = discover_inputs(folders=[str(tmp_path)])
    (a, pa), (b, pb) = (read_case(c) for c in cases)
    assert pa["spacing"] == pytest.approx([4.0, 0.8, 0.8])
    assert pb["spacing"] == pytest.approx([4.0, 0.8, 0.8])
    assert np.array_equal(a, b)


def test_merged_inputs_get_prefixed_ids(tmp_path, nnunet_env):
    make_raw_dataset(nnunet_env["nnUNet_raw"], 801, "A", n=2)
    write_image(tmp_path / "extra" / "case000.nii.gz", ct_volume(9))
    cases, _ = discover_inputs(datasets=["801"], folders=[str(tmp_path / "extra")])
    assert [c.case_id for c in cases] == ["Dataset801_A__case000", "Dataset801_A__case001", "extra__case000"]


def test_resampling_round_trip_and_normalization(tmp_path):
    write_image(tmp_path / "x.nii.gz", ct_volume(2, (14, 48, 44)), spacing=(0.8, 0.8, 3.0))
    cases, names = discover_inputs(folders=[str(tmp_path)])
    from ssl3d.planning.planner import build_plans

    fp = aggregate_fingerprint(run_fingerprints(cases, ["CT"], progress=False)[0], names)
    plans = build_plans(fp, "Dataset900_X", spacing=[1.5, 1.2, 1.2], patch_voxels=16 ** 3)
    data, props = read_case(cases[0])
    out, seg, p = preprocess_array(data.copy(), props, plans, "3d_fullres")
    assert out.shape[1:] == (28, 32, 29) and seg.shape == out.shape
    assert set(np.unique(seg)) <= {-1, 0, 1} and (seg == 1).mean() > 0.3
    fg = fp["foreground_intensity_properties_per_channel"]["0"]
    lo, hi = [(fg[k] - fg["mean"]) / fg["std"] for k in ("percentile_00_5", "percentile_99_5")]
    assert out.min() >= lo - 0.05 and out.max() <= hi + 0.05
    back = resample_data_or_seg_to_shape(out, p["shape_after_cropping_and_before_resampling"], [1.5, 1.2, 1.2],
                                         [3.0, 0.8, 0.8], is_seg=False, order=1, order_z=0, force_separate_z=None)
    ref = np.clip(data, fg["percentile_00_5"], fg["percentile_99_5"])
    ref = (ref - fg["mean"]) / fg["std"]
    err = np.abs(back - ref)[:, 1:-1, 2:-2, 2:-2]
    assert np.median(err) < 0.15 and np.corrcoef(back.ravel(), ref.ravel())[0, 1] > 0.95


def test_fingerprint_agrees_with_nnunet(tmp_path, nnunet_env):
    make_raw_dataset(nnunet_env["nnUNet_raw"], 801, "Lab", n=3, labels=True, spacing=(0.7, 0.75, 3.0))
    from nnunetv2.experiment_planning.dataset_fingerprint.fingerprint_extractor import DatasetFingerprintExtractor

    ref = DatasetFingerprintExtractor(801, num_processes=1, verbose=False).run()
    res = plan_and_preprocess(PlanOptions(datasets=["801"], num_processes=1, progress=False,
                                          output_dataset="Dataset901_Ours"))
    import json

    ours = json.loads((res.dataset_dir / "dataset_fingerprint.json").read_text())
    assert np.allclose(np.median(ours["spacings"], 0), np.median(ref["spacings"], 0))
    assert sorted(map(tuple, ours["shapes_after_crop"])) == sorted(map(tuple, ref["shapes_after_crop"]))
    assert ours["median_relative_size_after_cropping"] == pytest.approx(ref["median_relative_size_after_cropping"])


def _pool(tmp_path, n):
    for i in range(n):
        write_image(tmp_path / "scans" / f"s{i:02d}.nii.gz", ct_volume(i, (20, 64, 60)))
    return tmp_path / "scans"


def test_resume_after_kill(tmp_path):
    scans = _pool(tmp_path, 10)
    out = tmp_path / "pre"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    args = [str(BIN / "ssl_plan_and_preprocess"), "-i", str(scans), "-o", str(out), "-np", "1",
            "--spacing", "1", "0.4", "0.4", "--no-progress"]
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    data = out / "Dataset900_SSLPool" / "ssl3dPlans_3d_fullres"
    t0 = time.time()
    while time.time() - t0 < 120 and len(list(data.glob("*.pkl"))) < 2:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    n_done = len(list(data.glob("*.pkl")))
    assert 2 <= n_done < 10, "the kill should land mid-run"
    r = subprocess.run(args + ["--verify"], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert f"{n_done} of 10 cases already preprocessed" in r.stderr or f"{n_done + 1} of 10" in r.stderr
    ids = sorted(p.stem for p in data.glob("*.pkl"))
    assert ids == [f"s{i:02d}" for i in range(10)]
    assert not (data / ".partial").exists()
    assert verify_outputs(data, ids, progress=False) == {}
    b = blosc2.open(str(data / "s00.b2nd"), mode="r")
    with open(data / "s00.pkl", "rb") as f:
        props = pickle.load(f)
    assert b.shape[1:] == tuple(props["shape_after_resampling"])


def test_changed_plans_redo_cases(tmp_path):
    scans = _pool(tmp_path, 2)
    opts = dict(folders=[str(scans)], output_root=str(tmp_path / "pre"), num_processes=1, progress=False)
    r1 = plan_and_preprocess(PlanOptions(**opts))
    assert len(r1.preprocessed_now) == 2
    r2 = plan_and_preprocess(PlanOptions(**opts))
    assert r2.preprocessed_now == [] and len(r2.already_done) == 2
    r3 = plan_and_preprocess(PlanOptions(**opts, ct_window=(-175, 250)))
    assert len(r3.preprocessed_now) == 2
    data = blosc2.open(str(r3.data_dir / "s00.b2nd"), mode="r")[:]
    assert data.min() >= 0 and data.max() <= 1
