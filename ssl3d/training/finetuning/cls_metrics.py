"""Classification metrics from scikit-learn: AUC, balanced accuracy, per-class F1, confusion matrix (and its PNG),
and the linear probe's L2-regularised logistic regression.

AUC of two classes is ``roc_auc_score`` of class 1's probability; more classes: the macro mean of one-vs-rest
AUCs over the classes that have both positives and negatives present (sklearn's ``multi_class="ovr"`` refuses
a class missing from ``y_true``, which a small held-out fold has). An undefined metric (one class only) is NaN,
never a made-up number.
"""
from __future__ import annotations

import math
import os
import warnings
from typing import Sequence

import numpy as np
import torch
from sklearn import metrics as skm
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

from ssl3d.utils import save_figure


def binary_auc(y_true: Sequence[int], score: Sequence[float]) -> float:
    """Area under the ROC curve; NaN when only one class is present."""
    y = np.asarray(y_true).astype(bool)
    if y.all() or not y.any():
        return float("nan")
    return float(skm.roc_auc_score(y, np.asarray(score, dtype=np.float64)))


def auc(y_true: Sequence[int], probs: np.ndarray) -> float:
    """Binary AUC of class 1's probability, or the macro one-vs-rest AUC for more classes."""
    y, p = np.asarray(y_true, dtype=int), np.asarray(probs, dtype=np.float64)
    if p.shape[1] == 2:
        return binary_auc(y == 1, p[:, 1])
    per = [binary_auc(y == c, p[:, c]) for c in range(p.shape[1])]
    per = [a for a in per if not math.isnan(a)]
    return float(np.mean(per)) if per else float("nan")


def confusion_matrix(y_true: Sequence[int], y_pred: Sequence[int], n_classes: int) -> np.ndarray:
    """Rows: true class, columns: predicted class (every class, also those absent)."""
    return skm.confusion_matrix(np.asarray(y_true, dtype=int), np.asarray(y_pred, dtype=int),
                                labels=list(range(n_classes))).astype(np.int64)


def _balanced_accuracy(y: np.ndarray, pred: np.ndarray) -> float:
    with warnings.catch_warnings():  # a class predicted but absent from a small fold is expected, not news
        warnings.filterwarnings("ignore", message="y_pred contains classes not in y_true")
        return float(skm.balanced_accuracy_score(y, pred))


def classification_metrics(y_true: Sequence[int], probs: np.ndarray, class_names: Sequence[str]) -> dict:
    """AUC, balanced accuracy (mean recall over the classes present), accuracy, per-class F1 (NaN for a class
    absent and never predicted) and the confusion matrix."""
    y, p = np.asarray(y_true, dtype=int), np.asarray(probs, dtype=np.float64)
    pred = p.argmax(1)
    labels = list(range(len(class_names)))
    empty = len(y) == 0
    cm = confusion_matrix(y, pred, len(class_names)) if not empty else np.zeros((len(labels),) * 2, np.int64)
    f1 = skm.f1_score(y, pred, labels=labels, average=None, zero_division=np.nan) if not empty \
        else np.full(len(labels), np.nan)
    f1_per_class = {name: float(v) for name, v in zip(class_names, f1)}
    present = [v for v in f1_per_class.values() if not math.isnan(v)]
    return {"auc": auc(y, p) if not empty else float("nan"),
            "balanced_accuracy": _balanced_accuracy(y, pred) if not empty else float("nan"),
            "accuracy": float(skm.accuracy_score(y, pred)) if not empty else float("nan"),
            "f1_per_class": f1_per_class, "macro_f1": float(np.mean(present)) if present else float("nan"),
            "confusion_matrix": cm.tolist(), "n_cases": int(len(y)),
            "support": dict(zip(class_names, cm.sum(1).tolist()))}


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


def fit_logistic_regression(x: np.ndarray, y: Sequence[int], l2: float = 1e-2, max_iter: int = 1000) -> Pipeline:
    """Standardized features -> sklearn ``LogisticRegression`` (lbfgs, L2 penalty, bias not penalised).

    ``l2`` is the penalty per case: the objective is mean cross-entropy + ``l2 * ||W||^2``, i.e. sklearn's
    ``C = 1 / (2 n l2)`` (sklearn sums the loss over cases and adds ``||W||^2 / 2``), so the same ``l2``
    regularises the same whatever the budget.
    """
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=int)
    clf = LogisticRegression(C=1.0 / (2 * len(y) * l2) if l2 > 0 else np.inf, l1_ratio=0.0, max_iter=max_iter)
    return make_pipeline(StandardScaler(), clf).fit(x, y)


def predict_logistic(model: Pipeline, x: np.ndarray, n_classes: int) -> np.ndarray:
    """Class probabilities ``(N, n_classes)``; a class the probe never saw gets probability 0."""
    out = np.zeros((len(x), n_classes))
    out[:, model.classes_] = model.predict_proba(np.asarray(x, dtype=np.float64))
    return out


def probe_state(model: Pipeline) -> dict[str, torch.Tensor]:
    """The fitted probe as plain tensors (loadable with ``torch.load(weights_only=True)``): scaler mean/scale,
    sklearn's ``coef_`` / ``intercept_`` (one row for two classes) and the classes seen."""
    scaler, clf = model[0], model[-1]
    return {"mean": torch.as_tensor(scaler.mean_), "scale": torch.as_tensor(scaler.scale_),
            "coef": torch.as_tensor(clf.coef_), "intercept": torch.as_tensor(clf.intercept_),
            "classes": torch.as_tensor(clf.classes_)}
