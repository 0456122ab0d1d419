"""Fit and measure a model's abstention policy (see :mod:`dicom_covid.abstention`).

* :func:`fit_abstention`: feature statistics on the model's ``train`` sources, the
  out-of-distribution threshold at a percentile of the ``val`` split's distances, and the
  uncertainty margin that abstains on a chosen share of ``val``. Never the ``test`` split.
* :func:`evaluate_abstention`: on the ``test`` split, the abstention rate per reason and the
  accuracy on the images that keep a verdict; on a corpus of non-chest images
  (:func:`non_chest_corpus`: generated blanks, noise, gradients, test patterns and text pages,
  and every grayscale image that pydicom ships: CT, MR, ultrasound, ... relabelled as CR) the
  share flagged and how many got "COVID-19 suspected" (the goal: none).
"""

from __future__ import annotations

import logging
import warnings
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from ..abstention import FeatureDensity
from ..reader import XrayImage, read_image
from .data import LABELS, ManifestRow, read_manifest, subsample

__all__ = ["OOD_LAYERS", "evaluate_abstention", "fit_abstention", "non_chest_corpus"]

logger = logging.getLogger(__name__)

#: Layer whose channel statistics feed the out-of-distribution check, per backbone: a middle
#: stage, where texture (detector noise, modality) is still visible. EfficientNet-Lite0's
#: ``blocks.3`` flagged 38 of 38 non-chest images at 0.4 % of test images flagged, against 24
#: of 38 for the penultimate features (measured on a 250-per-class subset).
OOD_LAYERS = {
    "efficientnet_lite0": "blocks.3",
    "resnet50": "layer2",
    "alexnet": "features.5",
    "vgg16": "features.23",
    "inception_v3": "Mixed_5d",
    "inception_resnet_v2": "mixed_5b",
}

#: pydicom test files (name prefixes) that ARE frontal chest radiographs: not in the corpus.
CHEST_TEST_FILES = ("RG1",)


def _batches(rows: list[ManifestRow], size: int = 32) -> Iterator[list[XrayImage]]:
    for i in range(0, len(rows), size):
        yield [read_image(r.path) for r in rows[i : i + size]]


def _features(predictor: Any, rows: list[ManifestRow], desc: str, progress: bool):
    probs, feats = [], []
    for batch in tqdm(list(_batches(rows)), desc=desc, disable=not progress, unit="batch"):
        p, _ = predictor.analyse(batch)
        probs.append(p)
        feats.append(np.concatenate(predictor.last_features))
    return np.concatenate(probs), np.concatenate(feats)


def fit_abstention(
    predictor: Any,
    data_dir: str | Path,
    output: str | Path,
    max_train_per_class: int = 800,
    percentile: float = 99.5,
    uncertain_share: float = 0.03,
    dims: int = 32,
    progress: bool = True,
    layer: str | None = None,
) -> dict[str, Any]:
    """Fit the abstention facts of a single model.

    Parameters
    ----------
    predictor : dicom_covid.inference.Predictor
        A single model (not an ensemble).
    data_dir : path
        The labelled data folder (``train`` and ``val`` splits are used).
    output : path
        Where the feature statistics go (``.ood.safetensors``).
    max_train_per_class : int
        Training images per class for the statistics.
    percentile : float
        Val-split percentile of the feature distance taken as the threshold.
    uncertain_share : float
        Share of the val split that the uncertainty margin abstains on (0 turns it off).
    dims : int
        PCA dimensions.
    progress : bool
        Progress bars.
    layer : str, optional
        Module whose channel means and standard deviations are the features (default: the
        backbone's entry in :data:`OOD_LAYERS`, else the penultimate features).

    Returns
    -------
    dict
        The ``abstention`` entry for the model's facts.
    """
    sources = set(predictor.facts.raw.get("training_data", {}).get("sources") or [])
    backbone = predictor.facts.raw.get("backbone", predictor.facts.name)
    layer = layer or OOD_LAYERS.get(backbone)
    predictor.set_feature_layer(layer)
    predictor.density = None  # statistics being replaced: no distances while fitting

    def rows_of(split: str) -> list[ManifestRow]:
        rows = read_manifest(data_dir, split)
        return [r for r in rows if not sources or r.source in sources]

    train_rows = subsample(rows_of("train"), max_train_per_class, seed=0)
    val_rows = rows_of("val")
    _, f_train = _features(predictor, train_rows, "train features", progress)
    y_train = np.array([r.label_index for r in train_rows])
    density = FeatureDensity.fit(f_train, y_train, dims=dims)
    p_val, f_val = _features(predictor, val_rows, "val features", progress)
    d_val = density.distance(f_val)
    threshold = float(np.percentile(d_val, percentile))
    covid = LABELS.index("covid")
    gap = np.abs(p_val[:, covid] - predictor.facts.covid_threshold)
    margin = float(np.quantile(gap, uncertain_share)) if uncertain_share > 0 else 0.0
    output = Path(output)
    density.save(output)
    return {
        "min_pixel_std": 0.02,
        "max_mode_fraction": 0.9,
        "lung_fraction": [0.08, 0.7],
        "ood": {
            "file": f"models/{output.name}",
            "layer": layer,
            "threshold": threshold,
            "rule": f"{percentile:g}th percentile of the val split's class-conditional "
            f"Mahalanobis distance of the {layer or 'penultimate'} features "
            f"(PCA {density.components.shape[1]} dims, {len(train_rows)} train images)",
        },
        "uncertainty_margin": round(margin, 4),
        "uncertainty_rule": f"abstains on the {100 * uncertain_share:g} % of val images whose "
        "P(COVID-19) lies closest to the threshold",
    }


