"""Synthetic CT demo data: determinism, HU plausibility, geometry, nnU-Net raw format and the CLI."""
import json
import logging
import time

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from ssl3d.cli.make_demo_data import main as make_demo_data
from ssl3d.data.synthetic import (INPLANE_SPACING_MM, LABELS, PHASES, SIZE_PRESETS, SLICE_SPACING_MM, _case_rng,
                                  _reorient, make_phantom, phantom_to_sitk, write_demo_datasets)
from ssl3d.utils import BadInputError

SEED, N_U, N_L = 7, 4, 3


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    raw = tmp_path_factory.mktemp("raw")
    folders = write_demo_datasets(raw, seed=SEED, n_unlabeled=N_U, n_labeled=N_L, size="tiny", progress=False)
    return raw, folders


def read(path):
    img = sitk.ReadImage(str(path))
    return img, sitk.GetArrayFromImage(img)


def labeled_cases(folders):
    d = folders["labeled"]
    return [(read(f), read(d / "labelsTr" / f.name.replace("_0000.nii.gz", ".nii.gz")))
            for f in sorted((d / "imagesTr").glob("*.nii.gz"))]


def test_phantom_is_deterministic_per_seed():
    a, b = make_phantom(np.random.default_rng(3), "tiny"), make_phantom(np.random.default_rng(3), "tiny")
    c = make_phantom(np.random.default_rng(4), "tiny")
    assert a.image.dtype == np.int16 and a.label.dtype == np.uint8 and a.image.shape == a.label.shape
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.label, b.label)
    assert (a.spacing, a.origin, a.direction) == (b.spacing, b.origin, b.direction)
    assert a.image.shape != c.image.shape or not np.array_equal(a.image, c.image)


def test_written_cases_match_phantoms_and_do_not_depend_on_n(demo, tmp_path):
    raw, folders = demo
    fewer = write_demo_datasets(tmp_path / "a", seed=SEED, n_unlabeled=2, n_labeled=1, size="tiny", progress=False)
    other = write_demo_datasets(tmp_path / "b", seed=SEED + 1, n_unlabeled=1, n_labeled=0, size="tiny",
                                progress=False)
    for name in ("pool_0000_0000.nii.gz", "pool_0001_0000.nii.gz"):
        np.testing.assert_array_equal(read(fewer["unlabeled"] / "imagesTr" / name)[1],
                                      read(folders["unlabeled"] / "imagesTr" / name)[1])
    np.testing.assert_array_equal(read(fewer["labeled"] / "labelsTr" / "organs_0000.nii.gz")[1],
                                  read(folders["labeled"] / "labelsTr" / "organs_0000.nii.gz")[1])
    first = read(folders["unlabeled"] / "imagesTr" / "pool_0000_0000.nii.gz")[1]
    assert not np.array_equal(read(other["unlabeled"] / "imagesTr" / "pool_0000_0000.nii.gz")[1], first)
    # the file holds exactly what make_phantom draws from the case's own stream, geometry included
    for i in range(N_U):
        p = make_phantom(_case_rng(SEED, 0, i), "tiny")
        img, arr = read(folders["unlabeled"] / "imagesTr" / f"pool_{i:04d}_0000.nii.gz")
        np.testing.assert_array_equal(arr, p.image)
        np.testing.assert_allclose(img.GetSpacing(), p.spacing, rtol=1e-6)
        np.testing.assert_allclose(img.GetOrigin(), p.origin, atol=1e-4)
        np.testing.assert_allclose(img.GetDirection(), p.direction, atol=1e-6)


