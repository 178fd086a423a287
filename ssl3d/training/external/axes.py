"""Array axis order of pretrained weights: (X, Y, Z) as MONAI's ``LoadImage`` gives, (Z, Y, X) as nnU-Net's.

A network trained on one order is turned into the same function of the other order by permuting the
spatial dimensions of everything that knows about them: conv / patch-embedding kernels, Swin's
relative-position-bias tables (one row per 3D offset) and Swin patch merging (8 sub-voxel slices
concatenated in a fixed offset order, so the blocks of its LayerNorm and reduction follow the offsets).
Per-channel tensors (linear layers, norms, biases) do not depend on the order. A tensor whose role is not
known is refused rather than guessed (``AxisOrderError``, one line).

Only the order is converted, not the direction: MONAI reorients to RAS, nnU-Net keeps each file's own
orientation, so flips between the two are per-dataset and no weight permutation can undo them.
"""
from __future__ import annotations

import itertools
import re
from typing import Sequence

import torch

from ssl3d.utils import BadInputError

AXIS_ORDERS = ("xyz", "zyx")
# MONAI's PatchMerging ("merging", as in v0.9) concatenates the 8 offsets in this order; PatchMergingV2 in
# itertools.product order
MERGING_OFFSETS = {
    "merging": [(0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 1, 0), (1, 0, 1), (0, 1, 1), (1, 1, 1)],
    "mergingv2": list(itertools.product(range(2), repeat=3)),
}
# Swin tensors that act on channels only (per token): unchanged by any axis permutation
_CHANNEL_ONLY = re.compile(r"(^|\.)(norm\d?|qkv|proj|mlp\.(linear|fc)[12]|patch_embed\.norm)\.(weight|bias)$"
                           r"|^patch_embed\.proj\.bias$|\.norm\d?\.(running_mean|running_var|num_batches_tracked)$"
                           r"|(^|\.)conv\d?\.conv\.bias$")


class AxisOrderError(BadInputError):
    """Weights that cannot be converted to the requested axis order (one line via the CLIs, exit code 2)."""

    def __init__(self, problem: str, path=None):
        super().__init__(path, problem)


def axis_permutation(source: str, target: str = "zyx") -> tuple[int, int, int]:
    """``perm`` with ``target_array = source_array.permute(perm)`` over the three spatial axes."""
    for name in (source, target):
        if name not in AXIS_ORDERS:
            raise AxisOrderError(f"unknown axis order {name!r}; choose one of {', '.join(AXIS_ORDERS)}")
    return tuple(source.index(a) for a in target)  # type: ignore[return-value]


def permute_spatial(x: torch.Tensor, perm: Sequence[int]) -> torch.Tensor:
    """An (N, C, *3 spatial) array or (O, I, *3 kernel) conv weight with its last three axes permuted."""
    if x.dim() < 3:
        raise AxisOrderError(f"tensor of shape {tuple(x.shape)} has no three spatial axes to permute")
    lead = x.dim() - 3
    return x.permute(*range(lead), *(lead + int(p) for p in perm)).contiguous()


def permute_conv_kernel(weight: torch.Tensor, perm: Sequence[int]) -> torch.Tensor:
    """A 3D conv (or transposed-conv) kernel for the permuted array: ``conv(permute(x), permute(w)) ==
    permute(conv(x, w))`` (stride, padding and dilation permuted the same way)."""
    if weight.dim() != 5:
        raise AxisOrderError(f"a 3D conv kernel has 5 dimensions, got shape {tuple(weight.shape)}")
    return permute_spatial(weight, perm)


