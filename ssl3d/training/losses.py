"""Reconstruction and contrastive losses shared by the methods, always computed in fp32.

Under autocast, matmuls (InfoNCE logits) would run in bf16/fp16 even on float inputs, and sums of squared
errors over 10^5 voxels lose precision; ``fp32_loss`` disables autocast inside a loss and casts its floating
inputs to float32, so the loss and its first backward step are fp32 whatever the network ran in.
"""
from __future__ import annotations

import functools
from typing import Callable, Sequence, TypeVar

import torch
import torch.nn.functional as F

from ssl3d.architectures.vit import patchify

_Fn = TypeVar("_Fn", bound=Callable)


def _to_fp32(a):
    return a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a


def fp32_loss(fn: _Fn) -> _Fn:
    """Run ``fn`` with autocast off and its floating tensor arguments cast to float32."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        dev = next((a.device.type for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), "cpu")
        with torch.autocast(dev, enabled=False):
            return fn(*map(_to_fp32, args), **{k: _to_fp32(v) for k, v in kwargs.items()})
    return wrapper  # type: ignore[return-value]


def normalize_patches(target: torch.Tensor, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-patch z-scoring of ``(B, N, P)`` patches; returns (normalized, mean, std)."""
    mean = target.mean(-1, keepdim=True)
    std = (target.var(-1, keepdim=True, unbiased=False) + eps).sqrt()
    return (target - mean) / std, mean, std


@fp32_loss
def masked_patch_mse(pred: torch.Tensor, target: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """MSE between predicted and per-patch normalized target patches, averaged over masked patches only.

    ``pred`` and ``target`` are ``(B, N, P)``; ``visible`` is ``(B, N)`` or any ``(B, *grid)`` bool with
    True = visible. Each sample contributes by its own masked count (exact, not shared across the batch).
    """
    norm_target, _, _ = normalize_patches(target.float())
    per_patch = (pred.float() - norm_target).pow(2).mean(-1)
    masked = (~visible.reshape(visible.shape[0], -1)).float()
    return (per_patch * masked).sum() / masked.sum().clamp(min=1.0)


def masked_cell_mse(pred: torch.Tensor, image: torch.Tensor, visible_cells: torch.Tensor,
                    cell: Sequence[int]) -> torch.Tensor:
    """:func:`masked_patch_mse` for dense predictions ``(B, C, D, H, W)`` with cells of size ``cell``."""
    return masked_patch_mse(patchify(pred, cell), patchify(image, cell), visible_cells)


def denormalize_prediction(pred: torch.Tensor, image: torch.Tensor, cell: Sequence[int]) -> torch.Tensor:
    """Map per-cell normalized predictions ``(B, N, P)`` back to image intensities using the image's cell stats."""
    _, mean, std = normalize_patches(patchify(image, cell).float())
    return pred.float() * std + mean


@fp32_loss
def info_nce(queries: torch.Tensor, keys: torch.Tensor, targets: torch.Tensor,
             temperature: float = 0.1) -> tuple[torch.Tensor, float]:
    """InfoNCE over cosine similarities: query i's positive is ``keys[targets[i]]``, every other key is a
    negative. Returns the mean loss and the top-1 accuracy (a learning/collapse diagnostic)."""
    logits = F.normalize(queries.float(), dim=-1) @ F.normalize(keys.float(), dim=-1).T / temperature
    acc = float((logits.detach().argmax(-1) == targets).float().mean())
    return F.cross_entropy(logits, targets), acc


@fp32_loss
def negative_cosine(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """BYOL's regression loss 2 − 2·cos(p, z), averaged (pass ``target`` detached for a stop-gradient)."""
    return (2 - 2 * F.cosine_similarity(prediction.float(), target.float(), dim=-1)).mean()


@fp32_loss
def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
    """SimCLR's NT-Xent with negatives from the whole global batch: under DDP the keys of every rank are gathered
    with their gradients, so the loss (mean over this rank's 2n queries) and, after DDP's gradient averaging,
    the update equal the single-process ones on the concatenated batch. Query i's positive is its other view;
    every other row of both views (2N − 2 of them) is a negative."""
    from ssl3d.training.distillation import gather_with_grad, rank_offset

    n = z1.shape[0]
    a, b = F.normalize(z1.float(), dim=-1), F.normalize(z2.float(), dim=-1)
    keys = torch.cat([gather_with_grad(a), gather_with_grad(b)])  # (2N, D): all first views, then all second
    big_n = keys.shape[0] // 2
    own = rank_offset(n) + torch.arange(n, device=a.device)
    logits = torch.cat([a, b]) @ keys.T / temperature  # (2n, 2N)
    self_idx = torch.cat([own, own + big_n])
    logits[torch.arange(2 * n, device=a.device), self_idx] = float("-inf")
    targets = torch.cat([own + big_n, own])
    return F.cross_entropy(logits, targets)
