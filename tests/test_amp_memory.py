"""AMP (bf16 on CPU stands in for the GPU), fp32 losses, gradient accumulation and activation checkpointing."""
import pytest
import torch

from conftest import blob_batch
from ssl3d.training.losses import info_nce, masked_cell_mse
from test_pretraining import tiny_method

BF16 = dict(device_type="cpu", dtype=torch.bfloat16)
SMALL = (8, 16, 16)  # bf16 convolutions on CPUs without native bf16 are ~30x slower than fp32: tiny patches


def _grads(m) -> dict[str, torch.Tensor]:
    return {k: p.grad.clone() for k, p in m.named_parameters() if p.grad is not None}


def _step(m, x, vis, amp: bool = False):
    m.zero_grad(set_to_none=True)
    with torch.autocast(**BF16, enabled=amp):
        loss = m(x, vis)
    loss.backward()
    return loss.detach(), _grads(m)


def _sparse_method(name, backend, patch=(16, 32, 32), seed=0):
    from test_pretraining import TINY

    torch.manual_seed(seed)
    return tiny_method(name, patch) if backend is None else _with_backend(name, backend, TINY, patch)


def _with_backend(name, backend, tiny, patch):
    old = dict(tiny[name])
    tiny[name]["backend"] = backend
    try:
        return tiny_method(name, patch)
    finally:
        tiny[name].clear()
        tiny[name].update(old)


def test_losses_are_fp32_under_autocast():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(64, 32, generator=g), torch.randn(64, 32, generator=g)
    t = torch.arange(64)
    ref, _ = info_nce(q.double(), k.double(), t, 0.1)
    with torch.autocast(**BF16):
        assert (q @ k.T).dtype == torch.bfloat16  # what the logits would be without fp32_loss
        loss, _ = info_nce(q, k, t, 0.1)
    assert loss.dtype == torch.float32
    assert abs(loss.item() - ref.item()) < 1e-5  # bf16 logits are off by ~1e-2
    # the reconstruction loss of a bf16 prediction: fp32, equal to the loss of the prediction cast to float
    pred, img = torch.randn(2, 1, 8, 16, 16, generator=g).bfloat16(), torch.randn(2, 1, 8, 16, 16, generator=g)
    vis = torch.rand(2, 2, 2, 2, generator=g) > 0.5
    with torch.autocast(**BF16):
        mse = masked_cell_mse(pred, img, vis, (4, 8, 8))
    assert mse.dtype == torch.float32 and mse.item() == masked_cell_mse(pred.float(), img, vis, (4, 8, 8)).item()


@pytest.mark.parametrize("method", ["spark", "hyspark"])
def test_bf16_step_of_sparse_backend_matches_reference_backend(method):
    """One training step under CPU bf16 autocast, the gather backend against the dense-masked reference: loss and
    every parameter gradient within bf16 tolerance, i.e. off the fp32 step by at most a small factor of what bf16
    autocast does to the reference itself (its relative gradient errors reach ~0.4 on small-gradient tensors)."""
    x = blob_batch(0, shape=SMALL)
    ref = _sparse_method(method, "reference", SMALL)
    vis = ref.random_mask(2, 0.5, torch.Generator().manual_seed(1))
    l_true, g_true = _step(ref, x, vis, amp=False)
    l_ref, g_ref = _step(ref, x, vis, amp=True)
    sparse = _sparse_method(method, "gather", SMALL)
    l_sp, g_sp = _step(sparse, x, vis, amp=True)
    l32, g32 = _step(sparse, x, vis, amp=False)
    assert g_true.keys() == g_ref.keys() == g_sp.keys() and len(g_true) > 50
    assert abs(l_sp - l_true) <= 3 * abs(l_ref - l_true) + 1e-4 * l_true
    total = torch.cat([g.flatten() for g in g_true.values()]).norm()
    for k, g in g_true.items():
        err, err_ref = (g_sp[k] - g).norm(), (g_ref[k] - g).norm()
        assert err <= 3 * err_ref + 1e-2 * g.norm() + 1e-4 * total, (k, float(err), float(err_ref), float(g.norm()))
    flat = {n: torch.cat([d[k].flatten() for k in g_true]) for n, d in (("sp", g_sp), ("ref", g_ref))}
    flat_true = torch.cat([g.flatten() for g in g_true.values()])
    assert (flat["sp"] - flat_true).norm() <= 2 * (flat["ref"] - flat_true).norm()
    worst = max(float((g_sp[k] - g32[k]).norm() / g32[k].norm().clamp(min=1e-12)) for k in g32)
    assert worst > 1e-3, "the bf16 step must actually have run in bf16"


@pytest.mark.parametrize("method,backend,amp", [("spark", "cpu", False), ("hyspark", "reference", True),
                                                ("mae", None, True)])
