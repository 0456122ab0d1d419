"""Evaluation of a bundle model on a labelled manifest, beside the shortcut control.

:func:`compute_metrics` is pure numpy (plus the AUC helpers of
:mod:`~dicom_covid.training.metrics`): three-class accuracy, per-class
sensitivity/specificity/PPV/AUC, macro one-vs-rest AUC, COVID-vs-rest AUC, infected-vs-normal
accuracy (COVID and pneumonia together against normal, from the argmax label,
the framing of the ICECCO 2021 paper), top-label expected calibration error (15 bins), 95 %
bootstrap intervals for the headline metrics and a per-source breakdown.

:func:`evaluate_model` reads each manifest row with :func:`~dicom_covid.reader.read_image`, runs
:meth:`~dicom_covid.inference.Predictor.probabilities` in batches, computes the shortcut control's
features from the same pixels and returns a JSON-ready dict. A rejected image is counted and
listed, not fatal.

Bootstrap: stratified percentile bootstrap. Each resample draws, within every true class, as many
rows as that class has (with replacement), so every resample keeps the class counts and every AUC
stays defined. 1000 resamples and seed 0 by default.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
from tqdm.auto import tqdm

from ..errors import DataError, InputRejected
from ..inference import Predictor
from ..prediction import DISCLAIMER
from ..reader import XrayImage, read_image
from ..training.data import LABELS, ManifestRow
from ..training.metrics import binary_auc, expected_calibration_error
from .shortcut import ShortcutControl, shortcut_features

__all__ = [
    "HEADLINE_METRICS",
    "adult_metrics",
    "compute_metrics",
    "evaluate_model",
    "load_predictions",
    "to_json_ready",
]

logger = logging.getLogger(__name__)

#: Metrics that get a bootstrap confidence interval (``<name>_ci``).
HEADLINE_METRICS: tuple[str, ...] = (
    "accuracy",
    "covid_auc",
    "macro_auc",
    "infected_vs_normal_accuracy",
)


def _safe_div(num: float, den: float) -> float:
    return float(num / den) if den else float("nan")


def _headline(targets: np.ndarray, probs: np.ndarray, covid: int, normal: int) -> np.ndarray:
    """Headline metrics in :data:`HEADLINE_METRICS` order."""
    pred = probs.argmax(axis=1)
    aucs = [binary_auc(targets == c, probs[:, c]) for c in range(probs.shape[1])]
    defined = [a for a in aucs if not np.isnan(a)]
    return np.array(
        [
            float((pred == targets).mean()),
            aucs[covid],
            float(np.mean(defined)) if defined else float("nan"),
            float(((pred != normal) == (targets != normal)).mean()),
        ]
    )


def _bootstrap(
    targets: np.ndarray,
    probs: np.ndarray,
    covid: int,
    normal: int,
    n_resamples: int,
    seed: int,
    confidence: float,
) -> dict[str, list[float]]:
    """Stratified percentile bootstrap intervals of the headline metrics."""
    rng = np.random.default_rng(seed)
    groups = [np.flatnonzero(targets == c) for c in np.unique(targets)]
    stats = np.empty((n_resamples, len(HEADLINE_METRICS)))
    for i in range(n_resamples):
        idx = np.concatenate([rng.choice(g, size=g.size, replace=True) for g in groups])
        stats[i] = _headline(targets[idx], probs[idx], covid, normal)
    alpha = (1.0 - confidence) / 2.0
    out = {}
    for j, name in enumerate(HEADLINE_METRICS):
        col = stats[:, j][~np.isnan(stats[:, j])]
        out[f"{name}_ci"] = (
            [float(np.quantile(col, alpha)), float(np.quantile(col, 1.0 - alpha))]
            if col.size
            else [float("nan"), float("nan")]
        )
    return out


def compute_metrics(
    targets: np.ndarray,
    probs: np.ndarray,
    sources: Sequence[str] | None = None,
    *,
    labels: Sequence[str] = LABELS,
    covid_threshold: float | None = None,
    n_bootstrap: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    n_bins: int = 15,
) -> dict[str, object]:
    """Classification metrics of three-class probabilities.

    Parameters
    ----------
    targets : array of int, shape (N,)
        True class indices into ``labels``.
    probs : array of float, shape (N, C)
        Predicted probabilities, columns in ``labels`` order.
    sources : sequence of str, optional
        Collection each row came from; adds ``per_source``.
    labels : sequence of str
        Class names; must contain ``"covid"`` and ``"normal"``.
    covid_threshold : float, optional
        Operating threshold on P(covid); adds ``covid_at_threshold`` (sensitivity, specificity,
        PPV of the screening decision ``P(covid) >= threshold``).
    n_bootstrap : int
        Bootstrap resamples for the intervals (0 disables them).
    confidence : float
        Interval coverage (default 0.95).
    seed : int
        Bootstrap seed.
    n_bins : int
        Bins of the expected calibration error.

    Returns
    -------
    dict
        ``n``, ``accuracy``, ``covid_auc``, ``macro_auc``, ``infected_vs_normal_accuracy``,
        ``ece``, ``<headline>_ci`` (``[low, high]``), ``per_class`` (label → ``n``,
        ``sensitivity``, ``specificity``, ``ppv``, ``auc``), ``confusion_matrix`` (rows = truth,
        columns = prediction), ``bootstrap`` (method description) and, when asked,
        ``covid_at_threshold`` and ``per_source``. Undefined values are NaN.

    Raises
    ------
    ValueError
        On empty input or mismatched shapes.
    """
    targets = np.asarray(targets, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    labels = list(labels)
    if targets.ndim != 1 or probs.ndim != 2 or probs.shape != (targets.size, len(labels)):
        raise ValueError(
            f"targets {targets.shape} and probs {probs.shape} do not match {len(labels)} labels"
        )
    if targets.size == 0:
        raise ValueError("no rows to compute metrics on")
    covid, normal = labels.index("covid"), labels.index("normal")
    pred = probs.argmax(axis=1)
    n_classes = len(labels)
    cm = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(cm, (targets, pred), 1)

    headline = _headline(targets, probs, covid, normal)
    result: dict[str, object] = {"n": int(targets.size)}
    result.update({name: float(v) for name, v in zip(HEADLINE_METRICS, headline, strict=True)})
    result["ece"] = expected_calibration_error(targets, probs, n_bins=n_bins)

    per_class = {}
    for c, name in enumerate(labels):
        tp = int(cm[c, c])
        fn = int(cm[c].sum() - tp)
        fp = int(cm[:, c].sum() - tp)
        tn = int(cm.sum() - tp - fn - fp)
        per_class[name] = {
            "n": tp + fn,
            "sensitivity": _safe_div(tp, tp + fn),
            "specificity": _safe_div(tn, tn + fp),
            "ppv": _safe_div(tp, tp + fp),
            "auc": binary_auc(targets == c, probs[:, c]),
        }
    result["per_class"] = per_class
    result["confusion_matrix"] = cm.tolist()
    result["labels"] = labels

    if covid_threshold is not None:
        flagged = probs[:, covid] >= covid_threshold
        is_covid = targets == covid
        result["covid_at_threshold"] = {
            "threshold": float(covid_threshold),
            "sensitivity": _safe_div((flagged & is_covid).sum(), is_covid.sum()),
            "specificity": _safe_div((~flagged & ~is_covid).sum(), (~is_covid).sum()),
            "ppv": _safe_div((flagged & is_covid).sum(), flagged.sum()),
        }

    if n_bootstrap > 0:
        result.update(_bootstrap(targets, probs, covid, normal, n_bootstrap, seed, confidence))
    result["bootstrap"] = {
        "method": "stratified percentile bootstrap (rows resampled within each true class)",
        "resamples": int(n_bootstrap),
        "confidence": confidence,
        "seed": seed,
    }

    if sources is not None:
        sources = np.asarray([str(s) for s in sources])
        if sources.size != targets.size:
            raise ValueError(f"{sources.size} sources for {targets.size} rows")
        per_source = {}
        for src in sorted(set(sources.tolist())):
            m = sources == src
            per_source[src or "(none)"] = {
                "n": int(m.sum()),
                "accuracy": float((pred[m] == targets[m]).mean()),
                "covid_auc": binary_auc(targets[m] == covid, probs[m, covid]),
                "class_counts": {lab: int((targets[m] == c).sum()) for c, lab in enumerate(labels)},
            }
        result["per_source"] = per_source
    return result


def _wilson(successes: int, n: int, z: float = 1.96) -> list[float]:
    """Wilson score interval of a proportion (95 % by default)."""
    if n == 0:
        return [float("nan"), float("nan")]
    phat = successes / n
    den = 1 + z**2 / n
    centre = (phat + z**2 / (2 * n)) / den
    half = z * np.sqrt(phat * (1 - phat) / n + z**2 / (4 * n**2)) / den
    return [float(centre - half), float(centre + half)]


def adult_metrics(
    targets: np.ndarray,
    probs: np.ndarray,
    labels: Sequence[str] = LABELS,
    covid_threshold: float | None = None,
    n_bootstrap: int = 1000,
    seed: int = 0,
) -> dict[str, object]:
    """COVID-19 against adult non-COVID pneumonia, on adult images only.

    The question that matters for adults (the version-1 data could not answer it: its
    pneumonia was pediatric): among adults with an infection on the film, does P(COVID-19)
    separate COVID-19 from other pneumonia?

    Parameters
    ----------
    targets, probs : numpy.ndarray
        Adult rows only: class indices ``(N,)`` and probabilities ``(N, C)``.
    labels : sequence of str
        Class order.
    covid_threshold : float, optional
        Operating threshold for sensitivity (on COVID-19) and specificity (on pneumonia).
    n_bootstrap, seed : int
        Bootstrap of the AUC interval.

    Returns
    -------
    dict
        ``n``, ``class_counts``, ``accuracy`` (3-class, all adults), ``covid_vs_pneumonia_auc``
        with ``_ci``, ``covid_vs_rest_auc``, and at the threshold ``covid_sensitivity`` /
        ``covid_vs_pneumonia_specificity`` with Wilson intervals.
    """
    from ..training.metrics import bootstrap_auc_ci

    covid, pneu = labels.index("covid"), labels.index("pneumonia")
    out: dict[str, object] = {
        "n": int(targets.size),
        "class_counts": {lab: int((targets == c).sum()) for c, lab in enumerate(labels)},
        "accuracy": float((probs.argmax(1) == targets).mean()) if targets.size else float("nan"),
        "covid_vs_rest_auc": binary_auc(targets == covid, probs[:, covid]),
    }
    infected = (targets == covid) | (targets == pneu)
    y, score = (targets[infected] == covid), probs[infected, covid]
    if y.any() and (~y).any():
        auc, ci = bootstrap_auc_ci(y, score, n_resamples=n_bootstrap, seed=seed)
        out["covid_vs_pneumonia_auc"], out["covid_vs_pneumonia_auc_ci"] = auc, ci
    else:
        out["covid_vs_pneumonia_auc"], out["covid_vs_pneumonia_auc_ci"] = float("nan"), None
    if covid_threshold is not None:
        flagged = score >= covid_threshold
        tp, npos = int((flagged & y).sum()), int(y.sum())
        tn, nneg = int((~flagged & ~y).sum()), int((~y).sum())
        out["threshold"] = float(covid_threshold)
        out["covid_sensitivity"] = _safe_div(tp, npos)
        out["covid_sensitivity_ci"] = _wilson(tp, npos)
        out["covid_vs_pneumonia_specificity"] = _safe_div(tn, nneg)
        out["covid_vs_pneumonia_specificity_ci"] = _wilson(tn, nneg)
    return out


def to_json_ready(value: object) -> object:
    """Replace NaN/inf by None and numpy scalars by Python ones, recursively (strict JSON)."""
    if isinstance(value, dict):
        return {str(k): to_json_ready(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_json_ready(v) for v in value]
    if isinstance(value, np.ndarray):
        return to_json_ready(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


def _relative(row: ManifestRow) -> str:
    return row.extra.get("path") or str(row.path)


def evaluate_model(
    predictor: Predictor,
    rows: Sequence[ManifestRow],
    *,
    shortcut: ShortcutControl | None = None,
    batch_size: int = 16,
    n_bootstrap: int = 1000,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, object]:
    """Evaluate a model (and the shortcut control) on labelled rows.

    Parameters
    ----------
    predictor : Predictor
        The model under evaluation.
    rows : sequence of ManifestRow
        Labelled images (e.g. :func:`~dicom_covid.training.data.read_manifest`).
    shortcut : ShortcutControl, optional
        Fitted shortcut control, evaluated on the same rows.
    batch_size : int
        Images per forward pass.
    n_bootstrap : int
        Bootstrap resamples for the intervals.
    seed : int
        Bootstrap seed.
    progress : bool
        Show a tqdm progress bar.

    Returns
    -------
    dict
        The :func:`compute_metrics` keys for the model plus ``model``, ``model_title``,
        ``bundle_version``, ``n_rejected``, ``rejected`` (``path``, ``reason``, ``message``),
        ``shortcut_control`` (metrics of the control with its description, or None),
        ``predictions`` (one dict per evaluated row: ``path``, ``label``, ``source``,
        ``probabilities`` and ``shortcut_probabilities``) and ``disclaimer``.

    Raises
    ------
    DataError
        When the rows use labels the model does not know, or no image can be read.
    """
    labels = list(predictor.labels)
    unknown = sorted({r.label for r in rows} - set(labels))
    if unknown:
        raise DataError(
            f"labels {unknown} are not outputs of model {predictor.facts.name!r} ({labels})."
        )
    kept: list[ManifestRow] = []
    rejected: list[dict[str, str]] = []
    probs: list[np.ndarray] = []
    feats: list[np.ndarray] = []
    batch: list[XrayImage] = []

    def flush() -> None:
        if batch:
            probs.append(predictor.probabilities(batch, batch_size=batch_size))
            batch.clear()

    for row in tqdm(
        rows, desc=f"evaluating {predictor.facts.name}", unit="img", disable=not progress
    ):
        try:
            image = read_image(row.path)
        except InputRejected as exc:
            logger.warning("%s rejected (%s)", _relative(row), exc.reason)
            rejected.append({"path": _relative(row), "reason": exc.reason, "message": exc.message})
            continue
        kept.append(row)
        if shortcut is not None:
            feats.append(shortcut_features(image))
        batch.append(image)
        if len(batch) >= batch_size:
            flush()
    flush()
    if not kept:
        raise DataError(
            f"none of the {len(rows)} images could be read; see the rejections "
            f"above (first: {rejected[0]['message'] if rejected else 'n/a'})."
        )

    p = np.concatenate(probs)
    targets = np.array([labels.index(r.label) for r in kept])
    sources = [r.source for r in kept]
    has_sources = any(sources)
    result: dict[str, object] = {
        "model": predictor.facts.name,
        "model_title": predictor.facts.title,
        "bundle_version": predictor.bundle.version,
    }
    result.update(
        compute_metrics(
            targets,
            p,
            sources if has_sources else None,
            labels=labels,
            covid_threshold=predictor.facts.covid_threshold,
            n_bootstrap=n_bootstrap,
            seed=seed,
        )
    )
    ages = np.array([r.extra.get("age_group", "") for r in kept])
    if (ages == "adult").any():
        result["adult"] = adult_metrics(
            targets[ages == "adult"],
            p[ages == "adult"],
            labels,
            predictor.facts.covid_threshold,
            n_bootstrap=n_bootstrap,
            seed=seed,
        )
    result["n_rejected"] = len(rejected)
    result["rejected"] = rejected

    sp = None
    if shortcut is not None:
        if labels != list(LABELS):
            raise DataError(
                f"model labels {labels} differ from the shortcut control's {list(LABELS)}."
            )
        sp = shortcut.predict_proba(np.stack(feats))
        control = compute_metrics(
            targets,
            sp,
            sources if has_sources else None,
            labels=labels,
            n_bootstrap=n_bootstrap,
            seed=seed,
        )
        overlap = sum(str(r.path.resolve()) in shortcut.train_paths for r in kept)
        control.update(shortcut.describe())
        control["n_evaluated_rows_in_training"] = overlap
        if overlap:
            logger.warning(
                "%d evaluated images are in the shortcut control's training split; "
                "its scores on them are optimistic",
                overlap,
            )
        result["shortcut_control"] = control
    else:
        result["shortcut_control"] = None

    result["predictions"] = [
        {
            "path": _relative(r),
            "label": r.label,
            "source": r.source,
            "probabilities": [float(v) for v in p[i]],
            "shortcut_probabilities": [float(v) for v in sp[i]] if sp is not None else None,
        }
        for i, r in enumerate(kept)
    ]
    result["disclaimer"] = DISCLAIMER
    return result


def load_predictions(result: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Targets, model probabilities and shortcut probabilities (or None) from a result.

    Parameters
    ----------
    result : dict
        Output of :func:`evaluate_model`.

    Returns
    -------
    tuple
    """
    labels = list(result["labels"])
    preds = result["predictions"]
    targets = np.array([labels.index(p["label"]) for p in preds], dtype=np.int64)
    probs = np.array([p["probabilities"] for p in preds], dtype=np.float64)
    if preds and preds[0]["shortcut_probabilities"] is not None:
        return targets, probs, np.array([p["shortcut_probabilities"] for p in preds])
    return targets, probs, None
