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
# The 8 sub-voxel offsets (along the network's array axes) each patch merging concatenates, in order.
# "monai<1.5": MONAI's PatchMerging until 1.4 (what SwinUNETR/Pretrain and the public SSL weights used): 010 and
# 001 twice, 110 and 011 never (fixed in MONAI 1.5, PR 8285); "merging": MONAI >= 1.5; "mergingv2": PatchMergingV2.
MERGING_OFFSETS = {
    "monai<1.5": [(0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 0, 1), (0, 1, 0), (0, 0, 1), (1, 1, 1)],
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


def merging_offsets(variant) -> list[tuple[int, int, int]]:
    """A named order (``MERGING_OFFSETS``), an explicit offset list, or a MONAI merging class, whose order is
    read off its forward (the input its LayerNorm sees for a 2x2x2 map holding each voxel's offset code)."""
    if isinstance(variant, str):
        if variant not in MERGING_OFFSETS:
            raise AxisOrderError(f"unknown patch merging {variant!r}; choose one of {', '.join(MERGING_OFFSETS)}")
        return MERGING_OFFSETS[variant]
    if isinstance(variant, type):
        module, seen = variant(dim=1, spatial_dims=3), []
        hook = module.norm.register_forward_hook(lambda _m, inp, _o: seen.append(inp[0].reshape(-1)))
        code = torch.tensor([4.0 * a + 2 * b + c for a, b, c in itertools.product(range(2), repeat=3)])
        with torch.no_grad():
            module(code.reshape(1, 2, 2, 2, 1))
        hook.remove()
        return [(int(v) // 4, int(v) // 2 % 2, int(v) % 2) for v in seen[0].tolist()]
    return [tuple(int(a) for a in o) for o in variant]


def _source_offset(target_offset, perm: Sequence[int]) -> tuple[int, int, int]:
    src = [0, 0, 0]
    for k, p in enumerate(perm):  # target axis k is source axis perm[k]
        src[int(p)] = target_offset[k]
    return tuple(src)  # type: ignore[return-value]


def merging_block_order(perm: Sequence[int], variant="merging") -> list[int]:
    """For each channel block of the converted patch merging, the block of the original it takes (one order
    on both sides: a pure permutation)."""
    offsets = merging_offsets(variant)
    return [offsets.index(_source_offset(t, perm)) for t in offsets]


def convert_patch_merging(norm_weight: torch.Tensor, norm_bias: torch.Tensor, reduction: torch.Tensor,
                          perm: Sequence[int], source="merging", target="merging") -> tuple[torch.Tensor, ...]:
    """Patch-merging LayerNorm (8C) and reduction (2C, 8C) trained with ``source``'s slices for a network
    concatenating ``target``'s slices of the ``perm``-permuted array. Returns (weight, bias, reduction, exact).

    Each target block takes the source block of the same offset. An offset the source concatenated twice is
    folded into one block (its LayerNorm scales moved into the reduction, the shifts' constant output carried by
    a block whose offset the source never saw: LayerNorm weight 0, bias 1 on one channel). The linear part is
    then exact; the LayerNorm statistics are equal only when both sides concatenate the same offsets
    (``exact``), which MONAI < 1.5 weights in a MONAI >= 1.5 network never do."""
    src, tgt = merging_offsets(source), merging_offsets(target)
    c = norm_weight.numel() // 8
    if norm_weight.numel() != 8 * c or reduction.dim() != 2 or reduction.shape[1] != 8 * c:
        raise AxisOrderError(f"patch merging of shapes {tuple(norm_weight.shape)}, {tuple(reduction.shape)} is not "
                             f"8 blocks")
    g, b, r = norm_weight.reshape(8, c), norm_bias.reshape(8, c), reduction.reshape(-1, 8, c)
    ng, nb, nr = torch.zeros_like(g), torch.zeros_like(b), torch.zeros_like(r)
    const, unseen = torch.zeros(r.shape[0], dtype=r.dtype), []
    for t, offset in enumerate(tgt):
        blocks = [s for s, o in enumerate(src) if o == _source_offset(offset, perm)]
        if len(blocks) == 1:
            ng[t], nb[t], nr[:, t] = g[blocks[0]], b[blocks[0]], r[:, blocks[0]]
        elif not blocks:
            unseen.append(t)  # LayerNorm weight/bias 0 and no reduction: contributes nothing
        else:
            ng[t] = 1.0
            nr[:, t] = sum(r[:, s] * g[s] for s in blocks)
            const += sum(r[:, s] @ b[s] for s in blocks)
    if const.abs().max() > 0:
        if not unseen:
            raise AxisOrderError("patch merging: no free block to carry the folded LayerNorm shifts")
        nb[unseen[0], 0], nr[:, unseen[0], 0] = 1.0, const
    exact = sorted(src) == sorted(_source_offset(t, perm) for t in tgt)
    return ng.reshape(norm_weight.shape), nb.reshape(norm_bias.shape), nr.reshape(reduction.shape), exact


def convert_swin_state(state: dict[str, torch.Tensor], perm: Sequence[int], window_size: Sequence[int],
                       source_merging="merging", target_merging="merging",
                       report: dict | None = None) -> dict[str, torch.Tensor]:
    """A MONAI ``SwinTransformer`` state_dict (its own key names) for arrays permuted by ``perm``, its patch
    mergings trained with ``source_merging``'s slices and loaded into ``target_merging``'s
    (:func:`convert_patch_merging`; ``report["inexact_merging"]`` lists those whose statistics differ).

    Every key is classified (kernel, bias table, position index, merging block, channel-only); a key of
    unknown role is refused, since converting it by guess could silently break the encoder.
    """
    perm = tuple(int(p) for p in perm)
    if sorted(perm) != [0, 1, 2]:
        raise AxisOrderError(f"{perm} is not a permutation of the three spatial axes")
    same_merging = merging_offsets(source_merging) == merging_offsets(target_merging)
    if perm == (0, 1, 2) and same_merging:
        if report is not None:
            report["inexact_merging"] = []
        return dict(state)
    if tuple(int(window_size[p]) for p in perm) != tuple(int(w) for w in window_size):
        raise AxisOrderError(f"Swin window {tuple(window_size)} is not cubic: the converted encoder would need "
                             f"window {tuple(int(window_size[p]) for p in perm)}, which the downstream network lacks")
    out, inexact = {}, []
    for k in sorted(k for k in state if k.endswith(".downsample.reduction.weight")):
        root = k[: -len("reduction.weight")]
        try:
            w, b, r = state[root + "norm.weight"], state[root + "norm.bias"], state[k]
        except KeyError as e:
            raise AxisOrderError(f"patch merging {root[:-1]} lacks {e.args[0]}") from None
        *converted, exact = convert_patch_merging(w, b, r, perm, source_merging, target_merging)
        out.update(zip((root + "norm.weight", root + "norm.bias", k), converted))
        if not exact:
            inexact.append(root[:-1])
    if report is not None:
        report["inexact_merging"] = inexact
    for k, v in state.items():
        if k in out:
            continue
        if k.endswith("relative_position_bias_table"):
            out[k] = permute_relative_position_table(v, window_size, perm)
        elif k.endswith("relative_position_index"):
            out[k] = v  # structure (offset -> table row), identical for a cubic window
        elif v.dim() == 5 and k.endswith("weight"):
            out[k] = permute_conv_kernel(v, perm)
        elif _CHANNEL_ONLY.search(k):
            out[k] = v
        else:
            raise AxisOrderError(f"cannot tell whether Swin tensor {k} {tuple(v.shape)} depends on the axis order; "
                                 f"refusing to convert")
    return out
