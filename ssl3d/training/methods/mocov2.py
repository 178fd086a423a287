"""``mocov2``: MoCo v2 in 3D. A query encoder + MLP head and a momentum key encoder (0.999, updated after every
optimizer step); negatives come from a queue of past keys (65536 by default) at temperature 0.07; the loss is
symmetrized over the two views. The queue and its pointer are buffers of the network, so nnU-Net's checkpoints
save them and ``--c`` resumes with the same negatives. Under DDP every rank enqueues the keys of the whole global
batch (gathered), so all ranks keep the same queue.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from ssl3d.architectures.from_plans import scaled_architecture
from ssl3d.training.distillation import gather_no_grad, projection_mlp
from ssl3d.training.losses import fp32_loss
from ssl3d.training.methods.registry import OptimDefaults, register_method
from ssl3d.training.methods.twoview import TwoViewMethod


class MoCoV2(TwoViewMethod):
    name = "mocov2"

    def __init__(self, architecture: dict, in_channels: int, patch_size: Sequence[int], queue_size: int = 65536,
                 temperature: float = 0.07, momentum: float = 0.999, proj_hidden: int = 2048, proj_dim: int = 128):
        super().__init__(architecture, in_channels, patch_size)
        self.temperature, self.momentum = temperature, momentum
        self.projector = projection_mlp(self.width, proj_hidden, proj_dim)
        self.key_encoder = self.make_teacher()
        self.register_buffer("queue", F.normalize(torch.randn(queue_size, proj_dim), dim=1))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

    def keys(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return F.normalize(self.key_encoder["projector"](self.embed(x, self.key_encoder["encoder"])), dim=1)

    @fp32_loss
    def contrast(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, float]:
        q = F.normalize(q.float(), dim=1)
        logits = torch.cat([(q * k).sum(1, keepdim=True), q @ self.queue.clone().T], 1) / self.temperature
        target = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
        return F.cross_entropy(logits, target), float((logits.detach().argmax(1) == 0).float().mean())

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        keys = gather_no_grad(keys)
        n, size = keys.shape[0], self.queue.shape[0]
        idx = (int(self.queue_ptr) + torch.arange(n, device=keys.device)) % size
        self.queue[idx] = keys.to(self.queue.dtype)
        self.queue_ptr.fill_((int(self.queue_ptr) + n) % size)

    def forward(self, x: torch.Tensor, visible: torch.Tensor | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
        v1, v2 = self.split_views(x)
        q1, q2 = self.projector(self.embed(torch.cat([v1, v2]))).chunk(2)
        k1, k2 = self.keys(torch.cat([v1, v2])).chunk(2)
        l1, acc1 = self.contrast(q1, k2)
        l2, acc2 = self.contrast(q2, k1)
        self.record(q1, q2, mocov2_accuracy=(acc1 + acc2) / 2)
        if self.training:
            self.enqueue(torch.cat([k1, k2]))
        return (l1 + l2) / 2

    def after_optimizer_step(self) -> None:
        self.update_teacher(self.key_encoder, self.momentum)

    def config(self) -> dict:
        return {**super().config(), "queue_size": int(self.queue.shape[0]), "temperature": self.temperature,
                "momentum": self.momentum}


@register_method("mocov2", "MoCo v2: momentum key encoder (0.999), queue of negatives (65536), InfoNCE at 0.07",
                 trainer_name="MoCoV2Pretrainer",
                 downstream="dynamic_network_architectures.architectures.unet.ResidualEncoderUNet", mask_ratio=0.0,
                 tiny={"size": "tiny", "proj_hidden": 64, "proj_dim": 32, "queue_size": 64},
                 optim=OptimDefaults(lr=3e-4, betas=(0.9, 0.999), weight_decay=1e-4))
def build_mocov2(plans: dict, configuration: dict, num_input_channels: int, size: str = "planned",
                 **overrides) -> MoCoV2:
    return MoCoV2(scaled_architecture(configuration["architecture"], size), num_input_channels,
                  configuration["patch_size"], **overrides)
