"""What every dicom-covid result object shares: identity, series, UIDs and the source header.

* :class:`ModelIdentity` names the algorithm (IHE AI Results profile): the software
  (``dicom-covid`` and its version), the model (backbone, bundle version, threshold). It gives the
  Contributing Equipment item (PS3.3 C.12.1, purpose "Processing Equipment") and the TID 4019
  Algorithm Identification of the SR.
* :func:`source_header` makes the pixel-less, cleaned copy of the source image from which the
  results take patient and study (strict when writing: invalid spacing such as ``0\\0`` is left
  out, missing type 2 attributes are present and empty, an unknown Patient's Sex is emptied).
* :func:`derived_uid` gives deterministic UIDs, so a retried job writes the same instances again
  instead of duplicates.
"""

from __future__ import annotations

import copy
import datetime
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid
from pydicom.valuerep import DA, TM

from .. import __version__
from ..errors import ResultEncodingError
from ..prediction import DISCLAIMER

if TYPE_CHECKING:
    from ..prediction import Prediction

__all__ = [
    "ALGORITHM_NAME",
    "DISCLAIMER",
    "MANUFACTURER",
    "SC_SERIES_DESCRIPTION",
    "SC_SERIES_NUMBER",
    "SR_SERIES_DESCRIPTION",
    "SR_SERIES_NUMBER",
    "ModelIdentity",
    "derived_uid",
    "instance_number",
    "source_header",
    "valid_spacing",
]

logger = logging.getLogger(__name__)

#: Algorithm Name in the SR and Manufacturer's Model Name prefix.
ALGORITHM_NAME = "dicom-covid"
#: Manufacturer of the software that makes the results.
MANUFACTURER = "dicom-covid developers"
#: Series of the SR (high numbers keep result series after the acquired ones).
SR_SERIES_NUMBER = 9901
SR_SERIES_DESCRIPTION = "dicom-covid AI result (research only)"
#: Series of the Grad-CAM Secondary Capture.
SC_SERIES_NUMBER = 9902
SC_SERIES_DESCRIPTION = "dicom-covid Grad-CAM heat map (research only)"

_TYPE2_PATIENT_STUDY = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
)
_REQUIRED_UIDS = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")


@dataclass(frozen=True)
class ModelIdentity:
    """Who made a result: software, model and bundle.

    Attributes
    ----------
    software_version : str
        ``dicom_covid.__version__``.
    model_name : str
        Backbone key, e.g. ``"efficientnet_lite0"``.
    model_title : str
        Display name, e.g. ``"EfficientNet-Lite0"``.
    bundle_version : str
        Version of the model bundle.
    covid_threshold : float
        Operating threshold on P(COVID-19).
    members : tuple of str
        Member models of an ensemble (empty for a single model).
    """

    software_version: str
    model_name: str
    model_title: str
    bundle_version: str
    covid_threshold: float
    members: tuple[str, ...] = ()

    @classmethod
    def from_prediction(cls, prediction: Prediction) -> ModelIdentity:
        """Identity of the model that made ``prediction``."""
        return cls(
            software_version=__version__,
            model_name=prediction.model_name,
            model_title=prediction.model_title,
            bundle_version=prediction.bundle_version,
            covid_threshold=float(prediction.covid_threshold),
            members=tuple(prediction.model_members),
        )

    @property
    def model_label(self) -> str:
        """``"dicom-covid EfficientNet-Lite0"`` (Manufacturer's Model Name, at most 64 chars)."""
        return f"{ALGORITHM_NAME} {self.model_title}"[:64]

    @property
    def short(self) -> str:
        """Burned-in line, e.g. ``"dicom-covid 0.1.0, EfficientNet-Lite0, bundle 0.1.0"``."""
        return (
            f"{ALGORITHM_NAME} {self.software_version}, {self.model_title}, "
            f"bundle {self.bundle_version}"
        )

    @property
    def software_versions(self) -> list[str]:
        """Software Versions values: the software and the bundle."""
        return [
            f"{ALGORITHM_NAME} {self.software_version}"[:64],
            f"bundle {self.bundle_version} {self.model_name}"[:64],
        ]

    def parameters(self, **extra: object) -> list[str]:
        """``key=value`` strings for TID 4019 Algorithm Parameters."""
        items = {
            "backbone": self.model_name,
            "bundle_version": self.bundle_version,
            "covid_threshold": f"{self.covid_threshold:.6g}",
            **({"ensemble_members": "+".join(self.members)} if self.members else {}),
            **extra,
        }
        return [f"{k}={v}" for k, v in items.items()]

    def algorithm_identification(self, **extra: object) -> hd.sr.AlgorithmIdentification:
        """TID 4019 Algorithm Identification (name, version, AI family, parameters)."""
        return hd.sr.AlgorithmIdentification(
            name=ALGORITHM_NAME,
            version=self.software_version,
            parameters=self.parameters(**extra),
            family=codes.DCM.ArtificialIntelligence,
            manufacturer=MANUFACTURER,
        )

    def contributing_equipment(self, description: str) -> hd.ContributingEquipment:
        """Contributing Equipment item for the algorithm (purpose: Processing Equipment).

        Parameters
        ----------
        description : str
            Contribution Description (at most 1024 characters); the disclaimer is appended.
        """
        return hd.ContributingEquipment(
            manufacturer=MANUFACTURER,
            purpose_of_reference=codes.DCM.ProcessingEquipment,
            manufacturer_model_name=self.model_label,
            software_versions=self.software_versions,
            contribution_datetime=datetime.datetime.now(),
            contribution_description=f"{description} {DISCLAIMER}"[:1024],
        )

    def device_uid(self) -> str:
        """Stable UID of this model as a device observer (same model and bundle, same UID)."""
        return derived_uid("device", self.model_name, self.bundle_version)


