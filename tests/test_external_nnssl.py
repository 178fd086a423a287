"""nnssl checkpoints in (ResEnc, Primus: keys, positional embedding, stem channels, loud failures), nnssl-style
exports out (round trip), and one stock nnU-Net fine-tuning epoch from an imported nnssl ResEnc checkpoint."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_raw_dataset, subprocess_env
from nnssl_layout import (PRIMUS_KEYS, TINY_PRIMUS, TINY_RESENC, adaptation_plan, checkpoint, primus_checkpoint,
                          resenc_checkpoint)

from ssl3d.training.export import downstream_network, write_downstream_weights
from ssl3d.training.external import (PretrainedSource, for_downstream, interpolate_pos_embed, known_formats,
                                     load_pretrained)
from ssl3d.training.external.nnssl import NNSSL_EXPORTABLE, write_nnssl_checkpoint
from ssl3d.utils import BadInputError

BIN = Path(sys.executable).parent


@pytest.fixture
def tiny_primus_preset(monkeypatch):
    """nnssl names Primus by preset (S/B/M/L); a tiny stand-in for 'PrimusS' keeps the test cheap."""
    from dynamic_network_architectures.architectures import primus

    monkeypatch.setitem(primus._PRIMUS_CONFIGS, "S", dict(TINY_PRIMUS))


def save(tmp_path, name, obj):
    torch.save(obj, tmp_path / name)
    return tmp_path / name


def test_resenc_import_key_by_key(tmp_path):
    ck = resenc_checkpoint()
    src = load_pretrained(save(tmp_path, "resenc.pth", ck))
    assert src.kind == "nnssl" and src.method_name == "nnssl_ResidualEncoderUNet" and src.method is None
    w = ck["network_weights"]
    encoder = {k for k in w if k.startswith(("encoder.stages.", "encoder.stem."))}
    assert set(src.encoder_state) == encoder and all(torch.equal(src.encoder_state[k], w[k]) for k in encoder)
    cfg = src.plans["configurations"]["3d_fullres"]
    assert cfg["spacing"] == [1.0, 1.0, 1.0] and cfg["normalization_schemes"] == ["ZScoreNormalization"]
    assert src.patch_size == (16, 32, 32) and src.architecture["arch_kwargs"]["features_per_stage"] == [4, 8, 16]
    net = downstream_network(src, 3)
    sd = net.state_dict()
    assert all(torch.equal(sd[k], w[k]) for k in encoder)
    fresh = [k for k in sd if k.startswith("decoder.") and not k.startswith("decoder.encoder.") and k in w]
    assert fresh and not any(torch.equal(sd[k], w[k]) for k in fresh if w[k].numel() > 8), "decoder from scratch"
    # DDP / torch.compile prefixes are the same checkpoint
    ck2 = dict(ck, network_weights={f"module.{k}": v for k, v in w.items()})
    assert set(load_pretrained(save(tmp_path, "ddp.pth", ck2)).encoder_state) == encoder


def test_resenc_l_preset_is_nnssls_network():
    """'ResEncL' (no arch_kwargs in the plan) -> nnssl's get_res_enc_l, with dna's own key paths."""
    from ssl3d.architectures.from_plans import build_network_from_plans
    from ssl3d.training.external.nnssl import DOWNSTREAM_KEYS, _architecture

    arch, dna = _architecture(Path("x.pth"), {"arch_class_name": "ResEncL"}, {}, [160, 160, 160])
    with torch.device("meta"):
        net = build_network_from_plans(arch, 1, 2)
    assert (net.key_to_encoder, net.key_to_stem) == DOWNSTREAM_KEYS[dna]
    assert [len(s.blocks) for s in net.encoder.stages] == [1, 3, 4, 6, 6, 6]
    assert net.encoder.stages[-1].output_channels == 320
    assert tuple(net.keys_to_in_proj) == ("encoder.stem.convs.0.conv", "encoder.stem.convs.0.all_modules.0")


def test_primus_import_and_positional_embedding(tmp_path, tiny_primus_preset):
    ck = primus_checkpoint(patch=(16, 16, 16), recommended=(16, 32, 32), embed=(4, 4, 4))
    w = ck["network_weights"]
    pristine = load_pretrained(save(tmp_path, "primus.pth", ck))
    assert pristine.patch_size == (16, 16, 16) and all(torch.equal(pristine.encoder_state[k], w[k])
                                                       for k in pristine.encoder_state)
    src = for_downstream(pristine)  # the recommended downstream patch
    assert src.method_name == "nnssl_PrimusS" and src.patch_size == (16, 32, 32)
    kw = src.architecture["arch_kwargs"]
    assert kw["input_shape"] == [16, 32, 32] and kw["patch_embed_size"] == [4, 4, 4]
    assert kw["init_values"] == 0.1 and kw["scale_attn_inner"] is True  # as the pretrained blocks carry them
    moved = {k for k in w if k.startswith(("eva.", "down_projection."))}
    assert set(src.encoder_state) == moved
    assert all(torch.equal(src.encoder_state[k], w[k]) for k in moved if k != "eva.pos_embed")
    pe = src.encoder_state["eva.pos_embed"]
    assert pe.shape == (1, 4 * 8 * 8, TINY_PRIMUS["embed_dim"])
    ref = torch.nn.functional.interpolate(w["eva.pos_embed"].transpose(1, 2).reshape(1, -1, 4, 4, 4),
                                          size=(4, 8, 8), mode="trilinear", align_corners=False)
    assert torch.allclose(pe, ref.flatten(2).transpose(1, 2))
    net = downstream_network(src, 2)
    assert torch.equal(net.state_dict()["eva.pos_embed"], pe)
    with torch.no_grad():
        assert net(torch.randn(1, 1, 16, 32, 32)).shape == (1, 2, 16, 32, 32)
    # at the pretraining patch: exactly the pretrained embedding, nothing resampled
    same = for_downstream(pristine, patch_size=(16, 16, 16))
    assert same is pristine and same.architecture["arch_kwargs"]["input_shape"] == [16, 16, 16]
    with pytest.raises(BadInputError, match="not a multiple of the token size"):
        for_downstream(pristine, patch_size=(16, 30, 32))


def test_interpolated_embedding_keeps_values_at_the_original_grid():
    """An embedding affine in the token's physical centre is resampled exactly wherever no border clamps it: the
    new tokens carry the values the pretrained grid has at their centres (align_corners=False geometry)."""
    grid, new = (3, 4, 5), (6, 4, 10)
    centres = torch.stack(torch.meshgrid(*[torch.arange(g) + 0.5 for g in grid], indexing="ij"), -1)
    a = torch.tensor([[1.0, -2.0], [0.5, 3.0], [-1.0, 0.25]])
    pe = (centres.reshape(-1, 3) @ a + 7.0)[None]
    out = interpolate_pos_embed(pe, grid, new).reshape(*new, 2)
    scale = torch.tensor([g / n for g, n in zip(grid, new)])
    nc = torch.stack(torch.meshgrid(*[torch.arange(n) + 0.5 for n in new], indexing="ij"), -1) * scale
    interior = ((nc >= 0.5) & (nc <= torch.tensor(grid) - 0.5)).all(-1)
    assert interior.sum() > 20
    assert torch.allclose(out[interior], (nc @ a + 7.0)[interior], atol=1e-5)
    assert torch.equal(interpolate_pos_embed(pe, grid, grid), pe)


def test_stem_channels_repeated_and_averaged(tmp_path):
    ck = resenc_checkpoint()
    src = for_downstream(load_pretrained(save(tmp_path, "r.pth", ck)), n_channels=3)
    w = ck["network_weights"]["encoder.stem.convs.0.conv.weight"]
    for k in ("encoder.stem.convs.0.conv.weight", "encoder.stem.convs.0.all_modules.0.weight"):
        assert src.encoder_state[k].shape == (4, 3, 3, 3, 3)
        assert torch.allclose(src.encoder_state[k], w.repeat(1, 3, 1, 1, 1) / 3)
    cfg = src.plans["configurations"]["3d_fullres"]
    assert cfg["normalization_schemes"] == ["ZScoreNormalization"] * 3 and len(cfg["use_mask_for_norm"]) == 3
    # a 3-channel input whose channels all equal one image gives the pretrained stem's response
    one = load_pretrained(tmp_path / "r.pth")
    n1, n3 = downstream_network(one, 2).eval(), downstream_network(src, 2).eval()
    x = torch.randn(1, 1, 16, 32, 32)
    with torch.no_grad():
        assert torch.allclose(n1.encoder.stem(x), n3.encoder.stem(x.repeat(1, 3, 1, 1, 1)), atol=1e-5)


def _cli_export(path, out):
    from ssl3d.cli.finetune import export_main

    return export_main(["-p", str(path), "-o", str(out)])


@pytest.mark.parametrize("case", ["truncated", "unknown", "shape", "zero", "architecture"])
def test_bad_checkpoints_fail_in_one_line(tmp_path, capsys, case):
    good = save(tmp_path, "good.pth", resenc_checkpoint())
    ck = resenc_checkpoint()
    if case == "truncated":
        bad = tmp_path / "bad.pth"
        bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
        expect = "unreadable or truncated"
    else:
        if case == "unknown":
            ck = {"state_dict": ck["network_weights"]}
            expect = "unknown checkpoint format"
        elif case == "shape":
            ck["network_weights"]["encoder.stages.1.blocks.0.conv1.conv.weight"] = torch.zeros(5, 4, 3, 3, 3)
            expect = "shape mismatch"
        elif case == "zero":
            ck["nnssl_adaptation_plan"].update(key_to_encoder="backbone", key_to_stem="patch_embed")
            expect = "zero tensors"
        else:
            ck["nnssl_adaptation_plan"]["architecture_plans"]["arch_class_name"] = "NoSkipResEncL"
            expect = "not supported"
        bad = save(tmp_path, "bad.pth", ck)
    out = tmp_path / "w.pth"
    assert _cli_export(bad, out) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and expect in errors[0] and str(bad) in errors[0] and "Traceback" not in err
    err = errors[0]
    assert not out.exists()
    if case == "unknown":
        assert "nnssl" in err and "known" in err and set(known_formats()) >= {"nnssl"}


TINY_PLANS = {
    "dataset_name": "Dataset801_Pool", "plans_name": "ssl3dPlans", "original_median_spacing_after_transp": [2., 1., 1.],
    "original_median_shape_after_transp": [20, 48, 44], "image_reader_writer": "SimpleITKIO",
    "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2], "experiment_planner_used": "ssl3d",
    "label_manager": "LabelManager",
    "foreground_intensity_properties_per_channel": {"0": {"mean": 40.0, "std": 30.0, "percentile_00_5": -90.0,
                                                          "percentile_99_5": 200.0}},
    "configurations": {"3d_fullres": {
        "data_identifier": "ssl3dPlans_3d_fullres", "preprocessor_name": "DefaultPreprocessor", "batch_size": 2,
        "patch_size": [16, 32, 32], "median_image_size_in_voxels": [20., 48., 44.], "spacing": [2.0, 1.0, 1.0],
        "normalization_schemes": ["CTNormalization"], "use_mask_for_norm": [False],
        "resampling_fn_data": "resample_data_or_seg_to_shape", "resampling_fn_seg": "resample_data_or_seg_to_shape",
        "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
        "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None},
        "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
        "resampling_fn_probabilities_kwargs": {"is_seg": False, "order": 1, "order_z": 0, "force_separate_z": None},
        "batch_dice": False}}}


def ssl3d_source(name):
    from test_pretraining import tiny_method

    m = tiny_method(name)
    return PretrainedSource("ssl3d", Path(f"/results/{name}/fold_0/checkpoint_final.pth"), name, TINY_PLANS,
                            m.downstream_architecture(), m.patch_size, 1, m.downstream_state_dict(), m,
                            {"name": name})


@pytest.mark.parametrize("method", NNSSL_EXPORTABLE)
def test_nnssl_export_round_trip(tmp_path, method):
    src = ssl3d_source(method)
    direct = write_downstream_weights(src, tmp_path / "direct.pth", 3, seed=7)["file"]
    exported = write_nnssl_checkpoint(src, tmp_path / "nnssl.pth", seed=7)["file"]
    raw = torch.load(exported, map_location="cpu", weights_only=True)  # what nnssl's fine-tuning loads
    ap = raw["nnssl_adaptation_plan"]
    assert ap["architecture_plans"]["arch_class_name"] == "ResidualEncoderUNet"
    assert set(ap["architecture_plans"]["arch_kwargs_requiring_import"]) == {"conv_op", "norm_op", "nonlin"}
    assert ap["key_to_encoder"] == "encoder.stages" and ap["key_to_stem"] == "encoder.stem" and ap["key_to_lpe"] is None
    cfg = next(iter(ap["pretrain_plan"]["configurations"].values()))
    assert cfg["spacing"] == [2.0, 1.0, 1.0] and cfg["spacing_style"] == "median" and cfg["patch_size"] == [16, 32, 32]
    back = load_pretrained(exported)
    assert back.kind == "nnssl" and back.plans["configurations"]["3d_fullres"]["spacing"] == [2.0, 1.0, 1.0]
    again = write_downstream_weights(back, tmp_path / "again.pth", 3, seed=7)["file"]
    a = torch.load(direct, weights_only=False)["network_weights"]
    b = torch.load(again, weights_only=False)["network_weights"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    enc = src.encoder_state
    assert all(torch.equal(b[k], v) for k, v in enc.items())


def test_nnssl_export_refuses_other_methods(tmp_path):
    with pytest.raises(BadInputError, match="exports in the nnunet format only") as e:
        write_nnssl_checkpoint(ssl3d_source("mae"), tmp_path / "x.pth")
    assert "spark" in str(e.value) and not (tmp_path / "x.pth").exists()


@pytest.mark.slow
def test_stock_nnunet_finetunes_an_imported_nnssl_resenc(tmp_path):
    """2-channel labeled dataset, nnssl ResEnc pretrained on 1 channel with 'noresample' (spacing from the
    labeled data): ssl_finetune plans, preprocesses, writes the weights and runs stock nnUNetv2_train 1 epoch."""
    raw, pre, res = (tmp_path / k for k in ("raw", "pre", "res"))
    for d in (pre, res):
        d.mkdir()
    make_raw_dataset(raw, 803, "NnsslFt", n=4, n_channels=2, labels=True)
    ck = resenc_checkpoint(style="noresample", spacing=None)
    path = save(tmp_path, "openmind_resenc.pth", ck)
    env = subprocess_env(raw, pre, res)
    r = subprocess.run([str(BIN / "ssl_finetune"), "-d", "803", "-p", str(path), "-device", "cpu", "--epochs", "1",
                        "--iters", "1", "--val-iters", "1", "--no-final-val", "-np", "1", "--batch-size", "1"],
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (r.stdout[-1500:], r.stderr[-3000:])
    plans_name = "ssl3d_nnssl_ResidualEncoderUNetPlans"
    plans = json.loads((pre / "Dataset803_NnsslFt" / f"{plans_name}.json").read_text())
    cfg = plans["configurations"]["3d_fullres"]
    assert cfg["spacing"] == pytest.approx([4.0, 0.8, 0.8])  # the labeled data's median (noresample)
    assert cfg["normalization_schemes"] == ["ZScoreNormalization"] * 2
    weights = torch.load(pre / "Dataset803_NnsslFt" / f"{plans_name}__pretrained_weights.pth",
                         weights_only=False)["network_weights"]
    w = ck["network_weights"]
    assert torch.allclose(weights["encoder.stem.convs.0.conv.weight"],
                          w["encoder.stem.convs.0.conv.weight"].repeat(1, 2, 1, 1, 1) / 2)
    assert all(torch.equal(weights[k], v) for k, v in w.items() if k.startswith("encoder.stages."))
    out = res / "Dataset803_NnsslFt" / f"SSLFinetuneTrainer__{plans_name}__3d_fullres" / "fold_0"
    final = torch.load(out / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert final["current_epoch"] == 1
    assert cfg["ssl3d_finetune"]["pretrained_from"] == str(path)
    assert TINY_RESENC["features_per_stage"] == cfg["architecture"]["arch_kwargs"]["features_per_stage"]


def test_features_from_an_nnssl_checkpoint(tmp_path, tiny_primus_preset):
    """ssl_extract_features' encoder from a foreign file: the downstream encoder, loaded key by key."""
    import numpy as np

    from ssl3d.inference.features import embed_image, load_encoder

    enc = load_encoder(save(tmp_path, "r.pth", resenc_checkpoint()), n_channels=2)
    assert enc.stage_channels == [4, 8, 16] and enc.stage_strides[-1] == (4, 4, 4) and enc.in_channels == 2
    assert enc.describe()["method"] == "nnssl_ResidualEncoderUNet"
    out = embed_image(enc, np.random.default_rng(0).normal(size=(2, 16, 40, 36)).astype(np.float32))
    assert out["embedding"].shape == (16,) and np.isfinite(out["embedding"]).all()
    p = load_encoder(save(tmp_path, "p.pth", primus_checkpoint()))
    assert p.stage_channels == [TINY_PRIMUS["embed_dim"]] and p.patch_size == (16, 32, 32)
    with pytest.raises(BadInputError, match="no spacing"):
        load_encoder(save(tmp_path, "n.pth", resenc_checkpoint(style="noresample", spacing=None)))


