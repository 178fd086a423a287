"""Shared pieces of the masked-CNN methods (SparK, HySparK): densify and a light U-Net decoder.

Densify follows SparK: each stage's visible features are normalized with statistics over the *visible*
voxels only, then masked positions are filled with a learnable per-stage token, then projected (1×1×1 at
the deepest stage, 3³ elsewhere). Normalizing after filling (a dense norm over a map that is 75 % token)
would make the visible features depend on the token and on the mask ratio.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ssl3d.architectures.unet_decoder import UNetDecoder
from ssl3d.architectures.vit import patchify, unpatchify
from ssl3d.sparse import upsample_mask
from ssl3d.sparse.ops import sparse_instance_norm
from ssl3d.training.losses import denormalize_prediction, masked_cell_mse
from ssl3d.training.methods.base import SSLMethod


class Densify(nn.Module):
    def __init__(self, in_channels: Sequence[int], out_channels: Sequence[int]):
        super().__init__()
        self.mask_tokens = nn.ParameterList([nn.Parameter(torch.zeros(c)) for c in in_channels])
        for t in self.mask_tokens:
            nn.init.trunc_normal_(t, std=0.02)
        self.norms = nn.ModuleList([nn.InstanceNorm3d(c, affine=True) for c in in_channels])
        last = len(in_channels) - 1
        self.proj = nn.ModuleList([nn.Conv3d(ci, co, 1 if s == last else 3, padding=0 if s == last else 1)
                                   for s, (ci, co) in enumerate(zip(in_channels, out_channels))])

    def forward(self, feats: Sequence[torch.Tensor], visible: torch.Tensor) -> list[torch.Tensor]:
        out = []
        for f, token, norm, proj in zip(feats, self.mask_tokens, self.norms, self.proj):
            m = upsample_mask(visible, f.shape[2:])
            f = sparse_instance_norm(f, m, None, None, norm.weight, norm.bias, True, 0.0, norm.eps)
            out.append(proj(torch.where(m[:, None], f, token.view(1, -1, 1, 1, 1).to(f.dtype))))
        return out


def decoder_widths(features: Sequence[int], factor: float = 0.5, minimum: int = 16) -> list[int]:
    """Light decoder: half the encoder width per level (at least ``minimum``)."""
    return [max(minimum, int(c * factor)) for c in features]


class DensifyDecoderMethod(SSLMethod):
    """Masked CNN methods: ``encode`` -> densify -> light decoder -> per-cell normalized MSE on masked cells.

    Subclasses set ``self.encoder``, call ``build_head`` and implement ``encode``.
    """

    def build_head(self, features: Sequence[int], strides: Sequence, in_channels: int, decoder_factor: float,
                   fusion: str) -> None:
        """Per-stage densify (mask tokens + projection) and the light U-Net decoder back to the input."""
        widths = decoder_widths(features, decoder_factor)
        self.densify = Densify(features, widths)
        self.decoder = UNetDecoder(widths, strides, in_channels, fusion=fusion, heads="last")

    def encode(self, x: torch.Tensor, visible: torch.Tensor | None) -> list[torch.Tensor]:  # pragma: no cover
        raise NotImplementedError

    def encoder_stages(self) -> list[nn.Module]:  # pragma: no cover
        raise NotImplementedError

    def checkpoint_stages(self) -> list[nn.Module]:
        return [*self.encoder_stages(), *self.decoder.stages]

    def _predict(self, x: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.densify(self.encode(x, visible), visible))

    def forward(self, x: torch.Tensor, visible: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return masked_cell_mse(self._predict(x, visible), x, visible, self.cell_size)

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        pred = denormalize_prediction(patchify(self._predict(x, visible), self.cell_size), x, self.cell_size)
        image = unpatchify(pred, self.cell_size, visible.shape[1:], x.shape[1]).to(x.dtype)
        return torch.where(upsample_mask(visible, x.shape[2:])[:, None], x, image)

    def downstream_state_dict(self) -> dict[str, torch.Tensor]:
        return {f"encoder.{k}": v.detach().cpu() for k, v in self.encoder.state_dict().items()}
