"""The Key Object Selection document that flags a "COVID-19 suspected" image. RESEARCH USE ONLY.

Worklists of many PACS raise the priority of a study that holds a Key Object Selection (KOS)
document, and viewers show its key images first. :func:`build_kos` makes one for an image whose
outcome is ``"suspected"`` (never for ``"not_suspected"`` or ``"indeterminate"``): document title
(113000, DCM, "Of Interest") from CID 7010 (CID 7010 has no "For Attention" concept), the image
as the only key object, the model as device observer, and the research-use disclaimer in the
Key Object Description and the Series Description. It goes into the image's study, in its own
series (Series Number :data:`KOS_SERIES_NUMBER`), with a SOP Instance UID derived from the
image's and the model's, like the SR and SC.

Imports no torch: it needs only the :class:`~dicom_covid.prediction.Prediction` and the source
header.
"""

from __future__ import annotations

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from ..errors import ResultEncodingError
from ..prediction import Prediction
from .common import (
    ALGORITHM_NAME,
    DISCLAIMER,
    MANUFACTURER,
    ModelIdentity,
    derived_uid,
    instance_number,
    now_date_time,
    source_header,
)

__all__ = ["KOS_SERIES_DESCRIPTION", "KOS_SERIES_NUMBER", "KOS_TITLE", "build_kos"]

#: Series of the Key Object Selection (after the SR's 9901 and the SC's 9902).
KOS_SERIES_NUMBER = 9903
#: Its Series Description.
KOS_SERIES_DESCRIPTION = "dicom-covid COVID-19 suspected (research only)"
#: Document title: (113000, DCM, "Of Interest"), CID 7010 Key Object Selection Document Title.
KOS_TITLE = codes.DCM.OfInterest


def build_kos(
    source: Dataset, prediction: Prediction, sop_instance_uid: str | None = None
) -> hd.ko.KeyObjectSelectionDocument:
    """Build the Key Object Selection document listing a "COVID-19 suspected" image.

    Parameters
    ----------
    source : pydicom.dataset.Dataset
        The analysed image (its pixel data is not needed).
    prediction : Prediction
        Its prediction; the outcome must be ``"suspected"``.
    sop_instance_uid : str, optional
        SOP Instance UID of the document (default: derived from the image's and the model's, so
        a job run again makes the same instance).

    Returns
    -------
    highdicom.ko.KeyObjectSelectionDocument
        In the source's study, in its own series, with patient and study copied from it.

    Raises
    ------
    ResultEncodingError
        When the outcome is not "suspected", the source lacks its UIDs, or highdicom refuses
        the content.
    """
    if prediction.outcome != "suspected":
        raise ResultEncodingError(
            f"a Key Object Selection flags only 'suspected' images; this one is "
            f"{prediction.outcome!r}. Build it only when prediction.outcome == 'suspected'."
        )
    header = source_header(source)
    identity = ModelIdentity.from_prediction(prediction)
    study_uid, src_uid = str(header.StudyInstanceUID), str(header.SOPInstanceUID)
    description = (
        f"COVID-19 suspected by {identity.short}: P(COVID-19) = {prediction.covid_score:.3f} "
        f"at threshold {prediction.covid_threshold:.3f}. {DISCLAIMER}"
    )
    try:
        observer = hd.sr.ObserverContext(
            observer_type=codes.DCM.Device,
            observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
                uid=identity.device_uid(),
                name=ALGORITHM_NAME,
                manufacturer_name=MANUFACTURER,
                model_name=identity.model_label,
            ),
        )
        content = hd.ko.KeyObjectSelection(
            document_title=KOS_TITLE,
            referenced_objects=[header],
            observer_device_context=observer,
            description=description[:1024],
        )
        kos = hd.ko.KeyObjectSelectionDocument(
            evidence=[header],
            content=content,
            series_instance_uid=derived_uid(
                "ko-series", study_uid, identity.model_name, identity.bundle_version
            ),
            series_number=KOS_SERIES_NUMBER,
            sop_instance_uid=sop_instance_uid
            or derived_uid(
                "ko",
                src_uid,
                identity.model_name,
                identity.bundle_version,
                identity.software_version,
            ),
            instance_number=instance_number(source),
            manufacturer=MANUFACTURER,
            institution_name=header.get("InstitutionName") or None,
            contributing_equipment=[
                identity.contributing_equipment(
                    "Key Object Selection flagging an image whose COVID-19 screening outcome "
                    "is suspected."
                )
            ],
        )
    except (TypeError, ValueError, AttributeError) as exc:
        raise ResultEncodingError(
            f"the Key Object Selection of image {src_uid} could not be built ({exc})."
        ) from exc
    kos.SeriesDescription = KOS_SERIES_DESCRIPTION
    date, time = now_date_time()
    kos.SeriesDate, kos.SeriesTime = date, time
    if "SpecificCharacterSet" in header:
        kos.SpecificCharacterSet = header.SpecificCharacterSet
    return kos