def test_benchmark_takes_a_foreign_checkpoint_file(tmp_path):
    from ssl3d.cli.benchmark import _pretrained
    from ssl3d.evaluation.protocol import downstream_of, scratch_bases

    f = save(tmp_path, "openmind.pth", resenc_checkpoint())
    assert _pretrained([f"openmind={f}"]) == {"openmind": f}
    with pytest.raises(BadInputError, match="checkpoint file"):
        _pretrained([f"openmind={tmp_path / 'missing.pth'}"])
    assert downstream_of("openmind") == "openmind" and downstream_of("spark").endswith("ResidualEncoderUNet")
    assert scratch_bases(["spark", "openmind", "simclr"]) == ["spark", "openmind"]


def test_nnssl_primus_and_ssl3d_mae_share_one_network(tmp_path, monkeypatch):
    """An nnssl Primus checkpoint with the dims of ssl3d's mae loads into the network mae fine-tunes."""
    from dynamic_network_architectures.architectures import primus

    from ssl3d.architectures.from_plans import build_network_from_plans

    mae = ssl3d_source("mae")
    kw = mae.architecture["arch_kwargs"]
    monkeypatch.setitem(primus._PRIMUS_CONFIGS, "M", {"embed_dim": kw["embed_dim"], "eva_depth": kw["eva_depth"],
                                                      "eva_numheads": kw["eva_numheads"]})
    ck = checkpoint(dict(mae.encoder_state), adaptation_plan("PrimusM", None, PRIMUS_KEYS, mae.patch_size),
                    "BaseEvaMAETrainer")
    src = load_pretrained(save(tmp_path, "primus_m.pth", ck))
    assert src.architecture["network_class_name"] == mae.architecture["network_class_name"]
    ours = build_network_from_plans(mae.architecture, 1, 2).state_dict()
    theirs = downstream_network(src, 2).state_dict()
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}
    assert all(torch.equal(theirs[k], v) for k, v in mae.encoder_state.items())


def test_nnssl_export_of_a_foreign_or_transformer_source_is_one_line(tmp_path, capsys):
    from ssl3d.cli.finetune import export_main

    f = save(tmp_path, "r.pth", resenc_checkpoint())
    assert export_main(["-p", str(f), "-o", str(tmp_path / "o.pth"), "--format", "nnssl"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(err) == 1 and "spark, simclr, mocov2, byol, voco" in err[0] and not (tmp_path / "o.pth").exists()
    assert export_main(["-p", str(f), "-o", str(tmp_path / "w.pth")]) == 0  # the nnunet format takes it
    w = torch.load(tmp_path / "w.pth", weights_only=False)
    assert w["ssl3d"]["kind"] == "nnssl" and w["ssl3d"]["encoder_tensors"] == 68
