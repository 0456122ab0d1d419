"""The Comprehensive SR (TID 1500 Measurement Report) holding one image's AI result.

Form (the one OHIF v3 draws, see the project notes): one TID 1410 *Planar ROI Measurements and
Qualitative Evaluations* group whose Image Region is a closed POLYLINE around the Grad-CAM hot
region on the source image, in a **Comprehensive** (not 3D) SR. The group holds

* the finding type COVID-19 (SCT 840539006) and a qualitative evaluation COVID-19 = Suspected /
  Not suspected;
* five numeric measurements, in %, whose concept meanings read as sentences, because OHIF prints
  only ``meaning: value unit`` of measurements (at most five lines):

  - ``AI: COVID-19 SUSPECTED (research only): 93.00 %`` (or "not suspected"), value P(COVID-19);
  - ``P(COVID-19)``, ``P(normal)``, ``P(other pneumonia)``;
  - ``COVID-19 threshold``;

* the TID 4019 algorithm identification (dicom-covid, version, backbone, bundle version).

The report is UNVERIFIED and PRELIMINARY; the research-use disclaimer is in the Series
Description, in a TEXT item (TID 1500 Qualitative Evaluations container) and in the
Contributing Equipment description.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes as pydicom_codes

from ..errors import ResultEncodingError
from . import codes
from .common import (
    ALGORITHM_NAME,
    DISCLAIMER,
    MANUFACTURER,
    SR_SERIES_DESCRIPTION,
    SR_SERIES_NUMBER,
    ModelIdentity,
    derived_uid,
    instance_number,
    now_date_time,
    source_header,
)

if TYPE_CHECKING:
    from ..prediction import Prediction

__all__ = ["TRACKING_IDENTIFIER", "build_sr", "read_sr_result"]

logger = logging.getLogger(__name__)

#: Human-readable tracking identifier of the region (not an OHIF tool name, which would make
#: OHIF offer to turn the AI region into an editable annotation).
TRACKING_IDENTIFIER = "dicom-covid Grad-CAM hot region"
#: UMLS C0034375 "Qualitative Evaluations", the TID 1500 container for free-text evaluations.
_QUALITATIVE_EVALUATIONS = hd.sr.CodedConcept("C0034375", "UMLS", "Qualitative Evaluations")


def _check_outline(outline: np.ndarray, rows: int, cols: int) -> np.ndarray:
    pts = np.asarray(outline, dtype=np.float32)
    if pts.ndim != 2 or pts.shape[1] != 2 or len(pts) < 4:
        raise ResultEncodingError(
            f"the region outline has shape {pts.shape}; it must be (K, 2) (column, row) points "
            "with K >= 4 (a closed polygon). Use dicom_covid.explain.hot_region_outline."
        )
    if not np.all(np.isfinite(pts)):
        raise ResultEncodingError("the region outline holds non-finite coordinates.")
    if (
        pts[:, 0].min() < 0
        or pts[:, 1].min() < 0
        or pts[:, 0].max() > cols
        or pts[:, 1].max() > rows
    ):
        raise ResultEncodingError(
            f"the region outline leaves the {rows}x{cols} image (columns "
            f"{pts[:, 0].min():.1f}..{pts[:, 0].max():.1f}, rows {pts[:, 1].min():.1f}.."
            f"{pts[:, 1].max():.1f}); the heat map must be at the source resolution."
        )
    if not np.array_equal(pts[0], pts[-1]):
        pts = np.vstack([pts, pts[:1]])
    return pts


def _abstention_note(prediction: Prediction) -> str:
    """Why the model gave no verdict, in words (empty when it gave one)."""
    if not prediction.abstained:
        return ""
    from ..abstention import REASONS

    why = "; ".join(REASONS.get(r, r) for r in prediction.abstention_reasons)
    return f" No COVID-19 verdict: {why}."


def _percent(value: float) -> float:
    return round(float(value) * 100.0, 4)


def _measurements(prediction: Prediction) -> list[hd.sr.Measurement]:
    out = [
        hd.sr.Measurement(
            name=codes.SCREENING_OUTCOME[prediction.outcome],
            value=_percent(prediction.covid_score),
            unit=codes.PERCENT,
        )
    ]
    for label, p in prediction.probabilities.items():
        name = codes.PROBABILITY_CODES.get(label) or codes.private(f"p-{label}"[:16], f"P({label})")
        out.append(hd.sr.Measurement(name=name, value=_percent(p), unit=codes.PERCENT))
    out.append(
        hd.sr.Measurement(
            name=codes.THRESHOLD, value=_percent(prediction.covid_threshold), unit=codes.PERCENT
        )
    )
    return out


def _image_library_possible(header: Dataset) -> bool:
    """Whether highdicom can write the optional TID 1600 Image Library entry of the source.

    For projection radiographs it needs a valid Imager Pixel Spacing and a two-valued Patient
    Orientation; without them the library is left out (it is optional in TID 1500).
    """
    return (
        str(header.get("Modality", "")) in ("CR", "DX")
        and "ImagerPixelSpacing" in header  # only valid spacing survives source_header
        and len(header.get("PatientOrientation", None) or []) == 2
    )


def build_sr(
    source: Dataset,
    prediction: Prediction,
    outline: np.ndarray,
    *,
    series_instance_uid: str | None = None,
    sop_instance_uid: str | None = None,
    series_number: int = SR_SERIES_NUMBER,
    heatmap_method: str = "gradcam",
) -> hd.sr.ComprehensiveSR:
    """Build the Comprehensive SR (TID 1500) of one prediction on one source image.

    Parameters
    ----------
    source : pydicom.dataset.Dataset
        The analysed image (pixel data not needed). Patient and study are copied from it.
    prediction : Prediction
        Result of :meth:`~dicom_covid.inference.Predictor.predict` on that image.
    outline : numpy.ndarray
        ``(K, 2)`` closed polygon of (column, row) points on the source image, e.g. from
        :func:`dicom_covid.explain.hot_region_outline`.
    series_instance_uid, sop_instance_uid : str, optional
        UIDs of the SR; by default derived deterministically from the study / source image and
        the model, so that re-running the same analysis re-creates the same instance.
    series_number : int
        Series Number (default :data:`~dicom_covid.results.common.SR_SERIES_NUMBER`).
    heatmap_method : str
        How the region was found (recorded as an algorithm parameter).

    Returns
    -------
    highdicom.sr.ComprehensiveSR

    Raises
    ------
    ResultEncodingError
        When the source lacks the UIDs to reference, the outline does not fit the image, or
        highdicom refuses the content.
    """
    header = source_header(source)
    rows, cols = int(header.get("Rows", 0) or 0), int(header.get("Columns", 0) or 0)
    if rows < 1 or cols < 1:
        raise ResultEncodingError(
            "the source image has no Rows/Columns; the SR region cannot be placed on it."
        )
    pts = _check_outline(outline, rows, cols)
    identity = ModelIdentity.from_prediction(prediction)
    study_uid = str(header.StudyInstanceUID)
    src_uid = str(header.SOPInstanceUID)
    series_instance_uid = series_instance_uid or derived_uid(
        "sr-series", study_uid, identity.model_name, identity.bundle_version
    )
    sop_instance_uid = sop_instance_uid or derived_uid(
        "sr", src_uid, identity.model_name, identity.bundle_version, identity.software_version
    )
    try:
        region = hd.sr.ImageRegion(
            graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
            graphic_data=pts,
            source_image=hd.sr.SourceImageForRegion(
                referenced_sop_class_uid=str(header.SOPClassUID),
                referenced_sop_instance_uid=src_uid,
            ),
        )
        group = hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(
                uid=derived_uid("tracking", sop_instance_uid), identifier=TRACKING_IDENTIFIER
            ),
            referenced_region=region,
            finding_type=codes.COVID19,
            algorithm_id=identity.algorithm_identification(
                region=f"{heatmap_method} hot region (largest area >= 50% of max)"
            ),
            measurements=_measurements(prediction),
            qualitative_evaluations=[
                hd.sr.QualitativeEvaluation(codes.COVID19, codes.outcome_code(prediction.outcome))
            ],
        )
        observer = hd.sr.ObservationContext(
            observer_device_context=hd.sr.ObserverContext(
                observer_type=pydicom_codes.cid270.Device,
                observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
                    uid=identity.device_uid(),
                    name=ALGORITHM_NAME,
                    manufacturer_name=MANUFACTURER,
                    model_name=identity.model_label,
                ),
            )
        )
        library = [header] if _image_library_possible(header) else None
        report = hd.sr.MeasurementReport(
            observation_context=observer,
            procedure_reported=codes.PROCEDURE_CHEST_XRAY,
            imaging_measurements=[group],
            title=codes.MEASUREMENT_REPORT_TITLE,
            referenced_images=library,
        )
        evaluations = hd.sr.ContainerContentItem(
            name=_QUALITATIVE_EVALUATIONS,
            relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
        )
        evaluations.ContentSequence = hd.sr.ContentSequence(
            [
                hd.sr.TextContentItem(
                    name=codes.DISCLAIMER_COMMENT,
                    value=f"{DISCLAIMER}. {prediction.decision} by {identity.short}; "
                    "an automated research result, not verified by a physician."
                    + _abstention_note(prediction),
                    relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
                )
            ]
        )
        report[0].ContentSequence.append(evaluations)
        date, time = now_date_time()
        sr = hd.sr.ComprehensiveSR(
            evidence=[header],
            content=report[0],
            series_instance_uid=series_instance_uid,
            series_number=series_number,
            sop_instance_uid=sop_instance_uid,
            instance_number=instance_number(header),
            manufacturer=MANUFACTURER,
            is_complete=True,
            is_final=False,
            is_verified=False,
            series_description=SR_SERIES_DESCRIPTION,
            manufacturer_model_name=identity.model_label,
            software_versions=identity.software_versions,
            contributing_equipment=[
                identity.contributing_equipment(
                    "COVID-19 screening of the referenced chest radiograph and Grad-CAM region."
                )
            ],
            coding_schemes=[codes.CODING_SCHEME],
            series_date=date,
            series_time=time,
        )
    except (ValueError, TypeError, AttributeError, KeyError) as exc:
        raise ResultEncodingError(
            f"could not build the SR for image {src_uid}: highdicom refused it "
            f"({type(exc).__name__}: {exc}). Check the source header (patient/study attributes, "
            "UIDs); if it looks valid, report this as a bug with the message."
        ) from exc
    logger.info("built SR %s for image %s (%s)", sop_instance_uid, src_uid, prediction.decision)
    return sr


def read_sr_result(sr: Dataset) -> dict[str, float | str]:
    """Read back the numbers and the decision of an SR made by :func:`build_sr`.

    Parameters
    ----------
    sr : pydicom.dataset.Dataset
        The SR (as read from disk or received).

    Returns
    -------
    dict
        ``{"P(COVID-19)": 0.93, ..., "COVID-19 threshold": 0.5, "decision": "Suspected",
        "referenced_sop_instance_uid": ...}`` with probabilities as fractions.
    """
    doc = hd.sr.ComprehensiveSR.from_dataset(sr)  # parses the TID 1500 tree (copies)
    groups = doc.content.get_planar_roi_measurement_groups()
    if len(groups) != 1:
        raise ResultEncodingError(f"expected one measurement group, found {len(groups)}")
    group = groups[0]
    out: dict[str, float | str] = {}
    for m in group.get_measurements():
        out[m.name.meaning] = float(m.value) / 100.0
    for q in group.get_qualitative_evaluations():  # highdicom also lists Algorithm Family here
        if q.name.value == codes.COVID19.value and q.name.scheme_designator == "SCT":
            out["decision"] = q.value.meaning
    out["referenced_sop_instance_uid"] = str(
        group.roi.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID
    )
    return out
