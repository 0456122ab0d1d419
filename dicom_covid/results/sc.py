"""The Secondary Capture holding the Grad-CAM heat map of one image.

An RGB image at a display resolution (the source's aspect ratio, the long side at most
:data:`DISPLAY_SIZE` pixels; smaller sources keep their size): the radiograph in gray with the
heat map in a jet colour map (see :func:`dicom_covid.explain.overlay`), and burned-in text on
translucent bands:

* top: ``NOT FOR DIAGNOSTIC USE - RESEARCH ONLY`` and the decision with P(COVID-19) and the
  threshold;
* bottom: software, model and bundle version, and what the colours mean.

The text is drawn with DejaVu Sans Bold (shipped with matplotlib, a dependency), sized to the
SC (about 1/30 of its short side, shrunk to fit the width). The SC's Pixel Spacing, when the
source has one, is scaled to the SC's own pixel matrix. Burned In Annotation is YES,
Image Type DERIVED\\SECONDARY, and the Source Image Sequence references the radiograph. The
instance is in its own series of the source's study, with patient and study copied from it.
"""

from __future__ import annotations

import logging
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import cv2
import highdicom as hd
import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes as pydicom_codes
from pydicom.uid import ExplicitVRLittleEndian

from ..errors import ResultEncodingError
from .common import (
    DISCLAIMER,
    MANUFACTURER,
    SC_SERIES_DESCRIPTION,
    SC_SERIES_NUMBER,
    ModelIdentity,
    derived_uid,
    instance_number,
    now_date_time,
    source_header,
    valid_spacing,
)

if TYPE_CHECKING:
    from ..prediction import Prediction
    from ..reader import XrayImage

__all__ = [
    "BANNER",
    "DISPLAY_SIZE",
    "HeatSource",
    "build_heatmap_sc",
    "display_shape",
    "render_heatmap",
]

logger = logging.getLogger(__name__)

#: First burned-in line of every Secondary Capture.
BANNER = "NOT FOR DIAGNOSTIC USE - RESEARCH ONLY"
#: Longest side, in pixels, of the Secondary Capture's pixel matrix.
DISPLAY_SIZE = 1024
_ORIENTATION_LETTERS = set("APLRHF")


@runtime_checkable
class HeatSource(Protocol):
    """A heat map that can be made at any resolution, e.g. :class:`dicom_covid.explain.CamHeat`.

    ``at()`` is the map at the source's ``shape``; ``at(shape)`` the same map made directly at a
    smaller ``shape`` (the Secondary Capture takes it at its display size instead of
    area-averaging a source-size map down).
    """

    shape: tuple[int, int]

    def at(self, shape: tuple[int, int] | None = None) -> np.ndarray:
        """The heat map at ``shape`` (default: the source's), ``float32`` in ``[0, 1]``."""
        ...


@lru_cache(maxsize=16)
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """DejaVu Sans Bold at ``size`` px (matplotlib's copy), else Pillow's scalable default."""
    try:
        import matplotlib

        path = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans-Bold.ttf"
        return ImageFont.truetype(str(path), size)
    except (ImportError, OSError):
        logger.debug("DejaVuSans-Bold.ttf not found; using Pillow's default font")
        return ImageFont.load_default(size=size)


def _fit_font(draw: ImageDraw.ImageDraw, lines: list[str], width: int, short_side: int):
    size = max(12, round(short_side / 30))
    while True:
        font = _font(size)
        widest = max(draw.textlength(line, font=font) for line in lines)
        if widest <= 0.96 * width or size <= 10:
            return font, size
        size = max(10, int(size * 0.96 * width / widest))