def _patterns(size: int = 512, seed: int = 0) -> Iterator[tuple[str, np.ndarray]]:
    import cv2

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    yield "blank_black", np.zeros((size, size), np.float32)
    yield "blank_white", np.ones((size, size), np.float32)
    yield "constant_grey", np.full((size, size), 0.5, np.float32)
    yield "uniform_noise", rng.random((size, size), dtype=np.float32)
    yield "gaussian_noise", np.clip(rng.normal(0.5, 0.15, (size, size)), 0, 1).astype(np.float32)
    yield "horizontal_gradient", xx
    yield "vertical_gradient", yy
    yield "radial_gradient", np.clip(np.hypot(xx - 0.5, yy - 0.5) * 1.4, 0, 1)
    bars = np.array([0.75, 0.7, 0.6, 0.55, 0.35, 0.3, 0.2], np.float32)
    smpte = np.repeat(bars, int(np.ceil(size / len(bars))))[:size][None].repeat(size, 0)
    smpte[int(size * 0.67) :] = np.where(xx[int(size * 0.67) :] < 0.5, 0.05, 0.95)
    yield "smpte_bars", smpte
    yield "checkerboard", (((yy * 8).astype(int) + (xx * 8).astype(int)) % 2).astype(np.float32)
    yield "sine_grating", 0.5 + 0.5 * np.sin(2 * np.pi * 12 * xx).astype(np.float32)
    yield "zone_plate", 0.5 + 0.5 * np.cos(400 * ((xx - 0.5) ** 2 + (yy - 0.5) ** 2))
    page = np.full((size, size), 255, np.uint8)
    for i, line in enumerate(range(30, size - 20, 22)):
        cv2.putText(page, f"Report line {i}: findings and impression text", (12, line),
                    cv2.FONT_HERSHEY_SIMPLEX, 0.45, 0, 1, cv2.LINE_AA)  # fmt: skip
    yield "text_page", page.astype(np.float32) / 255.0
    yield "text_page_inverted", 1.0 - page.astype(np.float32) / 255.0
    blobs = np.zeros((size, size), np.float32)
    for _ in range(12):
        cx, cy, r = rng.random(3) * [size, size, size / 6]
        blobs += np.exp(-((xx * size - cx) ** 2 + (yy * size - cy) ** 2) / (2 * (r + 5) ** 2))
    yield "gaussian_blobs", np.clip(blobs, 0, 1)


