"""Mask utilities: per-sample seeded cell masks, pyramids, bottom-up masks, exact visible-token counts."""
import torch

from ssl3d.sparse import (bottom_up_masks, mask_pyramid, random_cell_mask, upsample_mask,
                          visible_token_indices)


def test_random_cell_mask_exact_count_per_sample_and_seeded():
    m = random_cell_mask(4, (3, 4, 5), 0.75, generator=torch.Generator().manual_seed(0))
    assert m.shape == (4, 3, 4, 5) and m.dtype == torch.bool
    assert (m.flatten(1).sum(1) == 15).all()              # 60 cells, 45 masked, in every sample
    assert not torch.equal(m[0], m[1])                     # different mask per sample
    m2 = random_cell_mask(4, (3, 4, 5), 0.75, generator=torch.Generator().manual_seed(0))
    assert torch.equal(m, m2)
    assert random_cell_mask(2, 2, 0.0).all() and not random_cell_mask(2, 2, 1.0).any()


def test_upsample_and_anisotropic_pyramid():
    cells = random_cell_mask(2, (2, 3, 4), 0.5, generator=torch.Generator().manual_seed(1))
    full = upsample_mask(cells, (8, 12, 8))                 # cell 4 x 4 x 2
    assert torch.equal(full[:, ::4, ::4, ::2], cells)
    assert torch.equal(full, cells.repeat_interleave(4, 1).repeat_interleave(4, 2).repeat_interleave(2, 3))
    pyr = mask_pyramid(cells, (4, 4, 2), [1, (2, 2, 1), 2])
    assert [tuple(p.shape[1:]) for p in pyr] == [(8, 12, 8), (4, 6, 8), (2, 3, 4)]
    assert torch.equal(pyr[-1], cells)
    assert torch.equal(pyr[1], upsample_mask(cells, (4, 6, 8)))


def test_bottom_up_masks_map_token_grid_to_every_stage():
    bu = bottom_up_masks(3, (3, 3, 3), 0.75, [1, 2, 2, (2, 2, 1)], generator=torch.Generator().manual_seed(2))
    assert bu.token_mask.shape == (3, 3, 3, 3)
    assert [tuple(s.shape[1:]) for s in bu.stage_masks] == [(24, 24, 12), (12, 12, 6), (6, 6, 3), (3, 3, 3)]
    assert tuple(bu.input_mask.shape[1:]) == (24, 24, 12)
    for s in bu.stage_masks + [bu.input_mask]:
        assert torch.equal(upsample_mask(bu.token_mask, s.shape[1:]), s)
        assert torch.equal(s[:, ::s.shape[1] // 3, ::s.shape[2] // 3, ::s.shape[3] // 3], bu.token_mask)


def test_visible_token_indices_counts_per_sample_not_batch():
    m = torch.zeros(3, 2, 2, 2, dtype=torch.bool)
    m[0].view(-1)[[1, 5]] = True
    m[1].view(-1)[[0, 2, 3, 7]] = True                     # unequal counts: 2, 4, 0
    vis = visible_token_indices(m)
    assert vis.counts.tolist() == [2, 4, 0]
    assert vis.index.shape == (3, 4)
    assert vis.index[0, :2].tolist() == [1, 5] and vis.padding[0].tolist() == [False, False, True, True]
    assert vis.index[1].tolist() == [0, 2, 3, 7] and not vis.padding[1].any()
    assert vis.padding[2].all()
    eq = visible_token_indices(random_cell_mask(5, (3, 3, 3), 0.75, generator=torch.Generator().manual_seed(3)))
    assert (eq.counts == 7).all() and not eq.padding.any() and eq.index.shape == (5, 7)
