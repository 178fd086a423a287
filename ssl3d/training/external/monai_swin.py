"""MONAI SwinUNETR self-supervised weights (``model_swinvit.pt`` and SwinUNETR/Pretrain checkpoints) into
ssl3d's ``SwinUNETRNet``.

Layouts read (from MONAI's ``SwinUNETR.load_from`` and research-contributions SwinUNETR/Pretrain + BTCV):

* the tensors under ``state_dict`` (``torch.save({"epoch", "state_dict", "optimizer"})``), ``model``, or the
  file itself being the state_dict;
* keys with or without DataParallel's ``module.`` prefix, the encoder under ``swinViT.`` or ``swin_vit.``
  (research-contributions PR 88) or bare (``model_swinvit.pt``: ``module.patch_embed.proj.weight``,
  ``module.layers1.0.blocks.0.attn.qkv.weight`` ...);
* MLP weights as ``mlp.fc1/fc2`` (the published file) or ``mlp.linear1/linear2`` (MONAI's ``MLPBlock``).

Keys outside the Swin encoder (``rotation_head``, ``contrastive_head``, ``conv`` of the SSL head) are not
part of the downstream network; they are listed in ``info["skipped_keys"]``. The architecture is read from
the tensors: embedding width, blocks per stage, heads per stage, window (bias-table rows = (2w - 1)^3).

Axis order: MONAI's pipeline (``LoadImage`` + ``Orientation("RAS")``) feeds (X, Y, Z) arrays, nnU-Net feeds
(Z, Y, X). The default assumes the MONAI order and converts (``axes.convert_swin_state``); ``axis_order="zyx"``
(argument, or an ``"axis_order"`` entry in the file) loads a checkpoint trained on (Z, Y, X) arrays as it is.

Patch merging: the public weights were trained with MONAI < 1.5, whose ``PatchMerging`` concatenated offsets
010 and 001 twice and 110, 011 never; MONAI >= 1.5 (installed) concatenates all 8. MONAI's own ``load_from``
copies the blocks by position, i.e. feeds 3 of them other offsets; here each block follows its offset
(``axes.convert_patch_merging``), exact up to the LayerNorm statistics, which cannot match (logged).

Plans follow the public weights' recipe (research-contributions SwinUNETR/Pretrain and BTCV): CT clipped to
[-1000, 1000] HU and mapped to [0, 1] (``ScaleIntensityRanged``), 96^3 patches, 1.5 x 1.5 x 2.0 mm (x, y, z;
the scripts' declared spacing, applied by the fine-tuning recipe; pretraining itself did not resample), i.e.
(2.0, 1.5, 1.5) mm in nnU-Net's (z, y, x).
"""
from __future__ import annotations

import logging
import re
from pathlib import Path

import torch
from monai.networks.nets.swin_unetr import MERGING_MODE

from ssl3d.planning.planner import CONFIGURATION, build_plans
from ssl3d.training.external.axes import (AXIS_ORDERS, MERGING_OFFSETS, AxisOrderError, axis_permutation,
                                          convert_swin_state, merging_offsets)
from ssl3d.training.external.source import PretrainedSource, register_format
from ssl3d.utils import BadInputError

logger = logging.getLogger(__name__)

KIND = "monai_swinunetr"
SOURCE_AXIS_ORDER = "xyz"  # what MONAI's SSL weights were trained on
SOURCE_MERGING = "monai<1.5"  # SwinUNETR/Pretrain pins a 2022 MONAI: PatchMerging with duplicated slices
RECIPE = {"spacing_zyx": (2.0, 1.5, 1.5), "ct_window": (-1000.0, 1000.0), "patch_size": (96, 96, 96)}
PREFIX = "swinViT."  # SwinUNETRNet's encoder module
_STAGES = ("layers1", "layers2", "layers3", "layers4")
_BLOCK = re.compile(r"^(layers[1-4])\.0\.blocks\.(\d+)\.")


def _tensor_dict(obj) -> dict | None:
    if isinstance(obj, dict) and obj and all(isinstance(k, str) for k in obj) and \
            all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj
    return None


def raw_state(obj: dict) -> dict[str, torch.Tensor] | None:
    """The tensors of a MONAI-style checkpoint (``state_dict``, ``model`` or the dict itself), or None."""
    for key in ("state_dict", "model"):
        if key in obj and _tensor_dict(obj[key]) is not None:
            return obj[key]
    return _tensor_dict(obj)


