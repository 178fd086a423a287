"""Optimization shared by every ssl3d trainer: AdamW param groups, warm-up + cosine per iteration, and the one
optimizer step (AMP grad scaler, gradient clipping) that pretraining and fine-tuning trainers all call."""
from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import nn

NO_DECAY_NAME_PARTS = ("mask_token", "pos_embed", "cls_token", "norm", "bias")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on weights only: not on norms, biases, mask/position tokens (MAE/SparK practice)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        leaf = name.rsplit(".", 1)[-1]
        if p.ndim <= 1 or any(part in name for part in NO_DECAY_NAME_PARTS[:3]) or leaf == "bias":
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class WarmupCosine:
    """Linear warm-up to ``peak_lr`` then cosine decay to ``min_lr``; ``step(i)`` takes the global iteration."""

    def __init__(self, optimizer: torch.optim.Optimizer, peak_lr: float, total_steps: int, warmup_steps: int,
                 min_lr: float = 0.0):
        self.optimizer = optimizer
        self.peak_lr = peak_lr
        self.total_steps = max(1, total_steps)
        self.warmup_steps = max(0, min(warmup_steps, self.total_steps - 1))
        self.min_lr = min_lr
        self.step(0)

    def lr_at(self, it: int) -> float:
        if it < self.warmup_steps:
            return self.peak_lr * (it + 1) / self.warmup_steps
        progress = min(1.0, (it - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
        return self.min_lr + 0.5 * (self.peak_lr - self.min_lr) * (1 + math.cos(math.pi * progress))

    def step(self, it: int) -> float:
        lr = self.lr_at(it)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        return lr


def optimizer_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer, parameters: Iterable[torch.Tensor],
                   grad_clip: float | None, grad_scaler: "torch.amp.GradScaler | None" = None) -> None:
    """backward + (unscale) + clip + step, with or without AMP's grad scaler. ``parameters`` must hold every
    trained tensor, including ones that live outside the network (mask tokens), so they are clipped too."""
    params = [p for p in parameters if p.requires_grad]
    if grad_scaler is not None:
        grad_scaler.scale(loss).backward()
        grad_scaler.unscale_(optimizer)
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        grad_scaler.step(optimizer)
        grad_scaler.update()
    else:
        loss.backward()
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        optimizer.step()
