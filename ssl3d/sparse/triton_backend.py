"""Triton backend: active-tile lists, kernel launches and the autograd Function (fwd, dgrad, wgrad).

Runs on CUDA tensors, or on CPU tensors when ``TRITON_INTERPRET=1`` was set before triton was imported
(slow; for tests only). Supports groups=1 and depthwise (groups = Cin = Cout), any kernel/stride/padding,
dilation 1; fp32 (TF32 when ``torch.backends.cudnn.allow_tf32``, like cuDNN), bf16 and fp16 with fp32
accumulation. Weight gradients use fp32 atomics, or per-split partial sums reduced in a fixed order when
``torch.are_deterministic_algorithms_enabled()``. Every kernel launch goes through ``_launch`` so that
``triton_aot.record_launches`` can capture the specializations a model launches without running them.
"""
from __future__ import annotations

import logging
import os
from typing import Sequence

import torch
import torch.nn.functional as F

from .tensor import Layout

log = logging.getLogger(__name__)
TILE = (4, 4, 4)  # 64 voxels = the GEMM M block; cells are usually multiples of 4 at early stages

_tk = None
_import_error: str | None = None
_recorder = None  # set by triton_aot.record_launches: receives (kernel name, grid, args) instead of a launch
DETERMINISTIC_PARTIALS = 1 << 24  # fp32 elements of per-split wgrad partial sums (64 MiB) at most


def _kernels():
    global _tk, _import_error
    if _tk is None and _import_error is None:
        try:
            from . import triton_kernels as tk
            _tk = tk
        except Exception as e:  # triton missing or broken: the backend reports itself unavailable
            _import_error = f"{type(e).__name__}: {e}"
            log.debug("triton unavailable: %s", _import_error)
    return _tk


def interpreter_active() -> bool:
    """CPU tensors can run: triton's own ``@jit`` helpers (``tl.zeros``...) were built in interpreter mode.

    Triton decides that when it is imported, so ``TRITON_INTERPRET=1`` set afterwards is not enough.
    """
    if _recorder is not None:
        return True  # recording: launches are captured, never run, so CPU tensors are fine
    if os.environ.get("TRITON_INTERPRET") != "1" or _kernels() is None:
        return False
    import triton.language as tl
    return type(tl.zeros).__name__ == "InterpretedFunction"


def available(device: torch.device | None = None) -> bool:
    """Triton can run here: CUDA present, or the interpreter enabled for CPU tensors."""
    if _kernels() is None:
        return False
    if device is not None and device.type == "cuda":
        return torch.cuda.is_available() or _recorder is not None
    return interpreter_active() or torch.cuda.is_available()


def supports(weight: torch.Tensor, stride, padding, dilation, groups: int, lay_in: Layout | None,
             lay_out: Layout | None) -> bool:
    if lay_in is None or lay_out is None or any(d != 1 for d in dilation):
        return False
    if weight.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return False
    co, ci_g = weight.shape[:2]
    if groups != 1 and not (ci_g == 1 and co == groups):
        return False
    if not weight.is_cuda and not interpreter_active():
        return False
    return True


def active_tiles(lay: Layout, tile: Sequence[int] = TILE) -> torch.Tensor:
    """int32 ``(n, 4)``: (b, z0, y0, x0) of every tile holding at least one visible voxel (cached)."""
    key = ("tiles", tuple(tile))
    t = lay.cache.get(key)
    if t is None:
        occ = F.max_pool3d(lay.mask[:, None].float(), tile, tile, ceil_mode=True)[:, 0] > 0
        nz = occ.nonzero()
        nz[:, 1:] *= torch.tensor(tile, device=nz.device)
        t = nz.to(torch.int32).contiguous()
        lay.cache[key] = t
    return t


def _u8(lay: Layout) -> torch.Tensor:
    m = lay.cache.get("u8")
    if m is None:
        m = lay.mask.to(torch.uint8).contiguous()
        lay.cache["u8"] = m
    return m


def _cl(t: torch.Tensor) -> torch.Tensor:
    # channels-last: the C (GEMM K/N) axis becomes contiguous, so tile loads coalesce
    return t.contiguous(memory_format=torch.channels_last_3d)


def _precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and not torch.backends.cudnn.allow_tf32:
        return "ieee"
    return "tf32" if dtype == torch.float32 else "ieee"


def _upcast(t: torch.Tensor) -> bool:
    # interpreter's bf16 tl.dot returns garbage; recorded launches are those a CUDA tensor would make
    return t.dtype == torch.bfloat16 and not t.is_cuda and _recorder is None


def _blk(n: int, lo: int = 16, hi: int = 64) -> int:
    b = lo
    while b < n and b < hi:
        b *= 2
    return b


def _launch(name: str, grid: tuple, *args) -> None:
    if _recorder is not None:
        _recorder(name, grid, args)
    else:
        getattr(_kernels(), name)[grid](*args)


def _fwd(x, w, bias, lay_in, lay_out, stride, padding, depthwise):
    bsz, ci = x.shape[:2]
    co = w.shape[0]
    do, ho, wo = lay_out.shape
    out = _cl(x.new_zeros((bsz, co, do, ho, wo)))
    tiles = active_tiles(lay_out)
    if tiles.shape[0] == 0:
        return out
    k = w.shape[2:]
    wk = (w.reshape(co, -1).t() if depthwise else w.permute(2, 3, 4, 1, 0).reshape(-1, ci, co)).contiguous()
    bn = _blk(co)
    grid = (tiles.shape[0], triton_cdiv(co, bn))
    _launch(
        "conv_fwd_kernel", grid, x, wk.to(x.dtype), bias if bias is not None else wk, _u8(lay_in), _u8(lay_out),
        out, tiles, ci, co, *lay_in.shape, do, ho, wo, *x.stride(), *out.stride(),
        *k, *stride, *padding, bias is not None, *TILE, _blk(ci, 16, 32), bn, depthwise, _precision(x.dtype),
        _upcast(x))
    return out


