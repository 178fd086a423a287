"""Functional sparse ops with a backend switch: "auto", "reference", "cpu", "triton".

Every op equals its reference in ``reference.py`` (dense op on ``x * m_in``, output ``* m_out``, bias only at
visible outputs; norm statistics over visible voxels). Masks are ``Layout`` objects or bool tensors; both None
means the plain dense op. "auto" picks Triton for CUDA tensors, the blocked CPU path on CPU when its
measured cost model predicts a win (never at 0 % masking, where it is the plain dense op), else reference.
An explicitly requested backend that cannot handle a case (e.g. dilation) falls back to reference.
Norms have a single fused masked implementation (``norms.py``) used by every backend, so "reference" differs
from the others in convolutions only (the dense-masked baseline of the benchmark).
"""
from __future__ import annotations

import logging
from typing import Sequence

import torch
import torch.nn.functional as F

from ssl3d.utils import as_triple

from . import cpu_backend, reference
from .norms import masked_norm
from .tensor import Layout, as_layout

log = logging.getLogger(__name__)
BACKENDS = ("auto", "reference", "cpu", "triton")



def _triton():
    from . import triton_backend  # lazy: importing triton is slow and may be unavailable
    return triton_backend


def choose_conv_backend(backend: str, x: torch.Tensor, weight: torch.Tensor, stride, padding, dilation,
                        groups: int, lay_in: Layout, lay_out: Layout) -> str:
    """Resolve "auto" (and unsupported explicit choices) to the backend that will run."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown sparse backend {backend!r}; choose one of {BACKENDS}")
    if backend == "reference":
        return "reference"
    depthwise = groups > 1 and groups == x.shape[1] and weight.shape[1] == 1
    if backend in ("auto", "triton") and x.is_cuda or backend == "triton":
        tb = _triton()
        if tb.available() and tb.supports(weight, stride, padding, dilation, groups, lay_in, lay_out):
            return "triton"
        if backend == "triton":
            log.debug("triton backend cannot run this conv; using reference")
            return "reference"
    if x.is_cuda:
        return "reference"
    if not cpu_backend.supports(weight, stride, padding, dilation, lay_in, lay_out):
        return "reference"
    if backend == "cpu":
        return "cpu"
    if lay_in.all_active and lay_out.all_active:
        return "dense"
    return "cpu" if cpu_backend.estimated_speedup(lay_out, weight.shape[2:], stride, depthwise) > 1.1 \
        else "reference"


def sparse_conv3d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                  stride: int | Sequence[int] = 1, padding: int | Sequence[int] = 0,
                  dilation: int | Sequence[int] = 1, groups: int = 1,
                  mask_in: "Layout | torch.Tensor | None" = None, mask_out: "Layout | torch.Tensor | None" = None,
                  backend: str = "auto") -> torch.Tensor:
    """``conv3d(x * m_in, w) * m_out`` (+ bias at visible outputs), computed on visible outputs only.

    ``mask_in`` is the mask at the input resolution, ``mask_out`` at the output resolution (they differ for
    strided convs). Supports any kernel size, stride and groups (regular and depthwise).
    """
    lin, lout = as_layout(mask_in), as_layout(mask_out)
    if lin is None and lout is None:
        return F.conv3d(x, weight, bias, stride, padding, dilation, groups)
    s, p, d = as_triple(stride), as_triple(padding), as_triple(dilation)
    if lin is None or lout is None:
        return reference.conv3d(x, weight, bias, s, p, d, groups, lin, lout)
    be = choose_conv_backend(backend, x, weight, s, p, d, groups, lin, lout)
    if be == "dense":
        return F.conv3d(x, weight, bias, s, p, d, groups)
    if be == "cpu":
        return cpu_backend.conv3d(x, weight, bias, s, p, groups, lin, lout)
    if be == "triton":
        return _triton().conv3d(x, weight, bias, s, p, groups, lin, lout)
    return reference.conv3d(x, weight, bias, s, p, d, groups, lin, lout)


def sparse_conv_transpose3d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                            stride: int | Sequence[int] = 1, padding: int | Sequence[int] = 0,
                            output_padding: int | Sequence[int] = 0, groups: int = 1,
                            dilation: int | Sequence[int] = 1,
                            mask_in: "Layout | torch.Tensor | None" = None,
                            mask_out: "Layout | torch.Tensor | None" = None, backend: str = "auto") -> torch.Tensor:
    """Transposed conv on visible voxels (decoders are dense in SparK/HySparK, so reference math suffices)."""
    return reference.conv_transpose3d(x, weight, bias, stride, padding, output_padding, groups, dilation,
                                      mask_in, mask_out)


def sparse_max_pool3d(x: torch.Tensor, kernel_size, stride=None, padding=0, dilation=1, ceil_mode: bool = False,
                      mask_in=None, mask_out=None, backend: str = "auto") -> torch.Tensor:
    """Max over visible inputs only; masked outputs are 0."""
    lin = as_layout(mask_in)
    if lin is not None and lin.all_active:
        lout = as_layout(mask_out)
        if lout is None or lout.all_active:
            return F.max_pool3d(x, kernel_size, stride, padding, dilation, ceil_mode)
    return reference.max_pool3d(x, kernel_size, stride, padding, dilation, ceil_mode, mask_in, mask_out)


def sparse_avg_pool3d(x: torch.Tensor, kernel_size, stride=None, padding=0, ceil_mode: bool = False,
                      count_include_pad: bool = True, divisor_override=None, mask_in=None, mask_out=None,
                      backend: str = "auto") -> torch.Tensor:
    return reference.avg_pool3d(x, kernel_size, stride, padding, ceil_mode, count_include_pad,
                                divisor_override, mask_in, mask_out)


def sparse_batch_norm(x: torch.Tensor, mask, running_mean, running_var, weight, bias, training: bool,
                      momentum: float | None, eps: float, num_batches_tracked=None, backend: str = "auto",
                      masked_input: bool = False, compact: bool = False) -> torch.Tensor:
    """BatchNorm with statistics over visible voxels (``masked_input``: x is already 0 where masked;
    ``compact``: x holds the visible cells of ``mask`` only, see ``SparseTensor``)."""
    lay = as_layout(mask)
    if compact and not training:  # running statistics: a per-channel affine map, same on any layout
        return F.batch_norm(x, running_mean, running_var, weight, bias, False, 0.0, eps)
    if lay is None or not training:
        return reference.batch_norm(x, lay, running_mean, running_var, weight, bias, training, momentum, eps,
                                    num_batches_tracked)
    stats: list = []
    y = masked_norm(x, lay, "batch", weight, bias, eps, masked_input=masked_input, stats_out=stats,
                    compact=compact)
    n = float(stats[2])
    if running_mean is not None and n > 1:
        with torch.no_grad():
            if num_batches_tracked is not None:
                num_batches_tracked.add_(1)
            mom = (1.0 / float(num_batches_tracked)) if momentum is None else momentum
            running_mean.mul_(1 - mom).add_(stats[0].to(running_mean.dtype), alpha=mom)
            running_var.mul_(1 - mom).add_((stats[1] * n / (n - 1)).to(running_var.dtype), alpha=mom)
    return y


def sparse_instance_norm(x: torch.Tensor, mask, running_mean, running_var, weight, bias, use_input_stats: bool,
                         momentum: float, eps: float, backend: str = "auto",
                         masked_input: bool = False, compact: bool = False) -> torch.Tensor:
    lay = as_layout(mask)
    if compact:
        if running_mean is not None or not use_input_stats:
            raise NotImplementedError("compact instance norm with running statistics; use dense features")
        return masked_norm(x, lay, "instance", weight, bias, eps, compact=True)
    if lay is None or running_mean is not None or not use_input_stats:
        return reference.instance_norm(x, lay, running_mean, running_var, weight, bias, use_input_stats,
                                       momentum, eps)
    return masked_norm(x, lay, "instance", weight, bias, eps, masked_input=masked_input)


def sparse_group_norm(x: torch.Tensor, mask, num_groups: int, weight, bias, eps: float, backend: str = "auto",
                      masked_input: bool = False, compact: bool = False) -> torch.Tensor:
    lay = as_layout(mask)
    if lay is None:
        return reference.group_norm(x, lay, num_groups, weight, bias, eps)
    return masked_norm(x, lay, "group", weight, bias, eps, groups=num_groups, masked_input=masked_input,
                       compact=compact)


def sparse_layer_norm_cf(x: torch.Tensor, mask, weight, bias, eps: float, backend: str = "auto") -> torch.Tensor:
    return reference.layer_norm_cf(x, mask, weight, bias, eps)


__all__ = ["sparse_conv3d", "sparse_conv_transpose3d", "sparse_max_pool3d", "sparse_avg_pool3d",
           "sparse_batch_norm", "sparse_instance_norm", "sparse_group_norm", "sparse_layer_norm_cf",
           "choose_conv_backend", "BACKENDS"]
