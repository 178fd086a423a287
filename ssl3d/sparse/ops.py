"""Functional sparse ops with a backend switch: "auto", "reference", "gather" (alias "cpu"), "triton".

Every op equals its reference in ``reference.py`` (dense op on ``x * m_in``, output ``* m_out``, bias only at
visible outputs; norm statistics over visible voxels). Masks are ``Layout`` objects or bool tensors; both None
means the plain dense op.

Conv backends: "reference" = dense conv on the masked input (what SparK/nnssl run); "gather" = gather visible
cells + halo, dense conv of the stack, scatter (pure torch: CPU, or cuDNN on CUDA); "triton" = the custom
implicit-GEMM kernels (CUDA; CPU only through TRITON_INTERPRET=1); "dense" (internal) = plain conv when nothing
is masked. "auto": dense when nothing is masked; else "gather" where its cost model predicts a win (CPU:
measured on 2 cores; CUDA: cells of >= 4 voxels per axis and a halo that pays off) and "reference" otherwise;
Triton only for a layer signature whose first-use check on this device passed (``dispatch.py``), with any
Triton error falling back to the cuDNN path with one warning. An explicit "triton" raises when Triton cannot
run on the tensor's device and lets kernel errors propagate. An explicitly requested backend that cannot handle
a case (e.g. dilation) falls back to reference. Each distinct layer signature logs its backend once (INFO).
Norms have a single fused masked implementation (``norms.py``) used by every backend, so "reference" differs
from the others in convolutions only (the dense-masked baseline of the benchmark).
"""
from __future__ import annotations

import logging
from typing import Sequence

import torch
import torch.nn.functional as F

from ssl3d.utils import as_triple

from . import cpu_backend, dispatch, reference
from .amp import compute_dtype
from .norms import masked_norm
from .tensor import Layout, as_layout

log = logging.getLogger(__name__)
BACKENDS = ("auto", "reference", "gather", "cpu", "triton")
ALIASES = {"cpu": "gather"}  # the gather path was CPU-only and called "cpu"; old configs keep working
GATHER_MIN_SPEEDUP = 1.1


def canonical_backend(backend: str) -> str:
    """``backend`` with aliases resolved; ValueError naming the choices for an unknown one."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown sparse backend {backend!r}; choose one of {BACKENDS}")
    return ALIASES.get(backend, backend)


def _triton():
    from . import triton_backend  # lazy: importing triton is slow and may be unavailable
    return triton_backend


def _reference_impl(x, w, b, stride, padding, groups, lay_in, lay_out):
    return reference.conv3d(x, w, b, stride, padding, 1, groups, lay_in, lay_out)


def triton_unavailable_reason(device: torch.device) -> str | None:
    """None when Triton can run on ``device``, else why not."""
    tb = _triton()
    if tb._kernels() is None:
        return f"triton cannot be imported ({getattr(tb, '_import_error', None)})"
    if not tb.available(device) or (device.type != "cuda" and not tb.interpreter_active()):
        return "CUDA is not available" if device.type == "cuda" else \
            f"{device} tensors need TRITON_INTERPRET=1 set before triton is imported"
    return None


def cudnn_choice(device_type: str, weight: torch.Tensor, stride, padding, dilation, groups: int,
                 lay_in: Layout, lay_out: Layout) -> str:
    """The cost model's choice among the cuDNN/torch paths: "dense", "gather" or "reference"."""
    if lay_in.all_active and lay_out.all_active:
        return "dense"
    if not cpu_backend.supports(weight, stride, padding, dilation, lay_in, lay_out):
        return "reference"
    depthwise = groups > 1 and weight.shape[1] == 1 and weight.shape[0] == groups
    gain = cpu_backend.estimated_speedup(lay_out, weight.shape[2:], stride, depthwise, device_type)
    return "gather" if gain > GATHER_MIN_SPEEDUP else "reference"


def _resolve(backend: str, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride, padding,
             dilation, groups: int, lay_in: Layout, lay_out: Layout, x_shape=None):
    """(backend that runs, cuDNN fallback, signature), cached on the output layout (a layout lives for one
    step; the module and the functional call of one layer share the entry)."""
    shape = tuple(x.shape if x_shape is None else x_shape)
    dt = compute_dtype(x)
    key = ("conv-backend", backend, shape, tuple(weight.shape), bias is None, tuple(stride), tuple(padding),
           tuple(dilation), groups, dt, x.device, id(lay_in), id(dispatch.get_dispatcher()))
    hit = lay_out.cache.get(key)
    if hit is not None:
        return hit
    res = _resolve_uncached(backend, x, weight, bias, stride, padding, dilation, groups, lay_in, lay_out, shape, dt)
    if res[0] in ("dense", "gather", "reference"):  # a custom kernel's choice can be revoked by a failure
        lay_out.cache[key] = res
    return res


