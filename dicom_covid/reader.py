"""Chest X-ray reader: DICOM (CR, DX, X-ray Secondary Capture), PNG and JPEG → one normalised array.

Every image the project touches (training JPEGs, DICOMs received from a PACS, files given to
``predict``) goes through :func:`read_image` (or :func:`read_dataset` for an in-memory DICOM),
which returns an :class:`XrayImage`: a single-channel ``float32`` array in ``[0, 1]`` where 1 is
bright (bone is white, whatever the photometric interpretation), plus the facts used to get there.

DICOM handling, in order:

1. checks: the image is not larger than the configured limits (``too_large``, from the header,
   before anything is decoded); the file is complete (pydicom reads a truncated file without
   complaint, so cut elements, a dropped undefined-length element and an image header without
   Pixel Data are detected here); pixel data present, allowed modality, chest body part,
   grayscale, single frame, sane dimensions, frontal view;
2. decode (native, RLE, JPEG baseline/lossless, JPEG-LS, JPEG 2000 through pylibjpeg/pyjpegls);
   a JPEG or JPEG-LS frame without its end-of-image marker is rejected, as those decoders
   return a partly garbage image from a cut codestream without an error;
3. BitsStored masking (done by pydicom), Modality LUT / Rescale Slope and Intercept;
4. VOI: the first window (LINEAR, LINEAR_EXACT or SIGMOID), else the VOI LUT Sequence (scaled
   by the LUT's output range), else a 0.5-99.5 percentile window;
5. MONOCHROME1 is inverted.

Steps 3-5 are float64 arithmetic. For 8- and 16-bit data they run once per value the pixel type
can hold, into a ``float32`` look-up table the image is then read through: the same values as
running them pixel by pixel (bit-identical with a window or VOI LUT; the percentile window takes
its percentiles from the histogram), at a fraction of the cost on a 5-Mpixel radiograph. 32-bit
data runs them pixel by pixel.

Anything that cannot be classified raises :class:`~dicom_covid.errors.InputRejected` with a
reason code and a message that names the problem and the fix.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_modality_lut, get_decoder
from pydicom.uid import UID, ExplicitVRBigEndian, JPEGLSTransferSyntaxes, JPEGTransferSyntaxes

from .acceptance import (
    GRAYSCALE,
    LATERAL_VIEWS,
    declared_size,
    has_pixels,
    is_chest,
    is_lateral,
    short_element,
)
from .config import ReaderConfig
from .errors import InputRejected

__all__ = [
    "IMAGE_SUFFIXES",
    "LATERAL_VIEWS",
    "XrayImage",
    "check_image_size",
    "declared_size",
    "find_images",
    "read_dataset",
    "read_image",
]

logger = logging.getLogger(__name__)

#: Storage SOP classes whose images we accept (CR, DX for presentation/processing, SC, Digital X-ray
#: variants). Others with pixel data are checked by Modality instead.
_XRAY_MODALITIES_HINT = "CR or DX (or an X-ray Secondary Capture)"
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_JPEG_MAGIC = b"\xff\xd8\xff"
#: Pillow modes converted before the grayscale check.
_BITMAP_TO_GRAY = frozenset({"1", "LA", "La"})
_BITMAP_TO_RGB = frozenset({"P", "PA", "CMYK", "YCbCr", "LAB", "HSV", "RGBa"})
#: Encapsulated transfer syntaxes whose decoders (libjpeg, CharLS) return an image from a
#: truncated codestream without raising; their frames are checked for the end-of-image marker.
_EOI_CHECKED = frozenset(JPEGTransferSyntaxes) | frozenset(JPEGLSTransferSyntaxes)


@dataclass(frozen=True)
class XrayImage:
    """A checked, normalised chest radiograph.

    Attributes
    ----------
    pixels : numpy.ndarray
        ``float32`` array of shape ``(rows, columns)`` in ``[0, 1]``; 1 is bright.
    source : str
        Where it came from (a path, or ``"<dataset>"``).
    format : str
        ``"dicom"``, ``"png"`` or ``"jpeg"``.
    modality, view_position, photometric_interpretation : str
        As read from the DICOM header (empty for PNG/JPEG).
    pixel_spacing : tuple of float or None
        Pixel Spacing, else Imager Pixel Spacing, in mm (row, column); None when unknown or zero.
    transfer_syntax : str or None
        Transfer Syntax UID name for DICOM, None otherwise.
    voi : str
        How grey levels were mapped: ``"window"``, ``"voi_lut"``, ``"percentile"`` or ``"8bit"``.
    sop_instance_uid, study_instance_uid, series_instance_uid : str
        UIDs for DICOM inputs (empty otherwise).
    """

    pixels: np.ndarray
    source: str
    format: str
    modality: str = ""
    view_position: str = ""
    photometric_interpretation: str = ""
    pixel_spacing: tuple[float, float] | None = None
    transfer_syntax: str | None = None
    voi: str = ""
    bits_stored: int = 8
    sop_instance_uid: str = ""
    study_instance_uid: str = ""
    series_instance_uid: str = ""

    @property
    def shape(self) -> tuple[int, int]:
        """``(rows, columns)`` of :attr:`pixels`."""
        return (int(self.pixels.shape[0]), int(self.pixels.shape[1]))

    def facts(self) -> dict[str, object]:
        """Return the header facts used, as a JSON-serialisable dict (no patient data)."""
        return {
            "format": self.format,
            "modality": self.modality,
            "view_position": self.view_position,
            "photometric_interpretation": self.photometric_interpretation,
            "pixel_spacing": list(self.pixel_spacing) if self.pixel_spacing else None,
            "transfer_syntax": self.transfer_syntax,
            "voi": self.voi,
            "bits_stored": self.bits_stored,
            "rows": self.shape[0],
            "columns": self.shape[1],
        }


#: File suffixes :func:`find_images` picks up in folders (``""``: DICOM files without one).
IMAGE_SUFFIXES: frozenset[str] = frozenset({".dcm", ".dicom", ".png", ".jpg", ".jpeg", ""})


def find_images(paths: Sequence[str | Path]) -> list[Path]:
    """The image files of ``paths``: files as given, folders walked recursively.

    In a folder, files whose suffix is in :data:`IMAGE_SUFFIXES` (DICOM with any of its usual
    suffixes or none, PNG, JPEG) are taken, hidden files skipped, sorted per folder given.

    Parameters
    ----------
    paths : sequence of str or pathlib.Path
        Files and folders.

    Returns
    -------
    list of pathlib.Path
    """
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out.extend(
                sorted(
                    f
                    for f in p.rglob("*")
                    if f.is_file()
                    and f.suffix.lower() in IMAGE_SUFFIXES
                    and not f.name.startswith(".")
                )
            )
        else:
            out.append(p)
    return out


def read_image(
    source: str | Path | bytes | BinaryIO, config: ReaderConfig | None = None
) -> XrayImage:
    """Read a chest radiograph from a DICOM, PNG or JPEG file.

    Parameters
    ----------
    source : str, pathlib.Path, bytes or binary file object
        The file. Bytes and file objects are sniffed the same way as paths.
    config : ReaderConfig, optional
        What to accept; defaults to :class:`~dicom_covid.config.ReaderConfig()`.

    Returns
    -------
    XrayImage
        The normalised image and the facts used.

    Raises
    ------
    InputRejected
        When the input cannot be classified; ``reason`` says why.
    """
    config = config or ReaderConfig()
    name = str(source) if isinstance(source, str | Path) else "<bytes>"
    if isinstance(source, str | Path):
        path = Path(source)
        if not path.is_file():
            raise InputRejected("not_found", f"{path}: no such file. Check the path.")
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise InputRejected("unreadable", f"{path}: cannot be read ({exc}).") from exc
    elif isinstance(source, bytes | bytearray):
        data = bytes(source)
    else:
        data = source.read()

    if not data:
        raise InputRejected("not_dicom", f"{name}: the file is empty. Send the complete image.")
    if data.startswith(_PNG_MAGIC) or data.startswith(_JPEG_MAGIC):
        return _read_bitmap(data, name)
    try:
        ds = pydicom.dcmread(io.BytesIO(data))
        problem = _truncation(ds)
    except InvalidDicomError as exc:
        if _bare_data_set(data):
            raise InputRejected(
                "no_file_meta",
                f"{name}: a bare DICOM data set without the file header: the 128-byte preamble, "
                "'DICM' and the file meta information (group 0002, which names the Transfer "
                "Syntax) are missing. Re-save it as a DICOM Part 10 file, e.g. with dcmtk "
                "'dcmconv --write-file IN OUT' or pydicom's save_as(..., "
                "enforce_file_format=True).",
            ) from exc
        raise InputRejected(
            "not_dicom",
            f"{name}: not a DICOM file (no 'DICM' preamble) and not PNG/JPEG. "
            "Give a DICOM Part 10 file, a PNG or a JPEG.",
        ) from exc
    except Exception as exc:  # pydicom raises many types on truncated/garbled files
        raise InputRejected(
            "corrupt",
            f"{name}: the DICOM file is truncated or corrupt ({type(exc).__name__}: {exc}). "
            "Re-export or re-send the image.",
        ) from exc
    if problem:
        raise InputRejected(
            "corrupt",
            f"{name}: the DICOM file is truncated or corrupt ({problem}). "
            "Re-export or re-send the complete image.",
        )
    return read_dataset(ds, config=config, source=name)


def _bare_data_set(data: bytes) -> bool:
    """True when ``data`` parses as a DICOM data set naming its SOP Class and Instance (a file
    written without preamble and file meta), rather than as random bytes."""
    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=True, stop_before_pixels=True)
        uids = (str(ds.get("SOPClassUID", "")), str(ds.get("SOPInstanceUID", "")))
    except Exception:
        return False
    return all(uid and all(c in "0123456789." for c in uid) for uid in uids)


def _truncation(ds: Dataset) -> str | None:
    """Say how a dataset read from bytes was cut short, or None when it looks complete.

    pydicom reads a cut file without raising: a defined-length element keeps the bytes that were
    there, and an undefined-length one (encapsulated Pixel Data, sequences) is dropped with only
    a warning, as is a final element header cut short. So: look for short elements, then for an
    image (or any object) whose header stops before its Pixel Data.
    """
    for dataset in (getattr(ds, "file_meta", None), ds):
        problem = short_element(dataset) if dataset is not None else None
        if problem:
            return problem
    if len(ds) == 0:
        return "no data elements after the file meta information"
    if not has_pixels(ds):
        if "SOPClassUID" not in ds:  # type 1 in every IOD: the file stops before it
            return "the file ends before the SOP Class UID"
        meta = getattr(ds, "file_meta", None) or Dataset()
        classes = (ds.SOPClassUID, meta.get("MediaStorageSOPClassUID"))
        if "Rows" in ds or any("Image Storage" in str(getattr(c, "name", "")) for c in classes):
            return "the header describes an image but the file ends before its Pixel Data"
    return None


def read_dataset(
    ds: Dataset, config: ReaderConfig | None = None, source: str = "<dataset>"
) -> XrayImage:
    """Check and normalise a DICOM dataset already in memory.

    Parameters
    ----------
    ds : pydicom.dataset.Dataset
        The image dataset (with file meta when it was read from a file).
    config : ReaderConfig, optional
        What to accept.
    source : str
        Name used in error messages.

    Returns
    -------
    XrayImage

    Raises
    ------
    InputRejected
        When the dataset cannot be classified.
    """
    config = config or ReaderConfig()
    try:
        check_image_size(ds, config, source)
        _check_header(ds, config, source)
    except InputRejected:
        raise
    except Exception as exc:  # a value pydicom cannot convert (IS "x", US of 3 bytes, ...)
        raise InputRejected(
            "bad_header",
            f"{source}: a header value cannot be read ({type(exc).__name__}: {exc}). Re-export "
            "the image with a valid header.",
        ) from exc
    ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if ts is None:
        ts = _infer_transfer_syntax(ds, source)
    ts_name = ts.name if ts is not None else None
    _check_codestream_end(ds, ts, source)
    try:
        raw = ds.pixel_array
    except Exception as exc:
        hint = (
            "Install the decoders (pip install pylibjpeg pylibjpeg-openjpeg pylibjpeg-libjpeg "
            "pyjpegls) or send the image uncompressed."
            if _decoder_missing(ts)
            else "The pixel data is damaged or does not match Rows/Columns/BitsAllocated; "
            "re-export or re-send the image."
        )
        raise InputRejected(
            "decode_failed",
            f"{source}: pixel data could not be decoded (transfer syntax {ts_name or 'unknown'}: "
            f"{type(exc).__name__}: {exc}). {hint}",
        ) from exc
    if raw.ndim != 2:
        raise InputRejected(
            "bad_dimensions",
            f"{source}: decoded pixel data has shape {raw.shape}; expected one grayscale frame.",
        )
    photometric = str(ds.get("PhotometricInterpretation", "")).upper()
    pixels, voi = _normalise(raw, ds, photometric == "MONOCHROME1", source)
    return XrayImage(
        pixels=pixels,
        source=source,
        format="dicom",
        modality=str(ds.get("Modality", "")),
        view_position=str(ds.get("ViewPosition", "")),
        photometric_interpretation=photometric,
        pixel_spacing=_pixel_spacing(ds),
        transfer_syntax=ts_name,
        voi=voi,
        bits_stored=int(ds.get("BitsStored", 0) or 0),
        sop_instance_uid=str(ds.get("SOPInstanceUID", "")),
        study_instance_uid=str(ds.get("StudyInstanceUID", "")),
        series_instance_uid=str(ds.get("SeriesInstanceUID", "")),
    )


def check_image_size(ds: Dataset, config: ReaderConfig | None = None, source: str = "") -> None:
    """Reject an image whose header declares more pixels or bytes than ``config`` allows.

    Only header values are read, so a decompression bomb (a few MB of RLE declaring
    16384 x 16384 pixels) is refused in microseconds and without memory.

    Parameters
    ----------
    ds : pydicom.dataset.Dataset
        The image header.
    config : ReaderConfig, optional
        ``max_pixels`` and ``max_decoded_bytes``.
    source : str
        Name used in the message.

    Raises
    ------
    InputRejected
        ``too_large`` when a limit is exceeded.
    """
    config = config or ReaderConfig()
    pixels, decoded = declared_size(ds)
    if pixels > config.max_pixels or decoded > config.max_decoded_bytes:
        rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        raise InputRejected(
            "too_large",
            f"{source or 'the image'}: the header declares {rows}x{cols} pixels x {frames} "
            f"frame(s) ({pixels / 2**20:.0f} Mi pixels, {decoded / 2**20:.0f} MiB decoded), over "
            f"the limit of {config.max_pixels / 2**20:.0f} Mi pixels / "
            f"{config.max_decoded_bytes / 2**20:.0f} MiB; nothing was decoded. A chest "
            "radiograph is far smaller: send a downscaled export, or raise the limit "
            "(ReaderConfig.max_pixels / max_decoded_bytes) if the image is genuine.",
        )


def _infer_transfer_syntax(ds: Dataset, source: str) -> UID:
    """The transfer syntax of a data set whose file meta lacks it (tolerant reading).

    Native Pixel Data is read in the encoding pydicom found the data set in, which is recorded
    in the file meta. Encapsulated (compressed) Pixel Data cannot be decoded without knowing
    the codec, so it is rejected with what to do.

    Raises
    ------
    InputRejected
        ``no_file_meta`` when the Pixel Data is encapsulated or the encoding is unknown.
    """
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

    encoding = getattr(ds, "original_encoding", (None, None))
    elem = ds["PixelData"]
    if elem.is_undefined_length or None in encoding:
        raise InputRejected(
            "no_file_meta",
            f"{source}: the file meta information (group 0002) has no Transfer Syntax UID "
            "(0002,0010), so the compression of the encapsulated Pixel Data is unknown. "
            "Re-save the file as DICOM Part 10 with its transfer syntax, e.g. with dcmtk "
            "'dcmconv --write-file IN OUT' from the original, or send it through the PACS.",
        )
    implicit, little = encoding
    if little:
        ts = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
    else:
        ts = ExplicitVRBigEndian
    if getattr(ds, "file_meta", None) is None:
        ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ts
    logger.info("%s: no Transfer Syntax UID in the file meta; read as %s", source, ts.name)
    return ts


def _decoder_missing(ts: UID | None) -> bool:
    """True when ``ts`` is compressed and no installed pydicom plugin can decode it."""
    if ts is None or not ts.is_compressed:
        return False
    try:
        return not get_decoder(ts).is_available
    except NotImplementedError:
        return True


def _check_codestream_end(ds: Dataset, ts: UID | None, source: str) -> None:
    """Reject a JPEG / JPEG-LS frame cut short (its decoders return garbage without an error)."""
    if ts is None or ts not in _EOI_CHECKED or "PixelData" not in ds:
        return
    try:
        frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    except Exception as exc:
        raise InputRejected(
            "decode_failed",
            f"{source}: the encapsulated pixel data cannot be split into frames "
            f"({type(exc).__name__}: {exc}). Re-export or re-send the image.",
        ) from exc
    # EOI (FFD9) cannot occur inside entropy-coded data; allow a few bytes of padding after it.
    if b"\xff\xd9" not in frame[-16:]:
        raise InputRejected(
            "decode_failed",
            f"{source}: the {ts.name} codestream has no end-of-image marker, so the compressed "
            "pixel data is truncated. Re-send the complete image.",
        )


def _check_header(ds: Dataset, config: ReaderConfig, source: str) -> None:
    """Raise InputRejected for anything that is not a frontal grayscale chest radiograph."""
    # Pixel Data first: a report, presentation state or key-object note (SR, PR, KO modalities)
    # is "not an image", which says more than "wrong modality".
    if not has_pixels(ds):
        raise InputRejected(
            "no_pixel_data",
            f"{source}: the dataset has no Pixel Data (SOP class "
            f"{getattr(ds.get('SOPClassUID'), 'name', 'unknown')}). Send the image itself, "
            "not a report or presentation state; if it is an image, the file is incomplete: "
            "re-send it.",
        )
    if "PixelData" not in ds:
        which = "Float" if "FloatPixelData" in ds else "Double Float"
        raise InputRejected(
            "float_pixel_data",
            f"{source}: the image stores {which} Pixel Data (7FE0,000"
            f"{'8' if which == 'Float' else '9'}), as parametric maps do, not the integer Pixel "
            "Data (7FE0,0010) of a radiograph. Send the original radiograph from the CR/DX "
            "modality.",
        )
    modality = str(ds.get("Modality", "")).upper()
    if modality not in config.allowed_modalities:
        raise InputRejected(
            "wrong_modality",
            f"{source}: Modality is {modality!r}; only {_XRAY_MODALITIES_HINT} chest radiographs "
            "are classified. Send a chest X-ray.",
        )
    body_part = str(ds.get("BodyPartExamined", "")).upper().strip()
    if config.check_body_part and not is_chest(ds):
        raise InputRejected(
            "wrong_body_part",
            f"{source}: Body Part Examined is {body_part!r}; only chest radiographs are "
            "classified. Send a chest X-ray.",
        )
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    photometric = str(ds.get("PhotometricInterpretation", "")).upper()
    if samples != 1 or photometric not in GRAYSCALE:
        raise InputRejected(
            "colour",
            f"{source}: the image is colour ({photometric or 'unknown'}, {samples} samples per "
            "pixel); only grayscale (MONOCHROME1/2) radiographs are classified. Send the "
            "grayscale original from the modality.",
        )
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames != 1:
        raise InputRejected(
            "multi_frame",
            f"{source}: the image has {frames} frames; send each radiograph as its own "
            "single-frame instance.",
        )
    rows, cols = ds.get("Rows"), ds.get("Columns")
    if rows is None or cols is None:
        raise InputRejected(
            "bad_dimensions",
            f"{source}: Rows/Columns are missing, so the pixel data cannot be read. "
            "Re-export the image with a complete header.",
        )
    rows, cols = int(rows), int(cols)
    lo, hi = config.min_size, config.max_size
    if not (lo <= rows <= hi and lo <= cols <= hi) or max(rows, cols) > 4 * min(rows, cols):
        raise InputRejected(
            "bad_dimensions",
            f"{source}: image is {rows}x{cols}; a chest radiograph must be between {lo} and {hi} "
            "pixels a side with an aspect ratio under 4:1.",
        )
    bits_alloc = int(ds.get("BitsAllocated", 0) or 0)
    bits_stored = int(ds.get("BitsStored", bits_alloc) or 0)
    if bits_alloc not in (8, 16, 32) or not (1 <= bits_stored <= bits_alloc):
        raise InputRejected(
            "bad_header",
            f"{source}: BitsAllocated={bits_alloc}, BitsStored={bits_stored} is inconsistent; "
            "BitsStored must be between 1 and BitsAllocated (8, 16 or 32).",
        )
    view = str(ds.get("ViewPosition", "")).upper().strip()
    if config.reject_lateral and is_lateral(ds):
        raise InputRejected(
            "lateral_view",
            f"{source}: View Position is {view!r} (lateral); the models were trained on frontal "
            "(PA/AP) views only. Send the frontal image of the study.",
        )


#: Integer pixel data of at most this many bytes a sample is mapped through a look-up table over
#: every value its type can hold (256 or 65,536 entries) instead of pixel by pixel.
_LUT_MAX_ITEMSIZE = 2


def _normalise(raw: np.ndarray, ds: Dataset, invert: bool, source: str) -> tuple[np.ndarray, str]:
    """Stored values → C-contiguous ``float32`` in ``[0, 1]``, 1 bright; and how (``voi``).

    Modality LUT / Rescale, VOI (:func:`_apply_voi`) and the MONOCHROME1 inversion are the same
    float64 arithmetic whichever way they run. For 8- and 16-bit data they run once per value the
    type can hold, into a ``float32`` table that the image is then looked up in (one
    gather), so a 5-Mpixel radiograph costs one gather instead of a dozen float64 passes; the
    percentile window's percentiles come from the image's histogram. Other data (32-bit) runs
    pixel by pixel in float64, in place.
    """
    table = None
    if raw.dtype.kind in "ui" and raw.dtype.itemsize <= _LUT_MAX_ITEMSIZE:
        raw = np.ascontiguousarray(raw, dtype=raw.dtype.newbyteorder("="))
        index = raw.view(f"u{raw.dtype.itemsize}")
        # every value the type holds, in the order of its bit pattern read as unsigned
        stored = np.arange(2 ** (8 * raw.dtype.itemsize), dtype=index.dtype).view(raw.dtype)
        mapped = _modality(stored, ds, source)
        if np.isfinite(mapped).all():  # else the pixel-by-pixel path decides, as it always did
            table, voi = _apply_voi(mapped, ds, lambda: _histogram_percentiles(index, mapped))
    if table is None:
        values = _modality(raw, ds, source)
        arr, voi = _apply_voi(values, ds, lambda: _percentiles(values))
    else:
        arr = table
    if invert:
        np.subtract(1.0, arr, out=arr)
    arr32 = arr.astype(np.float32)
    if table is not None:
        finite = bool(np.isfinite(arr32).all())
        arr32 = arr32[index]  # a gather: faster than np.take for uint16 indices
        if not finite:  # a non-finite entry matters only when the image holds its value
            finite = bool(np.isfinite(arr32).all())
    else:
        finite = bool(np.isfinite(arr32).all())
    if not finite:
        raise InputRejected("decode_failed", f"{source}: pixel values are not finite.")
    return arr32, voi


def _modality(values: np.ndarray, ds: Dataset, source: str) -> np.ndarray:
    """Modality LUT / Rescale Slope and Intercept of ``values``: a new ``float64`` array."""
    try:
        out = apply_modality_lut(values, ds)
    except Exception as exc:  # Rescale Slope "x", a Modality LUT that does not fit, ...
        raise InputRejected(
            "bad_header",
            f"{source}: the Modality LUT / Rescale Slope and Intercept cannot be applied "
            f"({type(exc).__name__}: {exc}). Re-export the image with a valid header.",
        ) from exc
    return np.asarray(out).astype(np.float64, copy=out is values)


def _percentiles(values: np.ndarray) -> tuple[float, float]:
    """The 0.5 and 99.5 percentiles of ``values`` (linear interpolation)."""
    lo, hi = np.percentile(values, [0.5, 99.5])
    return float(lo), float(hi)


def _histogram_percentiles(index: np.ndarray, mapped: np.ndarray) -> tuple[float, float]:
    """``np.percentile(mapped[index], [0.5, 99.5])`` (linear), from the image's histogram.

    ``index`` holds each pixel's position in ``mapped`` (the modality value of every stored
    value). Counting the pixels per value and walking the values in order finds the two order
    statistics each percentile lies between, without sorting the image.
    """
    counts = np.bincount(index.ravel(), minlength=mapped.size)
    present = np.flatnonzero(counts)
    order = np.argsort(mapped[present], kind="stable")
    values = mapped[present][order]
    ends = np.cumsum(counts[present][order])  # rank of the last pixel of each value, plus one
    n = int(index.size)
    out = []
    for q in (0.005, 0.995):
        position = q * (n - 1)
        below = int(np.floor(position))
        a = values[np.searchsorted(ends, below, side="right")]
        b = values[np.searchsorted(ends, min(below + 1, n - 1), side="right")]
        t = position - below
        out.append(float(b - (b - a) * (1.0 - t) if t >= 0.5 else a + (b - a) * t))
    return out[0], out[1]


def _apply_voi(
    arr: np.ndarray, ds: Dataset, percentiles: Callable[[], tuple[float, float]]
) -> tuple[np.ndarray, str]:
    """Map modality values to [0, 1] with the dataset's first window / VOI LUT.

    ``arr`` (``float64``) is overwritten. ``percentiles`` gives the image's 0.5 and 99.5
    percentiles, asked for only when there is neither a window nor a VOI LUT.
    """
    try:
        c, w = _first_number(ds.get("WindowCenter")), _first_number(ds.get("WindowWidth"))
    except Exception:  # an unreadable window is ignored, as a viewer would
        c = w = None
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        if c is not None and w is not None and w > 1:
            func = str(ds.get("VOILUTFunction", "LINEAR")).upper()
            if func == "SIGMOID":  # 1 / (1 + exp(-4 (x - c) / w))
                arr -= c
                arr *= -4.0
                arr /= w
                np.exp(arr, out=arr)
                arr += 1.0
                np.divide(1.0, arr, out=arr)
            elif func == "LINEAR_EXACT":  # (x - c) / w + 0.5
                arr -= c
                arr /= w
                arr += 0.5
            else:  # (x - (c - 0.5)) / (w - 1) + 0.5
                arr -= c - 0.5
                arr /= w - 1.0
                arr += 0.5
            return np.clip(arr, 0.0, 1.0, out=arr), "window"
        try:
            out = _voi_lut(arr, ds)
        except Exception:  # an unusable VOI LUT is ignored
            out = None
        if out is not None:
            return out, "voi_lut"
        lo, hi = percentiles()
        if hi <= lo:
            hi = lo + 1.0
        arr -= lo
        arr /= hi - lo
        return np.clip(arr, 0.0, 1.0, out=arr), "percentile"


def _first_number(value: object) -> float | None:
    """The first value of a (possibly multi-valued) DS element as a float; None when absent."""
    if value is None or value == "":
        return None
    if isinstance(value, pydicom.multival.MultiValue | list | tuple):
        if not value:
            return None
        value = value[0]
    return float(value)  # type: ignore[arg-type]


def _voi_lut(arr: np.ndarray, ds: Dataset) -> np.ndarray | None:
    """Apply the first VOI LUT Sequence item, scaled by its output range; None when absent.

    Done here rather than with ``pydicom.pixels.apply_voi_lut``, which indexes through an
    array of the LUT's output type (so an 8-bit LUT with more than 256 entries wraps) and warns
    on the float input that Rescale Slope/Intercept produce. The output is scaled by the LUT's
    own minimum and maximum (not the image's), so the grey levels are the ones a viewer shows.
    """
    sequence = ds.get("VOILUTSequence")
    if not sequence:
        return None
    item = sequence[0]
    descriptor, data = item.get("LUTDescriptor"), item.get("LUTData")
    if descriptor is None or data is None or len(descriptor) != 3:
        return None
    entries = int(descriptor[0]) or 65536
    first = int(descriptor[1])
    if isinstance(data, bytes | bytearray):  # OW: 16-bit words in the dataset's byte order
        big = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None) == (
            ExplicitVRBigEndian
        )
        lut = np.frombuffer(bytes(data[: len(data) // 2 * 2]), dtype=">u2" if big else "<u2")
    else:
        lut = np.atleast_1d(np.asarray(data))
    lut = lut[:entries].astype(np.float64)
    if lut.size == 0:
        return None
    index = np.clip(np.rint(arr) - first, 0, lut.size - 1).astype(np.int64)
    lo, hi = float(lut.min()), float(lut.max())
    out = lut[index]
    return (out - lo) / (hi - lo) if hi > lo else np.zeros_like(out)


def _pixel_spacing(ds: Dataset) -> tuple[float, float] | None:
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        try:
            value = ds.get(keyword)
        except Exception:  # unreadable spacing is only a missing fact, not a reason to reject
            continue
        if isinstance(value, pydicom.multival.MultiValue | list | tuple) and len(value) == 2:
            try:
                row, col = float(value[0]), float(value[1])
            except (TypeError, ValueError):
                continue
            if row > 0 and col > 0:
                return (row, col)
    return None


def _read_bitmap(data: bytes, name: str) -> XrayImage:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            fmt = (img.format or "").lower()
            mode = img.mode
            if mode in _BITMAP_TO_GRAY:  # bilevel, gray + alpha: drop to plain gray
                arr = np.asarray(img.convert("L"))
            elif mode in _BITMAP_TO_RGB:  # palette, CMYK, ...: judged as RGB below
                arr = np.asarray(img.convert("RGB"))
            else:
                arr = np.asarray(img)
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise InputRejected(
            "corrupt", f"{name}: the PNG/JPEG is truncated or corrupt ({exc}). Re-export it."
        ) from exc
    if arr.ndim == 3:
        channels = arr[..., :3].astype(np.int32)
        if np.abs(channels[..., 0] - channels[..., 1]).max() > 2 or (
            np.abs(channels[..., 0] - channels[..., 2]).max() > 2
        ):
            raise InputRejected(
                "colour",
                f"{name}: the image is colour ({mode}); only grayscale radiographs are classified. "
                "Export the radiograph as a grayscale image.",
            )
        arr = arr[..., 0]
    if arr.dtype == np.uint8:
        pixels = arr.astype(np.float32) / 255.0
        voi = "8bit"
    else:
        arr = arr.astype(np.float64)
        maximum = 65535.0 if mode.startswith("I;16") or arr.max() > 255 else 255.0
        pixels = (arr / maximum).astype(np.float32)
        voi = "16bit" if maximum > 255 else "8bit"
    rows, cols = pixels.shape
    if min(rows, cols) < 32 or max(rows, cols) > 4 * min(rows, cols):
        raise InputRejected(
            "bad_dimensions",
            f"{name}: image is {rows}x{cols}; a chest radiograph must be at least 32 pixels a side "
            "with an aspect ratio under 4:1.",
        )
    return XrayImage(
        pixels=np.ascontiguousarray(pixels),
        source=name,
        format="jpeg" if fmt == "jpeg" else fmt,
        voi=voi,
        bits_stored=8 if voi == "8bit" else 16,
    )
