"""``byol``: BYOL in 3D. Online encoder + projector + predictor regress the EMA target's projection of the other
view, loss 2 − 2·cos, symmetric over the two views. Target momentum 0.996 → 1 (cosine over the global step),
updated after every optimizer step (identically on every rank). Projection/prediction MLPs 4096 → 256 as in
BYOL, with LayerNorm instead of BatchNorm (per-sample, so rank and batch composition do not matter).
"""
from __future__ import annotations

from typing import Sequence

import torch

from ssl3d.architectures.from_plans import scaled_architecture
from ssl3d.training.distillation import ema_momentum, projection_mlp
from ssl3d.training.losses import negative_cosine
from ssl3d.training.methods.registry import OptimDefaults, register_method
from ssl3d.training.methods.twoview import TwoViewMethod


class BYOL3D(TwoViewMethod):
    name = "byol"

    def __init__(self, architecture: dict, in_channels: int, patch_size: Sequence[int], proj_hidden: int = 4096,
                 proj_dim: int = 256, momentum: float = 0.996):
        super().__init__(architecture, in_channels, patch_size)
        self.momentum = momentum
        self.projector = projection_mlp(self.width, proj_hidden, proj_dim)
        self.predictor = projection_mlp(proj_dim, proj_hidden, proj_dim)
        self.target = self.make_teacher()

    def forward(self, x: torch.Tensor, visible: torch.Tensor | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
        v1, v2 = self.split_views(x)
        both = torch.cat([v1, v2])
        z = self.projector(self.embed(both))
        p1, p2 = self.predictor(z).chunk(2)
        with torch.no_grad():
            t1, t2 = self.target["projector"](self.embed(both, self.target["encoder"])).chunk(2)
        loss = negative_cosine(p1, t2) + negative_cosine(p2, t1)
        self.record(*z.chunk(2))
        return loss

    def after_optimizer_step(self) -> None:
        self.update_teacher(self.target, ema_momentum(self.step, self.total_steps, self.momentum))

    def config(self) -> dict:
        return {**super().config(), "momentum": self.momentum}


@register_method("byol", "BYOL: online predictor regresses an EMA target's projection of the other view (2 - 2 cos)",
                 trainer_name="BYOLPretrainer",
                 downstream="dynamic_network_architectures.architectures.unet.ResidualEncoderUNet", mask_ratio=0.0,
                 tiny={"size": "tiny", "proj_hidden": 64, "proj_dim": 32},
                 optim=OptimDefaults(lr=3e-4, betas=(0.9, 0.999), weight_decay=1.5e-6))
def build_byol(plans: dict, configuration: dict, num_input_channels: int, size: str = "planned",
               **overrides) -> BYOL3D:
    return BYOL3D(scaled_architecture(configuration["architecture"], size), num_input_channels,
                  configuration["patch_size"], **overrides)
