"""The official Primus (``dynamic_network_architectures.architectures.primus.Primus``) as ssl3d uses it.

Primus = ``down_projection`` (a strided-conv patch embedding), ``eva`` (EVA blocks: SwiGLU MLP, RoPE, layer
scale, an absolute position embedding of the fixed token grid ``input_shape / patch_embed_size``) and
``up_projection`` (transposed-conv patch decoder = the segmentation head). ``mae`` pretrains exactly these
``down_projection``/``eva`` modules, so its weights keep Primus's key names.

Token dropping: dna's own ``patch_drop_rate`` draws its keep set from the global RNG inside the network and,
with the installed timm (1.0.22), fails at construction (``PatchDropout`` lost ``return_indices``); its
RoPE gather also lacks the head axis. :func:`encode_visible` therefore runs the same modules on the tokens an
explicit per-sample mask keeps: positions (absolute and RoPE) are gathered with the tokens, so a visible
token gets exactly the embedding it has in the full forward, and masked patches never enter the blocks.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ssl3d.sparse.masks import VisibleTokens, visible_token_indices

PRIMUS_CLASS = "dynamic_network_architectures.architectures.primus.Primus"
# (embed_dim, eva_depth, eva_numheads) of dna's PrimusS/B/M/L (and nnU-Net's nnUNet_Primus_*_Trainer)
PRIMUS_SIZES = {"S": (396, 12, 6), "B": (792, 12, 12), "M": (864, 16, 12), "L": (1056, 24, 16)}
# what dna's PrimusS/B/M/L and nnU-Net's Primus trainers set besides the sizes
PRIMUS_DEFAULTS = {"drop_path_rate": 0.2, "scale_attn_inner": True, "init_values": 0.1}


def check_primus_dims(embed_dim: int, heads: int, patch_embed_size: Sequence[int], what: str = "Primus") -> None:
    """Constraints of dna's Eva RoPE and PatchDecode, as one clear ValueError instead of a bare assert."""
    if embed_dim % heads or (embed_dim // heads) % 6:
        raise ValueError(f"{what}: embed dim {embed_dim} / {heads} heads must be a multiple of 6 per head "
                         "(3D RoPE uses 2/3 of each head, in steps of 4)")
    if any(p < 1 or p & (p - 1) for p in patch_embed_size) or max(patch_embed_size) < 2:
        raise ValueError(f"{what}: patch embedding {list(patch_embed_size)} must be powers of two, at least one "
                         "above 1 (Primus's patch decoder upsamples by 2 per stage)")


def primus_architecture(embed_dim: int, depth: int, heads: int, patch_embed_size: Sequence[int],
                        input_shape: Sequence[int], **extra) -> dict:
    """Plans ``architecture`` entry for ``Primus`` (``input_shape`` = the network's patch size, which fixes the
    position-embedding grid). ``extra``: further Primus kwargs (default: dna's PrimusS/B/M/L settings)."""
    check_primus_dims(embed_dim, heads, patch_embed_size)
    if any(int(s) % int(p) for s, p in zip(input_shape, patch_embed_size)):
        raise ValueError(f"Primus: patch size {list(input_shape)} is not divisible by the patch embedding "
                         f"{list(patch_embed_size)}")
    kwargs = {"embed_dim": int(embed_dim), "patch_embed_size": [int(p) for p in patch_embed_size],
              "eva_depth": int(depth), "eva_numheads": int(heads), "input_shape": [int(s) for s in input_shape],
              **PRIMUS_DEFAULTS, **extra,
              "decoder_norm": "dynamic_network_architectures.building_blocks.patch_encode_decode.LayerNormNd",
              "decoder_act": "torch.nn.GELU", "rope_impl": "timm.layers.RotaryEmbeddingCat"}
    return {"network_class_name": PRIMUS_CLASS, "arch_kwargs": kwargs,
            "_kw_requires_import": ["decoder_norm", "decoder_act", "rope_impl"]}


def is_primus_like(module: nn.Module) -> bool:
    """Has Primus's encoder modules (``down_projection`` + ``eva``): dna's Primus or ssl3d's ``mae``."""
    return isinstance(getattr(module, "down_projection", None), nn.Module) and \
        isinstance(getattr(module, "eva", None), nn.Module)


def patch_tokens(module: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """``down_projection`` of ``(B, C, z, y, x)`` -> tokens ``(B, N, dim)`` in raster order, and the token grid."""
    y = module.down_projection(x)
    return y.flatten(2).transpose(1, 2), tuple(y.shape[2:])  # type: ignore[return-value]


def primus_feature_map(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Primus's encoder on every token, as its own forward runs it: ``(B, dim, *grid)`` (before ``up_projection``)."""
    tokens, grid = patch_tokens(module, x)
    reg = getattr(module, "register_tokens", None)
    if reg is not None:
        tokens = torch.cat([reg.expand(tokens.shape[0], -1, -1), tokens], 1)
    out, _ = module.eva(tokens)
    if reg is not None:
        out = out[:, reg.shape[1]:]
    return out.transpose(1, 2).reshape(x.shape[0], out.shape[-1], *grid)


def run_eva(eva: nn.Module, tokens: torch.Tensor, vis: VisibleTokens | None = None) -> torch.Tensor:
    """An ``Eva`` (dna's) on the tokens ``vis`` keeps (all when None): absolute positions added on the full grid,
    then tokens and their RoPE angles gathered per sample; padded slots (unequal counts) are never attended to."""
    from timm.layers import apply_keep_indices_nlc

    if getattr(eva, "num_prefix_tokens", 0):
        raise ValueError("visible-token encoding does not support register tokens")
    if eva.pos_embed is not None:
        tokens = tokens + eva.pos_embed
    tokens = eva.pos_drop(tokens)
    rope = eva.rope.get_embed() if eva.rope is not None else None
    attn_mask = None
    if vis is not None:
        tokens = tokens.gather(1, vis.index[..., None].expand(-1, -1, tokens.shape[-1]))
        if rope is not None:  # (N, D) -> (B, 1, M, D): one angle set per kept token, shared by the heads
            rope = apply_keep_indices_nlc(tokens, rope, vis.index).unsqueeze(1)
        if bool(vis.padding.any()):
            attn_mask = torch.zeros(vis.padding.shape, dtype=tokens.dtype, device=tokens.device)
            attn_mask = attn_mask.masked_fill(vis.padding, float("-inf"))[:, None, None, :]
    for blk in eva.blocks:
        tokens = blk(tokens, rope=rope, attn_mask=attn_mask)
    return eva.norm(tokens)


def encode_visible(module: nn.Module, x: torch.Tensor, visible: torch.Tensor) -> tuple[torch.Tensor, VisibleTokens]:
    """Primus's encoder on the visible patches only: ``visible (B, *grid)`` bool (True = visible, its own mask
    per sample). Returns features ``(B, M, dim)`` of the visible tokens (raster order, padded) and their indices."""
    tokens, grid = patch_tokens(module, x)
    if tuple(visible.shape[1:]) != grid:
        raise ValueError(f"mask grid {tuple(visible.shape[1:])} does not match the token grid {grid}")
    vis = visible_token_indices(visible)
    return run_eva(module.eva, tokens, vis), vis


__all__ = ["PRIMUS_CLASS", "PRIMUS_SIZES", "PRIMUS_DEFAULTS", "check_primus_dims", "primus_architecture",
           "is_primus_like", "patch_tokens", "primus_feature_map", "run_eva", "encode_visible"]
