"""MONAI SwinUNETR SSL checkpoints into SwinUNETRNet: every layout variant, key by key, with the (X, Y, Z) ->
(Z, Y, X) conversion checked against the plain torch / MONAI forward it must reproduce."""
import pytest
import torch
import torch.nn.functional as F
from monai.networks.nets.swin_unetr import SwinTransformer

from ssl3d.architectures.from_plans import build_network_from_plans
from ssl3d.training.external import load_pretrained
from ssl3d.training.external.axes import (AxisOrderError, axis_permutation, convert_swin_state, merging_block_order,
                                          permute_conv_kernel, permute_spatial)
from ssl3d.training.external.coverage import check_encoder_state
from ssl3d.training.external.monai_swin import shrunk_window_stages
from ssl3d.utils import BadInputError

XYZ_TO_ZYX = axis_permutation("xyz", "zyx")
# SSLHead's encoder (window 7, depths 2-2-2-2, heads 3-6-12-24) at a tiny width; heads/window kept small for speed
TINY = dict(in_chans=1, embed_dim=12, window_size=(7,) * 3, patch_size=(2,) * 3, depths=(2, 2, 2, 2),
            num_heads=(1, 2, 2, 4), qkv_bias=True, mlp_ratio=4.0, downsample="merging")


def _randomize(swin: SwinTransformer) -> SwinTransformer:
    """Bias tables and norms far from their init, so a wrong permutation cannot hide."""
    torch.manual_seed(0)
    with torch.no_grad():
        for n, p in swin.named_parameters():
            if "relative_position_bias_table" in n:
                p.normal_(0, 1)
            elif "norm" in n:
                p.normal_(1.0 if n.endswith("weight") else 0.0, 0.3)
    return swin.eval()


@pytest.fixture(scope="module")
def ssl_swin():
    return _randomize(SwinTransformer(**TINY))


def _published_layout(swin):
    """model_swinvit.pt: ``{"state_dict": {"module.patch_embed...", "module.layers1.0.blocks.0.mlp.fc1..."}}``."""
    return {"state_dict": {"module." + k.replace("mlp.linear", "mlp.fc"): v for k, v in swin.state_dict().items()}}


def _pretrain_layout(swin, prefix="swinViT", module=True, wrap="state_dict"):
    """SwinUNETR/Pretrain's SSLHead (DDP-wrapped or not): encoder under ``swinViT``/``swin_vit`` plus heads."""
    dim = TINY["embed_dim"] * 16
    state = {f"{prefix}.{k}": v for k, v in swin.state_dict().items()}
    state.update({"rotation_head.weight": torch.randn(4, dim), "rotation_head.bias": torch.zeros(4),
                  "contrastive_head.weight": torch.randn(512, dim), "conv.0.weight": torch.randn(2, dim, 3, 3, 3)})
    state = {("module." if module else "") + k: v for k, v in state.items()}
    return {wrap: state, "epoch": 3} if wrap else state


def _network(src):
    return build_network_from_plans(src.architecture, src.n_channels, 3)


