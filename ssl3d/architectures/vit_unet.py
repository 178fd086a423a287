"""``ViTSegNet``: the downstream segmentation network for ``mae`` weights (a UNETR-style light decoder).

The ViT encoder is the pretrained one (``encoder.*`` keys); the decoder upsamples the token map back to the
input resolution with transposed convolutions (per-axis factors, so anisotropic patches such as 4×16×16 work)
and fuses a full-resolution convolutional branch of the input before the segmentation head.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ssl3d.architectures.vit import ViTEncoder
from ssl3d.layers import conv_norm_act


def _upsampling_steps(patch: Sequence[int]) -> list[tuple[int, int, int]]:
    """Factor the patch into steps of at most 2 per axis (16 -> 2,2,2,2; 4 -> 2,2,1,1)."""
    remaining = [int(p) for p in patch]
    steps = []
    while any(r > 1 for r in remaining):
        step = tuple(2 if r % 2 == 0 and r > 1 else (r if r > 1 else 1) for r in remaining)
        steps.append(step)
        remaining = [r // s for r, s in zip(remaining, step)]
    return steps


class ViTSegNet(nn.Module):
    def __init__(self, input_channels: int, num_classes: int, deep_supervision: bool = False,
                 patch_size: Sequence[int] = (16, 16, 16), dim: int = 384, depth: int = 12,
                 decoder_channels: int = 32, **_: dict):
        super().__init__()
        self.encoder = ViTEncoder(input_channels, dim, depth, patch_size)
        self.decoder = _ViTDecoder(input_channels, dim, patch_size, decoder_channels, num_classes)
        self.decoder.deep_supervision = deep_supervision  # nnU-Net toggles this; one output only

    def forward(self, x: torch.Tensor):
        out = self.decoder(x, self.encoder(x))
        return [out] if self.decoder.deep_supervision else out


class _ViTDecoder(nn.Module):
    def __init__(self, in_channels: int, dim: int, patch: Sequence[int], width: int, num_classes: int):
        super().__init__()
        steps = _upsampling_steps(patch)
        chans = [max(width, dim // 2 ** (i + 1)) for i in range(len(steps))]
        ups, c = [], dim
        for st, co in zip(steps, chans):
            ups += [nn.ConvTranspose3d(c, co, st, st), nn.InstanceNorm3d(co, affine=True), nn.LeakyReLU(inplace=True)]
            c = co
        self.up = nn.Sequential(*ups)
        self.input_branch = nn.Sequential(conv_norm_act(in_channels, width), conv_norm_act(width, width))
        self.fuse = nn.Sequential(conv_norm_act(c + width, width), conv_norm_act(width, width))
        self.seg_layers = nn.ModuleList([nn.Conv3d(width, num_classes, 1)])
        self.deep_supervision = False

    def forward(self, x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        y = torch.cat([self.up(tokens), self.input_branch(x)], 1)
        return self.seg_layers[0](self.fuse(y))