def split_swin_keys(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """``(encoder tensors under MONAI SwinTransformer's own key names, skipped non-encoder keys)``."""
    keys = {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state.items()}
    prefixed = any(k.startswith(("swinViT.", "swin_vit.")) for k in keys)
    encoder, skipped = {}, []
    for k, v in keys.items():
        if prefixed:
            m = re.match(r"^(swinViT|swin_vit)\.(.+)$", k)
            name = m.group(2) if m else None
        else:
            name = k if k.startswith(("patch_embed.", *(s + "." for s in _STAGES))) else None
        if name is None:
            skipped.append(k)
            continue
        encoder[re.sub(r"\.mlp\.fc([12])\.", r".mlp.linear\1.", name)] = v
    return encoder, sorted(skipped)


def sniff(path: Path, obj: dict) -> bool:
    state = raw_state(obj) if "network_weights" not in obj else None
    if not state:
        return False
    encoder, _ = split_swin_keys(state)
    return "patch_embed.proj.weight" in encoder and any(k.endswith("relative_position_bias_table") for k in encoder)


def swin_architecture(encoder: dict[str, torch.Tensor], path: Path) -> tuple[dict, int]:
    """``(SwinUNETRNet arch_kwargs, input channels)`` read from the tensors; one line when they are not a
    four-stage 3D Swin encoder SwinUNETRNet can hold."""
    w = encoder.get("patch_embed.proj.weight")
    if w is None or w.dim() != 5:
        raise BadInputError(path, f"MONAI SwinUNETR checkpoint: patch_embed.proj.weight is "
                                  f"{'missing' if w is None else f'of shape {tuple(w.shape)}, not a 3D conv kernel'}")
    if tuple(w.shape[2:]) != (2, 2, 2):
        raise BadInputError(path, f"MONAI SwinUNETR checkpoint: patch embedding {tuple(w.shape[2:])}; "
                                  f"SwinUNETRNet supports patch size 2 only")
    feature_size, n_channels = int(w.shape[0]), int(w.shape[1])
    depths, heads, windows = [], [], set()
    for stage in _STAGES:
        blocks = sorted({int(m.group(2)) for k in encoder if (m := _BLOCK.match(k)) and m.group(1) == stage})
        if not blocks or blocks != list(range(len(blocks))):
            raise BadInputError(path, f"MONAI SwinUNETR checkpoint: stage {stage} has blocks {blocks} "
                                      f"(a 4-stage Swin encoder with consecutive blocks expected)")
        depths.append(len(blocks))
        table = encoder.get(f"{stage}.0.blocks.0.attn.relative_position_bias_table")
        if table is None or table.dim() != 2:
            raise BadInputError(path, f"MONAI SwinUNETR checkpoint: {stage}.0.blocks.0.attn."
                                      f"relative_position_bias_table missing or not 2D")
        heads.append(int(table.shape[1]))
        side = round(table.shape[0] ** (1 / 3))
        if side ** 3 != table.shape[0] or side % 2 == 0:
            raise BadInputError(path, f"MONAI SwinUNETR checkpoint: bias table of {table.shape[0]} rows is not a "
                                      f"cubic 3D window ((2w - 1)^3 rows)")
        windows.add((side + 1) // 2)
    if len(windows) != 1:
        raise BadInputError(path, f"MONAI SwinUNETR checkpoint: stages use different windows {sorted(windows)}")
    if feature_size % 12:
        raise BadInputError(path, f"MONAI SwinUNETR checkpoint: embedding width {feature_size} is not a multiple "
                                  f"of 12 (MONAI's SwinUNETR requires it)")
    arch = {"feature_size": feature_size, "depths": depths, "num_heads": heads, "window_size": windows.pop(),
            "patch_size": 2}
    return arch, n_channels


def shrunk_window_stages(patch_size, window: int) -> list[str]:
    """Stages whose attention map is smaller than the window on some axis at this patch. MONAI then shrinks the
    window and indexes the bias table with the first rows of the full window's raster, which is not a
    function of relative position: there the (X, Y, Z) -> (Z, Y, X) conversion cannot be exact."""
    out = []
    for i, stage in enumerate(_STAGES):
        grid = [int(p) // (2 * 2 ** i) for p in patch_size]  # patch embedding /2, each stage before it /2
        if any(g < window for g in grid):
            out.append(stage)
    return out


def recipe_plans(n_channels: int, patch_size=RECIPE["patch_size"]) -> dict:
    """nnU-Net plans of the public weights' pretraining recipe (spacing, CT window as ``CTWindowNormalization``,
    patch); the data medians stay None until the labeled dataset's fingerprint fills them."""
    names = {str(c): "CT" for c in range(n_channels)}
    lo, hi = RECIPE["ct_window"]
    fingerprint = {"spacings": [list(RECIPE["spacing_zyx"])], "shapes_after_crop": [list(patch_size)],
                   "modalities": dict(names), "channel_names": dict(names), "median_relative_size_after_cropping": 1.0,
                   "foreground_intensity_properties_per_channel": {
                       c: {"mean": lo, "std": hi - lo, "percentile_00_5": lo, "percentile_99_5": hi,
                           "min": lo, "max": hi, "median": (lo + hi) / 2} for c in names}}
    plans = build_plans(fingerprint, "Dataset000_MONAISwinUNETRSSL", spacing=RECIPE["spacing_zyx"],
                        patch_size=patch_size, ct_window=RECIPE["ct_window"])
    cfg = plans["configurations"][CONFIGURATION]
    cfg["patch_size"] = [int(p) for p in patch_size]
    # no data medians exist: left open for the labeled dataset's fingerprint (source.complete_plans)
    cfg["median_image_size_in_voxels"] = None
    plans["original_median_shape_after_transp"] = None
    plans["ssl3d"]["source"] = ("MONAI SwinUNETR SSL recipe (research-contributions SwinUNETR/Pretrain): CT "
                                "[-1000, 1000] HU -> [0, 1], 96^3 patches, 1.5 x 1.5 x 2.0 mm (x, y, z)")
    return plans


def _patch_size(value, path: Path) -> tuple[int, int, int]:
    """The pretraining patch: the recipe's 96^3, or the file's ``"patch_size"`` (SwinUNETR/Pretrain's --roi_*)."""
    try:
        patch = tuple(int(v) for v in value)
    except (TypeError, ValueError):
        patch = ()
    if len(patch) != 3 or any(p <= 0 or p % 32 for p in patch):
        raise BadInputError(path, f"patch_size {value!r}: 3 positive multiples of 32 expected (SwinUNETR's 5 halvings)")
    return patch  # type: ignore[return-value]


def load_monai_swin(path: Path, obj: dict, axis_order: str | None = None,
                    merging_order: str | None = None) -> PretrainedSource:
    """A MONAI SwinUNETR SSL checkpoint as a :class:`PretrainedSource` for ``SwinUNETRNet``.

    ``axis_order``: the array order the weights were trained on (``"xyz"``: MONAI, converted to nnU-Net's
    (Z, Y, X); ``"zyx"``: loaded as they are). Default: the file's ``"axis_order"`` entry, else ``"xyz"``.
    A ``"patch_size"`` entry (z, y, x) replaces the recipe's 96^3 for weights pretrained on another ROI.
    ``merging_order``: the patch-merging slices the weights were trained with (``axes.MERGING_OFFSETS``; default
    the file's ``"merging_order"``, else ``"monai<1.5"``, what the public weights used), converted to those of
    the installed MONAI's ``PatchMerging`` that ``SwinUNETRNet`` builds.
    """
    path = Path(path)
    state = raw_state(obj)
    if not state:
        raise BadInputError(path, "not a MONAI SwinUNETR checkpoint (no tensors under 'state_dict' or 'model')")
    order = axis_order or obj.get("axis_order") or SOURCE_AXIS_ORDER
    if order not in AXIS_ORDERS:
        raise BadInputError(path, f"axis order {order!r}: choose one of {', '.join(AXIS_ORDERS)}")
    patch = _patch_size(obj.get("patch_size", RECIPE["patch_size"]), path)
    trained_merging = merging_order or obj.get("merging_order") or SOURCE_MERGING
    if trained_merging not in MERGING_OFFSETS:
        raise BadInputError(path, f"merging order {trained_merging!r}: choose one of {', '.join(MERGING_OFFSETS)}")
    encoder, skipped = split_swin_keys(state)
    arch, n_channels = swin_architecture(encoder, path)
    perm = axis_permutation(order, "zyx")
    try:
        report: dict = {}
        converted = convert_swin_state(encoder, perm, (arch["window_size"],) * 3, trained_merging,
                                       merging_offsets(MERGING_MODE["merging"]), report)
    except AxisOrderError as e:
        raise AxisOrderError(e.problem, path) from None
    inexact = shrunk_window_stages(patch, arch["window_size"]) if perm != (0, 1, 2) else []
    if inexact:
        logger.warning("%s: (X, Y, Z) -> (Z, Y, X) cannot be exact for the attention bias of %s: at a %s patch "
                       "their maps are smaller than the %d^3 window, where MONAI indexes the bias by raster position",
                       path, ", ".join(inexact), "x".join(map(str, patch)), arch["window_size"])
    if report["inexact_merging"]:
        logger.warning("%s: patch merging trained on %s slices, the installed MONAI concatenates other offsets: "
                       "linear part mapped by offset, LayerNorm statistics differ (%s)", path,
                       trained_merging, ", ".join(report["inexact_merging"]))
    if skipped:
        logger.info("%s: %d tensors outside the Swin encoder not imported (e.g. %s)", path, len(skipped), skipped[:3])
    architecture = {"network_class_name": "ssl3d.architectures.swin.SwinUNETRNet", "arch_kwargs": arch,
                    "_kw_requires_import": []}
    info = {"name": KIND, "axis_order": order, "axis_permutation": list(perm), "converted": perm != (0, 1, 2),
            "inexact_stages": inexact, "merging_order": trained_merging, "inexact_merging": report["inexact_merging"],
            "skipped_keys": skipped, "in_proj_keys": [PREFIX + "patch_embed.proj.weight"],
            "recipe": {**{k: list(v) for k, v in RECIPE.items()}, "patch_size": list(patch)}}
    return PretrainedSource(KIND, path, KIND, recipe_plans(n_channels, patch), architecture, patch, n_channels,
                            {PREFIX + k: v for k, v in converted.items()}, None, info)


register_format(KIND, sniff, load_monai_swin)
