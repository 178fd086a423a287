"""What every SSL method provides.

A method is an ``nn.Module`` that owns its encoder, decoder and loss; ``registry`` declares it by name. The trainer draws the mask (boolean,
True = visible, one grid per sample) with :meth:`SSLMethod.random_mask` and passes it explicitly to
``forward(x, visible) -> loss``; nothing is kept in globals. ``reconstruct`` gives image-space predictions
for previews, ``downstream_state_dict`` the encoder weights under the downstream network's key names.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ssl3d.sparse.masks import random_cell_mask


class SSLMethod(nn.Module):
    """Base class: subclasses set ``self.mask_grid_shape`` (cells per axis of the training patch)."""

    name: str = ""

    def __init__(self, patch_size: Sequence[int], cell_size: Sequence[int]):
        super().__init__()
        self.patch_size = tuple(int(p) for p in patch_size)
        self.cell_size = tuple(int(c) for c in cell_size)
        for p, c in zip(self.patch_size, self.cell_size):
            if p % c:
                raise ValueError(f"patch size {self.patch_size} is not divisible by the mask cell {self.cell_size}")

    def mask_grid(self, spatial_shape: Sequence[int] | None = None) -> tuple[int, int, int]:
        shape = self.patch_size if spatial_shape is None else tuple(spatial_shape)
        return tuple(s // c for s, c in zip(shape, self.cell_size))  # type: ignore[return-value]

    def random_mask(self, batch: int, ratio: float, generator: torch.Generator | None = None,
                    device: torch.device | str | None = None,
                    spatial_shape: Sequence[int] | None = None) -> torch.Tensor:
        """``(B, gz, gy, gx)`` bool, True = visible, exactly round(ratio * cells) masked per sample."""
        return random_cell_mask(batch, self.mask_grid(spatial_shape), ratio, generator, device)

    def forward(self, x: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def downstream_state_dict(self) -> dict[str, torch.Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def downstream_architecture(self) -> dict:
        """Plans ``architecture`` entry (network_class_name, arch_kwargs, _kw_requires_import) of the network
        that receives :meth:`downstream_state_dict` for fine-tuning."""
        raise NotImplementedError(f"method '{self.name}' has no downstream segmentation network yet")

    def config(self) -> dict:
        return {"name": self.name, "patch_size": list(self.patch_size), "cell_size": list(self.cell_size)}
