"""Trainer state that nnU-Net's checkpoints do not hold (best validation loss, EMA teachers, mask tokens)."""
from __future__ import annotations

import os

import torch

from ssl3d.utils import atomic_write

EXTRAS_KEY = "ssl3d"


class CheckpointExtrasMixin:
    """Mix in before ``nnUNetTrainer``: ``checkpoint_extras()`` is stored under ``checkpoint["ssl3d"]`` next to
    nnU-Net's own entries and handed back to ``load_checkpoint_extras`` on resume (``--c``)."""

    def checkpoint_extras(self) -> dict:
        return {}

    def load_checkpoint_extras(self, extras: dict) -> None:
        pass

    def save_checkpoint(self, filename: str) -> None:
        super().save_checkpoint(filename)  # type: ignore[misc]
        extras = self.checkpoint_extras()
        if self.local_rank == 0 and not self.disable_checkpointing and extras and os.path.isfile(filename):
            ckpt = torch.load(filename, map_location="cpu", weights_only=False)
            ckpt[EXTRAS_KEY] = extras
            atomic_write(filename, lambda f: torch.save(ckpt, f))

    def load_checkpoint(self, filename_or_checkpoint) -> None:
        super().load_checkpoint(filename_or_checkpoint)  # type: ignore[misc]
        ckpt = filename_or_checkpoint if isinstance(filename_or_checkpoint, dict) else \
            torch.load(filename_or_checkpoint, map_location=self.device, weights_only=False)
        self.load_checkpoint_extras(ckpt.get(EXTRAS_KEY, {}))
