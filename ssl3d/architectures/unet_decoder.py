"""One U-Net decoder for every CNN-like encoder here: HySparK's downstream ``HybridUNet`` and the light
reconstruction decoders of the masked-CNN pretraining methods.

Per level, from the deepest up: transposed conv by that level's stride, skip fused by ``fusion``
(``"add"`` as SparK, ``"concat"`` as HySparK/nnU-Net), two conv-norm-act blocks. ``strides[s]`` is the
downsampling into level ``s``; a strided level 0 is upsampled once more before the last head so outputs are at
input resolution. Key names follow nnU-Net's decoders (``transpconvs``, ``stages``, ``seg_layers``).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ssl3d.layers import conv_norm_act


class UNetDecoder(nn.Module):
    """``heads="all"``: one 1×1 head per level (nnU-Net deep supervision, toggled by ``deep_supervision``);
    ``heads="last"``: only the full-resolution head (pretraining decoders: no unused parameters under DDP)."""

    def __init__(self, channels: Sequence[int], strides: Sequence[Sequence[int]], out_channels: int,
                 fusion: str = "concat", deep_supervision: bool = False, heads: str = "all"):
        super().__init__()
        if fusion not in ("add", "concat"):
            raise ValueError(f"fusion must be 'add' or 'concat', got {fusion}")
        if heads not in ("all", "last"):
            raise ValueError(f"heads must be 'all' or 'last', got {heads}")
        self.fusion = fusion
        self.deep_supervision = deep_supervision
        self.transpconvs = nn.ModuleList()
        self.stages = nn.ModuleList()
        self.seg_layers = nn.ModuleList()
        for s in range(len(channels) - 2, -1, -1):
            st = tuple(int(i) for i in strides[s + 1])
            self.transpconvs.append(nn.ConvTranspose3d(channels[s + 1], channels[s], st, st))
            c_in = channels[s] * (2 if fusion == "concat" else 1)
            self.stages.append(nn.Sequential(conv_norm_act(c_in, channels[s]), conv_norm_act(channels[s], channels[s])))
            if heads == "all" or s == 0:
                self.seg_layers.append(nn.Conv3d(channels[s], out_channels, 1))
        st0 = tuple(int(i) for i in strides[0])
        self.final_up = nn.ConvTranspose3d(channels[0], channels[0], st0, st0) if any(i > 1 for i in st0) \
            else nn.Identity()

    def forward(self, skips: Sequence[torch.Tensor]):
        y = skips[-1]
        outs = []
        last = len(self.stages) - 1
        for i, (up, stage) in enumerate(zip(self.transpconvs, self.stages)):
            skip = skips[len(skips) - 2 - i]
            y = up(y)
            y = stage(torch.cat([y, skip], 1) if self.fusion == "concat" else y + skip)
            if i == last:
                outs.append(self.seg_layers[-1](self.final_up(y)))
            elif self.deep_supervision and len(self.seg_layers) > 1:
                outs.append(self.seg_layers[i](y))
        outs = outs[::-1]  # highest resolution first, as nnU-Net expects
        return outs if self.deep_supervision else outs[0]
