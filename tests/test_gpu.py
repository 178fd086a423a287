"""GPU checks (``pytest -m gpu``; skipped without CUDA): every sparse conv backend against an fp64 reference at the
planned encoders' real shapes, forward and every gradient, in fp32 (TF32 on), bf16, fp16 and under bf16 autocast;
``auto``'s fallback when the Triton kernel raises; 3-step SparK and HySparK pretrainings on CUDA in bf16 through
``ssl_pretrain``; a 2-epoch stock nnU-Net fine-tune from the export on CUDA.

``SSL3D_GPU_TEST_DEVICE=cpu`` runs the same tests on CPU with tiny shapes (the dry run of
``benchmarks/gpu_check.sh``; Triton only when its interpreter is active).
"""
import functools
import json
import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from conftest import subprocess_env

DEVICE = os.environ.get("SSL3D_GPU_TEST_DEVICE", "cuda")
if DEVICE == "cuda" and not torch.cuda.is_available():
    pytest.skip("no CUDA GPU (SSL3D_GPU_TEST_DEVICE=cpu runs these tests on CPU with tiny shapes)",
                allow_module_level=True)
pytestmark = pytest.mark.gpu
DRY = DEVICE != "cuda"
BIN = Path(sys.executable).parent

from ssl3d.sparse import ops  # noqa: E402
from ssl3d.sparse import reference as R  # noqa: E402
from ssl3d.sparse.masks import random_cell_mask  # noqa: E402
from ssl3d.sparse.tensor import MaskCache  # noqa: E402

GATHER = "gather" if "gather" in ops.BACKENDS else "cpu"  # the blocked gather path (named "cpu" before CUDA)
BACKENDS = ["reference", GATHER, "triton", "auto"]


@functools.cache
def _triton_runs() -> bool:
    try:
        from ssl3d.sparse import triton_backend as tb
    except Exception:
        return False
    return tb.available(torch.device(DEVICE)) and (DEVICE == "cuda" or tb.interpreter_active())


# name: batch, in channels, out channels, input shape, input cell, kernel, stride, groups. Real: what the planner
# gives a 128^3 CT patch at 1.5 mm (ResEnc 32..320, cell 32) and a 0.8x0.8x5 mm plan (patch 32x256x256, cell
# 8x64x64), HySparK's MedNeXt stages (cell 16) with depthwise 7; batch 2, 75 % masked.
REAL = {
    "stem 1-32 k3 128^3": (2, 1, 32, (128,) * 3, (32,) * 3, (3,) * 3, (1,) * 3, 1),
    "s0 32-32 k3 128^3": (2, 32, 32, (128,) * 3, (32,) * 3, (3,) * 3, (1,) * 3, 1),
    "s1 down 32-64 k3 s2 128^3": (2, 32, 64, (128,) * 3, (32,) * 3, (3,) * 3, (2,) * 3, 1),
    "s2 128 k3 32^3": (2, 128, 128, (32,) * 3, (8,) * 3, (3,) * 3, (1,) * 3, 1),
    "s3 256 k3 16^3": (2, 256, 256, (16,) * 3, (4,) * 3, (3,) * 3, (1,) * 3, 1),
    "s4 320 k3 8^3": (2, 320, 320, (8,) * 3, (2,) * 3, (3,) * 3, (1,) * 3, 1),
    "s5 down 320 s2 8^3": (2, 320, 320, (8,) * 3, (2,) * 3, (3,) * 3, (2,) * 3, 1),
    "aniso s0 32 k133 32x256x256": (2, 32, 32, (32, 256, 256), (8, 64, 64), (1, 3, 3), (1, 1, 1), 1),
    "aniso s1 down 32-64 s122": (2, 32, 64, (32, 256, 256), (8, 64, 64), (1, 3, 3), (1, 2, 2), 1),
    "mednext dw7 32 128^3": (2, 32, 32, (128,) * 3, (16,) * 3, (7,) * 3, (1,) * 3, 32),
    "mednext expand 1x1 64-256 64^3": (2, 64, 256, (64,) * 3, (8,) * 3, (1,) * 3, (1,) * 3, 1),
}
TINY = {
    "stem 1-4 k3 8^3": (2, 1, 4, (8,) * 3, (4,) * 3, (3,) * 3, (1,) * 3, 1),
    "4-4 k3 8^3": (2, 4, 4, (8,) * 3, (4,) * 3, (3,) * 3, (1,) * 3, 1),
    "down 4-8 s2 8^3": (2, 4, 8, (8,) * 3, (4,) * 3, (3,) * 3, (2,) * 3, 1),
    "aniso 4 k133 4x8x8": (2, 4, 4, (4, 8, 8), (2, 4, 4), (1, 3, 3), (1, 1, 1), 1),
    "dw7 4 8^3": (2, 4, 4, (8,) * 3, (4,) * 3, (7,) * 3, (1,) * 3, 4),
}
SHAPES = TINY if DRY else REAL
# precision: (input dtype, autocast dtype or None); the reference is fp64 on the same (bf16-exact) values
PRECISIONS = {"fp32": (torch.float32, None), "bf16": (torch.bfloat16, None), "fp16": (torch.float16, None),
              "autocast-bf16": (torch.float32, torch.bfloat16)}