LAYOUTS = {"published": _published_layout, "swinViT+module": _pretrain_layout,
           "swin_vit": lambda s: _pretrain_layout(s, "swin_vit", module=False),
           "raw-model": lambda s: _pretrain_layout(s, wrap="model"),
           "bare-state_dict": lambda s: _pretrain_layout(s, "swin_vit", wrap=None)}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_every_layout_imports_key_by_key(ssl_swin, layout, tmp_path):
    path = tmp_path / "w.pt"
    torch.save(LAYOUTS[layout](ssl_swin), path)
    src = load_pretrained(path)
    assert src.kind == "monai_swinunetr" and src.n_channels == 1 and tuple(src.patch_size) == (96, 96, 96)
    assert src.architecture["arch_kwargs"] == {"feature_size": 12, "depths": [2, 2, 2, 2], "num_heads": [1, 2, 2, 4],
                                               "window_size": 7, "patch_size": 2}
    net = _network(src)
    cov = check_encoder_state(net.state_dict(), src.encoder_state)
    n_swin = len(ssl_swin.state_dict())
    assert cov["swinViT"] == (n_swin, n_swin) and sum(a for a, _ in cov.values()) == n_swin
    expected = convert_swin_state(ssl_swin.state_dict(), XYZ_TO_ZYX, (7, 7, 7), "monai<1.5", "merging")
    for k, v in expected.items():
        assert torch.equal(src.encoder_state["swinViT." + k], v), k
    assert src.info["axis_order"] == "xyz" and src.info["converted"] and src.info["merging_order"] == "monai<1.5"
    assert src.info["inexact_merging"] == [f"layers{i}.0.downsample" for i in range(1, 5)]
    assert ("rotation_head.weight" in src.info["skipped_keys"]) == (layout != "published")
    cfg = src.plans["configurations"]["3d_fullres"]
    assert cfg["spacing"] == [2.0, 1.5, 1.5] and cfg["normalization_schemes"] == ["CTWindowNormalization"]
    assert cfg["ssl3d"]["normalization_kwargs"][0]["window"] == [-1000.0, 1000.0]
    assert src.info["inexact_stages"] == ["layers4"]  # 96 / 16 = 6 tokens < window 7


def test_zyx_axis_order_loads_unconverted(ssl_swin, tmp_path):
    path = tmp_path / "w.pt"
    torch.save({**_published_layout(ssl_swin), "axis_order": "zyx", "merging_order": "merging"}, path)
    src = load_pretrained(path)
    assert not src.info["converted"] and not src.info["inexact_merging"]
    for k, v in ssl_swin.state_dict().items():
        assert torch.equal(src.encoder_state["swinViT." + k], v)


def test_file_patch_size_replaces_the_recipe_patch(ssl_swin, tmp_path):
    path = tmp_path / "w.pt"
    torch.save({**_published_layout(ssl_swin), "patch_size": [32, 64, 224]}, path)
    src = load_pretrained(path)
    assert tuple(src.patch_size) == (32, 64, 224)
    assert src.plans["configurations"]["3d_fullres"]["patch_size"] == [32, 64, 224]
    assert src.info["inexact_stages"] == ["layers3", "layers4"]  # z: 32 / 8 = 4 tokens < window 7 from stage 3
    torch.save({**_published_layout(ssl_swin), "patch_size": [96, 96, 100]}, path)
    with pytest.raises(BadInputError, match="multiples of 32"):
        load_pretrained(path)


def test_conv_kernel_permutation_matches_transposed_input():
    torch.manual_seed(1)
    x = torch.randn(2, 3, 6, 7, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 3, 2, 3, 5, dtype=torch.float64, requires_grad=True)
    ref = F.conv3d(x, w, stride=(1, 2, 1), padding=(1, 1, 2))
    got = F.conv3d(permute_spatial(x, XYZ_TO_ZYX), permute_conv_kernel(w, XYZ_TO_ZYX), stride=(1, 2, 1)[::-1],
                   padding=(1, 1, 2)[::-1])
    torch.testing.assert_close(got, permute_spatial(ref, XYZ_TO_ZYX))
    g = torch.randn_like(ref)
    gx, gw = torch.autograd.grad(ref, (x, w), g)
    hx, hw = torch.autograd.grad(got, (x, w), permute_spatial(g, XYZ_TO_ZYX))
    torch.testing.assert_close(hx, gx)
    torch.testing.assert_close(hw, gw)


def test_merging_block_order_follows_the_offsets():
    # MONAI's PatchMerging order 000,100,010,001,110,101,011,111: reversing the axes swaps 100<->001, 110<->011
    assert merging_block_order(XYZ_TO_ZYX, "merging") == [0, 3, 2, 1, 6, 5, 4, 7]
    assert merging_block_order((0, 1, 2), "mergingv2") == list(range(8))


