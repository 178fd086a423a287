"""Optimizer set-up shared by the pretrainers: AdamW param groups and a warm-up + cosine schedule per iteration."""
from __future__ import annotations

import math

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
