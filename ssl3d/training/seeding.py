"""Reproducible training given a seed: initialisation, case order, crops and augmentation.

nnU-Net leaves its data-augmentation workers unseeded (two runs with the same settings differ). Given a seed,
ssl3d seeds Python, NumPy and torch in the main process (network init, single-threaded loading) and gives
every augmentation worker its own seed derived from (seed, rank, worker). With at most one worker per loader
(``nnUNet_n_proc_DA`` ≤ 1, as on CPU) runs are then identical; with more, nnU-Net's non-deterministic
augmenter still interleaves the workers' batches in arrival order.
"""
from __future__ import annotations

import contextlib
import random
import zlib
from typing import Iterator

import numpy as np
import torch

from ssl3d.utils import DiesWithParent


def derive_seed(*parts: object) -> int:
    """A 31-bit seed from any tuple of parts (stable across processes and Python versions)."""
    return zlib.crc32("/".join(str(p) for p in parts).encode()) & 0x7FFFFFFF


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def worker_seeds(seed: int, rank: int, stream: str, n_workers: int) -> list[int]:
    return [derive_seed(seed, rank, stream, i) for i in range(n_workers)]


@contextlib.contextmanager
def seeded_nnunet_augmenters(seed: int, rank: int) -> Iterator[None]:
    """While active, the augmenters nnU-Net's ``get_dataloaders`` builds get per-worker seeds.

    nnU-Net constructs ``NonDetMultiThreadedAugmenter(..., seeds=None)`` inside its trainer module; the name is
    swapped there for a subclass that fills the seeds (first call: training loader, second: validation).
    """
    import nnunetv2.training.nnUNetTrainer.nnUNetTrainer as trainer_module

    original = trainer_module.NonDetMultiThreadedAugmenter
    streams = iter(("train", "val", "extra"))

    class SeededAugmenter(original):
        def __init__(self, data_loader, transform, num_processes, *args, **kwargs):
            kwargs["seeds"] = worker_seeds(seed, rank, next(streams, "extra"), num_processes)
            # workers die with nnUNetv2_train, also on its kill -9
            super().__init__(DiesWithParent(data_loader), transform, num_processes, *args, **kwargs)

    trainer_module.NonDetMultiThreadedAugmenter = SeededAugmenter
    try:
        yield
    finally:
        trainer_module.NonDetMultiThreadedAugmenter = original
