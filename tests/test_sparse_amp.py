"""Sparse ops under CPU bf16 autocast, forward and backward, against an fp64 reference.

Each op's error (relative, Frobenius) must be bf16-sized and at most a small factor above the error of the
dense reference op run under the same autocast (SparK's dense-masked path), so the sparse path loses nothing
to the reference beyond rounding."""
import pytest
import torch
from dynamic_network_architectures.building_blocks.residual_encoders import ResidualEncoder
from torch import nn

from ssl3d.sparse import SparseMaxPool3d, SparseTensor, cpu_backend, ops, sparse_forward, sparsify
from ssl3d.sparse import reference as R
from ssl3d.sparse.masks import random_cell_mask
from ssl3d.sparse.tensor import MaskCache

torch.set_num_threads(2)
BF16_EPS = 2.0 ** -8
FACTOR = 3.0


def _err(a, r):
    a, r = a.double(), r.double()
    return float((a - r).norm() / r.norm().clamp(min=1e-30))


def _check(got, ref_autocast, truth, what):
    for i, (a, b, t) in enumerate(zip(got, ref_autocast, truth)):
        e, e_ref = _err(a, t), _err(b, t)
        assert e <= FACTOR * max(e_ref, BF16_EPS), f"{what}[{i}]: error {e:.2e} vs dense-under-autocast {e_ref:.2e}"


