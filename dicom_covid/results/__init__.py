"""DICOM result objects of one analysed chest radiograph. RESEARCH USE ONLY.

One module per object (see ``STYLE.md``):

* :mod:`.sr` — :func:`build_sr`, the Comprehensive SR (TID 1500) with the probabilities, the
  decision and the Grad-CAM hot region as a closed polyline on the source image;
* :mod:`.sc` — :func:`build_heatmap_sc`, the RGB Secondary Capture of the Grad-CAM overlay with
  burned-in disclaimer, decision and model;
* :mod:`.common` — model identity (Contributing Equipment, algorithm identification), series,
  UIDs, the cleaned source header;
* :mod:`.codes` — every coded concept written.

:func:`analyse` runs the whole chain for the PACS worker: read → one forward pass for the
prediction and its heat map → SR + SC.

>>> result = analyse(dataset, Predictor())  # doctest: +SKIP
>>> result.sr.save_as("sr.dcm"); result.sc.save_as("sc.dcm")  # doctest: +SKIP
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from pydicom.dataset import Dataset

from ..errors import ResultEncodingError
from .sc import build_heatmap_sc
from .sr import build_sr, read_sr_result

if TYPE_CHECKING:
    import highdicom as hd

    from ..explain import Explainer
    from ..inference import Prediction, Predictor

__all__ = [
    "ResultEncodingError",
    "ResultSet",
    "analyse",
    "build_heatmap_sc",
    "build_sr",
    "read_sr_result",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ResultSet:
    """Everything :func:`analyse` made for one image.

    Attributes
    ----------
    prediction : Prediction
        The classification.
    heatmap : numpy.ndarray
        ``float32 (rows, columns)`` Grad-CAM heat map of P(COVID-19) in ``[0, 1]``, at the
        source's resolution.
    sr : highdicom.sr.ComprehensiveSR
        The TID 1500 report (its region in the source's pixel coordinates).
    sc : highdicom.sc.SCImage
        The heat-map Secondary Capture (at a display resolution, see
        :func:`~dicom_covid.results.sc.display_shape`).
    outline : numpy.ndarray
        ``(K, 2)`` closed (column, row) polygon of the hot region, as written in the SR.
    """

    prediction: Prediction
    heatmap: np.ndarray
    sr: hd.sr.ComprehensiveSR
    sc: hd.sc.SCImage
    outline: np.ndarray

    @property
    def datasets(self) -> list[Dataset]:
        """The DICOM objects to send, SR first."""
        return [self.sr, self.sc]


def analyse(source: Dataset, predictor: Predictor, explainer: Explainer | None = None) -> ResultSet:
    """Classify one DICOM chest radiograph and build its SR and heat-map Secondary Capture.

    Parameters
    ----------
    source : pydicom.dataset.Dataset
        The received image, with pixel data.
    predictor : Predictor
        Loaded model.
    explainer : Explainer, optional
        Grad-CAM for ``predictor`` (default: ``Explainer(predictor)``, plain Grad-CAM). Pass
        one to reuse it across images. Prediction and heat map come from one forward pass
        (:meth:`~dicom_covid.explain.Explainer.predict_and_explain`).

    Returns
    -------
    ResultSet

    Raises
    ------
    InputRejected
        When the image cannot be classified (not a frontal grayscale chest radiograph, ...).
    ResultEncodingError
        When a result object cannot be built.
    """
    from ..explain import Explainer, hot_region_outline
    from ..reader import read_dataset

    image = read_dataset(source, source=str(source.get("SOPInstanceUID", "<dataset>")))
    explainer = explainer or Explainer(predictor)
    ((prediction, heatmap),) = explainer.predict_and_explain([image], target="covid")
    outline = hot_region_outline(heatmap)
    sr = build_sr(source, prediction, outline, heatmap_method=explainer.method)
    sc = build_heatmap_sc(source, image, prediction, heatmap, method=explainer.method)
    logger.info(
        "analysed %s: %s (P(covid)=%.3f)",
        image.sop_instance_uid,
        prediction.decision,
        prediction.covid_score,
    )
    return ResultSet(prediction=prediction, heatmap=heatmap, sr=sr, sc=sc, outline=outline)
