"""Labeled data goes through ssl3d's readers before nnU-Net sees it: every command that takes labeled images
(ssl_finetune, ssl_finetune_cls, ssl_benchmark, ssl_predict) refuses each bad input with one line naming the
file, exit 2, no traceback and nothing written."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import ct_volume, write_image

LABELED = "Dataset802_Lab"


@pytest.fixture
def pretraining(tiny_pretraining):
    return tiny_pretraining


def make_labeled(raw: Path, n: int = 4, n_channels: int = 1) -> Path:
    folder = raw / LABELED
    for i in range(n):
        for c in range(n_channels):
            write_image(folder / "imagesTr" / f"case{i}_{c:04d}.nii.gz", ct_volume(i + 10 * c))
        write_image(folder / "labelsTr" / f"case{i}.nii.gz", (ct_volume(i) > 20).astype(np.uint8))
    dj = {"channel_names": {str(c): "CT" for c in range(n_channels)}, "labels": {"background": 0, "tissue": 1},
          "numTraining": n, "file_ending": ".nii.gz",
          "ssl3d_case_labels": {f"case{i}": i % 2 for i in range(n)}, "ssl3d_classes": {"0": "a", "1": "b"}}
    (folder / "dataset.json").write_text(json.dumps(dj))
    return folder


def truncate(p: Path) -> None:
    raw = p.read_bytes()
    p.write_bytes(raw[: len(raw) // 2])


def nan_image(p: Path) -> None:
    a = ct_volume(3).astype(np.float32)
    a[2, 3, 4] = np.nan
    write_image(p, a)


IMG = "imagesTr/case1_0000.nii.gz"
LAB = "labelsTr/case1.nii.gz"
# name -> (change to the labeled dataset, file named in the error, words of the problem)
IMAGE_CASES = {
    "truncated image": (lambda d: truncate(d / IMG), IMG, "truncated"),
    "NaN image": (lambda d: nan_image(d / IMG), IMG, "NaN/Inf"),
    "zero-byte image": (lambda d: (d / IMG).write_bytes(b""), IMG, "unreadable or truncated"),
    "text image": (lambda d: (d / IMG).write_text("not an image\n"), IMG, "unreadable or truncated"),
    "2D image": (lambda d: write_image(d / IMG, np.arange(40 * 36, dtype=np.int16).reshape(40, 36)), IMG, "2D image"),
}


def _two_channels(d: Path) -> None:
    for f in sorted((d / "imagesTr").glob("*_0000.nii.gz")):
        shutil.copy(f, f.with_name(f.name.replace("_0000", "_0001")))
    dj = json.loads((d / "dataset.json").read_text())
    dj["channel_names"] = {"0": "CT", "1": "CT"}
    (d / "dataset.json").write_text(json.dumps(dj))


def _label_values(d: Path) -> None:
    write_image(d / LAB, np.where(ct_volume(1) > 20, 5, 0).astype(np.uint8))


DATASET_CASES = {
    "no dataset.json": (lambda d: (d / "dataset.json").unlink(), "dataset.json", "missing dataset.json"),
    "invalid dataset.json": (lambda d: (d / "dataset.json").write_text("{bad"), "dataset.json", "unreadable"),
    "two channels": (_two_channels, "dataset.json", "encoder takes 1"),
}
LABEL_CASES = {
    "no labelsTr": (lambda d: shutil.rmtree(d / "labelsTr"), "labelsTr", "missing labelsTr"),
    "missing label": (lambda d: (d / LAB).unlink(), LAB, "missing label"),
    "label of another shape": (lambda d: write_image(d / LAB, np.zeros((16, 40, 30), np.uint8)), LAB,
                               "label geometry differs"),
    "label values": (_label_values, LAB, "not among dataset.json's labels"),
    "truncated label": (lambda d: truncate(d / LAB), LAB, "truncated"),
}
SEG_CASES = {**IMAGE_CASES, **DATASET_CASES, **LABEL_CASES}
CLS_CASES = {**IMAGE_CASES, **DATASET_CASES}


@pytest.fixture
def env(nnunet_env, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    return nnunet_env


def assert_one_line(rc, err, file, problem):
    assert rc == 2, err
    assert "Traceback" not in err
    errors = [ln for ln in err.splitlines() if ": error: " in ln]
    assert len(errors) == 1, err
    assert file in errors[0] and problem in errors[0], errors[0]


def snapshot(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def run_finetune(env, pretraining, capsys):
    from ssl3d.cli.finetune import main

    rc = main(["-d", LABELED, "-p", str(pretraining), "-device", "cpu", "-np", "1", "--prepare-only"])
    return rc, capsys.readouterr().err


def run_cls(env, pretraining, capsys):
    from ssl3d.cli.finetune_cls import main

    rc = main(["-d", LABELED, "-p", str(pretraining), "-device", "cpu", "-np", "1", "--no-progress"])
    return rc, capsys.readouterr().err


def run_benchmark(env, pretraining, capsys, tiny_pool, out):
    from ssl3d.cli.benchmark import main

    (env["nnUNet_preprocessed"] / tiny_pool.dataset_dir.name).symlink_to(tiny_pool.dataset_dir)
    rc = main(["-u", tiny_pool.dataset_dir.name, "-l", LABELED, "-m", "spark", "-o", str(out), "-device", "cpu",
               "-p", f"spark={pretraining}", "--n-train", "1", "--seeds", "1", "-np", "1", "--no-progress"])
    return rc, capsys.readouterr().err


@pytest.mark.parametrize("kind", sorted(SEG_CASES))
def test_finetune_and_benchmark_refuse_bad_labeled_data(env, pretraining, tiny_pool, capsys, tmp_path, kind):
    d = make_labeled(env["nnUNet_raw"])
    change, file, problem = SEG_CASES[kind]
    change(d)
    before = snapshot(tmp_path)
    rc, err = run_finetune(env, pretraining, capsys)
    assert_one_line(rc, err, file, problem)
    assert snapshot(tmp_path) == before, "ssl_finetune wrote something before refusing"
    out = tmp_path / "bench"
    rc, err = run_benchmark(env, pretraining, capsys, tiny_pool, out)
    assert_one_line(rc, err, file, problem)
    assert not out.exists()


@pytest.mark.parametrize("kind", sorted(CLS_CASES))
def test_finetune_cls_refuses_bad_images(env, pretraining, capsys, tmp_path, kind):
    d = make_labeled(env["nnUNet_raw"])
    change, file, problem = CLS_CASES[kind]
    change(d)
    before = snapshot(tmp_path)
    rc, err = run_cls(env, pretraining, capsys)
    assert_one_line(rc, err, file, problem)
    assert snapshot(tmp_path) == before, "ssl_finetune_cls wrote something before refusing"


def test_benchmark_checks_the_test_set(env, pretraining, tiny_pool, capsys, tmp_path):
    make_labeled(env["nnUNet_raw"])
    test = tmp_path / "test"
    write_image(test / "images" / "t0_0000.nii.gz", ct_volume(7))
    write_image(test / "labels" / "t0.nii.gz", np.zeros((16, 40, 30), np.uint8))
    from ssl3d.cli.benchmark import main

    (env["nnUNet_preprocessed"] / tiny_pool.dataset_dir.name).symlink_to(tiny_pool.dataset_dir)
    rc = main(["-u", tiny_pool.dataset_dir.name, "-l", LABELED, "-m", "spark", "-o", str(tmp_path / "bench"),
               "-device", "cpu", "-p", f"spark={pretraining}", "--n-train", "1", "--seeds", "1", "--test", str(test)])
    assert_one_line(rc, capsys.readouterr().err, "labels/t0.nii.gz", "label geometry differs")
    assert not (tmp_path / "bench").exists()


def test_finetune_on_the_unlabeled_pool_writes_nothing_into_it(env, pretraining, tiny_pool, capsys):
    (env["nnUNet_preprocessed"] / tiny_pool.dataset_dir.name).symlink_to(tiny_pool.dataset_dir)
    before = snapshot(tiny_pool.dataset_dir)
    from ssl3d.cli.finetune import main

    rc = main(["-d", tiny_pool.dataset_dir.name, "-p", str(pretraining), "-device", "cpu", "--prepare-only"])
    assert_one_line(rc, capsys.readouterr().err, tiny_pool.dataset_dir.name, "not a labeled nnU-Net raw dataset")
    assert snapshot(tiny_pool.dataset_dir) == before


def _fake_model(results: Path) -> None:
    """What ssl_predict reads before it predicts: the results folder and its dataset.json."""
    folder = results / LABELED / "SSLFinetuneTrainer__ssl3d_sparkPlans__3d_fullres"
    (folder / "fold_0").mkdir(parents=True)
    (folder / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "labels": {"background": 0},
                                                     "file_ending": ".nii.gz"}))


PREDICT_CASES = {
    **{k: v for k, v in IMAGE_CASES.items()},
    "second channel": (lambda d: shutil.copy(d / IMG, d / "imagesTr/case1_0001.nii.gz"), "case1_0001.nii.gz",
                       "model takes 1 channel"),
}


@pytest.mark.parametrize("kind", sorted(PREDICT_CASES))
def test_predict_refuses_bad_images_before_predicting(env, capsys, tmp_path, kind):
    d = make_labeled(env["nnUNet_raw"], n=2)
    _fake_model(env["nnUNet_results"])
    change, file, problem = PREDICT_CASES[kind]
    change(d)
    from ssl3d.cli.predict import main

    rc = main(["-i", str(d / "imagesTr"), "-o", str(tmp_path / "pred"), "-d", LABELED, "-device", "cpu"])
    assert_one_line(rc, capsys.readouterr().err, file.split("/")[-1], problem)
    assert not (tmp_path / "pred").exists()


def test_good_labeled_dataset_passes(env):
    from ssl3d.data.labeled import check_labeled_dataset

    cases, dj = check_labeled_dataset(make_labeled(env["nnUNet_raw"]), 1, num_processes=2)
    assert sorted(c.case_id for c in cases) == ["case0", "case1", "case2", "case3"]


def test_pretraining_log_names_the_network_it_builds(tiny_pretraining):
    log = next((tiny_pretraining / "fold_0").glob("training_log_*.txt")).read_text()
    line = next(ln for ln in log.splitlines() if ln.startswith("network built:"))
    assert "spark (SparK3D), size tiny" in line and "features_per_stage [8, 16, 32, 64]" in line


def test_plan_summary_names_each_decision_and_its_rule(tmp_path):
    from ssl3d.preprocessing.pipeline import PlanOptions, plan_and_preprocess

    for i in range(2):  # a CT whose air was set to 0 looks like MRI: the summary must say so and how to override
        write_image(tmp_path / "scans" / f"c{i}.nii.gz", (ct_volume(i) + 1000).clip(0).astype(np.int16))
    res = plan_and_preprocess(PlanOptions(folders=[str(tmp_path / "scans")], output_root=str(tmp_path / "pre"),
                                          num_processes=1, progress=False))
    text = "\n".join(res.summary)
    assert "channel 0 (unknown): MRI [inferred: no air-like voxels" in text and "pass --modality CT" in text
    assert "ZScoreNormalization" in text and "spacing 4 x 0.8 x 0.8 mm [nnU-Net's rule: per-axis median]" in text
    for word in ("patch ", "network ResidualEncoderUNet: ", "mask cell "):
        assert word in text
    plans = json.loads(res.plans_file.read_text())
    assert plans["ssl3d"]["modality_rules"]["0"].startswith("inferred: no air-like voxels")
