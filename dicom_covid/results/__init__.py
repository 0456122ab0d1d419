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
prediction and its heat map → SR + SC; :func:`analyse_batch` does it for several images (from
several studies) with one batched forward pass.

>>> result = analyse(dataset, Predictor())  # doctest: +SKIP
>>> result.sr.save_as("sr.dcm"); result.sc.save_as("sc.dcm")  # doctest: +SKIP
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING

import numpy as np
from pydicom.dataset import Dataset

from ..errors import ResultEncodingError
from .sc import HeatSource, build_heatmap_sc
from .sr import build_sr, read_sr_result

if TYPE_CHECKING:
    from collections.abc import Sequence

    import highdicom as hd

    from ..explain import Explainer
    from ..inference import Prediction, Predictor
    from ..reader import XrayImage

__all__ = [
    "ResultEncodingError",
    "ResultSet",
    "analyse",
    "analyse_batch",
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
    heat : HeatSource
        The Grad-CAM heat map of P(COVID-19) before resampling
        (:class:`dicom_covid.explain.CamHeat`): the SR's outline and the SC were made from it at
        their own resolutions; :attr:`heatmap` makes the source-size map from it when asked.
    sr : highdicom.sr.ComprehensiveSR
        The TID 1500 report (its region in the source's pixel coordinates).
    sc : highdicom.sc.SCImage
        The heat-map Secondary Capture (at a display resolution, see
        :func:`~dicom_covid.results.sc.display_shape`).
    outline : numpy.ndarray
        ``(K, 2)`` closed (column, row) polygon of the hot region, as written in the SR.
    """

    prediction: Prediction
    heat: HeatSource
    sr: hd.sr.ComprehensiveSR
    sc: hd.sc.SCImage
    outline: np.ndarray

    @cached_property
    def heatmap(self) -> np.ndarray:
        """``float32 (rows, columns)`` heat map in ``[0, 1]`` at the source's resolution.

        Made on first use (``heat.at()``, the same array as
        :meth:`Explainer.heatmap <dicom_covid.explain.Explainer.heatmap>`): the PACS worker
        never needs it, and on a 5-Mpixel CR it costs tens of milliseconds per network.
        """
        return self.heat.at()

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
        (:meth:`~dicom_covid.explain.Explainer.predict_and_place`).

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
    (result,) = analyse_batch([source], predictor, explainer)
    if isinstance(result, BaseException):
        raise result
    return result


def analyse_batch(
    sources: Sequence[Dataset],
    predictor: Predictor,
    explainer: Explainer | None = None,
    batch_size: int = 16,
) -> list[ResultSet | Exception]:
    """:func:`analyse` for several images with one batched forward pass.

    What goes wrong with one image (an image the reader rejects, a result object that cannot
    be built, an unexpected error) is returned in that image's place and never affects the
    others: when a batched pass fails, each image is run again on its own.

    Parameters
    ----------
    sources : sequence of pydicom.dataset.Dataset
        The received images, with pixel data (e.g. from several studies).
    predictor : Predictor
        Loaded model.
    explainer : Explainer, optional
        Grad-CAM for ``predictor`` (default: ``Explainer(predictor)``).
    batch_size : int
        Images per forward pass.

    Returns
    -------
    list of ResultSet or Exception
        One per source, in order: its results, or the exception that stopped it
        (:class:`~dicom_covid.errors.InputRejected`, :class:`ResultEncodingError`, ...).
    """
    from ..explain import Explainer
    from ..reader import read_dataset

    explainer = explainer or Explainer(predictor)
    out: list[ResultSet | Exception | None] = [None] * len(sources)
    images, where = [], []
    for i, source in enumerate(sources):
        try:
            images.append(
                read_dataset(source, source=str(source.get("SOPInstanceUID", "<dataset>")))
            )
            where.append(i)
        except Exception as exc:
            out[i] = exc
    pairs: list[tuple[Prediction, HeatSource] | Exception] = []
    if images:
        try:
            pairs = list(explainer.predict_and_place(images, "covid", batch_size))
        except Exception as exc:
            if len(images) == 1:
                pairs = [exc]
            else:  # find the image that failed: each one on its own
                logger.warning("a batch of %d image(s) failed (%s); one by one", len(images), exc)
                pairs = []
                for image in images:
                    try:
                        pairs.extend(explainer.predict_and_place([image], "covid"))
                    except Exception as one:
                        pairs.append(one)
    for i, image, pair in zip(where, images, pairs, strict=True):
        if isinstance(pair, Exception):
            out[i] = pair
            continue
        try:
            out[i] = _results(sources[i], image, *pair, method=explainer.method)
        except Exception as exc:
            out[i] = exc
    return [r for r in out if r is not None]


def _results(
    source: Dataset, image: XrayImage, prediction: Prediction, heat: HeatSource, method: str
) -> ResultSet:
    from ..explain import hot_region_outline

    outline = hot_region_outline(heat)  # traced on the map made at its work size
    sr = build_sr(source, prediction, outline, heatmap_method=method)
    sc = build_heatmap_sc(source, image, prediction, heat, method=method)  # at display size
    logger.info(
        "analysed %s: %s (P(covid)=%.3f)",
        image.sop_instance_uid,
        prediction.decision,
        prediction.covid_score,
    )
    return ResultSet(prediction=prediction, heat=heat, sr=sr, sc=sc, outline=outline)
