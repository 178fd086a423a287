"""Pretraining step throughput and memory per method, sparse backend vs dense-masked (SparK/nnssl style).

Each (method, backend) runs in its own subprocess so peak memory is not shared: on CPU the peak RSS growth
over the model's baseline (activations + gradients + optimizer state), on CUDA ``max_memory_allocated``.
"dense-masked" is the ``reference`` backend: the dense op on masked input, re-masked (what SparK, HySparK and
nnssl do); "sparse" is ``auto`` (ssl3d's CPU path / Triton on CUDA). Methods without a sparse encoder (MAE, SMIT)
run once ("dense"). A step is a full training step as the trainer runs it: the method's own views or levels
(MiM: 1 + 2·gamma volumes per sample; SMIT: two views, student + EMA teacher), backward, AdamW, EMA update.
Each method uses its paper's mask ratio unless ``--ratio`` is given; ``vs first`` compares with the first
method listed. ``--checkpoint-activations`` runs every row twice, without and with activation checkpointing of
the method's encoder/decoder stages (``ckpt`` column, side by side; "vs dense" compares within the same
setting); ``--amp bf16|fp16`` runs the forward under autocast (fp16 with a gradient scaler), as ``ssl_pretrain``.

    .venv/bin/python benchmarks/pretrain_throughput.py [--methods hyspark mim smit] [--patch 64 64 64] [--steps 5]
        [--checkpoint-activations] [--amp bf16]
"""
from __future__ import annotations

import argparse
import contextlib
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

    from ssl3d.training.methods import build_method, get_method_spec

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dev = torch.device(args.device)
    cfg = plans_config(args.patch, args.spacing)
    spec = get_method_spec(args.method)
    kwargs = {"size": args.size} if args.size else {}
    if spec.sparse:
        kwargs["backend"] = args.backend
    model = build_method(args.method, {}, cfg, 1, **kwargs).to(dev)
    if args.ckpt:
        model.enable_activation_checkpointing()
    amp = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.amp]
    scaler = torch.amp.GradScaler(dev.type) if amp == torch.float16 else None
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], 1e-4)
    views = (2,) if model.n_views == 2 else ()  # contrastive methods get two views per case from the loader
    x = torch.randn(args.batch, *views, 1, *model.data_patch_size, device=dev)
    ratio = args.ratio if args.ratio is not None else (0.75 if spec.mask_ratio is None else spec.mask_ratio)
    g = torch.Generator().manual_seed(0)
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def step():
        model.set_progress(1, 1000)
        with torch.autocast(dev.type, dtype=amp) if amp else contextlib.nullcontext():
            loss = model(x, model.random_mask(args.batch, ratio, g, dev), generator=g)
        opt.zero_grad(set_to_none=True)
        if scaler is None:
            loss.backward()
            opt.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        model.after_optimizer_step()

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
    return {"method": args.method, "backend": args.backend, "checkpoint_activations": bool(args.ckpt),
            "amp": args.amp, "median_s": median, "it_per_s": 1 / median,
            "peak_mem_mb": mem, "patch": list(model.patch_size), "data_patch": list(model.data_patch_size),
            "cell": list(model.cell_size), "mask_ratio": ratio,
            "params_m": sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", nargs="+", default=["spark", "hyspark", "mae"])
    ap.add_argument("--patch", type=int, nargs=3, default=[64, 64, 64])
    ap.add_argument("--spacing", type=float, nargs=3, default=[1.5, 1.5, 1.5])
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--ratio", type=float, default=None, help="mask ratio (default: each method's own)")
    ap.add_argument("--size", default="tiny", help="method size preset (tiny for CPU; planned/S on GPU)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--checkpoint-activations", action="store_true",
                    help="run every row without and with activation checkpointing (methods that support it)")
    ap.add_argument("--amp", default="off", choices=["off", "bf16", "fp16"], help="autocast dtype of the forward")
    ap.add_argument("--json", default="benchmarks/results/pretrain_throughput.json")
    ap.add_argument("--worker", nargs=3, metavar=("METHOD", "BACKEND", "CKPT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        args.method, args.backend, ckpt = args.worker
        args.ckpt = ckpt == "1"
        print(json.dumps(worker(args)))
        return 0
    from ssl3d.training.methods import get_method_spec

    rows = []
    for method in args.methods:
        spec = get_method_spec(method)
        ckpts = ("0", "1") if args.checkpoint_activations and spec.checkpointing else ("0",)
        for backend in (("reference", "auto") if spec.sparse else ("reference",)):
            for ckpt in ckpts:
                ratio = [] if args.ratio is None else ["--ratio", str(args.ratio)]
                cmd = [sys.executable, __file__, "--worker", method, backend, ckpt, "--patch", *map(str, args.patch),
                       "--spacing", *map(str, args.spacing), "--batch", str(args.batch), *ratio,
                       "--size", args.size, "--device", args.device, "--threads", str(args.threads),
                       "--warmup", str(args.warmup), "--steps", str(args.steps), "--amp", args.amp]
                env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
                r = subprocess.run(cmd, capture_output=True, text=True, env=env)
                if r.returncode != 0:
                    print(f"{method}/{backend}/ckpt {ckpt} failed:\n{r.stderr[-2000:]}", file=sys.stderr)
                    continue
                rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
    print(f"device {args.device}, {args.threads} threads, batch {args.batch}, patch {args.patch}, size {args.size}, "
          f"amp {args.amp}")
    print(f"{'method':<9}{'backend':<11}{'ckpt':>5}{'ratio':>6}{'params M':>9}{'s/step':>8}{'peak MB':>9}"
          f"{'speed vs dense':>15}{'mem vs dense':>13}{'time vs first':>14}{'mem vs first':>13}")
    first = next((r for r in rows if r["method"] == args.methods[0] and r["backend"] == "auto"
                  and not r["checkpoint_activations"]), rows[0] if rows else {})
    for r in rows:
        ref = next((q for q in rows if q["method"] == r["method"] and q["backend"] == "reference"
                    and q["checkpoint_activations"] == r["checkpoint_activations"]), r)
        r["speedup_vs_dense_masked"] = r["it_per_s"] / ref["it_per_s"]
        r["memory_vs_dense_masked"] = r["peak_mem_mb"] / max(ref["peak_mem_mb"], 1e-9)
        r["time_vs_first"] = r["median_s"] / first["median_s"]
        r["memory_vs_first"] = r["peak_mem_mb"] / max(first["peak_mem_mb"], 1e-9)
        sparse = get_method_spec(r["method"]).sparse
        name = ("dense-mask" if r["backend"] == "reference" else "sparse") if sparse else "dense"
        ckpt = "yes" if r["checkpoint_activations"] else "no"
        print(f"{r['method']:<9}{name:<11}{ckpt:>5}{r['mask_ratio']:>6.2f}{r['params_m']:>9.2f}{r['median_s']:>8.3f}"
              f"{r['peak_mem_mb']:>9.0f}{r['speedup_vs_dense_masked']:>14.2f}x{r['memory_vs_dense_masked']:>12.2f}x"
              f"{r['time_vs_first']:>13.2f}x{r['memory_vs_first']:>12.2f}x")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"args": {k: v for k, v in vars(args).items() if k != "worker"},
                                           "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