def test_hu_values_are_ct_like(demo):
    raw, folders = demo
    images = sorted(raw.glob("Dataset*/imagesTr/*.nii.gz"))
    assert len(images) == N_U + N_L
    for f in images:
        img, a = read(f)
        assert img.GetPixelID() == sitk.sitkInt16
        body = a > -500
        assert (a < -900).mean() > 0.05, f  # air around the body
        assert -100 < np.median(a[body]) < 100, f  # soft tissue dominates the body
        assert (a > 500).any(), f  # cortical bone
        assert a.min() >= -1024 and a.max() <= 3071
        # no partial-volume rim: a CT body mask (> -500 HU) holds next to nothing below -300 HU
        assert (a[body] < -300).mean() < 0.003, f
        # bowel/stomach gas: dark pockets not connected to the air around the body
        comps, _ = ndimage.label(a < -500)
        outside = np.unique(np.concatenate([comps[:, [0, -1], :].ravel(), comps[:, :, [0, -1]].ravel()]))
        gas = a[(comps > 0) & ~np.isin(comps, outside)]
        assert gas.size > 0 and -950 <= np.median(gas) <= -650, f


def test_organ_intensities_through_labels(demo):
    _, folders = demo
    in_plane = np.zeros((1, 3, 3), bool)
    in_plane[0] = [[0, 1, 0], [1, 1, 1], [0, 1, 0]]
    for (_, img), (_, lab) in labeled_cases(folders):
        def core(name):  # drop the blurred rim so the median reflects the organ itself
            m = ndimage.binary_erosion(lab == LABELS[name], in_plane)
            return img[m if m.sum() >= 3 else lab == LABELS[name]]

        assert 50 <= np.median(core("liver")) <= 70
        assert 30 <= np.median(core("spleen")) <= 65
        for kidney in ("kidney_left", "kidney_right"):
            assert 30 <= img[lab == LABELS[kidney]].mean() <= 170  # medulla ~35 HU, enhancing cortex brighter
        assert 100 <= img[lab == LABELS["aorta"]].mean() <= 260 and img[lab == LABELS["aorta"]].max() >= 150
        assert 90 <= img[lab == LABELS["inferior_vena_cava"]].mean() <= 220
        assert np.median(img[lab == LABELS["vertebrae"]]) >= 300
        assert img[lab == 0].min() < -900  # background includes the air


def test_labeled_set_has_every_label(demo):
    _, folders = demo
    cases = labeled_cases(folders)
    assert len(cases) == N_L
    for (img, _), (lab_img, lab) in cases:
        assert lab_img.GetPixelID() == sitk.sitkUInt8
        assert set(np.unique(lab).tolist()) == set(LABELS.values())
        assert lab_img.GetSize() == img.GetSize()
        np.testing.assert_allclose(lab_img.GetSpacing(), img.GetSpacing())
        np.testing.assert_allclose(lab_img.GetOrigin(), img.GetOrigin())
        np.testing.assert_allclose(lab_img.GetDirection(), img.GetDirection())


def test_geometry_is_anisotropic_oriented_and_varied():
    phantoms = [make_phantom(np.random.default_rng([5, i]), "tiny") for i in range(12)]
    (lo, hi), (zlo, zhi) = SIZE_PRESETS["tiny"]
    for p in phantoms:
        sx, sy, sz = p.spacing
        assert sx == sy and INPLANE_SPACING_MM[0] <= sx <= INPLANE_SPACING_MM[1]
        assert SLICE_SPACING_MM[0] <= sz <= SLICE_SPACING_MM[1] and sz >= sx
        nz, ny, nx = p.image.shape
        assert zlo <= nz <= zhi and lo <= ny <= hi and lo <= nx <= hi
        d = np.asarray(p.direction).reshape(3, 3)
        np.testing.assert_allclose(d @ d.T, np.eye(3), atol=1e-9)
        assert abs(abs(np.linalg.det(d)) - 1) < 1e-9
    assert len({p.direction for p in phantoms}) > 1
    assert len({p.origin for p in phantoms}) == len(phantoms)
    assert len({p.image.shape for p in phantoms}) > 1


