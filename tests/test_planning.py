"""Planner rules, fingerprint pieces and normalization."""
import numpy as np
import pytest

from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
from ssl3d.planning.fingerprint import foreground_mask, infer_modality, modality_from_channel_name
from ssl3d.planning.planner import build_plans, plan_topology, target_spacing
from ssl3d.preprocessing.normalization import normalize_channels


def fingerprint(spacings, shapes, modality="CT", rel=1.0):
    return {"spacings": spacings, "shapes_after_crop": shapes, "modalities": {"0": modality},
            "channel_names": {"0": modality}, "median_relative_size_after_cropping": rel,
            "foreground_intensity_properties_per_channel": {"0": {"mean": 50.0, "std": 100.0, "percentile_00_5": -100.0,
                                                                 "percentile_99_5": 400.0}}}


def test_anisotropic_data_gets_inplane_only_first_pooling():
    fp = fingerprint([[5.0, 0.8, 0.8]] * 4, [[60, 512, 512]] * 4)
    cfg = build_plans(fp, "Dataset900_X")["configurations"]["3d_fullres"]
    strides = cfg["architecture"]["arch_kwargs"]["strides"]
    kernels = cfg["architecture"]["arch_kwargs"]["kernel_sizes"]
    assert strides[1] == [1, 2, 2] and strides[2] == [1, 2, 2]
    assert kernels[0][0] == 1, "a 5 mm axis gets 1-wide kernels until pooling evens the spacing"
    assert cfg["ssl3d"]["total_stride"][0] < cfg["ssl3d"]["total_stride"][1]


def test_isotropic_96_gives_hyspark_token_grid():
    fp = fingerprint([[1.5, 1.5, 1.5]] * 3, [[200, 300, 300]] * 3)
    cfg = build_plans(fp, "Dataset900_X", patch_size=[96, 96, 96])["configurations"]["3d_fullres"]
    assert cfg["patch_size"] == [96, 96, 96]
    assert cfg["ssl3d"]["vit_token_grid"] == [6, 6, 6]
    assert cfg["ssl3d"]["mask_cell_size"] == [16, 16, 16]


@pytest.mark.parametrize("seed", range(25))
def test_patch_always_divisible_by_stride_and_cell(seed):
    rng = np.random.default_rng(seed)
    spacing = [float(rng.uniform(1.0, 6.0)), *rng.uniform(0.5, 1.8, 2)]
    shape = [int(rng.integers(12, 200)), *rng.integers(40, 400, 2)]
    budget = int(rng.choice([32 ** 3, 64 ** 3, 96 ** 3, 128 ** 3]))
    forced = [int(v) for v in rng.integers(20, 130, 3)] if seed % 3 == 0 else None
    topo = plan_topology(spacing, shape, budget, patch_size=forced)
    for p, s, c in zip(topo["patch_size"], topo["total_stride"], topo["mask_cell_size"]):
        assert p % s == 0 and p % c == 0, topo
    if forced is None:
        assert np.prod(topo["patch_size"]) <= budget * 1.0 + 1e-6 or min(topo["patch_size"]) <= 16
    coarse_cell = plan_topology(spacing, shape, budget, mask_cell_size=[2 * s for s in topo["total_stride"]])
    assert all(p % c == 0 for p, c in zip(coarse_cell["patch_size"], coarse_cell["mask_cell_size"]))


def test_cell_not_multiple_of_stride_is_rejected():
    with pytest.raises(ValueError, match="multiple of the encoder's total stride"):
        plan_topology([1.5, 1.5, 1.5], [100, 100, 100], 64 ** 3, mask_cell_size=[3, 3, 3])


def test_target_spacing_follows_nnunet_anisotropy_rule():
    spacings = [[10.0, 1.5, 1.5]] * 8 + [[5.0, 1.5, 1.5]] * 2
    shapes = [[10, 256, 256]] * 10
    t = target_spacing(spacings, shapes)
    assert t[0] == pytest.approx(np.percentile([s[0] for s in spacings], 10))
    assert list(t[1:]) == [1.5, 1.5]
    assert list(target_spacing([[2.0, 1.0, 1.0]] * 3, [[100, 200, 200]] * 3)) == [2.0, 1.0, 1.0]


def test_forced_spacing_and_transpose():
    fp = fingerprint([[0.7, 0.7, 3.0]] * 3, [[300, 300, 60]] * 3)
    plans = build_plans(fp, "Dataset900_X", spacing=[1.5, 1.5, 1.5])
    assert plans["configurations"]["3d_fullres"]["spacing"] == [1.5, 1.5, 1.5]
    plans = build_plans(fp, "Dataset900_X")
    assert plans["transpose_forward"][0] == 2, "the coarsest axis goes first, as in nnU-Net"


def test_plans_are_readable_by_nnunet_and_build_the_network():
    fp = fingerprint([[3.0, 1.0, 1.0]] * 3, [[40, 120, 120]] * 3)
    plans = build_plans(fp, "Dataset900_X", patch_voxels=32 ** 3)
    cm = PlansManager(plans).get_configuration("3d_fullres")
    net = get_network_from_plans(cm.network_arch_class_name, cm.network_arch_init_kwargs,
                                 cm.network_arch_init_kwargs_req_import, 1, 2, deep_supervision=False)
    import torch

    with torch.no_grad():
        y = net(torch.zeros(1, 1, *cm.patch_size))
    assert tuple(y.shape) == (1, 2, *cm.patch_size)


def test_normalization_schemes():
    img = np.linspace(-1000, 1500, 3 * 4 * 5, dtype=np.float32).reshape(1, 3, 4, 5)
    fp = fingerprint([[1, 1, 1]], [[3, 4, 5]])
    cfg = build_plans(fp, "D", ct_window=(-175, 250))["configurations"]["3d_fullres"]
    out = normalize_channels(img[:1].copy(), None, cfg, fp["foreground_intensity_properties_per_channel"])
    assert out.min() == 0.0 and out.max() == 1.0
    cfg = build_plans(fp, "D")["configurations"]["3d_fullres"]
    out = normalize_channels(img[:1].copy(), None, cfg, fp["foreground_intensity_properties_per_channel"])
    assert out.min() == pytest.approx((-100 - 50) / 100) and out.max() == pytest.approx((400 - 50) / 100)
    cfg = build_plans(fingerprint([[1, 1, 1]], [[3, 4, 5]], "MRI"), "D")["configurations"]["3d_fullres"]
    assert cfg["normalization_schemes"] == ["ZScoreNormalization"]
    out = normalize_channels(img[:1].copy() + 1000, None, cfg, {"0": {}})
    assert abs(out.mean()) < 1e-5 and out.std() == pytest.approx(1.0, rel=1e-4)


def test_ct_foreground_is_the_body_not_the_table():
    img = np.full((10, 40, 40), -1000.0, np.float32)
    img[:, 5:30, 5:30] = 40.0   # body
    img[:, 35:38, :] = 200.0     # table, separate component
    mask = foreground_mask(img, "CT")
    assert mask[:, 5:30, 5:30].all() and not mask[:, 35:38].any()


def test_modality_from_names_and_intensities():
    assert modality_from_channel_name("CT") == "CT" and modality_from_channel_name("T2") == "MRI"
    assert modality_from_channel_name("FLAIR") == "MRI" and modality_from_channel_name("whatever") is None
    ct = np.full((8, 16, 16), -1000.0)
    ct[:, 4:12, 4:12] = 40
    assert infer_modality(ct) == "CT"
    assert infer_modality(np.abs(np.random.default_rng(0).normal(300, 50, (8, 16, 16)))) == "MRI"
