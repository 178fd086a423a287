"""Checkpoints: written under a temporary name and renamed (a kill never leaves a truncated checkpoint_*.pth),
read with one-line errors, and the trainer state nnU-Net's checkpoints do not hold (best validation loss, EMA
teachers, mask tokens)."""
from __future__ import annotations

import logging
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any, Sequence

import torch

from ssl3d.utils import BadInputError, atomic_write

EXTRAS_KEY = "ssl3d"
PARTIAL_SUFFIX = ".partial"  # nnU-Net writes here first; renamed once complete
logger = logging.getLogger(__name__)


# what torch.load raises for a truncated, foreign or non-torch file (unpickling can hit any of them)
_UNREADABLE = (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError, OSError,
               AttributeError, ImportError, TypeError)


def read_checkpoint(path: str | os.PathLike, map_location: Any = "cpu",
                    keys: Sequence[str] = ("network_weights",), weights_only_first: bool = False) -> dict:
    """``torch.load`` of a checkpoint; zero-byte, truncated, non-torch, non-dict or keyless files -> one-line
    BadInputError. ``weights_only_first``: try torch's safe loader first (no code runs for plain tensor dicts)
    and load fully only when the file holds objects outside its allow-list (foreign checkpoints)."""
    path = Path(path)
    if not path.is_file():
        raise BadInputError(path, "checkpoint missing")
    if path.stat().st_size == 0:
        raise BadInputError(path, "empty (zero-byte) checkpoint")

    def load(weights_only: bool):
        return torch.load(path, map_location=map_location, weights_only=weights_only)

    try:
        if weights_only_first:
            try:
                ckpt = load(True)
            except pickle.UnpicklingError:  # objects outside the safe allow-list (numpy arrays, classes)
                ckpt = load(False)
        else:
            ckpt = load(False)
    except _UNREADABLE as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise BadInputError(path, f"unreadable or truncated checkpoint ({first.split('. ')[0][:100]})") from None
    missing = [k for k in keys if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise BadInputError(path, f"not an nnU-Net/ssl3d checkpoint (no {', '.join(map(repr, missing))})")
    if not isinstance(ckpt, dict):
        raise BadInputError(path, f"not a checkpoint dict (a {type(ckpt).__name__})")
    return ckpt


def newest_readable_checkpoint(fold_dir: str | os.PathLike, map_location: Any = "cpu",
                               order: Sequence[str] = ("checkpoint_final.pth", "checkpoint_latest.pth",
                                                       "checkpoint_best.pth")) -> tuple[Path, dict] | None:
    """The first readable checkpoint of ``order`` (final, latest, best), then of any other ``checkpoint_*.pth``
    by modification time; an unreadable one is skipped with one warning. None when there is no checkpoint."""
    fold_dir = Path(fold_dir)
    named = [fold_dir / n for n in order if (fold_dir / n).is_file()]
    others = sorted((p for p in fold_dir.glob("checkpoint_*.pth") if p not in named),
                    key=lambda p: p.stat().st_mtime, reverse=True)
    bad: list[str] = []
    for path in named + others:
        try:
            ckpt = read_checkpoint(path, map_location, ("network_weights", "current_epoch"))
        except BadInputError as e:
            bad.append(e.line())
            continue
        if bad:
            logger.warning("skipping %s; continuing from %s", "; ".join(bad), path.name)
        return path, ckpt
    if bad:
        raise BadInputError(None, f"no readable checkpoint to continue from ({'; '.join(bad)}); pass --overwrite to "
                                  f"start over")
    return None


class AtomicCheckpointMixin:
    """Mix in before ``nnUNetTrainer``: nnU-Net's ``save_checkpoint`` writes the file in place, so a kill during the
    write leaves a truncated ``checkpoint_latest.pth``; here it writes ``<name>.partial`` and renames it."""

    def save_checkpoint(self, filename: str) -> None:
        tmp = filename + PARTIAL_SUFFIX
        super().save_checkpoint(tmp)  # type: ignore[misc]
        # nnU-Net writes on local rank 0 only; under DDP another rank would see rank 0's half-written file here
        # and load or rename it (EOFError on that rank, or a truncated checkpoint)
        if getattr(self, "local_rank", 0) == 0 and os.path.isfile(tmp):
            self.finish_checkpoint(tmp, filename)

    def finish_checkpoint(self, tmp: str, filename: str) -> None:
        os.replace(tmp, filename)


class CheckpointExtrasMixin(AtomicCheckpointMixin):
    """Mix in before ``nnUNetTrainer``: ``checkpoint_extras()`` is stored under ``checkpoint["ssl3d"]`` next to
    nnU-Net's own entries and handed back to ``load_checkpoint_extras`` on resume (``--c``)."""

    def checkpoint_extras(self) -> dict:
        return {}

    def load_checkpoint_extras(self, extras: dict) -> None:
        pass

    def finish_checkpoint(self, tmp: str, filename: str) -> None:
        extras = self.checkpoint_extras()
        if not extras:
            return super().finish_checkpoint(tmp, filename)
        ckpt = torch.load(tmp, map_location="cpu", weights_only=False)
        ckpt[EXTRAS_KEY] = extras
        atomic_write(filename, lambda f: torch.save(ckpt, f))
        os.remove(tmp)

    def load_checkpoint(self, filename_or_checkpoint) -> None:
        super().load_checkpoint(filename_or_checkpoint)  # type: ignore[misc]
        ckpt = filename_or_checkpoint if isinstance(filename_or_checkpoint, dict) else \
            torch.load(filename_or_checkpoint, map_location=self.device, weights_only=False)
        self.load_checkpoint_extras(ckpt.get(EXTRAS_KEY, {}))
