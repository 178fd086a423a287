"""MiM: nested level volumes come from masked cells, boxes compose exactly, no leak across the mask, learning."""
import pytest
import torch

from conftest import blob_batch
from ssl3d.training.methods.mim import crop_boxes
from test_pretraining import TINY, tiny_method


def test_crop_boxes_cuts_exact_voxels_at_native_resolution():
    x = torch.arange(2 * 8 * 8 * 8, dtype=torch.float32).reshape(2, 1, 8, 8, 8)
    boxes = torch.tensor([[[0.5, 0.0, 0.25], [0.5, 0.5, 0.5]], [[0.0, 0.5, 0.5], [0.5, 0.5, 0.5]]])
    out = crop_boxes(x, boxes, (4, 4, 4))
    assert torch.allclose(out[0], x[0, :, 4:8, 0:4, 2:6], atol=1e-4)
    assert torch.allclose(out[1], x[1, :, 0:4, 4:8, 4:8], atol=1e-4)


def test_finer_levels_are_masked_cells_of_their_parents():
    m = tiny_method("mim")  # 3 levels, gamma 2, token grid 4x4x4
    g = torch.Generator().manual_seed(0)
    x = blob_batch(0, shape=m.data_patch_size)
    visible = m.random_mask(2, 0.6, g)
    boxes = torch.tensor([[[0.0] * 3, [1.0] * 3]]).repeat(2, 1, 1)
    masks, grid = [visible], torch.tensor(visible.shape[1:]).float()
    for level in range(2):
        child, parent, cell = m._children(boxes, masks[-1], 2, g)
        per = masks[-1].shape[0] // 2
        assert child.shape[0] == 2 * m.opts["gamma"]
        assert torch.equal(parent // per, torch.arange(2).repeat_interleave(m.opts["gamma"])), "children of own sample"
        flat = masks[-1].reshape(masks[-1].shape[0], -1)
        assert not flat[parent, cell].any(), "level l+1 volumes must come from MASKED level-l cells"
        pairs = list(zip(parent.tolist(), cell.tolist()))
        assert len(set(pairs)) == len(pairs), "drawn without replacement"
        idx = torch.stack([cell // 16, (cell // 4) % 4, cell % 4], -1).float()
        pb = boxes[parent]
        assert torch.allclose(child[:, 0], pb[:, 0] + idx / grid * pb[:, 1])
        assert torch.allclose(child[:, 1], pb[:, 1] / 4)
        assert (child[:, 0] >= pb[:, 0] - 1e-6).all() and (child[:, 0] + child[:, 1] <= pb[:, 0] + pb[:, 1] + 1e-6).all()
        boxes = child
        masks.append(m.random_mask(child.shape[0], 0.6, g))
    vols, lmasks, links = m.build_levels(x, visible, torch.Generator().manual_seed(1))
    assert [v.shape[0] for v in vols] == [2, 4, 4] and len(links) == 2
    assert all(tuple(v.shape[2:]) == m.patch_size for v in vols)
    assert all(int((~k).reshape(k.shape[0], -1).sum(1).unique().numel()) == 1 for k in lmasks), "same ratio per level"


def _mim(**overrides):
    from ssl3d.training.methods import build_method
    from test_pretraining import ARCH

    cfg = {"patch_size": [16, 32, 32], "architecture": ARCH, "ssl3d": {"hybrid_junction_stage": 3}}
    return build_method("mim", {}, cfg, 1, **dict(TINY["mim"], **overrides))


def test_level_one_is_the_loaded_crop_resized():
    m = tiny_method("mim")
    big = _mim(level1_scale=2.0)
    assert big.data_patch_size == (32, 64, 64) and m.data_patch_size == m.patch_size
    x = blob_batch(0, shape=big.data_patch_size)
    assert tuple(big.input_view(x).shape[2:]) == (16, 32, 32)
    loss = big(x, big.random_mask(2, 0.6, torch.Generator().manual_seed(0)), generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(loss)


def test_masked_voxels_of_any_level_never_reach_any_output():
    """Predictions, context vectors and region features depend on the visible voxels of their own volume only."""
    m = tiny_method("mim").eval()
    g = torch.Generator().manual_seed(3)
    vols, masks, _ = m.build_levels(blob_batch(1), m.random_mask(2, 0.6, g), g)
    v, k = torch.cat(vols), torch.cat(masks)
    from ssl3d.sparse import upsample_mask

    keep = upsample_mask(k, v.shape[2:])[:, None]
    v2 = torch.where(keep, v, torch.randn_like(v) * 100)
    with torch.no_grad():
        outs = []
        for vol in (v, v2):
            feats = m.encode(vol, k)
            outs.append((m.decoder(m.densify(feats, k)), m.context_vectors(feats[-1], k),
                         m.region_features(feats[-1], k)))
    for a, b in zip(*outs):
        assert torch.allclose(a, b, atol=1e-4), "masked content leaked"


def test_reconstruction_and_alignment_learn():
    torch.manual_seed(0)
    m = tiny_method("mim")
    opt = torch.optim.AdamW(m.parameters(), 1e-3)
    g = torch.Generator().manual_seed(1)
    recon, align = [], []
    for i in range(40):
        loss = m(blob_batch(i % 4), m.random_mask(2, 0.6, g), generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
        recon.append(m.stats["mim_reconstruction"])
        align.append(m.stats["mim_alignment"])
    assert sum(recon[-8:]) / 8 < 0.8 * sum(recon[:4]) / 4
    assert sum(align[-8:]) / 8 < sum(align[:4]) / 4, "cross-level InfoNCE should start to fall"
    assert m.stats["mim_context_embedding_std"] > 1e-4, "context vectors collapsed"


def test_byol_variant_trains_its_predictor():
    m = _mim(alignment="byol")
    g = torch.Generator().manual_seed(0)
    loss = m(blob_batch(0), m.random_mask(2, 0.6, g), generator=g)
    loss.backward()
    assert 0 <= m.stats["mim_alignment"] <= 4
    assert m.predictor[0].weight.grad is not None and m.predictor[0].weight.grad.abs().sum() > 0
    assert m.region_proj[0].weight.grad.abs().sum() > 0, "the region side learns through the symmetric term"
    with pytest.raises(ValueError):
        _mim(alignment="nope")
