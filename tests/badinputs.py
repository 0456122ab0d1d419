"""A corpus of bad (and awkward but valid) inputs for the PACS service, built at test time.

Each :class:`Case` is one C-STORE as a PACS or a broken modality could send it, written as a
DICOM Part 10 file in a temporary folder: the file meta names the SOP Class, SOP Instance and
transfer syntax of the C-STORE request, and the bytes after it are the data set exactly as they
travel over the network (``pacs_helpers.send`` sends files unparsed, byte for byte). Over DICOM a
C-STORE carries a data set, never a file, so "missing preamble" and "truncated file" are modelled
as what can actually arrive: a whole Part 10 file (or one without its preamble) sent as the data
set, and data sets cut short.

Every case states its expected outcome (:class:`Expected`):

``status``
    the C-STORE is refused with a specific DIMSE status and nothing is recorded;
``no_context``
    the listener does not accept the transfer syntax, so the SCU cannot even send it;
``skipped``
    acknowledged (0x0000) and recorded as skipped with a triage reason, never analysed;
``failed``
    acknowledged, analysed by the worker, which fails the image with a reader reason code;
``analysed``
    acknowledged and analysed: one SR and one SC are delivered.

Sources: ``sample_dicoms/`` (the project's chest CR in several encodings) and pydicom's test
files (CT, MR, multi-frame MR, RGB Secondary Capture, Comprehensive SR).
"""

from __future__ import annotations

import copy
import io
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pacs_helpers import PATIENT_ID, PATIENT_NAME, sample_path
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate, generate_frames
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    RLELossless,
    generate_uid,
)

__all__ = [
    "CASES",
    "Case",
    "Expected",
    "build_corpus",
    "encode_dataset",
    "part10",
    "rle_bomb",
    "send_exact",
]

CANNOT_UNDERSTAND = 0xC210
TOO_LARGE = 0xA701
#: A private transfer syntax (explicit VR little endian encoding) no listener offers.
PRIVATE_TS = pydicom.uid.register_transfer_syntax("1.2.826.0.1.3680043.9.9999.1", False, True)
MISMATCH = 0xA900

#: Non-ASCII patient names per character set (they must work and must never be logged).
CHARSET_NAMES = {
    "ISO_IR 100": "Müller^Jürgen",
    "ISO_IR 192": "山田^太郎",
    "GB18030": "王^小明",
}


@dataclass(frozen=True)
class Expected:
    """What the service must do with a case.

    Attributes
    ----------
    kind : str
        ``"status"``, ``"no_context"``, ``"skipped"``, ``"failed"`` or ``"analysed"``.
    status : int
        DIMSE status of the C-STORE response (0x0000 for everything but ``status``).
    reason : str
        Skip reason (triage) or failure reason code (reader), for ``skipped`` / ``failed``.
    """

    kind: str
    status: int = 0x0000
    reason: str = ""

    def __str__(self) -> str:
        if self.kind == "status":
            return f"refused 0x{self.status:04X}"
        return f"{self.kind} {self.reason}".strip()


def refused(status: int) -> Expected:
    return Expected("status", status)


def skipped(reason: str) -> Expected:
    return Expected("skipped", 0, reason)


def failed(reason: str) -> Expected:
    return Expected("failed", 0, reason)


ANALYSED = Expected("analysed")
NO_CONTEXT = Expected("no_context", -1)


@dataclass
class Case:
    """One C-STORE to send.

    Attributes
    ----------
    name : str
        Test id.
    what : str
        What is wrong (or awkward) about it.
    expected : Expected
    path : pathlib.Path
        Part 10 file to send (set by :func:`build_corpus`).
    sop_instance_uid, study_instance_uid : str
        UIDs of the C-STORE request (and, for parseable data sets, of the data set).
    patient_name : str
        Patient name in the data set (checked against the logs).
    """

    name: str
    what: str
    expected: Expected
    path: Path = field(default=Path())
    sop_instance_uid: str = ""
    study_instance_uid: str = ""
    patient_name: str = PATIENT_NAME


# -- encoding --------------------------------------------------------------------------------


def encode_dataset(ds: Dataset, ts: str = ExplicitVRLittleEndian) -> bytes:
    """The data set encoded in ``ts`` as it travels in a C-STORE (no preamble, no file meta).

    Deflated data sets are deflated (raw deflate, PS3.5 A.5); big endian OW pixel data must
    already be in big endian byte order.
    """
    ts = UID(ts)
    buf = pydicom.filebase.DicomBytesIO()
    buf.is_little_endian = ts != ExplicitVRBigEndian
    buf.is_implicit_VR = ts == ImplicitVRLittleEndian
    body = copy.copy(ds)
    body.file_meta = FileMetaDataset()
    write_dataset(buf, body)
    data = buf.getvalue()
    if ts == DeflatedExplicitVRLittleEndian:
        c = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
        data = c.compress(data) + c.flush()
    return data


