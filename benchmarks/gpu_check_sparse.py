"""``gpu_check`` sections that time sparse convolution: single convs at the planned encoders' real shapes and the
whole planned ResEnc encoder step, per backend, mask ratio and precision.

Backends (labels): ``dense`` = plain ``F.conv3d`` on the unmasked input; ``dense-masked`` = the ``reference``
backend, dense conv on the masked input, re-masked (what SparK/nnssl run); ``gather`` = the blocked gather path
(gather visible cells + halo, dense conv of the stack, scatter; ssl3d's ``gather`` backend, named ``cpu``
before it ran on CUDA); ``triton``; ``auto``. ``resolved`` is what ``choose_conv_backend`` picks for it.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from gpu_check_tables import Table, env_meta, measure

# label: (batch, channels in, channels out, shape, cell, kernel, groups); stride 1, 'same' padding, with bias
CONV_SHAPES = {
    "ResEnc s0 2x32x128^3 cell 32 k3": (2, 32, 32, (128,) * 3, (32,) * 3, (3,) * 3, 1),
    "ResEnc s1 2x64x64^3 cell 16 k3": (2, 64, 64, (64,) * 3, (16,) * 3, (3,) * 3, 1),
    "ResEnc s2 2x128x32^3 cell 8 k3": (2, 128, 128, (32,) * 3, (8,) * 3, (3,) * 3, 1),
    "ResEnc s3 2x256x16^3 cell 4 k3": (2, 256, 256, (16,) * 3, (4,) * 3, (3,) * 3, 1),
    "ResEnc s4 2x320x8^3 cell 2 k3": (2, 320, 320, (8,) * 3, (2,) * 3, (3,) * 3, 1),
    "aniso s0 2x32x32x256x256 cell 8x64x64 k133": (2, 32, 32, (32, 256, 256), (8, 64, 64), (1, 3, 3), 1),
    "MedNeXt dw7 2x32x128^3 cell 16": (2, 32, 32, (128,) * 3, (16,) * 3, (7,) * 3, 32),
}
DRY_CONV_SHAPES = {
    "tiny 2x4x8^3 cell 4 k3": (2, 4, 4, (8,) * 3, (4,) * 3, (3,) * 3, 1),
    "tiny aniso 2x4x4x8x8 cell 2x4x4 k133": (2, 4, 4, (4, 8, 8), (2, 4, 4), (1, 3, 3), 1),
    "tiny dw7 2x4x8^3 cell 4": (2, 4, 4, (8,) * 3, (4,) * 3, (7,) * 3, 4),
}
RATIOS = (0.0, 0.5, 0.75, 0.9)
CONV_LABELS = ("dense", "dense-masked", "gather", "triton", "auto")
CONV_COLUMNS = ["shape", "dtype", "ratio", "backend", "resolved", "fwd_ms", "fwd_bwd_ms", "peak_gib", "note"]
ENC_COLUMNS = ["encoder", "dtype", "ratio", "backend", "fwd_bwd_ms", "peak_gib", "conv_dtype", "note"]


def ops_backend(label: str) -> str:
    """The ``backend=`` string behind a table label."""
    from ssl3d.sparse import ops

    if label == "dense-masked":
        return "reference"
    if label == "gather":
        return "gather" if "gather" in ops.BACKENDS else "cpu"
    return label


def unavailable(label: str, device: torch.device) -> str | None:
    """Why ``label`` cannot run here (None: it can)."""
    from ssl3d.sparse import ops

    if label == "triton":
        try:
            from ssl3d.sparse import triton_backend as tb
        except Exception as e:
            return f"triton import failed: {type(e).__name__}: {e}"
        if device.type == "cpu" and not tb.interpreter_active():
            return "no GPU and the Triton interpreter is not active (TRITON_INTERPRET=1 before triton's import)"
        if not tb.available(device):
            return "triton unavailable"
    if label == "gather" and device.type == "cuda" and "gather" not in ops.BACKENDS:
        return "this ssl3d has no 'gather' backend on CUDA ('cpu' resolves to reference for CUDA tensors)"
    return None


def _resolved(backend: str, x, w, stride, pad, groups, lin, lout) -> str:
    from ssl3d.sparse import ops

    try:
        return str(ops.choose_conv_backend(backend, x, w, stride, pad, (1, 1, 1), groups, lin, lout))
    except Exception as e:  # its signature may change; the table still says what was asked
        return f"? ({type(e).__name__})"


def _out_of_time(ctx, table: Table, what: str) -> bool:
    if ctx.time_left() > 0:
        return False
    table.add(**{table.columns[0]: what, "note": "stopped: section time limit reached"})
    _raise_on_errors(table)
    return True


def conv_section(ctx, label: str) -> None:
    """One backend's rows of the single-conv table (``sparse_conv.<label>``)."""
    from ssl3d.sparse.masks import random_cell_mask
    from ssl3d.sparse.ops import sparse_conv3d
    from ssl3d.sparse.tensor import MaskCache

    dev = ctx.device
    table = Table(ctx.out, f"sparse_conv.{label}", f"Sparse conv fwd / fwd+bwd: {label}", CONV_COLUMNS,
                  env_meta(ctx.out))
    why = unavailable(label, dev)
    if why:
        table.add(shape="all", backend=label, note=f"skipped: {why}")
        return
    backend = ops_backend(label)
    shapes = DRY_CONV_SHAPES if ctx.dry else CONV_SHAPES
    dtypes, ratios, warmup = (torch.float32, torch.bfloat16), RATIOS, ctx.warmup
    if ctx.dry and label == "triton":  # the interpreter takes seconds per launch: one row
        shapes, dtypes, ratios, warmup = dict(list(shapes.items())[:1]), (torch.float32,), (0.75,), 0
    for name, (b, ci, co, shape, cell, k, groups) in shapes.items():
        pad = tuple(kk // 2 for kk in k)
        grid = [n // c for n, c in zip(shape, cell)]
        for dtype in dtypes:
            dt = str(dtype).replace("torch.", "")
            g = torch.Generator().manual_seed(0)
            x = torch.randn(b, ci, *shape, generator=g).to(dev, dtype).requires_grad_()
            w = (torch.randn(co, ci // groups, *k, generator=g) / (ci // groups * k[0] * k[1] * k[2]) ** 0.5)
            w = w.to(dev, dtype).requires_grad_()
            bias = torch.zeros(co, device=dev, dtype=dtype, requires_grad=True)
            gy = torch.randn(b, co, *shape, generator=g).to(dev, dtype)
            for ratio in ((None,) if label == "dense" else ratios):
                if _out_of_time(ctx, table, name):
                    return
                row: dict[str, Any] = dict(shape=name, dtype=dt, ratio=ratio, backend=label)
                try:
                    if label == "dense":
                        def conv():
                            return F.conv3d(x, w, bias, 1, pad, 1, groups)
                        row["resolved"] = "F.conv3d"
                    else:
                        cells = random_cell_mask(b, grid, ratio, generator=torch.Generator().manual_seed(1))
                        lay = MaskCache(cells.to(dev)).layout(shape)

                        def conv(lay=lay):
                            return sparse_conv3d(x, w, bias, 1, pad, 1, groups, lay, lay, backend=backend)
                        row["resolved"] = _resolved(backend, x, w, (1, 1, 1), pad, groups, lay, lay)

                    def fwd():
                        with torch.no_grad():
                            conv()

                    def fwd_bwd():
                        conv().backward(gy)
                        x.grad = w.grad = bias.grad = None

                    row["fwd_ms"], _ = measure(fwd, warmup, ctx.repeats, dev)
                    row["fwd_bwd_ms"], row["peak_gib"] = measure(fwd_bwd, warmup, ctx.repeats, dev)
                except Exception as e:  # one failing shape does not lose the others
                    row["note"] = f"error: {type(e).__name__}: {str(e)[:300]}"
                    x.grad = w.grad = bias.grad = None
                table.add(**row)
            del x, w, bias, gy
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    _raise_on_errors(table)


def _raise_on_errors(table: Table) -> None:
    """The table keeps every row; the section is reported failed when a row failed."""
    bad = [r for r in table.rows if str(r.get("note") or "").startswith(("error", "stopped"))]
    if bad:
        raise RuntimeError(f"{table.name}: {len(bad)} of {len(table.rows)} rows failed or stopped; first: "
                           f"{bad[0]['note']}")


def merge_conv_tables(out: Path) -> Table:
    """``sparse_conv``: every backend's rows with speed-ups over dense-masked and plain dense at the same shape,
    precision (and ratio)."""
    import json

    rows = []
    for label in CONV_LABELS:
        path = out / f"sparse_conv.{label}.json"
        if path.is_file():
            rows += json.loads(path.read_text())["rows"]
    timed = [r for r in rows if r.get("fwd_bwd_ms")]
    masked = {(r["shape"], r["dtype"], r["ratio"]): r["fwd_bwd_ms"] for r in timed if r["backend"] == "dense-masked"}
    dense = {(r["shape"], r["dtype"]): r["fwd_bwd_ms"] for r in timed if r["backend"] == "dense"}
    cols = CONV_COLUMNS[:-1] + ["vs_dense_masked", "vs_dense", "note"]
    table = Table(out, "sparse_conv", "Sparse conv forward+backward (median ms; vs_* = that time / this time, "
                  ">1 faster)", cols, env_meta(out))
    for r in rows:
        ref, den = masked.get((r["shape"], r["dtype"], r["ratio"])), dense.get((r["shape"], r["dtype"]))
        t = r.get("fwd_bwd_ms")
        table.add(**r, vs_dense_masked=ref / t if ref and t else None, vs_dense=den / t if den and t else None)
    return table


def encoder_arch(dry: bool) -> tuple[dict, tuple[int, ...], str]:
    """The planned ResEnc (128^3 CT at 1.5 mm; dry run: the tiny network of a 16^3 plan), batch 2."""
    sys.path.insert(0, str(Path(__file__).parent))
    from pretrain_throughput import plans_config

    from ssl3d.architectures.from_plans import scaled_architecture

    patch = [16, 16, 16] if dry else [128, 128, 128]
    cfg = plans_config(patch, [1.5, 1.5, 1.5])
    arch = scaled_architecture(cfg["architecture"], "tiny") if dry else cfg["architecture"]
    kw = arch["arch_kwargs"]
    name = f"ResEnc {kw['features_per_stage'][0]}..{kw['features_per_stage'][-1]} x{kw['n_stages']} {tuple(patch)}"
    return arch, tuple(cfg["ssl3d"]["mask_cell_size"]), name + f" cell {cfg['ssl3d']['mask_cell_size'][0]}"


def encoder_section(ctx) -> None:
    """Forward+backward of the whole planned ResEnc encoder (``encoder`` table)."""
    from ssl3d.architectures.from_plans import build_network_from_plans
    from ssl3d.sparse import random_cell_mask, set_backend, sparse_forward, sparsify

    dev = ctx.device
    arch, cell, name = encoder_arch(ctx.dry)
    table = Table(ctx.out, "encoder", "Whole encoder step, forward+backward (median ms, peak GiB)", ENC_COLUMNS,
                  env_meta(ctx.out), note="bf16 = torch.autocast(bfloat16) with fp32 weights; conv_dtype = dtype of "
                  "the encoder's convolutions' outputs (tells whether autocast reached the sparse convs)")
    enc = build_network_from_plans(arch, 1, 1).encoder.to(dev)
    sp = sparsify(enc)  # shares the parameters
    patch = (16, 16, 16) if ctx.dry else (128, 128, 128)
    x = torch.randn(2, 1, *patch, generator=torch.Generator().manual_seed(0)).to(dev)
    grid = [p // c for p, c in zip(patch, cell)]
    seen: dict = {}

    def hook(module, inputs, output):
        seen.setdefault("dtype", output.dtype)  # SparseTensor and Tensor both have .dtype

    for net in (enc, sp):
        for m in net.modules():
            if isinstance(m, torch.nn.Conv3d):
                m.register_forward_hook(hook)
    for amp in (None, torch.bfloat16):
        dt = "fp32" if amp is None else "bf16-autocast"
        for label in ("dense", "dense-masked", "gather", "auto", "triton"):  # triton last: a crash ends the section
            for ratio in ((None,) if label == "dense" else (0.0, 0.75, 0.9)):
                if _out_of_time(ctx, table, name):
                    return
                row: dict[str, Any] = dict(encoder=name, dtype=dt, ratio=ratio, backend=label)
                why = None if label == "dense" else unavailable(label, dev)
                if label == "triton" and ctx.dry and not why:
                    why = "dry run: a whole encoder is too slow in the Triton interpreter (see sparse_conv.triton)"
                if why:
                    table.add(**row, note=f"skipped: {why}")
                    break
                try:
                    if label != "dense":
                        set_backend(sp, ops_backend(label))
                        cells = random_cell_mask(2, grid, ratio, generator=torch.Generator().manual_seed(1)).to(dev)
                    seen.clear()

                    def step():
                        enc.zero_grad(set_to_none=True)
                        with torch.autocast(dev.type, dtype=amp or torch.float32, enabled=amp is not None):
                            out = enc(x) if label == "dense" else sparse_forward(sp, x, cells)
                        sum(o.float().square().mean() for o in out).backward()

                    row["fwd_bwd_ms"], row["peak_gib"] = measure(step, ctx.warmup, ctx.repeats, dev)
                    row["conv_dtype"] = str(seen["dtype"]).replace("torch.", "")
                except Exception as e:
                    row["note"] = f"error: {type(e).__name__}: {str(e)[:300]}"
                table.add(**row)
    enc.zero_grad(set_to_none=True)
    _raise_on_errors(table)


__all__ = ["conv_section", "merge_conv_tables", "encoder_section", "CONV_LABELS", "CONV_COLUMNS", "ENC_COLUMNS",
           "RATIOS"]
