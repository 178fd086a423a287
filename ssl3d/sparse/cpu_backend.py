"""The "gather" backend (alias "cpu"): gather visible output cells with their input halo, convolve the stack,
scatter back. Pure torch ops, so it runs on CPU and on CUDA (where the dense conv of the stack is cuDNN's).

Blocks are the cells of the *output* layout; each block's input window is cut from the padded input with
one strided ``unfold`` view + one advanced-index gather and multiplied by the gathered input-mask window
(so the result equals ``conv3d(x * m_in) * m_out`` exactly). A custom autograd Function keeps the gathered
stack for the weight gradient and computes input and weight gradients with one
``aten.convolution_backward`` call on the stack; the input gradient is scattered back in groups of blocks
whose windows do not overlap (no atomics, no index_add over overlapping memory).

``conv3d_compact`` is the same computation on compact features (the visible cells only, see
``SparseTensor``): its output stack *is* the next layer's compact input, so between layers nothing dense is
written or kept for backward, and norms / activations / residual additions run on visible cells only.

Under autocast the entry points cast like ``conv3d`` (``amp.py``) and both Functions run in that dtype.
Device syncs happen once per plan (mask layout), never per call.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F

from ssl3d.utils import as_triple

from .amp import cast_conv_inputs, no_autocast
from .tensor import Layout, cells_view

log = logging.getLogger(__name__)


@dataclass
class BlockPlan:
    """Geometry of one blocked conv for one (input layout, output layout, kernel, stride, padding)."""

    idx: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]  # b, z, y, x of visible out cells
    cell_out: tuple[int, int, int]
    step: tuple[int, int, int]      # input offset between neighbouring blocks = cell_out * stride
    window: tuple[int, int, int]    # input window per block = (cell_out - 1) * stride + kernel
    pad: tuple[int, int, int, int, int, int]  # F.pad order (x_lo, x_hi, y_lo, y_hi, z_lo, z_hi)
    in_shape: tuple[int, int, int]
    out_shape: tuple[int, int, int]
    groups_of_blocks: list = field(default_factory=list)  # non-overlapping scatter groups
    win_mask: dict = field(default_factory=dict)          # dtype -> (N, 1, *window)

    @property
    def n(self) -> int:
        return int(self.idx[0].numel())



def make_plan(lay_in: Layout, lay_out: Layout, kernel: Sequence[int], stride: Sequence[int],
              padding: Sequence[int]) -> BlockPlan:
    key = ("block", lay_in.shape, tuple(kernel), tuple(stride), tuple(padding), id(lay_in))
    plan = lay_out.cache.get(key)
    if plan is not None:
        return plan
    co, k, s, p = lay_out.cell_size, as_triple(kernel), as_triple(stride), as_triple(padding)
    step = tuple(c * st for c, st in zip(co, s))
    window = tuple((c - 1) * st + kk for c, st, kk in zip(co, s, k))
    grid = lay_out.cells.shape[1:]
    pad_hi = [max(0, (g - 1) * sp + w - (n + pp)) for g, sp, w, n, pp in zip(grid, step, window, lay_in.shape, p)]
    pad = (p[2], pad_hi[2], p[1], pad_hi[1], p[0], pad_hi[0])
    ac = lay_out.active_cells
    idx = (ac[:, 0].contiguous(), ac[:, 1].contiguous(), ac[:, 2].contiguous(), ac[:, 3].contiguous())
    period = [-(-w // sp) for w, sp in zip(window, step)]  # blocks this far apart never overlap
    res = [i % per for i, per in zip(idx[1:], period)]
    gid = (res[0] * period[1] + res[1]) * period[2] + res[2]
    order = torch.argsort(gid, stable=True)
    counts = torch.bincount(gid, minlength=math.prod(period)).tolist()  # the plan's one device sync
    groups, start = [], 0
    for g, cnt in enumerate(counts):
        if cnt:
            r = (g // (period[1] * period[2]), (g // period[2]) % period[1], g % period[2])
            sel = order[start:start + cnt]
            # window index of each block in the group's strided unfold view (see _scatter_windows)
            kidx = (idx[0][sel],) + tuple((idx[1 + a][sel] - r[a]) // period[a] for a in range(3))
            groups.append((r, sel, kidx))
        start += cnt
    plan = BlockPlan(idx, co, step, window, pad, lay_in.shape, lay_out.shape, groups, {})  # type: ignore[arg-type]
    plan.period = tuple(period)  # type: ignore[attr-defined]
    lay_out.cache[key] = plan
    return plan


class _Workspace:
    """Reused CPU scratch buffers: fresh multi-MB allocations page-fault on every call (glibc mmaps them), which
    on the 2-core test machine costs more than the sparse conv itself. Halo borders are never written, so
    a padded input buffer only needs its interior refreshed. CUDA tensors get plain allocations: the caching
    allocator already reuses memory, and buffers held here would be invisible to it."""

    def __init__(self, max_bytes: int = 1 << 30):
        self.max_bytes = max_bytes
        self.bufs: dict = {}

    def get(self, tag: str, shape: Sequence[int], dtype: torch.dtype, device: torch.device,
            zero: bool = False) -> torch.Tensor:
        if device.type != "cpu":
            return torch.zeros(shape, dtype=dtype, device=device)
        key = (tag, tuple(shape), dtype, device)
        buf = self.bufs.pop(key, None)
        if buf is None:
            buf = torch.zeros(shape, dtype=dtype, device=device)
        elif zero:
            buf.zero_()
        self.bufs[key] = buf  # most recently used last
        total = sum(b.numel() * b.element_size() for b in self.bufs.values())
        while total > self.max_bytes and len(self.bufs) > 1:
            old = self.bufs.pop(next(iter(self.bufs)))
            total -= old.numel() * old.element_size()
        return buf


_WS = _Workspace()


def _padded_shape(shape: Sequence[int], pad: Sequence[int]) -> tuple[int, ...]:
    """``(B, C, D, H, W)`` after ``F.pad(..., pad)`` (pad in F.pad order: x_lo, x_hi, y_lo, y_hi, z_lo, z_hi)."""
    b, c, d, h, w = shape
    return (b, c, d + pad[4] + pad[5], h + pad[2] + pad[3], w + pad[0] + pad[1])


def _interior(xp: torch.Tensor, pad: Sequence[int], shape: Sequence[int]) -> torch.Tensor:
    """The unpadded ``shape`` (D, H, W) region of a padded buffer."""
    return xp[:, :, pad[4]:pad[4] + shape[0], pad[2]:pad[2] + shape[1], pad[0]:pad[0] + shape[2]]


def _padded(x: torch.Tensor, pad: Sequence[int], tag: str) -> torch.Tensor:
    """``F.pad(x, pad)`` into a reused buffer (valid until the next call with the same tag and shape)."""
    if (x.requires_grad and torch.is_grad_enabled()) or x.device.type != "cpu":
        return F.pad(x, pad)
    buf = _WS.get(tag, _padded_shape(x.shape, pad), x.dtype, x.device)
    _interior(buf, pad, x.shape[2:]).copy_(x)
    return buf


def _gather_windows(xp: torch.Tensor, plan: BlockPlan) -> torch.Tensor:
    w, st = plan.window, plan.step
    v = xp.unfold(2, w[0], st[0]).unfold(3, w[1], st[1]).unfold(4, w[2], st[2])
    b, z, y, x = plan.idx
    return v[b, :, z, y, x]  # (N, C, *window)


def _window_mask(plan: BlockPlan, lay_in: Layout, dtype: torch.dtype) -> torch.Tensor:
    m = plan.win_mask.get(dtype)
    if m is None:
        mp = F.pad(lay_in.float_mask(dtype), plan.pad)
        m = _gather_windows(mp, plan).contiguous()
        plan.win_mask[dtype] = m
    return m


class _BlockConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, plan: BlockPlan, lay_in: Layout, stride, groups):
        xs = _gather_windows(_padded(x, plan.pad, "fwd"), plan)
        xs.mul_(_window_mask(plan, lay_in, x.dtype))
        ys = F.conv3d(xs, weight, bias, stride, 0, 1, groups)
        out = x.new_zeros((x.shape[0], weight.shape[0], *plan.out_shape))
        if plan.n:
            cells_view(out, plan.cell_out)[plan.idx] = ys
        ctx.save_for_backward(xs, weight)
        ctx.plan, ctx.lay_in, ctx.stride, ctx.groups = plan, lay_in, stride, groups
        ctx.has_bias = bias is not None
        ctx.x_shape = x.shape
        return out

    @staticmethod
    def backward(ctx, gout):
        with no_autocast(gout.device):
            return _BlockConv._backward(ctx, gout)

    @staticmethod
    def _backward(ctx, gout):
        xs, weight = ctx.saved_tensors
        plan: BlockPlan = ctx.plan
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        gx = gw = gb = None
        if plan.n == 0:
            gx = gout.new_zeros(ctx.x_shape) if need_x else None
            gw = torch.zeros_like(weight) if need_w else None
            gb = gout.new_zeros(weight.shape[0]) if (need_b and ctx.has_bias) else None
            return gx, gw, gb, None, None, None, None
        gs = cells_view(gout, plan.cell_out)[plan.idx].contiguous()  # (N, Co, *cell_out)
        gxs, gw, gb = _conv_backward(ctx, gs, xs, weight)
        if need_x:
            gxs.mul_(_window_mask(plan, ctx.lay_in, gxs.dtype))
            gxp = _scatter_windows(gxs, plan, ctx.x_shape)
            gx = _interior(gxp, plan.pad, ctx.x_shape[2:]).clone()
        return gx, gw, gb, None, None, None, None


def _scatter_windows(gxs: torch.Tensor, plan: BlockPlan, x_shape: Sequence[int]) -> torch.Tensor:
    """Sum the per-block window gradients ``(N, C, *window)`` into a zeroed padded input buffer (reused)."""
    gxp = _WS.get("bwd", _padded_shape(x_shape, plan.pad), gxs.dtype, gxs.device, zero=True)
    win, st, per = plan.window, plan.step, plan.period  # type: ignore[attr-defined]
    single = len(plan.groups_of_blocks) == 1
    for (rz, ry, rx), sel, kidx in plan.groups_of_blocks:
        # blocks `period` apart do not overlap: within a group no window is written twice
        v = gxp[:, :, rz * st[0]:, ry * st[1]:, rx * st[2]:]
        v = v.unfold(2, win[0], st[0] * per[0]).unfold(3, win[1], st[1] * per[1]).unfold(
            4, win[2], st[2] * per[2]).permute(0, 2, 3, 4, 1, 5, 6, 7)
        v.index_put_(kidx, gxs if single else gxs[sel], accumulate=True)
    return gxp


def _conv_backward(ctx, gs: torch.Tensor, xs: torch.Tensor, weight: torch.Tensor):
    # saved tensors are unpacked once by the caller (non-reentrant activation checkpointing allows one unpack)
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    return torch.ops.aten.convolution_backward(
        gs, xs, weight, [weight.shape[0]] if (need_b and ctx.has_bias) else None, list(ctx.stride),
        [0, 0, 0], [1, 1, 1], False, [0, 0, 0], ctx.groups, [need_x, need_w, need_b and ctx.has_bias])


class _BlockConvCompact(torch.autograd.Function):
    """Compact in, compact out: ``(N_in, C, *cell_in)`` visible input cells -> ``(N_out, Co, *cell_out)``.

    The input cells are put into a zeroed padded scratch volume only to cut the haloed windows; nothing
    dense is kept for backward, and the input gradient is gathered straight back to compact form.
    """

    @staticmethod
    def forward(ctx, xc, weight, bias, plan: BlockPlan, lay_in: Layout, stride, groups, batch: int):
        p = plan.pad
        xp = _WS.get("cfwd", _padded_shape((batch, xc.shape[1], *lay_in.shape), p), xc.dtype, xc.device,
                     zero=True)
        if xc.shape[0]:
            cells_view(_interior(xp, p, lay_in.shape), lay_in.cell_size)[lay_in.cell_index] = xc
        xs = _gather_windows(xp, plan)
        ys = F.conv3d(xs, weight, bias, stride, 0, 1, groups)
        ctx.save_for_backward(xs, weight)
        ctx.plan, ctx.lay_in, ctx.stride, ctx.groups, ctx.batch = plan, lay_in, stride, groups, batch
        ctx.has_bias = bias is not None
        ctx.n_in = xc.shape[0]
        return ys

    @staticmethod
    def backward(ctx, gys):
        with no_autocast(gys.device):
            return _BlockConvCompact._backward(ctx, gys)

    @staticmethod
    def _backward(ctx, gys):
        plan: BlockPlan = ctx.plan
        xs, weight = ctx.saved_tensors
        if plan.n == 0:
            gx = gys.new_zeros((ctx.n_in, xs.shape[1], *ctx.lay_in.cell_size)) if ctx.needs_input_grad[0] else None
            gw = torch.zeros_like(weight) if ctx.needs_input_grad[1] else None
            gb = gys.new_zeros(weight.shape[0]) if (ctx.needs_input_grad[2] and ctx.has_bias) else None
            return gx, gw, gb, None, None, None, None, None
        gxs, gw, gb = _conv_backward(ctx, gys.contiguous(), xs, weight)
        gx = None
        if ctx.needs_input_grad[0]:
            lay: Layout = ctx.lay_in
            gxp = _scatter_windows(gxs, plan, (ctx.batch, xs.shape[1], *lay.shape))
            gx = cells_view(_interior(gxp, plan.pad, lay.shape), lay.cell_size)[lay.cell_index]
        return gx, gw, gb, None, None, None, None, None


def supports(weight: torch.Tensor, stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int],
             lay_in: Layout | None, lay_out: Layout | None) -> bool:
    """Whether the blocked path applies (masks given, dilation 1, output shape = cells * cell size)."""
    if lay_in is None or lay_out is None or any(d != 1 for d in dilation):
        return False
    k = weight.shape[2:]
    for n_in, n_out, kk, s, p in zip(lay_in.shape, lay_out.shape, k, stride, padding):
        if (n_in + 2 * p - kk) // s + 1 != n_out:
            return False
    return True


def estimated_speedup(lay_out: Layout, kernel: Sequence[int], stride: Sequence[int], depthwise: bool,
                      device_type: str = "cpu") -> float:
    """Predicted dense-masked / blocked time for forward+backward (> 1: the blocked path is faster).

    CPU: scaled from 2-core measurements at 75 % masking on a quiet machine (benchmarks/sparse_conv.py):
    regular k3 stride 1 ~3.3-3.7x for cells of 16-32 voxels, ~2.4x for 4-voxel cells, ~1x for 1-2 voxel cells
    (the halo is most of the window); stride 2 ~2.8x; depthwise 7^3 ~5x (dense depthwise backward is slow).
    The gain scales with the visible fraction. Other devices: see ``_estimated_speedup_gpu``.
    """
    frac = lay_out.active_fraction
    if frac == 0.0:
        return float("inf")
    if device_type != "cpu":
        return _estimated_speedup_gpu(frac, lay_out.cell_size, kernel, stride, depthwise)
    cell = min(lay_out.cell_size)
    if depthwise:
        base = 5.0
    elif any(s > 1 for s in stride):
        base = 2.8 if cell >= 4 else 1.0
    elif cell >= 16:
        base = 3.3
    elif cell >= 4:
        base = 2.3
    else:
        base = 0.9
    return base * 0.25 / frac


def _estimated_speedup_gpu(frac: float, cell: Sequence[int], kernel: Sequence[int], stride: Sequence[int],
                           depthwise: bool) -> float:
    """GPU (cuDNN) estimate, not measured: the stack conv does exactly the visible FLOPs, the extra cost is the
    gathered halo copy (``halo`` = gathered input / visible input) weighted by how memory-bound the conv is
    (depthwise: fully; regular: ~0.3), plus ~5 % of a dense conv for the gather/scatter launches. Cells under
    4 voxels on an axis are left to dense conv on the masked input (tiny windows, halo up to 8x)."""
    if min(cell) < 4:
        return 0.0
    window = [(c - 1) * s + k for c, s, k in zip(cell, stride, kernel)]
    halo = math.prod(window) / math.prod(c * s for c, s in zip(cell, stride))
    copy_weight = 1.0 if depthwise else 0.3
    return 1.0 / (frac * (1.0 + copy_weight * (halo - 1.0)) + 0.05)


def conv3d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: Sequence[int],
           padding: Sequence[int], groups: int, lay_in: Layout, lay_out: Layout) -> torch.Tensor:
    """Blocked sparse conv; caller checked ``supports``. Equals ``conv3d(x*m_in, w)*m_out (+bias)``."""
    plan = make_plan(lay_in, lay_out, weight.shape[2:], stride, padding)
    x, weight, bias = cast_conv_inputs(x, weight, bias)
    with no_autocast(x.device):
        return _BlockConv.apply(x, weight, bias, plan, lay_in, tuple(stride), groups)


def conv3d_compact(xc: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: Sequence[int],
                   padding: Sequence[int], groups: int, lay_in: Layout, lay_out: Layout, batch: int) -> torch.Tensor:
    """Blocked sparse conv on compact features: visible cells of ``lay_in`` -> visible cells of ``lay_out``."""
    plan = make_plan(lay_in, lay_out, weight.shape[2:], stride, padding)
    xc, weight, bias = cast_conv_inputs(xc, weight, bias)
    with no_autocast(xc.device):
        return _BlockConvCompact.apply(xc, weight, bias, plan, lay_in, tuple(stride), groups, batch)


__all__ = ["conv3d", "conv3d_compact", "supports", "estimated_speedup", "make_plan", "BlockPlan"]