def test_reorientation_keeps_every_voxel_in_place():
    """Flips and the axis swap change only how voxels are stored: resampled back to LPS, array and origin
    are those of the canonical input."""
    arr = np.arange(5 * 6 * 7, dtype=np.int16).reshape(5, 6, 7)
    spacing, origin = (0.7, 0.7, 3.0), (-20.0, 15.0, -300.0)
    canonical = sitk.GetImageFromArray(arr)
    canonical.SetSpacing(spacing)
    canonical.SetOrigin(origin)
    seen = set()
    for seed in range(24):
        (out,), geo = _reorient(np.random.default_rng(seed), [arr], spacing, origin)
        seen.add((geo["swap_xy"], geo["flips_xyz"]))
        img = sitk.GetImageFromArray(out)
        img.SetSpacing(geo["spacing"])
        img.SetOrigin(geo["origin"])
        img.SetDirection(geo["direction"])
        back = sitk.DICOMOrient(img, "LPS")
        np.testing.assert_array_equal(sitk.GetArrayFromImage(back), arr)
        np.testing.assert_allclose(back.GetOrigin(), origin, atol=1e-9)
        np.testing.assert_allclose(back.GetSpacing(), spacing)
    assert len(seen) > 4 and any(swap for swap, _ in seen)


def test_anatomy_sits_right_in_physical_space():
    """Whatever the array orientation, world (LPS) coordinates put the liver on the patient's right of the
    spleen, the spine behind the aorta, and the right kidney below the left one on average."""
    for i in range(8):
        p = make_phantom(np.random.default_rng([6, i]), "tiny")
        img, _ = phantom_to_sitk(p)

        def centre(name):
            idx = np.argwhere(p.label == LABELS[name]).mean(axis=0)[::-1]  # (z, y, x) -> (x, y, z)
            return np.array(img.TransformContinuousIndexToPhysicalPoint(idx.tolist()))

        assert centre("liver")[0] < centre("aorta")[0] < centre("spleen")[0]  # L is +x
        assert centre("vertebrae")[1] > centre("aorta")[1]  # P is +y
        assert centre("kidney_left")[0] > centre("kidney_right")[0]


def test_dataset_json_and_nnunet_can_find_the_datasets(demo, monkeypatch):
    raw, folders = demo
    assert set(folders) == {"unlabeled", "labeled"}
    assert folders["unlabeled"] == raw / "Dataset801_SynthCTPool"
    assert folders["labeled"] == raw / "Dataset802_SynthCTOrgans"
    pool = json.loads((folders["unlabeled"] / "dataset.json").read_text())
    organs = json.loads((folders["labeled"] / "dataset.json").read_text())
    for dj, n in ((pool, N_U), (organs, N_L)):
        assert dj["channel_names"] == {"0": "CT"} and dj["file_ending"] == ".nii.gz" and dj["numTraining"] == n
    assert pool["labels"] == {"background": 0}
    assert organs["labels"] == LABELS and sorted(LABELS.values()) == list(range(len(LABELS)))
    assert not (folders["unlabeled"] / "labelsTr").exists()
    assert not list(raw.rglob(".tmp_*"))
    assert len(list((folders["labeled"] / "labelsTr").glob("*.nii.gz"))) == N_L

    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
    from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets

    monkeypatch.setenv("nnUNet_raw", str(raw))
    monkeypatch.delenv("nnUNet_preprocessed", raising=False)
    monkeypatch.delenv("nnUNet_results", raising=False)
    assert maybe_convert_to_dataset_name(801) == "Dataset801_SynthCTPool"
    assert maybe_convert_to_dataset_name("802") == "Dataset802_SynthCTOrgans"
    pairs = get_filenames_of_train_images_and_targets(str(folders["labeled"]), organs)
    assert len(pairs) == N_L and all(len(v["images"]) == 1 for v in pairs.values())
    assert all(v["label"].endswith(f"labelsTr/{k}.nii.gz") for k, v in pairs.items())


