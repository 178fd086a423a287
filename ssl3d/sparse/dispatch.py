"""Verified choice of a custom sparse-conv kernel (Triton) per layer signature, cached per process and on disk.

``auto`` uses the cuDNN-backed paths ("gather" / "reference" / "dense") unless a custom kernel passed a
first-use check *on this device for this layer signature* (``ConvSignature``: device name, dtype, shapes,
kernel, stride, padding, groups, cell sizes, visible-fraction bucket, kernel-source hash):

1. correctness: on one sample of the batch (real shapes, random data, the layer's weight), output and the
   gradients of input, weight and bias must equal the fp64 reference within the dtype's tolerance
   (``TOLERANCE``, relative to the reference's largest magnitude);
2. speed: forward+backward timed on the full layer shape against every applicable cuDNN path (like
   ``cudnn.benchmark``); the fastest wins, a custom kernel only when faster than the best cuDNN path by
   ``MARGIN``.

Any exception of a candidate gives one warning line per process and the cuDNN path; so does a wrong result.
Decisions are kept per process and, when ``SSL3D_SPARSE_CACHE`` names a JSON file (or ``cache_path`` is
given), stored there (read-merge-write, temp file + rename), so reruns and DDP ranks that start later reuse
them (ranks that measure at the same moment each measure once).

Testing without a GPU: ``Dispatcher(candidates=..., timer=...)`` replaces the custom-kernel set and the
timing function, and ``set_dispatcher`` installs it; injected candidates are tried on any device.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from . import reference
from .amp import no_autocast
from .tensor import Layout

log = logging.getLogger(__name__)

CACHE_ENV = "SSL3D_SPARSE_CACHE"
CACHE_VERSION = 1
MARGIN = 0.95  # a custom kernel must take < 95 % of the best cuDNN time (timing noise must not pick it)
# max |candidate - fp64 reference| / max |reference|, forward and every gradient
TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4, torch.bfloat16: 4e-2, torch.float16: 8e-3}
TOLERANCE_TF32 = 2e-2  # fp32 with TF32 allowed (cuDNN's default): 10-bit mantissa products

# (x, weight, bias, stride, padding, groups, lay_in, lay_out) -> output; the sparse conv contract
ConvImpl = Callable[..., torch.Tensor]
Timer = Callable[[str, Callable[[], None]], float]


def _fmt(t: Sequence[int]) -> str:
    t = tuple(int(v) for v in t)
    return str(t[0]) if len(set(t)) == 1 else "x".join(map(str, t))


@dataclass(frozen=True)
class ConvSignature:
    """Everything a kernel's speed or correctness may depend on, except the mask's exact pattern."""

    device: str
    dtype: str
    x_shape: tuple[int, ...]
    w_shape: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    groups: int
    bias: bool
    cell_in: tuple[int, ...]
    cell_out: tuple[int, ...]
    visible: float  # visible fraction of the output layout, in 5 % buckets

    @classmethod
    def of(cls, x_shape: Sequence[int], weight: torch.Tensor, bias: bool, stride, padding, groups: int,
           lay_in: Layout, lay_out: Layout, dtype: torch.dtype, device: torch.device) -> "ConvSignature":
        return cls(device_name(device), str(dtype).replace("torch.", ""), tuple(int(s) for s in x_shape),
                   tuple(weight.shape), tuple(stride), tuple(padding), int(groups), bias, lay_in.cell_size,
                   lay_out.cell_size, round(lay_out.active_fraction * 20) / 20)

    def key(self) -> str:
        return "|".join(str(v) for v in (self.device, self.dtype, self.x_shape, self.w_shape, self.stride,
                                         self.padding, self.groups, self.bias, self.cell_in, self.cell_out,
                                         self.visible, _kernel_version()))

    def describe(self) -> str:
        co, _, *k = self.w_shape
        dw = " depthwise" if self.groups > 1 else ""
        cell = _fmt(self.cell_in) + ("" if self.cell_in == self.cell_out else f"->{_fmt(self.cell_out)}")
        return (f"sparse conv {self.x_shape[1]}->{co}{dw} k{_fmt(k)} s{_fmt(self.stride)} at "
                f"{'x'.join(map(str, self.x_shape[2:]))} cell {cell} ({self.visible:.0%} visible, {self.dtype}, "
                f"{self.device})")


_DEVICE_NAMES: dict[torch.device, str] = {}


def device_name(device: torch.device) -> str:
    """"cpu", or "cuda:<GPU model>" (cached: called on every conv)."""
    name = _DEVICE_NAMES.get(device)
    if name is None:
        name = f"cuda:{torch.cuda.get_device_name(device)}" if device.type == "cuda" else device.type
        _DEVICE_NAMES[device] = name
    return name


_KERNEL_VERSION: str | None = None


def _kernel_version() -> str:
    """Hash of the custom-kernel sources and the torch/triton versions: a change invalidates cached checks."""
    global _KERNEL_VERSION
    if _KERNEL_VERSION is None:
        h = hashlib.sha1(torch.__version__.encode())
        for name in ("triton_kernels.py", "triton_backend.py"):
            p = Path(__file__).with_name(name)
            h.update(p.read_bytes() if p.exists() else b"")
        try:
            from importlib.metadata import version
            h.update(version("triton").encode())
        except Exception:  # triton not installed: nothing to version
            pass
        _KERNEL_VERSION = h.hexdigest()[:12]
    return _KERNEL_VERSION


def default_timer(name: str, fn: Callable[[], None], repeats: int = 3) -> float:
    """Median seconds of ``fn`` after one warm-up call (which also compiles), device-synchronised."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    fn()
    sync()
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        sync()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def _tolerance(dtype: torch.dtype, device: torch.device) -> float:
    if dtype == torch.float32 and device.type == "cuda" and (torch.backends.cudnn.allow_tf32
                                                             or torch.backends.cuda.matmul.allow_tf32):
        return TOLERANCE_TF32
    return TOLERANCE.get(dtype, 1e-4)


