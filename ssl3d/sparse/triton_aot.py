"""Ahead-of-time compilation of the Triton kernel specializations a model launches, without a GPU.

``record_launches`` captures every kernel launch of the Triton backend (kernel name, grid, real arguments)
instead of running it, so a model can run forward and backward on tiny CPU tensors. ``specialize`` turns a
launch into Triton's own specialization key, through the code path ``kernel[grid](...)`` takes
(``create_function_from_signature`` + ``JITFunction._pack_args``: ints equal to 1 become constexprs, ints and
pointers divisible by 16 get the divisibility hint). ``compile_specs`` compiles each key with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`` in worker processes that import
triton without the interpreter, and reports registers, spills, shared memory and the MMA instruction kind
read from the PTX. Used by ``tests/test_triton_static.py`` and ``benchmarks/triton_static.py``.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
import re
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from typing import Iterable, Iterator, Sequence

import torch

from . import triton_backend

log = logging.getLogger(__name__)
KERNELS = ("conv_fwd_kernel", "conv_dgrad_kernel", "conv_wgrad_kernel")
# per-SM limits for the occupancy estimate: registers, warps, CTAs, shared memory bytes (CUDA guide tables)
SM_LIMITS = {80: (65536, 64, 32, 164 * 1024), 86: (65536, 48, 16, 100 * 1024), 89: (65536, 48, 24, 100 * 1024),
             90: (65536, 64, 32, 228 * 1024), 100: (65536, 64, 32, 228 * 1024)}


@dataclass(frozen=True)
class Launch:
    kernel: str
    grid: tuple
    args: tuple


@dataclass(frozen=True)
class Spec:
    """One specialization: what ``kernel[grid](...)`` would compile for these arguments."""
    kernel: str
    specialization: tuple  # (type, key) per parameter, as Triton's binder returns it
    values: tuple  # the argument value for scalars (needed for constexprs), None for tensors

    def constexprs(self) -> dict:
        return {self.param_names()[i]: v for i, ((ty, _), v) in enumerate(zip(self.specialization, self.values))
                if ty == "constexpr"}

    def param_names(self) -> list[str]:
        return _jit(self.kernel).arg_names

    def dtype(self) -> str:
        """Feature dtype of the launch: fp32-tf32, fp32-ieee, bf16 or fp16."""
        dtype = self.specialization[0][0].lstrip("*")  # x_ptr / g_ptr
        return f"{dtype}-{self.constexprs()['PRECISION']}" if dtype == "fp32" else dtype

    def blocks(self) -> tuple:
        c = self.constexprs()
        return tuple(c[n] for n in ("BLOCK_K", "BLOCK_N", "BLOCK_CI", "BLOCK_CO") if n in c)

    def label(self) -> str:
        """Short human description: dtype, kernel size, stride, depthwise, deterministic, blocks, hints."""
        c = self.constexprs()
        k = f"k{c['KZ']}{c['KY']}{c['KX']}s{c['SZ']}{c['SY']}{c['SX']}"
        dw = " dw" if c.get("DEPTHWISE") else ""
        det = " det" if c.get("DETERMINISTIC") else ""
        hints = "".join("1" if ty == "constexpr" else (k_ or "-") for (ty, k_), n in
                        zip(self.specialization, self.param_names()) if not n.isupper())
        return f"{self.kernel} {self.dtype()} {k}{dw}{det} blk{'x'.join(map(str, self.blocks()))} [{hints}]"

    def features(self, arch: int) -> set:
        """What a compile of this spec for ``arch`` covers (for ``representative``)."""
        c = self.constexprs()
        dw, kern, dt = bool(c["DEPTHWISE"]), self.kernel, self.dtype()
        f = {("dtype", kern, dt, arch), ("depthwise", kern, dt, dw), ("arch-depthwise", kern, arch, dw),
             ("strided", kern, arch, dw, c["SZ"] * c["SY"] * c["SX"] > 1)}
        if "DETERMINISTIC" in c:
            f.add(("deterministic", kern, arch, dw, bool(c["DETERMINISTIC"])))
        return f


def _jit(name: str):
    """The kernel as a ``JITFunction`` (built from the interpreted one when the interpreter is active)."""
    from triton.runtime.jit import JITFunction

    fn = getattr(triton_backend._kernels(), name)
    if isinstance(fn, JITFunction):
        return fn
    cache = _jit.__dict__.setdefault("cache", {})
    if name not in cache:
        cache[name] = JITFunction(fn.fn, **fn.kwargs)
    return cache[name]


@contextlib.contextmanager
def record_launches() -> Iterator[list[Launch]]:
    """Inside the block the Triton backend accepts CPU tensors and records launches instead of running them
    (outputs stay zero, which is enough to drive forward and backward through a model)."""
    if triton_backend._kernels() is None:
        raise RuntimeError(f"triton cannot be imported: {triton_backend._import_error}")
    launches: list[Launch] = []
    prev = triton_backend._recorder
    triton_backend._recorder = lambda name, grid, args: launches.append(Launch(name, tuple(grid), tuple(args)))
    try:
        yield launches
    finally:
        triton_backend._recorder = prev


def _backend(arch: int):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend

    return make_backend(GPUTarget("cuda", arch, 32))


def specialize(launch: Launch, arch: int = 90) -> Spec:
    """Triton's specialization key of ``launch`` for a CUDA target (tensors keep their dtype and alignment)."""
    from triton.runtime.jit import create_function_from_signature

    fn = _jit(launch.kernel)
    binders = _jit.__dict__.setdefault("binders", {})
    key = (launch.kernel, arch)
    if key not in binders:
        binders[key] = create_function_from_signature(fn.signature, fn.params, _backend(arch))
    _, spec, _ = binders[key](*launch.args)
    values = tuple(None if isinstance(a, torch.Tensor) else a for a in launch.args)
    return Spec(launch.kernel, tuple(tuple(s) for s in spec), values)


