"""``voco``: VoCo (volume contrast, Wu et al. CVPR 2024 / its large-scale version) in 3D, with its EMA teacher.

The loader crops a region of ``base_grid`` × the planned patch per axis. The region is cut into non-overlapping
base crops on that grid; ``n_targets`` target crops of the patch size are drawn at random offsets inside it.
A target's label for each base crop is the fraction of the target's volume that overlaps it (the labels of one
target sum to 1). Similarities are ReLU(cos) between the student's projected target and the EMA teacher's
projected base crops:

- position loss: −log(1 − |sim − label|) between a target and its own region's base crops;
- negative loss: −log(1 − sim) between a target and the base crops of the other samples in the batch;
- base regularization: −log(1 − ReLU(cos)) between the student's base crops of one region (they do not
  overlap, so their features should not align).

Users of the public code report that VoCo does not converge without the EMA teacher; it is always on here
(momentum 0.996 → 1, cosine over the global step, updated after each optimizer step on every rank).
"""
from __future__ import annotations

import itertools
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ssl3d.architectures.from_plans import scaled_architecture
from ssl3d.training.distillation import ema_momentum, embedding_std, projection_mlp
from ssl3d.training.losses import fp32_loss
from ssl3d.training.methods.registry import OptimDefaults, register_method
from ssl3d.training.methods.twoview import TwoViewMethod

EPS = 1e-6