def test_rewrite_drops_stale_cases_and_refuses_clashes(tmp_path):
    raw = tmp_path / "raw"
    write_demo_datasets(raw, seed=0, n_unlabeled=3, n_labeled=0, size="tiny", progress=False)
    folder = write_demo_datasets(raw, seed=0, n_unlabeled=2, n_labeled=0, size="tiny", progress=False)["unlabeled"]
    assert sorted(f.name for f in (folder / "imagesTr").iterdir()) == ["pool_0000_0000.nii.gz",
                                                                        "pool_0001_0000.nii.gz"]
    assert json.loads((folder / "dataset.json").read_text())["numTraining"] == 2
    (folder / "imagesTr" / "mine_0000.nii.gz").write_bytes(b"")
    with pytest.raises(BadInputError, match="not written by ssl_make_demo_data"):
        write_demo_datasets(raw, seed=0, n_unlabeled=2, n_labeled=0, size="tiny", progress=False)
    (raw / "Dataset802_Other").mkdir()
    with pytest.raises(BadInputError, match="already used"):
        write_demo_datasets(raw, seed=0, n_unlabeled=0, n_labeled=1, size="tiny", progress=False)
    with pytest.raises(BadInputError, match="different ids"):
        write_demo_datasets(tmp_path / "x", n_unlabeled=1, n_labeled=1, unlabeled_id=5, labeled_id=5, size="tiny")


def test_tiny_dataset_is_fast(tmp_path):
    make_phantom(np.random.default_rng(0), "tiny")  # warm up imports and caches
    t = time.perf_counter()
    write_demo_datasets(tmp_path, seed=1, n_unlabeled=8, n_labeled=0, size="tiny", progress=False)
    assert time.perf_counter() - t < 5.0


