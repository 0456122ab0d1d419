"""Classification metrics shared by training and evaluation."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import roc_auc_score, roc_curve

__all__ = ["binary_auc", "choose_threshold", "expected_calibration_error", "macro_auc"]


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


def binary_auc(is_positive: np.ndarray, score: np.ndarray) -> float:
    """ROC AUC of ``score`` for a binary target, by the rank-sum (Mann-Whitney) formula.

    Ties get average ranks, so the result equals :func:`sklearn.metrics.roc_auc_score`; it is
    a few times faster, which matters inside a bootstrap loop.

    Parameters
    ----------
    is_positive : array of bool or {0, 1}, shape (N,)
    score : array of float, shape (N,)

    Returns
    -------
    float
        NaN when only one class is present.
    """
    from scipy.stats import rankdata

    is_positive = np.asarray(is_positive, dtype=bool)
    n_pos = int(is_positive.sum())
    n_neg = is_positive.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(np.asarray(score, dtype=np.float64))
    return float((ranks[is_positive].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def expected_calibration_error(targets: np.ndarray, probs: np.ndarray, n_bins: int = 15) -> float:
    """Top-label expected calibration error with equal-width confidence bins.

    ``sum_b |accuracy_b - confidence_b| * n_b / N`` over bins ``(k/n_bins, (k+1)/n_bins]`` of the
    top probability (Guo et al. 2017).

    Parameters
    ----------
    targets : array of int, shape (N,)
    probs : array of float, shape (N, C)
    n_bins : int
        Number of bins (default 15).

    Returns
    -------
    float
        NaN for an empty input.
    """
    targets = np.asarray(targets)
    probs = np.asarray(probs, dtype=np.float64)
    if targets.size == 0:
        return float("nan")
    confidence = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == targets).astype(np.float64)
    # bin k holds confidences in (k/n, (k+1)/n]; a confidence of 0 goes to the first bin
    bins = np.clip(np.ceil(confidence * n_bins).astype(int) - 1, 0, n_bins - 1)
    acc_sum = np.bincount(bins, weights=correct, minlength=n_bins)
    conf_sum = np.bincount(bins, weights=confidence, minlength=n_bins)
    return float(np.abs(acc_sum - conf_sum).sum() / targets.size)


def bootstrap_auc_ci(
    is_positive: np.ndarray, score: np.ndarray, n_resamples: int = 1000, seed: int = 0
) -> tuple[float, list[float] | None]:
    """Binary AUC and its 95 % stratified percentile bootstrap interval.

    Each resample draws positives and negatives separately with replacement (their counts kept),
    so every resampled AUC is defined.

    Parameters
    ----------
    is_positive : array of bool or {0, 1}, shape (N,)
    score : array of float, shape (N,)
    n_resamples : int
    seed : int

    Returns
    -------
    tuple
        ``(auc, [low, high])``; the interval is None when ``n_resamples`` is 0.
    """
    is_positive = np.asarray(is_positive, dtype=bool)
    score = np.asarray(score, dtype=np.float64)
    if n_resamples <= 0:
        return binary_auc(is_positive, score), None
    pos, neg = np.flatnonzero(is_positive), np.flatnonzero(~is_positive)
    rng = np.random.default_rng(seed)
    stats = np.empty(n_resamples)
    for i in range(n_resamples):
        idx = np.concatenate([rng.choice(pos, pos.size), rng.choice(neg, neg.size)])
        stats[i] = binary_auc(is_positive[idx], score[idx])
    low, high = np.percentile(stats, [2.5, 97.5])
    return binary_auc(is_positive, score), [float(low), float(high)]
