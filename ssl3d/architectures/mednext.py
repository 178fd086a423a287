"""Dense MedNeXt-style encoder used by HySparK (its sparse twin comes from ``ssl3d.sparse.sparsify``).

Block: depthwise k³ conv → channels-first LayerNorm → 1×1×1 expand (×r) → GELU → 1×1×1 project, residual.
Stages downsample with max-pooling (HySparK), then a 1×1×1 projection when the width changes.
"""
from __future__ import annotations

from typing import Sequence

from torch import nn

from ssl3d.layers import LayerNormCF
from ssl3d.utils import as_triple


class MedNeXtBlock(nn.Module):
    def __init__(self, channels: int, kernel_size: int | Sequence[int] = 7, expansion: int = 4,
                 norm_eps: float = 1e-6):
        super().__init__()
        k = as_triple(kernel_size)
        self.dw = nn.Conv3d(channels, channels, k, padding=tuple(i // 2 for i in k), groups=channels)
        self.norm = LayerNormCF(channels, norm_eps)
        self.expand = nn.Conv3d(channels, channels * expansion, 1)
        self.act = nn.GELU()
        self.project = nn.Conv3d(channels * expansion, channels, 1)

    def forward(self, x):
        # written with `+` (not in-place) so it works on tensors and ssl3d.sparse.SparseTensor alike
        return x + self.project(self.act(self.expand(self.norm(self.dw(x)))))


class MedNeXtStage(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, n_blocks: int = 2,
                 kernel_size: int | Sequence[int] = 7, expansion: int = 4,
                 stride: int | Sequence[int] = 1):
        super().__init__()
        s = as_triple(stride)
        self.stride = s
        self.pool = nn.MaxPool3d(s, s) if any(i > 1 for i in s) else nn.Identity()
        self.proj = nn.Conv3d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()
        self.blocks = nn.Sequential(*[MedNeXtBlock(out_channels, kernel_size, expansion) for _ in range(n_blocks)])

    def forward(self, x):
        return self.blocks(self.proj(self.pool(x)))


class MedNeXtEncoder(nn.Module):
    """Stem (1×1×1 conv) + MedNeXt stages; returns every stage's output when ``return_skips``."""

    def __init__(self, input_channels: int, features_per_stage: Sequence[int],
                 strides: Sequence[int | Sequence[int]], n_blocks_per_stage: int | Sequence[int] = 2,
                 kernel_sizes: int | Sequence[int] = 7, expansion: int | Sequence[int] = 4,
                 return_skips: bool = True):
        super().__init__()
        n = len(features_per_stage)
        if len(strides) != n:
            raise ValueError("strides must have one entry per stage")
        nb = [n_blocks_per_stage] * n if isinstance(n_blocks_per_stage, int) else list(n_blocks_per_stage)
        ks = [kernel_sizes] * n if isinstance(kernel_sizes, int) else list(kernel_sizes)
        ex = [expansion] * n if isinstance(expansion, int) else list(expansion)
        self.stem = nn.Conv3d(input_channels, features_per_stage[0], 1)
        stages = []
        c_in = features_per_stage[0]
        for i in range(n):
            stages.append(MedNeXtStage(c_in, features_per_stage[i], nb[i], ks[i], ex[i], strides[i]))
            c_in = features_per_stage[i]
        self.stages = nn.Sequential(*stages)
        self.output_channels = list(features_per_stage)
        self.strides = [as_triple(s) for s in strides]
        self.return_skips = return_skips

    def forward(self, x):
        x = self.stem(x)
        ret = []
        for stage in self.stages:
            x = stage(x)
            ret.append(x)
        return ret if self.return_skips else ret[-1]


__all__ = ["LayerNormCF", "MedNeXtBlock", "MedNeXtStage", "MedNeXtEncoder"]
