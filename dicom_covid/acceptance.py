"""DICOM acceptance rules shared by the reader and the PACS listener's triage.

What makes a data set a frontal grayscale chest radiograph, and how a cut-short one is
recognised, is decided here once, from the header alone (pydicom only: no pixel decoding, no
torch). :func:`dicom_covid.reader.read_image` applies these rules with an explanation the user
can act on; :func:`pacs_listener.triage.triage` applies them to each received instance to skip
what is not for us before anything is queued.
"""

from __future__ import annotations

from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset

__all__ = [
    "CANDIDATE_SOP_CLASSES",
    "CHEST_BODY_PARTS",
    "GRAYSCALE",
    "LATERAL_VIEWS",
    "PIXEL_KEYWORDS",
    "SECONDARY_CAPTURE",
    "declared_size",
    "has_pixels",
    "is_chest",
    "is_lateral",
    "short_element",
]

#: View Position values (upper case) that mark a lateral (non-frontal) projection.
LATERAL_VIEWS = frozenset({"LL", "RL", "LATERAL", "LAT", "LLD", "RLD", "XTABLE LATERAL"})
#: Body Part Examined values (upper case) accepted as chest; empty or absent is accepted too.
CHEST_BODY_PARTS = ("CHEST", "THORAX", "LUNG", "TORAX", "BRUST", "PECHO", "TORACE", "POITRINE")
#: Photometric interpretations of a grayscale radiograph.
GRAYSCALE = frozenset({"MONOCHROME1", "MONOCHROME2"})
#: Pixel data elements: integer, float and double float.
PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
#: Storage SOP classes whose single-frame grayscale images may be chest radiographs.
CANDIDATE_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.1": "CR Image Storage",
    "1.2.840.10008.5.1.4.1.1.1.1": "Digital X-Ray Image Storage - For Presentation",
    "1.2.840.10008.5.1.4.1.1.1.1.1": "Digital X-Ray Image Storage - For Processing",
    "1.2.840.10008.5.1.4.1.1.7": "Secondary Capture Image Storage",
}
#: Secondary Capture Image Storage (its Modality may be OT).
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"


def is_lateral(ds: Dataset) -> bool:
    """True when the View Position says the projection is lateral."""
    return str(ds.get("ViewPosition", "") or "").strip().upper() in LATERAL_VIEWS


def is_chest(ds: Dataset) -> bool:
    """True unless Body Part Examined names something other than the chest (absent: True)."""
    body = str(ds.get("BodyPartExamined", "") or "").strip().upper()
    return not body or any(part in body for part in CHEST_BODY_PARTS)


def has_pixels(ds: Dataset) -> bool:
    """True when the data set holds any pixel data element (integer, float, double)."""
    return any(k in ds for k in PIXEL_KEYWORDS)


def short_element(ds: Dataset) -> str | None:
    """Say which element of ``ds`` holds fewer bytes than its declared length, or None.

    pydicom parses a cut-short data set without raising: a defined-length element keeps the
    bytes that arrived (an undefined-length one, such as encapsulated Pixel Data, is dropped),
    so a short value is the mark of an incomplete transfer or file.
    """
    for elem in ds.elements():
        if (
            isinstance(elem, RawDataElement)
            and elem.value is not None
            and elem.length != 0xFFFFFFFF
            and len(elem.value) < elem.length
        ):
            return f"element {elem.tag} holds {len(elem.value)} of its {elem.length} bytes"
    return None


def declared_size(ds: Dataset) -> tuple[int, int]:
    """Pixels and decoded bytes an image header declares, without decoding anything.

    Parameters
    ----------
    ds : pydicom.dataset.Dataset
        An image header (Rows, Columns, Number of Frames, Samples per Pixel, Bits Allocated;
        absent values count as 0 rows/columns, 1 frame, 1 sample, 16 bits).

    Returns
    -------
    tuple of int
        ``(rows x columns x frames, decoded bytes)``.

    Raises
    ------
    ValueError, TypeError
        When one of these values is not a number.
    """
    rows = int(ds.get("Rows", 0) or 0)
    cols = int(ds.get("Columns", 0) or 0)
    frames = max(1, int(ds.get("NumberOfFrames", 1) or 1))
    samples = max(1, int(ds.get("SamplesPerPixel", 1) or 1))
    bits = max(1, int(ds.get("BitsAllocated", 16) or 16))
    pixels = rows * cols * frames
    return pixels, pixels * samples * ((bits + 7) // 8)
