"""Triton kernels (fwd, dgrad, wgrad; regular and depthwise; fp32 and bf16) vs the reference.

On CPU they run in the Triton interpreter (TRITON_INTERPRET=1, set here before triton is imported): very
slow, so shapes are tiny (<= 8 channels, <= 8^3) and parametrizations few. On a CUDA machine the same kernels
run natively.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from ssl3d.sparse import reference as R  # noqa: E402
from ssl3d.sparse.masks import random_cell_mask  # noqa: E402
from ssl3d.sparse.tensor import MaskCache  # noqa: E402

triton = pytest.importorskip("triton", reason="triton cannot be imported")
from ssl3d.sparse import triton_backend as T  # noqa: E402

torch.set_num_threads(2)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and not T.interpreter_active():
    pytest.fail("triton was imported before TRITON_INTERPRET=1 was set (conftest.py sets it first)",
                pytrace=False)

CASES = [  # batch, cin, cout, shape, cell, kernel, stride, depthwise, dtype
    (3, 3, 5, (6, 8, 5), (2, 4, 1), 3, 1, False, torch.float32),   # odd sizes, anisotropic cells, k3
    (2, 4, 4, (6, 8, 5), (2, 4, 1), 3, 1, True, torch.float32),    # depthwise
    (1, 3, 4, (8, 8, 8), (4, 4, 2), 3, 2, False, torch.float32),   # stride 2
    (2, 3, 6, (4, 8, 4), (2, 2, 2), 1, 1, False, torch.bfloat16),  # k1, bf16
    (1, 2, 2, (4, 4, 6), (2, 2, 2), 7, 1, True, torch.float16),    # depthwise k7, fp16
]


@pytest.mark.parametrize("case", CASES)
def test_triton_conv_matches_reference(case):
    b, ci, co, shape, cell, k, s, dw, dtype = case
    grid = [n // c for n, c in zip(shape, cell)]
    cells = random_cell_mask(b, grid, 0.5, generator=torch.Generator().manual_seed(k + s))
    if b >= 3:
        cells[1], cells[2] = False, True
    mc = MaskCache(cells.to(DEVICE))
    out = tuple((n + 2 * (k // 2) - k) // s + 1 for n in shape)
    lin, lout = mc.layout(shape), mc.layout(out)
    g = ci if dw else 1
    x = torch.randn(b, ci, *shape, device=DEVICE).to(dtype).requires_grad_()
    w = torch.randn(co, ci // g, k, k, k, device=DEVICE).to(dtype).requires_grad_()
    bias = torch.randn(co, device=DEVICE).to(dtype).requires_grad_()
    y = T.conv3d(x, w, bias, (s,) * 3, (k // 2,) * 3, g, lin, lout)
    go = torch.randn_like(y)
    grads = torch.autograd.grad(y, (x, w, bias), go)
    xd, wd, bd = [t.detach().double().requires_grad_() for t in (x, w, bias)]
    ref = R.conv3d(xd, wd, bd, s, k // 2, 1, g, lin, lout)
    ref_grads = torch.autograd.grad(ref, (xd, wd, bd), go.double())
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=0.3)
    torch.testing.assert_close(y.double(), ref, **tol)
    for a, r in zip(grads, ref_grads):
        torch.testing.assert_close(a.double(), r, **tol)
    if b >= 3:
        assert y[1].abs().max() == 0 and grads[0][1].abs().max() == 0