def derived_uid(*parts: object) -> str:
    """Deterministic UID from ``parts`` (pydicom's ``generate_uid`` with entropy sources).

    The same parts always give the same UID, so re-running a job re-creates the same instances.
    """
    return str(generate_uid(entropy_srcs=[ALGORITHM_NAME, *(str(p) for p in parts)]))


def valid_spacing(value: object) -> list[float] | None:
    """Two positive finite spacings from a PixelSpacing-like value, else None."""
    if value is None:
        return None
    try:
        row, col = (float(v) for v in value)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        return None
    if not (0.0 < row < 1e4 and 0.0 < col < 1e4):
        return None
    return [row, col]


def instance_number(source: Dataset) -> int:
    """The source's Instance Number when it is a positive integer, else 1."""
    try:
        number = int(source.get("InstanceNumber", 1) or 1)
    except (TypeError, ValueError):
        return 1
    return number if number >= 1 else 1


def _valid_date_time(header: Dataset, keyword: str, kind: type) -> None:
    value = header.get(keyword)
    if value in (None, ""):
        return
    try:
        kind(str(value))
    except (TypeError, ValueError):
        logger.warning(
            "source %s is not a valid %s; left empty in the results", keyword, kind.__name__
        )
        setattr(header, keyword, "")


def source_header(source: Dataset) -> Dataset:
    """A pixel-less, cleaned copy of the source image's header.

    Everything but pixel data and overlays is copied, then:

    * Pixel Spacing / Imager Pixel Spacing are dropped unless both values are positive;
    * missing type 2 Patient and Study attributes are added empty;
    * a Patient's Sex other than M, F or O, and an unparseable Study Date/Time, are emptied.

    Parameters
    ----------
    source : pydicom.dataset.Dataset
        The analysed image.

    Returns
    -------
    pydicom.dataset.Dataset

    Raises
    ------
    ResultEncodingError
        When the source lacks a UID that results must reference.
    """
    missing = [k for k in _REQUIRED_UIDS if not str(source.get(k, "") or "").strip()]
    if missing:
        raise ResultEncodingError(
            f"the source image has no {', '.join(missing)}; results must reference the image "
            "by its UIDs. Send the image as stored by the PACS (with its UIDs)."
        )
    header = Dataset()
    for elem in source:
        group = elem.tag.group
        if group == 0x7FE0 or (0x6000 <= group <= 0x60FF and group % 2 == 0) or group == 0xFFFA:
            continue
        if elem.keyword in ("PixelSpacing", "ImagerPixelSpacing"):
            spacing = valid_spacing(elem.value)
            if spacing is None:
                logger.info("source %s %r is not valid; not copied", elem.keyword, elem.value)
                continue
        header.add(copy.copy(elem))
    for keyword in _TYPE2_PATIENT_STUDY:
        if keyword not in header or header[keyword].value is None:
            setattr(header, keyword, "")
    if str(header.PatientSex).upper() not in ("M", "F", "O", ""):
        header.PatientSex = ""
    else:
        header.PatientSex = str(header.PatientSex).upper()
    _valid_date_time(header, "PatientBirthDate", DA)
    _valid_date_time(header, "StudyDate", DA)
    _valid_date_time(header, "StudyTime", TM)
    return header


def now_date_time() -> tuple[DA, TM]:
    """Current date and time as DICOM DA and TM (Series/Content Date and Time of results)."""
    now = datetime.datetime.now()
    return DA(now.date()), TM(now.time().replace(microsecond=0))
