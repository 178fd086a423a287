"""Feature reuse: linear CKA between a pretrained encoder's stage features and the fine-tuned network's (the SMIT
benchmark's analysis). CKA near 1 at a stage means fine-tuning kept that stage's representation.

Examples are the spatial positions of a stage's map over all test patches, features its channels; both
encoders see the same preprocessed test patches (fine-tuning keeps the pretraining's preprocessing).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ssl3d.architectures.encoders import DownstreamEncoder
from ssl3d.architectures.from_plans import build_network_from_plans
from ssl3d.inference.features import encoder_stage_features, load_encoder
from ssl3d.utils import read_json, save_figure

logger = logging.getLogger(__name__)


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA of two representations of the same ``n`` examples, ``x (n, p)`` and ``y (n, q)``."""
    x = x.double() - x.double().mean(0, keepdim=True)
    y = y.double() - y.double().mean(0, keepdim=True)
    cross = (y.T @ x).pow(2).sum()
    norm = torch.linalg.matrix_norm(x.T @ x) * torch.linalg.matrix_norm(y.T @ y)
    return float(cross / norm) if norm > 0 else float("nan")


def stage_cka(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> list[float]:
    """CKA per stage between two lists of ``(B, C, z, y, x)`` maps of equal spatial size."""
    out = []
    for fa, fb in zip(a, b):
        if fa.shape[2:] != fb.shape[2:]:
            raise ValueError(f"stage maps differ in size: {tuple(fa.shape)} vs {tuple(fb.shape)}")
        out.append(linear_cka(fa.movedim(1, -1).reshape(-1, fa.shape[1]), fb.movedim(1, -1).reshape(-1, fb.shape[1])))
    return out


def _center_patch(volume: np.ndarray, patch: Sequence[int]) -> np.ndarray:
    """``(C, Z, Y, X)`` center crop, zero-padded where the volume is smaller than the patch."""
    out = np.zeros((volume.shape[0], *patch), np.float32)
    src, dst = [], []
    for s, p in zip(volume.shape[1:], patch):
        lo = max(0, (s - p) // 2)
        n = min(s, p)
        off = max(0, (p - s) // 2)
        src.append(slice(lo, lo + n))
        dst.append(slice(off, off + n))
    out[(slice(None), *dst)] = volume[(slice(None), *src)]
    return out


def center_patches(preprocessed: Path, cases: Sequence[str], patch: Sequence[int]) -> torch.Tensor:
    import blosc2

    return torch.from_numpy(np.stack([_center_patch(np.asarray(blosc2.open(str(preprocessed / f"{c}.b2nd"),
                                                                           mode="r")[:]), patch) for c in cases]))


def finetuned_network(results: Path) -> torch.nn.Module:
    """The fine-tuned network of an nnU-Net results folder (``plans.json`` + ``fold_0/checkpoint_final.pth``)."""
    plans, dj = read_json(results / "plans.json"), read_json(results / "dataset.json")
    arch = plans["configurations"]["3d_fullres"]["architecture"]
    net = build_network_from_plans(arch, len(dj["channel_names"]), len(dj["labels"]), deep_supervision=False)
    state = torch.load(results / "fold_0" / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    net.load_state_dict(state["network_weights"])
    return net.eval()


@torch.inference_mode()
def feature_reuse(out: Path, arms: list[dict], pretraining: dict, labeled: str, test_cases: Sequence[str],
                  max_cases: int = 4) -> list[dict]:
    """CKA per stage for every finished arm: its fine-tuned encoder vs the pretrained encoder of its base method."""
    rows, encoders, inputs = [], {}, {}
    for arm in arms:
        base = arm["base"]
        if base not in pretraining:
            continue
        if base not in encoders:
            encoders[base] = load_encoder(pretraining[base]["results"], device="cpu")
        enc = encoders[base]
        results = (out / "arms" / arm["id"] / "nnUNet_results" / labeled /
                   f"SSLFinetuneTrainer__{arm['plans']}__3d_fullres")
        if not (results / "fold_0" / "checkpoint_final.pth").is_file():
            continue
        net = finetuned_network(results)
        ident = read_json(results / "plans.json")["configurations"]["3d_fullres"]["data_identifier"]
        if ident not in inputs:
            inputs[ident] = center_patches(out / "nnUNet_preprocessed" / labeled / ident, test_cases[:max_cases],
                                         enc.patch_size)
        x = inputs[ident]
        rows.append({"id": arm["id"], "method": arm["method"], "base": base, "n_train": arm["n_train"],
                     "seed": arm["seed"], "cka": stage_cka(encoder_stage_features(enc.method, x),
                                                           DownstreamEncoder(net)(x))})
    return rows


def plot_cka(rows: list[dict], labels: dict[str, str], path: Path) -> None:
    """Heat map: one row per (method, labeled cases) averaged over seeds, one column per encoder stage."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict[tuple[str, int], list[list[float]]] = {}
    for r in rows:
        groups.setdefault((labels.get(r["id"], r["method"]), int(r["n_train"])), []).append(r["cka"])
    keys = sorted(groups)
    n_stages = max(len(v[0]) for v in groups.values())
    grid = np.full((len(keys), n_stages), np.nan)
    for i, k in enumerate(keys):
        vals = np.array([v + [np.nan] * (n_stages - len(v)) for v in groups[k]], dtype=float)
        grid[i] = np.nanmean(vals, 0)
    with matplotlib.rc_context({"font.size": 9}):
        fig, ax = plt.subplots(figsize=(1.4 + 0.9 * n_stages, 1.2 + 0.45 * len(keys)))
        im = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
        for i in range(grid.shape[0]):
            for j in range(grid.shape[1]):
                if not np.isnan(grid[i, j]):
                    ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center",
                            color="white" if grid[i, j] < 0.6 else "black", fontsize=8)
        ax.set_xticks(range(n_stages), [f"stage {s}" for s in range(n_stages)])
        ax.set_yticks(range(len(keys)), [f"{m}, {n} labeled" for m, n in keys])
        ax.set_title("linear CKA: pretrained vs fine-tuned encoder")
        fig.colorbar(im, ax=ax, fraction=0.05)
        save_figure(fig, path, dpi=110)