def test_pre_1_5_patch_merging_follows_its_offsets_into_the_installed_merging():
    """Weights trained with MONAI < 1.5's PatchMerging (010 and 001 twice, 110 and 011 never) in MONAI's current
    one on the transposed array: the same function wherever the LayerNorm sees the same values, i.e. where 110
    repeats 010 and 011 repeats 001; MONAI's positional copy (load_from) is not."""
    from monai.networks.nets.swin_unetr import MERGING_MODE

    from ssl3d.training.external.axes import MERGING_OFFSETS, convert_patch_merging, merging_offsets

    assert merging_offsets(MERGING_MODE["merging"]) == MERGING_OFFSETS["merging"]  # read off MONAI's forward
    torch.manual_seed(2)
    c = 3
    old = torch.nn.ModuleDict({"norm": torch.nn.LayerNorm(8 * c),
                               "reduction": torch.nn.Linear(8 * c, 2 * c, bias=False)})
    with torch.no_grad():
        old["norm"].weight.normal_(1, 0.5)
        old["norm"].bias.normal_(0, 0.5)

    def old_forward(x):  # MONAI 1.4's PatchMerging.forward on (B, X, Y, Z, C)
        cat = torch.cat([x[:, a::2, b::2, k::2] for a, b, k in MERGING_OFFSETS["monai<1.5"]], -1)
        return old["reduction"](old["norm"](cat))

    x = torch.randn(2, 4, 6, 8, c)
    x[:, 1::2, 1::2, 0::2] = x[:, 0::2, 1::2, 0::2]
    x[:, 0::2, 1::2, 1::2] = x[:, 0::2, 0::2, 1::2]
    new = MERGING_MODE["merging"](dim=c).eval()
    w, b, r, exact = convert_patch_merging(old["norm"].weight.detach(), old["norm"].bias.detach(),
                                           old["reduction"].weight.detach(), XYZ_TO_ZYX, "monai<1.5", "merging")
    assert not exact
    new.load_state_dict({"norm.weight": w, "norm.bias": b, "reduction.weight": r})
    xt = x.permute(0, 3, 2, 1, 4)
    with torch.no_grad():
        ref, got = old_forward(x).permute(0, 3, 2, 1, 4), new(xt)
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
        positional = MERGING_MODE["merging"](dim=c).eval()
        positional.load_state_dict({"norm.weight": old["norm"].weight, "norm.bias": old["norm"].bias,
                                    "reduction.weight": old["reduction"].weight})
        assert (positional(x) - old_forward(x)).abs().max() > 0.1


def test_whole_encoder_is_the_same_function_of_the_transposed_input():
    """window 4 on a (64, 80, 96) input: no stage's map is smaller than the window, so the conversion is exact in
    every stage (shifted windows, padding, patch merging, bias tables)."""
    kw = {**TINY, "window_size": (4,) * 3}
    swin = _randomize(SwinTransformer(**kw))
    conv = SwinTransformer(**kw).eval()
    conv.load_state_dict(convert_swin_state(swin.state_dict(), XYZ_TO_ZYX, (4, 4, 4)))
    x = torch.randn(1, 1, 64, 80, 96)
    assert shrunk_window_stages(x.shape[2:], 4) == []
    with torch.no_grad():
        ref, got, naive = swin(x), conv(permute_spatial(x, XYZ_TO_ZYX)), swin(permute_spatial(x, XYZ_TO_ZYX))
    for r, g, n in zip(ref, got, naive):
        torch.testing.assert_close(g, permute_spatial(r, XYZ_TO_ZYX), atol=1e-4, rtol=1e-4)
        assert (n - permute_spatial(r, XYZ_TO_ZYX)).abs().max() > 0.1  # unconverted weights differ


def test_unknown_tensor_and_non_cubic_window_are_refused(ssl_swin):
    state = {**ssl_swin.state_dict(), "layers1.0.blocks.0.attn.mystery": torch.zeros(3, 3)}
    with pytest.raises(AxisOrderError, match="cannot tell whether Swin tensor layers1.0.blocks.0.attn.mystery"):
        convert_swin_state(state, XYZ_TO_ZYX, (7, 7, 7))
    with pytest.raises(AxisOrderError, match="not cubic"):
        convert_swin_state(ssl_swin.state_dict(), XYZ_TO_ZYX, (4, 4, 2))


