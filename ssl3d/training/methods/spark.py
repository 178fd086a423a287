"""``spark``: SparK for 3D. The planned ResEnc encoder, run sparsely (visible voxels only), + densify + light decoder.

The encoder is literally ``ResidualEncoderUNet(...).encoder`` from the plans, converted in place by
``ssl3d.sparse.sparsify`` (same parameter names), so stock nnU-Net fine-tunes the downstream
``ResidualEncoderUNet`` with these weights. Loss: MSE on per-cell normalized voxels of masked cells.
"""
from __future__ import annotations

from typing import Sequence

import torch

from ssl3d.architectures.from_plans import build_network_from_plans, scaled_architecture
from ssl3d.sparse import sparse_forward, sparsify
from ssl3d.training.methods.heads import DensifyDecoderMethod
from ssl3d.training.methods.registry import register_method


class SparK3D(DensifyDecoderMethod):
    name = "spark"

    def __init__(self, architecture: dict, in_channels: int, patch_size: Sequence[int], cell_size: Sequence[int],
                 backend: str = "auto", decoder_factor: float = 0.5):
        super().__init__(patch_size, cell_size)
        self.architecture = architecture
        self.in_channels = in_channels
        self.encoder = sparsify(build_network_from_plans(architecture, in_channels, 1).encoder, backend, inplace=True)
        kw = architecture["arch_kwargs"]
        self.build_head(list(kw["features_per_stage"]), kw["strides"], in_channels, decoder_factor, "add")
        self.backend = backend

    def encode(self, x: torch.Tensor, visible: torch.Tensor | None) -> list[torch.Tensor]:
        """Per-stage encoder features; with a mask only visible voxels are computed (masked ones are 0)."""
        return sparse_forward(self.encoder, x, visible)

    def encoder_stages(self) -> list[torch.nn.Module]:
        return [self.encoder.stem, *self.encoder.stages] if self.encoder.stem is not None else [*self.encoder.stages]

    def downstream_architecture(self) -> dict:
        return self.architecture

    def config(self) -> dict:
        return {**super().config(), "backend": self.backend,
                "features_per_stage": list(self.architecture["arch_kwargs"]["features_per_stage"]),
                "strides": self.architecture["arch_kwargs"]["strides"]}


@register_method("spark", "SparK: sparse ResEnc CNN (planned topology), densify + light decoder, skip addition",
                 sparse=True, checkpointing=True, trainer_name="SparKPretrainer",
                 downstream="dynamic_network_architectures.architectures.unet.ResidualEncoderUNet",
                 tiny={"size": "tiny"})
def build_spark(plans: dict, configuration: dict, num_input_channels: int, size: str = "planned",
                backend: str = "auto", **overrides) -> SparK3D:
    arch = scaled_architecture(configuration["architecture"], size)
    return SparK3D(arch, num_input_channels, configuration["patch_size"], configuration["ssl3d"]["mask_cell_size"],
                   backend, **overrides)
