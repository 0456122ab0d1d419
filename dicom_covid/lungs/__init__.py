"""Lung-field segmentation and the "share of Grad-CAM heat inside the lung fields" indicator.

A model that classifies chest X-rays should look at the lungs. Where its Grad-CAM heat sits
outside them (burned-in labels, borders, collimation, text, the shoulders of a child), it is
probably using a shortcut. One module per concern:

* :mod:`~dicom_covid.lungs.segmenter`: :class:`LungSegmenter`, a small MONAI ``UNet`` (2-D, one
  input channel) that outlines both lung fields of a frontal radiograph, loaded from the bundle
  (``models/lung_unet.safetensors`` and ``models/lung_unet.json``, registered under
  ``dicom_covid.lung_segmenter`` in ``configs/metadata.json``), and :func:`postprocess`. The
  network's arguments, its input size, normalisation and the post-processing (threshold,
  connected components, hole filling) come from the facts JSON, not from code.
* :mod:`~dicom_covid.lungs.metrics`: :func:`heat_share` and :func:`top_heat_share` (how much of
  a heat map lies inside a mask) and :func:`dice`.
* :mod:`~dicom_covid.lungs.reference`: :class:`ReferenceMasks`, the lung masks shipped with the
  ``torchxrayvision`` wheel (V7 Labs annotations of ieee8023 images) matched to the development
  set, used to train the segmenter and to measure it (:func:`evaluate_segmenter`, Dice).
* :mod:`~dicom_covid.lungs.training`: :func:`train_segmenter`;
  :mod:`~dicom_covid.lungs.install`: :func:`install_segmenter` (into a bundle).
* :mod:`~dicom_covid.lungs.figures`: :func:`contour_figure`.

The heat-share study over a labelled split (``dicom-covid lungs heat-share``) is analysis, not
segmentation: it lives in :mod:`dicom_covid.analysis.heat_study` and uses this package.

Importing this package loads only the run-time part (segmenter, metrics, reference masks);
training, installation and figures are imported on first use of one of their names, so
inference never loads them (nor matplotlib).

Heat share definition: ``sum(heat * mask) / sum(heat)`` over the source-resolution Grad-CAM map
(values in ``[0, 1]``). A heat map spread evenly over the image gives the lung area fraction;
1.0 means all heat inside the lungs. RESEARCH USE ONLY.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .metrics import dice, heat_share, top_heat_share
from .reference import (
    MASKS_INSTALL_HINT,
    LungCase,
    ReferenceMasks,
    evaluate_segmenter,
    find_mask_archive,
    reference_cases,
)
from .segmenter import DEFAULT_ARCHITECTURE, LungSegmenter, build_unet, postprocess

if TYPE_CHECKING:
    from .figures import contour_figure
    from .install import install_segmenter
    from .training import train_segmenter

__all__ = [
    "DEFAULT_ARCHITECTURE",
    "MASKS_INSTALL_HINT",
    "LungCase",
    "LungSegmenter",
    "ReferenceMasks",
    "build_unet",
    "contour_figure",
    "dice",
    "evaluate_segmenter",
    "find_mask_archive",
    "heat_share",
    "install_segmenter",
    "postprocess",
    "reference_cases",
    "top_heat_share",
    "train_segmenter",
]

#: Names loaded on first use, with their module (keeps torch training code and matplotlib out
#: of inference).
_LAZY = {
    "contour_figure": "figures",
    "install_segmenter": "install",
    "train_segmenter": "training",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