def unique_specs(launches: Iterable[Launch], arch: int = 90) -> list[Spec]:
    """Deduplicated specializations, in first-launch order."""
    seen: dict[Spec, None] = {}
    for la in launches:
        seen.setdefault(specialize(la, arch), None)
    return list(seen)


def representative(specs: Sequence[Spec], archs: Sequence[int]) -> list[tuple[Spec, int]]:
    """A small set of (spec, arch) compiles that still covers every kernel x dtype x arch, each kernel's
    regular and depthwise branch per dtype and per arch, strided and unit-stride, atomic and deterministic
    wgrad (greedy set cover; ties go to the larger channel blocks, the heavier code)."""
    cands = [(s, a) for s in specs for a in archs]
    feats = [s.features(a) for s, a in cands]
    todo = set().union(*feats) if feats else set()
    picks = []
    while todo:
        i = max(range(len(cands)), key=lambda j: (len(feats[j] & todo), math.prod(cands[j][0].blocks())))
        picks.append(cands[i])
        todo -= feats[i]
    return picks


@dataclass
class CompileResult:
    spec: str  # Spec.label()
    kernel: str
    dtype: str
    arch: int
    ok: bool
    error: str = ""
    seconds: float = 0.0
    n_regs: int = -1
    spill_bytes: int = -1
    shared_bytes: int = -1
    num_warps: int = 0
    mma: str = ""
    occupancy: float = 0.0  # estimated resident warps / max warps per SM
    ctas_per_sm: int = 0


def mma_kind(ptx: str) -> str:
    if "tcgen05.mma" in ptx:
        return "tcgen05"
    if "wgmma.mma_async" in ptx:
        return "wgmma"
    if re.search(r"\bmma\.sync\b", ptx):
        return "mma.sync"
    return "FMA"


