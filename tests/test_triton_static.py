"""Every Triton kernel compiled for real GPUs (sm_80, sm_90) on a CPU-only machine.

The planned encoders (ResEnc from an isotropic CT, an anisotropic 0.8x0.8x5 mm CT and a 3x0.6x0.6 mm MRI
plan; the hybrid's MedNeXt stages with depthwise 7) run forward and backward on tiny CPU tensors with the
kernel launches recorded (``ssl3d.sparse.triton_aot``); each launch becomes Triton's own specialization
key and a covering subset is compiled with ``triton.compile(ASTSource, GPUTarget("cuda", arch, 32))``:
every kernel x dtype x arch, regular and depthwise per dtype and arch, strided, atomic and deterministic
wgrad. The full matrix (every specialization, planned patch sizes) is ``benchmarks/triton_static.py``.
Tiny patches make the deepest maps one voxel thick, so some integer hints differ from training.
"""
import importlib.util
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton", reason="triton cannot be imported")
from ssl3d.sparse import triton_aot as A  # noqa: E402
from ssl3d.sparse import triton_backend as T  # noqa: E402
from ssl3d.sparse.tensor import MaskCache  # noqa: E402

ARCHS = (80, 90)
_spec = importlib.util.spec_from_file_location("triton_static", Path(__file__).parents[1] / "benchmarks" /
                                               "triton_static.py")
S = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(S)


@pytest.fixture(scope="module")
def planned_specs():
    cfgs = S.planned_configs()
    ct = cfgs["ct_iso_1mm"]
    hybrid = S.encoder_for(ct, "hybrid", depthwise_kernel=7)
    launches = []
    # each ResEnc plan in one dtype (every planned layer signature, strided 3x3x3 in each dtype); the
    # hybrid in every dtype; deterministic wgrad once
    for name, dtype in (("ct_iso_1mm", "fp32-tf32"), ("ct_aniso_0.8x0.8x5mm", "bf16"), ("mri_3x0.6x0.6mm", "fp16")):
        launches += S.record(cfgs[name], "resenc", dtype, "tiny", encoder=S.encoder_for(cfgs[name], "resenc"))
    for dtype in ("fp32-tf32", "bf16", "fp16"):
        launches += S.record(ct, "hybrid", dtype, "tiny", encoder=hybrid)
    with S.deterministic_algorithms():
        launches += S.record(ct, "hybrid", "bf16", "tiny", encoder=hybrid)
    return A.unique_specs(launches)


def test_planned_kernels_compile_for_sm80_and_sm90(planned_specs, tmp_path):
    work = A.representative(planned_specs, ARCHS)
    covered = {(s.kernel, s.dtype(), a) for s, a in work}
    assert covered == {(k, d, a) for k in A.KERNELS for d in ("fp32-tf32", "bf16", "fp16") for a in ARCHS}
    assert any(s.constexprs().get("DETERMINISTIC") for s, _ in work)
    assert any(s.constexprs()["DEPTHWISE"] and s.constexprs()["KZ"] == 7 for s, _ in work)
    results = A.compile_specs(work, jobs=2, cache_dir=str(tmp_path))  # fresh cache: every compile is real
    assert len(results) == len(work)
    errors = [f"sm_{r.arch} {r.spec}: {r.error}" for r in results if not r.ok]
    assert not errors, "\n".join(errors)
    for r in results:
        assert r.n_regs > 0 and r.spill_bytes >= 0 and r.ctas_per_sm >= 1, r
        if " dw" not in r.spec:  # regular convs use tensor cores (tl.dot), depthwise are FMAs
            assert r.mma in ("mma.sync", "wgmma"), r


def _wgrad_launches(n_visible: list[int]) -> list[A.Launch]:
    """Weight-gradient launches of one conv on the same shapes, masks with n visible 4^3 cells each."""
    x = torch.randn(1, 32, 16, 16, 16)
    w = torch.randn(32, 32, 3, 3, 3, requires_grad=True)
    out = []
    for n in n_visible:
        cells = torch.zeros(64, dtype=torch.bool)
        cells[torch.randperm(64, generator=torch.Generator().manual_seed(n))[:n]] = True
        mc = MaskCache(cells.reshape(1, 4, 4, 4))
        lay = mc.layout((16, 16, 16))
        with A.record_launches() as launches:
            T.conv3d(x, w, None, (1, 1, 1), (1, 1, 1), 1, lay, lay).sum().backward()
        out += [la for la in launches if la.kernel == "conv_wgrad_kernel"]
    return out


def test_tile_splits_and_tile_counts_reuse_one_compiled_kernel():
    launches = _wgrad_launches([1, 16, 17, 40])
    names = A._jit("conv_wgrad_kernel").arg_names
    i_tiles, i_split = names.index("n_tiles"), names.index("n_split")
    assert [la.args[i_tiles] for la in launches] == [1, 16, 17, 40]
    assert len({la.args[i_split] for la in launches}) >= 3, "the test needs distinct split counts"
    specs = [A.specialize(la) for la in launches]
    assert len({s.specialization for s in specs}) == 1, [s.label() for s in specs]  # Triton's cache key
    assert specs[0].specialization[i_tiles] == ("i32", None) == specs[0].specialization[i_split]
    assert "n_split" not in specs[0].constexprs() and "SPLIT" not in names


def test_deterministic_partial_buffer_is_bounded():
    assert T.wgrad_split(4096, 27, 320, 320, deterministic=False) == 64
    split = T.wgrad_split(4096, 27, 320, 320, deterministic=True)
    assert 1 <= split < 64 and split * 27 * 320 * 320 <= T.DETERMINISTIC_PARTIALS
