"""``smit``: self-distilled masked image transformer (Jiang et al. 2022; best overall in the SMIT transfer benchmark).

A 3D Swin encoder (MONAI's ``SwinTransformer``: embed 48, depths 2-2-4-2, window 4) is trained on two global
crops of the planned patch taken from a larger loaded region (``region_scale`` per axis). Both views are
masked for the student (16³-voxel cells, 70 %; the patch-embedding tokens of masked cells become one learnable
token, so masked content never enters the student); an EMA teacher (momentum 0.996 → 1, cosine over the
global step) sees the unmasked views. Losses:

- masked image prediction: a 1×1×1 head on the stride-16 Swin map (one token per mask cell) predicts the
  cell's voxels, L1 on masked voxels (weight 1);
- local distillation (iBOT): cross-entropy between the student's deepest tokens of a masked view and the
  teacher's tokens of the same unmasked view, weighted by each token's masked fraction (weight 0.1);
- global distillation (DINO): cross-entropy between the student's pooled output of one view and the teacher's
  of the other view (weight 0.1).

Heads: MLP → 256-d L2-normalized bottleneck → 8192 weight-normalized prototypes; teacher outputs are centered
(momentum 0.9, averaged over ranks) and sharpened with a temperature warmed up from 0.04 to 0.07; student
temperature 0.1. The downstream network is MONAI's SwinUNETR (``SwinUNETRNet``) on the Swin-compatible patch
(each axis the nearest multiple of 32), whose ``swinViT.*`` keys receive the student encoder one to one.

Fixed from the public code: the EMA momentum follows the global step (not the step within the epoch), and the
exported encoder keys are checked against the downstream network (no silent ``strict=False`` load).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ssl3d.architectures.swin import swin_arch_kwargs, swin_encoder, swin_encoder_state_dict, swin_features, \
    swin_patch_size
from ssl3d.architectures.vit import unpatchify
from ssl3d.sparse import upsample_mask
from ssl3d.sparse.masks import random_cell_mask
from ssl3d.training.distillation import Centering, ProjectionHead, distillation_cross_entropy, ema_momentum, \
    ema_update, embedding_std, frozen_copy, mean_entropy, teacher_temperature
from ssl3d.training.methods.base import SSLMethod
from ssl3d.training.methods.registry import OptimDefaults, register_method

CELL = 16  # mask cell (voxels per axis) = the stride of the Swin map the image-prediction head reads
_CELL_MAP = 3  # index of the stride-16 map in swin_features' output (patch 2, then x2 per stage)


class SMIT3D(SSLMethod):
    name = "smit"

    def __init__(self, in_channels: int, patch_size: Sequence[int], arch: dict, region_scale: float = 1.25,
                 out_dim: int = 8192, hidden_dim: int = 2048, bottleneck_dim: int = 256, mip_weight: float = 1.0,
                 local_weight: float = 0.1, global_weight: float = 0.1, teacher_momentum: float = 0.996,
                 center_momentum: float = 0.9, teacher_temp: Sequence[float] = (0.04, 0.07),
                 teacher_temp_warmup: float = 0.3, student_temp: float = 0.1):
        super().__init__(patch_size, (CELL,) * 3)
        self.in_channels = in_channels
        self.arch = dict(arch)
        self.opts = {"region_scale": region_scale, "out_dim": out_dim, "hidden_dim": hidden_dim,
                     "bottleneck_dim": bottleneck_dim, "mip_weight": mip_weight, "local_weight": local_weight,
                     "global_weight": global_weight, "teacher_momentum": teacher_momentum,
                     "center_momentum": center_momentum, "teacher_temp": list(teacher_temp),
                     "teacher_temp_warmup": teacher_temp_warmup, "student_temp": student_temp}
        self.data_patch_size = tuple(max(p, int(round(p * region_scale))) for p in self.patch_size)
        width = int(arch["feature_size"])
        deepest = width * 2 ** 4
        self.student = nn.ModuleDict({
            "encoder": swin_encoder(in_channels, **arch),
            "global_head": ProjectionHead(deepest, out_dim, hidden_dim, bottleneck_dim),
            "local_head": ProjectionHead(deepest, out_dim, hidden_dim, bottleneck_dim)})
        self.mask_token = nn.Parameter(torch.zeros(width))
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        self.mip_head = nn.Conv3d(width * 2 ** _CELL_MAP, CELL ** 3 * in_channels, 1)
        self.teacher = frozen_copy(self.student)  # same start on every rank (init is seeded)
        self.global_center = Centering(out_dim, center_momentum)
        self.local_center = Centering(out_dim, center_momentum)

    # ---- views -----------------------------------------------------------------------------------------------
    def input_view(self, x: torch.Tensor) -> torch.Tensor:
        """The centered planned-size crop of the loaded region."""
        lo = [(s - p) // 2 for s, p in zip(x.shape[2:], self.patch_size)]
        return x[:, :, lo[0]:lo[0] + self.patch_size[0], lo[1]:lo[1] + self.patch_size[1],
                 lo[2]:lo[2] + self.patch_size[2]]

    def random_views(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """Two crops of ``patch_size`` per sample at independent random offsets: ``(2B, C, *patch)``, view-major."""
        views = []
        for _ in range(2):
            for b in range(x.shape[0]):
                lo = [int(torch.randint(s - p + 1, (1,), generator=generator)) for s, p in
                      zip(x.shape[2:], self.patch_size)]
                views.append(x[b, :, lo[0]:lo[0] + self.patch_size[0], lo[1]:lo[1] + self.patch_size[1],
                               lo[2]:lo[2] + self.patch_size[2]])
        return torch.stack(views)

    # ---- networks ----------------------------------------------------------------------------------------------
    def encode(self, views: torch.Tensor, visible: torch.Tensor | None) -> list[torch.Tensor]:
        """The student's 5 Swin maps (as SparK's ``encode``: ``visible=None`` is the dense downstream encoder)."""
        return swin_features(self.student["encoder"], views, self.mask_token, visible)

    def predict_voxels(self, cell_map: torch.Tensor) -> torch.Tensor:
        """Stride-16 map -> voxels of every cell (1×1×1 conv, then the cell's voxels laid out in place)."""
        pred = self.mip_head(cell_map)
        grid = pred.shape[2:]
        return unpatchify(pred.flatten(2).transpose(1, 2), (CELL,) * 3, grid, self.in_channels)

    # ---- loss ------------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, visible: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        b = x.shape[0]
        views = self.random_views(x, generator)
        ratio = float((~visible).float().mean())
        masks = torch.cat([visible, random_cell_mask(b, visible.shape[1:], ratio, generator, visible.device)])
        s_feats = self.encode(views, masks)
        with torch.no_grad():
            t_tokens = swin_features(self.teacher["encoder"], views)[-1].flatten(2).transpose(1, 2)
        s_tokens = s_feats[-1].flatten(2).transpose(1, 2)  # (2B, n, D)

        voxel_masked = ~upsample_mask(masks, views.shape[2:])[:, None]
        pred = self.predict_voxels(s_feats[_CELL_MAP])
        l1 = (pred.float() - views.float()).abs() * voxel_masked
        mip = l1.sum() / (voxel_masked.sum() * self.in_channels).clamp(min=1)

        t_temp = teacher_temperature(self.step, self.total_steps, *self.opts["teacher_temp"],
                                     warmup_fraction=self.opts["teacher_temp_warmup"])
        s_temp = self.opts["student_temp"]
        s_local = self.student["local_head"](s_tokens)
        with torch.no_grad():
            t_local = self.teacher["local_head"](t_tokens)
            t_global = self.teacher["global_head"](t_tokens.mean(1))
            token_masked = F.adaptive_avg_pool3d(voxel_masked.float(), s_feats[-1].shape[2:]).flatten(1)
        local = distillation_cross_entropy(s_local, t_local, self.local_center.center, t_temp, s_temp, token_masked)
        s_embed = self.student["global_head"].embed(s_tokens.mean(1))
        s_global = self.student["global_head"].logits(s_embed)
        swapped = torch.cat([t_global[b:], t_global[:b]])  # view 1 learns from the teacher's view 2 and back
        glob = distillation_cross_entropy(s_global, swapped, self.global_center.center, t_temp, s_temp)
        loss = self.opts["mip_weight"] * mip + self.opts["local_weight"] * local + self.opts["global_weight"] * glob

        self.stats = {"smit_mip": float(mip.detach()), "smit_local": float(local.detach()),
                      "smit_global": float(glob.detach()), "smit_embedding_std": embedding_std(s_embed),
                      "smit_teacher_entropy": mean_entropy(t_global - self.global_center.center, t_temp)}
        if self.training:
            self.global_center.update(t_global)
            self.local_center.update(t_local)
        return loss

    def after_optimizer_step(self) -> None:
        m = ema_momentum(self.step, self.total_steps, self.opts["teacher_momentum"])
        ema_update(self.teacher, self.student, m)

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        pred = self.predict_voxels(self.encode(x, visible)[_CELL_MAP]).to(x.dtype)
        return torch.where(upsample_mask(visible, x.shape[2:])[:, None], x, pred)

    # ---- transfer ----------------------------------------------------------------------------------------------
    def downstream_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu() for k, v in swin_encoder_state_dict(self.student["encoder"]).items()}

    def downstream_architecture(self) -> dict:
        return {"network_class_name": "ssl3d.architectures.swin.SwinUNETRNet", "arch_kwargs": dict(self.arch),
                "_kw_requires_import": []}

    def config(self) -> dict:
        return {**super().config(), **self.opts, "arch": self.arch, "data_patch_size": list(self.data_patch_size)}