# relative L2 error, max error / RMS of the reference (TF32 truncates fp32 operands to 10 mantissa bits)
# (a wrong tap, index or halo gives errors of order 0.1-1; bf16/fp16 accumulation over 343 depthwise taps on CPU ~1e-2)
TOL = {"fp32": (5e-3, 5e-2), "bf16": (3e-2, 2e-1), "fp16": (1e-2, 5e-2), "autocast-bf16": (3e-2, 2e-1)}


def _exact(t: torch.Tensor) -> torch.Tensor:
    """Values exactly representable in bf16 and fp16 (and so in fp32/fp64): one reference serves every dtype."""
    t = t.to(torch.bfloat16).double()
    return torch.where(t.abs() < 2.0 ** -12, torch.zeros_like(t), t)


def _geometry(name):
    b, ci, co, shape, cell, k, s, groups = SHAPES[name]
    grid = [n // c for n, c in zip(shape, cell)]
    cells = random_cell_mask(b, grid, 0.75, generator=torch.Generator().manual_seed(len(name))).to(DEVICE)
    pad = tuple(kk // 2 for kk in k)
    out = tuple((n + 2 * p - kk) // ss + 1 for n, p, kk, ss in zip(shape, pad, k, s))
    mc = MaskCache(cells)
    return mc.layout(shape), mc.layout(out), pad


@functools.lru_cache(maxsize=1)  # tests run shape-major: one fp64 reference alive at a time
def _reference(name):
    b, ci, co, shape, cell, k, s, groups = SHAPES[name]
    lin, lout, pad = _geometry(name)
    g = torch.Generator(device=DEVICE).manual_seed(0)  # drawn on the device: 2x32x128^3 is slow on the host

    def randn(*size):
        return torch.randn(size, generator=g, device=DEVICE)

    x = _exact(randn(b, ci, *shape))
    fan_in = ci // groups * k[0] * k[1] * k[2]
    w = _exact(randn(co, ci // groups, *k) / fan_in ** 0.5)
    bias = _exact(randn(co))
    xd, wd, bd = (t.clone().requires_grad_() for t in (x, w, bias))
    y = R.conv3d(xd, wd, bd, s, pad, 1, groups, lin, lout)
    dy = _exact(randn(*y.shape))
    grads = torch.autograd.grad(y, (xd, wd, bd), dy)
    return (x, w, bias, dy), (y.detach(), *grads)


def _errors(a: torch.Tensor, r: torch.Tensor) -> tuple[float, float]:
    a = a.detach()
    d = a.double() - r
    rms = r.square().mean().sqrt().clamp_min(1e-30)
    return float(d.norm() / r.norm().clamp_min(1e-30)), float(d.abs().max() / rms)


# the Triton interpreter takes seconds per launch: the CPU dry run checks Triton on one shape in fp32 only
CONV_CASES = [(name, be) for name in SHAPES for be in BACKENDS
              if not (DRY and be == "triton" and name != "4-4 k3 8^3")]


@pytest.mark.parametrize("name,backend", CONV_CASES, ids=[f"{n}-{b}" for n, b in CONV_CASES])
def test_sparse_conv_matches_fp64_reference(name, backend):
    if backend == "triton" and not _triton_runs():
        pytest.skip("triton cannot run here (no GPU and no interpreter)")
    b, ci, co, shape, cell, k, s, groups = SHAPES[name]
    lin, lout, pad = _geometry(name)
    (x64, w64, b64, dy64), refs = _reference(name)
    failures = []
    for prec, (dtype, amp) in PRECISIONS.items():
        if DRY and backend == "triton" and prec != "fp32":
            continue
        x, w, bias = (t.to(dtype).requires_grad_() for t in (x64, w64, b64))
        ctx = torch.autocast(x.device.type, dtype=amp) if amp else torch.autocast(x.device.type, enabled=False)
        with ctx:
            y = ops.sparse_conv3d(x, w, bias, s, pad, 1, groups, lin, lout, backend=backend)
        grads = torch.autograd.grad(y, (x, w, bias), dy64.to(y.dtype))
        # autocast reaches the conv: the custom autograd Functions compute in the autocast dtype (reference is
        # F.conv3d, on autocast's list by construction; its exact re-masking may promote the result to fp32)
        if y.dtype != (amp or dtype) and not (amp and backend == "reference"):
            failures.append(f"{prec}: output dtype {y.dtype}, expected {amp or dtype}")
        rel_tol, max_tol = TOL[prec]
        for what, a, r in zip(("out", "grad input", "grad weight", "grad bias"), (y, *grads), refs):
            if not torch.isfinite(a).all():
                failures.append(f"{prec} {what}: non-finite values")
                continue
            rel, mx = _errors(a, r)
            if rel > rel_tol or mx > max_tol:
                failures.append(f"{prec} {what}: rel L2 {rel:.2e} (tol {rel_tol:.0e}), max/rms {mx:.2e} "
                                f"(tol {max_tol:.0e})")
        if (y * ~lout.mask[:, None]).abs().max() != 0 or (grads[0] * ~lin.mask[:, None]).abs().max() != 0:
            failures.append(f"{prec}: nonzero output or input gradient at masked voxels")
    assert not failures, f"{name} backend {backend}:\n" + "\n".join(failures)


def _fallback_case():
    name = "4-4 k3 8^3" if DRY else "s0 32-32 k3 128^3"
    b, ci, co, shape, cell, k, s, groups = SHAPES[name]
    lin, lout, pad = _geometry(name)
    (x, w, bias, dy), refs = _reference(name)
    return (x.float(), w.float(), bias.float()), refs, dict(stride=s, padding=pad, groups=groups, mask_in=lin,
                                                            mask_out=lout)


def _triton_entry(*args):
    from ssl3d.sparse import triton_backend

    return triton_backend.conv3d(*args)  # looked up at call time: the test patches it


@pytest.fixture
def fresh_dispatcher(monkeypatch):
    """A new process-wide dispatcher without a cache file (no earlier first-use decision or warning)."""
    from ssl3d.sparse import dispatch

    monkeypatch.delenv(dispatch.CACHE_ENV, raising=False)
    # on CPU Triton is never a candidate of auto: inject it (through the patched entry point) to test the logic
    d = dispatch.Dispatcher(candidates={"triton": _triton_entry} if DRY else None)
    prev = dispatch.set_dispatcher(d)
    yield d
    dispatch.set_dispatcher(prev)


def test_auto_falls_back_with_one_warning_when_triton_raises(monkeypatch, caplog, fresh_dispatcher):
    from ssl3d.sparse import triton_backend as tb

    calls = []

    def broken(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("injected triton failure")

    monkeypatch.setattr(tb, "conv3d", broken)
    (x, w, bias), refs, kw = _fallback_case()
    with caplog.at_level(logging.WARNING), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outs = [ops.sparse_conv3d(x, w, bias, backend="auto", **kw) for _ in range(3)]
    for y in outs:
        rel, mx = _errors(y, refs[0])
        assert rel < TOL["fp32"][0] and mx < TOL["fp32"][1], (rel, mx)
    assert calls, "auto never tried the Triton kernel for a large-cell layer"
    msgs = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] + [str(c.message) for c in caught]
    assert len(msgs) == 1 and "injected triton failure" in msgs[0], msgs
    if _triton_runs():  # explicit triton: the error propagates
        with pytest.raises(RuntimeError, match="injected triton failure"):
            ops.sparse_conv3d(x, w, bias, backend="triton", **kw)


# --- end to end through the command-line tools -------------------------------------------------------------

def _sh(args, env, timeout=600):
    r = subprocess.run([str(BIN / args[0]), *args[1:]], env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, (args, r.stdout[-2000:], r.stderr[-3000:])
    return r


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """Tiny demo data (pool 801, labeled 802) planned at 16x32x32, and 3-step SparK / HySparK pretrainings."""
    root = tmp_path_factory.mktemp("gpu")
    env = subprocess_env(root / "raw", root / "pre", root / "res")
    for k in ("pre", "res"):
        (root / k).mkdir()
    _sh(["ssl_make_demo_data", "-o", str(root / "raw"), "--size", "tiny", "-nu", "4", "-nl", "5", "--no-progress"],
        env)
    _sh(["ssl_plan_and_preprocess", "-d", "801", "-np", "1", "--no-progress", "--patch-size", "16", "32", "32"],
        env)
    runs = {}
    for method in ("spark", "hyspark"):
        size = ["--size", "tiny"] if DRY else []  # on a GPU the planned networks
        runs[method] = subprocess.run(
            [str(BIN / "ssl_pretrain"), "-d", "801", "-m", method, "-device", DEVICE, *size, "--epochs", "1",
             "--iters", "3", "--val-iters", "1", "--batch-size", "2", "--backend", "auto", "--no-progress",
             "--amp", "bf16"], env=env, capture_output=True, text=True, timeout=600)
    return {"root": root, "env": env, "runs": runs}


def _results(root: Path, method: str) -> Path:
    for info in (root / "res").glob("Dataset801_*/*/ssl_method.json"):
        if json.loads(info.read_text())["name"] == method:
            return info.parent
    raise AssertionError(f"no {method} results under {root / 'res'}")


@pytest.mark.parametrize("method", ["spark", "hyspark"])
def test_pretraining_three_steps_bf16(demo, method):
    r = demo["runs"][method]
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-3000:])
    ckpt = torch.load(_results(demo["root"], method) / "fold_0" / "checkpoint_final.pth", map_location="cpu",
                      weights_only=False)
    losses = ckpt["logging"]["train_losses"]
    assert ckpt["current_epoch"] == 1 and len(losses) == 1 and all(map(lambda v: v == v and abs(v) < 1e6, losses))
    assert all(torch.isfinite(v).all() for v in ckpt["network_weights"].values() if v.is_floating_point())


def test_stock_finetune_two_epochs_from_export(demo):
    assert demo["runs"]["spark"].returncode == 0, demo["runs"]["spark"].stderr[-3000:]
    r = _sh(["ssl_finetune", "-d", "802", "-p", str(_results(demo["root"], "spark")), "-device", DEVICE,
             "--epochs", "2", "--iters", "2", "--val-iters", "1", "--no-final-val", "-np", "1"], demo["env"])
    assert "Loading pretrained weights" in r.stdout + r.stderr
    out = next((demo["root"] / "res").glob("Dataset802_*/SSLFinetuneTrainer__*/fold_0"))
    ckpt = torch.load(out / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert ckpt["current_epoch"] == 2 and len(ckpt["logging"]["train_losses"]) == 2
    assert all(v == v for v in ckpt["logging"]["train_losses"]), "NaN training loss"
