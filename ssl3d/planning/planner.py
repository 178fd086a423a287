"""Plans for pretraining: spacing, normalization, patch size, encoder topology and masking.

The output is an nnU-Net plans dict (same keys, readable by ``PlansManager``) whose ``3d_fullres``
configuration names a ``ResidualEncoderUNet`` with the planned topology, plus an ``ssl3d`` block per
configuration with the masking and hybrid-ViT settings. Rules (also in the README):

* spacing: nnU-Net's rule (per-axis median; a much coarser, voxel-poor axis takes its 10th percentile);
* transpose: coarsest axis first, as nnU-Net;
* patch: aspect ratio from the spacing, scaled to a voxel budget, clipped to the median resampled shape,
  shrunk axis by axis until it fits the budget; always divisible by the total stride and the mask cell;
* topology: nnU-Net's ``get_pool_and_conv_props`` (pool an axis while its spacing is within 2x of the
  finest and its map stays >= 4 voxels), ResEnc features 32*2^s capped at 320, blocks 1,3,4,6,6,...;
* masking: cell = the encoder's total stride (SparK); ratio 0.75; hybrid ViT junction after (at most) four
  downsamplings, tokens = patch / junction stride (HySparK), MAE patches = junction stride.
"""
from __future__ import annotations

import logging
import math
from types import SimpleNamespace
from typing import Sequence

import numpy as np

from nnunetv2.configuration import ANISO_THRESHOLD
from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner
from nnunetv2.experiment_planning.experiment_planners.network_topology import get_pool_and_conv_props
from nnunetv2.preprocessing.resampling.default_resampling import compute_new_shape
from ssl3d.layers import total_stride
from ssl3d.utils import BadInputError

logger = logging.getLogger(__name__)


class PlanOptionError(BadInputError, ValueError):
    """A forced planning option that cannot work (one line via the CLIs, exit code 2)."""

PLANS_NAME = "ssl3dPlans"
CONFIGURATION = "3d_fullres"
DEFAULT_PATCH_VOXELS = 128 ** 3
DEFAULT_MASK_RATIO = 0.75
MIN_FEATURE_MAP = 4
BASE_FEATURES = 32
MAX_FEATURES = 320
BLOCKS_PER_STAGE = (1, 3, 4, 6, 6, 6, 6, 6, 6, 6)
MAX_HYBRID_DOWNSAMPLINGS = 4


def target_spacing(spacings: Sequence[Sequence[float]], shapes_after_crop: Sequence[Sequence[int]]) -> np.ndarray:
    """nnU-Net's 3d_fullres target spacing rule, evaluated by nnU-Net's own code on our fingerprint."""
    fake = SimpleNamespace(overwrite_target_spacing=None, anisotropy_threshold=ANISO_THRESHOLD,
                           dataset_fingerprint={"spacings": [list(s) for s in spacings],
                                                "shapes_after_crop": [list(s) for s in shapes_after_crop]})
    return np.asarray(ExperimentPlanner.determine_fullres_target_spacing(fake), dtype=float)


def transpose_axes(spacing: Sequence[float]) -> tuple[list[int], list[int]]:
    """Coarsest axis first (nnU-Net's convention); returns (forward, backward)."""
    coarsest = int(np.argmax(spacing))
    forward = [coarsest] + [i for i in range(3) if i != coarsest]
    backward = [forward.index(i) for i in range(3)]
    return forward, backward


