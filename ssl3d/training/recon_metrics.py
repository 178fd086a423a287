"""Reconstruction quality of masked-image-modeling methods on held-out cases: PSNR and SSIM over masked voxels.

A user sees from these whether pretraining worked before fine-tuning anything: a method that only learned to
blur scores close to the "mean of the visible context" baseline, which is reported next to it.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def masked_psnr(pred: torch.Tensor, target: torch.Tensor, masked: torch.Tensor) -> float:
    """PSNR over the masked voxels (``masked`` bool, broadcastable), peak = the target's value range."""
    masked = masked.expand_as(target)
    diff = (pred.float() - target.float())[masked]
    if diff.numel() == 0:
        return float("nan")
    mse = float(diff.pow(2).mean())
    peak = float(target.max() - target.min())
    return float("inf") if mse == 0 else 10.0 * math.log10(peak * peak / mse)


def masked_ssim(pred: torch.Tensor, target: torch.Tensor, masked: torch.Tensor, window: int = 7) -> float:
    """3D SSIM (uniform ``window``³ neighbourhoods, constants of Wang et al. for the target's range) averaged over
    the masked voxels. Inputs ``(B, C, D, H, W)``."""
    x, y = pred.float(), target.float()
    rng = float(y.max() - y.min()) or 1.0
    c1, c2 = (0.01 * rng) ** 2, (0.03 * rng) ** 2
    pad = window // 2

    def mean(t: torch.Tensor) -> torch.Tensor:
        return F.avg_pool3d(F.pad(t, (pad,) * 6, mode="replicate"), window, stride=1)

    mx, my = mean(x), mean(y)
    vx, vy, cxy = mean(x * x) - mx * mx, mean(y * y) - my * my, mean(x * y) - mx * my
    ssim = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    m = masked.expand_as(ssim)
    return float(ssim[m].mean()) if m.any() else float("nan")
