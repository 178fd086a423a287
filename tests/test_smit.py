"""SMIT: masked content never enters the student, EMA on the global step, centering, collapse guard, learning."""
import math
import types

import pytest
import torch

from conftest import blob_batch
from ssl3d.architectures.encoders import DownstreamEncoder
from ssl3d.architectures.swin import SwinUNETRNet
from ssl3d.inference.features import encoder_stage_features
from ssl3d.sparse import upsample_mask
from ssl3d.training.distillation import (Centering, distillation_cross_entropy, ema_momentum, embedding_std,
                                         teacher_temperature)
from ssl3d.training.pretraining.trainer import COLLAPSE_STD, SSLPretrainer
from test_pretraining import tiny_method


@pytest.fixture(scope="module")
def smit():
    torch.manual_seed(0)
    return tiny_method("smit")


def test_views_and_sizes(smit):
    assert smit.patch_size == (32, 32, 64), "16x32x32 -> multiples of 32, bottleneck of more than one voxel"
    assert smit.data_patch_size == (40, 40, 80) and smit.cell_size == (16, 16, 16)
    x = blob_batch(0, shape=smit.data_patch_size)
    views = smit.random_views(x, torch.Generator().manual_seed(0))
    assert views.shape == (4, 1, 32, 32, 64)
    assert not torch.equal(views[0], views[2]), "two views of a sample come from different offsets"
    assert torch.equal(smit.input_view(x), x[:, :, 4:36, 4:36, 8:72])


def test_masked_voxels_never_enter_the_student(smit):
    g = torch.Generator().manual_seed(2)
    x = blob_batch(1, shape=smit.patch_size)
    vis = smit.random_mask(2, 0.7, g)
    keep = upsample_mask(vis, x.shape[2:])[:, None]
    x2 = torch.where(keep, x, torch.randn_like(x) * 100)
    with torch.no_grad():
        a, b = smit.encode(x, vis), smit.encode(x2, vis)
        rec_a, rec_b = smit.reconstruct(x, vis), smit.reconstruct(x2, vis)
    assert all(torch.equal(u, w) for u, w in zip(a, b))
    assert torch.equal(rec_a * ~keep, rec_b * ~keep), "predictions of masked voxels use visible content only"


def test_teacher_is_an_ema_of_the_student_on_the_global_step():
    m = tiny_method("smit")
    with torch.no_grad():
        for p in m.student.parameters():
            p.add_(0.1)
    before = [p.clone() for p in m.teacher.parameters()]
    m.set_progress(500, 1000)
    m.after_optimizer_step()
    mom = ema_momentum(500, 1000, 0.996)
    assert mom == pytest.approx(0.998)
    for t0, t, s in zip(before, m.teacher.parameters(), m.student.parameters()):
        assert torch.allclose(t, mom * t0 + (1 - mom) * s, atol=1e-6)
    assert not any(p.requires_grad for p in m.teacher.parameters())
    assert ema_momentum(3 * 250 + 7, 10 * 250) != ema_momentum(7, 10 * 250), "global, not within-epoch step"


def test_centering_temperature_and_cross_entropy():
    c = Centering(4, momentum=0.9)
    c.update(torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0]]))
    assert torch.allclose(c.center, torch.tensor([0.05, 0.05, 0, 0]))
    assert teacher_temperature(0, 100, 0.04, 0.07, 0.3) == pytest.approx(0.04)
    assert teacher_temperature(15, 100, 0.04, 0.07, 0.3) == pytest.approx(0.055)
    assert teacher_temperature(90, 100, 0.04, 0.07, 0.3) == pytest.approx(0.07)
    t = torch.tensor([[50.0, 0.0]])
    assert float(distillation_cross_entropy(torch.tensor([[50.0, 0.0]]), t, torch.zeros(2), 1.0, 0.1)) < 0.05
    w = torch.tensor([1.0, 0.0])
    two = distillation_cross_entropy(torch.tensor([[0.0, 9.0], [9.0, 0.0]]), t.repeat(2, 1), torch.zeros(2), 1.0, 1.0, w)
    assert float(two) > 5, "weight 0 rows do not count"


def test_short_run_learns_without_collapse():
    torch.manual_seed(0)
    m = tiny_method("smit")
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], 1e-4)
    g = torch.Generator().manual_seed(0)
    stats = []
    for i in range(40):
        m.set_progress(i, 40)
        loss = m(blob_batch(i % 8, shape=m.data_patch_size), m.random_mask(2, 0.7, g), generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
        m.after_optimizer_step()
        stats.append(dict(m.stats))
    mip = [s["smit_mip"] for s in stats]
    assert sum(mip[-8:]) / 8 < 0.8 * sum(mip[:4]) / 4
    last = stats[-5:]
    print("embedding std", [round(s["smit_embedding_std"], 4) for s in last])
    assert min(s["smit_embedding_std"] for s in last) > COLLAPSE_STD, "student embeddings collapsed"
    # the teacher barely moves in 40 steps (momentum >= 0.996): its entropy is logged, bounded, not yet meaningful
    assert all(0 <= s["smit_teacher_entropy"] <= math.log(m.opts["out_dim"]) + 1e-4 for s in last)
    assert not torch.equal(m.global_center.center, torch.zeros_like(m.global_center.center))


def test_collapse_guard_flags_equal_embeddings():
    assert embedding_std(torch.ones(8, 16)) < COLLAPSE_STD < embedding_std(torch.randn(8, 16))
    lines = []
    fake = types.SimpleNamespace(print_to_log_file=lambda *a: lines.append(" ".join(map(str, a))))
    SSLPretrainer.log_method_stats(fake, [{"loss": 1.0, "smit_embedding_std": 0.0}] * 3)
    assert fake.epoch_stats == {"smit_embedding_std": 0.0}
    assert any("WARNING: representation collapse" in line for line in lines)


def test_encoder_keys_map_one_to_one_to_swinunetr(smit):
    sd = smit.downstream_state_dict()
    arch = smit.downstream_architecture()
    net = SwinUNETRNet(1, 3, **arch["arch_kwargs"])
    swin_keys = {k for k in net.state_dict() if k.startswith("swinViT.")}
    assert set(sd) == swin_keys
    missing, unexpected = net.load_state_dict(sd, strict=False)
    assert not unexpected and not any(k.startswith("swinViT.") for k in missing)


def test_extracted_features_equal_the_downstream_encoder_after_transfer(smit):
    """Feature extraction, linear probes and CKA read the pretrained method; they must see what the fine-tuned
    SwinUNETRNet's encoder computes from the transferred weights."""
    net = SwinUNETRNet(1, 3, **smit.downstream_architecture()["arch_kwargs"]).eval()
    net.load_state_dict(smit.downstream_state_dict(), strict=False)
    x = torch.randn(1, 1, *smit.patch_size)
    with torch.inference_mode():
        ours, theirs = encoder_stage_features(smit.eval(), x), DownstreamEncoder(net)(x)
    assert len(ours) == len(theirs) == 5
    smit.train()
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b)