def _dgrad(g, w, lay_in, lay_out, stride, padding, depthwise, ci):
    bsz, co = g.shape[:2]
    gx = _cl(g.new_zeros((bsz, ci, *lay_in.shape)))
    tiles = active_tiles(lay_in)
    if tiles.shape[0] == 0:
        return gx
    k = w.shape[2:]
    wk = (w.reshape(co, -1).t() if depthwise else w.permute(2, 3, 4, 0, 1).reshape(-1, co, ci)).contiguous()
    bn = _blk(ci)
    _launch(
        "conv_dgrad_kernel", (tiles.shape[0], triton_cdiv(ci, bn)), g, wk.to(g.dtype), _u8(lay_in), _u8(lay_out),
        gx, tiles, ci, co, *lay_in.shape, *lay_out.shape, *g.stride(), *gx.stride(),
        *k, *stride, *padding, *TILE, _blk(co, 16, 32), bn, depthwise, _precision(g.dtype), _upcast(g))
    return gx


def wgrad_split(n_tiles: int, kvol: int, ci: int, co: int, deterministic: bool) -> int:
    """Tile chunks per tap: enough programs to fill the GPU; partial sums capped at DETERMINISTIC_PARTIALS."""
    split = max(1, min(64, n_tiles // 8))
    if deterministic:
        split = max(1, min(split, DETERMINISTIC_PARTIALS // (kvol * ci * co)))
    return split


def _wgrad(x, g, w, lay_in, lay_out, stride, padding, depthwise):
    co, ci_g = w.shape[:2]
    ci = x.shape[1]
    k = tuple(w.shape[2:])
    kvol = k[0] * k[1] * k[2]
    tiles = active_tiles(lay_out)
    shape = (kvol, co) if depthwise else (kvol, ci, co)
    det = torch.are_deterministic_algorithms_enabled()
    if tiles.shape[0] == 0:
        dw = torch.zeros(shape, device=x.device, dtype=torch.float32)
    else:
        split = wgrad_split(tiles.shape[0], kvol, 1 if depthwise else ci, co, det)
        # deterministic: every split stores its own partial sum (each element written once, so no zero-fill),
        # summed below over splits in a fixed order
        dw = (torch.empty((split, *shape), device=x.device, dtype=torch.float32) if det
              else torch.zeros(shape, device=x.device, dtype=torch.float32))
        bci, bco = (1, _blk(co)) if depthwise else (_blk(ci, 16, 32), _blk(co, 16, 32))
        grid = (kvol * split, 1 if depthwise else triton_cdiv(ci, bci), triton_cdiv(co, bco))
        _launch(
            "conv_wgrad_kernel", grid, x, g, _u8(lay_in), _u8(lay_out), dw, tiles, tiles.shape[0], split,
            ci, co, *lay_in.shape, *lay_out.shape, *x.stride(), *g.stride(),
            *k, *stride, *padding, *TILE, bci, bco, det, depthwise, _precision(x.dtype), _upcast(x))
        if det:
            dw = dw.sum(0)
    if depthwise:
        return dw.t().reshape(co, 1, *k).to(w.dtype)
    return dw.reshape(*k, ci, co).permute(4, 3, 0, 1, 2).contiguous().to(w.dtype)


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


class _TritonConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, lay_in, lay_out, stride, padding, depthwise):
        xc = _cl(x)
        out = _fwd(xc, weight, bias, lay_in, lay_out, stride, padding, depthwise)
        ctx.save_for_backward(xc, weight)
        ctx.geom = (lay_in, lay_out, stride, padding, depthwise)
        ctx.has_bias = bias is not None
        return out.contiguous()

    @staticmethod
    def backward(ctx, gout):
        xc, weight = ctx.saved_tensors
        lay_in, lay_out, stride, padding, depthwise = ctx.geom
        g = _cl(gout)
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = _dgrad(g, weight, lay_in, lay_out, stride, padding, depthwise, xc.shape[1]).contiguous()
        if ctx.needs_input_grad[1]:
            gw = _wgrad(xc, g, weight, lay_in, lay_out, stride, padding, depthwise)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = (gout * lay_out.float_mask(gout.dtype)).sum((0, 2, 3, 4)).to(weight.dtype)
        return gx, gw, gb, None, None, None, None, None


def conv3d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: Sequence[int],
           padding: Sequence[int], groups: int, lay_in: Layout, lay_out: Layout) -> torch.Tensor:
    """Sparse conv with Triton kernels; equals ``conv3d(x*m_in, w)*m_out`` (+bias at visible outputs).

    Under autocast, inputs are cast as for ``conv3d`` and the kernels run in that dtype (``amp.py``); the
    backward's only torch ops (layout copies, the bias-gradient sum) are not on autocast's lists."""
    from .amp import cast_conv_inputs, no_autocast
    depthwise = groups != 1
    x, weight, bias = cast_conv_inputs(x, weight, bias)
    with no_autocast(x.device):
        return _TritonConv.apply(x, weight, bias, lay_in, lay_out, tuple(stride), tuple(padding), depthwise)


__all__ = ["available", "supports", "conv3d", "active_tiles"]
