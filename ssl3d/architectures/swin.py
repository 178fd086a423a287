"""Swin encoder (MONAI's ``SwinTransformer``) and the SwinUNETR downstream network, wrapped for nnU-Net.

Nothing here re-implements Swin: ``SwinUNETRNet`` *is* MONAI's maintained ``SwinUNETR`` (subclassed only to
take nnU-Net's constructor arguments), so its encoder lives under ``swinViT.*`` at the top of the state_dict,
exactly the keys ``swin_encoder_state_dict`` produces from a bare pretrained ``SwinTransformer``.

``swin_features`` runs a ``SwinTransformer`` stage by stage like its own ``forward`` but can replace the
patch-embedding tokens at masked positions by a learnable mask token (SimMIM/SMIT-style masked image modelling).
Swin needs dense windows, so masking swaps tokens instead of dropping them (unlike the sparse CNNs/ViTs).

nnU-Net builds ``SwinUNETRNet`` from plans (``network_class_name = "ssl3d.architectures.swin.SwinUNETRNet"``,
``arch_kwargs = swin_arch_kwargs(size)``); its training patch must be a multiple of 32 (``swin_patch_size``).
"""
from __future__ import annotations

import types
from typing import Sequence

import torch
from monai.networks.nets import SwinUNETR
from monai.networks.nets.swin_unetr import SwinTransformer

from ssl3d.sparse import upsample_mask

# SMIT's encoder (embed 48, depths 2-2-4-2, window 4); "tiny" keeps the head dim at 12 in every stage
# (dims 12, 24, 48, 96) and exists for tests and smoke runs.
SWIN_PRESETS: dict[str, dict] = {
    "S": dict(feature_size=48, depths=(2, 2, 4, 2), num_heads=(3, 6, 12, 24), window_size=4),
    "tiny": dict(feature_size=12, depths=(1, 1, 1, 1), num_heads=(1, 2, 4, 8), window_size=4),
}
# patch embedding, then four stages that each halve the grid (the last merging feeds the bottleneck map)
_N_DOWNSAMPLINGS = 4


def swin_arch_kwargs(size: str = "S") -> dict:
    """``arch_kwargs`` for ``SwinUNETRNet`` in a plans file (plain lists/ints: JSON-serialisable)."""
    if size not in SWIN_PRESETS:
        raise ValueError(f"unknown Swin size {size!r}; choose one of {sorted(SWIN_PRESETS)}")
    p = SWIN_PRESETS[size]
    return {"feature_size": int(p["feature_size"]), "depths": [int(d) for d in p["depths"]],
            "num_heads": [int(h) for h in p["num_heads"]], "window_size": int(p["window_size"]), "patch_size": 2}


