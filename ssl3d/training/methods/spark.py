"""``spark``: SparK for 3D. The planned ResEnc encoder, run sparsely (visible voxels only), + densify + light decoder.

The encoder is literally ``ResidualEncoderUNet(...).encoder`` from the plans, converted in place by
``ssl3d.sparse.sparsify`` (same parameter names), so stock nnU-Net fine-tunes the downstream
``ResidualEncoderUNet`` with these weights. Loss: MSE on per-cell normalized voxels of masked cells.
"""
from __future__ import annotations

import pydoc
from typing import Sequence

import torch

from ssl3d.sparse import sparse_forward, sparsify
from ssl3d.training.methods.base import register_method
from ssl3d.training.methods.decoders import DensifyDecoderMethod


def resolve_arch_kwargs(architecture: dict) -> dict:
    """The plans' ``arch_kwargs`` with class names imported (what nnU-Net's get_network_from_plans does)."""
    kw = dict(architecture["arch_kwargs"])
    for key in architecture.get("_kw_requires_import", ()):
        if kw.get(key) is not None and isinstance(kw[key], str):
            kw[key] = pydoc.locate(kw[key])
    return kw


def build_downstream_unet(architecture: dict, in_channels: int, num_classes: int, deep_supervision: bool = False):
    from dynamic_network_architectures.architectures.unet import ResidualEncoderUNet

    return ResidualEncoderUNet(in_channels, num_classes=num_classes, deep_supervision=deep_supervision,
                               **resolve_arch_kwargs(architecture))


class SparK3D(DensifyDecoderMethod):
    name = "spark"

    def __init__(self, architecture: dict, in_channels: int, patch_size: Sequence[int], cell_size: Sequence[int],
                 backend: str = "auto", decoder_factor: float = 0.5):
        super().__init__(patch_size, cell_size)
        self.architecture = architecture
        self.in_channels = in_channels
        self.encoder = sparsify(build_downstream_unet(architecture, in_channels, 1).encoder, backend, inplace=True)
        kw = architecture["arch_kwargs"]
        self.build_head(list(kw["features_per_stage"]), kw["strides"], in_channels, decoder_factor, "add")
        self.backend = backend

    def encode(self, x: torch.Tensor, visible: torch.Tensor | None) -> list[torch.Tensor]:
        """Per-stage encoder features; with a mask only visible voxels are computed (masked ones are 0)."""
        return sparse_forward(self.encoder, x, visible)

    def downstream_architecture(self) -> dict:
        return self.architecture

    def config(self) -> dict:
        return {**super().config(), "backend": self.backend,
                "features_per_stage": list(self.architecture["arch_kwargs"]["features_per_stage"]),
                "strides": self.architecture["arch_kwargs"]["strides"]}


def scaled_architecture(architecture: dict, size: str) -> dict:
    """``planned``: as in the plans; ``tiny``: 1/4 width, one block per stage (tests, CPU demos)."""
    if size in (None, "planned"):
        return architecture
    if size != "tiny":
        raise ValueError(f"unknown size '{size}' (planned, tiny)")
    arch = {**architecture, "arch_kwargs": dict(architecture["arch_kwargs"])}
    kw = arch["arch_kwargs"]
    kw["features_per_stage"] = [max(4, c // 4) for c in kw["features_per_stage"]]
    kw["n_blocks_per_stage"] = [1] * kw["n_stages"]
    return arch


@register_method("spark", "SparK: sparse ResEnc CNN (planned topology), densify + light decoder, skip addition")
def build_spark(plans: dict, configuration: dict, num_input_channels: int, size: str = "planned",
                backend: str = "auto", **overrides) -> SparK3D:
    arch = scaled_architecture(configuration["architecture"], size)
    return SparK3D(arch, num_input_channels, configuration["patch_size"], configuration["ssl3d"]["mask_cell_size"],
                   backend, **overrides)
