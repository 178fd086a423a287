"""The ground floor of the network code: small layers and shape helpers that models, decoders and the sparse
library all use. Imports nothing from ssl3d except ``utils``, so every package may import it."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ssl3d.utils import as_triple

Triple = tuple[int, int, int]


def total_stride(strides: Sequence[int | Sequence[int]]) -> Triple:
    """Per-axis product of per-stage strides: the input voxels per voxel after the last of them."""
    out = [1, 1, 1]
    for s in strides:
        out = [a * b for a, b in zip(out, as_triple(s))]
    return tuple(out)  # type: ignore[return-value]


def conv_norm_act(c_in: int, c_out: int, k: int = 3) -> nn.Sequential:
    """3D conv (no bias) -> affine InstanceNorm -> LeakyReLU, nnU-Net's basic block."""
    return nn.Sequential(nn.Conv3d(c_in, c_out, k, padding=k // 2, bias=False), nn.InstanceNorm3d(c_out, affine=True),
                         nn.LeakyReLU(inplace=True))


class LayerNormCF(nn.Module):
    """LayerNorm over the channel axis of ``(B, C, D, H, W)`` (ConvNeXt's channels-first LayerNorm)."""

    def __init__(self, num_channels: int, eps: float = 1e-6):
        super().__init__()
        self.num_channels = num_channels
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(1, keepdim=True)
        var = (x - mean).pow(2).mean(1, keepdim=True)
        y = (x - mean) * torch.rsqrt(var + self.eps)
        return y * self.weight.view(1, -1, 1, 1, 1) + self.bias.view(1, -1, 1, 1, 1)

    def extra_repr(self) -> str:
        return f"{self.num_channels}, eps={self.eps}"


__all__ = ["LayerNormCF", "Triple", "conv_norm_act", "total_stride"]
