"""Pretraining step throughput and memory per method, sparse backend vs dense-masked (SparK/nnssl style).

Each (method, backend) runs in its own subprocess so peak memory is not shared: on CPU the peak RSS growth
over the model's baseline (activations + gradients + optimizer state), on CUDA ``max_memory_allocated``.
"dense-masked" is the ``reference`` backend: the dense op on masked input, re-masked (what SparK, HySparK and
nnssl do); "sparse" is ``auto`` (ssl3d's CPU path / Triton on CUDA). MAE has no convolutions to sparsify.

    .venv/bin/python benchmarks/pretrain_throughput.py [--patch 64 64 64] [--steps 5] [--device cpu]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path


def plans_config(patch: list[int], spacing: list[float]) -> dict:
    from ssl3d.planning.planner import build_plans

    fp = {"spacings": [spacing] * 4, "shapes_after_crop": [[4 * p for p in patch]] * 4, "modalities": {"0": "CT"},
          "channel_names": {"0": "CT"}, "median_relative_size_after_cropping": 1.0,
          "foreground_intensity_properties_per_channel": {"0": {}}}
    return build_plans(fp, "Dataset999_Bench", patch_size=patch)["configurations"]["3d_fullres"]


def worker(args: argparse.Namespace) -> dict:
    import torch

    from ssl3d.training.methods import build_method

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dev = torch.device(args.device)
    cfg = plans_config(args.patch, args.spacing)
    kwargs = {"size": args.size} if args.size else {}
    if args.method != "mae":
        kwargs["backend"] = args.backend
    model = build_method(args.method, {}, cfg, 1, **kwargs).to(dev)
    opt = torch.optim.AdamW(model.parameters(), 1e-4)
    x = torch.randn(args.batch, 1, *cfg["patch_size"], device=dev)
    g = torch.Generator().manual_seed(0)
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def step():
        loss = model(x, model.random_mask(args.batch, args.ratio, g, dev))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(args.warmup):
        step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    times.sort()
    median = times[len(times) // 2]
    mem = (torch.cuda.max_memory_allocated() / 2 ** 20 if dev.type == "cuda"
           else (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base_rss) / 1024)
    return {"method": args.method, "backend": args.backend, "median_s": median, "it_per_s": 1 / median,
            "peak_mem_mb": mem, "patch": cfg["patch_size"], "cell": cfg["ssl3d"]["mask_cell_size"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", nargs="+", default=["spark", "hyspark", "mae"])
    ap.add_argument("--patch", type=int, nargs=3, default=[64, 64, 64])
    ap.add_argument("--spacing", type=float, nargs=3, default=[1.5, 1.5, 1.5])
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--ratio", type=float, default=0.75)
    ap.add_argument("--size", default="tiny", help="method size preset (tiny for CPU; planned/S on GPU)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--json", default="benchmarks/results/pretrain_throughput.json")
    ap.add_argument("--worker", nargs=2, metavar=("METHOD", "BACKEND"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        args.method, args.backend = args.worker
        print(json.dumps(worker(args)))
        return 0
    rows = []
    for method in args.methods:
        for backend in (("reference", "auto") if method != "mae" else ("reference",)):
            cmd = [sys.executable, __file__, "--worker", method, backend, "--patch", *map(str, args.patch),
                   "--spacing", *map(str, args.spacing), "--batch", str(args.batch), "--ratio", str(args.ratio),
                   "--size", args.size, "--device", args.device, "--threads", str(args.threads),
                   "--warmup", str(args.warmup), "--steps", str(args.steps)]
            r = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS=str(args.threads)))
            if r.returncode != 0:
                print(f"{method}/{backend} failed:\n{r.stderr[-2000:]}", file=sys.stderr)
                continue
            rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
    print(f"device {args.device}, {args.threads} threads, batch {args.batch}, patch {args.patch}, "
          f"mask ratio {args.ratio}, size {args.size}")
    print(f"{'method':<9}{'backend':<11}{'it/s':>8}{'peak MB':>10}{'speed vs dense':>16}{'mem vs dense':>14}")
    for r in rows:
        ref = next((q for q in rows if q["method"] == r["method"] and q["backend"] == "reference"), r)
        r["speedup_vs_dense_masked"] = r["it_per_s"] / ref["it_per_s"]
        r["memory_vs_dense_masked"] = r["peak_mem_mb"] / max(ref["peak_mem_mb"], 1e-9)
        name = "dense-mask" if r["backend"] == "reference" else "sparse"
        print(f"{r['method']:<9}{name:<11}{r['it_per_s']:>8.3f}{r['peak_mem_mb']:>10.0f}"
              f"{r['speedup_vs_dense_masked']:>15.2f}x{r['memory_vs_dense_masked']:>13.2f}x")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"args": {k: v for k, v in vars(args).items() if k != "worker"},
                                           "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