def _layouts(b, shape, cell, out_shape, seed=0):
    cells = random_cell_mask(b, [s // c for s, c in zip(shape, cell)], 0.5,
                             generator=torch.Generator().manual_seed(seed))
    cells[0].view(-1)[0] = True
    mc = MaskCache(cells)
    return mc.layout(shape), mc.layout(out_shape)


def _grads(fn, leaves, seed=1):
    with torch.enable_grad():
        y = fn(*leaves)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    grads = torch.autograd.grad((y.double() * g).sum(), leaves)
    return [y.detach(), *grads], y.dtype


def _autocast(fn, leaves):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return _grads(fn, leaves)


CONVS = [  # cin, cout, kernel, stride, depthwise, cell
    (4, 6, 3, 1, False, (4, 4, 2)),
    (6, 6, 3, 1, True, (4, 4, 2)),
    (4, 4, 7, 1, True, (4, 4, 4)),
    (4, 6, 3, 2, False, (4, 4, 4)),
    (4, 6, 1, 1, False, (2, 2, 2)),
]


@pytest.mark.parametrize("compact", [False, True], ids=["dense", "compact"])
@pytest.mark.parametrize("case", CONVS)
def test_gather_conv_under_autocast(case, compact):
    ci, co, k, s, dw, cell = case
    shape = (8, 8, 8)
    out = tuple((n + 2 * (k // 2) - k) // s + 1 for n in shape)
    lin, lout = _layouts(2, shape, cell, out, seed=k + s)
    g = ci if dw else 1
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, ci, *shape, generator=gen).requires_grad_()
    w = (torch.randn(co, ci // g, k, k, k, generator=gen) * 0.3).requires_grad_()
    b = torch.randn(co, generator=gen).requires_grad_()
    st, pd = (s,) * 3, (k // 2,) * 3

    def sparse(x, w, b):
        if not compact:
            return ops.sparse_conv3d(x, w, b, st, pd, 1, g, lin, lout, backend="gather")
        yc = cpu_backend.conv3d_compact(lin.to_compact(x * lin.float_mask()), w, b, st, pd, g, lin, lout, 2)
        assert yc.dtype == torch.bfloat16
        return lout.to_dense(yc, 2)

    def ref(x, w, b):
        return R.conv3d(x, w, b, st, pd, 1, g, lin, lout)

    got, dt = _autocast(sparse, (x, w, b))
    assert dt == torch.bfloat16 and got[1].dtype == x.dtype and got[2].dtype == w.dtype  # grads: param dtype
    ref_ac, dt_ref = _autocast(ref, (x, w, b))
    assert dt_ref == torch.bfloat16
    truth, _ = _grads(ref, [t.detach().double().requires_grad_() for t in (x, w, b)])
    _check(got, ref_ac, truth, f"conv {case}")


@pytest.mark.parametrize("compact", [False, True], ids=["dense", "compact"])
@pytest.mark.parametrize("mode,mean", [("batch", 1.0), ("instance", 1.0), ("group", 1.0), ("instance", 20.0),
                                       ("group", 20.0)])
def test_masked_norms_under_autocast_keep_input_dtype(mode, mean, compact):
    """Also with |mean| = 20 std: shift/scale or backward sums kept in bf16 would lose |mean|/std * 2^-9."""
    lay, _ = _layouts(3, (8, 8, 4), (2, 2, 2), (8, 8, 4), seed=5)
    gen = torch.Generator().manual_seed(6)
    x = ((torch.randn(3, 6, 8, 8, 4, generator=gen) + mean) * lay.float_mask()).bfloat16().requires_grad_()
    w = torch.randn(6, generator=gen).requires_grad_()
    b = torch.randn(6, generator=gen).requires_grad_()

    def sparse(x, w, b):
        xin = lay.to_compact(x) if compact else x
        if mode == "batch":
            y = ops.sparse_batch_norm(xin, lay, None, None, w, b, True, 0.1, 1e-5, compact=compact, masked_input=True)
        elif mode == "instance":
            y = ops.sparse_instance_norm(xin, lay, None, None, w, b, True, 0.1, 1e-5, compact=compact,
                                         masked_input=True)
        else:
            y = ops.sparse_group_norm(xin, lay, 3, w, b, 1e-5, compact=compact, masked_input=True)
        assert y.dtype == torch.bfloat16  # documented choice: the input's dtype (CPU autocast's dense norms agree)
        return lay.to_dense(y, 3) if compact else y

    def ref(x, w, b):
        if mode == "batch":
            return R.batch_norm(x, lay, None, None, w, b, True, 0.1, 1e-5)
        if mode == "instance":
            return R.instance_norm(x, lay, None, None, w, b, True, 0.1, 1e-5)
        return R.group_norm(x, lay, 3, w, b, 1e-5)

    got, _ = _autocast(sparse, (x, w, b))
    assert got[1].dtype == torch.bfloat16 and got[2].dtype == torch.float32
    ref_ac, _ = _autocast(ref, (x, w, b))
    truth, _ = _grads(ref, [t.detach().double().requires_grad_() for t in (x, w, b)])
    _check(got, ref_ac, truth, f"{mode} norm")
    assert max(_err(a, t) for a, t in zip(got, truth)) <= 2 * BF16_EPS  # one bf16 rounding, not more


def test_pooling_under_autocast():
    lin, lout = _layouts(2, (8, 8, 8), (4, 4, 4), (4, 4, 4), seed=7)
    x = (torch.randn(2, 3, 8, 8, 8, generator=torch.Generator().manual_seed(8)) * lin.float_mask()).bfloat16()
    x.requires_grad_()
    pool = SparseMaxPool3d.from_dense(nn.MaxPool3d(2))

    def dense_max(x):
        return ops.sparse_max_pool3d(x, 2, 2, mask_in=lin, mask_out=lout)

    def compact_max(x):
        st = SparseTensor(x, lin.cells).replace_compact(lin.to_compact(x))  # compact input -> compact pooling
        out = pool(st)
        assert out.is_compact
        return out.features

    def avg(x):
        return ops.sparse_avg_pool3d(x, 2, 2, mask_in=lin, mask_out=lout)

    for name, fn, ref in [("max", dense_max, lambda x: R.max_pool3d(x, 2, 2, 0, 1, False, lin, lout)),
                          ("compact max", compact_max, lambda x: R.max_pool3d(x, 2, 2, 0, 1, False, lin, lout)),
                          ("avg", avg, lambda x: R.avg_pool3d(x, 2, 2, mask_in=lin, mask_out=lout))]:
        got, _ = _autocast(fn, (x,))
        ref_ac, _ = _autocast(ref, (x,))
        truth, _ = _grads(ref, [x.detach().double().requires_grad_()])
        _check(got, ref_ac, truth, name)


def test_resenc_gather_matches_reference_under_autocast(monkeypatch):
    """A sparsified dna ResidualEncoder, forward + backward under CPU bf16 autocast: "gather" (compact
    features between layers) vs "reference", both against the fp64 network."""
    compact_calls = []
    real = cpu_backend.conv3d_compact
    monkeypatch.setattr(cpu_backend, "conv3d_compact", lambda *a: compact_calls.append(1) or real(*a))
    torch.manual_seed(0)
    enc = ResidualEncoder(1, 3, [4, 8, 16], nn.Conv3d, 3, [1, 2, 2], [1, 1, 1], True, nn.InstanceNorm3d,
                          {"eps": 1e-5, "affine": True}, None, None, nn.LeakyReLU, {"inplace": True},
                          return_skips=True)
    x = torch.randn(2, 1, 16, 32, 32, generator=torch.Generator().manual_seed(1))
    cells = random_cell_mask(2, (2, 4, 4), 0.6, generator=torch.Generator().manual_seed(2))
    results = {}
    for name in ("gather", "reference", "fp64"):
        dtype = torch.float64 if name == "fp64" else torch.float32
        model = sparsify(enc.to(dtype), backend="reference" if name == "fp64" else name)  # shares enc's params
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.float32):
            outs = sparse_forward(model, x.to(dtype), cells)
        if dtype == torch.float32:
            assert all(o.dtype == torch.bfloat16 for o in outs)
        loss = sum((o.double() * torch.linspace(-1, 1, o.numel(), dtype=torch.float64).view_as(o)).sum()
                   for o in outs)
        results[name] = [o.detach() for o in outs] + list(torch.autograd.grad(loss, list(model.parameters())))
    assert compact_calls, "the gather path should keep features compact between layers"
    _check(results["gather"], results["reference"], results["fp64"], "ResidualEncoder outputs+grads")
