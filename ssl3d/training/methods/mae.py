"""``mae``: masked autoencoder pretraining of the official Primus (dna's ``Primus``: EVA blocks, RoPE, layer scale).

The encoder *is* ``Primus(...).down_projection`` and ``.eva``, built by nnU-Net's own ``get_network_from_plans``
from :meth:`MAE3d.downstream_architecture`, so the pretrained keys are the downstream Primus's keys. The encoder
runs on the visible patches only (explicit per-sample masks, :func:`ssl3d.architectures.primus.encode_visible`);
a light decoder (2 EVA blocks at the encoder width, as nnssl's Primus-M MAE) sees visible features + mask
tokens; loss = MSE on per-patch normalized voxels of the masked patches.

Patch embedding: dna/nnssl/nnU-Net use 8³ for 3D. The plans' ``mae_patch_size`` (the CNN's total stride after
min(4, #downsamplings), which nnU-Net's spacing rules keep anisotropic where the data are: 16³ isotropic,
e.g. 4×16×16 or 2×16×16 for thick slices) halved per axis gives exactly 8³ for isotropic data and a patch of
about the same physical extent per axis otherwise (2×8×8 at 4:1 spacing) instead of an 8³ token 4× deeper
than wide. The ``tiny`` CPU preset keeps the planned size unhalved (few tokens).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from ssl3d.architectures.from_plans import build_network_from_plans
from ssl3d.architectures.primus import (PRIMUS_SIZES, encode_visible, primus_architecture, primus_feature_map,
                                        run_eva)
from ssl3d.architectures.vit import patchify, scatter_tokens, unpatchify
from ssl3d.sparse import upsample_mask
from ssl3d.training.losses import denormalize_prediction, masked_patch_mse
from ssl3d.training.methods.base import SSLMethod
from ssl3d.training.methods.registry import register_method

# size: (embed dim, depth, heads, patch divisor); S/B/M/L = dna's PrimusS/B/M/L. Decoder: 2 blocks, same width.
PRESETS = {"tiny": (48, 2, 2, 1), **{k: (*v, 2) for k, v in PRIMUS_SIZES.items()}}
DECODER_DEPTH = {"tiny": 1}


class MAE3d(SSLMethod):
    name = "mae"

    def __init__(self, in_channels: int, patch_size: Sequence[int], patch_embed_size: Sequence[int],
                 embed_dim: int = 396, depth: int = 12, heads: int = 6, decoder_depth: int = 2, **primus_kwargs):
        super().__init__(patch_size, patch_embed_size)
        from dynamic_network_architectures.building_blocks.eva import Eva

        self.in_channels = in_channels
        self.architecture = primus_architecture(embed_dim, depth, heads, self.cell_size, self.patch_size,
                                                **primus_kwargs)
        primus = build_network_from_plans(self.architecture, in_channels, in_channels, deep_supervision=None)
        self.down_projection, self.eva = primus.down_projection, primus.eva  # Primus's own modules and names
        grid = self.mask_grid()
        kw = self.architecture["arch_kwargs"]
        self.decoder = Eva(embed_dim=embed_dim, depth=decoder_depth, num_heads=heads, ref_feat_shape=grid,
                           init_values=kw["init_values"], scale_attn_inner=kw["scale_attn_inner"])
        self.mask_token = nn.Parameter(torch.zeros(embed_dim))
        self.head = nn.Linear(embed_dim, math.prod(self.cell_size) * in_channels)
        nn.init.normal_(self.mask_token, std=0.02)
        nn.init.xavier_uniform_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        self.arch = {"embed_dim": embed_dim, "depth": depth, "heads": heads, "decoder_depth": decoder_depth}

    def encode(self, x: torch.Tensor, visible: torch.Tensor | None):
        """No mask: the dense map ``(B, dim, *grid)`` (Primus's forward before its decoder). With ``visible
        (B, *grid)``: ``(features (B, M, dim) of the visible patches only, their indices, grid)``."""
        if visible is None:
            return primus_feature_map(self, x)
        feats, vis = encode_visible(self, x, visible)
        return feats, vis, tuple(visible.shape[1:])

    def _predict(self, x: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        feats, vis, grid = self.encode(x, visible)
        full = scatter_tokens(feats, vis.index, vis.padding, math.prod(grid), self.mask_token)
        return self.head(run_eva(self.decoder, full))  # (B, N, P*C)

    def forward(self, x: torch.Tensor, visible: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return masked_patch_mse(self._predict(x, visible), patchify(x, self.cell_size), visible)

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        pred = denormalize_prediction(self._predict(x, visible), x, self.cell_size)
        grid = tuple(s // c for s, c in zip(x.shape[2:], self.cell_size))
        image = unpatchify(pred, self.cell_size, grid, x.shape[1])
        keep = upsample_mask(visible.reshape(x.shape[0], *grid), x.shape[2:])[:, None]
        return torch.where(keep, x, image.to(x.dtype))

    def checkpoint_stages(self) -> list[nn.Module]:
        return [*self.eva.blocks, *self.decoder.blocks]

    def downstream_state_dict(self) -> dict[str, torch.Tensor]:
        """Every ``down_projection.*`` and ``eva.*`` tensor, under Primus's names (the rest of Primus, its
        ``up_projection`` head and ``mask_token`` buffer, is not pretrained)."""
        return {k: v.detach().cpu() for k, v in self.state_dict().items()
                if k.startswith(("down_projection.", "eva."))}

    def downstream_architecture(self) -> dict:
        return self.architecture

    def config(self) -> dict:
        return {**super().config(), **self.arch, "patch_embed_size": list(self.cell_size)}


@register_method("mae", "MAE pretraining of the official Primus (dna EVA ViT) on visible patches, light EVA decoder",
                 trainer_name="MAEPretrainer", downstream="dynamic_network_architectures.architectures.primus.Primus",
                 transformer=True, single_output=True, checkpointing=True, tiny={"size": "tiny"})
def build_mae(plans: dict, configuration: dict, num_input_channels: int, size: str = "S",
              patch_embed_size: Sequence[int] | None = None, **overrides) -> MAE3d:
    """``size``: tiny (CPU tests) or dna's Primus S/B/M/L; ``patch_embed_size`` overrides the planned patch."""
    if size not in PRESETS:
        raise ValueError(f"unknown MAE size '{size}' ({', '.join(PRESETS)})")
    dim, depth, heads, divisor = PRESETS[size]
    if patch_embed_size is None:
        patch_embed_size = [max(1, int(p) // divisor) for p in configuration["ssl3d"]["mae_patch_size"]]
    kw = {"embed_dim": dim, "depth": depth, "heads": heads, "decoder_depth": DECODER_DEPTH.get(size, 2), **overrides}
    return MAE3d(num_input_channels, configuration["patch_size"], patch_embed_size, **kw)
