"""Header-only triage: is a received instance a candidate for analysis?

A PACS forwards whole studies, so most of what arrives is not for us: CT slices, reports,
presentation states, lateral views, and our own results coming back. :func:`triage` decides from
the header alone (pydicom, no pixel decoding, no torch), with the rules of
:mod:`dicom_covid.acceptance` that the reader applies too, whether an instance is a frontal
CR/DX chest radiograph (or an X-ray Secondary Capture); everything else is acknowledged and
recorded as skipped with a short reason code. The worker still runs the full reader checks
(:func:`dicom_covid.reader.read_dataset`) on candidates and fails those it rejects.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydicom.dataset import Dataset

from dicom_covid.acceptance import (
    CANDIDATE_SOP_CLASSES,
    GRAYSCALE,
    SECONDARY_CAPTURE,
    declared_size,
    has_pixels,
    is_chest,
    is_lateral,
    short_element,
)

from .config import OWN_MARKER

__all__ = [
    "CANDIDATE_SOP_CLASSES",
    "Verdict",
    "incomplete",
    "is_own_result",
    "result_reserve",
    "too_large",
    "triage",
]

#: Modality values of a radiograph; a Secondary Capture may also say OT (other).
_XRAY_MODALITIES = {"CR", "DX"}
_SC_MODALITIES = {"CR", "DX", "OT", ""}


@dataclass(frozen=True)
class Verdict:
    """Outcome of :func:`triage`.

    Attributes
    ----------
    candidate : bool
        True when the instance should be analysed.
    reason : str
        Why it is skipped (``"own_result"``, ``"not_image"``, ``"wrong_modality"``,
        ``"lateral_view"``, ``"not_chest"``, ``"colour"``, ``"multi_frame"``); empty for
        candidates.
    detail : str
        Human-readable detail without patient data (SOP class name, modality, view).
    """

    candidate: bool
    reason: str = ""
    detail: str = ""


def incomplete(ds: Dataset) -> str | None:
    """Say how a received data set was cut short, or None when it looks complete.

    pydicom parses a cut data set without raising: a defined-length element keeps the bytes
    that arrived, and an undefined-length one (encapsulated Pixel Data) is dropped. So a value
    shorter than its declared length, or a candidate image (CR, DX, SC) without any pixel data,
    means the data set is incomplete and must be refused rather than acknowledged.
    """
    problem = short_element(ds)
    if problem:
        return problem
    sop_class = str(ds.get("SOPClassUID", "") or "").strip()
    if sop_class in CANDIDATE_SOP_CLASSES and not has_pixels(ds):
        return f"a {CANDIDATE_SOP_CLASSES[sop_class]} data set without Pixel Data"
    return None


def too_large(ds: Dataset, maximum_pixels: int, maximum_bytes: int) -> str | None:
    """Say why an image is too large to analyse, or None when it fits the limits.

    Only the header is read (Rows x Columns x Number of Frames and the decoded size from
    Samples per Pixel and Bits Allocated, see :func:`dicom_covid.acceptance.declared_size`), so a
    decompression bomb costs nothing to refuse.

    Raises
    ------
    ValueError, TypeError
        When one of those header values is not a number.
    """
    pixels, decoded = declared_size(ds)
    if pixels <= maximum_pixels and decoded <= maximum_bytes:
        return None
    return (
        f"{int(ds.get('Rows', 0) or 0)}x{int(ds.get('Columns', 0) or 0)} pixels x "
        f"{int(ds.get('NumberOfFrames', 1) or 1)} frame(s) = {pixels / 2**20:.0f} Mi pixels, "
        f"{decoded / 2**20:.0f} MiB decoded; limits {maximum_pixels / 2**20:.0f} Mi pixels, "
        f"{maximum_bytes / 2**20:.0f} MiB"
    )


def result_reserve(ds: Dataset) -> int:
    """Disk space to reserve for the results of a candidate image, in bytes.

    The Secondary Capture is an RGB image at most at the source's resolution (3 bytes a pixel);
    1 MiB covers the SR and both headers.
    """
    try:
        pixels = int(ds.get("Rows", 0) or 0) * int(ds.get("Columns", 0) or 0)
    except (TypeError, ValueError):
        pixels = 0
    return 3 * max(0, pixels) + 2**20


def is_own_result(ds: Dataset, marker: str = OWN_MARKER) -> bool:
    """True when ``ds`` was produced by dicom-covid.

    Our results carry ``marker`` at the start of their Manufacturer (``dicom-covid developers``)
    or of the Manufacturer of a Contributing Equipment item (case-insensitive). The Series
    Description is not used: the project's own sample images mention dicom-covid there.
    """
    own = marker.strip().lower()
    if not own:
        return False
    values = [ds.get("Manufacturer", "")]
    values += [
        item.get("Manufacturer", "")
        for item in (ds.get("ContributingEquipmentSequence", None) or [])
    ]
    return any(str(v or "").strip().lower().startswith(own) for v in values)


def triage(ds: Dataset, marker: str = OWN_MARKER) -> Verdict:
    """Decide from the header whether ``ds`` is a frontal chest radiograph to analyse.

    Parameters
    ----------
    ds : pydicom.dataset.Dataset
        The received instance (pixel data is never decoded).
    marker : str
        Prefix that marks our own results (see :func:`is_own_result`).

    Returns
    -------
    Verdict
    """
    sop_class = str(ds.get("SOPClassUID", ""))
    modality = str(ds.get("Modality", "")).strip().upper()
    class_name = CANDIDATE_SOP_CLASSES.get(sop_class) or getattr(
        ds.get("SOPClassUID"), "name", sop_class or "unknown SOP class"
    )
    detail = f"{class_name}, modality {modality or 'none'}"
    if is_own_result(ds, marker):
        return Verdict(False, "own_result", f"{detail}, produced by {marker}")
    pixels = has_pixels(ds)
    if sop_class not in CANDIDATE_SOP_CLASSES or not pixels:
        reason = "not_image" if not pixels else "wrong_modality"
        return Verdict(False, reason, detail)
    allowed = _SC_MODALITIES if sop_class == SECONDARY_CAPTURE else _XRAY_MODALITIES | {""}
    if modality not in allowed:
        return Verdict(False, "wrong_modality", detail)
    if is_lateral(ds):
        view = str(ds.get("ViewPosition", "")).strip().upper()
        return Verdict(False, "lateral_view", f"{detail}, view {view}")
    if not is_chest(ds):
        body = str(ds.get("BodyPartExamined", "")).strip().upper()
        return Verdict(False, "not_chest", f"{detail}, body part {body}")
    photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    if photometric and photometric not in GRAYSCALE:
        return Verdict(False, "colour", f"{detail}, {photometric}")
    if int(ds.get("NumberOfFrames", 1) or 1) != 1:
        return Verdict(False, "multi_frame", detail)
    return Verdict(True, "", detail)
