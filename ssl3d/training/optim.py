"""Optimization shared by every ssl3d trainer: AdamW param groups, warm-up + cosine per iteration, the optimizer
step (AMP grad scaler, gradient clipping) that pretraining and fine-tuning trainers all call, and the AMP
settings (``resolve_amp``)."""
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


def backward(loss: torch.Tensor, grad_scaler: "torch.amp.GradScaler | None" = None) -> None:
    """Accumulate ``loss``'s gradients (scaled by AMP's grad scaler when there is one)."""
    (grad_scaler.scale(loss) if grad_scaler is not None else loss).backward()


def clip_and_step(optimizer: torch.optim.Optimizer, parameters: Iterable[torch.Tensor], grad_clip: float | None,
                  grad_scaler: "torch.amp.GradScaler | None" = None) -> None:
    """(unscale) + clip + step on the accumulated gradients. ``parameters`` must hold every trained tensor,
    including ones that live outside the network (mask tokens), so they are clipped too."""
    params = [p for p in parameters if p.requires_grad]
    if grad_scaler is not None:
        grad_scaler.unscale_(optimizer)
    if grad_clip:
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    if grad_scaler is not None:
        grad_scaler.step(optimizer)
        grad_scaler.update()
    else:
        optimizer.step()


def optimizer_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer, parameters: Iterable[torch.Tensor],
                   grad_clip: float | None, grad_scaler: "torch.amp.GradScaler | None" = None) -> None:
    """backward + (unscale) + clip + step, with or without AMP's grad scaler (one micro-batch per step)."""
    backward(loss, grad_scaler)
    clip_and_step(optimizer, parameters, grad_clip, grad_scaler)


AMP_CHOICES = ("bf16", "fp16", "off")


def resolve_amp(amp: str | None, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``--amp`` on ``device`` (None: no autocast). Default (``amp=None``): bf16 on CUDA
    GPUs that support it, else fp16 (with a grad scaler); off on CPU/MPS. bf16 also runs on CPU (tests)."""
    if amp is None:
        amp = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if device.type == "cuda" else "off"
    if amp not in AMP_CHOICES:
        raise ValueError(f"amp must be one of {AMP_CHOICES}, got {amp!r}")
    if amp == "off":
        return None
    if device.type not in ("cuda", "cpu") or (amp == "fp16" and device.type != "cuda"):
        raise ValueError(f"--amp {amp} is not supported on {device.type} (fp16: cuda only; bf16: cuda, cpu)")
    if amp == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError("--amp bf16: this GPU does not support bfloat16; use --amp fp16")
    return torch.bfloat16 if amp == "bf16" else torch.float16
