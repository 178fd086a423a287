"""Benchmark masked sparse 3D convolution backends against dense-masked (``conv3d(x*m)*m``).

Per op shape, mask ratio and backend: median forward and forward+backward times and the speed ratio
to dense-masked (>1 = faster); then a whole SparK-style ResidualEncoder step (forward+backward) sparse vs
dense-masked. Writes JSON and prints a table.

    python benchmarks/sparse_conv.py [--threads 2] [--repeats 5] [--quick] [--out benchmarks/results/sparse_conv.json]
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from ssl3d.sparse import random_cell_mask, set_backend, sparse_forward, sparsify
from ssl3d.sparse.ops import sparse_conv3d
from ssl3d.sparse.tensor import MaskCache

# (name, batch, channels, spatial, cell, kernel, depthwise)
SHAPES = [
    ("1x32x128^3 c32 k3", 1, 32, 128, 32, 3, False),
    ("2x64x64^3 c16 k3", 2, 64, 64, 16, 3, False),
    ("2x128x32^3 c8 dw7", 2, 128, 32, 8, 7, True),
    ("2x256x16^3 c4 k3", 2, 256, 16, 4, 3, False),
]
QUICK_SHAPES = [
    ("1x32x64^3 c16 k3", 1, 32, 64, 16, 3, False),
    ("2x64x32^3 c8 k3", 2, 64, 32, 8, 3, False),
    ("2x128x16^3 c4 dw7", 2, 128, 16, 4, 7, True),
    ("2x256x8^3 c2 k3", 2, 256, 8, 2, 3, False),
]


def timeit_interleaved(fns: dict, repeats: int) -> dict:
    """Median time of each function, measured round-robin so load from other processes hits all alike."""
    for fn in fns.values():
        fn()  # warm-up
    ts: dict = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            t = time.perf_counter()
            fn()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            ts[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in ts.items()}


def bench_op(name, b, c, n, cell, k, dw, ratio, backends, repeats, device):
    g = torch.Generator().manual_seed(0)
    cells = random_cell_mask(b, (n // cell,) * 3, ratio, generator=g).to(device)
    lay = MaskCache(cells).layout((n, n, n))
    x = torch.randn(b, c, n, n, n, device=device, requires_grad=True)
    w = (torch.randn(c, 1 if dw else c, k, k, k, device=device) * 0.05).requires_grad_()
    groups = c if dw else 1
    rows = []
    fwd, fwd_bwd = {}, {}
    for be in backends:
        def f(be=be):
            with torch.no_grad():
                sparse_conv3d(x, w, None, 1, k // 2, 1, groups, lay, lay, backend=be)

        def fb(be=be):
            y = sparse_conv3d(x, w, None, 1, k // 2, 1, groups, lay, lay, backend=be)
            y.backward(torch.ones_like(y))
            x.grad = w.grad = None

        fwd[be], fwd_bwd[be] = f, fb
    tf_, tb_ = timeit_interleaved(fwd, repeats), timeit_interleaved(fwd_bwd, repeats)
    times = {be: (tf_[be], tb_[be]) for be in backends}
    base = times["reference"]
    for be, (tf, tb) in times.items():
        rows.append(dict(kind="op", shape=name, ratio=ratio, backend=be, fwd_ms=tf * 1e3, fwd_bwd_ms=tb * 1e3,
                         fwd_speedup=base[0] / tf, fwd_bwd_speedup=base[1] / tb))
    return rows


def make_encoder(quick: bool) -> tuple[nn.Module, tuple[int, ...], int]:
    from dynamic_network_architectures.building_blocks.residual_encoders import ResidualEncoder
    feats = [32, 64, 128, 256, 320]
    enc = ResidualEncoder(1, 5, feats, nn.Conv3d, 3, [1, 2, 2, 2, 2], 1, True, nn.InstanceNorm3d,
                          {"eps": 1e-5, "affine": True}, None, None, nn.LeakyReLU, {"inplace": True},
                          return_skips=True)
    shape = (2, 1, 32, 32, 32) if quick else (2, 1, 64, 64, 64)
    return enc, shape, 16  # cell = total stride


def bench_encoder(ratio, backends, repeats, device, quick):
    enc, shape, cell = make_encoder(quick)
    enc = enc.to(device)
    g = torch.Generator().manual_seed(1)
    cells = random_cell_mask(shape[0], tuple(s // cell for s in shape[2:]), ratio, generator=g).to(device)
    x = torch.randn(*shape, device=device)
    sp = sparsify(enc)

    def step_for(be):
        def step():
            set_backend(sp, be)
            sp.zero_grad(set_to_none=True)
            out = sparse_forward(sp, x, cells)
            sum(o.square().mean() for o in out).backward()
        return step

    def dense_step():
        enc.zero_grad(set_to_none=True)
        sum(o.square().mean() for o in enc(x)).backward()

    fns = {be: step_for(be) for be in backends}
    fns["dense (no mask)"] = dense_step
    times = timeit_interleaved(fns, repeats)
    base = times["reference"]
    return [dict(kind="encoder", shape=f"ResEnc 5 stages 32..320 {tuple(shape)} cell {cell}", ratio=ratio,
                 backend=be, fwd_bwd_ms=t * 1e3, fwd_bwd_speedup=base / t) for be, t in times.items()]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/sparse_conv.json")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.0, 0.5, 0.75, 0.9])
    ap.add_argument("--quick", action="store_true", help="smaller shapes (CI smoke run)")
    ap.add_argument("--skip-ops", action="store_true")
    ap.add_argument("--skip-encoder", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    backends = ["reference", "cpu", "auto"] if device == "cpu" else ["reference", "triton", "auto"]
    rows = []
    if not args.skip_ops:
        for shp in (QUICK_SHAPES if args.quick else SHAPES):
            for r in args.ratios:
                rows += bench_op(*shp, r, backends, args.repeats, device)
                for row in rows[-len(backends):]:
                    print(f"{row['shape']:<22} mask {row['ratio']:.2f} {row['backend']:<10} "
                          f"fwd {row['fwd_ms']:8.1f} ms ({row['fwd_speedup']:.2f}x)  "
                          f"fwd+bwd {row['fwd_bwd_ms']:8.1f} ms ({row['fwd_bwd_speedup']:.2f}x)", flush=True)
    if not args.skip_encoder:
        for r in args.ratios:
            for row in bench_encoder(r, backends, args.repeats, device, args.quick):
                rows.append(row)
                print(f"{row['shape']:<45} mask {row['ratio']:.2f} {row['backend']:<16} "
                      f"fwd+bwd {row['fwd_bwd_ms']:8.1f} ms ({row['fwd_bwd_speedup']:.2f}x vs dense-masked)",
                      flush=True)
    meta = dict(device=torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
                threads=args.threads, torch=torch.__version__, repeats=args.repeats,
                note="speedup = dense-masked (reference backend) time / backend time; >1 is faster")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