def _draw_band(
    rgb: np.ndarray, lines: list[tuple[str, tuple[int, int, int]]], top: bool, font, size: int
) -> None:
    """Shade a band of ``rgb`` (``uint8 (h, w, 3)``, changed in place) and write ``lines`` on it.

    Only the band's rows (with one text size of margin each side, for strokes that pass its
    edge) go through Pillow as RGBA, not the whole picture; every step is local to the pixels it
    touches, so the result is the same as drawing on the whole picture.
    """
    pad = max(4, size // 3)
    line_h = round(size * 1.25)
    band_h = 2 * pad + line_h * len(lines)
    h, w = rgb.shape[:2]
    y0 = 0 if top else max(0, h - band_h)
    lo, hi = max(0, y0 - size), min(h, y0 + band_h + 1 + size)
    strip = Image.fromarray(rgb[lo:hi], "RGB").convert("RGBA")
    shade = Image.new("RGBA", (w, min(band_h + 1, h - y0)), (0, 0, 0, 170))
    strip.alpha_composite(shade, dest=(0, y0 - lo))
    draw = ImageDraw.Draw(strip)
    for i, (text, colour) in enumerate(lines):
        draw.text(
            (pad, y0 - lo + pad + i * line_h),
            text,
            font=font,
            fill=(*colour, 255),
            stroke_width=max(1, size // 16),
            stroke_fill=(0, 0, 0, 255),
        )
    rgb[lo:hi] = np.asarray(strip.convert("RGB"), dtype=np.uint8)


def display_shape(rows: int, cols: int, max_side: int | None = DISPLAY_SIZE) -> tuple[int, int]:
    """``(rows, columns)`` of the Secondary Capture of a ``rows x cols`` source.

    Parameters
    ----------
    rows, cols : int
        The source's matrix.
    max_side : int or None
        Longest side of the result (default :data:`DISPLAY_SIZE`); None keeps the source's size.

    Returns
    -------
    tuple of int
        The source's shape scaled by one factor (aspect kept) so that its long side is at most
        ``max_side``; never larger than the source.
    """
    if max_side is None or max(rows, cols) <= max_side:
        return rows, cols
    scale = max_side / max(rows, cols)
    return max(1, round(rows * scale)), max(1, round(cols * scale))


def _shrink(values: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Area-average ``values`` (2-D) down to ``shape``."""
    if values.shape == shape:
        return values
    src = np.ascontiguousarray(values, dtype=np.float32)
    return cv2.resize(src, (shape[1], shape[0]), interpolation=cv2.INTER_AREA)


def render_heatmap(
    image: XrayImage,
    prediction: Prediction,
    heatmap: np.ndarray | HeatSource,
    method: str = "gradcam",
    alpha: float = 0.45,
    max_side: int | None = DISPLAY_SIZE,
) -> np.ndarray:
    """The RGB picture of the Secondary Capture: overlay plus burned-in text.

    Parameters
    ----------
    image : XrayImage
        The radiograph.
    prediction : Prediction
        The prediction explained.
    heatmap : numpy.ndarray or HeatSource
        ``(H, W)`` heat map in ``[0, 1]``, same shape as ``image.pixels``; or a
        :class:`HeatSource` of that shape, whose map is then made at the picture's size.
    method : str
        CAM method name, printed in the text.
    alpha : float
        Largest opacity of the colour map.
    max_side : int or None
        Longest side of the picture (see :func:`display_shape`); None: the image's own size.

    Returns
    -------
    numpy.ndarray
        ``uint8 (h, w, 3)`` with ``(h, w) = display_shape(H, W, max_side)``; the radiograph (and
        a heat map array) are area-averaged down to it before they are blended.
    """
    from ..explain import overlay

    shape = display_shape(*image.shape, max_side)
    if isinstance(heatmap, HeatSource):
        heat = np.asarray(heatmap.at(shape), dtype=np.float32)
    else:
        heat = _shrink(np.asarray(heatmap), shape)
    rgb = overlay(_shrink(image.pixels, shape), heat, alpha=alpha)
    identity = ModelIdentity.from_prediction(prediction)
    h, w = rgb.shape[:2]
    decision = {
        "suspected": "AI: COVID-19 SUSPECTED",
        "not_suspected": "AI: COVID-19 not suspected",
        "indeterminate": "AI: INDETERMINATE - no COVID-19 verdict ("
        + ", ".join(prediction.abstention_reasons).replace("_", " ")
        + ")",
    }[prediction.outcome]
    top = [
        (BANNER, (255, 235, 59)),
        (
            decision
            if prediction.abstained
            else f"{decision} - P(COVID-19) {100 * prediction.covid_score:.1f}% "
            f"(threshold {100 * prediction.covid_threshold:.1f}%)",
            (255, 120, 100) if prediction.covid_suspected else (255, 255, 255),
        ),
    ]
    label = (
        "Grad-CAM++" if method == "gradcam++" else ("Grad-CAM" if method == "gradcam" else method)
    )
    bottom = [
        (f"{label} of P(COVID-19): red = most influential region", (255, 255, 255)),
        (identity.short, (255, 255, 255)),
    ]
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))  # measures text only
    font, size = _fit_font(draw, [t for t, _ in top + bottom], w, min(h, w))
    rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
    _draw_band(rgb, top, True, font, size)
    _draw_band(rgb, bottom, False, font, size)
    return rgb


def _orientation(header: Dataset) -> tuple[str, str] | None:
    value = header.get("PatientOrientation")
    if value is None or isinstance(value, str) or len(value) != 2:
        return None
    row, col = str(value[0]), str(value[1])
    if row in _ORIENTATION_LETTERS and col in _ORIENTATION_LETTERS:
        return row, col
    return None


def build_heatmap_sc(
    source: Dataset,
    image: XrayImage,
    prediction: Prediction,
    heatmap: np.ndarray | HeatSource,
    *,
    method: str = "gradcam",
    series_instance_uid: str | None = None,
    sop_instance_uid: str | None = None,
    series_number: int = SC_SERIES_NUMBER,
    max_side: int | None = DISPLAY_SIZE,
) -> hd.sc.SCImage:
    """Build the RGB Secondary Capture of the heat map over the source image.

    Parameters
    ----------
    source : pydicom.dataset.Dataset
        The analysed image; patient and study are copied from it and it is referenced as the
        source image.
    image : XrayImage
        The same image as read by :func:`dicom_covid.reader.read_dataset`.
    prediction : Prediction
        The prediction explained.
    heatmap : numpy.ndarray or HeatSource
        ``(rows, columns)`` heat map in ``[0, 1]`` at the source's resolution, or a
        :class:`HeatSource` of that shape (the map is then made at the SC's size only).
    method : str
        CAM method that made the heat map (``"gradcam"``, ``"gradcam++"``, ...).
    series_instance_uid, sop_instance_uid : str, optional
        UIDs; by default derived deterministically from the study / source image, the model
        and the method.
    series_number : int
        Series Number (default :data:`~dicom_covid.results.common.SC_SERIES_NUMBER`).
    max_side : int or None
        Longest side of the SC's pixel matrix (default :data:`DISPLAY_SIZE`, see
        :func:`display_shape`); None: the source's resolution.

    Returns
    -------
    highdicom.sc.SCImage
        Rows and Columns are the SC's own; its Pixel Spacing (when the source has a valid
        one) is the source's, scaled by the source-to-SC size ratio of each axis.

    Raises
    ------
    ResultEncodingError
        When the heat map does not match the source, or highdicom refuses the object.
    """
    header = source_header(source)
    rows, cols = int(header.get("Rows", 0) or 0), int(header.get("Columns", 0) or 0)
    heat = heatmap if isinstance(heatmap, HeatSource) else np.asarray(heatmap)
    if tuple(heat.shape) != (rows, cols) or image.shape != (rows, cols):
        raise ResultEncodingError(
            f"heat map {heat.shape} and image {image.shape} must both have the source's "
            f"{rows}x{cols} pixels; compute the heat map with Explainer.heatmap on this image."
        )
    identity = ModelIdentity.from_prediction(prediction)
    study_uid, src_uid = str(header.StudyInstanceUID), str(header.SOPInstanceUID)
    series_instance_uid = series_instance_uid or derived_uid(
        "sc-series", study_uid, identity.model_name, identity.bundle_version, method
    )
    sop_instance_uid = sop_instance_uid or derived_uid(
        "sc",
        src_uid,
        identity.model_name,
        identity.bundle_version,
        identity.software_version,
        method,
    )
    pixels = render_heatmap(image, prediction, heat, method, max_side=max_side)
    orientation = _orientation(header)
    spacing = valid_spacing(header.get("PixelSpacing"))
    if spacing:  # of the SC's own pixel matrix
        spacing = [
            float(f"{spacing[0] * rows / pixels.shape[0]:.6g}"),
            float(f"{spacing[1] * cols / pixels.shape[1]:.6g}"),
        ]
    date, time = now_date_time()
    try:
        sc = hd.sc.SCImage.from_ref_dataset(
            ref_dataset=header,
            pixel_array=pixels,
            photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
            bits_allocated=8,
            coordinate_system=hd.CoordinateSystemNames.PATIENT,
            series_instance_uid=series_instance_uid,
            series_number=series_number,
            sop_instance_uid=sop_instance_uid,
            instance_number=instance_number(header),
            manufacturer=MANUFACTURER,
            pixel_spacing=tuple(spacing) if spacing else None,
            patient_orientation=orientation or ("L", "F"),  # placeholder, emptied below
            transfer_syntax_uid=ExplicitVRLittleEndian,
            contributing_equipment=[
                identity.contributing_equipment(
                    f"Grad-CAM ({method}) heat map of P(COVID-19) over the source radiograph."
                )
            ],
            series_description=SC_SERIES_DESCRIPTION,
            manufacturer_model_name=identity.model_label,
            software_versions=identity.software_versions,
            series_date=date,
            series_time=time,
        )
        sc.copy_patient_and_study_information(header)
    except (ValueError, TypeError, AttributeError, KeyError) as exc:
        raise ResultEncodingError(
            f"could not build the heat-map Secondary Capture for image {src_uid}: highdicom "
            f"refused it ({type(exc).__name__}: {exc}). Check the source header (patient/study "
            "attributes, UIDs); if it looks valid, report this as a bug with the message."
        ) from exc
    if orientation is None:
        sc.PatientOrientation = ""  # type 2C: present, empty when unknown
    body_part = str(header.get("BodyPartExamined", "") or "")
    laterality = str(header.get("Laterality", "") or "")
    if body_part:
        sc.BodyPartExamined = body_part  # tells validators the part is unpaired (chest)
    if laterality in ("R", "L"):
        sc.Laterality = laterality
    elif not body_part:
        sc.Laterality = ""  # type 2C: unknown whether the body part is paired
    sc.ImageType = ["DERIVED", "SECONDARY"]
    sc.ConversionType = "WSD"  # workstation
    sc.BurnedInAnnotation = "YES"
    sc.DerivationDescription = (
        f"{method} heat map of P(COVID-19) by {identity.short}, blended over the source "
        f"radiograph; {prediction.decision}. {DISCLAIMER}"
    )[:1024]
    sc.ImageComments = f"{DISCLAIMER}. {prediction.decision} (automated, unverified)."
    ref = Dataset()
    ref.ReferencedSOPClassUID = header.SOPClassUID
    ref.ReferencedSOPInstanceUID = src_uid
    ref.PurposeOfReferenceCodeSequence = [
        hd.sr.CodedConcept.from_code(pydicom_codes.DCM.SourceImageForImageProcessingOperation)
    ]
    sc.SourceImageSequence = [ref]
    if str(header.get("LossyImageCompression", "")) == "01":
        sc.LossyImageCompression = "01"
        for keyword in ("LossyImageCompressionRatio", "LossyImageCompressionMethod"):
            if keyword in header:
                setattr(sc, keyword, header[keyword].value)
    logger.info("built heat-map SC %s for image %s", sop_instance_uid, src_uid)
    return sc
