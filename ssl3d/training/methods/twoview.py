"""Shared base of the contrastive/joint-embedding methods (SimCLR, MoCo v2, BYOL, VoCo).

The encoder is the planned ResEnc encoder (``ResidualEncoderUNet(...).encoder`` from the plans, dense), so stock
nnU-Net fine-tunes the downstream ``ResidualEncoderUNet`` with these weights under the same ``encoder.*`` keys
as SparK's. The embedding of a crop is the global average and the global maximum of the deepest stage,
concatenated: the encoder's stages end in instance normalization, which fixes every channel's mean per sample,
so the average alone carries little that tells two images apart (BYOL and MoCo collapsed with it in tests).
Methods with ``n_views = 2`` receive ``x (B, 2, C, *patch)`` from the two-view loader; there is no image
reconstruction and no mask (the trainer's mask is ignored).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ssl3d.architectures.encoders import avg_max_pool
from ssl3d.architectures.from_plans import build_network_from_plans
from ssl3d.training.distillation import alignment_uniformity, ema_update, embedding_std, frozen_copy
from ssl3d.training.methods.base import SSLMethod


class TwoViewMethod(SSLMethod):
    n_views = 2
    reconstructs = False

    def __init__(self, architecture: dict, in_channels: int, patch_size: Sequence[int]):
        super().__init__(patch_size, patch_size)  # one mask cell = the whole patch: masks are not used
        self.architecture = architecture
        self.in_channels = in_channels
        self.encoder = build_network_from_plans(architecture, in_channels, 1).encoder
        self.width = 2 * int(architecture["arch_kwargs"]["features_per_stage"][-1])  # avg + max pooled

    def embed(self, x: torch.Tensor, encoder: torch.nn.Module | None = None) -> torch.Tensor:
        """Global average and maximum of the deepest stage of ``encoder`` (default: the student's): ``(B, 2·C)``."""
        return avg_max_pool((encoder or self.encoder)(x)[-1])

    def _online(self) -> nn.ModuleDict:
        # built on demand: an attribute would register the encoder twice in the state_dict
        return nn.ModuleDict({"encoder": self.encoder, "projector": self.projector})

    def make_teacher(self) -> nn.ModuleDict:
        """Frozen copy of the student's encoder and projector (``encoder`` / ``projector`` keys), for an EMA."""
        return frozen_copy(self._online())

    def update_teacher(self, teacher: nn.ModuleDict, momentum: float) -> None:
        """``teacher <- momentum * teacher + (1 - momentum) * student`` (encoder and projector)."""
        ema_update(teacher, self._online(), momentum)

    @staticmethod
    def split_views(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if x.dim() != 6 or x.shape[1] != 2:
            raise ValueError(f"expected two views (B, 2, C, D, H, W), got {tuple(x.shape)}")
        return x[:, 0], x[:, 1]

    def input_view(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, 0] if x.dim() == 6 else x

    def record(self, z1: torch.Tensor, z2: torch.Tensor, **extra: float) -> None:
        """Collapse diagnostics of the projected pairs (std ≈ 0 and uniformity ≈ 0 when collapsed)."""
        align, uniform = alignment_uniformity(z1, z2)
        self.stats = {f"{self.name}_embedding_std": embedding_std(torch.cat([z1, z2])),
                      f"{self.name}_alignment": align, f"{self.name}_uniformity": uniform, **extra}

    def downstream_state_dict(self) -> dict[str, torch.Tensor]:
        return {f"encoder.{k}": v.detach().cpu() for k, v in self.encoder.state_dict().items()}

    def downstream_architecture(self) -> dict:
        return self.architecture

    def config(self) -> dict:
        return {**super().config(), "features_per_stage": list(self.architecture["arch_kwargs"]["features_per_stage"]),
                "view_overlap": self.view_overlap}

