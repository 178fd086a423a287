"""``MedContextTrainer``: segmentation with a masked-context consistency term and an EMA teacher.

Per step: the student segments the input and a masked copy (a fraction, default 40 %, of 3D cells replaced by
a learnable mask token, a different mask per sample); an EMA teacher segments the input. Loss =
DiceCE(student(x)) + DiceCE(student(x_masked)) + β·‖Fs^M − Ft‖²/‖Ft‖² on the highest-resolution logits
(β = 0.5). The teacher momentum follows a cosine from 0.996 to 1 over the *global* step (epoch × iterations +
iteration); MedContext's public code indexes it by the batch index and shares one mask per batch.

Works with any architecture nnU-Net builds and with or without ``-pretrained_weights``. The mask token and
the teacher live in the trainer (and its checkpoints), so the network's state_dict and nnU-Net's predictor
are untouched. Options in ``configurations[c]["ssl3d_finetune"]``: ``medcontext_ratio``, ``medcontext_beta``,
``medcontext_momentum``.
"""
from __future__ import annotations

import copy
import math

import torch
from torch import autocast, nn

from nnunetv2.utilities.helpers import dummy_context
from ssl3d.layers import total_stride
from ssl3d.sparse.masks import random_cell_mask, upsample_mask
from ssl3d.training.finetuning.trainer import SSLFinetuneTrainer


def ema_momentum(step: int, total_steps: int, base: float = 0.996) -> float:
    """Cosine schedule from ``base`` at step 0 to 1 at ``total_steps`` (clamped beyond)."""
    t = min(max(step, 0), total_steps) / max(1, total_steps)
    return 1.0 - (1.0 - base) * (math.cos(math.pi * t) + 1.0) / 2.0


def relative_consistency(student: torch.Tensor, teacher: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """‖Fs − Ft‖² / ‖Ft‖² per sample (squared norms), averaged over the batch."""
    dims = tuple(range(1, student.dim()))
    num = (student.float() - teacher.float()).pow(2).sum(dims)
    den = teacher.float().pow(2).sum(dims).clamp(min=eps)
    return (num / den).mean()


def mask_cells(x: torch.Tensor, cell: tuple[int, int, int], ratio: float, token: torch.Tensor,
               generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace ``ratio`` of the cells of every sample (own mask each) by ``token (C,)``. Returns (x_masked, visible)."""
    grid = tuple(max(1, s // c) for s, c in zip(x.shape[2:], cell))
    visible = random_cell_mask(x.shape[0], grid, ratio, generator, x.device)
    keep = upsample_mask(visible, x.shape[2:])[:, None]
    return torch.where(keep, x, token.view(1, -1, 1, 1, 1).to(x.dtype)), visible


class MedContextTrainer(SSLFinetuneTrainer):
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.mask_ratio = float(self.ft.get("medcontext_ratio", 0.4))
        self.beta = float(self.ft.get("medcontext_beta", 0.5))
        self.base_momentum = float(self.ft.get("medcontext_momentum", 0.996))
        n_channels = len(dataset_json.get("channel_names", dataset_json.get("modality", {"0": ""})))
        self.mask_token = nn.Parameter(torch.zeros(n_channels, device=self.device))
        self.teacher: nn.Module | None = None
        self.global_step = 0
        ssl = self.configuration_manager.configuration.get("ssl3d", {})
        strides = self.configuration_manager.network_arch_init_kwargs.get("strides")
        total = total_stride(strides) if strides else (16, 16, 16)
        self.mask_cell = tuple(int(c) for c in ssl.get("mask_cell_size", total))

    def configure_optimizers(self):
        optimizer, scheduler = super().configure_optimizers()
        optimizer.add_param_group({"params": [self.mask_token], "lr_factor": 1.0, "weight_decay": 0.0})
        return optimizer, scheduler

    @property
    def total_steps(self) -> int:
        return self.num_epochs * self.num_iterations_per_epoch

    def _ensure_teacher(self) -> nn.Module:
        if self.teacher is None:
            self.teacher = copy.deepcopy(self._network_module()).eval()
            for p in self.teacher.parameters():
                p.requires_grad_(False)
        return self.teacher

    @torch.no_grad()
    def update_teacher(self) -> float:
        m = ema_momentum(self.global_step, self.total_steps, self.base_momentum)
        for t, s in zip(self._ensure_teacher().parameters(), self._network_module().parameters()):
            t.mul_(m).add_(s.detach(), alpha=1.0 - m)
        for t, s in zip(self.teacher.buffers(), self._network_module().buffers()):
            t.copy_(s)
        return m

    def on_train_epoch_start(self):
        super().on_train_epoch_start()
        self.global_step = self.current_epoch * self.num_iterations_per_epoch

    def train_step(self, batch: dict) -> dict:
        data = batch["data"].to(self.device, non_blocking=True)
        target = batch["target"]
        target = [t.to(self.device, non_blocking=True) for t in target] if isinstance(target, list) \
            else target.to(self.device, non_blocking=True)
        teacher = self._ensure_teacher()
        g = torch.Generator().manual_seed(1_000_003 * (self.local_rank + 1) + self.global_step)
        masked, _ = mask_cells(data, self.mask_cell, self.mask_ratio, self.mask_token, g)
        self.optimizer.zero_grad(set_to_none=True)
        with autocast(self.device.type, enabled=True) if self.device.type == "cuda" else dummy_context():
            out, out_masked = self.network(data), self.network(masked)
            with torch.no_grad():
                out_teacher = teacher(data)
            top = (lambda o: o[0] if isinstance(o, (list, tuple)) else o)
            l_sup = self.loss(out, target)
            l_masked = self.loss(out_masked, target)
            l_cons = relative_consistency(top(out_masked), top(out_teacher))
            loss = l_sup + l_masked + self.beta * l_cons
        if self.grad_scaler is not None:
            self.grad_scaler.scale(loss).backward()
            self.grad_scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.network.parameters(), 12)
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()
        else:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.network.parameters(), 12)
            self.optimizer.step()
        self.update_teacher()
        self.global_step += 1
        return {"loss": loss.detach().cpu().numpy()}

    def save_checkpoint(self, filename: str) -> None:
        super().save_checkpoint(filename)
        if self.local_rank == 0 and not self.disable_checkpointing and self.teacher is not None:
            ckpt = torch.load(filename, map_location="cpu", weights_only=False)
            ckpt["medcontext"] = {"teacher": self.teacher.state_dict(), "mask_token": self.mask_token.detach().cpu()}
            torch.save(ckpt, filename)

    def load_checkpoint(self, filename_or_checkpoint) -> None:
        super().load_checkpoint(filename_or_checkpoint)
        ckpt = torch.load(filename_or_checkpoint, map_location=self.device, weights_only=False)
        if "medcontext" in ckpt:
            self._ensure_teacher().load_state_dict(ckpt["medcontext"]["teacher"])
            with torch.no_grad():
                self.mask_token.copy_(ckpt["medcontext"]["mask_token"])