def non_chest_corpus() -> list[tuple[str, XrayImage]]:
    """Images that are not chest radiographs, each as the reader would hand them on.

    Generated patterns (blank, constant, noise, gradients, SMPTE-like bars, checkerboard,
    gratings, text pages, blobs) and every single-frame grayscale image in pydicom's test files
    (CT, MR, ultrasound, radiographs of other body parts ...), its pixels windowed as the reader
    does for a CR (the header's modality is ignored, as if it had been relabelled).

    Returns
    -------
    list of (str, XrayImage)
    """
    import pydicom
    from pydicom.data import get_testdata_files

    from ..reader import _apply_voi

    out = [(name, XrayImage(pixels=px, source=name, format="png")) for name, px in _patterns()]
    seen: set[str] = set(CHEST_TEST_FILES)
    with warnings.catch_warnings():
        # pydicom's test files are malformed on purpose; their warnings say nothing here.
        warnings.simplefilter("ignore")
        files = sorted(get_testdata_files("*.dcm"))
    for path in files:
        name = Path(path).name
        stem = name.split("_")[0]
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ds = pydicom.dcmread(path)
                frames = int(ds.get("NumberOfFrames", 1) or 1)
                if ds.get("SamplesPerPixel", 1) != 1 or frames != 1:
                    continue
                arr = ds.pixel_array.astype(np.float32)
        except Exception:  # pydicom's test files include broken ones on purpose
            continue
        if arr.ndim != 2 or min(arr.shape) < 32 or stem in seen:
            continue
        seen.add(stem)
        try:
            pixels, _ = _apply_voi(arr, ds)
        except Exception:  # an unusable window: percentiles, as the reader falls back to
            lo, hi = np.percentile(arr, [0.5, 99.5])
            pixels = np.clip((arr - lo) / max(hi - lo, 1e-6), 0, 1)
        if str(ds.get("PhotometricInterpretation", "")) == "MONOCHROME1":
            pixels = 1.0 - pixels
        out.append((f"pydicom:{name}", XrayImage(pixels=pixels.astype(np.float32), source=name,
                                                  format="dicom", modality="CR")))  # fmt: skip
    return out


def evaluate_abstention(
    predictor: Any, data_dir: str | Path, split: str = "test", progress: bool = True
) -> dict[str, Any]:
    """Abstention on a labelled split and on :func:`non_chest_corpus`.

    Returns
    -------
    dict
        ``split``: n, abstention rate, reasons, accuracy with and without abstention, COVID
        sensitivity/specificity on the kept images; ``non_chest``: n, flagged share, how many got
        "COVID-19 suspected", and each image's outcome.
    """
    rows = read_manifest(data_dir, split)
    preds = []
    for batch in tqdm(list(_batches(rows)), desc=split, disable=not progress, unit="batch"):
        preds += predictor.predict_batch(batch)
    y = np.array([r.label_index for r in rows])
    pred_label = np.array([LABELS.index(p.label) for p in preds])
    kept = np.array([not p.abstained for p in preds])
    is_covid = y == LABELS.index("covid")
    suspected = np.array([p.covid_score >= p.covid_threshold for p in preds])
    reasons = Counter(r for p in preds for r in p.abstention_reasons)
    per_source = Counter(r.source for r, p in zip(rows, preds, strict=True) if p.abstained)
    split_result = {
        "n": len(rows),
        "abstained": int((~kept).sum()),
        "abstention_rate": float((~kept).mean()),
        "reasons": dict(reasons),
        "abstained_per_source": dict(per_source),
        "accuracy_all": float((pred_label == y).mean()),
        "accuracy_kept": float((pred_label == y)[kept].mean()) if kept.any() else None,
        "accuracy_abstained": float((pred_label == y)[~kept].mean()) if (~kept).any() else None,
        "covid_sensitivity_kept": float(suspected[kept & is_covid].mean()),
        "covid_specificity_kept": float((~suspected[kept & ~is_covid]).mean()),
    }
    corpus = non_chest_corpus()
    outcomes = []
    for name, image in tqdm(corpus, desc="non-chest", disable=not progress, unit="img"):
        p = predictor.predict(image)
        outcomes.append(
            {
                "image": name,
                "outcome": p.outcome,
                "reasons": list(p.abstention_reasons),
                "p_covid": round(p.covid_score, 4),
                "ood_score": p.ood_score,
                "lung_fraction": p.image_facts.get("lung_fraction"),
            }
        )
    flagged = [o["outcome"] == "indeterminate" for o in outcomes]
    return {
        "model": predictor.facts.name,
        "split": split,
        "policy": {
            k: getattr(predictor.abstention, k)
            for k in ("enabled", "lung_fraction", "ood_threshold", "uncertainty_margin")
        },
        split: split_result,
        "non_chest": {
            "n": len(outcomes),
            "flagged": int(sum(flagged)),
            "flagged_share": float(np.mean(flagged)),
            "covid_suspected": sum(o["outcome"] == "suspected" for o in outcomes),
            "images": outcomes,
        },
    }
