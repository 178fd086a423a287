"""One entry point for every pretrained encoder fine-tuning accepts: an ssl3d results folder or a foreign file.

``load_pretrained(path)`` returns a :class:`PretrainedSource`: plans the labeled dataset can be planned like
(``finetune_plans`` takes them as the pretraining plans), the downstream network (a plans ``architecture``
entry stock nnU-Net builds) and the encoder weights already under that network's key names and axis order.
Foreign formats plug in with :func:`register_format` (a sniff on the loaded dict, and a loader); the file is
read once. :func:`for_downstream` adapts a source to a labeled dataset's channel count and patch size.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import torch
import torch.nn.functional as F

from ssl3d.training.checkpoints import read_checkpoint
from ssl3d.utils import BadInputError

if TYPE_CHECKING:
    from ssl3d.training.methods import SSLMethod

logger = logging.getLogger(__name__)


@dataclass
class PretrainedSource:
    """What fine-tuning needs from a pretraining, whatever wrote it."""

    kind: str                                # "ssl3d", "nnssl", "monai_swinunetr", ...
    checkpoint: Path
    method_name: str                         # ssl3d method name or e.g. "nnssl_ResEncL": plans ssl3d_<name>Plans
    plans: dict                              # nnU-Net plans with a 3d_fullres configuration
    architecture: dict                       # {network_class_name, arch_kwargs, _kw_requires_import}; {} = none
    patch_size: tuple[int, ...]
    n_channels: int                          # input channels the pretraining saw
    encoder_state: dict[str, torch.Tensor]   # downstream key names, (Z, Y, X) axis order
    method: "SSLMethod | None" = None        # the rebuilt SSL method (ssl3d folders); None for foreign files
    info: dict = field(default_factory=dict)  # metadata (what ssl_method.json holds), see for_downstream
    folder: Path | None = None               # the ssl3d results folder (pool dataset.json, fingerprint)

    def describe(self) -> str:
        return f"{self.kind} checkpoint {self.checkpoint} ({self.method_name})"


Sniff = Callable[[Path, dict], bool]
Load = Callable[[Path, dict], PretrainedSource]
_FORMATS: dict[str, tuple[Sniff, Load]] = {}


def register_format(name: str, sniff: Sniff, load: Load) -> None:
    """A foreign checkpoint format: ``sniff(path, loaded)`` says whether it is one, ``load`` converts it."""
    _FORMATS[name] = (sniff, load)


def known_formats() -> list[str]:
    _register_builtin()
    return list(_FORMATS)


def _register_builtin() -> None:
    """Formats shipped with ssl3d register on import (no import at module level: they import this module)."""
    import importlib

    for mod in ("nnssl", "monai_swin"):
        try:
            importlib.import_module(f"ssl3d.training.external.{mod}")
        except ModuleNotFoundError as e:
            if e.name != f"ssl3d.training.external.{mod}":
                raise


def load_pretrained(path: str | os.PathLike, fold: str = "0") -> PretrainedSource:
    """A folder: an ssl3d pretraining (method rebuilt and loaded strictly); a file: the first registered format
    whose sniff accepts it. Anything else is one :class:`BadInputError` line."""
    p = Path(path)
    if p.is_dir():
        return _load_ssl3d(p, fold)
    if not p.exists():
        raise BadInputError(p, "pretraining results folder or checkpoint file does not exist")
    obj = read_checkpoint(p, keys=(), weights_only_first=True)  # one load, one line if unreadable
    _register_builtin()
    for name, (sniff, load) in _FORMATS.items():
        if sniff(p, obj):
            src = load(p, obj)
            logger.info("pretrained weights: %s", src.describe())
            return src
    raise BadInputError(p, f"unknown checkpoint format (top-level keys {sorted(map(str, obj))[:6]}); known: "
                           f"an ssl3d results folder, {', '.join(_FORMATS) or 'no file formats'}")


def _load_ssl3d(folder: Path, fold: str) -> PretrainedSource:
    from ssl3d.training.export import find_pretraining, load_pretrained_method
    from ssl3d.utils import read_json_input

    folder, ckpt = find_pretraining(folder, fold)
    method, plans, info = load_pretrained_method(folder, ckpt)
    n_channels = len(read_json_input(folder / "dataset.json", "the pool's dataset.json")["channel_names"])
    try:  # methods without a downstream network still extract features
        arch, state = method.downstream_architecture(), method.downstream_state_dict()
    except NotImplementedError:
        arch, state = {}, {}
    return PretrainedSource("ssl3d", ckpt, info["name"], plans, arch, tuple(int(p) for p in method.patch_size),
                            n_channels, state, method, info, folder)


def adapt_in_channels(weight: torch.Tensor, n_channels: int) -> torch.Tensor:
    """An input projection ``(out, C_pre, *k)`` for ``n_channels`` inputs: the pretrained filters averaged over
    their channels, repeated and divided by ``n_channels`` (nnssl's rule for 1 -> N: ``w.repeat / N``), so an
    input whose channels all equal one image gives the pretrained response."""
    if weight.shape[1] == n_channels:
        return weight
    mean = weight.mean(dim=1, keepdim=True)
    return mean.repeat(1, n_channels, *([1] * (weight.dim() - 2))) / n_channels


def interpolate_pos_embed(pos_embed: torch.Tensor, grid: Sequence[int], new_grid: Sequence[int]) -> torch.Tensor:
    """``(1, prod(grid), D)`` learned positional embedding resampled trilinearly over the token grid (tokens
    flattened in C order of ``grid``; ``align_corners=False``, what nnssl's fine-tuning uses)."""
    grid, new_grid = tuple(int(g) for g in grid), tuple(int(g) for g in new_grid)
    if grid == new_grid:
        return pos_embed
    b, n, d = pos_embed.shape
    if n != int(torch.tensor(grid).prod()):
        raise ValueError(f"positional embedding has {n} tokens, the pretraining grid {grid} has "
                         f"{int(torch.tensor(grid).prod())}")
    vol = pos_embed.transpose(1, 2).reshape(b, d, *grid)
    out = F.interpolate(vol.float(), size=new_grid, mode="trilinear", align_corners=False).to(pos_embed.dtype)
    return out.reshape(b, d, -1).transpose(1, 2).contiguous()


def for_downstream(src: PretrainedSource, n_channels: int | None = None,
                   patch_size: Sequence[int] | None = None) -> PretrainedSource:
    """``src`` for a labeled dataset with ``n_channels`` inputs and a fine-tuning ``patch_size`` (default:
    ``info['recommended_patch_size']``, else the pretraining patch). Always adapt the source
    :func:`load_pretrained` returned (its weights are the pretrained ones, at the pretraining patch).

    Uses ``info``: ``in_proj_keys`` (input-projection weights whose channel axis is adapted, see
    :func:`adapt_in_channels`), ``pos_embed_key`` (learned positional embedding, interpolated over the token
    grid of ``patch // arch_kwargs['patch_embed_size']``). An ``arch_kwargs['input_shape']`` follows the patch.
    A source without ``in_proj_keys`` refuses another channel count (one line)."""
    n_channels = src.n_channels if n_channels is None else int(n_channels)
    if patch_size is None:  # the pretraining's recommendation for fine-tuning (nnssl), else its own patch
        patch_size = src.info.get("recommended_patch_size") or src.patch_size
    patch = tuple(int(p) for p in patch_size)
    if n_channels == src.n_channels and patch == tuple(src.patch_size):
        return src
    state, arch = dict(src.encoder_state), copy.deepcopy(src.architecture)
    if n_channels != src.n_channels:
        keys = [k for k in src.info.get("in_proj_keys", ()) if k in state]
        if not keys:
            raise BadInputError(src.checkpoint, f"pretrained on {src.n_channels} input channel(s); this encoder "
                                                f"cannot take {n_channels}")
        for k in keys:
            state[k] = adapt_in_channels(state[k], n_channels)
        logger.info("input projection %s adapted from %d to %d channel(s)", keys, src.n_channels, n_channels)
        plans = _plans_for_channels(src, n_channels)
    else:
        plans = src.plans
    kw = arch.get("arch_kwargs", {})
    if patch != tuple(src.patch_size):
        key = src.info.get("pos_embed_key")
        if key and key in state:
            embed = [int(e) for e in kw["patch_embed_size"]]
            if any(p % e for p, e in zip(patch, embed)):
                raise BadInputError(src.checkpoint, f"fine-tuning patch {list(patch)} is not a multiple of the "
                                                    f"token size {embed}")
            old = [p // e for p, e in zip(src.patch_size, embed)]
            new = [p // e for p, e in zip(patch, embed)]
            state[key] = interpolate_pos_embed(state[key], old, new)
            logger.info("positional embedding %s interpolated from grid %s to %s", key, old, new)
        if "input_shape" in kw:
            kw["input_shape"] = list(patch)
    return dataclasses.replace(src, encoder_state=state, architecture=arch, patch_size=patch, plans=plans,
                               n_channels=n_channels, info={**src.info, "adapted_from": {
                                   "n_channels": src.n_channels, "patch_size": list(src.patch_size)}})


def _plans_for_channels(src: PretrainedSource, n_channels: int) -> dict:
    """The plans' per-channel normalization for ``n_channels`` inputs: the pretraining's one scheme for every
    channel (channels are averaged into the input projection, so they must be normalized alike)."""
    plans = copy.deepcopy(src.plans)
    cfg = plans["configurations"]["3d_fullres"]
    schemes, masks = cfg["normalization_schemes"], cfg["use_mask_for_norm"]
    fg = plans.get("foreground_intensity_properties_per_channel") or {}
    if len(set(schemes)) != 1 or len({bool(m) for m in masks}) > 1 or len({str(v) for v in fg.values()}) > 1:
        raise BadInputError(src.checkpoint, f"pretrained on {src.n_channels} differently normalized channels "
                                            f"({schemes}); cannot map them onto {n_channels}")
    cfg["normalization_schemes"] = [schemes[0]] * n_channels
    cfg["use_mask_for_norm"] = [bool(masks[0]) if masks else False] * n_channels
    first = next(iter(fg.values()), {})
    plans["foreground_intensity_properties_per_channel"] = {str(c): copy.deepcopy(first) for c in range(n_channels)}
    return plans


def complete_plans(plans: dict, fingerprint: dict) -> dict:
    """Fill what a foreign pretraining plan leaves open from the labeled dataset's nnU-Net fingerprint: the
    spacing (nnssl ``noresample``/``median`` without one: the dataset's median spacing, transposed) and the
    median shapes nnU-Net records."""
    import numpy as np
    from nnunetv2.preprocessing.resampling.default_resampling import compute_new_shape

    plans = copy.deepcopy(plans)
    cfg = plans["configurations"]["3d_fullres"]
    tf = plans["transpose_forward"]
    spacings = np.asarray(fingerprint["spacings"], dtype=float)
    shapes = np.asarray(fingerprint["shapes_after_crop"], dtype=float)
    if cfg.get("spacing") is None:
        cfg["spacing"] = [float(v) for v in np.median(spacings, 0)[tf]]
        logger.info("pretraining plan without a spacing: the labeled dataset's median %s", cfg["spacing"])
    target = np.asarray(cfg["spacing"], dtype=float)[np.argsort(tf)]  # back to the images' axis order
    resampled = [compute_new_shape(sh, sp, target) for sh, sp in zip(shapes, spacings)]
    if cfg.get("median_image_size_in_voxels") is None:
        cfg["median_image_size_in_voxels"] = [float(v) for v in np.median(np.vstack(resampled), 0)[tf]]
    if plans.get("original_median_shape_after_transp") is None:
        plans["original_median_shape_after_transp"] = [int(round(v)) for v in np.median(shapes, 0)[tf]]
    return plans
