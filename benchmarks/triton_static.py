"""Static report of the Triton sparse-conv kernels for real GPUs, computed on a CPU-only machine.

Plans ResEnc encoders (isotropic CT, anisotropic 0.8x0.8x5 mm CT, 3x0.6x0.6 mm MRI) and the hybrid
(HySparK / MiM) MedNeXt stages with depthwise 7 with ssl3d's planner on synthetic fingerprints, runs each
forward and backward on CPU with the kernel launches recorded (``ssl3d.sparse.triton_aot``), compiles every
distinct specialization for each GPU architecture and prints per kernel, dtype and architecture: registers,
spills, shared memory, MMA instruction kind and estimated occupancy.

    python benchmarks/triton_static.py                       # planned patches, sm_80 + sm_90, all dtypes
    python benchmarks/triton_static.py --patch tiny --json out.json --md out.md --archs 80 90 100

``--patch planned`` records at the planned patch size (batch 1), so the integer divisibility hints are the
ones training launches; ``tiny`` uses 2x the encoder's total stride per axis (what the test suite records).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import asdict
from pathlib import Path

import torch

from ssl3d.architectures.from_plans import build_network_from_plans
from ssl3d.architectures.hybrid import HybridEncoder, hybrid_arch_kwargs
from ssl3d.planning.planner import build_plans
from ssl3d.sparse import random_cell_mask, sparse_forward, sparsify
from ssl3d.sparse import triton_aot as A

log = logging.getLogger("triton_static")
DTYPES = {"fp32-tf32": (torch.float32, True), "fp32-ieee": (torch.float32, False),
          "bf16": (torch.bfloat16, True), "fp16": (torch.float16, True)}
MODELS = ("resenc", "hybrid")


def _fingerprint(spacing, shape, modality):
    return {"spacings": [spacing] * 3, "shapes_after_crop": [shape] * 3, "modalities": {"0": modality},
            "channel_names": {"0": modality}, "median_relative_size_after_cropping": 1.0,
            "foreground_intensity_properties_per_channel": {"0": {"mean": 50.0, "std": 100.0,
                                                                 "percentile_00_5": -100.0,
                                                                 "percentile_99_5": 400.0}}}


def planned_configs() -> dict[str, dict]:
    """3d_fullres configurations planned by ssl3d on synthetic fingerprints (spacing and shape in z, y, x)."""
    fps = {"ct_iso_1mm": ([1.0, 1.0, 1.0], [300, 300, 300], "CT"),
           "ct_aniso_0.8x0.8x5mm": ([5.0, 0.8, 0.8], [60, 512, 512], "CT"),
           "mri_3x0.6x0.6mm": ([3.0, 0.6, 0.6], [24, 320, 320], "MRI")}
    return {name: build_plans(_fingerprint(*f), "Dataset900_Static")["configurations"]["3d_fullres"]
            for name, f in fps.items()}


def encoder_for(config: dict, model: str, depthwise_kernel: int = 7):
    """(sparse encoder with the Triton backend, its mask cell): the ResEnc of the plans or the hybrid's
    MedNeXt stages + ViT."""
    return _encoder(config, model, depthwise_kernel)


def _encoder(config: dict, model: str, depthwise_kernel: int):
    # built on the meta device: the kernels never run, so weight values do not matter and init is skipped
    with torch.device("meta"):
        if model == "resenc":
            enc = build_network_from_plans(config["architecture"], 1, 1, deep_supervision=False).encoder
            cell = list(config["ssl3d"]["mask_cell_size"])
        else:
            enc = HybridEncoder(1, depthwise_kernel=depthwise_kernel, backend="triton", **hybrid_arch_kwargs(config))
            cell = list(config["ssl3d"]["hybrid_junction_stride"])
    enc = enc.to_empty(device="cpu")
    with torch.no_grad():
        for t in (*enc.parameters(), *enc.buffers()):
            t.fill_(0.01)
    return (sparsify(enc, "triton", inplace=True) if model == "resenc" else enc), cell


def record(config: dict, model: str, dtype_name: str, patch: str = "tiny", depthwise_kernel: int = 7,
           seed: int = 0, encoder=None) -> list[A.Launch]:
    """Kernel launches of one forward + backward of the planned encoder (batch 1) on CPU.

    ``planned``: the planned patch, 75 % of the planned cells masked. ``tiny``: one total stride per axis, the
    last axis doubled, one of its two cells visible (every layer and channel count of the planned encoder,
    but the deepest maps are 1 voxel thick, so some size arguments differ from training: ==1 constexprs).

    Half dtypes run under ``torch.autocast("cpu")`` as training does (the sparse convs follow autocast).
    ``encoder``: ``(module, cell)`` from ``encoder_for`` to reuse one build across dtypes.
    """
    dtype, tf32 = DTYPES[dtype_name]
    torch.manual_seed(seed)
    enc, cell = encoder or _encoder(config, model, depthwise_kernel)
    if patch == "tiny":
        shape = list(cell[:2]) + [2 * cell[2]]
    else:
        shape = list(config["patch_size"])
    grid = [s // c for s, c in zip(shape, cell)]
    ratio = 0.5 if patch == "tiny" else 0.75
    cells = random_cell_mask(1, grid, ratio, generator=torch.Generator().manual_seed(seed))
    x = torch.randn(1, 1, *shape)
    prev_tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = tf32
    try:
        launches = _run(enc, x, cells, model, dtype, autocast=dtype != torch.float32)
        if any(la.args[0].dtype != dtype for la in launches):
            raise RuntimeError(f"{model} under {dtype_name} launched kernels with another dtype")
    finally:
        torch.backends.cudnn.allow_tf32 = prev_tf32
    return launches


def _run(enc, x, cells, model, dtype, autocast: bool) -> list[A.Launch]:
    ctx = torch.autocast("cpu", dtype=dtype) if autocast else contextlib.nullcontext()
    with A.record_launches() as launches, ctx:
        outs = sparse_forward(enc, x, cells) if model == "resenc" else enc(x, cells)
        loss = sum(o.float().sum() for o in outs)
    with A.record_launches() as back:
        loss.backward()
    return launches + back


def collect_specs(patch: str, dtypes, models=MODELS, configs=None, depthwise_kernel: int = 7,
                  deterministic: bool = True) -> list[A.Spec]:
    """Unique specs over every planned config, model and dtype (+ deterministic wgrad, one pass in fp32)."""
    cfgs = {n: c for n, c in planned_configs().items() if configs is None or n in configs}
    encoders = {(name, m): _encoder(cfg, m, depthwise_kernel) for name, cfg in cfgs.items() for m in models}
    launches = []
    for dn in dtypes:
        for name, cfg in cfgs.items():
            for m in models:
                t = time.perf_counter()
                launches += record(cfg, m, dn, patch, depthwise_kernel, encoder=encoders[name, m])
                log.info("recorded %s %s %s in %.1f s", name, m, dn, time.perf_counter() - t)
    if deterministic:
        with deterministic_algorithms():
            for (name, m), enc in encoders.items():
                launches += record(cfgs[name], m, dtypes[0], patch, depthwise_kernel, encoder=enc)
    return A.unique_specs(launches)


@contextlib.contextmanager
def deterministic_algorithms():
    """``torch.use_deterministic_algorithms(True)`` inside the block (warn only: CPU ops need not comply)."""
    prev = torch.are_deterministic_algorithms_enabled()
    prev_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(prev, warn_only=prev_warn)


def dedupe_constexprs(specs: list[A.Spec]) -> list[A.Spec]:
    """One spec per kernel, pointer types and constexpr set (drops variants differing in hints only)."""
    seen = {}
    for s in specs:
        key = (s.kernel, tuple(ty for ty, _ in s.specialization if ty.startswith("*")),
               tuple(sorted(s.constexprs().items())))
        seen.setdefault(key, s)
    return list(seen.values())


def summarize(results: list[A.CompileResult]) -> list[dict]:
    """One row per kernel (regular / depthwise), dtype and arch: ranges over its specializations."""
    groups = defaultdict(list)
    for r in results:
        kind = "depthwise" if " dw" in r.spec else "regular"
        groups[(r.kernel.replace("conv_", "").replace("_kernel", ""), kind, r.dtype, r.arch)].append(r)
    rows = []
    for (kernel, kind, dn, arch), rs in sorted(groups.items()):
        ok = [r for r in rs if r.ok]

        def rng(vals):
            return f"{min(vals)}–{max(vals)}" if vals and min(vals) != max(vals) else (str(vals[0]) if vals else "-")
        rows.append({"kernel": kernel, "kind": kind, "dtype": dn, "sm": arch, "specs": len(rs),
                     "errors": len(rs) - len(ok), "regs": rng([r.n_regs for r in ok]),
                     "max_spill_B": max((r.spill_bytes for r in ok), default=-1),
                     "smem_KB": rng(sorted({round(r.shared_bytes / 1024, 1) for r in ok})),
                     "mma": "/".join(sorted({r.mma for r in ok})) or "-",
                     "occupancy": rng(sorted({round(r.occupancy, 2) for r in ok})),
                     "ctas_per_sm": rng(sorted({r.ctas_per_sm for r in ok}))})
    return rows


def markdown(rows: list[dict]) -> str:
    cols = ["kernel", "kind", "dtype", "sm", "specs", "errors", "regs", "max_spill_B", "smem_KB", "mma",
            "ctas_per_sm", "occupancy"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--patch", choices=("planned", "tiny"), default="planned")
    p.add_argument("--archs", type=int, nargs="+", default=[80, 90])
    p.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--configs", nargs="+", default=None, help="planned configs to record (default: all)")
    p.add_argument("--dedupe", choices=("hints", "constexprs"), default="hints",
                   help="hints: every exact specialization; constexprs: one per constexpr set and pointer types")
    p.add_argument("--representative", action="store_true",
                   help="compile only the covering subset the test compiles (triton_aot.representative)")
    p.add_argument("--jobs", type=int, default=max(1, min(8, os.cpu_count() or 1)))
    p.add_argument("--json", type=Path, help="write specs, per-compile results and the table as JSON here")
    p.add_argument("--md", type=Path, help="write the markdown table here")
    a = p.parse_args(argv)
    unknown = set(a.configs or ()) - set(planned_configs())
    if unknown:
        print(f"error: unknown --configs {sorted(unknown)}; choose from {sorted(planned_configs())}", file=sys.stderr)
        return 2
    for path in (a.json, a.md):
        if path is not None and not path.parent.is_dir():
            print(f"error: output folder {path.parent} does not exist", file=sys.stderr)
            return 2
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("ssl3d").setLevel(logging.WARNING)  # the per-layer backend lines
    t0 = time.perf_counter()
    specs = collect_specs(a.patch, a.dtypes, a.models, a.configs)
    t_rec = time.perf_counter() - t0
    n_all = len(specs)
    if a.dedupe == "constexprs":
        specs = dedupe_constexprs(specs)
    work = A.representative(specs, a.archs) if a.representative else [(s, x) for s in specs for x in a.archs]
    log.info("%d specializations recorded in %.1f s (%d after dedupe); %d compiles for sm_%s", n_all, t_rec,
             len(specs), len(work), a.archs)
    with tempfile.TemporaryDirectory() as cache:
        results = A.compile_specs(work, a.jobs, cache_dir=cache)
    t_all = time.perf_counter() - t0
    rows = summarize(results)
    table = markdown(rows)
    print(table)
    errors = [r for r in results if not r.ok]
    for r in errors:
        print(f"compile error sm_{r.arch} {r.spec}: {r.error}", file=sys.stderr)
    print(f"\n{len(results)} compiles of {len(specs)} specializations ({n_all} recorded, patch {a.patch}, "
          f"dedupe {a.dedupe}), {len(errors)} errors, {t_all:.0f} s (recording {t_rec:.0f} s)")
    if a.md:
        tmp = a.md.with_suffix(a.md.suffix + ".tmp")
        tmp.write_text(table + "\n")
        tmp.replace(a.md)
    if a.json:
        tmp = a.json.with_suffix(a.json.suffix + ".tmp")
        tmp.write_text(json.dumps({"patch": a.patch, "archs": a.archs, "rows": rows,
                                   "results": [asdict(r) for r in results]}, indent=1))
        tmp.replace(a.json)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