def swin_patch_size(patch_size: Sequence[int], multiple: int = 32) -> list[int]:
    """Each axis to the nearest multiple of ``multiple`` (ties and anything smaller go up; at least one multiple).

    The bottleneck map must hold more than one voxel (SwinUNETR instance-normalizes it), so a patch that would
    be one multiple on every axis gets its largest axis doubled.
    """
    # (2p + m) // 2m == floor(p / m + 1/2): round half up in integers
    out = [max(1, (2 * int(p) + multiple) // (2 * multiple)) * multiple for p in patch_size]
    if all(o == multiple for o in out):
        out[max(reversed(range(len(out))), key=lambda i: int(patch_size[i]))] = 2 * multiple  # last: in-plane
    return out


class SwinUNETRNet(SwinUNETR):
    """MONAI's SwinUNETR with nnU-Net's constructor; the output is always ONE logits tensor.

    There is no deep supervision: ``decoder`` is a plain holder (not a Module, so no state_dict keys) that only
    exists because nnU-Net sets ``network.decoder.deep_supervision``; the flag is recorded and ignored.
    """

    def __init__(self, input_channels: int, num_classes: int, deep_supervision: bool = False, feature_size: int = 48,
                 depths: Sequence[int] = (2, 2, 4, 2), num_heads: Sequence[int] = (3, 6, 12, 24),
                 window_size: int = 4, patch_size: int = 2, **_: dict):
        if int(patch_size) != 2:  # SwinUNETR's decoder upsamples 2x per level: other patch sizes cannot match
            raise ValueError(f"SwinUNETRNet supports patch_size 2 only, got {patch_size}")
        super().__init__(in_channels=input_channels, out_channels=num_classes, patch_size=int(patch_size),
                         depths=tuple(int(d) for d in depths), num_heads=tuple(int(h) for h in num_heads),
                         window_size=int(window_size), feature_size=int(feature_size))
        self.decoder = types.SimpleNamespace(deep_supervision=bool(deep_supervision))

    @property
    def divisor(self) -> int:
        """Every input axis must be a multiple of this (patch embedding times four 2x merges)."""
        return int(self.patch_size) * 2 ** _N_DOWNSAMPLINGS

    def _check_input_size(self, spatial_shape) -> None:
        # overrides MONAI's check (called from its forward), which demands patch_size**5: right only for patch 2
        shape = tuple(int(s) for s in spatial_shape)
        if any(s % self.divisor for s in shape):
            raise ValueError(f"SwinUNETRNet input spatial size {shape} is not divisible by {self.divisor} "
                             f"(patch_size {self.patch_size} * 2**{_N_DOWNSAMPLINGS}) on every axis; "
                             f"use swin_patch_size() for the training patch")


def _token_mask(visible: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
    """Cell mask (B, gz, gy, gx) -> token mask (B, *grid); the cell grid must divide the token grid."""
    if visible.dim() != 4 or visible.dtype != torch.bool:
        raise ValueError(f"visible must be a bool (B, gz, gy, gx) tensor, got {visible.dtype} {tuple(visible.shape)}")
    if any(g % c for g, c in zip(grid, visible.shape[1:])):
        raise ValueError(f"mask grid {tuple(visible.shape[1:])} does not divide the patch-token grid {tuple(grid)}")
    return upsample_mask(visible, tuple(grid))


def masked_patch_embedding(swin: SwinTransformer, x: torch.Tensor, mask_token: torch.Tensor | None = None,
                           visible: torch.Tensor | None = None) -> torch.Tensor:
    """``swin.patch_embed(x)`` (B, C, *grid) with the tokens at masked positions replaced by ``mask_token`` (C,)."""
    x0 = swin.patch_embed(x)
    if visible is None:
        return x0
    if mask_token is None:
        raise ValueError("a mask (visible) needs a mask_token")
    keep = _token_mask(visible.to(x0.device), x0.shape[2:])[:, None]
    # torch.where keeps visible tokens bit-identical and routes the gradient of masked ones to the token
    return torch.where(keep, x0, mask_token.to(x0.dtype).view(1, -1, *([1] * (x0.dim() - 2))))


def swin_features(swin: SwinTransformer, x: torch.Tensor, mask_token: torch.Tensor | None = None,
                  visible: torch.Tensor | None = None, normalize: bool = True) -> list[torch.Tensor]:
    """What ``swin(x, normalize)`` returns (5 maps: patch embedding + 4 stages), optionally with masked tokens.

    Follows MONAI's ``SwinTransformer.forward`` step by step (including the ``use_v2`` residual conv blocks);
    with ``visible=None`` (or all True) the result equals ``swin(x, normalize)`` exactly.
    """
    h = swin.pos_drop(masked_patch_embedding(swin, x, mask_token, visible))
    outs = [swin.proj_out(h, normalize)]
    for i in range(1, 5):
        if swin.use_v2:
            h = getattr(swin, f"layers{i}c")[0](h.contiguous())
        h = getattr(swin, f"layers{i}")[0](h.contiguous())
        outs.append(swin.proj_out(h, normalize))
    return outs


def swin_encoder(input_channels: int, feature_size: int = 48, depths: Sequence[int] = (2, 2, 4, 2),
                 num_heads: Sequence[int] = (3, 6, 12, 24), window_size: int = 4, patch_size: int = 2,
                 **_: dict) -> SwinTransformer:
    """A bare MONAI ``SwinTransformer`` built exactly like ``SwinUNETRNet(input_channels, ..., **same).swinViT``."""
    # SwinUNETR passes per-axis tuples and the "merging" downsampler; mirror it so the keys and shapes match
    return SwinTransformer(in_chans=input_channels, embed_dim=int(feature_size), window_size=(int(window_size),) * 3,
                           patch_size=(int(patch_size),) * 3, depths=tuple(int(d) for d in depths),
                           num_heads=tuple(int(h) for h in num_heads), downsample="merging")


def swin_encoder_state_dict(swin: SwinTransformer) -> dict[str, torch.Tensor]:
    """A bare ``SwinTransformer``'s weights under the keys ``SwinUNETRNet`` uses for its encoder."""
    return {"swinViT." + k: v for k, v in swin.state_dict().items()}
