"""Triton kernels (fwd, dgrad, wgrad; regular and depthwise; fp32/tf32, bf16, fp16) vs the reference.

With a GPU the compiled kernels run on CUDA tensors. Without one they run in the Triton interpreter on CPU
tensors: tests/conftest.py sets TRITON_INTERPRET=1 before anything imports triton when no /dev/nvidia*
device exists (the interpreter is very slow, so shapes are tiny and parametrizations few). fp32 is checked
in IEEE precision (``cudnn.allow_tf32 = False``) at 1e-4 and, on a GPU, also in TF32 at TF32 tolerances.
"""
import pytest
import torch

from ssl3d.sparse import reference as R
from ssl3d.sparse.masks import random_cell_mask
from ssl3d.sparse.tensor import MaskCache

triton = pytest.importorskip("triton", reason="triton cannot be imported")
import triton.language as tl  # noqa: E402

from ssl3d.sparse import triton_backend as T  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and not T.interpreter_active():
    pytest.skip("no GPU, and triton was imported without TRITON_INTERPRET=1 (tests/conftest.py sets it before "
                "any import when no /dev/nvidia* exists; run with TRITON_INTERPRET=1)", allow_module_level=True)
if DEVICE == "cuda" and T.interpreter_active():
    pytest.skip("TRITON_INTERPRET=1 on a GPU machine: unset it to test the compiled kernels",
                allow_module_level=True)
from ssl3d.sparse.triton_kernels import _offset  # noqa: E402

torch.set_num_threads(2)
TOL = {"ieee": dict(rtol=1e-4, atol=1e-4), "tf32": dict(rtol=1e-2, atol=1e-1),  # 10-bit mantissa operands
       torch.bfloat16: dict(rtol=2e-2, atol=0.3), torch.float16: dict(rtol=2e-2, atol=0.3)}

CASES = [  # batch, cin, cout, shape, cell, kernel, stride, depthwise, dtype
    (3, 3, 5, (6, 8, 5), (2, 4, 1), 3, 1, False, torch.float32),   # odd sizes, anisotropic cells, k3
    (2, 4, 4, (6, 8, 5), (2, 4, 1), 3, 1, True, torch.float32),    # depthwise
    (1, 3, 4, (8, 8, 8), (4, 4, 2), 3, 2, False, torch.float32),   # stride 2
    (2, 3, 6, (4, 8, 4), (2, 2, 2), 1, 1, False, torch.bfloat16),  # k1, bf16
    (1, 2, 2, (4, 4, 6), (2, 2, 2), 7, 1, True, torch.float16),    # depthwise k7, fp16
]


@pytest.fixture
def allow_tf32():
    prev = torch.backends.cudnn.allow_tf32
    yield lambda on: setattr(torch.backends.cudnn, "allow_tf32", on)
    torch.backends.cudnn.allow_tf32 = prev


