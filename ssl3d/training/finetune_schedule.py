"""When ``SSLFinetuneTrainer`` writes intermediate checkpoints and how it uses the CPU; kept out of the trainer module
so that the CLIs and the benchmark read it without importing nnU-Net's trainer (seconds of start-up)."""
from __future__ import annotations

import os
from typing import Sequence

# What ``ssl_finetune --lean`` (default on CPU) writes into the plans. None of them changes the batches, the network
# or the loss; benchmarks/finetune_profile.py measures them against nnU-Net's defaults.
CPU_SPEED_OPTIONS = {"torch_threads": "auto", "plot_every": 0, "save_best": False, "channels_last": True}


def checkpoint_epochs(num_epochs: int, fractions: Sequence[float]) -> list[int]:
    """Epoch counts (1-based, ascending, unique) after which intermediate checkpoints are written: each fraction
    of ``num_epochs`` rounded, at least 1; the final epoch is left to ``checkpoint_final.pth``."""
    bad = [f for f in fractions if not 0 < float(f) <= 1]
    if bad:
        raise ValueError(f"checkpoint fraction {bad[0]} must be in (0, 1]")
    return sorted({max(1, int(round(float(f) * num_epochs))) for f in fractions} - {num_epochs})


def intermediate_checkpoint_name(epochs_done: int) -> str:
    return f"checkpoint_ep{epochs_done}.pth"


def free_cores_for_torch(n_workers: int, cores: int | None = None) -> int:
    """Intra-op threads that leave one core to each augmentation worker (at least 1)."""
    return max(1, (cores or os.cpu_count() or 1) - n_workers)
