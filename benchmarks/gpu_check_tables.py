"""Shared pieces of ``gpu_check``: tables written as JSON + markdown after every row, GPU-aware timing, the
environment snapshot (GPU model, driver, CUDA, cuDNN, torch, Triton, ...)."""
from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any, Callable

import torch


def atomic_write(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary name, so a killed section never leaves half a file."""
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(text)
    os.replace(tmp, path)


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1e4 else f"{v:.0f}"
    return str(v).replace("|", "/").replace("\n", " ")


class Table:
    """One result table: ``OUT/<name>.json`` (title, columns, rows, meta) and ``OUT/<name>.md``, rewritten after
    every ``add`` so a section stopped at its time limit keeps the rows it finished."""

    def __init__(self, out: Path, name: str, title: str, columns: list[str], meta: dict | None = None,
                 note: str = ""):
        self.path, self.name, self.title, self.columns = Path(out), name, title, list(columns)
        self.meta, self.note, self.rows = dict(meta or {}), note, []
        self.save()

    def add(self, **row: Any) -> dict:
        unknown = set(row) - set(self.columns)
        if unknown:
            raise KeyError(f"table {self.name}: unknown columns {sorted(unknown)}")
        row = {c: row.get(c) for c in self.columns}
        self.rows.append(row)
        self.save()
        return row

    def markdown(self) -> str:
        lines = [f"## {self.title}", ""]
        if self.note:
            lines += [self.note, ""]
        lines += ["| " + " | ".join(self.columns) + " |", "|" + "---|" * len(self.columns)]
        lines += ["| " + " | ".join(_cell(r[c]) for c in self.columns) + " |" for r in self.rows]
        return "\n".join(lines) + "\n"

    def save(self) -> None:
        data = dict(name=self.name, title=self.title, note=self.note, columns=self.columns, rows=self.rows,
                    meta=self.meta)
        atomic_write(self.path / f"{self.name}.json", json.dumps(data, indent=1, default=str))
        atomic_write(self.path / f"{self.name}.md", self.markdown())


def measure(fn: Callable[[], Any], warmup: int, repeats: int, device: torch.device) -> tuple[float, float | None]:
    """Median milliseconds of ``fn`` over ``repeats`` runs after ``warmup`` runs (CUDA events on a GPU), and the
    peak GiB allocated during the timed runs (CUDA only, None on CPU)."""
    cuda = device.type == "cuda"
    for _ in range(warmup):
        fn()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    peak = torch.cuda.max_memory_allocated() / 2 ** 30 if cuda else None
    return statistics.median(times), peak


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _run(cmd: list[str]) -> str | None:
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return r.stdout.strip() if r.returncode == 0 else None


def environment(repo: Path, dry_run: bool) -> dict[str, Any]:
    """What the numbers were measured on."""
    env: dict[str, Any] = {"dry_run": dry_run, "python": platform.python_version(),
                           "platform": platform.platform(), "cpu_count": os.cpu_count(),
                           "torch": torch.__version__, "triton": _version("triton"),
                           "cuda_runtime": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
                           "cuda_available": torch.cuda.is_available(), "nnunetv2": _version("nnunetv2"),
                           "dynamic_network_architectures": _version("dynamic_network_architectures"),
                           "ssl3d_commit": _run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"]),
                           "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
                           "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
                           "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET")}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        env.update(gpu=p.name, gpu_capability=f"{p.major}.{p.minor}", gpu_memory_gib=round(p.total_memory / 2 ** 30, 1),
                   gpu_sms=p.multi_processor_count, gpu_count=torch.cuda.device_count(),
                   bf16_supported=torch.cuda.is_bf16_supported())
        smi = _run(["nvidia-smi", "--query-gpu=driver_version,name,clocks.max.sm", "--format=csv,noheader"])
        env["driver"] = smi.split(",")[0].strip() if smi else None
        env["nvidia_smi"] = smi
    else:
        env.update(gpu=None, driver=None)
    try:
        from ssl3d.sparse import ops, triton_backend

        env["sparse_backends"] = list(ops.BACKENDS)
        env["triton_available"] = triton_backend.available()
        env["triton_interpreter"] = triton_backend.interpreter_active()
    except Exception as e:  # the check still reports the rest
        env["sparse_backends"] = f"import failed: {type(e).__name__}: {e}"
    return env


def env_meta(out: Path) -> dict[str, Any]:
    """The few environment facts every table carries (read from the environment section's file)."""
    try:
        rows = json.loads((Path(out) / "environment.json").read_text())["rows"]
    except (OSError, ValueError, KeyError):
        return {}
    env = {r["key"]: r["value"] for r in rows}
    return {k: env.get(k) for k in ("gpu", "driver", "cuda_runtime", "torch", "triton", "dry_run")}
