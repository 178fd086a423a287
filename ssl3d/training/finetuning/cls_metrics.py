"""Classification metrics without scikit-learn: rank AUC (ties averaged), balanced accuracy, per-class F1,
confusion matrix (and its PNG), an L2-regularised logistic regression for linear probes.

AUC is the Mann-Whitney statistic: (sum of the positives' ranks - n_pos (n_pos + 1) / 2) / (n_pos n_neg), with
tied scores sharing their average rank (a tie between a positive and a negative counts 1/2). More than two
classes: the macro mean of one-vs-rest AUCs over the classes that have both positives and negatives present.
An undefined metric (one class only) is NaN, never a made-up number.
"""
from __future__ import annotations

import math
import os
from typing import Sequence

import numpy as np
import torch

from ssl3d.utils import save_figure


def average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks; tied values get the mean of the ranks they span."""
    v = np.asarray(values, dtype=np.float64)
    order = np.argsort(v, kind="mergesort")
    ranks = np.empty(len(v), dtype=np.float64)
    sorted_v = v[order]
    i = 0
    while i < len(v):
        j = i
        while j + 1 < len(v) and sorted_v[j + 1] == sorted_v[i]:
            j += 1
        ranks[order[i:j + 1]] = 0.5 * (i + j) + 1.0
        i = j + 1
    return ranks


def binary_auc(y_true: Sequence[int], score: Sequence[float]) -> float:
    y = np.asarray(y_true).astype(bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    r = average_ranks(np.asarray(score, dtype=np.float64))
    return float((r[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def auc(y_true: Sequence[int], probs: np.ndarray) -> float:
    """Binary AUC of class 1's probability, or the macro one-vs-rest AUC for more classes."""
    y, p = np.asarray(y_true, dtype=int), np.asarray(probs, dtype=np.float64)
    if p.shape[1] == 2:
        return binary_auc(y == 1, p[:, 1])
    per = [binary_auc(y == c, p[:, c]) for c in range(p.shape[1])]
    per = [a for a in per if not math.isnan(a)]
    return float(np.mean(per)) if per else float("nan")


def confusion_matrix(y_true: Sequence[int], y_pred: Sequence[int], n_classes: int) -> np.ndarray:
    """Rows: true class, columns: predicted class."""
    cm = np.zeros((n_classes, n_classes), dtype=np.int64)
    for t, p in zip(y_true, y_pred):
        cm[int(t), int(p)] += 1
    return cm


def classification_metrics(y_true: Sequence[int], probs: np.ndarray, class_names: Sequence[str]) -> dict:
    """AUC, balanced accuracy (mean recall over the classes present), accuracy, per-class F1 and confusion."""
    y, p = np.asarray(y_true, dtype=int), np.asarray(probs, dtype=np.float64)
    pred = p.argmax(1)
    cm = confusion_matrix(y, pred, len(class_names))
    support = cm.sum(1)
    recall = np.divide(np.diag(cm), support, out=np.full(len(cm), np.nan), where=support > 0)
    predicted = cm.sum(0)
    precision = np.divide(np.diag(cm), predicted, out=np.zeros(len(cm)), where=predicted > 0)
    f1 = {}
    for c, name in enumerate(class_names):
        if support[c] == 0 and predicted[c] == 0:
            f1[name] = float("nan")  # class absent and never predicted: F1 undefined
            continue
        r = 0.0 if support[c] == 0 else recall[c]
        f1[name] = 0.0 if precision[c] + r == 0 else float(2 * precision[c] * r / (precision[c] + r))
    present = [v for v in f1.values() if not math.isnan(v)]
    return {"auc": auc(y, p), "balanced_accuracy": float(np.nanmean(recall)) if (support > 0).any() else float("nan"),
            "accuracy": float((pred == y).mean()) if len(y) else float("nan"), "f1_per_class": f1,
            "macro_f1": float(np.mean(present)) if present else float("nan"), "confusion_matrix": cm.tolist(),
            "n_cases": int(len(y)), "support": dict(zip(class_names, support.tolist()))}


def save_confusion_png(cm: Sequence[Sequence[int]], class_names: Sequence[str], path: str | os.PathLike,
                       title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cm = np.asarray(cm)
    fig, ax = plt.subplots(figsize=(1.2 * len(class_names) + 2, 1.2 * len(class_names) + 1.5))
    ax.imshow(cm, cmap="Blues", vmin=0, vmax=max(1, int(cm.max())))
    for (i, j), v in np.ndenumerate(cm):
        ax.text(j, i, str(v), ha="center", va="center", color="white" if v > cm.max() / 2 else "black")
    ax.set_xticks(range(len(class_names)), class_names)
    ax.set_yticks(range(len(class_names)), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    save_figure(fig, path)


def fit_logistic_regression(x: np.ndarray, y: Sequence[int], n_classes: int, l2: float = 1e-2,
                            max_iter: int = 200) -> dict:
    """Multinomial logistic regression on standardized features (mean/std of ``x``), full-batch LBFGS with an
    L2 penalty ``l2 * ||W||^2`` (not on the bias). Returns ``{"weight", "bias", "mean", "std"}`` as tensors."""
    xt = torch.as_tensor(np.asarray(x, dtype=np.float64))
    yt = torch.as_tensor(np.asarray(y, dtype=np.int64))
    mean, std = xt.mean(0), xt.std(0, unbiased=False).clamp_min(1e-6)
    z = (xt - mean) / std
    w = torch.zeros(xt.shape[1], n_classes, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(n_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(z @ w + b, yt) + l2 * (w ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return {"weight": w.detach(), "bias": b.detach(), "mean": mean, "std": std}


def predict_logistic(model: dict, x: np.ndarray) -> np.ndarray:
    """Class probabilities ``(N, classes)`` of a model from :func:`fit_logistic_regression`."""
    z = (torch.as_tensor(np.asarray(x, dtype=np.float64)) - model["mean"]) / model["std"]
    return torch.softmax(z @ model["weight"] + model["bias"], 1).numpy()
