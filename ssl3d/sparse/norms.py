"""Fused masked normalisation (Batch/Instance/GroupNorm) for inputs that are zero at masked voxels.

The reference implementation (``reference.py``) needs ~8 full-size temporaries; this one needs a single
output allocation forward and one backward: statistics are per-(sample, channel) reductions (``bmm`` against
the mask, no temporaries) that are then pooled per batch / group. Precondition: ``x`` is zero wherever the
mask is False (``SparseTensor`` features always are; pass ``masked_input=False`` otherwise).
"""
from __future__ import annotations

import torch

from .tensor import Layout


def _pool(t: torch.Tensor, mode: str, groups: int) -> torch.Tensor:
    """Pool per-(b, c) sums ``(B, C)`` into statistics groups, broadcast back to ``(B, C)``."""
    if mode == "batch":
        return t.sum(0, keepdim=True).expand_as(t)
    if mode == "group":
        b, c = t.shape
        return t.view(b, groups, c // groups).sum(2, keepdim=True).expand(b, groups, c // groups).reshape(b, c)
    return t


def _bc_sums(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-(sample, channel) dot products of two ``(B, C, S)`` tensors without a full-size temporary."""
    bs, c, s = a.shape
    return torch.bmm(a.reshape(bs * c, 1, s), b.reshape(bs * c, s, 1)).view(bs, c)


class _MaskedNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, m, mode: str, groups: int, eps: float, stats_out):
        bsz, c = x.shape[:2]
        xf = x.reshape(bsz, c, -1)
        mf = m.reshape(bsz, 1, -1)
        # counts per (b, c): active voxels of sample b
        n_b = mf.sum(2).expand(bsz, c).to(torch.float64)
        cnt = _pool(n_b, mode, groups)
        s1 = _pool(xf.sum(2, dtype=torch.float64), mode, groups)
        s2 = _pool(torch.linalg.vector_norm(xf, 2, dim=2, dtype=torch.float64) ** 2, mode, groups)
        safe = cnt.clamp(min=1)
        mean = s1 / safe
        var = (s2 / safe - mean * mean).clamp(min=0)
        rstd = torch.rsqrt(var + eps)
        w = weight.to(torch.float64)[None] if weight is not None else torch.ones_like(rstd)
        b = bias.to(torch.float64)[None] if bias is not None else torch.zeros_like(rstd)
        scale = (rstd * w).to(x.dtype)
        shift = (b - mean * rstd * w).to(x.dtype)
        e = (1,) * (x.dim() - 2)
        y = torch.addcmul(shift.view(bsz, c, *e), x, scale.view(bsz, c, *e))
        y.mul_(m.to(y.dtype))
        if stats_out is not None:
            stats_out.extend([mean[0] if mode == "batch" else mean, var[0] if mode == "batch" else var,
                              cnt[0, 0] if mode == "batch" else cnt])
        ctx.save_for_backward(x, weight, m, mean, rstd, cnt)
        ctx.mode, ctx.groups, ctx.has_bias = mode, groups, bias is not None
        return y

    @staticmethod
    def backward(ctx, gy):
        x, weight, m, mean, rstd, cnt = ctx.saved_tensors
        mode, groups = ctx.mode, ctx.groups
        bsz, c = x.shape[:2]
        xf = x.reshape(bsz, c, -1)
        mf = m.reshape(bsz, -1, 1).to(gy.dtype)
        gf = gy.reshape(bsz, c, -1)
        sg_bc = torch.bmm(gf, mf).view(bsz, c).to(torch.float64)          # sum(g * m)
        sgx_bc = _bc_sums(gf, xf).to(torch.float64)                         # sum(g * x), x is 0 where masked
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
            gx = torch.addcmul(ccoef.to(gy.dtype).view(bsz, c, *e), gy, a.to(gy.dtype).view(bsz, c, *e))
            gx.addcmul_(x, bcoef.to(gy.dtype).view(bsz, c, *e))
            gx.mul_(m.to(gy.dtype))
        return gx, gw, gb, None, None, None, None, None


def masked_norm(x: torch.Tensor, mask: Layout, mode: str, weight: torch.Tensor | None,
                bias: torch.Tensor | None, eps: float, groups: int = 1, masked_input: bool = True,
                stats_out: list | None = None) -> torch.Tensor:
    """Normalise with statistics over visible voxels; ``mode`` is "batch", "instance" or "group".

    ``stats_out`` (optional list) receives (mean, biased var, count) for running-stat updates.
    """
    m = mask.float_mask(x.dtype)
    if not masked_input:
        x = x * m
    return _MaskedNorm.apply(x, weight, bias, m, mode, groups, eps, stats_out)


__all__ = ["masked_norm"]