def occupancy(arch: int, regs: int, shared: int, num_warps: int) -> tuple[int, float]:
    """(CTAs per SM, resident warps / max warps) from registers (allocated per warp in units of 256),
    shared memory (+1 KiB reserved per CTA) and the per-SM warp and CTA limits."""
    reg_file, max_warps, max_ctas, smem = SM_LIMITS.get(arch, SM_LIMITS[80])
    per_warp = math.ceil(max(regs, 1) * 32 / 256) * 256
    ctas = min(max_ctas, (reg_file // per_warp) // num_warps, max_warps // num_warps)
    ctas = min(ctas, smem // (shared + 1024))
    return ctas, ctas * num_warps / max_warps


def _compile_one(spec: Spec, arch: int) -> CompileResult:
    """Compile in this process (triton must have been imported without the interpreter)."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = getattr(triton_backend._kernels(), spec.kernel)
    res = CompileResult(spec.label(), spec.kernel, spec.dtype(), arch, False)
    backend = _backend(arch)
    bound = dict(zip(fn.arg_names, spec.values))
    opts, signature, constexprs, attrs = fn._pack_args(backend, {}, bound, list(spec.specialization),
                                                        backend.parse_options({}))
    t0 = time.perf_counter()
    logbuf = io.StringIO()
    try:
        knobs.nvidia.dump_ptxas_log = True
        with contextlib.redirect_stdout(logbuf):
            ck = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", arch, 32),
                                options=opts.__dict__)
    except Exception as e:  # noqa: BLE001 - every compile error is reported, never raised, so all are seen
        res.error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:500]
        res.seconds = time.perf_counter() - t0
        return res
    res.seconds = time.perf_counter() - t0
    ptxas_log = logbuf.getvalue()
    m = re.search(r"Used (\d+) registers", ptxas_log)
    res.n_regs = int(m.group(1)) if m else -1
    spills = re.findall(r"(\d+) bytes spill (?:stores|loads)", ptxas_log)
    res.spill_bytes = max((int(s) for s in spills), default=-1)
    res.shared_bytes = int(ck.metadata.shared)
    res.num_warps = int(ck.metadata.num_warps)
    res.mma = mma_kind(ck.asm["ptx"])
    res.ctas_per_sm, res.occupancy = occupancy(arch, res.n_regs, res.shared_bytes, res.num_warps)
    res.ok = True
    return res


def _spec_json(spec: Spec) -> dict:
    return {"kernel": spec.kernel, "specialization": [list(s) for s in spec.specialization],
            "values": list(spec.values)}


def _spec_from_json(d: dict) -> Spec:
    return Spec(d["kernel"], tuple(tuple(s) for s in d["specialization"]), tuple(d["values"]))


def compile_specs(work: Sequence[tuple[Spec, int]], jobs: int = 2,
                  cache_dir: str | None = None) -> list[CompileResult]:
    """Compile every (spec, arch) in ``jobs`` worker processes (triton imported there without the
    interpreter; ``cache_dir``: Triton's cache, a fresh temporary folder makes every compile real)."""
    work = [(_spec_json(s), a) for s, a in work]
    if not work:
        return []
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if cache_dir:
        env["TRITON_CACHE_DIR"] = cache_dir
    chunks = [work[i::jobs] for i in range(max(1, min(jobs, len(work))))]
    procs = [subprocess.Popen([sys.executable, "-m", __name__], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, env=env, text=True) for _ in chunks]
    for p, c in zip(procs, chunks):
        p.stdin.write(json.dumps(c))
        p.stdin.close()
    results = []
    for p in procs:
        out = p.stdout.read()
        err = p.stderr.read()
        if p.wait() != 0:
            raise RuntimeError(f"triton compile worker failed (exit {p.returncode}): {err.strip()[-2000:]}")
        results += [CompileResult(**r) for r in json.loads(out)]
    return results


def _worker() -> None:
    work = json.loads(sys.stdin.read())
    if triton_backend.interpreter_active():
        raise SystemExit("compile worker started with TRITON_INTERPRET=1")
    out = [asdict(_compile_one(_spec_from_json(s), a)) for s, a in work]
    sys.stdout.write(json.dumps(out))


if __name__ == "__main__":
    _worker()
