"""Backend dispatch: names and alias, the cuDNN cost model, and the verified choice of custom kernels.

The first-use check and its timing run on CPU here with injected candidates (a fake "triton" that raises,
one that is wrong, one that is correct) and an injected timer, so what `auto` does on a GPU is decided by
code these tests exercise."""
import json
import logging

import pytest
import torch

from ssl3d.sparse import SparseConv3d, SparseTensor, dispatch, ops
from ssl3d.sparse import reference as R
from ssl3d.sparse.masks import random_cell_mask
from ssl3d.sparse.tensor import MaskCache

torch.set_num_threads(2)


def _layout(b=2, shape=(8, 8, 8), cell=4, ratio=0.5, seed=0):
    grid = [s // cell for s in shape]
    cells = random_cell_mask(b, grid, ratio, generator=torch.Generator().manual_seed(seed))
    lay = MaskCache(cells).layout(shape)
    return lay


def _problem(ci=3, co=4, k=3, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, ci, 8, 8, 8, generator=g, dtype=dtype)
    w = torch.randn(co, ci, k, k, k, generator=g, dtype=dtype) * 0.2
    b = torch.randn(co, generator=g, dtype=dtype)
    return x, w, b


def _ref(x, w, b, s, p, groups, li, lo):
    return R.conv3d(x, w, b, s, p, 1, groups, li, lo)


class Timer:
    """Fake timer: runs each step once (so candidates really execute) and reports fixed times."""

    def __init__(self, times):
        self.times, self.calls = times, []

    def __call__(self, name, fn):
        fn()
        self.calls.append(name)
        return self.times[name]


@pytest.fixture
def install():
    prev = dispatch.set_dispatcher(None)
    yield lambda d: dispatch.set_dispatcher(d) and None
    dispatch.set_dispatcher(prev)


def test_backend_names_alias_and_explicit_gather():
    assert {"auto", "reference", "gather", "cpu", "triton"} <= set(ops.BACKENDS)
    assert ops.canonical_backend("cpu") == "gather"
    with pytest.raises(ValueError, match="unknown sparse backend"):
        ops.canonical_backend("gpu")
    lay = _layout()
    x, w, b = _problem(dtype=torch.float64)
    x.requires_grad_()
    for be in ("gather", "cpu"):
        assert ops.choose_conv_backend(be, x, w, (1,) * 3, (1,) * 3, (1,) * 3, 1, lay, lay) == "gather"
        y = ops.sparse_conv3d(x, w, b, 1, 1, 1, 1, lay, lay, backend=be)
        torch.testing.assert_close(y, _ref(x, w, b, (1,) * 3, (1,) * 3, 1, lay, lay))


def test_cudnn_cost_model():
    w3, w_dw7 = torch.zeros(8, 8, 3, 3, 3), torch.zeros(8, 1, 7, 7, 7)
    one = (1, 1, 1)

    def choice(dev, w, cell, ratio, groups=1, shape=(16, 16, 16)):
        lay = _layout(2, shape, cell, ratio, seed=cell)
        return ops.cudnn_choice(dev, w, one, tuple(k // 2 for k in w.shape[2:]), one, groups, lay, lay)

    assert choice("cuda", w3, 8, 0.75) == "gather"       # big cells: the stack conv does the visible FLOPs
    assert choice("cuda", w3, 4, 0.75) == "gather"
    assert choice("cuda", w3, 2, 0.75) == "reference"    # < 4 voxels per axis: dense conv on masked input
    assert choice("cuda", w3, 8, 0.0) == "dense"         # nothing masked
    assert choice("cuda", w_dw7, 4, 0.75, groups=8) == "reference"  # depthwise 7: halo 15x, memory-bound
    assert choice("cuda", w_dw7, 16, 0.75, groups=8, shape=(32, 32, 32)) == "gather"
    assert choice("cpu", w3, 2, 0.75) == "reference" and choice("cpu", w3, 8, 0.75) == "gather"  # as before
    assert dispatch.Dispatcher().custom_candidates(torch.device("cpu"), w3, one, one, one, 1, None, None) == {}


def test_raising_candidate_falls_back_with_one_warning(install, caplog):
    timer = Timer({"gather": 1.0, "reference": 1.0, "triton": 0.1})
    install(dispatch.Dispatcher(candidates={"triton": lambda *a: (_ for _ in ()).throw(RuntimeError("boom"))},
                                timer=timer))
    lay = _layout()
    with caplog.at_level(logging.WARNING, logger="ssl3d.sparse.dispatch"):
        for ci in (3, 5):  # two signatures, both fall back; one warning in all
            x, w, b = _problem(ci=ci)
            y = ops.sparse_conv3d(x, w, b, 1, 1, 1, 1, lay, lay)
            torch.testing.assert_close(y, _ref(x, w, b, (1,) * 3, (1,) * 3, 1, lay, lay))
            assert ops.choose_conv_backend("auto", x, w, (1,) * 3, (1,) * 3, (1,) * 3, 1, lay, lay, b) == "gather"
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "boom" in warnings[0].getMessage() and "cuDNN" in warnings[0].getMessage()
    assert timer.calls == []  # a failed check is never timed


def test_wrong_candidate_is_rejected(install, caplog):
    timer = Timer({"gather": 1.0, "reference": 1.0, "triton": 0.1})
    install(dispatch.Dispatcher(candidates={"triton": lambda *a: _ref(*a) * 1.01}, timer=timer))
    lay = _layout()
    x, w, b = _problem()
    with caplog.at_level(logging.WARNING, logger="ssl3d.sparse.dispatch"):
        assert ops.choose_conv_backend("auto", x, w, (1,) * 3, (1,) * 3, (1,) * 3, 1, lay, lay, b) == "gather"
    assert "differs from the reference" in caplog.text and timer.calls == []


def test_faster_correct_candidate_is_chosen_cached_and_runs(install, caplog):
    calls = []

    def good(*a):
        calls.append(1)
        return _ref(*a)

    timer = Timer({"gather": 2.0, "reference": 3.0, "triton": 1.0})
    install(dispatch.Dispatcher(candidates={"triton": good}, timer=timer))
    lay = _layout()
    x, w, b = _problem()
    with caplog.at_level(logging.INFO, logger="ssl3d.sparse.dispatch"):
        assert ops.choose_conv_backend("auto", x, w, (1,) * 3, (1,) * 3, (1,) * 3, 1, lay, lay, b) == "triton"
        assert sorted(timer.calls) == ["gather", "reference", "triton"]
        n = len(calls)
        y = ops.sparse_conv3d(x.requires_grad_(), w, b, 1, 1, 1, 1, lay, lay)  # cached: no new measurement
        assert len(calls) == n + 1 and len(timer.calls) == 3
        torch.testing.assert_close(y, _ref(x, w, b, (1,) * 3, (1,) * 3, 1, lay, lay))
        # the module path resolves the same signature and runs the chosen kernel too
        conv = SparseConv3d.from_dense(torch.nn.Conv3d(3, 4, 3, padding=1))
        conv.weight.data.copy_(w), conv.bias.data.copy_(b)
        out = conv(SparseTensor.from_dense(x.detach(), lay.cells))
        assert len(calls) == n + 2
        torch.testing.assert_close(out.features, y.detach())
    announced = [r.getMessage() for r in caplog.records if r.getMessage().endswith(": triton")]
    assert len(announced) == 1 and "sparse conv 3->4 k3 s1 at 8x8x8 cell 4 (50% visible" in announced[0]  # logged once


def test_slower_candidate_is_not_chosen(install):
    timer = Timer({"gather": 1.02, "reference": 3.0, "triton": 1.0})  # faster, but within the noise margin
    install(dispatch.Dispatcher(candidates={"triton": _ref}, timer=timer))
    lay = _layout()
    x, w, b = _problem()
    assert ops.choose_conv_backend("auto", x, w, (1,) * 3, (1,) * 3, (1,) * 3, 1, lay, lay, b) == "gather"


def test_kernel_failing_after_verification_falls_back(install, caplog):
    cand = {"triton": _ref}
    install(dispatch.Dispatcher(candidates=cand, timer=Timer({"gather": 2.0, "reference": 3.0, "triton": 1.0})))
    lay = _layout()
    x, w, b = _problem()
    assert ops.choose_conv_backend("auto", x, w, (1,) * 3, (1,) * 3, (1,) * 3, 1, lay, lay, b) == "triton"
    cand["triton"] = lambda *a: (_ for _ in ()).throw(RuntimeError("launch failed"))
    with caplog.at_level(logging.WARNING, logger="ssl3d.sparse.dispatch"):
        y = ops.sparse_conv3d(x, w, b, 1, 1, 1, 1, lay, lay)
    torch.testing.assert_close(y, _ref(x, w, b, (1,) * 3, (1,) * 3, 1, lay, lay))
    assert "launch failed" in caplog.text
    assert ops.choose_conv_backend("auto", x, w, (1,) * 3, (1,) * 3, (1,) * 3, 1, lay, lay, b) == "gather"


def test_json_cache_round_trip_without_remeasuring(install, tmp_path, monkeypatch):
    path = tmp_path / "sub" / "sparse_cache.json"
    lay = _layout()
    x, w, b = _problem()
    args = (x, w, (1,) * 3, (1,) * 3, (1,) * 3, 1, lay, lay, b)
    install(dispatch.Dispatcher(path, Timer({"gather": 2.0, "reference": 3.0, "triton": 1.0}),
                                candidates={"triton": _ref}))
    assert ops.choose_conv_backend("auto", *args) == "triton"
    data = json.loads(path.read_text())
    assert data["version"] == dispatch.CACHE_VERSION and len(data["entries"]) == 1
    entry = next(iter(data["entries"].values()))
    assert entry["backend"] == "triton" and entry["ms"]["triton"] == 1000.0 and entry["triton_max_rel_err"] < 1e-4
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # temp file renamed, nothing left over

    def no_timing(name, fn):
        raise AssertionError("cached decision was measured again")

    monkeypatch.setenv(dispatch.CACHE_ENV, str(path))  # a rerun / another rank: fresh process-wide dispatcher
    install(None)
    d = dispatch.get_dispatcher()
    assert d.cache_path == path
    d.timer, d.injected = no_timing, {"triton": _ref}
    assert ops.choose_conv_backend("auto", *args) == "triton"


def test_explicit_triton_fails_loudly(monkeypatch):
    class Fake:
        ok = True

        @staticmethod
        def available(device=None):
            return Fake.ok

        @staticmethod
        def interpreter_active():
            return True

        @staticmethod
        def _kernels():
            return object()

        @staticmethod
        def supports(*a):
            return True

        @staticmethod
        def conv3d(*a):
            raise RuntimeError("kernel exploded")

    monkeypatch.setattr(ops, "_triton", lambda: Fake)
    lay = _layout()
    x, w, b = _problem()
    with pytest.raises(RuntimeError, match="kernel exploded"):
        ops.sparse_conv3d(x, w, b, 1, 1, 1, 1, lay, lay, backend="triton")
    Fake.ok = False
    with pytest.raises(RuntimeError, match="'triton' was requested but cannot run"):
        ops.sparse_conv3d(x, w, b, 1, 1, 1, 1, lay, lay, backend="triton")
    y = ops.sparse_conv3d(x, w, b, 1, 1, 1, 1, lay, lay)  # auto never touches it on CPU
    torch.testing.assert_close(y, _ref(x, w, b, (1,) * 3, (1,) * 3, 1, lay, lay))


def test_first_use_check_inside_non_reentrant_checkpoint(install):
    """The check's own forward/backward must not be captured by an enclosing activation checkpoint."""
    from torch.utils.checkpoint import checkpoint

    timer = Timer({"gather": 2.0, "reference": 3.0, "triton": 1.0})
    install(dispatch.Dispatcher(candidates={"triton": _ref}, timer=timer))
    lay = _layout()
    x, w, b = _problem(dtype=torch.float64)
    x.requires_grad_()

    def f(x):
        return ops.sparse_conv3d(x, w, b, 1, 1, 1, 1, lay, lay).relu()

    checkpoint(f, x, use_reentrant=False).sum().backward()
    assert timer.calls  # measured inside the checkpointed region
    g = x.grad.clone()
    x.grad = None
    f(x).sum().backward()
    torch.testing.assert_close(g, x.grad)
