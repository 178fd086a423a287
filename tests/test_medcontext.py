"""MedContextTrainer pieces: options, tube/cell masks, token substitution, EMA schedule, consistency term, and a
two-rank gloo DDP run that keeps student, teacher and mask token identical across ranks."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import make_raw_dataset, subprocess_env
from ssl3d.training.finetuning.medcontext import (MaskedStudent, MedContextOptions, apply_mask, cell_grid,
                                                  draw_visible, ema_momentum, mask_cells, relative_consistency,
                                                  step_generator)

BIN = Path(sys.executable).parent


def test_medcontext_ema_schedule_on_global_step():
    assert ema_momentum(0, 1000) == pytest.approx(0.996)
    assert ema_momentum(1000, 1000) == pytest.approx(1.0)
    assert ema_momentum(500, 1000) == pytest.approx(0.998)
    vals = [ema_momentum(s, 1000) for s in range(0, 1001, 50)]
    assert all(b >= a for a, b in zip(vals, vals[1:]))
    # epoch 3, iteration 7 of 250 is global step 757, whatever the batch index inside the epoch says
    assert ema_momentum(3 * 250 + 7, 10 * 250) != ema_momentum(7, 10 * 250)


def test_medcontext_masks_and_consistency_term():
    x = torch.randn(4, 1, 16, 32, 32)
    token = torch.full((1,), 7.0)
    xm, vis = mask_cells(x, (4, 8, 8), 0.4, token, torch.Generator().manual_seed(0))
    n = vis[0].numel()
    assert (vis.flatten(1).sum(1) == n - round(0.4 * n)).all()
    assert len({tuple(v.flatten().tolist()) for v in vis}) == 4, "one mask per sample"
    assert ((xm == 7.0).float().mean() - 0.4).abs() < 0.02
    t = torch.randn(2, 3, 4, 4, 4)
    assert relative_consistency(t, t) == 0
    assert relative_consistency(2 * t, t) == pytest.approx(1.0)
    assert relative_consistency(torch.zeros_like(t), t) == pytest.approx(1.0)


def test_options_default_cell_16_and_validation():
    opts = MedContextOptions.from_plans({})
    assert opts.cell == (16, 16, 16) and opts.tube_axis is None and opts.ratio == 0.4 and opts.beta == 0.5
    opts = MedContextOptions.from_plans({"medcontext_cell": [4, 8, 8], "medcontext_tube_axis": 2})
    assert opts.cell == (4, 8, 8) and opts.tube_axis == 2
    for bad in ({"medcontext_tube_axis": 3}, {"medcontext_cell": 0}, {"medcontext_ratio": 1.5}):
        with pytest.raises(ValueError):
            MedContextOptions.from_plans(bad)


def test_cell_grid_default_16_clipped_to_patch():
    assert cell_grid((32, 64, 48)) == (2, 4, 3), "16³ cells by default, not the encoder's total stride"
    assert cell_grid((8, 64, 40)) == (1, 4, 2), "a cell larger than the patch is clipped to it; whole cells only"
    assert cell_grid((32, 64, 48), 8, tube_axis=1) == (4, 1, 6)
    opts = MedContextOptions.from_plans({})
    assert draw_visible(3, (8, 64, 40), opts, torch.Generator().manual_seed(0)).shape == (3, 1, 4, 2)


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_tube_masks_constant_along_axis_with_exact_ratio_per_sample(axis):
    x = torch.randn(5, 2, 16, 32, 24)
    token = torch.tensor([100.0, -100.0])
    xm, vis = mask_cells(x, 8, 0.4, token, torch.Generator().manual_seed(axis), tube_axis=axis)
    assert vis.shape[axis + 1] == 1
    n = vis[0].numel()
    n_masked = round(0.4 * n)
    assert ((~vis).flatten(1).sum(1) == n_masked).all(), "exact masked-cell count in every sample"
    masked = xm[:, 0] == 100.0  # (B, Z, Y, X) voxel mask
    ref = masked.narrow(axis + 1, 0, 1)
    assert torch.equal(masked, ref.expand_as(masked)), "the same 2D mask on every slice along the tube axis"
    # whole cells: the voxel ratio of every sample equals its cell ratio exactly
    assert torch.equal(masked.flatten(1).float().mean(1), torch.full((5,), n_masked / n))
    assert len({tuple(v.flatten().tolist()) for v in vis}) > 1, "one mask per sample"


def test_masked_voxels_get_the_token_and_visible_voxels_are_untouched():
    x = torch.randn(2, 3, 16, 16, 16)
    token = torch.tensor([1.5, -2.0, 3.25])
    visible = draw_visible(2, x.shape[2:], MedContextOptions(ratio=0.5, cell=(4, 8, 8)),
                           torch.Generator().manual_seed(1))
    xm = apply_mask(x, visible, token)
    keep = visible.repeat_interleave(4, 1).repeat_interleave(8, 2).repeat_interleave(8, 3)[:, None].expand_as(x)
    assert torch.equal(xm[keep], x[keep])
    assert torch.equal(xm.permute(0, 2, 3, 4, 1)[~keep[:, 0]], token.expand(int((~keep[:, 0]).sum()), 3))
    assert 0 < (~keep).float().mean() < 1
    # the token gets a gradient only through masked voxels
    tok = token.clone().requires_grad_()
    apply_mask(x, visible, tok).sum().backward()
    assert torch.equal(tok.grad, torch.full((3,), float((~visible).sum() * 4 * 8 * 8)))


def test_masks_reproducible_from_seed_rank_and_global_step():
    opts = MedContextOptions(cell=(4, 8, 8))

    def draw(seed, rank, step):
        return draw_visible(4, (16, 32, 32), opts, step_generator(seed, rank, step))

    assert torch.equal(draw(1, 0, 57), draw(1, 0, 57)), "a resumed run redraws the same masks"
    assert not torch.equal(draw(1, 0, 57), draw(1, 0, 58))
    assert not torch.equal(draw(1, 0, 57), draw(1, 1, 57)), "ranks draw different masks"
    assert not torch.equal(draw(1, 0, 57), draw(2, 0, 57))


def test_masked_student_state_dict_is_the_plain_networks():
    net = torch.nn.Sequential(torch.nn.Conv3d(2, 3, 1))
    student = MaskedStudent(net, 2)
    assert set(student.state_dict()) == set(net.state_dict()) == {"0.weight", "0.bias"}
    assert any(p is student.mask_token for p in student.parameters()), "DDP, clipping and the optimizer see it"
    fresh = torch.nn.Sequential(torch.nn.Conv3d(2, 3, 1))
    fresh.load_state_dict(student.state_dict())  # strict, as nnU-Net's predictor loads network_weights
    student.load_state_dict(torch.nn.Sequential(torch.nn.Conv3d(2, 3, 1)).state_dict())
    assert not torch.equal(net[0].weight, fresh[0].weight)
    x = torch.randn(1, 2, 8, 8, 8)
    out, out_masked = student(x, torch.zeros(1, 2, 2, 2, dtype=torch.bool))
    assert torch.equal(out, net(x)) and torch.equal(student(x), out)
    assert torch.allclose(out_masked, net(torch.zeros_like(x)))  # token starts at zero


@pytest.fixture(scope="module")
def tiny_labeled(tmp_path_factory):
    """3 labeled cases, nnU-Net planned and preprocessed, plans shrunk to a tiny U-Net and a 16×32×32 patch."""
    root = tmp_path_factory.mktemp("medcontext")
    env = subprocess_env(root / "raw", root / "pre", root / "res", n_proc_da="1")
    for k in ("pre", "res"):
        (root / k).mkdir()
    make_raw_dataset(root / "raw", 803, "MedCtx", n=3, labels=True)
    r = subprocess.run([str(BIN / "nnUNetv2_plan_and_preprocess"), "-d", "803", "-c", "3d_fullres", "-np", "1",
                        "-npfp", "1"], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    pre = root / "pre" / "Dataset803_MedCtx"
    plans = json.loads((pre / "nnUNetPlans.json").read_text())
    cfg = plans["configurations"]["3d_fullres"]
    cfg.update(patch_size=[16, 32, 32], batch_size=4)
    cfg["architecture"]["arch_kwargs"].update(
        n_stages=3, features_per_stage=[4, 8, 8], kernel_sizes=[[3, 3, 3]] * 3,
        strides=[[1, 1, 1], [2, 2, 2], [2, 2, 2]], n_conv_per_stage=[1, 1, 1], n_conv_per_stage_decoder=[1, 1])
    cfg["ssl3d_finetune"] = {"num_epochs": 1, "num_iterations_per_epoch": 3, "num_val_iterations_per_epoch": 1,
                             "final_validation": False, "medcontext_cell": 8, "medcontext_tube_axis": 0}
    (pre / "nnUNetPlans.json").write_text(json.dumps(plans, indent=1))
    # written up front: two ranks writing nnU-Net's split file at the same time could race
    (pre / "splits_final.json").write_text(json.dumps([{"train": ["case000", "case001"], "val": ["case002"]}]))
    return {"env": dict(env, nnUNet_n_proc_DA="0"), "dataset": pre.name}


@pytest.mark.slow
def test_ddp_gloo_two_ranks_keep_student_teacher_and_token_identical(tiny_labeled, tmp_path):
    out = tmp_path / "ddp.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29541",
           str(Path(__file__).parent / "medcontext_ddp_worker.py"), str(out), tiny_labeled["dataset"]]
    r = subprocess.run(cmd, env=tiny_labeled["env"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    res = json.loads(out.read_text())
    assert res["world"] == 2 and res["batch_per_rank"] == 2 and res["global_step"] == 3
    assert res["tube_axis"] == 0 and res["cell"] == [8, 8, 8], "options come from the plans"
    assert res["student_diff"] == 0.0 and res["teacher_diff"] == 0.0 and res["token_diff"] == 0.0
    assert res["student_moved"] > 0 and res["token_moved"] > 0, "the mask token is trained"
    assert res["teacher_lags_student"] > 0, "the teacher is an EMA, not a copy"
    assert not res["token_in_network_weights"] and res["checkpoint_weights_equal"]
    assert res["checkpoint_token_equal"] and res["checkpoint_teacher_equal"]
    assert res["reload_restores_token_and_teacher"]
