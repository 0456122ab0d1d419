"""Ensembles of bundle models: choose the COVID threshold on the validation split and install.

An ensemble averages the softmax outputs of several single models of the bundle (each with its own
preprocessing and input size, see :class:`~dicom_covid.inference.Predictor`). Its operating
threshold is chosen the same way :mod:`dicom_covid.training.train` chooses a single model's: the
maximum Youden J of COVID-vs-rest on the ``val`` split of the manifest, here on the mean P(covid).
:func:`fit_ensemble` runs the members once over the validation images, records the ensemble's and
each member's validation metrics and writes the ensemble into the bundle with
:func:`~dicom_covid.bundle.install_ensemble`. RESEARCH USE ONLY.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ..bundle import Bundle, check_ensemble, install_ensemble
from ..errors import DataError, InputRejected
from ..inference import Predictor
from ..reader import XrayImage, read_image
from .data import read_manifest, subsample
from .metrics import binary_auc, choose_threshold, macro_auc

__all__ = ["THRESHOLD_RULE", "EnsembleResult", "fit_ensemble", "resolve_members"]

logger = logging.getLogger(__name__)

#: How the ensemble threshold is chosen (written into its facts, as for a single model).
THRESHOLD_RULE = "maximum Youden J of COVID-vs-rest on the val split (mean member probability)"


@dataclass(frozen=True)
class EnsembleResult:
    """What :func:`fit_ensemble` wrote.

    Attributes
    ----------
    name : str
        Ensemble name.
    members : tuple of str
        Its single models, in order.
    covid_threshold : float
        Threshold chosen on the validation split.
    validation : dict
        Validation metrics of the ensemble and (under ``"members"``) of each member.
    facts_path : pathlib.Path
        The ensemble's facts JSON in the bundle.
    """

    name: str
    members: tuple[str, ...]
    covid_threshold: float
    validation: dict
    facts_path: Path


def resolve_members(bundle: Bundle, members: str | Sequence[str]) -> list[str]:
    """Member names from a comma-separated string or a list; ``"all"`` = every single model.

    Parameters
    ----------
    bundle : Bundle
        Where ``"all"`` looks (single models whose weights are present).
    members : str or sequence of str
        E.g. ``"resnet50,vgg16"`` or ``["resnet50", "vgg16"]`` or ``"all"``.

    Returns
    -------
    list of str
    """
    names = members.split(",") if isinstance(members, str) else list(members)
    names = [n.strip() for n in names if n.strip()]
    if names == ["all"]:
        return bundle.available("single")
    return names


def _metrics(targets: np.ndarray, probs: np.ndarray, covid: int) -> dict[str, float]:
    return {
        "macro_auc": float(macro_auc(targets, probs)),
        "accuracy": float((probs.argmax(axis=1) == targets).mean()),
        "covid_auc": binary_auc(targets == covid, probs[:, covid]),
    }


def fit_ensemble(
    name: str,
    members: str | Sequence[str],
    data_dir: str | Path,
    bundle: Bundle | str | Path | None = None,
    *,
    title: str | None = None,
    make_default: bool = False,
    max_val_per_class: int | None = None,
    seed: int = 0,
    batch_size: int = 16,
    device: str = "cpu",
    progress: bool = True,
) -> EnsembleResult:
    """Validate an ensemble of bundle models, choose its COVID threshold and install it.

    Parameters
    ----------
    name : str
        Ensemble name (letters, digits, ``_``, ``-``, ``.``; not a single model's name).
    members : str or sequence of str
        Single models of the bundle (see :func:`resolve_members`; ``"all"`` for every one).
    data_dir : path
        Folder with ``manifest.csv``; its ``val`` split is used.
    bundle : Bundle or path, optional
        Bundle to read the members from and write the ensemble into (default: the project's).
    title : str, optional
        Display name (default ``"Ensemble of <member titles>"``).
    make_default : bool
        Make the ensemble the bundle's default model.
    max_val_per_class : int, optional
        Use at most this many validation images per class (quick runs; seeded by ``seed``).
    seed : int
        Seed of that subsample.
    batch_size : int
        Images per forward pass.
    device : str
        Torch device.
    progress : bool
        Show a progress bar.

    Returns
    -------
    EnsembleResult

    Raises
    ------
    BundleError
        Bad name or member list (unknown, missing, an ensemble, fewer than two).
    DataError
        Missing manifest or validation split, or no validation image could be read.
    """
    bundle = bundle if isinstance(bundle, Bundle) else Bundle(bundle)
    names = resolve_members(bundle, members)
    check_ensemble(bundle, name, names)  # fail before the slow part
    rows = subsample(read_manifest(data_dir, "val"), max_val_per_class, seed)
    if not any(r.split for r in rows):
        logger.warning(
            "%s/manifest.csv has no split column: the threshold is chosen on all %d rows",
            data_dir,
            len(rows),
        )
    labels = list(bundle.labels)
    unknown = sorted({r.label for r in rows} - set(labels))
    if unknown:
        raise DataError(f"labels {unknown} of the manifest are not outputs of the bundle {labels}.")
    predictors = [Predictor(bundle, m, device=device) for m in names]

    per_member: list[list[np.ndarray]] = [[] for _ in predictors]
    targets: list[int] = []
    rejected: list[str] = []
    batch: list[XrayImage] = []

    def flush() -> None:
        if batch:
            for out, predictor in zip(per_member, predictors, strict=True):
                out.append(predictor.probabilities(batch, batch_size=batch_size))
            batch.clear()

    for row in tqdm(rows, desc=f"validating {name}", unit="img", disable=not progress):
        try:
            image = read_image(row.path)
        except InputRejected as exc:
            logger.warning("%s rejected (%s)", row.path.name, exc.reason)
            rejected.append(exc.reason)
            continue
        batch.append(image)
        targets.append(labels.index(row.label))
        if len(batch) >= batch_size:
            flush()
    flush()
    if not targets:
        raise DataError(f"none of the {len(rows)} validation images of {data_dir} could be read.")

    y = np.asarray(targets)
    member_probs = [np.concatenate(p) for p in per_member]
    probs = np.mean(np.stack(member_probs), axis=0)
    covid = labels.index("covid")
    is_covid = (y == covid).astype(int)
    threshold = choose_threshold(is_covid, probs[:, covid])
    flagged = probs[:, covid] >= threshold
    validation = {
        "split": "val",
        "data": str(data_dir),
        "n_images": len(y),
        "n_rejected": len(rejected),
        "max_val_per_class": max_val_per_class,
        "seed": seed,
        "class_counts": {lab: int((y == i).sum()) for i, lab in enumerate(labels)},
        **_metrics(y, probs, covid),
        "covid_sensitivity": float(flagged[is_covid == 1].mean()) if is_covid.any() else None,
        "covid_specificity": (
            float((~flagged[is_covid == 0]).mean()) if (is_covid == 0).any() else None
        ),
        "members": {
            p.facts.name: _metrics(y, mp, covid)
            for p, mp in zip(predictors, member_probs, strict=True)
        },
    }
    facts_path = install_ensemble(
        name,
        names,
        threshold,
        validation,
        bundle_root=bundle,
        title=title,
        make_default=make_default,
        extra={
            "threshold_rule": THRESHOLD_RULE,
            "val_macro_auc": validation["macro_auc"],
            "val_accuracy": validation["accuracy"],
        },
    )
    logger.info(
        "ensemble %s: val macro AUC %.4f, accuracy %.4f, COVID threshold %.3f on %d images",
        name,
        validation["macro_auc"],
        validation["accuracy"],
        threshold,
        len(y),
    )
    return EnsembleResult(
        name=name,
        members=tuple(names),
        covid_threshold=threshold,
        validation=validation,
        facts_path=facts_path,
    )
