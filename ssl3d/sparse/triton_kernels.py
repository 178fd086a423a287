"""Triton implicit-GEMM kernels for masked sparse 3D convolution over active-tile lists.

Every program handles one spatial tile (TZ×TY×TX voxels = the GEMM's M dimension) from a precomputed list of
tiles that contain at least one visible voxel, times one block of channels. Tiles without visible voxels are
never visited. Accumulation is fp32 for fp32/bf16/fp16 inputs. Masks are uint8 ``(B, D, H, W)``; features
are addressed through explicit strides (NCDHW or channels-last). Regular convs use ``tl.dot``; depthwise
convs are per-channel FMAs. Gradients: dgrad walks the *input* tiles and gathers ``(i + p - k) / s``,
wgrad reduces over output tiles split across programs and finishes with fp32 atomics, or (``DETERMINISTIC``)
stores one partial sum per split that the caller reduces in a fixed order. Feature offsets are 64-bit
(``_offset``): ``z * stride_z`` passes 2^31 for large volumes (320 channels at 192^3). The tile count and the
split count are runtime arguments that Triton does not specialize on, so masks and splits never recompile.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _tile_coords(tiles_ptr, pid, TZ: tl.constexpr, TY: tl.constexpr, TX: tl.constexpr):
    b = tl.load(tiles_ptr + pid * 4).to(tl.int64)
    z0 = tl.load(tiles_ptr + pid * 4 + 1)
    y0 = tl.load(tiles_ptr + pid * 4 + 2)
    x0 = tl.load(tiles_ptr + pid * 4 + 3)
    r = tl.arange(0, TZ * TY * TX)
    return b, z0 + r // (TY * TX), y0 + (r // TX) % TY, x0 + r % TX


@triton.jit
def _offset(b, z, y, x, sb, sz, sy, sx):
    """Element offset of voxel (b, z, y, x) in int64 (i32 products of coordinate and stride can overflow)."""
    return b.to(tl.int64) * sb + z.to(tl.int64) * sz + y.to(tl.int64) * sy + x.to(tl.int64) * sx


@triton.jit
def _visible(m_ptr, b, z, y, x, D, H, W, ok):
    """``ok`` restricted to voxels whose uint8 mask ``(B, D, H, W)`` is set."""
    m = tl.load(m_ptr + ((b * D + z) * H + y) * W + x, mask=ok, other=0)
    return ok & (m != 0)


@triton.jit
def _accumulate_tap(acc, src_ptr, w_ptr, row, ok, n, n_ok, K, N, kk, s_c,
                    BLOCK_K: tl.constexpr, DEPTHWISE: tl.constexpr, PRECISION: tl.constexpr,
                    UPCAST: tl.constexpr):
    """One kernel tap ``kk``: acc[r, n] += sum_k src[row_r, k] * w[kk, k, n] over the K reduction channels
    (depthwise: acc[r, n] += src[row_r, n] * w[kk, n]); rows outside ``ok`` read as zero."""
    if DEPTHWISE:
        a = tl.load(src_ptr + row[:, None] + n[None, :] * s_c, mask=ok[:, None] & n_ok[None, :], other=0.0)
        wv = tl.load(w_ptr + kk * N + n, mask=n_ok, other=0.0)
        acc += a.to(tl.float32) * wv.to(tl.float32)[None, :]
    else:
        for c0 in range(0, K, BLOCK_K):
            k = c0 + tl.arange(0, BLOCK_K)
            k_ok = k < K
            a = tl.load(src_ptr + row[:, None] + k[None, :] * s_c, mask=ok[:, None] & k_ok[None, :], other=0.0)
            wv = tl.load(w_ptr + (kk * K + k[:, None]) * N + n[None, :], mask=k_ok[:, None] & n_ok[None, :],
                         other=0.0)
            if UPCAST:
                a = a.to(tl.float32)
                wv = wv.to(tl.float32)
            acc = tl.dot(a, wv, acc, input_precision=PRECISION)
    return acc


@triton.jit
def _store_visible(acc, m_ptr, out_ptr, b, z, y, x, D, H, W, sb, sz, sy, sx, sc, n, n_ok, valid):
    """Store the tile, zero where the output mask is not set."""
    acc = tl.where(_visible(m_ptr, b, z, y, x, D, H, W, valid)[:, None], acc, 0.0)
    ptr = out_ptr + _offset(b, z, y, x, sb, sz, sy, sx)[:, None] + n[None, :] * sc
    tl.store(ptr, acc.to(out_ptr.dtype.element_ty), mask=valid[:, None] & n_ok[None, :])


@triton.jit
def conv_fwd_kernel(x_ptr, w_ptr, bias_ptr, mi_ptr, mo_ptr, out_ptr, tiles_ptr,
                    Ci, Co, Di, Hi, Wi, Do, Ho, Wo,
                    sxb, sxc, sxz, sxy, sxx, sob, soc, soz, soy, sox,
                    KZ: tl.constexpr, KY: tl.constexpr, KX: tl.constexpr,
                    SZ: tl.constexpr, SY: tl.constexpr, SX: tl.constexpr,
                    PZ: tl.constexpr, PY: tl.constexpr, PX: tl.constexpr, HAS_BIAS: tl.constexpr,
                    TZ: tl.constexpr, TY: tl.constexpr, TX: tl.constexpr,
                    BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, DEPTHWISE: tl.constexpr,
                    PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """out[b, co, o] = sum_{k, ci} w[k, ci, co] * (x * m_in)[b, ci, o*s - p + k], kept where m_out."""
    b, oz, oy, ox = _tile_coords(tiles_ptr, tl.program_id(0), TZ, TY, TX)
    co = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    co_ok = co < Co
    out_ok = (oz < Do) & (oy < Ho) & (ox < Wo)
    acc = tl.zeros((TZ * TY * TX, BLOCK_N), dtype=tl.float32)
    for kk in range(0, KZ * KY * KX):
        kz = kk // (KY * KX)
        ky = (kk // KX) % KY
        kx = kk % KX
        iz = oz * SZ - PZ + kz
        iy = oy * SY - PY + ky
        ix = ox * SX - PX + kx
        ok = out_ok & (iz >= 0) & (iz < Di) & (iy >= 0) & (iy < Hi) & (ix >= 0) & (ix < Wi)
        ok = _visible(mi_ptr, b, iz, iy, ix, Di, Hi, Wi, ok)
        row = _offset(b, iz, iy, ix, sxb, sxz, sxy, sxx)
        acc = _accumulate_tap(acc, x_ptr, w_ptr, row, ok, co, co_ok, Ci, Co, kk, sxc, BLOCK_K, DEPTHWISE,
                              PRECISION, UPCAST)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + co, mask=co_ok, other=0.0).to(tl.float32)[None, :]
    _store_visible(acc, mo_ptr, out_ptr, b, oz, oy, ox, Do, Ho, Wo, sob, soz, soy, sox, soc, co, co_ok, out_ok)


@triton.jit
def conv_dgrad_kernel(g_ptr, w_ptr, mi_ptr, mo_ptr, gx_ptr, tiles_ptr,
                      Ci, Co, Di, Hi, Wi, Do, Ho, Wo,
                      sgb, sgc, sgz, sgy, sgx, sib, sic, siz, siy, six,
                      KZ: tl.constexpr, KY: tl.constexpr, KX: tl.constexpr,
                      SZ: tl.constexpr, SY: tl.constexpr, SX: tl.constexpr,
                      PZ: tl.constexpr, PY: tl.constexpr, PX: tl.constexpr,
                      TZ: tl.constexpr, TY: tl.constexpr, TX: tl.constexpr,
                      BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, DEPTHWISE: tl.constexpr,
                      PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """gx[b, ci, i] = m_in * sum_{k, co} w[k, co, ci] * (g * m_out)[b, co, (i + p - k) / s] (exact division)."""
    b, iz, iy, ix = _tile_coords(tiles_ptr, tl.program_id(0), TZ, TY, TX)
    ci = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    ci_ok = ci < Ci
    in_ok = (iz < Di) & (iy < Hi) & (ix < Wi)
    acc = tl.zeros((TZ * TY * TX, BLOCK_N), dtype=tl.float32)
    for kk in range(0, KZ * KY * KX):
        kz = kk // (KY * KX)
        ky = (kk // KX) % KY
        kx = kk % KX
        tz = iz + PZ - kz
        ty = iy + PY - ky
        tx = ix + PX - kx
        ok = in_ok & (tz >= 0) & (ty >= 0) & (tx >= 0) & (tz % SZ == 0) & (ty % SY == 0) & (tx % SX == 0)
        oz = tz // SZ
        oy = ty // SY
        ox = tx // SX
        ok = ok & (oz < Do) & (oy < Ho) & (ox < Wo)
        ok = _visible(mo_ptr, b, oz, oy, ox, Do, Ho, Wo, ok)
        row = _offset(b, oz, oy, ox, sgb, sgz, sgy, sgx)
        acc = _accumulate_tap(acc, g_ptr, w_ptr, row, ok, ci, ci_ok, Co, Ci, kk, sgc, BLOCK_K, DEPTHWISE,
                              PRECISION, UPCAST)
    _store_visible(acc, mi_ptr, gx_ptr, b, iz, iy, ix, Di, Hi, Wi, sib, siz, siy, six, sic, ci, ci_ok, in_ok)


@triton.jit(do_not_specialize=["n_tiles", "n_split"])
def conv_wgrad_kernel(x_ptr, g_ptr, mi_ptr, mo_ptr, dw_ptr, tiles_ptr, n_tiles, n_split,
                      Ci, Co, Di, Hi, Wi, Do, Ho, Wo,
                      sxb, sxc, sxz, sxy, sxx, sgb, sgc, sgz, sgy, sgx,
                      KZ: tl.constexpr, KY: tl.constexpr, KX: tl.constexpr,
                      SZ: tl.constexpr, SY: tl.constexpr, SX: tl.constexpr,
                      PZ: tl.constexpr, PY: tl.constexpr, PX: tl.constexpr,
                      TZ: tl.constexpr, TY: tl.constexpr, TX: tl.constexpr,
                      BLOCK_CI: tl.constexpr, BLOCK_CO: tl.constexpr, DETERMINISTIC: tl.constexpr,
                      DEPTHWISE: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """dw[k, ci, co] += sum over visible outputs o of (x*m_in)[ci, o*s - p + k] * (g*m_out)[co, o].

    Grid: (KVOL * n_split, ceil(Ci / BLOCK_CI) (1 for depthwise), ceil(Co / BLOCK_CO)); split ``j`` visits
    tiles j, j + n_split, ... Fp32 atomics into ``dw``, or with ``DETERMINISTIC`` a plain store into
    ``dw[j]`` (shape (n_split, *dw)), summed over j by the caller.
    """
    pid0 = tl.program_id(0)
    kk = pid0 // n_split
    split = pid0 % n_split
    kz = kk // (KY * KX)
    ky = (kk // KX) % KY
    kx = kk % KX
    co = tl.program_id(2) * BLOCK_CO + tl.arange(0, BLOCK_CO)
    co_ok = co < Co
    ci = tl.program_id(1) * BLOCK_CI + tl.arange(0, BLOCK_CI)
    ci_ok = ci < Ci
    if DEPTHWISE:
        acc_d = tl.zeros((BLOCK_CO,), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_CI, BLOCK_CO), dtype=tl.float32)
    for t in range(split, n_tiles, n_split):
        b, oz, oy, ox = _tile_coords(tiles_ptr, t, TZ, TY, TX)
        out_ok = (oz < Do) & (oy < Ho) & (ox < Wo)
        ok_o = _visible(mo_ptr, b, oz, oy, ox, Do, Ho, Wo, out_ok)
        iz = oz * SZ - PZ + kz
        iy = oy * SY - PY + ky
        ix = ox * SX - PX + kx
        ok_i = ok_o & (iz >= 0) & (iz < Di) & (iy >= 0) & (iy < Hi) & (ix >= 0) & (ix < Wi)
        ok_i = _visible(mi_ptr, b, iz, iy, ix, Di, Hi, Wi, ok_i)
        xrow = _offset(b, iz, iy, ix, sxb, sxz, sxy, sxx)
        grow = _offset(b, oz, oy, ox, sgb, sgz, sgy, sgx)
        gv = tl.load(g_ptr + grow[:, None] + co[None, :] * sgc, mask=ok_o[:, None] & co_ok[None, :], other=0.0)
        if DEPTHWISE:
            a = tl.load(x_ptr + xrow[:, None] + co[None, :] * sxc, mask=ok_i[:, None] & co_ok[None, :], other=0.0)
            acc_d += tl.sum(a.to(tl.float32) * gv.to(tl.float32), axis=0)
        else:
            a = tl.load(x_ptr + xrow[:, None] + ci[None, :] * sxc, mask=ok_i[:, None] & ci_ok[None, :], other=0.0)
            if UPCAST:
                a = a.to(tl.float32)
                gv = gv.to(tl.float32)
            acc = tl.dot(tl.trans(a), gv, acc, input_precision=PRECISION)
    if DEPTHWISE:
        ptr = dw_ptr + kk * Co + co
        if DETERMINISTIC:
            tl.store(ptr + split.to(tl.int64) * (KZ * KY * KX) * Co, acc_d, mask=co_ok)
        else:
            tl.atomic_add(ptr, acc_d, mask=co_ok)
    else:
        ptr = dw_ptr + (kk * Ci + ci[:, None]) * Co + co[None, :]
        if DETERMINISTIC:
            tl.store(ptr + split.to(tl.int64) * (KZ * KY * KX) * Ci * Co, acc,
                     mask=ci_ok[:, None] & co_ok[None, :])
        else:
            tl.atomic_add(ptr, acc, mask=ci_ok[:, None] & co_ok[None, :])
