"""Autocast for the sparse autograd Functions (custom Functions are not on autocast's cast lists).

Convolutions follow autocast's rule for ``conv3d``: when autocast is enabled for the tensor's device,
floating inputs in fp32/fp16/bf16 are cast to the autocast dtype (fp64 is left alone, as autocast does), and the
Function then runs with autocast disabled, so its forward and backward stay in that dtype (the casts are
ordinary differentiable ``.to`` ops: parameter gradients arrive in the parameter's dtype). Norms are not cast:
they keep the input's dtype (statistics in fp64), see ``norms.py``.
"""
from __future__ import annotations

import contextlib

import torch

_CASTABLE = (torch.float32, torch.float16, torch.bfloat16)


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype autocast casts conv inputs to on ``device``, or None when autocast is off there."""
    if device.type not in ("cpu", "cuda", "xpu", "mps") or not torch.is_autocast_enabled(device.type):
        return None
    return torch.get_autocast_dtype(device.type)


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype a conv on ``t`` runs in here (autocast's target when it would cast ``t``)."""
    dt = autocast_dtype(t.device)
    return dt if dt is not None and t.dtype in _CASTABLE else t.dtype


def cast_conv_inputs(*tensors: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    """``tensors`` cast as autocast casts the inputs of ``conv3d`` (unchanged when autocast is off)."""
    ref = next(t for t in tensors if t is not None)
    dt = autocast_dtype(ref.device)
    if dt is None:
        return tensors
    return tuple(t.to(dt) if t is not None and t.dtype in _CASTABLE and t.dtype != dt else t for t in tensors)


def no_autocast(device: torch.device):
    """Context that switches autocast off on ``device`` (a no-op context where it is off already)."""
    if device.type in ("cpu", "cuda", "xpu", "mps") and torch.is_autocast_enabled(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


__all__ = ["autocast_dtype", "compute_dtype", "cast_conv_inputs", "no_autocast"]
