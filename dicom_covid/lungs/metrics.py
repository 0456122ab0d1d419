"""Mask metrics: the share of heat inside a mask, Dice, and summary statistics.

Plain numpy; nothing here loads a network. Heat share definition: ``sum(heat * mask) /
sum(heat)`` over the source-resolution Grad-CAM map (values in ``[0, 1]``). A heat map spread
evenly over the image gives the lung area fraction; 1.0 means all heat inside the lungs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

__all__ = ["dice", "heat_share", "top_heat_share"]


def _check_pair(heat: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    h = np.asarray(heat, dtype=np.float64)
    m = np.asarray(mask)
    if h.ndim != 2 or h.shape != m.shape:
        raise ValueError(
            f"heat map {h.shape} and mask {m.shape} must be 2-D arrays of the same shape "
            "(resize the heat map to the image, e.g. Explainer.heatmap)"
        )
    if not np.all(np.isfinite(h)):
        raise ValueError("heat map holds NaN or infinite values")
    if h.size and float(h.min()) < 0.0:
        raise ValueError(f"heat map has negative values (min {float(h.min()):.3g}); expected >= 0")
    return h, m.astype(bool)


def heat_share(heat: np.ndarray, mask: np.ndarray) -> float:
    """Share of the total heat that lies inside a mask: ``sum(heat[mask]) / sum(heat)``.

    Parameters
    ----------
    heat : numpy.ndarray
        ``(H, W)`` non-negative heat map (e.g. :meth:`dicom_covid.explain.Explainer.heatmap`).
    mask : numpy.ndarray
        ``(H, W)`` boolean mask (e.g. :meth:`LungSegmenter.mask`).

    Returns
    -------
    float
        In ``[0, 1]``; ``nan`` when the heat map is all zero (nothing to share).

    Raises
    ------
    ValueError
        Shapes differ, not 2-D, negative or non-finite heat.

    Notes
    -----
    A heat map that is uniform over the image gives the mask's area fraction, so compare the
    share with the lung area fraction of the same image.
    """
    h, m = _check_pair(heat, mask)
    total = float(h.sum())
    if total <= 0.0:
        return float("nan")
    return float(h[m].sum() / total)


def top_heat_share(heat: np.ndarray, mask: np.ndarray, top: float = 0.1) -> float:
    """Share of the hottest ``top`` fraction of pixels that lies inside a mask.

    The hottest pixels are those with heat at or above the ``1 - top`` quantile; ties at the
    threshold are all counted. Less sensitive than :func:`heat_share` to a faint glow spread
    over the whole image.

    Parameters
    ----------
    heat, mask : numpy.ndarray
        As in :func:`heat_share`.
    top : float
        Fraction of pixels called hot, in ``(0, 1]``.

    Returns
    -------
    float
        In ``[0, 1]``; ``nan`` when the heat map is all zero.
    """
    if not 0.0 < top <= 1.0:
        raise ValueError(f"top must be in (0, 1], got {top}")
    h, m = _check_pair(heat, mask)
    if float(h.max(initial=0.0)) <= 0.0:
        return float("nan")
    cut = float(np.quantile(h, 1.0 - top))
    hot = h >= cut if cut > 0.0 else h > 0.0
    return float(m[hot].mean())


def dice(pred: np.ndarray, ref: np.ndarray) -> float:
    """Dice coefficient ``2 |A & B| / (|A| + |B|)`` of two boolean masks (1.0 when both empty)."""
    a = np.asarray(pred, dtype=bool)
    b = np.asarray(ref, dtype=bool)
    if a.shape != b.shape:
        raise ValueError(f"masks differ in shape: {a.shape} vs {b.shape}")
    denom = int(a.sum()) + int(b.sum())
    return 1.0 if denom == 0 else float(2.0 * np.logical_and(a, b).sum() / denom)


def _summary(values: Sequence[float]) -> dict[str, float | int]:
    """n, mean, median, min, max, q1 and q3 of the non-NaN values (only n when none)."""
    v = np.asarray([x for x in values if not math.isnan(x)], dtype=np.float64)
    if v.size == 0:
        return {"n": 0}
    q1, med, q3 = np.quantile(v, [0.25, 0.5, 0.75])
    return {
        "n": int(v.size),
        "mean": float(v.mean()),
        "median": float(med),
        "min": float(v.min()),
        "max": float(v.max()),
        "q1": float(q1),
        "q3": float(q3),
    }
