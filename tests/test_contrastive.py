"""Contrastive family: the two-view loader's overlap, NT-Xent under DDP, MoCo's queue, VoCo's labels, no collapse."""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ssl3d.training.losses import nt_xent
from ssl3d.training.methods.voco import overlap_labels
from ssl3d.training.pretraining.views import TwoViewDataLoader, contrastive_view_transforms, view_region
from ssl3d.training.pretraining.trainer import COLLAPSE_STD
from test_pretraining import method_input, tiny_method


def test_views_always_overlap_by_half_per_axis():
    patch = [16, 32, 40]
    region = view_region(patch, 0.5)
    assert region == [24, 48, 60]
    loader = TwoViewDataLoader.__new__(TwoViewDataLoader)  # offsets only: no dataset needed
    loader.patch_size, loader.view_patch = region, patch
    for _ in range(200):
        a, b = loader.view_offsets()
        for p, r, lo1, lo2 in zip(patch, region, a, b):
            assert 0 <= lo1 <= r - p and 0 <= lo2 <= r - p
            assert p - abs(lo1 - lo2) >= 0.5 * p


def test_view_augmentations_are_independent_and_keep_the_shape():
    torch.manual_seed(0)
    t = contrastive_view_transforms([16, 32, 32])
    x = torch.randn(1, 16, 32, 32)
    a, b = t(image=x.clone())["image"], t(image=x.clone())["image"]
    assert a.shape == b.shape == x.shape and not torch.equal(a, b)


def test_nt_xent_matches_a_direct_computation():
    torch.manual_seed(0)
    z1, z2 = torch.randn(3, 8), torch.randn(3, 8)
    z = torch.nn.functional.normalize(torch.cat([z1, z2]), dim=1)
    sim = z @ z.T / 0.5
    sim.fill_diagonal_(float("-inf"))
    expected = torch.nn.functional.cross_entropy(sim, torch.tensor([3, 4, 5, 0, 1, 2]))
    assert torch.allclose(nt_xent(z1, z2, 0.5), expected, atol=1e-6)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _nt_xent_rank(rank: int, world: int, port: int, z1: torch.Tensor, z2: torch.Tensor, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    n = z1.shape[0] // world
    a = z1[rank * n:(rank + 1) * n].clone().requires_grad_(True)
    b = z2[rank * n:(rank + 1) * n].clone().requires_grad_(True)
    loss = nt_xent(a, b, 0.5)
    loss.backward()
    total = loss.detach().clone()
    dist.all_reduce(total)
    out[rank] = (float(total) / world, a.grad.clone(), b.grad.clone())
    dist.destroy_process_group()


@pytest.mark.slow
def test_nt_xent_under_ddp_equals_the_single_process_loss_on_the_global_batch():
    """Two gloo ranks with half a batch each: the mean of their losses is the loss of the whole batch, and after
    DDP's gradient averaging (÷ world) every row's gradient is the single-process one."""
    torch.manual_seed(0)
    z1, z2 = torch.randn(4, 16), torch.randn(4, 16)
    a, b = z1.clone().requires_grad_(True), z2.clone().requires_grad_(True)
    single = nt_xent(a, b, 0.5)
    single.backward()
    out = mp.Manager().dict()
    mp.spawn(_nt_xent_rank, args=(2, _free_port(), z1, z2, out), nprocs=2, join=True)
    assert out[0][0] == pytest.approx(float(single.detach()), abs=1e-6)
    for rank in range(2):
        _, ga, gb = out[rank]
        assert torch.allclose(ga / 2, a.grad[rank * 2:(rank + 1) * 2], atol=1e-6)
        assert torch.allclose(gb / 2, b.grad[rank * 2:(rank + 1) * 2], atol=1e-6)


def test_voco_overlap_labels():
    lo = torch.tensor([[0.0, 0.0, 0.0], [0.0, 2.0, 2.0], [0.0, 4.0, 0.0]])
    labels = overlap_labels(lo, (4, 4, 4), (1, 2, 2))
    assert torch.allclose(labels[0], torch.tensor([1.0, 0, 0, 0]))
    assert torch.allclose(labels[1], torch.full((4,), 0.25))
    assert torch.allclose(labels[2], torch.tensor([0.0, 0, 1, 0]))
    assert torch.allclose(labels.sum(1), torch.ones(3))


def test_voco_crops_and_teacher():
    m = tiny_method("voco")
    assert m.data_patch_size == (16, 64, 64) and m.n_views == 1
    x = torch.arange(16 * 64 * 64, dtype=torch.float32).reshape(1, 1, 16, 64, 64)
    bases = m.base_crops(x)
    assert bases.shape == (4, 1, 16, 32, 32) and torch.equal(bases[3], x[0, :, :, 32:, 32:])
    crops, lo = m.target_crops(x, torch.Generator().manual_seed(0))
    z, y, w = lo[0, 0].tolist()
    assert torch.equal(crops[0], x[0, :, z:z + 16, y:y + 32, w:w + 32])
    assert not any(p.requires_grad for p in m.teacher.parameters())


@pytest.mark.parametrize("method", ["simclr", "mocov2", "byol", "voco"])
def test_short_run_learns_without_collapse(method):
    """Distinct images every step; the loss falls (MoCo: once its queue holds real keys) and the projected
    embeddings stay spread (per-dimension std above the collapse guard)."""
    torch.manual_seed(0)
    m = tiny_method(method)
    if method == "mocov2":
        m.momentum = 0.99  # 0.999 barely moves the key encoder in 50 steps
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], 3e-4)
    g = torch.Generator().manual_seed(0)
    losses, stds = [], []
    for i in range(50):
        m.set_progress(i, 1000)
        loss = m(method_input(m, i, batch=4 if m.n_views == 2 else 2), None, generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
        m.after_optimizer_step()
        losses.append(float(loss.detach()))
        stds.append(m.stats[f"{method}_embedding_std"])
    start = 10 if method == "mocov2" else 0  # queue (64) full of real keys after 8 steps of 8 keys
    assert sum(losses[-8:]) / 8 < 0.95 * sum(losses[start:start + 5]) / 5, losses
    assert min(stds[-5:]) > COLLAPSE_STD, stds[-5:]


def test_moco_queue_enqueues_and_wraps():
    m = tiny_method("mocov2")
    size = m.queue.shape[0]
    keys = torch.nn.functional.normalize(torch.randn(size - 2, m.queue.shape[1]), dim=1)
    m.enqueue(keys)
    assert int(m.queue_ptr) == size - 2 and torch.equal(m.queue[: size - 2], keys)
    more = torch.nn.functional.normalize(torch.randn(4, m.queue.shape[1]), dim=1)
    m.enqueue(more)
    assert int(m.queue_ptr) == 2 and torch.equal(m.queue[-2:], more[:2]) and torch.equal(m.queue[:2], more[2:])