# the tiny Swin (CPU demos) gets proportionate heads; S keeps the paper's 2048 / 256 / 8192
SIZE_DEFAULTS = {"tiny": {"out_dim": 1024, "hidden_dim": 256, "bottleneck_dim": 64}}


# SMIT: AdamW; 70 % of 16³ cells masked; teacher 0.996 -> 1. lr 1e-4 at batch 2 scaled with the batch (DINO practice)
@register_method("smit",
                 "SMIT: Swin student + EMA teacher; masked image prediction, iBOT local + DINO global distillation",
                 trainer_name="SMITPretrainer", downstream="ssl3d.architectures.swin.SwinUNETRNet", transformer=True,
                 single_output=True, mask_ratio=0.7,
                 tiny={"size": "tiny", "out_dim": 64, "hidden_dim": 32, "bottleneck_dim": 16},
                 optim=OptimDefaults(lr=1e-4, betas=(0.9, 0.999), weight_decay=0.04, grad_clip=3.0))
def build_smit(plans: dict, configuration: dict, num_input_channels: int, size: str = "S", **overrides) -> SMIT3D:
    arch = {**swin_arch_kwargs(size), **overrides.pop("arch", {})}
    opts = {**SIZE_DEFAULTS.get(size, {}), **overrides}
    return SMIT3D(num_input_channels, swin_patch_size(configuration["patch_size"]), arch, **opts)
