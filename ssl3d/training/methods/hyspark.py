"""``hyspark``: HySparK for 3D. Sparse MedNeXt CNN + ViT on visible junction tokens, bottom-up masks.

The mask is drawn on the ViT token grid (cell = the junction stride) and mapped up to every CNN stage; the
ViT sees only visible tokens, counted per sample. Every scale, full resolution included, is densified with
its own mask token and fused into the decoder by concatenation. Loss: per-patch normalized MSE on masked cells.
"""
from __future__ import annotations

from typing import Sequence

import torch

from ssl3d.architectures.hybrid import HybridEncoder, hybrid_arch_kwargs
from ssl3d.layers import total_stride
from ssl3d.training.methods.heads import DensifyDecoderMethod
from ssl3d.training.methods.registry import OptimDefaults, register_method


class HySparK3D(DensifyDecoderMethod):
    name = "hyspark"

    def __init__(self, arch_kwargs: dict, in_channels: int, patch_size: Sequence[int], junction_stride: Sequence[int],
                 backend: str = "auto", decoder_factor: float = 0.5):
        super().__init__(patch_size, junction_stride)
        self.arch_kwargs = arch_kwargs
        self.encoder = HybridEncoder(in_channels, backend=backend, **arch_kwargs)
        self.build_head(self.encoder.output_channels, arch_kwargs["strides"], in_channels, decoder_factor, "concat")
        self.backend = backend

    def encode(self, x: torch.Tensor, visible: torch.Tensor | None) -> list[torch.Tensor]:
        return self.encoder(x, visible)

    def encoder_stages(self) -> list[torch.nn.Module]:
        return [*self.encoder.cnn.stages, *self.encoder.vit.blocks]

    def downstream_architecture(self) -> dict:
        return {"network_class_name": "ssl3d.architectures.hybrid.HybridUNet", "arch_kwargs": dict(self.arch_kwargs),
                "_kw_requires_import": []}

    def config(self) -> dict:
        return {**super().config(), "backend": self.backend, "downstream": "ssl3d.architectures.hybrid.HybridUNet",
                "arch_kwargs": self.arch_kwargs}


# HySparK paper: AdamW, lr 1e-4 (no batch scaling), cosine; the authors' code: betas (0.9, 0.999), clip 5
@register_method("hyspark", "HySparK: sparse MedNeXt CNN + ViT on visible tokens, bottom-up masks, skip concat",
                 sparse=True, trainer_name="HySparKPretrainer", downstream="ssl3d.architectures.hybrid.HybridUNet",
                 transformer=True, checkpointing=True, tiny={"size": "tiny"},
                 optim=OptimDefaults(lr=1e-4, scale_lr_with_batch=False, betas=(0.9, 0.999), grad_clip=5.0))
def build_hyspark(plans: dict, configuration: dict, num_input_channels: int, size: str = "S",
                  backend: str = "auto", **overrides) -> HySparK3D:
    arch = {**hybrid_arch_kwargs(configuration, size), **overrides.pop("arch", {})}
    return HySparK3D(arch, num_input_channels, configuration["patch_size"], list(total_stride(arch["strides"])),
                     backend, **overrides)
