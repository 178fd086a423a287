"""Sparse ops: CPU backend and fused norms against the dense-masked reference, forward and all gradients."""
import pytest
import torch

from ssl3d.sparse import ops, reference as R
from ssl3d.sparse.masks import random_cell_mask
from ssl3d.sparse.tensor import MaskCache

torch.set_num_threads(2)


def _layouts(batch, shape, cell, ratio, seed, out_shape=None, special=True):
    grid = [s // c for s, c in zip(shape, cell)]
    cells = random_cell_mask(batch, grid, ratio, generator=torch.Generator().manual_seed(seed))
    if special and batch >= 3:
        cells[1] = False  # an all-masked sample
        cells[2] = True   # a nothing-masked sample
    mc = MaskCache(cells)
    return mc.layout(shape), mc.layout(out_shape or shape)


def _grads(y, inputs, go):
    return torch.autograd.grad(y, inputs, go, allow_unused=True)


CONV_CASES = [  # batch, cin, cout, shape, cell, kernel, stride, depthwise, ratio
    (3, 3, 5, (9, 12, 10), (3, 4, 2), 3, 1, False, 0.5),
    (3, 4, 4, (8, 12, 10), (4, 4, 2), 3, 1, True, 0.6),
    (2, 3, 6, (8, 12, 10), (4, 4, 2), 1, 1, False, 0.5),
    (3, 4, 4, (8, 8, 12), (4, 4, 4), 7, 1, True, 0.5),
    (2, 3, 5, (8, 8, 6), (4, 4, 2), 7, 1, False, 0.5),
    (3, 3, 5, (8, 12, 8), (4, 4, 2), 3, 2, False, 0.5),
    (2, 4, 4, (8, 8, 4), (4, 2, 2), 3, (2, 2, 1), True, 0.5),
    (2, 3, 4, (6, 6, 6), (1, 1, 1), 3, 1, False, 0.7),     # one-voxel cells (deep stages)
    (2, 2, 3, (10, 10, 10), (5, 5, 5), 5, 1, False, 0.5),  # odd cells, k5
]


@pytest.mark.parametrize("case", CONV_CASES)
def test_cpu_conv_matches_reference(case):
    b, ci, co, shape, cell, k, s, dw, ratio = case
    s3 = (s,) * 3 if isinstance(s, int) else s
    out = tuple((n + 2 * (k // 2) - k) // st + 1 for n, st in zip(shape, s3))
    lin, lout = _layouts(b, shape, cell, ratio, seed=sum(shape) + k, out_shape=out)
    g = ci if dw else 1
    x = torch.randn(b, ci, *shape, dtype=torch.float64, requires_grad=True)
    w = torch.randn(co, ci // g, k, k, k, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(co, dtype=torch.float64, requires_grad=True)
    y_ref = R.conv3d(x, w, bias, s3, k // 2, 1, g, lin, lout)
    y = ops.sparse_conv3d(x, w, bias, s3, k // 2, 1, g, lin, lout, backend="cpu")
    torch.testing.assert_close(y, y_ref)
    go = torch.randn_like(y)
    for a, r in zip(_grads(y, (x, w, bias), go), _grads(y_ref, (x, w, bias), go)):
        torch.testing.assert_close(a, r)
    if b >= 3:
        assert y[1].abs().max() == 0  # all-masked sample: no output at all (bias included)


def test_auto_is_exact_dense_at_zero_masking_and_none_masks():
    x, w = torch.randn(2, 3, 8, 8, 8), torch.randn(4, 3, 3, 3, 3)
    lin, lout = _layouts(2, (8, 8, 8), (4, 4, 4), 0.0, 0, special=False)
    dense = torch.nn.functional.conv3d(x, w, None, 1, 1)
    assert ops.choose_conv_backend("auto", x, w, (1,) * 3, (1,) * 3, (1,) * 3, 1, lin, lout) == "dense"
    assert torch.equal(ops.sparse_conv3d(x, w, None, 1, 1, mask_in=lin, mask_out=lout), dense)
    assert torch.equal(ops.sparse_conv3d(x, w, None, 1, 1), dense)


def test_max_pool_ignores_masked_even_when_negative():
    lin, lout = _layouts(3, (8, 8, 4), (2, 2, 2), 0.5, 3, out_shape=(4, 4, 2))
    x = -torch.rand(3, 2, 8, 8, 4, dtype=torch.float64) - 1.0       # all negative
    x_big = x.clone()
    x_big[~lin.mask[:, None].expand_as(x)] = 100.0                   # masked voxels never win
    y = ops.sparse_max_pool3d(x_big, 2, 2, mask_in=lin, mask_out=lout)
    ref = torch.nn.functional.max_pool3d(x, 2, 2) * lout.float_mask(x.dtype)
    torch.testing.assert_close(y, ref)


@pytest.mark.parametrize("mode", ["batch", "instance", "group"])
def test_fused_norms_match_reference(mode):
    lay, _ = _layouts(3, (8, 6, 4), (2, 2, 2), 0.6, 5)
    m = lay.float_mask(torch.float64)
    x0 = torch.randn(3, 6, 8, 6, 4, dtype=torch.float64) * 3 + 1
    x = (x0 * m).requires_grad_()
    w = torch.randn(6, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, dtype=torch.float64, requires_grad=True)
    if mode == "batch":
        rm_a, rv_a, rm_b, rv_b = torch.zeros(6), torch.ones(6), torch.zeros(6), torch.ones(6)
        y = ops.sparse_batch_norm(x, lay, rm_a, rv_a, w, b, True, 0.1, 1e-5, masked_input=True)
        r = R.batch_norm(x, lay, rm_b, rv_b, w, b, True, 0.1, 1e-5)
        torch.testing.assert_close((rm_a, rv_a), (rm_b, rv_b))
    elif mode == "instance":
        y = ops.sparse_instance_norm(x, lay, None, None, w, b, True, 0.1, 1e-5, masked_input=True)
        r = R.instance_norm(x, lay, None, None, w, b, True, 0.1, 1e-5)
    else:
        y = ops.sparse_group_norm(x, lay, 3, w, b, 1e-5, masked_input=True)
        r = R.group_norm(x, lay, 3, w, b, 1e-5)
    torch.testing.assert_close(y, r)
    assert torch.isfinite(y).all() and y[1].abs().max() == 0    # all-masked sample stays 0, no NaN
    go = torch.randn_like(y)
    for a, c in zip(_grads(y, (x, w, b), go), _grads(r, (x, w, b), go)):
        torch.testing.assert_close(a, c)


def test_norm_statistics_use_visible_voxels_only():
    lay, _ = _layouts(2, (4, 4, 4), (2, 2, 2), 0.5, 7, special=False)
    m = lay.mask[:, None].expand(2, 3, 4, 4, 4)
    x = torch.randn(2, 3, 4, 4, 4, dtype=torch.float64)
    y = R.instance_norm(x, lay, None, None, None, None, True, 0.1, 0.0)
    for bi in range(2):
        for c in range(3):
            v = y[bi, c][m[bi, c]]
            assert abs(v.mean().item()) < 1e-9 and abs(v.var(unbiased=False).item() - 1) < 1e-6


def test_transposed_conv_semantics():
    lin, lout = _layouts(2, (4, 4, 4), (2, 2, 2), 0.5, 9, out_shape=(8, 8, 8), special=False)
    x = torch.randn(2, 3, 4, 4, 4, dtype=torch.float64)
    w = torch.randn(3, 2, 2, 2, 2, dtype=torch.float64)
    y = ops.sparse_conv_transpose3d(x, w, None, 2, mask_in=lin, mask_out=lout)
    ref = torch.nn.functional.conv_transpose3d(x * lin.float_mask(x.dtype), w, None, 2)
    torch.testing.assert_close(y, ref * lout.float_mask(x.dtype))