def _layouts(b, shape, cell, k, s, seed, ratio=0.5):
    grid = [n // c for n, c in zip(shape, cell)]
    cells = random_cell_mask(b, grid, ratio, generator=torch.Generator().manual_seed(seed))
    if b >= 3:
        cells[1], cells[2] = False, True
    mc = MaskCache(cells.to(DEVICE))
    out = tuple((n + 2 * (k // 2) - k) // s + 1 for n in shape)
    return mc.layout(shape), mc.layout(out)


def _inputs(b, ci, co, shape, k, dw, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, ci, *shape, generator=g).to(DEVICE, dtype).requires_grad_()
    w = torch.randn(co, 1 if dw else ci, k, k, k, generator=g).to(DEVICE, dtype).requires_grad_()
    bias = torch.randn(co, generator=g).to(DEVICE, dtype).requires_grad_()
    return x, w, bias


def _reference(x, w, bias, s, p, g, lin, lout, go):
    xd, wd, bd = [t.detach().double().requires_grad_() for t in (x, w, bias)]
    ref = R.conv3d(xd, wd, bd, s, p, 1, g, lin, lout)
    return ref, torch.autograd.grad(ref, (xd, wd, bd), go.double())


PRECISIONS = ("ieee", "tf32") if DEVICE == "cuda" else ("ieee",)  # the interpreter has no TF32


@pytest.mark.parametrize("case", CASES)
def test_triton_conv_matches_reference(case, allow_tf32):
    b, ci, co, shape, cell, k, s, dw, dtype = case
    lin, lout = _layouts(b, shape, cell, k, s, seed=k + s)
    g = ci if dw else 1
    x, w, bias = _inputs(b, ci, co, shape, k, dw, dtype)
    for prec in PRECISIONS if dtype == torch.float32 else (None,):
        allow_tf32(prec == "tf32")
        y = T.conv3d(x, w, bias, (s,) * 3, (k // 2,) * 3, g, lin, lout)
        go = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE, dtype)
        grads = torch.autograd.grad(y, (x, w, bias), go)
        ref, ref_grads = _reference(x, w, bias, s, k // 2, g, lin, lout, go)
        tol = TOL[prec or dtype]
        torch.testing.assert_close(y.double(), ref, **tol)
        for a, r in zip(grads, ref_grads):
            torch.testing.assert_close(a.double(), r, **tol)
        if b >= 3:
            assert y[1].abs().max() == 0 and grads[0][1].abs().max() == 0


def test_deterministic_wgrad_partial_sums(monkeypatch, allow_tf32):
    """Under torch.use_deterministic_algorithms the wgrad kernel stores per-split partial sums (no atomics);
    the weight gradient equals the reference and is bit-identical across runs (in the interpreter programs
    run one after another, so bit-identity is only a strong check on a GPU)."""
    allow_tf32(False)
    b, ci, co, shape, cell, k = 2, 4, 4, (4, 8, 16), (4, 4, 4), (1, 1, 3)  # 3 taps: cheap in the interpreter
    lin, lout = _layouts(b, shape, cell, 1, 1, seed=3, ratio=0.0)
    n_tiles = T.active_tiles(lout).shape[0]
    assert T.wgrad_split(n_tiles, 3, ci, co, True) >= 2, "the case must split the tiles"
    g = torch.Generator().manual_seed(0)
    x = torch.randn(b, ci, *shape, generator=g).to(DEVICE)
    w = torch.randn(co, ci, *k, generator=g).to(DEVICE).requires_grad_()
    bias = torch.randn(co, generator=g).to(DEVICE)
    flags = []
    launch = T._launch

    def spy(name, grid, *args):
        if name == "conv_wgrad_kernel":
            names = getattr(T._kernels(), name).arg_names
            flags.append((args[names.index("DETERMINISTIC")], args[names.index("n_split")]))
        launch(name, grid, *args)

    monkeypatch.setattr(T, "_launch", spy)
    go = torch.randn(b, co, *shape, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        runs = [torch.autograd.grad(T.conv3d(x, w, bias, (1,) * 3, (0, 0, 1), 1, lin, lout), w, go)[0]
                for _ in range(2)]
    finally:
        torch.use_deterministic_algorithms(prev)
    assert flags == [(True, T.wgrad_split(n_tiles, 3, ci, co, True))] * 2
    assert torch.equal(runs[0], runs[1])
    _, ref_grads = _reference(x, w, bias, 1, (0, 0, 1), 1, lin, lout, go)
    torch.testing.assert_close(runs[0].double(), ref_grads[1], **TOL["ieee"])


@triton.jit
def _offset_probe(out_ptr, b, z, y, x, sb, sz, sy, sx):
    r = tl.arange(0, 2)
    tl.store(out_ptr + r, _offset(b, z + r, y + r * 0, x + r * 0, sb, sz, sy, sx))  # i32 coordinate tensors


def test_feature_offsets_are_64_bit():
    """The kernels address every feature voxel through ``_offset``. Here it gets the strides of a
    channels-last (1, 320, 192, 192, 192) tensor, where z * stride_z passes 2^31 (i32 arithmetic wraps, in
    the interpreter too). This proves the offset arithmetic, not a launch on a > 2^31-element tensor."""
    c, n = 320, 192
    sx, sy, sz = c, n * c, n * n * c
    out = torch.zeros(2, dtype=torch.int64, device=DEVICE)
    for b, sb in ((0, n * sz), (1, n * sz)):
        _offset_probe[(1,)](out, b, n - 2, n - 1, n - 1, sb, sz, sy, sx)
        expect = [b * sb + z * sz + (n - 1) * (sy + sx) for z in (n - 2, n - 1)]
        assert max(expect) > 2 ** 31 and out.tolist() == expect