def _reference_impl(x, w, b, stride, padding, groups, lay_in, lay_out):
    return reference.conv3d(x, w, b, stride, padding, 1, groups, lay_in, lay_out)


def _same(t: torch.Tensor) -> torch.Tensor:
    return t


def _slice_layout(lay: Layout, i: int) -> Layout:
    return Layout(lay.mask[i:i + 1], lay.cells[i:i + 1], lay.cell_size)


class Problem:
    """One conv call's geometry, from which check and timing inputs are made (random data, real shapes)."""

    def __init__(self, x_shape, weight, bias, stride, padding, groups, lay_in, lay_out, dtype, device):
        self.x_shape, self.weight, self.bias = tuple(x_shape), weight, bias
        self.stride, self.padding, self.groups = tuple(stride), tuple(padding), groups
        self.lay_in, self.lay_out, self.dtype, self.device = lay_in, lay_out, dtype, device

    def inputs(self, batch: int | None, dtype: torch.dtype, seed: int = 0):
        g = torch.Generator(device=self.device).manual_seed(seed)  # on the device: full-size inputs are big
        shape = (batch or self.x_shape[0], *self.x_shape[1:])
        x = torch.randn(shape, generator=g, device=self.device).to(dtype).requires_grad_()
        w = self.weight.detach().to(dtype).clone().requires_grad_()
        b = None if self.bias is None else self.bias.detach().to(dtype).clone().requires_grad_()
        return x, w, b

    def run(self, impl: ConvImpl, x, w, b, lay_in, lay_out, seed: int = 1):
        """Output and gradients (x, w, b) for a fixed random output gradient."""
        with torch.enable_grad():
            y = impl(x, w, b, self.stride, self.padding, self.groups, lay_in, lay_out)
            gen = torch.Generator(device=y.device).manual_seed(seed)
            g = torch.randn(y.shape, generator=gen, device=y.device).to(self.dtype).to(y.dtype)
            leaves = [t for t in (x, w, b) if t is not None]
            return [y.detach(), *torch.autograd.grad(y, leaves, g)]


