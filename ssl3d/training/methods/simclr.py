"""``simclr``: SimCLR in 3D. Two overlapping, independently augmented crops per case (≥ 50 % overlap per axis),
the planned ResEnc encoder, a projection MLP, NT-Xent at temperature 0.5 (the 3D default of nnssl/SwinUNETR).

Negatives are the other crops of the whole *global* batch: under DDP every rank gathers all ranks' projections
with their gradients (the public 3D code's loss was never made correct there), so a run on two ranks computes
the loss of the concatenated batch.
"""
from __future__ import annotations

from typing import Sequence

import torch

from ssl3d.architectures.from_plans import scaled_architecture
from ssl3d.training.distillation import projection_mlp
from ssl3d.training.losses import nt_xent
from ssl3d.training.methods.registry import OptimDefaults, register_method
from ssl3d.training.methods.twoview import TwoViewMethod


class SimCLR3D(TwoViewMethod):
    name = "simclr"

    def __init__(self, architecture: dict, in_channels: int, patch_size: Sequence[int], temperature: float = 0.5,
                 proj_hidden: int = 2048, proj_dim: int = 128):
        super().__init__(architecture, in_channels, patch_size)
        self.temperature = temperature
        self.projector = projection_mlp(self.width, proj_hidden, proj_dim)

    def forward(self, x: torch.Tensor, visible: torch.Tensor | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
        v1, v2 = self.split_views(x)
        z = self.projector(self.embed(torch.cat([v1, v2])))
        z1, z2 = z.chunk(2)
        loss = nt_xent(z1, z2, self.temperature)
        self.record(z1, z2)
        return loss

    def config(self) -> dict:
        return {**super().config(), "temperature": self.temperature}


@register_method("simclr", "SimCLR: two overlapping augmented crops, ResEnc encoder, NT-Xent over the global batch",
                 trainer_name="SimCLRPretrainer",
                 downstream="dynamic_network_architectures.architectures.unet.ResidualEncoderUNet", mask_ratio=0.0,
                 tiny={"size": "tiny", "proj_hidden": 64, "proj_dim": 32},
                 optim=OptimDefaults(lr=3e-4, betas=(0.9, 0.999), weight_decay=1e-5))
def build_simclr(plans: dict, configuration: dict, num_input_channels: int, size: str = "planned",
                 **overrides) -> SimCLR3D:
    return SimCLR3D(scaled_architecture(configuration["architecture"], size), num_input_channels,
                    configuration["patch_size"], **overrides)
