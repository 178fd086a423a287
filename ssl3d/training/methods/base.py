"""What every SSL method provides.

A method is an ``nn.Module`` that owns its encoder, decoder and loss; ``registry`` declares it by name. The
trainer draws the mask (boolean, True = visible, one grid per sample) with :meth:`SSLMethod.random_mask` and
passes it explicitly to ``forward(x, visible, generator) -> loss``; nothing is kept in globals. Methods that
draw more randomness (second views, nested crops, masks of other levels) draw it from ``generator`` (seeded per
step by the trainer, so runs and resumes are reproducible). ``x`` is a crop of ``data_patch_size`` (the
network's ``patch_size`` unless a method samples views from a larger region); ``input_view`` is the
deterministic view of such a crop that ``reconstruct`` works on. ``set_progress`` / ``after_optimizer_step``
serve schedules and EMA teachers; ``stats`` holds detached diagnostics of the last forward (collapse guards).
``reconstruct`` gives image-space predictions for previews, ``downstream_state_dict`` the encoder weights under
the downstream network's key names; ``checkpoint_stages`` lists what activation checkpointing may recompute.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ssl3d.sparse.masks import random_cell_mask


class SSLMethod(nn.Module):
    """Base class: subclasses set ``self.mask_grid_shape`` (cells per axis of the training patch)."""

    name: str = ""
    n_views: int = 1  # 2: the loader gives two augmented overlapping views per case, x = (B, 2, C, *patch)
    view_overlap: float = 0.5  # minimum overlap of the two views per axis
    reconstructs: bool = True  # False: no image reconstruction (no previews, no masked-voxel PSNR)

    def __init__(self, patch_size: Sequence[int], cell_size: Sequence[int]):
        super().__init__()
        self.patch_size = tuple(int(p) for p in patch_size)
        self.cell_size = tuple(int(c) for c in cell_size)
        for p, c in zip(self.patch_size, self.cell_size):
            if p % c:
                raise ValueError(f"patch size {self.patch_size} is not divisible by the mask cell {self.cell_size}")
        self.data_patch_size = self.patch_size
        self.step, self.total_steps = 0, 1
        self.stats: dict[str, float] = {}

    def input_view(self, x: torch.Tensor) -> torch.Tensor:
        """The network-input view of a ``data_patch_size`` crop (identity when both sizes agree)."""
        return x

    def set_progress(self, step: int, total_steps: int) -> None:
        """Global step and schedule length, set by the trainer before every training step."""
        self.step, self.total_steps = int(step), max(1, int(total_steps))

    def after_optimizer_step(self) -> None:
        """EMA teachers update here; runs after the optimizer step, identically on every rank."""

    def mask_grid(self, spatial_shape: Sequence[int] | None = None) -> tuple[int, int, int]:
        shape = self.patch_size if spatial_shape is None else tuple(spatial_shape)
        return tuple(s // c for s, c in zip(shape, self.cell_size))  # type: ignore[return-value]

    def random_mask(self, batch: int, ratio: float, generator: torch.Generator | None = None,
                    device: torch.device | str | None = None,
                    spatial_shape: Sequence[int] | None = None) -> torch.Tensor:
        """``(B, gz, gy, gx)`` bool, True = visible, exactly round(ratio * cells) masked per sample."""
        return random_cell_mask(batch, self.mask_grid(spatial_shape), ratio, generator, device)

    def checkpoint_stages(self) -> list[nn.Module]:
        """Encoder/decoder stages that ``--checkpoint-activations`` recomputes in backward (none by default)."""
        return []

    def enable_activation_checkpointing(self) -> None:
        """Checkpoint every module of :meth:`checkpoint_stages` (same outputs and gradients, less memory)."""
        from ssl3d.training.methods.checkpointing import checkpoint_module

        stages = self.checkpoint_stages()
        if not stages:
            raise ValueError(f"method '{self.name}' does not support activation checkpointing")
        for m in stages:
            checkpoint_module(m)

    def forward(self, x: torch.Tensor, visible: torch.Tensor,
                generator: torch.Generator | None = None) -> torch.Tensor:  # pragma: no cover - abstract
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