@fp32_loss
def voco_losses(s_t: torch.Tensor, s_b: torch.Tensor, t_b: torch.Tensor,
                labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Position, negative and base-regularization losses from normalized student targets ``s_t (B, T, D)``,
    student bases ``s_b (B, G, D)``, teacher bases ``t_b (B, G, D)`` and overlap labels ``(B, T, G)``."""
    b, n_grid = s_t.shape[0], s_b.shape[1]
    sim = F.relu(torch.einsum("btd,cgd->btcg", s_t, t_b))  # every target against every region's bases
    own = torch.eye(b, dtype=torch.bool, device=s_t.device)
    pos_sim = sim[torch.arange(b), :, torch.arange(b)]  # (B, T, G)
    pos = -torch.log(1 - (pos_sim - labels).abs() + EPS).mean()
    neg = -torch.log(1 - sim.permute(0, 2, 1, 3)[~own] + EPS).mean() if b > 1 else sim.new_zeros(())
    pair = ~torch.eye(n_grid, dtype=torch.bool, device=s_t.device)
    reg = -torch.log(1 - F.relu(s_b @ s_b.transpose(1, 2))[:, pair] + EPS).mean() if n_grid > 1 \
        else sim.new_zeros(())
    return pos, neg, reg


def overlap_labels(target_lo: torch.Tensor, patch: Sequence[int], grid: Sequence[int]) -> torch.Tensor:
    """Fraction of each target crop ``(n, 3)`` lower corners lying in each base crop of the grid: ``(n, G)``."""
    patch_t = torch.tensor([float(p) for p in patch])
    fractions = []
    for cell in itertools.product(*[range(g) for g in grid]):
        base_lo = torch.tensor([float(c) for c in cell]) * patch_t
        inter = (torch.minimum(target_lo + patch_t, base_lo + patch_t) - torch.maximum(target_lo, base_lo)).clamp(min=0)
        fractions.append(inter.prod(-1) / patch_t.prod())
    return torch.stack(fractions, -1)


class VoCo3D(TwoViewMethod):
    name = "voco"
    n_views = 1  # one region per case; base and target crops are cut here

    def __init__(self, architecture: dict, in_channels: int, patch_size: Sequence[int],
                 base_grid: Sequence[int] = (1, 4, 4), n_targets: int = 2, proj_hidden: int = 2048,
                 proj_dim: int = 256, momentum: float = 0.996, neg_weight: float = 1.0, reg_weight: float = 1.0):
        super().__init__(architecture, in_channels, patch_size)
        self.base_grid = tuple(int(g) for g in base_grid)
        self.opts = {"base_grid": list(self.base_grid), "n_targets": n_targets, "momentum": momentum,
                     "neg_weight": neg_weight, "reg_weight": reg_weight}
        self.data_patch_size = tuple(g * p for g, p in zip(self.base_grid, self.patch_size))
        self.projector = projection_mlp(self.width, proj_hidden, proj_dim)
        self.teacher = self.make_teacher()

    def input_view(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :, : self.patch_size[0], : self.patch_size[1], : self.patch_size[2]]

    def base_crops(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, *region)`` -> ``(B·G, C, *patch)`` in raster order of the grid."""
        b, c = x.shape[:2]
        (gz, gy, gx), (pz, py, px) = self.base_grid, self.patch_size
        t = x.reshape(b, c, gz, pz, gy, py, gx, px).permute(0, 2, 4, 6, 1, 3, 5, 7)
        return t.reshape(b * gz * gy * gx, c, pz, py, px)

    def target_crops(self, x: torch.Tensor, generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
        """``n_targets`` random crops per sample and their lower corners ``(B, T, 3)``."""
        b, t = x.shape[0], self.opts["n_targets"]
        span = torch.tensor([r - p + 1 for r, p in zip(self.data_patch_size, self.patch_size)])
        lo = (torch.rand(b, t, 3, generator=generator) * span).long().clamp(max=span - 1)
        pz, py, px = self.patch_size
        crops = [x[i, :, z:z + pz, y:y + py, w:w + px] for i in range(b) for z, y, w in lo[i].tolist()]
        return torch.stack(crops), lo

    def project(self, net: nn.Module | None, x: torch.Tensor) -> torch.Tensor:
        if net is None:
            return F.normalize(self.projector(self.embed(x)).float(), dim=-1)
        return F.normalize(net["projector"](self.embed(x, net["encoder"])).float(), dim=-1)

    def forward(self, x: torch.Tensor, visible: torch.Tensor | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
        b, n_grid = x.shape[0], int(torch.tensor(self.base_grid).prod())
        bases = self.base_crops(x)
        targets, lo = self.target_crops(x, generator)
        labels = overlap_labels(lo.reshape(-1, 3).float(), self.patch_size, self.base_grid)
        labels = labels.reshape(b, -1, n_grid).to(x.device)
        student = self.project(None, torch.cat([targets, bases]))
        s_t = student[: targets.shape[0]].reshape(b, -1, student.shape[-1])  # (B, T, D)
        s_b = student[targets.shape[0]:].reshape(b, n_grid, -1)  # (B, G, D)
        with torch.no_grad():
            t_b = self.project(self.teacher, bases).reshape(b, n_grid, -1)
        pos, neg, reg = voco_losses(s_t, s_b, t_b, labels)
        loss = pos + self.opts["neg_weight"] * neg + self.opts["reg_weight"] * reg
        self.stats = {"voco_position": float(pos.detach()), "voco_negative": float(neg.detach()),
                      "voco_base_reg": float(reg.detach()),
                      "voco_embedding_std": embedding_std(s_b.reshape(-1, s_b.shape[-1]))}
        return loss

    def after_optimizer_step(self) -> None:
        self.update_teacher(self.teacher, ema_momentum(self.step, self.total_steps, self.opts["momentum"]))

    def config(self) -> dict:
        return {**super().config(), **self.opts, "data_patch_size": list(self.data_patch_size)}


@register_method("voco", "VoCo: overlap-fraction prediction between random and grid base crops, with an EMA teacher",
                 trainer_name="VoCoPretrainer",
                 downstream="dynamic_network_architectures.architectures.unet.ResidualEncoderUNet", mask_ratio=0.0,
                 tiny={"size": "tiny", "proj_hidden": 64, "proj_dim": 32, "base_grid": (1, 2, 2)},
                 optim=OptimDefaults(lr=1e-4, betas=(0.9, 0.999), weight_decay=1e-5))
def build_voco(plans: dict, configuration: dict, num_input_channels: int, size: str = "planned",
               **overrides) -> VoCo3D:
    if size == "tiny":
        overrides.setdefault("base_grid", (1, 2, 2))  # 4 base crops instead of 16 on CPU
    return VoCo3D(scaled_architecture(configuration["architecture"], size), num_input_channels,
                  configuration["patch_size"], **overrides)
