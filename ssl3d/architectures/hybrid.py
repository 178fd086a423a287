"""HySparK's hybrid encoder (MedNeXt-style CNN stages, then a ViT on the junction grid) and its U-Net.

``HybridEncoder(x, visible=None)`` returns one feature map per level: the CNN stages before the junction
and the ViT output at the junction grid (one token per junction voxel). With a token mask the CNN runs
sparsely on visible voxels and the ViT sees only the visible tokens (counted per sample); masked positions
come back as zeros. ``HybridUNet`` is the downstream segmentation network nnU-Net builds from the plans
(``network_class_name = "ssl3d.architectures.hybrid.HybridUNet"``); its ``encoder.*`` keys are the ones
pretraining produces, its ``decoder.seg_layers`` are the only freshly initialised heads nnU-Net may skip.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ssl3d.architectures.mednext import MedNeXtEncoder
from ssl3d.architectures.unet_decoder import UNetDecoder
from ssl3d.architectures.vit import (TransformerStack, gather_tokens, init_vit_weights, num_heads_for, scatter_tokens,
                                     sincos_position_embedding)
from ssl3d.sparse import sparse_forward, sparsify, visible_token_indices


def _cnn_kernels(kernel_sizes: Sequence[Sequence[int]], k: int) -> list[tuple[int, int, int]]:
    """Plans kernels (1 or 3 per axis) -> depthwise MedNeXt kernels (1 stays 1: anisotropic axes)."""
    return [tuple(1 if int(a) == 1 else k for a in ks) for ks in kernel_sizes]


class HybridEncoder(nn.Module):
    def __init__(self, input_channels: int, features_per_stage: Sequence[int], strides: Sequence[Sequence[int]],
                 kernel_sizes: Sequence[Sequence[int]], n_blocks_per_stage: int | Sequence[int] = 2,
                 depthwise_kernel: int = 3, expansion: int = 4, vit_dim: int = 384, vit_depth: int = 3,
                 backend: str = "auto"):
        super().__init__()
        self.cnn = sparsify(MedNeXtEncoder(input_channels, list(features_per_stage), [list(s) for s in strides],
                                           n_blocks_per_stage, _cnn_kernels(kernel_sizes, depthwise_kernel),
                                           expansion), backend, inplace=True)
        self.to_tokens = nn.Linear(features_per_stage[-1], vit_dim)
        self.vit = TransformerStack(vit_dim, vit_depth, num_heads_for(vit_dim))
        self.to_tokens.apply(init_vit_weights)
        self.vit.apply(init_vit_weights)
        self.output_channels = list(features_per_stage[:-1]) + [vit_dim]
        self.strides = [tuple(int(i) for i in s) for s in strides]

    def forward(self, x: torch.Tensor, visible: torch.Tensor | None = None) -> list[torch.Tensor]:
        skips = sparse_forward(self.cnn, x, visible)
        f = skips[-1]
        grid = tuple(f.shape[2:])
        tokens = self.to_tokens(f.flatten(2).transpose(1, 2))
        tokens = tokens + sincos_position_embedding(grid, tokens.shape[-1], tokens.device).to(tokens.dtype)
        if visible is None:
            out = self.vit(tokens)
        else:
            if tuple(visible.shape[1:]) != grid:
                raise ValueError(f"token mask grid {tuple(visible.shape[1:])} != junction grid {grid}")
            vis = visible_token_indices(visible)
            enc = self.vit(gather_tokens(tokens, vis.index), vis.padding)
            out = scatter_tokens(enc, vis.index, vis.padding, tokens.shape[1], enc.new_zeros(enc.shape[-1]))
        vit_map = out.transpose(1, 2).reshape(f.shape[0], -1, *grid)
        return list(skips[:-1]) + [vit_map]


class HybridUNet(nn.Module):
    """Downstream network for ``hyspark`` weights; constructor signature as nnU-Net calls architectures."""

    def __init__(self, input_channels: int, num_classes: int, deep_supervision: bool = False,
                 features_per_stage: Sequence[int] = (32, 64, 128, 256), strides: Sequence[Sequence[int]] = (),
                 kernel_sizes: Sequence[Sequence[int]] = (), n_blocks_per_stage: int | Sequence[int] = 2,
                 depthwise_kernel: int = 3, expansion: int = 4, vit_dim: int = 384, vit_depth: int = 3, **_: dict):
        super().__init__()
        self.encoder = HybridEncoder(input_channels, features_per_stage, strides, kernel_sizes, n_blocks_per_stage,
                                     depthwise_kernel, expansion, vit_dim, vit_depth)
        self.decoder = UNetDecoder(self.encoder.output_channels, strides, num_classes, "concat", deep_supervision)

    def forward(self, x: torch.Tensor):
        return self.decoder(self.encoder(x))


def hybrid_arch_kwargs(configuration: dict, size: str = "S") -> dict:
    """HybridUNet/HybridEncoder arguments from a plans configuration: CNN up to the planned junction."""
    kw = configuration["architecture"]["arch_kwargs"]
    j = int(configuration["ssl3d"]["hybrid_junction_stage"])
    feats = list(kw["features_per_stage"][: j + 1])
    presets = {"S": (2, 384, 3), "tiny": (1, 48, 1)}
    if size not in presets:
        raise ValueError(f"unknown size '{size}' ({', '.join(presets)})")
    blocks, vit_dim, vit_depth = presets[size]
    if size == "tiny":
        feats = [max(4, c // 4) for c in feats]
    return {"features_per_stage": feats, "strides": [list(s) for s in kw["strides"][: j + 1]],
            "kernel_sizes": [list(k) for k in kw["kernel_sizes"][: j + 1]], "n_blocks_per_stage": blocks,
            "vit_dim": vit_dim, "vit_depth": vit_depth}