def test_cli_needs_an_output_folder(monkeypatch, capsys):
    monkeypatch.delenv("nnUNet_raw", raising=False)
    assert make_demo_data(["--size", "tiny", "-nu", "1", "-nl", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nnUNet_raw" in err[0] and "-o" in err[0]


def test_cli_writes_into_nnunet_raw(tmp_path, monkeypatch, capsys, caplog):
    monkeypatch.setenv("nnUNet_raw", str(tmp_path))
    with caplog.at_level(logging.INFO):
        rc = make_demo_data(["--size", "tiny", "-nu", "2", "-nl", "1", "--seed", "4", "-du", "811", "-dl", "812",
                             "--no-progress"])
    out = capsys.readouterr().err + caplog.text  # stderr or pytest's log capture, whichever holds the log
    assert rc == 0, out
    assert "Dataset811_SynthCTPool" in out and "Dataset812_SynthCTOrgans" in out
    assert len(list((tmp_path / "Dataset811_SynthCTPool" / "imagesTr").glob("*.nii.gz"))) == 2
    assert len(list((tmp_path / "Dataset812_SynthCTOrgans" / "labelsTr").glob("*.nii.gz"))) == 1


def test_portal_venous_phase_enhances_organs_on_the_same_anatomy():
    native = make_phantom(_case_rng(3, 1, 0), "tiny")
    venous = make_phantom(_case_rng(3, 1, 0), "tiny", phase="portal-venous")
    assert np.array_equal(native.label, venous.label), "same seed, same anatomy in both phases"
    for organ, (lo, hi) in {"liver": (100, 120), "spleen": (110, 130), "kidney_cortex": (150, 200)}.items():
        assert lo <= venous.info["hu"][organ] <= hi
    liver = venous.label == LABELS["liver"]
    assert np.median(venous.image[liver]) > np.median(native.image[liver]) + 30
    with pytest.raises(BadInputError, match="contrast phase"):
        write_demo_datasets("/nonexistent-never-written", n_unlabeled=1, n_labeled=0, phase="arterial")


def test_variety_is_seeded_and_stays_in_its_documented_ranges():
    from ssl3d.data.synthetic_variety import CYST_HU, VARIATION, venous_hu

    draws = [make_phantom(np.random.default_rng([21, i]), "tiny") for i in range(20)]
    again = make_phantom(np.random.default_rng([21, 0]), "tiny")
    np.testing.assert_array_equal(again.image, draws[0].image)
    np.testing.assert_array_equal(again.label, draws[0].label)
    assert again.info["variation"] == draws[0].info["variation"]
    assert not np.array_equal(draws[0].label, draws[1].label)
    per_case = [p.info["variation"] for p in draws]
    for name, (lo, hi) in VARIATION.items():
        if name.startswith("lesion"):
            continue
        values = [v[name] for v in per_case]
        assert all(lo <= x <= hi for x in values), (name, values)
        assert len(set(values)) > 10, f"{name} does not vary"
    lesions = [les for v in per_case for les in v["lesions"]]
    counts = [len(v["lesions"]) for v in per_case]
    assert 0 < sum(c > 0 for c in counts) < 20 and max(counts) <= VARIATION["lesion_count"][1]
    lo, hi = VARIATION["lesion_diameter_mm"]
    assert all(lo <= les["diameter_mm"] <= hi for les in lesions)
    assert all(CYST_HU[0] <= les["hu"] <= CYST_HU[1] for les in lesions if les["kind"] == "cyst")
    assert all(les["hu"] < p.info["hu"]["liver"] for p in draws for les in p.info["variation"]["lesions"])
    for p in draws:  # every labeled structure survives the variety
        assert set(np.unique(p.label).tolist()) == set(LABELS.values())
    # bigger patients are noisier; portal-venous timing: the liver rises, the aorta falls through the window
    assert np.corrcoef([v["body_half_width_mm"] for v in per_case], [v["noise_sigma_hu"] for v in per_case])[0, 1] > 0
    rng = np.random.default_rng(0)
    timing = np.linspace(0, 1, 40)
    venous = [venous_hu(rng, t, 0.5) for t in timing]
    assert np.corrcoef(timing, [h["liver"] for h in venous])[0, 1] > 0.8
    assert np.corrcoef(timing, [h["aorta"] for h in venous])[0, 1] < -0.8
    assert all(100 <= h["liver"] <= 120 and 150 <= h["aorta"] <= 250 for h in venous)


def test_lesions_and_liver_shift_leave_the_rest_of_the_case_unchanged():
    """The fatty-liver variant of a seed differs only inside the liver (lesions included), in both phases."""
    for phase in PHASES:
        base = make_phantom(_case_rng(4, 2, 1), "tiny", phase)
        fatty = make_phantom(_case_rng(4, 2, 1), "tiny", phase, liver_hu_shift=-40.0)
        np.testing.assert_array_equal(base.label, fatty.label)
        assert base.info["variation"] == fatty.info["variation"]
        changed = base.image != fatty.image
        liver = base.label == LABELS["liver"]
        assert changed[liver].mean() > 0.5
        # outside the liver only the blurred rim can change (Gaussian truncated at 4 sigma <= 3.2 voxels)
        assert (changed & ~ndimage.binary_dilation(liver, np.ones((3, 3, 3), bool), iterations=4)).sum() == 0


def test_easy_fatty_liver_task_darkens_the_liver_by_150_to_200_hu(tmp_path):
    from ssl3d.data.synthetic_cls import write_classification_dataset

    folder = write_classification_dataset(tmp_path, "fatty-liver-easy", n=4, seed=1, size="tiny", dataset_id=804,
                                          progress=False)
    assert folder.name == "Dataset804_SynthCTFattyLiverEasy"
    dj = json.loads((folder / "dataset.json").read_text())
    shifts, labels = dj["ssl3d_liver_hu_shift"], dj["ssl3d_case_labels"]
    assert sum(labels.values()) == 2
    assert all((-200 <= shifts[c] <= -150) if y else shifts[c] == 0 for c, y in labels.items())
