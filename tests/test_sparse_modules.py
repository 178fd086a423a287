"""Sparse encoders from the converter: dense equivalence, state_dict compatibility, no leaks, backends agree."""
import pytest
import torch
from dynamic_network_architectures.building_blocks.residual_encoders import ResidualEncoder
from torch import nn

from ssl3d.architectures.mednext import MedNeXtEncoder
from ssl3d.sparse import (SparseConv3d, SparseTensor, random_cell_mask, set_backend, sparse_forward, sparsify,
                          upsample_mask)

torch.set_num_threads(2)


def _resenc(norm=nn.InstanceNorm3d, pool="conv"):
    kw = {"eps": 1e-5, "affine": True}
    return ResidualEncoder(2, 4, [8, 16, 24, 32], nn.Conv3d, 3, [1, 2, (2, 2, 1), 2], [1, 2, 1, 1], True, norm,
                           kw, None, None, nn.LeakyReLU, {"inplace": True}, return_skips=True,
                           pool_type=pool).double()


def _mednext():
    return MedNeXtEncoder(1, [8, 16, 16], [1, 2, (2, 2, 1)], 1, [3, 3, 7], 2).double()


def _cells(b=3, grid=(2, 2, 4), ratio=0.5, seed=0):
    c = random_cell_mask(b, grid, ratio, generator=torch.Generator().manual_seed(seed))
    if b >= 3:
        c[1] = False
        c[2] = True
    return c


@pytest.mark.parametrize("make", [_resenc, lambda: _resenc(nn.BatchNorm3d, "max"), _mednext])
def test_state_dict_and_dense_equivalence(make):
    torch.manual_seed(0)
    dense = make()
    sp = sparsify(dense)
    assert any(isinstance(m, SparseConv3d) for m in sp.modules())
    assert not any(isinstance(m, SparseConv3d) for m in dense.modules())      # dense model untouched
    sd, dd = sp.state_dict(), dense.state_dict()
    assert list(sd) == list(dd) and all(sd[k].shape == dd[k].shape for k in sd)
    assert all(sd[k].data_ptr() == dd[k].data_ptr() for k in sd)               # parameters are shared
    fresh = make()
    fresh.load_state_dict(sp.state_dict(), strict=True)
    x = torch.randn(2, 2 if make is not _mednext else 1, 16, 16, 8, dtype=torch.float64)
    dense.eval(), sp.eval(), fresh.eval()
    for a, b, c in zip(dense(x), sp(x), fresh(x)):
        assert torch.equal(a, b) and torch.equal(a, c)                          # mask=None is exactly dense
    assert all(torch.equal(a, b) for a, b in zip(dense(x), sparse_forward(sp, x, None)))


@pytest.mark.parametrize("make", [_resenc, _mednext])
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_no_leak_through_whole_encoder(make, backend):
    torch.manual_seed(1)
    sp = sparsify(make(), backend=backend)
    cin = 1 if make is _mednext else 2
    x = torch.randn(3, cin, 16, 16, 8, dtype=torch.float64)
    cells = _cells()
    hidden = ~upsample_mask(cells, (16, 16, 8))[:, None].expand_as(x)
    x2 = x.clone()
    x2[hidden] = torch.randn(int(hidden.sum()), dtype=torch.float64) * 10
    for a, b in zip(sparse_forward(sp, x, cells), sparse_forward(sp, x2, cells)):
        assert torch.equal(a, b)
    out = sp(SparseTensor.from_dense(x, cells))
    for o in out:
        assert o.features[~o.mask[:, None].expand_as(o.features)].abs().max() == 0  # masked stay exactly 0
        assert o.features[1].abs().max() == 0                                       # all-masked sample


@pytest.mark.parametrize("make", [_resenc, lambda: _resenc(nn.BatchNorm3d, "max"), _mednext])
def test_backends_agree_on_whole_encoder_with_gradients(make, monkeypatch):
    """The reference (dense-masked) path against the blocked CPU path, whose features stay compact."""
    from ssl3d.sparse import cpu_backend

    compact_calls = []
    real = cpu_backend.conv3d_compact
    monkeypatch.setattr(cpu_backend, "conv3d_compact", lambda *a: compact_calls.append(1) or real(*a))
    torch.manual_seed(2)
    dense = make()
    ref, cpu = sparsify(dense, backend="reference"), sparsify(dense, backend="cpu")
    cin = 1 if make is _mednext else 2
    x = torch.randn(3, cin, 16, 16, 8, dtype=torch.float64)
    cells = _cells(seed=4)
    results = []
    for model in (ref, cpu):
        model.zero_grad()
        xi = x.clone().requires_grad_()
        out = sparse_forward(model, xi, cells)
        loss = sum((o * torch.linspace(-1, 1, o.numel(), dtype=o.dtype).view_as(o)).sum() for o in out)
        loss.backward()
        results.append(([o.detach() for o in out], xi.grad, {k: p.grad.clone() for k, p in model.named_parameters()}))
        for p in model.parameters():
            p.grad = None
    assert compact_calls, "the CPU backend should keep features compact between layers"
    (o1, gx1, gp1), (o2, gx2, gp2) = results
    for a, b in zip(o1, o2):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(gx1, gx2)
    for k in gp1:
        torch.testing.assert_close(gp1[k], gp2[k], msg=k)


@pytest.mark.parametrize("make", [_resenc, lambda: _resenc(nn.BatchNorm3d, "max"), _mednext])
def test_nothing_masked_is_the_dense_network(make):
    torch.manual_seed(3)
    dense = make()
    sp = sparsify(dense)
    x = torch.randn(2, 1 if make is _mednext else 2, 16, 16, 8, dtype=torch.float64)
    cells = torch.ones(2, 2, 2, 4, dtype=torch.bool)
    for a, b in zip(dense(x), sparse_forward(sp, x, cells)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_unsupported_module_raises_and_backend_switch():
    enc = ResidualEncoder(1, 2, [8, 8], nn.Conv3d, 3, [1, 2], 1, False, nn.InstanceNorm3d, {"affine": True},
                          None, None, nn.ReLU, None, squeeze_excitation=True)
    with pytest.raises(TypeError, match="squeeze"):
        sparsify(enc)
    sp = set_backend(sparsify(_resenc()), "cpu")
    assert all(m.backend == "cpu" for m in sp.modules() if hasattr(m, "backend"))
    with pytest.raises(ValueError):
        sparsify(_resenc(), backend="gpu")