def test_checkpoint_activations_same_loss_and_gradients_less_saved_memory(method, backend, amp):
    """Same loss and gradients (under bf16 autocast too: the recomputation runs in the forward's dtype) while
    autograd keeps far fewer bytes for backward (spark on the compact blocked path, whose input wrappers are
    rebuilt per run)."""
    patch = SMALL if amp else (16, 32, 32)
    m = _sparse_method(method, backend, patch)
    x, vis = blob_batch(0, shape=patch), m.random_mask(2, 0.75, torch.Generator().manual_seed(1))

    def step():
        held = {}

        def pack(t):
            if t.layout == torch.strided:
                held[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):  # checkpointed regions use their own
            loss, grads = _step(m, x, vis, amp)
        return loss, grads, sum(held.values())

    l_plain, g_plain, bytes_plain = step()
    keys = set(m.state_dict())
    m.enable_activation_checkpointing()
    assert set(m.state_dict()) == keys  # checkpointing leaves the weights' names alone (export, --c)
    l_ckpt, g_ckpt, bytes_ckpt = step()
    assert l_ckpt.item() == l_plain.item()
    for k, g in g_plain.items():
        torch.testing.assert_close(g_ckpt[k], g, rtol=1e-5, atol=1e-7)
    assert bytes_ckpt < 0.6 * bytes_plain, (bytes_ckpt, bytes_plain)


def test_checkpointed_modules_survive_deepcopy():
    import copy

    m = _sparse_method("mae", None)
    m.enable_activation_checkpointing()
    twin = copy.deepcopy(m)
    blk = twin.decoder.blocks[0]
    assert blk.forward.__self__ is blk  # the copy recomputes its own weights, not the original's


def _trainer(pool, results, monkeypatch, method, *extra):
    from ssl3d.cli.pretrain import build_parser, make_trainer

    for k, v in {"nnUNet_preprocessed": pool.dataset_dir.parent, "nnUNet_results": results,
                 "nnUNet_raw": results / "raw", "nnUNet_n_proc_DA": "0"}.items():
        monkeypatch.setenv(k, str(v))
    args = build_parser().parse_args(["-d", pool.dataset_dir.name, "-m", method, "-device", "cpu", "--size", "tiny",
                                      "--batch-size", "4", "--iters", "2", "--no-progress", "--backend", "cpu",
                                      *extra])
    trainer = make_trainer(args)
    trainer.initialize()
    return trainer


def test_grad_accum_step_equals_the_step_on_the_whole_batch(tiny_pool, tmp_path, monkeypatch):
    """spark, 4 cases: 2 micro-batches of 2 (masks drawn for all 4) vs one batch of 4: same loss, same weights."""
    data = torch.cat([blob_batch(0), blob_batch(1)])[:, :, :16, :32, :32]
    after = {}
    for n in (1, 2):
        t = _trainer(tiny_pool, tmp_path / f"r{n}", monkeypatch, "spark", "--grad-accum", str(n),
                     "--checkpoint-activations")
        assert t.grad_accum == n and t.checkpoint_activations and t.amp_dtype is None and t.grad_scaler is None
        before = {k: v.clone() for k, v in t.ssl_method.state_dict().items()}
        loss = float(t.train_step({"data": data})["loss"])
        assert t.global_step == 1  # the schedule counts optimizer steps
        grads = {k: p.grad for k, p in t.ssl_method.named_parameters() if p.grad is not None}
        after[n] = loss, t.ssl_method.state_dict(), grads
    (l1, w1, g1), (l2, w2, g2) = after[1], after[2]
    assert abs(l1 - l2) < 1e-6 * l1
    assert g1.keys() == g2.keys()
    for k in g1:  # the accumulated gradient itself (AdamW's update alone would hide a scale error)
        torch.testing.assert_close(g2[k], g1[k], rtol=1e-4, atol=1e-7)
    moved = [k for k in w1 if not torch.equal(w1[k], before[k])]
    assert len(moved) > 50
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-5, atol=1e-6)


def test_bf16_trainer_step_on_cpu(tiny_pool, tmp_path, monkeypatch):
    t = _trainer(tiny_pool, tmp_path, monkeypatch, "hyspark", "--amp", "bf16", "--batch-size", "2", "--backend",
                 "reference", "--patch-size", *map(str, SMALL))
    assert t.amp_dtype == torch.bfloat16 and t.grad_scaler is None
    seen, losses = [], []
    t.ssl_method.decoder.seg_layers[-1].register_forward_hook(lambda mod, i, o: seen.append(o.dtype))
    compute = t.compute_loss
    monkeypatch.setattr(t, "compute_loss", lambda *a: losses.append(compute(*a)) or losses[-1])
    out = t.train_step({"data": blob_batch(0, shape=SMALL)})
    assert seen == [torch.bfloat16], "the decoder runs in bf16"
    assert [loss.dtype for loss in losses] == [torch.float32] and torch.isfinite(torch.as_tensor(out["loss"]))
    grads = [p.grad for p in t.ssl_method.parameters() if p.grad is not None]
    assert grads and all(g.dtype == torch.float32 for g in grads)


@pytest.mark.parametrize("extra,message", [
    (["--grad-accum", "3"], "--grad-accum 3 must be >= 1 and divide the batch per rank (2)"),
    (["--grad-accum", "0"], "--grad-accum 0 must be >= 1"),
    (["--amp", "fp16"], "--amp fp16 is not supported on cpu"),
    (["--checkpoint-activations", "-m", "simclr"], "--checkpoint-activations is not supported by simclr")])
def test_bad_memory_options_exit_2_with_one_line(tiny_pool, tmp_path, monkeypatch, capsys, extra, message):
    from ssl3d.cli.pretrain import main

    for k, v in {"nnUNet_preprocessed": tiny_pool.dataset_dir.parent, "nnUNet_results": tmp_path}.items():
        monkeypatch.setenv(k, str(v))
    code = main(["-d", tiny_pool.dataset_dir.name, "-m", "spark", "-device", "cpu", "--batch-size", "2", *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0], err
    assert not any(tmp_path.iterdir()), "nothing may be written before the options are checked"
