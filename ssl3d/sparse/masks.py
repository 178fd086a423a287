"""Mask utilities: random cell masks, pyramids, HySparK bottom-up masks and visible-token index lists.

Convention everywhere in ``ssl3d.sparse``: a mask is boolean and ``True`` means *visible* (active, kept);
``False`` means masked out. A *cell mask* is a grid ``(B, gz, gy, gx)`` with one entry per cell; the mask
at any feature resolution ``(D, H, W)`` is its nearest-neighbour upsampling (voxel ``d`` belongs to cell
``d * gz // D``), which is exact repetition when the resolution is a multiple of the grid.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Sequence

import torch

from ssl3d.layers import Triple, total_stride  # noqa: F401  (re-exported: masks are built per stride)
from ssl3d.utils import as_triple


def random_cell_mask(batch: int, grid: int | Sequence[int], ratio: float,
                     generator: torch.Generator | None = None,
                     device: torch.device | str | None = None) -> torch.Tensor:
    """Random boolean cell mask ``(B, gz, gy, gx)``, True = visible.

    Every sample gets its own mask with exactly ``round(ratio * n_cells)`` masked cells (same count in every
    sample, so per-sample visible-token counts are equal and exact). Seed through ``generator``.
    """
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"mask ratio must be in [0, 1], got {ratio}")
    g = as_triple(grid)
    n = g[0] * g[1] * g[2]
    n_masked = int(round(ratio * n))
    scores = torch.rand(batch, n, generator=generator)  # on CPU so the seed gives the same mask on any device
    order = scores.argsort(dim=1)
    mask = torch.ones(batch, n, dtype=torch.bool)
    mask.scatter_(1, order[:, :n_masked], False)
    return mask.view(batch, *g).to(device) if device is not None else mask.view(batch, *g)


def upsample_mask(mask: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Nearest-neighbour resample a boolean mask ``(B, gz, gy, gx)`` to ``(B, *shape)``.

    Works for up- and downsampling and anisotropic factors; voxel ``d`` takes cell ``d * g // D``.
    """
    if mask.dim() != 4:
        raise ValueError(f"mask must be (B, gz, gy, gx), got shape {tuple(mask.shape)}")
    shape = as_triple(shape)
    if tuple(mask.shape[1:]) == shape:
        return mask
    out = mask
    for axis, size in enumerate(shape):
        g = mask.shape[axis + 1]
        idx = torch.div(torch.arange(size, device=mask.device) * g, size, rounding_mode="floor")
        out = out.index_select(axis + 1, idx)
    return out


def mask_pyramid(cell_mask: torch.Tensor, cell_size: int | Sequence[int],
                 strides: Sequence[int | Sequence[int]]) -> list[torch.Tensor]:
    """Masks ``(B, D_s, H_s, W_s)`` for every stage of an encoder with the given per-stage strides.

    The input resolution is ``grid * cell_size``; entry ``s`` is the mask after applying ``strides[0..s]``
    (ResidualEncoder convention: ``strides[0]`` is usually 1). Strides may be anisotropic.
    """
    size = [g * c for g, c in zip(cell_mask.shape[1:], as_triple(cell_size))]
    out = []
    for s in strides:
        st = as_triple(s)
        size = [max(1, z // t) for z, t in zip(size, st)]
        out.append(upsample_mask(cell_mask, size))
    return out


@dataclass
class BottomUpMasks:
    """HySparK bottom-up masks: drawn on the ViT token grid, mapped up to every CNN stage and the input."""

    token_mask: torch.Tensor          # (B, tz, ty, tx), True = visible token
    stage_masks: list[torch.Tensor]   # one per CNN stage, finest first, (B, D_s, H_s, W_s)
    input_mask: torch.Tensor          # (B, D, H, W) at the input resolution


def bottom_up_masks(batch: int, token_grid: int | Sequence[int], ratio: float,
                    stage_strides: Sequence[int | Sequence[int]],
                    generator: torch.Generator | None = None,
                    device: torch.device | str | None = None) -> BottomUpMasks:
    """Draw a mask on the junction grid and upsample it to every CNN stage (HySparK's bottom-up masking).

    ``stage_strides[s]`` is the stride applied at the start of CNN stage ``s``; the ViT grid is the
    resolution after the last stage, so stage ``s`` resolution = token_grid * prod(stage_strides[s+1:]).
    """
    tg = as_triple(token_grid)
    token_mask = random_cell_mask(batch, tg, ratio, generator, device)
    strides = [as_triple(s) for s in stage_strides]
    sizes: list[list[int]] = []
    size = list(tg)
    for st in reversed(strides):
        sizes.append(list(size))
        size = [z * t for z, t in zip(size, st)]
    input_size = size
    stage_masks = [upsample_mask(token_mask, s) for s in reversed(sizes)]
    return BottomUpMasks(token_mask, stage_masks, upsample_mask(token_mask, input_size))


class VisibleTokens(NamedTuple):
    """Per-sample indices of visible tokens in raster order of the flattened grid."""

    index: torch.Tensor    # (B, n_max) long, padded with 0 where ``padding`` is True
    counts: torch.Tensor   # (B,) exact number of visible tokens of each sample
    padding: torch.Tensor  # (B, n_max) bool, True for padding entries (all False when counts are equal)


def visible_token_indices(mask: torch.Tensor) -> VisibleTokens:
    """Visible-token indices per sample, counted per sample (never summed over the batch).

    ``mask`` is ``(B, ...)`` boolean (any grid shape); tokens are numbered in raster order of ``mask[b]``.
    Use ``tokens.gather(1, vis.index[..., None].expand(-1, -1, C))`` to pick them from ``(B, N, C)``.
    """
    flat = mask.reshape(mask.shape[0], -1).bool()
    counts = flat.sum(1)
    n_max = int(counts.max().item()) if flat.shape[0] else 0
    # stable sort puts visible tokens first, in raster order
    order = torch.sort((~flat).to(torch.uint8), dim=1, stable=True).indices[:, :n_max]
    padding = torch.arange(n_max, device=mask.device)[None, :] >= counts[:, None]
    index = order.masked_fill(padding, 0)
    return VisibleTokens(index, counts, padding)


def cell_size_of(shape: Sequence[int], grid: Sequence[int]) -> Triple | None:
    """Voxels per cell along each axis at a resolution, or None when the resolution is not a whole multiple."""
    out = []
    for s, g in zip(shape, grid):
        if s % g:
            return None
        out.append(s // g)
    return tuple(out)  # type: ignore[return-value]


def mask_ratio(mask: torch.Tensor) -> float:
    """Fraction of masked (False) entries."""
    return 1.0 - float(mask.float().mean().item()) if mask.numel() else 0.0


__all__ = ["random_cell_mask", "upsample_mask", "mask_pyramid", "bottom_up_masks", "BottomUpMasks",
           "visible_token_indices", "VisibleTokens", "cell_size_of", "mask_ratio", "total_stride"]
