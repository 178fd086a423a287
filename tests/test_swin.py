"""Swin encoder / SwinUNETR downstream network (MONAI) as nnU-Net builds and SSL pretraining uses it."""
import ast
import json
from pathlib import Path

import pytest
import torch

import ssl3d
from ssl3d.architectures.from_plans import build_network_from_plans
from ssl3d.architectures.swin import (SWIN_PRESETS, SwinUNETRNet, masked_patch_embedding, swin_arch_kwargs,
                                      swin_encoder, swin_encoder_state_dict, swin_features, swin_patch_size)

TINY = swin_arch_kwargs("tiny")


def _arch(kwargs=TINY):
    return {"network_class_name": "ssl3d.architectures.swin.SwinUNETRNet", "arch_kwargs": kwargs,
            "_kw_requires_import": []}


@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(0)
    return swin_encoder(1, **TINY).eval()


def test_arch_kwargs_presets():
    assert json.loads(json.dumps(TINY)) == TINY and TINY["patch_size"] == 2
    s = swin_arch_kwargs("S")
    assert (s["feature_size"], s["depths"], s["window_size"]) == (48, [2, 2, 4, 2], 4)
    for preset in SWIN_PRESETS.values():  # every stage's dim divisible by its head count
        assert all((preset["feature_size"] * 2 ** i) % h == 0 for i, h in enumerate(preset["num_heads"]))
    with pytest.raises(ValueError, match="unknown Swin size"):
        swin_arch_kwargs("XXL")


def test_built_from_plans_forward_and_deep_supervision_flag():
    torch.manual_seed(0)
    net = build_network_from_plans(_arch(), 1, 3, deep_supervision=False)
    assert isinstance(net, SwinUNETRNet) and net.decoder.deep_supervision is False
    assert not isinstance(net.decoder, torch.nn.Module)
    assert any(k.startswith("swinViT.") for k in net.state_dict())
    assert not any(k.startswith("decoder.") for k in net.state_dict())
    x = torch.randn(1, 1, 32, 32, 64)
    with torch.no_grad():
        out = net(x)
        assert isinstance(out, torch.Tensor) and out.shape == (1, 3, 32, 32, 64)
        net.decoder.deep_supervision = True  # what nnU-Net's set_deep_supervision_enabled does
        out = net(x)
    assert isinstance(out, torch.Tensor) and out.shape == (1, 3, 32, 32, 64)


def test_non_divisible_input_raises_our_message():
    net = SwinUNETRNet(1, 2, **TINY)
    with pytest.raises(ValueError, match=r"SwinUNETRNet input spatial size \(32, 32, 48\) is not divisible by 32"):
        net(torch.zeros(1, 1, 32, 32, 48))
    with pytest.raises(ValueError, match="patch_size 2 only"):
        SwinUNETRNet(1, 2, **{**TINY, "patch_size": 4})


def test_swin_features_unmasked_equals_monai_forward(encoder):
    x = torch.randn(1, 1, 32, 32, 32)
    token = torch.zeros(TINY["feature_size"])
    with torch.no_grad():
        ref = encoder(x, True)
        for got in (swin_features(encoder, x), swin_features(encoder, x, token, torch.ones(1, 2, 2, 2, dtype=bool))):
            assert len(got) == len(ref) == 5
            assert all(torch.equal(a, b) for a, b in zip(got, ref))
        assert all(torch.equal(a, b) for a, b in zip(swin_features(encoder, x, normalize=False), encoder(x, False)))


def test_masked_features_differ_and_mask_token_gets_gradient(encoder):
    x = torch.randn(1, 1, 32, 32, 32)
    visible = torch.tensor([True, False] * 4).view(1, 2, 2, 2)
    token = torch.nn.Parameter(torch.randn(TINY["feature_size"]))
    masked = swin_features(encoder, x, token, visible)
    with torch.no_grad():
        ref = swin_features(encoder, x)
    assert all(not torch.equal(a, b) for a, b in zip(masked, ref))
    sum(o.sum() for o in masked).backward()
    assert token.grad is not None and token.grad.abs().sum() > 0


def test_masked_patch_embedding_replaces_masked_tokens(encoder):
    torch.manual_seed(1)
    x = torch.randn(1, 1, 32, 32, 32)
    visible = torch.rand(1, 2, 2, 2) > 0.5  # 16^3-voxel cells -> 8^3 patch tokens per cell
    visible[0, 0, 0, 0], visible[0, 1, 1, 1] = True, False
    token = torch.randn(TINY["feature_size"])
    with torch.no_grad():
        emb = masked_patch_embedding(encoder, x, token, visible)
        keep = visible.repeat_interleave(8, 1).repeat_interleave(8, 2).repeat_interleave(8, 3)
        assert emb.shape == (1, TINY["feature_size"], 16, 16, 16)
        assert torch.equal(emb.permute(0, 2, 3, 4, 1)[~keep], token.expand(int((~keep).sum()), -1))
        assert torch.equal(emb.permute(0, 2, 3, 4, 1)[keep], encoder.patch_embed(x).permute(0, 2, 3, 4, 1)[keep])
        # changing voxels inside masked cells only changes nothing at the embedding level
        voxel_masked = ~visible.repeat_interleave(16, 1).repeat_interleave(16, 2).repeat_interleave(16, 3)
        x2 = torch.where(voxel_masked[:, None], torch.randn_like(x), x)
        assert not torch.equal(x, x2)
        assert torch.equal(masked_patch_embedding(encoder, x2, token, visible), emb)
    with pytest.raises(ValueError, match="does not divide"):
        masked_patch_embedding(encoder, x, token, torch.ones(1, 3, 3, 3, dtype=bool))


def test_encoder_state_dict_maps_onto_network(encoder):
    sd = swin_encoder_state_dict(encoder)
    net = SwinUNETRNet(1, 2, **TINY)
    target = {k: v for k, v in net.state_dict().items() if k.startswith("swinViT.")}
    assert set(sd) == set(target)
    assert all(sd[k].shape == target[k].shape for k in sd)
    missing, unexpected = net.load_state_dict(sd, strict=False)
    assert not unexpected and not any(k.startswith("swinViT.") for k in missing)
    loaded = net.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in sd.items())


def test_swin_patch_size():
    assert swin_patch_size([28, 40, 48]) == [32, 32, 64]
    assert swin_patch_size([96, 160, 160]) == [96, 160, 160]
    assert swin_patch_size([20, 20, 24]) == [32, 32, 64], "a 1-voxel bottleneck cannot be instance-normalized"


def test_module_imports_only_allowed_packages():
    path = Path(ssl3d.__file__).parent / "architectures" / "swin.py"
    allowed = ("torch", "monai", "ssl3d.sparse", "ssl3d.layers", "ssl3d.utils", "__future__", "types", "typing")
    names = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            assert not node.level
            names.append(node.module)
    bad = [n for n in names if not any(n == a or n.startswith(a + ".") for a in allowed)]
    assert names and not bad, bad
    assert len(path.read_text().splitlines()) < 250
