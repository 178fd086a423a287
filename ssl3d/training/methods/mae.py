"""``mae``: masked autoencoder with a 3D ViT that sees only the visible patches (He et al.; Primus-like sizes).

Patch = the plans' ``mae_patch_size`` (16³ for isotropic data, e.g. 4×16×16 for 5 mm slices), so the mask
cell is one patch. Light transformer decoder; loss = MSE on per-patch normalized voxels of masked patches.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ssl3d.architectures.vit import (TransformerStack, ViTEncoder, init_vit_weights, num_heads_for, patchify,
                                     scatter_tokens, sincos_position_embedding, unpatchify)
from ssl3d.sparse import upsample_mask
from ssl3d.training.losses import denormalize_prediction, masked_patch_mse
from ssl3d.training.methods.base import SSLMethod
from ssl3d.training.methods.registry import register_method

# (embed dim, depth, decoder dim, decoder depth, token patch divisor). M is Primus-M: embed 864, depth 16, 8³
# tokens (the planned 16³ MAE patch halved per axis, so 4×16×16 becomes 2×8×8), 2 decoder blocks.
PRESETS = {"tiny": (48, 2, 32, 1, 1), "S": (384, 12, 256, 4, 1), "B": (768, 12, 384, 4, 1),
           "M": (864, 16, 384, 2, 2)}


class MAE3d(SSLMethod):
    name = "mae"

    def __init__(self, in_channels: int, patch_size: Sequence[int], token_patch: Sequence[int], dim: int = 384,
                 depth: int = 12, decoder_dim: int = 256, decoder_depth: int = 4):
        super().__init__(patch_size, token_patch)
        self.in_channels = in_channels
        self.arch = {"dim": dim, "depth": depth, "decoder_dim": decoder_dim, "decoder_depth": decoder_depth}
        self.encoder = ViTEncoder(in_channels, dim, depth, token_patch)
        self.decoder_embed = nn.Linear(dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(decoder_dim))
        self.decoder = TransformerStack(decoder_dim, decoder_depth, num_heads_for(decoder_dim, 32))
        self.head = nn.Linear(decoder_dim, int(torch.tensor(token_patch).prod()) * in_channels)
        self.apply(init_vit_weights)
        nn.init.normal_(self.mask_token, std=0.02)

    def encode(self, x: torch.Tensor, visible: torch.Tensor):
        """Encoder features of the visible patches only: ``(B, M, dim)``, plus the index structure and grid."""
        return self.encoder(x, visible)

    def _predict(self, x: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        feats, vis, grid = self.encode(x, visible)
        n = grid[0] * grid[1] * grid[2]
        dec = scatter_tokens(self.decoder_embed(feats), vis.index, vis.padding, n, self.mask_token)
        dec = dec + sincos_position_embedding(grid, dec.shape[-1], dec.device).to(dec.dtype)
        return self.head(self.decoder(dec))  # (B, N, P*C)

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
        return [*self.encoder.blocks.blocks, *self.decoder.blocks]

    def downstream_state_dict(self) -> dict[str, torch.Tensor]:
        return {f"encoder.{k}": v.detach().cpu() for k, v in self.encoder.state_dict().items()}

    def downstream_architecture(self) -> dict:
        return {"network_class_name": "ssl3d.architectures.vit_unet.ViTSegNet", "_kw_requires_import": [],
                "arch_kwargs": {"patch_size": list(self.cell_size), "dim": self.arch["dim"],
                                "depth": self.arch["depth"]}}

    def config(self) -> dict:
        return {**super().config(), **self.arch}


@register_method("mae", "3D ViT masked autoencoder on visible patches, light transformer decoder",
                 trainer_name="MAEPretrainer", downstream="ssl3d.architectures.vit_unet.ViTSegNet", transformer=True,
                 single_output=True, checkpointing=True, tiny={"size": "tiny"})
def build_mae(plans: dict, configuration: dict, num_input_channels: int, size: str = "S", **overrides) -> MAE3d:
    if size not in PRESETS:
        raise ValueError(f"unknown MAE size '{size}' ({', '.join(PRESETS)})")
    dim, depth, ddim, ddepth, divisor = PRESETS[size]
    kw = {"dim": dim, "depth": depth, "decoder_dim": ddim, "decoder_depth": ddepth, **overrides}
    token_patch = [max(1, int(p) // divisor) for p in configuration["ssl3d"]["mae_patch_size"]]
    return MAE3d(num_input_channels, configuration["patch_size"], token_patch, **kw)
