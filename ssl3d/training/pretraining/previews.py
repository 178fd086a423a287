"""Reconstruction previews: input, masked input and reconstruction on three orthogonal mid slices."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ssl3d.utils import save_figure


def save_reconstruction_preview(image: np.ndarray, visible: np.ndarray, reconstruction: np.ndarray,
                                path: str | os.PathLike, title: str = "") -> Path:
    """Write a 3×3 PNG (rows: input, masked input, reconstruction; columns: axial, coronal, sagittal).

    ``image``, ``visible`` (bool, voxel resolution) and ``reconstruction`` are ``(D, H, W)`` arrays of one
    channel. The file is written under a temporary name and renamed.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with matplotlib.rc_context({"font.size": 9, "axes.facecolor": "black"}):
        return _draw(image, visible, reconstruction, Path(path), title, plt)


def _draw(image, visible, reconstruction, path: Path, title: str, plt) -> Path:
    masked = np.where(visible, image, np.nan)
    lo, hi = np.percentile(image, [0.5, 99.5])
    d, h, w = image.shape
    views = [lambda a: a[d // 2], lambda a: a[:, h // 2], lambda a: a[:, :, w // 2]]
    fig, axes = plt.subplots(3, 3, figsize=(9, 9))
    for r, (name, arr) in enumerate([("input", image), ("masked input", masked), ("reconstruction", reconstruction)]):
        for c, (view, vname) in enumerate(zip(views, ("axial", "coronal", "sagittal"))):
            ax = axes[r, c]
            ax.imshow(view(arr), cmap="gray", vmin=lo, vmax=hi, aspect="auto", interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(vname, fontsize=12)  # explicit: nnU-Net's progress plot enlarges the global font
            if c == 0:
                ax.set_ylabel(name, fontsize=12)
    if title:
        fig.suptitle(title, fontsize=12)
    save_figure(fig, path, dpi=80)
    return path
