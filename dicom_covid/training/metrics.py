"""Classification metrics shared by training and evaluation."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import roc_auc_score, roc_curve

__all__ = ["choose_threshold", "macro_auc"]


def macro_auc(targets: np.ndarray, probs: np.ndarray) -> float:
    """Macro one-vs-rest ROC AUC over the classes present in ``targets``.

    Parameters
    ----------
    targets : array of int, shape (N,)
    probs : array of float, shape (N, C)

    Returns
    -------
    float
        NaN when fewer than two classes are present.
    """
    targets = np.asarray(targets)
    aucs = []
    for c in range(probs.shape[1]):
        positive = targets == c
        if positive.any() and (~positive).any():
            aucs.append(roc_auc_score(positive, probs[:, c]))
    return float(np.mean(aucs)) if aucs else float("nan")


def choose_threshold(is_positive: np.ndarray, score: np.ndarray) -> float:
    """Operating threshold that maximises Youden's J (sensitivity + specificity - 1).

    Parameters
    ----------
    is_positive : array of {0, 1}
    score : array of float

    Returns
    -------
    float
        The threshold; 0.5 when the labels hold a single class.
    """
    is_positive = np.asarray(is_positive)
    if is_positive.min() == is_positive.max():
        return 0.5
    fpr, tpr, thresholds = roc_curve(is_positive, score)
    best = int(np.argmax(tpr - fpr))
    return float(min(1.0, max(0.0, thresholds[best])))