def permute_relative_position_table(table: torch.Tensor, window_size: Sequence[int],
                                    perm: Sequence[int]) -> torch.Tensor:
    """A Swin relative-position-bias table ((2w0-1)(2w1-1)(2w2-1), heads) for the permuted window.

    Row ``(dz + w0 - 1)(2w1 - 1)(2w2 - 1) + (dy + w1 - 1)(2w2 - 1) + dx + w2 - 1`` holds offset (dz, dy, dx)
    (MONAI's ``relative_position_index``); the converted table holds each offset at its permuted place. The
    target network's window is ``window_size`` permuted, so a non-cubic window needs that network.
    """
    sides = [2 * int(w) - 1 for w in window_size]
    if table.dim() != 2 or table.shape[0] != sides[0] * sides[1] * sides[2]:
        raise AxisOrderError(f"relative-position-bias table of shape {tuple(table.shape)} does not fit window "
                             f"{tuple(window_size)} ({sides[0] * sides[1] * sides[2]} rows expected)")
    grid = table.reshape(*sides, table.shape[1])
    return grid.permute(*(int(p) for p in perm), 3).reshape(table.shape).contiguous()


def merging_block_order(perm: Sequence[int], variant: str = "merging") -> list[int]:
    """For each channel block of the converted patch merging, the block of the original it takes."""
    if variant not in MERGING_OFFSETS:
        raise AxisOrderError(f"unknown patch merging {variant!r}; choose one of {', '.join(MERGING_OFFSETS)}")
    offsets = MERGING_OFFSETS[variant]
    order = []
    for t in offsets:  # target slot offset t along target axes; source axis perm[k] carries t[k]
        src = [0, 0, 0]
        for k, p in enumerate(perm):
            src[int(p)] = t[k]
        order.append(offsets.index(tuple(src)))
    return order


def permute_merging_blocks(x: torch.Tensor, perm: Sequence[int], variant: str = "merging",
                           dim: int = -1) -> torch.Tensor:
    """A patch-merging tensor whose ``dim`` has 8 channel blocks (LayerNorm weight/bias, reduction input)."""
    n = x.shape[dim]
    if n % 8:
        raise AxisOrderError(f"patch-merging tensor of shape {tuple(x.shape)}: axis {dim} is not 8 blocks")
    dim = dim % x.dim()
    blocks = x.reshape(*x.shape[:dim], 8, n // 8, *x.shape[dim + 1:])
    idx = torch.tensor(merging_block_order(perm, variant), device=x.device)
    return blocks.index_select(dim, idx).reshape(x.shape).contiguous()


def convert_swin_state(state: dict[str, torch.Tensor], perm: Sequence[int], window_size: Sequence[int],
                       merging: str = "merging") -> dict[str, torch.Tensor]:
    """A MONAI ``SwinTransformer`` state_dict (its own key names) for arrays permuted by ``perm``.

    Every key is classified (kernel, bias table, position index, merging block, channel-only); a key of
    unknown role is refused, since converting it by guess could silently break the encoder.
    """
    perm = tuple(int(p) for p in perm)
    if sorted(perm) != [0, 1, 2]:
        raise AxisOrderError(f"{perm} is not a permutation of the three spatial axes")
    if perm == (0, 1, 2):
        return dict(state)
    if tuple(int(window_size[p]) for p in perm) != tuple(int(w) for w in window_size):
        raise AxisOrderError(f"Swin window {tuple(window_size)} is not cubic: the converted encoder would need "
                             f"window {tuple(int(window_size[p]) for p in perm)}, which the downstream network lacks")
    out = {}
    for k, v in state.items():
        if k.endswith("relative_position_bias_table"):
            out[k] = permute_relative_position_table(v, window_size, perm)
        elif k.endswith("relative_position_index"):
            out[k] = v  # structure (offset -> table row), identical for a cubic window
        elif ".downsample." in k and k.endswith(("norm.weight", "norm.bias")):
            out[k] = permute_merging_blocks(v, perm, merging)
        elif ".downsample." in k and k.endswith("reduction.weight"):
            out[k] = permute_merging_blocks(v, perm, merging, dim=1)
        elif v.dim() == 5 and k.endswith("weight"):
            out[k] = permute_conv_kernel(v, perm)
        elif _CHANNEL_ONLY.search(k):
            out[k] = v
        else:
            raise AxisOrderError(f"cannot tell whether Swin tensor {k} {tuple(v.shape)} depends on the axis order; "
                                 f"refusing to convert")
    return out