class Dispatcher:
    """Chooses, per layer signature, between the cuDNN-backed paths and verified custom kernels."""

    def __init__(self, cache_path: str | os.PathLike | None = None, timer: Timer | None = None,
                 candidates: dict[str, ConvImpl] | None = None):
        self.cache_path = Path(cache_path) if cache_path else None
        self.timer = timer or default_timer
        self.injected = candidates
        self.choices: dict[str, str] = {}
        self.records: dict[str, dict] = {}
        self._warned: set[str] = set()
        self._logged: set[tuple[ConvSignature, str]] = set()
        if self.cache_path is not None:
            self.records.update(self._read_file())
            self.choices.update({k: v["backend"] for k, v in self.records.items()})

    # ------------------------------------------------------------------------------------------ candidates
    def custom_candidates(self, device: torch.device, weight, stride, padding, dilation, groups: int,
                          lay_in: Layout, lay_out: Layout) -> dict[str, ConvImpl]:
        """Custom kernels that may run this conv (Triton on CUDA when it imports and supports the case)."""
        if self.injected is not None:
            return dict(self.injected)
        if device.type != "cuda":
            return {}  # Triton on CPU only through the interpreter, and only when asked for explicitly
        from . import triton_backend as tb
        if tb.available(device) and tb.supports(weight, stride, padding, dilation, groups, lay_in, lay_out):
            return {"triton": lambda *a: tb.conv3d(*a)}  # looked up at call time (tests may patch it)
        return {}

    def impl(self, name: str) -> ConvImpl:
        if self.injected is not None and name in self.injected:
            return self.injected[name]
        from . import triton_backend as tb
        return tb.conv3d

    # -------------------------------------------------------------------------------------------- choice
    def choose(self, sig: ConvSignature, problem: Problem, base: str, cudnn: dict[str, ConvImpl],
               custom: dict[str, ConvImpl]) -> str:
        """``base`` (the cost model's cuDNN path) unless a measurement for ``sig`` says otherwise."""
        key = sig.key()
        hit = self.choices.get(key)
        if hit is not None and (hit in cudnn or hit in custom):
            return hit
        if torch.is_inference_mode_enabled() or torch.compiler.is_compiling():
            return base  # no autograd (inference mode) / no syncs (tracing): decide later, do not cache
        try:
            # identity hooks shadow those of an enclosing non-reentrant activation checkpoint, which would
            # otherwise capture the check's own autograd graph; inputs arrive cast already, so no autocast
            hooks = torch.autograd.graph.saved_tensors_hooks(_same, _same)
            hooks.__enter__()
        except RuntimeError:  # saved-tensor hooks disabled here: decide later
            return base
        try:
            with no_autocast(problem.device):
                choice, record = self._measure(sig, problem, base, cudnn, custom)
        finally:
            hooks.__exit__(None, None, None)
        self.choices[key] = choice
        self.records[key] = record
        if self.cache_path is not None:
            self._write_file(key, record)
        return choice

    def fail(self, sig: ConvSignature, name: str, err: BaseException, fallback: str) -> None:
        """A verified custom kernel raised at run time: warn once, never use it for ``sig`` again."""
        self._warn("raise", f"sparse conv: {name} raised {type(err).__name__}: {err} ({sig.describe()}); "
                            f"using {fallback} (cuDNN) instead; later failures are logged at DEBUG")
        self.choices[sig.key()] = fallback

    def announce(self, sig: ConvSignature, backend: str) -> None:
        """Log once per (signature, backend) which backend runs."""
        k = (sig, backend)
        if k not in self._logged:
            self._logged.add(k)
            log.info("%s: %s", sig.describe(), backend)

    def _warn(self, kind: str, msg: str) -> None:
        if kind in self._warned:
            log.debug(msg)
        else:
            self._warned.add(kind)
            log.warning(msg)

    def _measure(self, sig, problem: Problem, base, cudnn, custom) -> tuple[str, dict]:
        record: dict = {"backend": base, "signature": sig.describe()}
        passed = {}
        for name, fn in custom.items():
            try:
                err = self._check(problem, fn)
            except Exception as e:  # any failure of a custom kernel: fall back, never end the run
                self._warn("raise", f"sparse conv: {name} raised {type(e).__name__}: {e} ({sig.describe()}); "
                                    f"using the cuDNN path; later failures are logged at DEBUG")
                record[f"{name}_error"] = f"{type(e).__name__}: {e}"[:300]
                continue
            tol = _tolerance(problem.dtype, problem.device)
            record[f"{name}_max_rel_err"] = err
            if err <= tol:
                passed[name] = fn
            else:
                self._warn("wrong", f"sparse conv: {name} differs from the reference by {err:.2e} (tolerance "
                                    f"{tol:.0e}) for {sig.describe()}; not used")
        if not passed:
            return base, record
        times: dict[str, float] = {}
        x, w, b = problem.inputs(None, problem.dtype)
        for name, fn in {**cudnn, **passed}.items():
            def step(fn=fn):
                problem.run(fn, x, w, b, problem.lay_in, problem.lay_out)
            try:
                times[name] = float(self.timer(name, step))
            except Exception as e:  # e.g. out of memory for the extra full-size inputs: keep the cost model
                self._warn("raise", f"sparse conv: {name} raised {type(e).__name__}: {e} while timed "
                                    f"({sig.describe()}); using the cuDNN path")
                record[f"{name}_error"] = f"{type(e).__name__}: {e}"[:300]
                if name in cudnn:
                    return base, record
        del x, w, b
        record["ms"] = {k: round(v * 1e3, 4) for k, v in times.items()}
        t_cudnn = {k: v for k, v in times.items() if k in cudnn}
        t_custom = {k: v for k, v in times.items() if k not in cudnn}
        best = min(t_cudnn, key=t_cudnn.get) if t_cudnn else base
        fast = min(t_custom, key=t_custom.get) if t_custom else None
        record["backend"] = fast if fast is not None and t_custom[fast] < MARGIN * t_cudnn.get(best, math.inf) \
            else best
        log.info("%s: measured %s -> %s", sig.describe(),
                 ", ".join(f"{k} {v:.2f} ms" for k, v in record["ms"].items()), record["backend"])
        return record["backend"], record

    def _check(self, problem: Problem, fn: ConvImpl) -> float:
        """Max relative error (output, grads) of ``fn`` vs the fp64 reference on one sample with visible cells."""
        vis = problem.lay_out.cells.flatten(1).any(1)
        i = int(vis.to(torch.int8).argmax())  # one sync, at first use only
        lin, lout = _slice_layout(problem.lay_in, i), _slice_layout(problem.lay_out, i)
        x, w, b = problem.inputs(1, problem.dtype)
        got = problem.run(fn, x, w, b, lin, lout)
        xd, wd, bd = [None if t is None else t.detach().double().requires_grad_() for t in (x, w, b)]
        want = problem.run(_reference_impl, xd, wd, bd, lin, lout)
        err = 0.0
        for a, r in zip(got, want):
            if a.shape != r.shape:
                return math.inf
            scale = float(r.abs().max()) or 1.0
            err = max(err, float((a.double() - r).abs().max()) / scale)
        return err if math.isfinite(err) else math.inf

    # ---------------------------------------------------------------------------------------------- file
    def _read_file(self) -> dict[str, dict]:
        p = self.cache_path
        if p is None or not p.exists():
            return {}
        try:
            data = json.loads(p.read_text())
        except (OSError, ValueError) as e:
            log.warning("sparse dispatch cache %s unreadable (%s); measuring again", p, e)
            return {}
        if not isinstance(data, dict) or data.get("version") != CACHE_VERSION:
            return {}
        entries = data.get("entries", {})
        return {k: v for k, v in entries.items() if isinstance(v, dict) and isinstance(v.get("backend"), str)}

    def _write_file(self, key: str, record: dict) -> None:
        p = self.cache_path
        try:
            p.parent.mkdir(parents=True, exist_ok=True)
            entries = self._read_file()  # merge: another rank may have written meanwhile
            entries[key] = record
            fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
            try:
                with os.fdopen(fd, "w") as f:
                    json.dump({"version": CACHE_VERSION, "entries": entries}, f, indent=1, sort_keys=True)
                os.replace(tmp, p)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        except OSError as e:
            log.warning("sparse dispatch cache %s not written (%s)", p, e)


_DISPATCHER: Dispatcher | None = None


def get_dispatcher() -> Dispatcher:
    """The process-wide dispatcher (cache file from ``SSL3D_SPARSE_CACHE`` when set)."""
    global _DISPATCHER
    if _DISPATCHER is None:
        _DISPATCHER = Dispatcher(os.environ.get(CACHE_ENV) or None)
    return _DISPATCHER


def set_dispatcher(d: Dispatcher | None) -> Dispatcher | None:
    """Install ``d`` (None: a fresh default on next use); returns the previous one."""
    global _DISPATCHER
    prev, _DISPATCHER = _DISPATCHER, d
    return prev


__all__ = ["Dispatcher", "ConvSignature", "Problem", "get_dispatcher", "set_dispatcher", "default_timer",
           "CACHE_ENV", "TOLERANCE", "TOLERANCE_TF32", "MARGIN"]
