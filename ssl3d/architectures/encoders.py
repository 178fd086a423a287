"""The encoder of a downstream (segmentation) network, run on its own: a list of per-stage feature maps.

Downstream networks keep their pretrained encoder under top-level modules whose state-dict keys are the ones
:func:`ssl3d.training.export.transfer_encoder` fills (:func:`encoder_roots`): ``encoder.*`` (nnU-Net's
``ResidualEncoderUNet``, ``HybridUNet``), ``swinViT.*`` (``SwinUNETRNet``) or ``down_projection.*`` + ``eva.*``
(dna's ``Primus``). :class:`DownstreamEncoder` holds only those modules under the same names, so the pretrained
keys load into it unchanged and no decoder weights ride along.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ssl3d.architectures.primus import is_primus_like, primus_feature_map


def encoder_roots(network: nn.Module) -> tuple[str, ...]:
    """Top-level modules holding a downstream network's pretrained encoder: ``("swinViT",)``,
    ``("down_projection", "eva")`` (Primus: patch embedding + transformer) or ``("encoder",)``."""
    if isinstance(getattr(network, "swinViT", None), nn.Module):
        return ("swinViT",)
    if is_primus_like(network):
        return ("down_projection", "eva")
    if isinstance(getattr(network, "encoder", None), nn.Module):
        return ("encoder",)
    raise TypeError(f"{type(network).__name__} has no 'encoder', 'swinViT' or Primus 'eva' module")


def avg_max_pool(features: torch.Tensor) -> torch.Tensor:
    """``(B, C, z, y, x) -> (B, 2C)``: global average and global maximum, concatenated.

    The stages of nnU-Net's encoders end in instance normalization, which fixes every channel's mean per sample,
    so the average alone tells images apart poorly (a classifier on it fits slowly, contrastive embeddings on it
    collapse); the maximum keeps where a feature fires strongly.
    """
    return torch.cat([features.mean((2, 3, 4)), features.amax((2, 3, 4))], 1)


def stage_maps(out: Any, owner: str = "encoder") -> list[torch.Tensor]:
    """An encoder's output as a list of ``(B, C, z, y, x)`` maps, finest first (a single map becomes a list)."""
    maps = [out] if isinstance(out, torch.Tensor) else list(out)
    if not maps or any(not isinstance(f, torch.Tensor) or f.dim() != 5 for f in maps):
        raise TypeError(f"{owner}: encoder output is not a list of (B, C, z, y, x) maps")
    return maps


class DownstreamEncoder(nn.Module):
    """``DownstreamEncoder(network)(x)`` -> the network encoder's stage maps (deepest last)."""

    def __init__(self, network: nn.Module):
        super().__init__()
        self.roots = encoder_roots(network)
        for name in self.roots:
            setattr(self, name, getattr(network, name))
        if self.roots == ("swinViT",):
            self.normalize = bool(getattr(network, "normalize", True))  # as SwinUNETR.forward calls it
        elif self.roots == ("down_projection", "eva"):
            self.register_tokens = getattr(network, "register_tokens", None)
        elif hasattr(self.encoder, "return_skips"):  # nnU-Net encoders: every stage, not just the last
            self.encoder.return_skips = True
        self.source = type(network).__name__

    @property
    def root(self) -> str:
        """The first top-level name of the pretrained keys (``encoder``, ``swinViT`` or ``down_projection``)."""
        return self.roots[0]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        if self.root == "swinViT":
            from ssl3d.architectures.swin import swin_features

            return swin_features(self.swinViT, x, normalize=self.normalize)
        if self.root == "down_projection":  # one map: the token grid, as Primus's forward before up_projection
            return [primus_feature_map(self, x)]
        return stage_maps(self.encoder(x), self.source)

    @torch.no_grad()
    def out_channels(self, in_channels: int, patch: tuple[int, ...]) -> int:
        """Channels of the deepest map (one forward pass of a zero patch on the module's device)."""
        p = next(self.parameters())
        was = self.training
        self.eval()
        c = int(self(torch.zeros(1, in_channels, *patch, device=p.device, dtype=p.dtype))[-1].shape[1])
        self.train(was)
        return c