def _lcm(a: Sequence[int], b: Sequence[int]) -> list[int]:
    return [int(x * y // math.gcd(int(x), int(y))) for x, y in zip(a, b)]


def _round_up(shape: Sequence[int], multiple: Sequence[int]) -> list[int]:
    return [int(math.ceil(s / m) * m) for s, m in zip(shape, multiple)]


def plan_topology(spacing: Sequence[float], median_shape: Sequence[int], patch_voxels: int = DEFAULT_PATCH_VOXELS,
                  patch_size: Sequence[int] | None = None, mask_cell_size: Sequence[int] | None = None) -> dict:
    """Patch size, strides, kernels and mask cell for one configuration (all in transposed axis order)."""
    spacing = [float(s) for s in spacing]
    if patch_size is None:
        inv = 1.0 / np.asarray(spacing)
        initial = inv * (patch_voxels / np.prod(inv)) ** (1 / 3)
        initial = np.minimum(np.round(initial), np.asarray(median_shape, dtype=float))
        initial = [max(int(i), 2 * MIN_FEATURE_MAP) for i in initial]
    else:
        initial = [int(i) for i in patch_size]
    _, strides, kernels, patch, divisible = get_pool_and_conv_props(spacing, initial, MIN_FEATURE_MAP, 999999)
    # Shrink (only when the patch was not forced) until the budget holds; nnU-Net does this against VRAM.
    while patch_size is None and np.prod(patch, dtype=np.float64) > patch_voxels:
        axis = int(np.argmax([p / m for p, m in zip(patch, median_shape)]))
        trial = list(patch)
        trial[axis] -= int(divisible[axis])
        if trial[axis] < 2 * MIN_FEATURE_MAP:
            candidates = [i for i in range(3) if patch[i] - divisible[i] >= 2 * MIN_FEATURE_MAP]
            if not candidates:
                break
            axis = max(candidates, key=lambda i: patch[i])
            trial = list(patch)
            trial[axis] -= int(divisible[axis])
        _, strides, kernels, patch, divisible = get_pool_and_conv_props(spacing, trial, MIN_FEATURE_MAP, 999999)
    encoder_stride = [int(d) for d in divisible]
    cell = list(encoder_stride) if mask_cell_size is None else [int(c) for c in mask_cell_size]
    if any(c % s != 0 for c, s in zip(cell, encoder_stride)):
        raise PlanOptionError(None, f"--mask-cell-size {' '.join(map(str, cell))}: mask cell size {cell} must be a "
                                    f"multiple of the encoder's total stride {encoder_stride}")
    final_patch = _round_up(patch, _lcm(cell, encoder_stride))
    if patch_size is not None and list(final_patch) != [int(p) for p in patch_size]:
        logger.warning("patch size %s adjusted to %s (divisible by stride %s and mask cell %s)",
                       list(patch_size), final_patch, encoder_stride, cell)
    strides = [list(s) for s in strides]
    # Hybrid models hand over to a ViT after at most four downsamplings (96^3 -> 6^3 tokens in HySparK).
    n_down = len(strides) - 1
    junction_stage = min(MAX_HYBRID_DOWNSAMPLINGS, n_down)
    junction_stride = list(total_stride(strides[:junction_stage + 1]))
    return {
        "patch_size": final_patch,
        "strides": strides,
        "kernel_sizes": [list(k) for k in kernels],
        "total_stride": encoder_stride,
        "mask_cell_size": cell,
        "mask_grid": [p // c for p, c in zip(final_patch, cell)],
        "hybrid_junction_stage": junction_stage,
        "hybrid_junction_stride": junction_stride,
        "vit_token_grid": [p // j for p, j in zip(final_patch, junction_stride)],
        "mae_patch_size": junction_stride,
    }


def normalization_plan(modalities: dict, median_relative_size_after_cropping: float,
                       ct_window: Sequence[float] | None = None) -> tuple[list[str], list[bool], list[dict]]:
    """Scheme names (nnU-Net classes where nnU-Net has one), mask-for-norm flags and per-channel settings."""
    schemes, use_mask, kwargs = [], [], []
    for c in sorted(modalities, key=int):
        if modalities[c] == "CT":
            if ct_window is not None:
                schemes.append("CTWindowNormalization")
                kwargs.append({"window": [float(ct_window[0]), float(ct_window[1])]})
            else:
                schemes.append("CTNormalization")
                kwargs.append({})
            use_mask.append(False)
        else:
            schemes.append("ZScoreNormalization")
            # nnU-Net's rule: normalize inside the nonzero region when cropping removed a lot of background.
            use_mask.append(bool(median_relative_size_after_cropping < 0.75))
            kwargs.append({})
    return schemes, use_mask, kwargs


def build_plans(fingerprint: dict, dataset_name: str, spacing: Sequence[float] | None = None,
                patch_size: Sequence[int] | None = None, patch_voxels: int = DEFAULT_PATCH_VOXELS,
                mask_cell_size: Sequence[int] | None = None, mask_ratio: float = DEFAULT_MASK_RATIO,
                ct_window: Sequence[float] | None = None, batch_size: int = 2) -> dict:
    """nnU-Net-compatible plans dict for pretraining on the fingerprinted pool.

    ``spacing``, ``patch_size`` and ``mask_cell_size`` are given in the images' numpy axis order (z, y, x),
    as nnU-Net's ``--overwrite_target_spacing``; they are transposed like everything else.
    """
    spacings = np.asarray(fingerprint["spacings"], dtype=float)
    shapes = np.asarray(fingerprint["shapes_after_crop"], dtype=float)
    median_spacing = np.median(spacings, 0)
    median_shape = np.median(shapes, 0)
    fullres = target_spacing(spacings, shapes) if spacing is None else np.asarray(spacing, dtype=float)
    forward, backward = transpose_axes(fullres)
    resampled = [compute_new_shape(sh, sp, fullres) for sh, sp in zip(shapes, spacings)]
    median_resampled = np.median(np.vstack(resampled), 0)[forward]
    sp_t = fullres[forward]
    topo = plan_topology(sp_t, median_resampled, patch_voxels,
                         None if patch_size is None else [patch_size[i] for i in forward],
                         None if mask_cell_size is None else [mask_cell_size[i] for i in forward])
    n_stages = len(topo["strides"])
    schemes, use_mask, norm_kwargs = normalization_plan(fingerprint["modalities"],
                                                        fingerprint["median_relative_size_after_cropping"], ct_window)
    arch = {
        "network_class_name": "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet",
        "arch_kwargs": {
            "n_stages": n_stages,
            "features_per_stage": [min(MAX_FEATURES, BASE_FEATURES * 2 ** s) for s in range(n_stages)],
            "conv_op": "torch.nn.modules.conv.Conv3d",
            "kernel_sizes": topo["kernel_sizes"],
            "strides": topo["strides"],
            "n_blocks_per_stage": list(BLOCKS_PER_STAGE[:n_stages]),
            "n_conv_per_stage_decoder": [1] * (n_stages - 1),
            "conv_bias": True,
            "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
            "norm_op_kwargs": {"eps": 1e-5, "affine": True},
            "dropout_op": None,
            "dropout_op_kwargs": None,
            "nonlin": "torch.nn.LeakyReLU",
            "nonlin_kwargs": {"inplace": True},
        },
        "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
    }
    config = {
        "data_identifier": f"{PLANS_NAME}_{CONFIGURATION}",
        "preprocessor_name": "DefaultPreprocessor",
        "batch_size": int(batch_size),
        "patch_size": topo["patch_size"],
        "median_image_size_in_voxels": [float(v) for v in median_resampled],
        "spacing": [float(s) for s in sp_t],
        "normalization_schemes": schemes,
        "use_mask_for_norm": use_mask,
        "resampling_fn_data": "resample_data_or_seg_to_shape",
        "resampling_fn_seg": "resample_data_or_seg_to_shape",
        "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
        "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None},
        "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
        "resampling_fn_probabilities_kwargs": {"is_seg": False, "order": 1, "order_z": 0, "force_separate_z": None},
        "architecture": arch,
        "batch_dice": False,
        "ssl3d": {
            "mask_ratio": float(mask_ratio),
            "normalization_kwargs": norm_kwargs,
            "patch_voxel_budget": int(patch_voxels),
            **{k: v for k, v in topo.items() if k not in ("patch_size", "strides", "kernel_sizes")},
        },
    }
    return {
        "dataset_name": dataset_name,
        "plans_name": PLANS_NAME,
        "original_median_spacing_after_transp": [float(v) for v in median_spacing[forward]],
        "original_median_shape_after_transp": [int(round(v)) for v in median_shape[forward]],
        "image_reader_writer": "SimpleITKIO",
        "transpose_forward": forward,
        "transpose_backward": backward,
        "configurations": {CONFIGURATION: config},
        "experiment_planner_used": "ssl3d.planning.planner.build_plans",
        "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": fingerprint["foreground_intensity_properties_per_channel"],
        "ssl3d": {"modalities": fingerprint["modalities"], "channel_names": fingerprint["channel_names"]},
    }