def _resolve_uncached(backend: str, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride,
                      padding, dilation, groups: int, lay_in: Layout, lay_out: Layout, shape, dt):
    be = canonical_backend(backend)
    sig = dispatch.ConvSignature.of(shape, weight, bias is not None, stride, padding, groups, lay_in, lay_out, dt,
                                    x.device)
    gather_ok = cpu_backend.supports(weight, stride, padding, dilation, lay_in, lay_out)
    if be == "reference" or (be == "gather" and not gather_ok):
        choice = base = "reference"
    elif be == "gather":
        choice = base = "gather"
    elif be == "triton":
        why = triton_unavailable_reason(x.device)
        if why is not None:
            raise RuntimeError(f"sparse backend 'triton' was requested but cannot run: {why}")
        choice = "triton" if _triton().supports(weight, stride, padding, dilation, groups, lay_in, lay_out) \
            else "reference"
        base = "reference"
    else:
        choice = base = cudnn_choice(x.device.type, weight, stride, padding, dilation, groups, lay_in, lay_out)
        d = dispatch.get_dispatcher()
        custom = {} if base == "dense" or any(v != 1 for v in dilation) else d.custom_candidates(
            x.device, weight, stride, padding, dilation, groups, lay_in, lay_out)
        if custom:
            cudnn = {"reference": _reference_impl, **({"gather": cpu_backend.conv3d} if gather_ok else {})}
            problem = dispatch.Problem(shape, weight, bias, stride, padding, groups, lay_in, lay_out, dt, x.device)
            choice = d.choose(sig, problem, base, cudnn, custom)
    dispatch.get_dispatcher().announce(sig, choice)
    return choice, base, sig


def choose_conv_backend(backend: str, x: torch.Tensor, weight: torch.Tensor, stride, padding, dilation,
                        groups: int, lay_in: Layout, lay_out: Layout, bias: torch.Tensor | None = None,
                        x_shape: Sequence[int] | None = None) -> str:
    """The backend that will run: "dense", "reference", "gather", "triton" (or an injected custom kernel).

    ``x_shape`` is the dense ``(B, C, D, H, W)`` when ``x`` is a compact stack (module path)."""
    return _resolve(backend, x, weight, bias, stride, padding, dilation, groups, lay_in, lay_out, x_shape)[0]


def _run(be: str, x, weight, bias, s, p, d, groups, lin, lout) -> torch.Tensor:
    if be == "dense":
        return F.conv3d(x, weight, bias, s, p, d, groups)
    if be == "gather":
        return cpu_backend.conv3d(x, weight, bias, s, p, groups, lin, lout)
    return reference.conv3d(x, weight, bias, s, p, d, groups, lin, lout)


def sparse_conv3d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                  stride: int | Sequence[int] = 1, padding: int | Sequence[int] = 0,
                  dilation: int | Sequence[int] = 1, groups: int = 1,
                  mask_in: "Layout | torch.Tensor | None" = None, mask_out: "Layout | torch.Tensor | None" = None,
                  backend: str = "auto") -> torch.Tensor:
    """``conv3d(x * m_in, w) * m_out`` (+ bias at visible outputs), computed on visible outputs only.

    ``mask_in`` is the mask at the input resolution, ``mask_out`` at the output resolution (they differ for
    strided convs). Supports any kernel size, stride and groups (regular and depthwise). Under autocast the
    output has the autocast dtype, as ``conv3d``'s.
    """
    lin, lout = as_layout(mask_in), as_layout(mask_out)
    if lin is None and lout is None:
        return F.conv3d(x, weight, bias, stride, padding, dilation, groups)
    s, p, d = as_triple(stride), as_triple(padding), as_triple(dilation)
    if lin is None or lout is None:
        return reference.conv3d(x, weight, bias, s, p, d, groups, lin, lout)
    be, base, sig = _resolve(backend, x, weight, bias, s, p, d, groups, lin, lout)
    if be in ("dense", "gather", "reference"):
        return _run(be, x, weight, bias, s, p, d, groups, lin, lout)
    if canonical_backend(backend) == "triton":
        return _triton().conv3d(x, weight, bias, s, p, groups, lin, lout)  # explicit: errors propagate
    disp = dispatch.get_dispatcher()
    try:
        return disp.impl(be)(x, weight, bias, s, p, groups, lin, lout)
    except Exception as e:  # a verified kernel failed on this call: the cuDNN path from now on
        disp.fail(sig, be, e, base)
        return _run(base, x, weight, bias, s, p, d, groups, lin, lout)


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


def _visible_voxels(lay: Layout) -> int:
    """Visible voxels of the whole batch (host int, cached per layout: one device sync per layout)."""
    n = lay.cache.get("n_visible_host")
    if n is None:
        n = lay.cache["n_visible_host"] = int(lay.visible_per_sample.sum())
    return n


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
    n = _visible_voxels(lay)
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


__all__ = ["sparse_conv3d", "triton_unavailable_reason", "sparse_conv_transpose3d", "sparse_max_pool3d", "sparse_avg_pool3d",
           "sparse_batch_norm", "sparse_instance_norm", "sparse_group_norm", "sparse_layer_norm_cf",
           "choose_conv_backend", "cudnn_choice", "canonical_backend", "BACKENDS", "ALIASES"]
