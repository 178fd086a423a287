"""Reference ("dense-masked") sparse ops: the definition every backend is tested against.

``op(x, m_in, m_out) = dense_op(x * m_in) * m_out`` (+ bias only at visible outputs); norms take their
statistics over visible positions only. With both masks None every function is exactly the dense op.
Masks are ``Layout`` objects or bool/float tensors ``(B, D, H, W)`` / ``(B, 1, D, H, W)``.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from .tensor import Layout, as_layout

MaskLike = "Layout | torch.Tensor | None"


def fmask(mask: "Layout | torch.Tensor | None", dtype: torch.dtype) -> torch.Tensor | None:
    """``(B, 1, D, H, W)`` float mask or None."""
    lay = as_layout(mask)
    return None if lay is None else lay.float_mask(dtype)


def _bias(y: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return y if bias is None else y + bias.view(1, -1, 1, 1, 1).to(y.dtype)


def conv3d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           stride: int | Sequence[int] = 1, padding: int | Sequence[int] = 0,
           dilation: int | Sequence[int] = 1, groups: int = 1,
           mask_in: MaskLike = None, mask_out: MaskLike = None) -> torch.Tensor:
    mi = fmask(mask_in, x.dtype)
    if mi is None and mask_out is None:
        return F.conv3d(x, weight, bias, stride, padding, dilation, groups)
    y = F.conv3d(x if mi is None else x * mi, weight, None, stride, padding, dilation, groups)
    y = _bias(y, bias)
    mo = fmask(mask_out, y.dtype)  # y's dtype: under autocast the conv ran in bf16/fp16, keep it there
    return y if mo is None else y * mo


def conv_transpose3d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                     stride: int | Sequence[int] = 1, padding: int | Sequence[int] = 0,
                     output_padding: int | Sequence[int] = 0, groups: int = 1,
                     dilation: int | Sequence[int] = 1,
                     mask_in: MaskLike = None, mask_out: MaskLike = None) -> torch.Tensor:
    mi, mo = fmask(mask_in, x.dtype), fmask(mask_out, x.dtype)
    if mi is None and mo is None:
        return F.conv_transpose3d(x, weight, bias, stride, padding, output_padding, groups, dilation)
    y = F.conv_transpose3d(x if mi is None else x * mi, weight, None, stride, padding, output_padding,
                           groups, dilation)
    y = _bias(y, bias)
    return y if mo is None else y * mo


def max_pool3d(x: torch.Tensor, kernel_size, stride=None, padding=0, dilation=1, ceil_mode: bool = False,
               mask_in: MaskLike = None, mask_out: MaskLike = None) -> torch.Tensor:
    """Max over visible inputs only (a masked voxel never wins, even against negative values)."""
    lin, lout = as_layout(mask_in), as_layout(mask_out)
    if lin is None and lout is None:
        return F.max_pool3d(x, kernel_size, stride, padding, dilation, ceil_mode)
    if lin is not None:
        x = x.masked_fill(~lin.mask[:, None], float("-inf"))
    y = F.max_pool3d(x, kernel_size, stride, padding, dilation, ceil_mode)
    keep = torch.isfinite(y) if lout is None else (lout.mask[:, None] & torch.isfinite(y))
    return torch.where(keep, y, torch.zeros((), dtype=y.dtype, device=y.device))


def avg_pool3d(x: torch.Tensor, kernel_size, stride=None, padding=0, ceil_mode: bool = False,
               count_include_pad: bool = True, divisor_override=None,
               mask_in: MaskLike = None, mask_out: MaskLike = None) -> torch.Tensor:
    mi, mo = fmask(mask_in, x.dtype), fmask(mask_out, x.dtype)
    y = F.avg_pool3d(x if mi is None else x * mi, kernel_size, stride, padding, ceil_mode,
                     count_include_pad, divisor_override)
    return y if mo is None else y * mo


# ----------------------------------------------------------------------------------------------- norms
def _masked_moments(x: torch.Tensor, m: torch.Tensor, dims: tuple[int, ...]):
    """Mean, biased variance and count of ``x`` over ``dims`` where ``m`` (broadcastable) is 1."""
    cnt = (m.expand_as(x) if m.shape != x.shape else m).sum(dims, keepdim=True)
    safe = cnt.clamp(min=1)
    mean = (x * m).sum(dims, keepdim=True) / safe
    var = (((x - mean) * m) ** 2).sum(dims, keepdim=True) / safe
    return mean, var, cnt


def _affine(y: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None) -> torch.Tensor:
    if weight is not None:
        y = y * weight.view(1, -1, 1, 1, 1)
    if bias is not None:
        y = y + bias.view(1, -1, 1, 1, 1)
    return y


def batch_norm(x: torch.Tensor, mask: MaskLike, running_mean: torch.Tensor | None,
               running_var: torch.Tensor | None, weight: torch.Tensor | None, bias: torch.Tensor | None,
               training: bool, momentum: float | None, eps: float,
               num_batches_tracked: torch.Tensor | None = None) -> torch.Tensor:
    """BatchNorm whose batch statistics (and running-stat updates) use visible voxels only."""
    m = fmask(mask, x.dtype)
    if m is None:
        mom = 0.0 if momentum is None else momentum
        if training and num_batches_tracked is not None:
            num_batches_tracked.add_(1)
            if momentum is None:
                mom = 1.0 / float(num_batches_tracked)
        return F.batch_norm(x, running_mean, running_var, weight, bias, training or running_mean is None,
                            mom, eps)
    if not training and running_mean is not None:
        y = F.batch_norm(x, running_mean, running_var, weight, bias, False, 0.0, eps)
        return y * m
    mean, var, cnt = _masked_moments(x, m, (0, 2, 3, 4))
    n = float(cnt.flatten()[0])
    if training and running_mean is not None and n > 1:
        with torch.no_grad():
            if num_batches_tracked is not None:
                num_batches_tracked.add_(1)
            mom = (1.0 / float(num_batches_tracked)) if momentum is None else momentum
            running_mean.mul_(1 - mom).add_(mean.flatten().to(running_mean.dtype), alpha=mom)
            running_var.mul_(1 - mom).add_((var.flatten() * n / (n - 1)).to(running_var.dtype), alpha=mom)
    y = (x - mean) * torch.rsqrt(var + eps)
    return _affine(y, weight, bias) * m


def instance_norm(x: torch.Tensor, mask: MaskLike, running_mean: torch.Tensor | None,
                  running_var: torch.Tensor | None, weight: torch.Tensor | None, bias: torch.Tensor | None,
                  use_input_stats: bool, momentum: float, eps: float) -> torch.Tensor:
    """InstanceNorm with per-sample, per-channel statistics over visible voxels (0 output if none)."""
    m = fmask(mask, x.dtype)
    if m is None:
        return F.instance_norm(x, running_mean, running_var, weight, bias, use_input_stats, momentum, eps)
    if not use_input_stats:
        return F.instance_norm(x, running_mean, running_var, weight, bias, False, momentum, eps) * m
    mean, var, cnt = _masked_moments(x, m, (2, 3, 4))
    if running_mean is not None:
        with torch.no_grad():
            n = cnt.clamp(min=2)
            running_mean.mul_(1 - momentum).add_(mean.mean((0, 2, 3, 4)).to(running_mean.dtype), alpha=momentum)
            running_var.mul_(1 - momentum).add_((var * n / (n - 1)).mean((0, 2, 3, 4)).to(running_var.dtype),
                                                alpha=momentum)
    y = (x - mean) * torch.rsqrt(var + eps)
    return _affine(y, weight, bias) * m


def group_norm(x: torch.Tensor, mask: MaskLike, num_groups: int, weight: torch.Tensor | None,
               bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    """GroupNorm with per-sample, per-group statistics over visible voxels."""
    m = fmask(mask, x.dtype)
    if m is None:
        return F.group_norm(x, num_groups, weight, bias, eps)
    b, c = x.shape[:2]
    xg = x.reshape(b, num_groups, c // num_groups, *x.shape[2:])
    mean, var, _ = _masked_moments(xg, m[:, :, None], (2, 3, 4, 5))
    y = ((xg - mean) * torch.rsqrt(var + eps)).reshape_as(x)
    return _affine(y, weight, bias) * m


def layer_norm_cf(x: torch.Tensor, mask: MaskLike, weight: torch.Tensor | None, bias: torch.Tensor | None,
                  eps: float) -> torch.Tensor:
    """Channels-first LayerNorm (normalises over C at each voxel); masked voxels are set to 0."""
    mean = x.mean(1, keepdim=True)
    var = (x - mean).pow(2).mean(1, keepdim=True)
    y = _affine((x - mean) * torch.rsqrt(var + eps), weight, bias)
    m = fmask(mask, x.dtype)
    return y if m is None else y * m


__all__ = ["conv3d", "conv_transpose3d", "max_pool3d", "avg_pool3d", "batch_norm", "instance_norm",
           "group_norm", "layer_norm_cf", "fmask"]
