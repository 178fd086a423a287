"""The plain 3D transformer of HySparK/MiM (tokens at the CNN junction) and patch/token helpers shared by the methods.

Transformer blocks are PyTorch's own pre-norm ``nn.TransformerEncoderLayer`` (fused attention kernels on GPU);
positions are fixed 3D sin-cos embeddings computed for whatever token grid the input has, so one network
works on any patch size that is a multiple of its junction stride. (``mae`` pretrains dna's Primus instead:
``ssl3d.architectures.primus``; its fixed position grid suits a patch-embedding ViT, not a CNN junction.)
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


def sincos_position_embedding(grid: Sequence[int], dim: int, device=None) -> torch.Tensor:
    """Fixed 3D sin-cos positions ``(N, dim)`` for a (z, y, x) token grid, raster order.

    ``dim`` is split into three equal parts (one per axis), each half sine, half cosine, as in MAE's 2D
    version extended to 3D. Dimensions left over by the split are zero.
    """
    per_axis = (dim // 6) * 2
    if per_axis == 0:
        raise ValueError(f"embedding dim {dim} too small for 3D sin-cos positions (needs >= 6)")
    omega = 1.0 / (10000 ** (torch.arange(per_axis // 2, dtype=torch.float64, device=device) / (per_axis // 2)))
    coords = torch.meshgrid(*[torch.arange(g, dtype=torch.float64, device=device) for g in grid], indexing="ij")
    parts = []
    for c in coords:
        angles = c.reshape(-1, 1) * omega[None]
        parts += [torch.sin(angles), torch.cos(angles)]
    emb = torch.cat(parts, dim=1)
    if emb.shape[1] < dim:
        emb = torch.cat([emb, emb.new_zeros(emb.shape[0], dim - emb.shape[1])], dim=1)
    return emb.float()


class TransformerStack(nn.Module):
    """``depth`` pre-norm transformer blocks + final LayerNorm, on ``(B, N, dim)`` tokens with optional padding."""

    def __init__(self, dim: int, depth: int, heads: int, mlp_ratio: float = 4.0, dropout: float = 0.0):
        super().__init__()
        self.blocks = nn.ModuleList([
            nn.TransformerEncoderLayer(dim, heads, int(dim * mlp_ratio), dropout, activation="gelu",
                                       batch_first=True, norm_first=True)
            for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, padding: torch.Tensor | None = None) -> torch.Tensor:
        if padding is not None and not bool(padding.any()):
            padding = None  # equal counts: no key-padding mask, so the fast path stays available
        for blk in self.blocks:
            x = blk(x, src_key_padding_mask=padding)
        return self.norm(x)


def gather_tokens(tokens: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``tokens (B, N, C)``, ``index (B, M)`` -> ``(B, M, C)``."""
    return tokens.gather(1, index[..., None].expand(-1, -1, tokens.shape[-1]))


def scatter_tokens(visible: torch.Tensor, index: torch.Tensor, padding: torch.Tensor | None, n_tokens: int,
                   fill: torch.Tensor) -> torch.Tensor:
    """Put visible tokens ``(B, M, C)`` back on the full grid ``(B, N, C)``; every other slot gets ``fill (C,)``."""
    b, _, c = visible.shape
    full = fill.to(visible.dtype).expand(b, n_tokens, c).clone()
    if padding is not None and bool(padding.any()):
        keep = ~padding
        rows = torch.arange(b, device=visible.device)[:, None].expand_as(index)
        full[rows[keep], index[keep]] = visible[keep]
    else:
        full.scatter_(1, index[..., None].expand(-1, -1, c), visible)
    return full


def patchify(x: torch.Tensor, patch: Sequence[int]) -> torch.Tensor:
    """``(B, C, D, H, W)`` -> ``(B, N, pz*py*px*C)`` patches in raster order of the patch grid."""
    b, c, d, h, w = x.shape
    pz, py, px = patch
    x = x.reshape(b, c, d // pz, pz, h // py, py, w // px, px)
    x = x.permute(0, 2, 4, 6, 3, 5, 7, 1)
    return x.reshape(b, (d // pz) * (h // py) * (w // px), pz * py * px * c)


def unpatchify(p: torch.Tensor, patch: Sequence[int], grid: Sequence[int], channels: int) -> torch.Tensor:
    """Inverse of :func:`patchify`."""
    b = p.shape[0]
    pz, py, px = patch
    gz, gy, gx = grid
    x = p.reshape(b, gz, gy, gx, pz, py, px, channels)
    x = x.permute(0, 7, 1, 4, 2, 5, 3, 6)
    return x.reshape(b, channels, gz * pz, gy * py, gx * px)


def init_vit_weights(module: nn.Module) -> None:
    """Xavier linear layers and unit LayerNorms (MAE's initialisation)."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def num_heads_for(dim: int, head_dim: int = 64) -> int:
    """Heads so that each has about ``head_dim`` channels and divides ``dim``."""
    h = max(1, round(dim / head_dim))
    while dim % h:
        h -= 1
    return h


__all__ = ["sincos_position_embedding", "TransformerStack", "gather_tokens", "scatter_tokens", "patchify",
           "unpatchify", "init_vit_weights", "num_heads_for"]
