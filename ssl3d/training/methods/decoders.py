"""Shared pieces of the masked-CNN methods: densify (mask tokens + projection) and a light U-Net decoder."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ssl3d.architectures.vit import patchify, unpatchify
from ssl3d.sparse import upsample_mask
from ssl3d.training.losses import denormalize_prediction, masked_cell_mse
from ssl3d.training.methods.base import SSLMethod


def conv_norm_act(c_in: int, c_out: int, k: int = 3) -> nn.Sequential:
    return nn.Sequential(nn.Conv3d(c_in, c_out, k, padding=k // 2, bias=False), nn.InstanceNorm3d(c_out, affine=True),
                         nn.LeakyReLU(inplace=True))


class Densify(nn.Module):
    """Fill every stage's masked positions with a learnable per-stage token, then norm + 3³ projection (SparK)."""

    def __init__(self, in_channels: Sequence[int], out_channels: Sequence[int]):
        super().__init__()
        self.mask_tokens = nn.ParameterList([nn.Parameter(torch.zeros(c)) for c in in_channels])
        for t in self.mask_tokens:
            nn.init.trunc_normal_(t, std=0.02)
        self.proj = nn.ModuleList([nn.Sequential(nn.InstanceNorm3d(ci, affine=True), nn.Conv3d(ci, co, 3, padding=1))
                                   for ci, co in zip(in_channels, out_channels)])

    def forward(self, feats: Sequence[torch.Tensor], visible: torch.Tensor) -> list[torch.Tensor]:
        out = []
        for f, token, proj in zip(feats, self.mask_tokens, self.proj):
            m = upsample_mask(visible, f.shape[2:])[:, None]
            out.append(proj(torch.where(m, f, token.view(1, -1, 1, 1, 1).to(f.dtype))))
        return out


class LightUNetDecoder(nn.Module):
    """Deepest features up to full resolution: transposed conv per level, skip fused by ``fusion``, 2 convs.

    ``fusion="add"`` (SparK) or ``"concat"`` (HySparK: the skip is concatenated, then the first conv fuses).
    ``strides[s]`` is the downsampling into level ``s``; level 0 may itself be strided (its output is then
    upsampled once more so the head predicts at input resolution). Every skip, full resolution included, is used.
    """

    def __init__(self, channels: Sequence[int], strides: Sequence[Sequence[int]], out_channels: int,
                 fusion: str = "add"):
        super().__init__()
        if fusion not in ("add", "concat"):
            raise ValueError(f"fusion must be 'add' or 'concat', got {fusion}")
        self.fusion = fusion
        n = len(channels)
        self.up = nn.ModuleList()
        self.blocks = nn.ModuleList()
        for s in range(n - 2, -1, -1):
            st = tuple(strides[s + 1])
            self.up.append(nn.ConvTranspose3d(channels[s + 1], channels[s], st, st))
            c_in = channels[s] * (2 if fusion == "concat" else 1)
            self.blocks.append(nn.Sequential(conv_norm_act(c_in, channels[s]), conv_norm_act(channels[s], channels[s])))
        st0 = tuple(strides[0])
        self.final_up = nn.ConvTranspose3d(channels[0], channels[0], st0, st0) if any(i > 1 for i in st0) \
            else nn.Identity()
        self.head = nn.Conv3d(channels[0], out_channels, 1)

    def forward(self, skips: Sequence[torch.Tensor]) -> torch.Tensor:
        y = skips[-1]
        for i, (up, block) in enumerate(zip(self.up, self.blocks)):
            skip = skips[len(skips) - 2 - i]
            y = up(y)
            y = block(torch.cat([y, skip], 1) if self.fusion == "concat" else y + skip)
        return self.head(self.final_up(y))


def decoder_widths(features: Sequence[int], factor: float = 0.5, minimum: int = 16) -> list[int]:
    """Light decoder: half the encoder width per level (at least ``minimum``)."""
    return [max(minimum, int(c * factor)) for c in features]


class DensifyDecoderMethod(SSLMethod):
    """Masked CNN methods (SparK, HySparK): ``encode`` -> densify -> decoder -> per-cell normalized MSE.

    Subclasses set ``self.encoder``, call ``build_head`` and implement ``encode``.
    """

    def build_head(self, features: Sequence[int], strides: Sequence, in_channels: int, decoder_factor: float,
                   fusion: str) -> None:
        """Per-stage densify (mask tokens + projection) and the light U-Net decoder back to the input."""
        widths = decoder_widths(features, decoder_factor)
        self.densify = Densify(features, widths)
        self.decoder = LightUNetDecoder(widths, strides, in_channels, fusion=fusion)

    def encode(self, x: torch.Tensor, visible: torch.Tensor | None) -> list[torch.Tensor]:  # pragma: no cover
        raise NotImplementedError

    def _predict(self, x: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.densify(self.encode(x, visible), visible))

    def forward(self, x: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        return masked_cell_mse(self._predict(x, visible), x, visible, self.cell_size)

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        pred = denormalize_prediction(patchify(self._predict(x, visible), self.cell_size), x, self.cell_size)
        image = unpatchify(pred, self.cell_size, visible.shape[1:], x.shape[1]).to(x.dtype)
        keep = torch.nn.functional.interpolate(visible[:, None].float(), size=x.shape[2:], mode="nearest").bool()
        return torch.where(keep, x, image)

    def downstream_state_dict(self) -> dict[str, torch.Tensor]:
        return {f"encoder.{k}": v.detach().cpu() for k, v in self.encoder.state_dict().items()}