def part10(body: bytes, sop_class: str, sop_instance: str, ts: str) -> bytes:
    """A Part 10 file: preamble, ``DICM``, file meta naming ``sop_class``/``sop_instance``/``ts``,
    then ``body`` unchanged (so the C-STORE request says what the file meta says)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_instance
    meta.TransferSyntaxUID = ts
    meta.ImplementationClassUID = "1.2.826.0.1.3680043.8.498.1"
    buf = io.BytesIO()
    buf.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(buf, meta)
    return buf.getvalue() + body


# -- source data sets ------------------------------------------------------------------------


def chest(name: str = "chest_cr_mono2.dcm", patient: str = PATIENT_NAME) -> Dataset:
    """A sample chest radiograph with fresh UIDs in its own study."""
    ds = pydicom.dcmread(sample_path(name))
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.PatientName = patient
    ds.PatientID = PATIENT_ID
    return ds


def pydicom_file(name: str) -> Dataset:
    """A pydicom test file with fresh UIDs and our test patient."""
    path = get_testdata_file(name)
    if path is None:  # pragma: no cover - pydicom ships these files
        raise FileNotFoundError(f"pydicom test file {name} is missing")
    ds = pydicom.dcmread(path)
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.SOPInstanceUID = generate_uid()
    ds.PatientName = PATIENT_NAME
    ds.PatientID = PATIENT_ID
    return ds


def plain(ds: Dataset, sop_class: str, modality: str) -> Dataset:
    """A non-image object (SR, presentation state, ...) of ``sop_class`` in a fresh study."""
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = modality
    ds.PatientName = PATIENT_NAME
    ds.PatientID = PATIENT_ID
    return ds


def _frame(ds: Dataset) -> bytes:
    return next(generate_frames(ds.PixelData, number_of_frames=1))


def _with_frame(ds: Dataset, frame: bytes) -> Dataset:
    ds.PixelData = encapsulate([frame])
    ds["PixelData"].is_undefined_length = True
    return ds


def set_raw(ds: Dataset, tag: int, vr: str, value: bytes) -> None:
    """Put an element with exactly these value bytes into ``ds`` (written unchecked)."""
    from pydicom.dataelem import RawDataElement

    if len(value) % 2:
        value += b" "
    ds[tag] = RawDataElement(pydicom.tag.Tag(tag), vr, len(value), value, 0, False, True)


def _small_native(rows: int, cols: int) -> Dataset:
    ds = chest()
    arr = ds.pixel_array[:rows, :cols].copy()
    ds.Rows, ds.Columns = arr.shape
    ds.PixelData = arr.tobytes()
    return ds


# -- the cases -------------------------------------------------------------------------------
#
# A builder returns (body, sop_class, sop_instance, transfer syntax, study) or a Dataset plus a
# transfer syntax; build_corpus writes the file.

Built = tuple[bytes, str, str, str, str]
Builder = Callable[[], "Built | tuple[Dataset, str]"]
_BUILDERS: dict[str, tuple[str, Expected, Builder, str]] = {}


def case(name: str, what: str, expected: Expected, patient: str = PATIENT_NAME):
    def register(fn: Builder) -> Builder:
        if name in _BUILDERS:
            raise ValueError(f"duplicate case {name}")
        _BUILDERS[name] = (what, expected, fn, patient)
        return fn

    return register


def _cr_uids() -> tuple[str, str, str]:
    return "1.2.840.10008.5.1.4.1.1.1", generate_uid(), generate_uid()


# refused by the listener -------------------------------------------------------------------


@case("garbage_bytes", "4 KiB of random bytes as the data set", refused(CANNOT_UNDERSTAND))
def _garbage() -> Built:
    cls, sop, study = _cr_uids()
    body = np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    return body, cls, sop, ExplicitVRLittleEndian, study


@case("zero_bytes", "a run of zero bytes as the data set", refused(CANNOT_UNDERSTAND))
def _zeros() -> Built:
    cls, sop, study = _cr_uids()
    return bytes(2048), cls, sop, ExplicitVRLittleEndian, study


@case("cut_inside_first_tag", "the data set stops 6 bytes in", refused(CANNOT_UNDERSTAND))
def _cut6() -> Built:
    ds = chest()
    body = encode_dataset(ds)[:6]
    return body, ds.SOPClassUID, ds.SOPInstanceUID, ExplicitVRLittleEndian, ds.StudyInstanceUID


@case(
    "cut_before_sop_instance_uid",
    "the data set stops right before (0008,0018) SOP Instance UID",
    refused(CANNOT_UNDERSTAND),
)
def _cut_uid() -> Built:
    ds = chest()
    head = Dataset()
    for elem in ds:
        if elem.tag >= 0x00080018:
            break
        head.add(elem)
    body = encode_dataset(head)
    return body, ds.SOPClassUID, ds.SOPInstanceUID, ExplicitVRLittleEndian, ds.StudyInstanceUID


@case(
    "overlong_sequence_item",
    "a sequence item claims 1000 bytes but 2 follow",
    refused(CANNOT_UNDERSTAND),
)
def _bad_sq() -> Built:
    cls, sop, study = _cr_uids()
    body = (
        b"\x08\x00\x40\x11SQ\x00\x00\xff\xff\xff\xff"
        + b"\xfe\xff\x00\xe0"
        + (1000).to_bytes(4, "little")
        + b"xx"
    )
    return body, cls, sop, ExplicitVRLittleEndian, study


@case(
    "element_length_beyond_end",
    "Patient Name claims 0xFFFFFFF0 bytes, swallowing the rest of the data set (cut short)",
    refused(CANNOT_UNDERSTAND),
)
def _huge_len() -> Built:
    ds = chest()
    body = bytearray(encode_dataset(ds))
    tag = b"\x10\x00\x10\x00PN"  # (0010,0010) PN, 2-byte length follows in explicit VR
    i = body.index(tag)
    # rewrite it as an UN element (4-byte length) claiming almost 4 GiB
    body[i : i + 8] = b"\x10\x00\x10\x00UN\x00\x00" + (0xFFFFFFF0).to_bytes(4, "little")
    return (
        bytes(body),
        ds.SOPClassUID,
        ds.SOPInstanceUID,
        ExplicitVRLittleEndian,
        ds.StudyInstanceUID,
    )


@case("no_sop_instance_uid", "the data set has no SOP Instance UID", refused(CANNOT_UNDERSTAND))
def _no_sop() -> Built:
    ds = chest()
    sop = ds.SOPInstanceUID
    del ds.SOPInstanceUID
    return encode_dataset(ds), ds.SOPClassUID, sop, ExplicitVRLittleEndian, ds.StudyInstanceUID


@case("no_sop_class_uid", "the data set has no SOP Class UID", refused(CANNOT_UNDERSTAND))
def _no_class() -> Built:
    ds = chest()
    cls = ds.SOPClassUID
    del ds.SOPClassUID
    return encode_dataset(ds), cls, ds.SOPInstanceUID, ExplicitVRLittleEndian, ds.StudyInstanceUID


@case(
    "sop_instance_mismatch",
    "the C-STORE request names another SOP Instance UID than the data set",
    refused(MISMATCH),
)
def _mismatch_sop() -> Built:
    ds = chest()
    return (
        encode_dataset(ds),
        ds.SOPClassUID,
        generate_uid(),
        ExplicitVRLittleEndian,
        ds.StudyInstanceUID,
    )


@case(
    "sop_class_mismatch",
    "the request says CR Image Storage, the data set is a CT image",
    refused(MISMATCH),
)
def _mismatch_class() -> Built:
    ds = pydicom_file("CT_small.dcm")
    body = encode_dataset(ds)
    return (
        body,
        "1.2.840.10008.5.1.4.1.1.1",
        ds.SOPInstanceUID,
        ExplicitVRLittleEndian,
        ds.StudyInstanceUID,
    )


@case(
    "part10_file_as_data_set",
    "a whole Part 10 file (preamble, DICM, file meta) sent as the data set",
    refused(CANNOT_UNDERSTAND),
)
def _file_as_ds() -> Built:
    ds = chest()
    inner = part10(encode_dataset(ds), ds.SOPClassUID, ds.SOPInstanceUID, ExplicitVRLittleEndian)
    return inner, ds.SOPClassUID, ds.SOPInstanceUID, ExplicitVRLittleEndian, ds.StudyInstanceUID


@case(
    "cr_header_without_pixel_data",
    "a CR data set that ends before its Pixel Data (complete header, no image)",
    refused(CANNOT_UNDERSTAND),
)
def _no_pixels() -> tuple[Dataset, str]:
    ds = chest()
    del ds.PixelData
    return ds, ExplicitVRLittleEndian


@case(
    "cut_inside_pixel_data",
    "a native CR data set cut in the middle of its Pixel Data value",
    refused(CANNOT_UNDERSTAND),
)
def _cut_px() -> Built:
    ds = chest()
    body = encode_dataset(ds)
    body = body[: len(body) - len(ds.PixelData) // 2]
    return body, ds.SOPClassUID, ds.SOPInstanceUID, ExplicitVRLittleEndian, ds.StudyInstanceUID


@case(
    "cut_inside_encapsulated_fragment",
    "a JPEG 2000 CR data set cut in the middle of its only fragment (no delimiters)",
    refused(CANNOT_UNDERSTAND),
)
def _cut_frag() -> Built:
    ds = chest("chest_cr_j2k.dcm")
    ts = ds.file_meta.TransferSyntaxUID
    body = encode_dataset(ds, ts)
    body = body[: len(body) - len(_frame(ds)) // 2]
    return body, ds.SOPClassUID, ds.SOPInstanceUID, ts, ds.StudyInstanceUID


@case(
    "part10_without_preamble_as_data_set",
    "file meta group (0002,xxxx) then the data set, sent as the data set (no preamble)",
    ANALYSED,
)
def _meta_in_ds() -> Built:
    ds = chest()
    whole = part10(encode_dataset(ds), ds.SOPClassUID, ds.SOPInstanceUID, ExplicitVRLittleEndian)
    return (
        whole[132:],
        ds.SOPClassUID,
        ds.SOPInstanceUID,
        ExplicitVRLittleEndian,
        ds.StudyInstanceUID,
    )


@case(
    "big_endian_bytes_labelled_little_endian",
    "an explicit VR big endian data set sent on an explicit VR little endian context",
    refused(CANNOT_UNDERSTAND),
)
def _be_as_le() -> Built:
    ds = _big_endian(chest())
    body = encode_dataset(ds, ExplicitVRBigEndian)
    return body, ds.SOPClassUID, ds.SOPInstanceUID, ExplicitVRLittleEndian, ds.StudyInstanceUID


@case(
    "little_endian_bytes_labelled_big_endian",
    "an explicit VR little endian data set sent on an explicit VR big endian context",
    refused(CANNOT_UNDERSTAND),
)
def _le_as_be() -> Built:
    ds = chest()
    body = encode_dataset(ds)
    return body, ds.SOPClassUID, ds.SOPInstanceUID, ExplicitVRBigEndian, ds.StudyInstanceUID


@case(
    "unknown_transfer_syntax",
    "a private transfer syntax UID the listener does not offer",
    NO_CONTEXT,
)
def _unknown_ts() -> Built:
    ds = chest()
    body = encode_dataset(ds)
    return body, ds.SOPClassUID, ds.SOPInstanceUID, PRIVATE_TS, ds.StudyInstanceUID


# acknowledged and skipped by triage -----------------------------------------------------------


@case("ct_image", "a CT slice of the study (pydicom CT_small)", skipped("wrong_modality"))
def _ct() -> tuple[Dataset, str]:
    return pydicom_file("CT_small.dcm"), ExplicitVRLittleEndian


@case("mr_image", "an MR image (pydicom MR_small)", skipped("wrong_modality"))
def _mr() -> tuple[Dataset, str]:
    return pydicom_file("MR_small.dcm"), ExplicitVRLittleEndian


@case(
    "mr_image_big_endian",
    "an MR image in explicit VR big endian (pydicom MR_small_bigendian): parsed, then skipped",
    skipped("wrong_modality"),
)
def _mr_be() -> tuple[Dataset, str]:
    return pydicom_file("MR_small_bigendian.dcm"), ExplicitVRBigEndian


@case(
    "multi_frame_enhanced_mr",
    "an Enhanced MR with 10 frames (pydicom emri_small)",
    skipped("wrong_modality"),
)
def _emri() -> tuple[Dataset, str]:
    return pydicom_file("emri_small.dcm"), ExplicitVRLittleEndian


@case(
    "comprehensive_sr", "another vendor's Comprehensive SR (pydicom test-SR)", skipped("not_image")
)
def _sr() -> tuple[Dataset, str]:
    return pydicom_file("test-SR.dcm"), ExplicitVRLittleEndian


@case("basic_text_sr", "a Basic Text SR report", skipped("not_image"))
def _basic_sr() -> tuple[Dataset, str]:
    ds = plain(Dataset(), "1.2.840.10008.5.1.4.1.1.88.11", "SR")
    ds.ValueType = "CONTAINER"
    return ds, ExplicitVRLittleEndian


@case(
    "presentation_state",
    "a Grayscale Softcopy Presentation State of the radiograph",
    skipped("not_image"),
)
def _gsps() -> tuple[Dataset, str]:
    ds = plain(Dataset(), "1.2.840.10008.5.1.4.1.1.11.1", "PR")
    ds.ContentLabel = "PS"
    ds.PresentationLUTShape = "IDENTITY"
    return ds, ExplicitVRLittleEndian


@case("key_object_selection", "a Key Object Selection Document", skipped("not_image"))
def _ko() -> tuple[Dataset, str]:
    return plain(Dataset(), "1.2.840.10008.5.1.4.1.1.88.59", "KO"), ExplicitVRLittleEndian


@case("encapsulated_pdf", "an Encapsulated PDF report", skipped("not_image"))
def _pdf() -> tuple[Dataset, str]:
    ds = plain(Dataset(), "1.2.840.10008.5.1.4.1.1.104.1", "DOC")
    ds.MIMETypeOfEncapsulatedDocument = "application/pdf"
    ds.EncapsulatedDocument = b"%PDF-1.4\n%%EOF\n"
    return ds, ExplicitVRLittleEndian


@case("lateral_cr", "a chest CR with View Position LL", skipped("lateral_view"))
def _lat() -> tuple[Dataset, str]:
    ds = chest()
    ds.ViewPosition = "LL"
    return ds, ExplicitVRLittleEndian


@case("lateral_dx", "a chest DX with View Position LATERAL", skipped("lateral_view"))
def _lat_dx() -> tuple[Dataset, str]:
    ds = chest("chest_dx_presentation.dcm")
    ds.ViewPosition = "LATERAL"
    return ds, ExplicitVRLittleEndian


@case("colour_secondary_capture", "an RGB Secondary Capture (pydicom SC_rgb)", skipped("colour"))
def _rgb() -> tuple[Dataset, str]:
    return pydicom_file("SC_rgb.dcm"), ExplicitVRLittleEndian


@case(
    "colour_dx_ybr",
    "a DX whose Photometric Interpretation is YBR_FULL",
    skipped("colour"),
)
def _ybr() -> tuple[Dataset, str]:
    ds = chest("chest_dx_presentation.dcm")
    ds.PhotometricInterpretation = "YBR_FULL"
    return ds, ExplicitVRLittleEndian


@case("multi_frame_dx", "a DX with Number of Frames 2", skipped("multi_frame"))
def _mf() -> tuple[Dataset, str]:
    ds = chest("chest_dx_presentation.dcm")
    ds.NumberOfFrames = 2
    ds.PixelData = ds.PixelData * 2
    return ds, ExplicitVRLittleEndian


@case("not_chest", "a CR of the hand (Body Part Examined HAND)", skipped("not_chest"))
def _hand() -> tuple[Dataset, str]:
    ds = chest()
    ds.BodyPartExamined = "HAND"
    return ds, ExplicitVRLittleEndian


@case(
    "own_result_forwarded_back",
    "a Secondary Capture made by dicom-covid, forwarded back by the PACS",
    skipped("own_result"),
)
def _own() -> tuple[Dataset, str]:
    ds = chest()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.Modality = "OT"
    ds.Manufacturer = "dicom-covid developers"
    return ds, ExplicitVRLittleEndian


@case(
    "secondary_capture_us",
    "a grayscale Secondary Capture with Modality US",
    skipped("wrong_modality"),
)
def _sc_us() -> tuple[Dataset, str]:
    ds = chest()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.Modality = "US"
    return ds, ExplicitVRLittleEndian


@case(
    "number_of_frames_not_a_number",
    "Number of Frames is the text 'x'",
    skipped("unreadable_header"),
)
def _nof() -> tuple[Dataset, str]:
    ds = chest()
    set_raw(ds, 0x00280008, "IS", b"x")  # not a number, as a broken modality writes it
    return ds, ExplicitVRLittleEndian


# acknowledged, then failed by the worker with a reader reason ------------------------------------


@case("pixel_data_short", "Pixel Data holds 1000 bytes of 1.3 MB", failed("decode_failed"))
def _short() -> tuple[Dataset, str]:
    ds = chest()
    ds.PixelData = ds.PixelData[:1000]
    return ds, ExplicitVRLittleEndian


@case("pixel_data_empty", "Pixel Data is present but empty", failed("decode_failed"))
def _empty_px() -> tuple[Dataset, str]:
    ds = chest()
    ds.PixelData = b""
    return ds, ExplicitVRLittleEndian


@case("bits_stored_above_allocated", "BitsStored 20 with BitsAllocated 16", failed("bad_header"))
def _bits_gt() -> tuple[Dataset, str]:
    ds = chest()
    ds.BitsStored, ds.HighBit = 20, 19
    return ds, ExplicitVRLittleEndian


@case("bits_allocated_12", "BitsAllocated 12 (not 8, 16 or 32)", failed("bad_header"))
def _bits12() -> tuple[Dataset, str]:
    ds = chest()
    ds.BitsAllocated = 12
    return ds, ExplicitVRLittleEndian


@case("bits_stored_zero", "BitsStored 0", failed("bad_header"))
def _bits0() -> tuple[Dataset, str]:
    ds = chest()
    ds.BitsStored = 0
    return ds, ExplicitVRLittleEndian


@case(
    "bits_allocated_8_for_16_bit_data",
    "BitsAllocated 8, BitsStored 8 while Pixel Data holds 16-bit samples (decodes as 2 frames)",
    failed("bad_dimensions"),
)
def _bits8() -> tuple[Dataset, str]:
    ds = chest()
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    return ds, ExplicitVRLittleEndian


@case("missing_rows", "no Rows", failed("bad_dimensions"))
def _no_rows() -> tuple[Dataset, str]:
    ds = chest()
    del ds.Rows
    return ds, ExplicitVRLittleEndian


@case("missing_columns", "no Columns", failed("bad_dimensions"))
def _no_cols() -> tuple[Dataset, str]:
    ds = chest()
    del ds.Columns
    return ds, ExplicitVRLittleEndian


@case("rows_zero", "Rows 0", failed("bad_dimensions"))
def _rows0() -> tuple[Dataset, str]:
    ds = chest()
    ds.Rows = 0
    return ds, ExplicitVRLittleEndian


@case(
    "huge_dimensions",
    "Rows and Columns 65535 (8 GiB of pixels claimed, 1.3 MB sent): refused from the header",
    refused(TOO_LARGE),
)
def _huge() -> tuple[Dataset, str]:
    ds = chest()
    ds.Rows = ds.Columns = 65535
    return ds, ExplicitVRLittleEndian


def rle_bomb(side: int = 16384) -> Dataset:
    """A chest CR whose RLE Pixel Data decodes to ``side`` x ``side`` 16-bit pixels.

    Each of the two byte planes is one long replicate run (0x81: repeat the next byte 128
    times), so 16384 x 16384 (512 MiB decoded) takes about 8 MB.
    """
    ds = chest()
    n = side * side
    assert n % 128 == 0
    plane = b"\x81\x00" * (n // 128)  # value 0 in the high and in the low byte plane
    header = struct.pack("<16L", 2, 64, 64 + len(plane), *([0] * 13))
    ds.Rows = ds.Columns = side
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
    ds.PixelRepresentation = 0
    for keyword in ("WindowCenter", "WindowWidth"):
        if keyword in ds:
            delattr(ds, keyword)
    ds.file_meta.TransferSyntaxUID = RLELossless
    return _with_frame(ds, header + plane + plane)


@case(
    "rle_decompression_bomb",
    "an 8 MB RLE CR declaring 16384 x 16384 pixels (512 MiB decoded): refused from the header",
    refused(TOO_LARGE),
)
def _bomb() -> tuple[Dataset, str]:
    return rle_bomb(), RLELossless


@case("tiny_dimensions", "a consistent 16x16 image", failed("bad_dimensions"))
def _tiny() -> tuple[Dataset, str]:
    return _small_native(16, 16), ExplicitVRLittleEndian


@case("extreme_aspect_ratio", "a consistent 832x100 image (8:1)", failed("bad_dimensions"))
def _aspect() -> tuple[Dataset, str]:
    return _small_native(832, 100), ExplicitVRLittleEndian


@case(
    "samples_per_pixel_3_labelled_monochrome",
    "MONOCHROME2 with Samples per Pixel 3",
    failed("colour"),
)
def _spp3() -> tuple[Dataset, str]:
    ds = chest()
    ds.SamplesPerPixel = 3
    return ds, ExplicitVRLittleEndian


@case("rescale_slope_nan", "Rescale Slope NaN", failed("decode_failed"))
def _nan() -> tuple[Dataset, str]:
    ds = chest()
    set_raw(ds, 0x00281053, "DS", b"NaN")
    ds.RescaleIntercept = "0"
    return ds, ExplicitVRLittleEndian


@case("j2k_codestream_cut", "JPEG 2000 codestream cut in half", failed("decode_failed"))
def _j2k_cut() -> tuple[Dataset, str]:
    ds = chest("chest_cr_j2k.dcm")
    frame = _frame(ds)
    return _with_frame(ds, frame[: len(frame) // 2]), ds.file_meta.TransferSyntaxUID


@case("jpegls_codestream_cut", "JPEG-LS codestream cut in half", failed("decode_failed"))
def _jls_cut() -> tuple[Dataset, str]:
    ds = chest("chest_cr_jpegls.dcm")
    frame = _frame(ds)
    return _with_frame(ds, frame[: len(frame) // 2]), ds.file_meta.TransferSyntaxUID


@case(
    "jpeg_lossless_codestream_cut", "JPEG lossless codestream cut in half", failed("decode_failed")
)
def _jpg_cut() -> tuple[Dataset, str]:
    ds = chest("chest_cr_jpeg_lossless.dcm")
    frame = _frame(ds)
    return _with_frame(ds, frame[: len(frame) // 2]), ds.file_meta.TransferSyntaxUID


@case("rle_segment_cut", "RLE frame cut in half", failed("decode_failed"))
def _rle_cut() -> tuple[Dataset, str]:
    ds = chest("chest_cr_rle.dcm")
    frame = _frame(ds)
    return _with_frame(ds, frame[: len(frame) // 2]), ds.file_meta.TransferSyntaxUID


@case(
    "native_pixels_labelled_jpeg2000",
    "uncompressed Pixel Data sent on a JPEG 2000 Lossless context",
    failed("decode_failed"),
)
def _native_as_j2k() -> tuple[Dataset, str]:
    return chest(), JPEG2000Lossless


@case(
    "jpegls_codestream_labelled_jpeg2000",
    "a JPEG-LS codestream sent on a JPEG 2000 Lossless context",
    failed("decode_failed"),
)
def _jls_as_j2k() -> tuple[Dataset, str]:
    return chest("chest_cr_jpegls.dcm"), JPEG2000Lossless


# acknowledged and analysed: awkward but valid ----------------------------------------------------


@case("implicit_vr_little_endian", "implicit VR little endian", ANALYSED)
def _implicit() -> tuple[Dataset, str]:
    return chest(), ImplicitVRLittleEndian


def _big_endian(ds: Dataset) -> Dataset:
    ds.PixelData = np.frombuffer(ds.PixelData, "<u2").byteswap().tobytes()
    ds["PixelData"].VR = "OW"
    return ds


@case("explicit_vr_big_endian", "explicit VR big endian (retired, still valid)", ANALYSED)
def _big() -> tuple[Dataset, str]:
    return _big_endian(chest()), ExplicitVRBigEndian


@case("deflated", "deflated explicit VR little endian", ANALYSED)
def _deflated() -> tuple[Dataset, str]:
    return chest(), DeflatedExplicitVRLittleEndian


@case(
    "implicit_bytes_labelled_explicit",
    "implicit VR bytes on an explicit VR context (pydicom detects and reads them)",
    ANALYSED,
)
def _impl_as_expl() -> Built:
    ds = chest()
    body = encode_dataset(ds, ImplicitVRLittleEndian)
    return body, ds.SOPClassUID, ds.SOPInstanceUID, ExplicitVRLittleEndian, ds.StudyInstanceUID


@case("jpeg2000_lossless", "JPEG 2000 Lossless sample, MONOCHROME1", ANALYSED)
def _j2k() -> tuple[Dataset, str]:
    ds = chest("chest_cr_j2k.dcm")
    return ds, ds.file_meta.TransferSyntaxUID


@case("rle_lossless", "RLE Lossless sample", ANALYSED)
def _rle() -> tuple[Dataset, str]:
    ds = chest("chest_cr_rle.dcm")
    return ds, ds.file_meta.TransferSyntaxUID


@case(
    "compressed_with_trailing_padding",
    "a JPEG-LS frame with 10 zero bytes after its end-of-image marker",
    ANALYSED,
)
def _trailing() -> tuple[Dataset, str]:
    ds = chest("chest_cr_jpegls.dcm")
    return _with_frame(ds, _frame(ds) + b"\x00" * 10), ds.file_meta.TransferSyntaxUID


@case(
    "compressed_with_trailing_garbage",
    "a JPEG-LS frame with 64 bytes after its end-of-image marker: the reader only looks for the "
    "marker in the last 16 bytes, so it takes the frame for a cut one",
    failed("decode_failed"),
)
def _trailing_long() -> tuple[Dataset, str]:
    ds = chest("chest_cr_jpegls.dcm")
    return _with_frame(ds, _frame(ds) + b"\x00" * 64), ds.file_meta.TransferSyntaxUID


@case("garbage_pixels_of_right_length", "random pixel values, consistent header", ANALYSED)
def _noise() -> tuple[Dataset, str]:
    ds = chest()
    rng = np.random.default_rng(2)
    ds.PixelData = rng.integers(0, 2**15, ds.Rows * ds.Columns, dtype="<u2").tobytes()
    return ds, ExplicitVRLittleEndian


@case("window_width_zero", "Window Width 0 (the reader falls back to percentiles)", ANALYSED)
def _ww0() -> tuple[Dataset, str]:
    ds = chest()
    ds.WindowWidth = 0
    return ds, ExplicitVRLittleEndian


@case(
    "large_private_element",
    "a 2 MiB private OB element next to the image",
    ANALYSED,
)
def _private() -> tuple[Dataset, str]:
    ds = chest()
    block = ds.private_block(0x0011, "BROKEN VENDOR", create=True)
    block.add_new(0x01, "OB", b"\x5a" * (2 * 2**20))
    return ds, ExplicitVRLittleEndian


for _charset, _name in CHARSET_NAMES.items():

    def _make(charset: str = _charset, name: str = _name) -> tuple[Dataset, str]:
        ds = chest(patient=name)
        ds.SpecificCharacterSet = charset
        return ds, ExplicitVRLittleEndian

    case(
        f"charset_{_charset.replace(' ', '_').lower()}",
        f"Specific Character Set {_charset}, patient name {_name!r}",
        ANALYSED,
        patient=_name,
    )(_make)


@case(
    "charset_unknown",
    "Specific Character Set 'ISO_IR 999' (unknown) with Latin-1 bytes in the name: read as "
    "ISO 8859-1, classified, and the SR says so in a note",
    ANALYSED,
    patient="Ñandú^Pérez",
)
def _unknown_charset() -> tuple[Dataset, str]:
    ds = chest()
    ds.SpecificCharacterSet = "ISO_IR 999"
    set_raw(ds, 0x00100010, "PN", "Ñandú^Pérez".encode("latin-1"))
    return ds, ExplicitVRLittleEndian


@case(
    "float_pixel_data",
    "a CR whose image is in Float Pixel Data (7FE0,0008) instead of Pixel Data",
    failed("float_pixel_data"),
)
def _float() -> tuple[Dataset, str]:
    ds = chest()
    ds.FloatPixelData = np.frombuffer(ds.PixelData, "<u2").astype("<f4").tobytes()
    del ds.PixelData, ds.BitsStored, ds.HighBit, ds.PixelRepresentation
    ds.BitsAllocated = 32
    return ds, ExplicitVRLittleEndian


def send_exact(
    path: Path, port: int, called: str = "DICOMCOVID", calling: str = "ORTHANC"
) -> int | None:
    """C-STORE one Part 10 file, byte for byte, over its own association.

    Only the file's own transfer syntax is proposed, so the bytes travel under exactly the label
    the case gives them.

    Returns
    -------
    int or None
        The C-STORE response status (-1 when no response came), or None when the listener did
        not accept the presentation context (transfer syntax not supported).
    """
    from pynetdicom import AE, _config
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    meta = pydicom.filereader.read_file_meta_info(path)
    sop_class, ts = meta.MediaStorageSOPClassUID, meta.TransferSyntaxUID
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
    ae.add_requested_context(Verification)  # so the association stands without the case's
    ae.add_requested_context(sop_class, [ts])
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    if not assoc.is_established:
        raise AssertionError(f"association to port {port} not accepted")
    saved = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        if not any(
            cx.abstract_syntax == sop_class and cx.transfer_syntax[0] == ts
            for cx in assoc.accepted_contexts
        ):
            return None
        status = assoc.send_c_store(path)
        return int(status.Status) if status else -1
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = saved
        if assoc.is_established:
            assoc.release()


#: Every case name, in definition order (the parametrize ids).
CASES: tuple[str, ...] = tuple(_BUILDERS)


def build_corpus(folder: Path) -> dict[str, Case]:
    """Write every case as a Part 10 file into ``folder``; return them by name."""
    folder.mkdir(parents=True, exist_ok=True)
    out: dict[str, Case] = {}
    for name, (what, expected, fn, patient) in _BUILDERS.items():
        made = fn()
        if isinstance(made[0], Dataset):
            ds, ts = made
            body = encode_dataset(ds, ts)
            built = (body, ds.SOPClassUID, ds.SOPInstanceUID, ts, ds.StudyInstanceUID)
        else:
            built = made
        body, sop_class, sop, ts, study = built
        path = folder / f"{name}.dcm"
        path.write_bytes(part10(body, str(sop_class), str(sop), str(ts)))
        out[name] = Case(name, what, expected, path, str(sop), str(study), patient)
    return out
