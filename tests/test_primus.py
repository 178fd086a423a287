"""``mae`` pretrains dna's official Primus: same modules and keys, visible tokens only, and what it exports is built
and loaded by stock nnU-Net's own builder and ``-pretrained_weights`` loader."""
import json
from types import SimpleNamespace

import pytest
import torch

from conftest import blob_batch
from ssl3d.architectures.primus import PRIMUS_SIZES, primus_feature_map
from ssl3d.training.methods import build_method

PATCH, CELL = (16, 32, 32), (4, 8, 8)


def tiny_mae(seed=0):
    torch.manual_seed(seed)
    cfg = {"patch_size": list(PATCH), "ssl3d": {"mae_patch_size": list(CELL)}}
    return build_method("mae", {}, cfg, 1, size="tiny")


def _primus(arch, n_classes=3, **kw):
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    return get_network_from_plans(arch["network_class_name"], arch["arch_kwargs"], arch["_kw_requires_import"], 1,
                                  n_classes, **kw)


def test_mae_encoder_is_the_primus_encoder():
    from dynamic_network_architectures.architectures.primus import Primus

    m = tiny_mae().eval()
    net = _primus(m.downstream_architecture()).eval()  # eval: stochastic depth off
    assert type(net) is Primus
    sd = net.state_dict()
    head = {k for k in sd if k.startswith("up_projection.") or k == "mask_token"}
    assert set(m.downstream_state_dict()) == set(sd) - head and len(head) > 2
    net.load_state_dict({**sd, **m.downstream_state_dict()}, strict=True)
    x = blob_batch(0, shape=PATCH)
    seen = {}
    hook = net.eva.register_forward_hook(lambda mod, inp, out: seen.update(eva=out[0]))
    with torch.no_grad():
        net(x)  # Primus's own forward
        hook.remove()
        dense = m.encode(x, None)
        tokens, vis, grid = m.encode(x, torch.ones(2, *m.mask_grid(), dtype=torch.bool))
    ref = seen["eva"].transpose(1, 2).reshape(dense.shape)
    torch.testing.assert_close(dense, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(tokens.transpose(1, 2).reshape(dense.shape), ref, rtol=1e-5, atol=1e-6)
    assert dense.shape == (2, 48, *grid) and grid == (4, 4, 4)


def test_masked_tokens_never_influence_visible_outputs():
    """Unequal visible counts (padded batch): each sample's features equal its own run alone, and changing a
    masked patch (or a padded slot's token) changes nothing."""
    m = tiny_mae().eval()
    x = blob_batch(1, shape=PATCH)
    g = torch.Generator().manual_seed(0)
    vis = torch.rand(2, *m.mask_grid(), generator=g) < torch.tensor([0.3, 0.6]).view(2, 1, 1, 1)
    counts = vis.flatten(1).sum(1)
    assert counts[0] != counts[1]
    with torch.no_grad():
        feats, v = m.encode(x, vis)[:2]
        x2 = torch.where(torch.repeat_interleave(torch.repeat_interleave(torch.repeat_interleave(
            vis, 4, 1), 8, 2), 8, 3)[:, None], x, 50 * torch.randn_like(x))
        feats2 = m.encode(x2, vis)[0]
        for b in range(2):
            alone = m.encode(x[b:b + 1], vis[b:b + 1])[0][0]
            n = int(counts[b])
            torch.testing.assert_close(feats[b, :n], alone, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(feats2[b, :n], feats[b, :n], rtol=0, atol=0)
    assert not torch.equal(x, x2)


def test_presets_are_dnas_primus():
    """S/B/M/L carry the table dna's PrimusS/B/M/L read and their defaults; S builds PrimusS and what nnU-Net's
    nnUNet_Primus_S_Trainer builds exactly (every key and shape, on the meta device: no memory)."""
    import inspect

    import dynamic_network_architectures.architectures.primus as dna

    assert {k: (c["embed_dim"], c["eva_depth"], c["eva_numheads"]) for k, c in dna._PRIMUS_CONFIGS.items()} \
        == PRIMUS_SIZES
    cfg = {"patch_size": [64, 64, 64], "ssl3d": {"mae_patch_size": [16, 16, 16]}}
    from nnunetv2.training.nnUNetTrainer.primus.primus_trainers import nnUNet_Primus_S_Trainer

    with torch.device("meta"):
        m = build_method("mae", {}, cfg, 1, size="S")
        ours = _primus(m.downstream_architecture(), 2)
        theirs = dna.PrimusS(1, 2, (8, 8, 8), (64, 64, 64))
        stock = nnUNet_Primus_S_Trainer.build_network_architecture(None, SimpleNamespace(patch_size=[64] * 3), 1, 2)
    assert m.cell_size == (8, 8, 8)
    shapes = {k: v.shape for k, v in ours.state_dict().items()}
    assert shapes == {k: v.shape for k, v in theirs.state_dict().items()}
    assert shapes == {k: v.shape for k, v in stock.state_dict().items()}  # nnU-Net's own Primus-S fine-tuning
    kw = m.downstream_architecture()["arch_kwargs"]
    for size in PRIMUS_SIZES:
        defaults = inspect.signature(getattr(dna, f"Primus{size}")).parameters
        assert all(kw[k] == defaults[k].default for k in ("init_values", "scale_attn_inner"))
    assert ours.eva.blocks[-1].drop_path1.drop_prob == pytest.approx(0.2)  # nnU-Net's Primus trainers' setting


def test_anisotropic_plans_give_anisotropic_tokens():
    """5 x 0.8 x 0.8 mm plans (MAE patch 4x16x16) -> 2x8x8 tokens, not 8^3 tokens 4x deeper than wide; Primus's
    patch decoder and the dense encoder handle the grid (meta device)."""
    cfg = {"patch_size": [32, 128, 128], "ssl3d": {"mae_patch_size": [4, 16, 16]}}
    with torch.device("meta"):
        m = build_method("mae", {}, cfg, 1, size="S")
        net = _primus(m.downstream_architecture(), 2)
        out, feats = net(torch.empty(1, 1, 32, 128, 128)), m.encode(torch.empty(1, 1, 32, 128, 128), None)
    assert m.cell_size == (2, 8, 8) and feats.shape == (1, 396, 16, 16, 16)
    assert out.shape == (1, 2, 32, 128, 128)


def test_stock_nnunet_builds_our_plans_and_loads_the_export(tmp_path):
    """Plans written as ssl_finetune writes them -> nnU-Net's PlansManager + get_network_from_plans (and the
    fine-tuning trainer's builder) give dna's Primus; the export loads with nnU-Net's -pretrained_weights loader and
    strictly, with the pretrained encoder in place."""
    from nnunetv2.run.load_pretrained_weights import load_pretrained_weights
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from ssl3d.planning.plan_transfer import finetune_plans
    from ssl3d.planning.planner import build_plans
    from ssl3d.training.export import export_weights
    from ssl3d.training.finetuning.trainer import SSLFinetuneTrainer

    fp = {"spacings": [[2.0, 1.0, 1.0]] * 4, "shapes_after_crop": [[64, 128, 128]] * 4, "modalities": {"0": "CT"},
          "channel_names": {"0": "CT"}, "median_relative_size_after_cropping": 1.0,
          "foreground_intensity_properties_per_channel": {"0": {}}}
    pplans = build_plans(fp, "Dataset999_Pool", patch_size=list(PATCH))
    cfg = pplans["configurations"]["3d_fullres"]
    m = build_method("mae", pplans, cfg, 1, size="tiny")
    with torch.no_grad():
        for p in m.parameters():  # weights no initialisation would give
            p.add_(torch.randn_like(p))
    plans = finetune_plans(pplans, m.downstream_architecture(), "Dataset998_Seg", "ssl3d_maePlans", {}, m.patch_size)
    plans = json.loads(json.dumps(plans))  # as nnU-Net reads it from disk
    cm = PlansManager(plans).get_configuration("3d_fullres")
    assert cm.network_arch_class_name == "dynamic_network_architectures.architectures.primus.Primus"
    assert cm.network_arch_init_kwargs["input_shape"] == cm.patch_size == list(PATCH)
    net = get_network_from_plans(cm.network_arch_class_name, cm.network_arch_init_kwargs,
                                 cm.network_arch_init_kwargs_req_import, 1, 3)
    built = SSLFinetuneTrainer.build_network_architecture(PlansManager(plans), cm, 1, 3, True)
    assert type(built) is type(net)
    # a pretraining results folder as MAEPretrainer leaves it: the method's full state in the checkpoint
    (tmp_path / "fold_0").mkdir()
    (tmp_path / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}}))
    (tmp_path / "plans.json").write_text(json.dumps(pplans))
    (tmp_path / "ssl_method.json").write_text(json.dumps({"name": "mae", "method_kwargs": {"size": "tiny"}}))
    torch.save({"network_weights": m.state_dict()}, tmp_path / "fold_0" / "checkpoint_final.pth")
    out = tmp_path / "w.pth"
    res = export_weights(tmp_path, out, num_classes=3)
    assert res["encoder_tensors"] == len(m.downstream_state_dict())
    load_pretrained_weights(net, str(out))
    net.load_state_dict(torch.load(out, weights_only=False)["network_weights"], strict=True)
    sd = net.state_dict()
    assert all(torch.equal(sd[k], v) for k, v in m.downstream_state_dict().items())
    x = blob_batch(2, shape=PATCH)
    m.eval(), net.eval()
    with torch.no_grad():
        torch.testing.assert_close(primus_feature_map(net, x), m.encode(x, None), rtol=1e-5, atol=1e-5)
        assert net(x).shape == (2, 3, *PATCH)