def test_truncated_mismatched_and_bad_order_files_are_one_line(ssl_swin, tmp_path):
    good = tmp_path / "good.pt"
    torch.save(_published_layout(ssl_swin), good)
    cut = tmp_path / "cut.pt"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(BadInputError, match="unreadable or truncated") as e:
        load_pretrained(cut)
    assert "\n" not in str(e.value)
    state = _published_layout(ssl_swin)["state_dict"]
    no_stage4 = {k: v for k, v in state.items() if ".layers4." not in "." + k[len("module."):]}
    torch.save({"state_dict": no_stage4}, tmp_path / "s.pt")
    with pytest.raises(BadInputError, match="stage layers4 has blocks"):
        load_pretrained(tmp_path / "s.pt")
    torch.save({"state_dict": state, "axis_order": "yxz"}, tmp_path / "o.pt")
    with pytest.raises(BadInputError, match="axis order 'yxz'"):
        load_pretrained(tmp_path / "o.pt")
    # a wider qkv than the network built from the tensors: a shape mismatch, named
    bad = dict(state)
    bad["module.layers2.0.blocks.1.attn.qkv.weight"] = torch.zeros(73, 24)
    torch.save({"state_dict": bad}, tmp_path / "m.pt")
    src = load_pretrained(tmp_path / "m.pt")
    with pytest.raises(BadInputError, match="1 shape mismatches .*layers2.0.blocks.1.attn.qkv.weight"):
        check_encoder_state(_network(src).state_dict(), src.encoder_state)


@pytest.mark.slow
def test_one_stock_nnunet_epoch_from_an_imported_checkpoint(tmp_path):
    """ssl_finetune -p model_swinvit-style file: recipe plans, converted encoder, stock nnUNetv2_train (1 epoch)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    from conftest import subprocess_env

    bin_dir = Path(sys.executable).parent
    env = subprocess_env(tmp_path / "raw", tmp_path / "pre", tmp_path / "res")
    for k in ("pre", "res"):
        (tmp_path / k).mkdir()
    swin = _randomize(SwinTransformer(**{**TINY, "depths": (1, 1, 1, 1)}))
    ckpt = tmp_path / "model_swinvit.pt"
    torch.save({**_published_layout(swin), "patch_size": [32, 32, 64]}, ckpt)  # the recipe's 96^3 is slow on CPU
    for args in (["ssl_make_demo_data", "-o", str(tmp_path / "raw"), "--size", "tiny", "-nu", "1", "-nl", "2",
                  "--no-progress"],
                 ["ssl_finetune", "-d", "802", "-p", str(ckpt), "-device", "cpu", "--epochs", "1", "--iters", "1",
                  "--val-iters", "1", "--no-final-val", "-np", "1", "--batch-size", "1"]):
        r = subprocess.run([str(bin_dir / args[0]), *args[1:]], env=env, capture_output=True, text=True, timeout=900)
        assert r.returncode == 0, (args, r.stdout[-1500:], r.stderr[-3000:])
    assert "Loading pretrained weights" in r.stdout + r.stderr
    pre = tmp_path / "pre" / "Dataset802_SynthCTOrgans"
    plans = json.loads((pre / "ssl3d_monai_swinunetrPlans.json").read_text())
    cfg = plans["configurations"]["3d_fullres"]
    assert cfg["spacing"] == [2.0, 1.5, 1.5] and cfg["patch_size"] == [32, 32, 64]
    assert cfg["architecture"]["network_class_name"] == "ssl3d.architectures.swin.SwinUNETRNet"
    weights = torch.load(pre / "ssl3d_monai_swinunetrPlans__pretrained_weights.pth", weights_only=False)
    expected = convert_swin_state(swin.state_dict(), XYZ_TO_ZYX, (7, 7, 7), "monai<1.5", "merging")
    for k, v in expected.items():
        assert torch.equal(weights["network_weights"]["swinViT." + k], v), k
    out = tmp_path / "res" / "Dataset802_SynthCTOrgans" / "SSLFinetuneTrainer__ssl3d_monai_swinunetrPlans__3d_fullres"
    assert torch.load(out / "fold_0" / "checkpoint_final.pth", map_location="cpu",
                      weights_only=False)["current_epoch"] == 1
