"""Fused masked normalisation (Batch/Instance/GroupNorm) for inputs that are zero at masked voxels.

The reference implementation (``reference.py``) needs ~8 full-size temporaries; this one needs a single
output allocation forward and one backward: statistics are per-(sample, channel) reductions (``bmm`` against
the mask, no temporaries) that are then pooled per batch / group. Precondition: ``x`` is zero wherever the
mask is False (``SparseTensor`` features always are; pass ``masked_input=False`` otherwise).

Precision and autocast: statistics and their backward sums are accumulated in fp64 (fp32 products for
bf16/fp16 inputs, whose per-row sums would otherwise be rounded to 8 bits before the mean is subtracted);
the output and the input gradient have the input's dtype. The norm is not cast by autocast, like
batch/instance norm under CPU and CUDA autocast and group norm under CPU autocast (CUDA autocast runs the
dense ``group_norm`` in fp32; here it stays in the input dtype, values equal within that dtype's rounding).
"""
from __future__ import annotations

import torch

from .amp import no_autocast
from .tensor import Layout


def _pool(t: torch.Tensor, mode: str, groups: int) -> torch.Tensor:
    """Pool per-(b, c) sums ``(B, C)`` into statistics groups, broadcast back to ``(B, C)``."""
    if mode == "batch":
        return t.sum(0, keepdim=True).expand_as(t)
    if mode == "group":
        b, c = t.shape
        return t.view(b, groups, c // groups).sum(2, keepdim=True).expand(b, groups, c // groups).reshape(b, c)
    return t


_LOW = (torch.float16, torch.bfloat16)


def _bc_sums(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-(row, channel) dot products of ``(R, C, S)`` tensors; ``b`` may be ``(R, 1, S)`` (broadcast).

    fp32/fp64: a bmm, no full-size temporary. bf16/fp16: fp32 products and sums (a bmm would round each sum,
    a product in the input dtype each term, to 8 bits; the backward subtracts ``mean * sum(g)`` from them)."""
    r, c, s = a.shape
    if a.dtype in _LOW:
        return (a.float() * b).sum(2)
    if b.shape[1] == 1:
        return torch.bmm(a, b.reshape(r, s, 1)).view(r, c)
    return torch.bmm(a.reshape(r * c, 1, s), b.reshape(r * c, s, 1)).view(r, c)


def _to_samples(t: torch.Tensor, seg: torch.Tensor | None, n: int) -> torch.Tensor:
    """Per-row sums ``(R, C)`` -> per-sample sums ``(B, C)`` (rows are samples, or cells of sample ``seg``)."""
    if seg is None:
        return t
    return t.new_zeros((n, t.shape[1])).index_add_(0, seg, t)


def _to_rows(t: torch.Tensor, seg: torch.Tensor | None) -> torch.Tensor:
    return t if seg is None else t[seg]


class _MaskedNorm(torch.autograd.Function):
    """Rows of ``x`` are samples (dense, zero at masked voxels; ``m`` the float mask) or visible cells of
    sample ``seg[row]`` (compact; ``m`` None). ``n_vis`` holds the visible voxels per sample ``(B,)``."""

    @staticmethod
    def forward(ctx, x, weight, bias, m, seg, n_vis, mode: str, groups: int, eps: float, stats_out):
        with no_autocast(x.device):
            return _MaskedNorm._forward(ctx, x, weight, bias, m, seg, n_vis, mode, groups, eps, stats_out)

    @staticmethod
    def _forward(ctx, x, weight, bias, m, seg, n_vis, mode: str, groups: int, eps: float, stats_out):
        rows, c = x.shape[:2]
        bsz = n_vis.shape[0]
        xf = x.reshape(rows, c, -1)
        cnt = _pool(n_vis.to(torch.float64)[:, None].expand(bsz, c), mode, groups)
        s1 = _pool(_to_samples(xf.sum(2, dtype=torch.float64), seg, bsz), mode, groups)
        s2 = _pool(_to_samples(torch.linalg.vector_norm(xf, 2, dim=2, dtype=torch.float64) ** 2, seg, bsz),
                   mode, groups)
        safe = cnt.clamp(min=1)
        mean = s1 / safe
        var = (s2 / safe - mean * mean).clamp(min=0)
        rstd = torch.rsqrt(var + eps)
        w = weight.to(torch.float64)[None] if weight is not None else torch.ones_like(rstd)
        b = bias.to(torch.float64)[None] if bias is not None else torch.zeros_like(rstd)
        e = (1,) * (x.dim() - 2)
        cdt = torch.float32 if x.dtype in _LOW else x.dtype  # bf16 shift/scale would lose |mean|/std * 2^-9
        scale = _to_rows((rstd * w).to(cdt), seg).view(rows, c, *e)
        shift = _to_rows((b - mean * rstd * w).to(cdt), seg).view(rows, c, *e)
        y = torch.addcmul(shift, x, scale, out=torch.empty_like(x))  # computed in cdt, rounded once to x's dtype
        if m is not None:
            y.mul_(m.to(y.dtype))
        if stats_out is not None:
            stats_out.extend([mean[0] if mode == "batch" else mean, var[0] if mode == "batch" else var,
                              cnt[0, 0] if mode == "batch" else cnt])
        ctx.save_for_backward(x, weight, m, seg, mean, rstd, cnt)
        ctx.mode, ctx.groups, ctx.has_bias = mode, groups, bias is not None
        return y

    @staticmethod
    def backward(ctx, gy):
        with no_autocast(gy.device):
            return _MaskedNorm._backward(ctx, gy)

    @staticmethod
    def _backward(ctx, gy):
        x, weight, m, seg, mean, rstd, cnt = ctx.saved_tensors
        mode, groups = ctx.mode, ctx.groups
        rows, c = x.shape[:2]
        bsz = mean.shape[0]
        xf = x.reshape(rows, c, -1)
        gf = gy.reshape(rows, c, -1)
        if m is not None:
            sg_rows = _bc_sums(gf, m.reshape(rows, 1, -1).to(gy.dtype))  # sum(g * m)
        else:
            sg_rows = gf.sum(2, dtype=torch.float64)
        sg_bc = _to_samples(sg_rows.to(torch.float64), seg, bsz)
        sgx_bc = _to_samples(_bc_sums(gf, xf).to(torch.float64), seg, bsz)  # sum(g * x), x is 0 where masked
        sgxhat_bc = (sgx_bc - mean * sg_bc) * rstd                          # sum(g * xhat) per (b, c)
        gw = sgxhat_bc.sum(0).to(weight.dtype) if weight is not None and ctx.needs_input_grad[1] else None
        gb = sg_bc.sum(0).to(weight.dtype if weight is not None else gy.dtype) \
            if ctx.has_bias and ctx.needs_input_grad[2] else None
        gx = None
        if ctx.needs_input_grad[0]:
            w = weight.to(torch.float64)[None] if weight is not None else torch.ones_like(rstd)
            safe = cnt.clamp(min=1)
            sg = _pool(sg_bc * w, mode, groups)        # sum of dxhat = g * w over each statistics group
            sgh = _pool(sgxhat_bc * w, mode, groups)   # sum of dxhat * xhat
            # dxhat = g * w;  gx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)) at active voxels
            a = rstd * w
            bcoef = -rstd * rstd * sgh / safe
            ccoef = -rstd * sg / safe - bcoef * mean
            e = (1,) * (x.dim() - 2)

            cdt = torch.float32 if gy.dtype in _LOW else gy.dtype  # the a*g + b*x + c terms cancel

            def per_row(t):
                return _to_rows(t.to(cdt), seg).view(rows, c, *e)

            gx = torch.addcmul(per_row(ccoef), gy, per_row(a))
            gx.addcmul_(x, per_row(bcoef))
            if m is not None:
                gx.mul_(m.to(gx.dtype))
            gx = gx.to(gy.dtype)
        return gx, gw, gb, None, None, None, None, None, None, None


def masked_norm(x: torch.Tensor, mask: Layout, mode: str, weight: torch.Tensor | None,
                bias: torch.Tensor | None, eps: float, groups: int = 1, masked_input: bool = True,
                stats_out: list | None = None, compact: bool = False) -> torch.Tensor:
    """Normalise with statistics over visible voxels; ``mode`` is "batch", "instance" or "group".

    ``x`` is dense ``(B, C, ...)`` or, with ``compact``, the visible cells ``(N, C, *cell)`` of ``mask``.
    ``stats_out`` (optional list) receives (mean, biased var, count) for running-stat updates.
    """
    if compact:
        return _MaskedNorm.apply(x, weight, bias, None, mask.cell_index[0], mask.visible_per_sample, mode, groups,
                                 eps, stats_out)
    m = mask.float_mask(x.dtype)
    if not masked_input:
        x = x * m
    return _MaskedNorm.apply(x, weight, bias, m, None, mask.visible_per_sample, mode, groups, eps, stats_out)


__all__ = ["masked_norm"]
