"""Seeds, mutations and properties shared by ``tests/test_fuzz.py`` and ``benchmarks/fuzz.py``.

Seeds are small (128 x 128) chest radiographs made from the project's sample in every encoding
the listener accepts (explicit and implicit VR little endian, big endian, deflated, RLE,
JPEG-LS, JPEG 2000) plus the JPEG lossless sample as shipped. A mutation is a list of operations
on a seed: header field changes (Rows, BitsAllocated, Photometric Interpretation, ...: written as
raw bytes, so values pydicom would refuse to write get through), then byte flips, truncations,
insertions, deletions and overwrites of the encoded file.

Two properties:

:func:`check_reader`
    ``read_image(bytes)`` returns a finite float32 image in [0, 1] or raises
    :class:`~dicom_covid.errors.InputRejected` with a known reason; nothing else escapes.
:func:`check_receive`
    the listener's C-STORE handler, given the bytes as the data set of a C-STORE (a real
    pynetdicom ``Event``, no network), answers 0x0000, 0xA900 or 0xC210 (never 0xC211, an
    unexpected error); an acknowledged candidate is spooled, becomes a job, and the worker's
    reading of the spooled file raises nothing but ``InputRejected``.
"""

from __future__ import annotations

import copy
import io
import struct
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import pydicom
from badinputs import encode_dataset, part10, set_raw
from pacs_helpers import sample_path
from pydicom.dataset import Dataset
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

from dicom_covid.errors import InputRejected

__all__ = [
    "HEADER_FIELDS",
    "READER_REASONS",
    "RECEIVE_STATUSES",
    "TRIAGE_REASONS",
    "Mutated",
    "Mutation",
    "ReceivePath",
    "apply",
    "check_reader",
    "check_receive",
    "seeds",
]

#: Every reason code :func:`dicom_covid.reader.read_image` documents.
READER_REASONS = frozenset(
    {
        "not_found",
        "unreadable",
        "not_dicom",
        "corrupt",
        "no_pixel_data",
        "wrong_modality",
        "wrong_body_part",
        "colour",
        "multi_frame",
        "bad_dimensions",
        "bad_header",
        "lateral_view",
        "decode_failed",
        "too_large",
        "float_pixel_data",
        "no_file_meta",
    }
)
#: Skip reasons the listener records.
TRIAGE_REASONS = frozenset(
    {
        "own_result",
        "not_image",
        "wrong_modality",
        "lateral_view",
        "not_chest",
        "colour",
        "multi_frame",
        "unreadable_header",
        "no_study_uid",
    }
)
#: C-STORE statuses the listener may answer to a data set (0xA700 needs a full disk; 0xA701:
#: a mutated Rows/Columns/Number of Frames declares a too large image).
RECEIVE_STATUSES = frozenset({0x0000, 0xA900, 0xA701, 0xC210})

#: (tag, VR, candidate raw values) of header fields the mutations change.
_US = [0, 1, 2, 3, 7, 8, 12, 15, 16, 17, 31, 32, 33, 64, 127, 128, 4095, 32768, 65535]
HEADER_FIELDS: list[tuple[int, str, list[bytes]]] = [
    (0x00280010, "US", [struct.pack("<H", v) for v in _US] + [b"\x01", b""]),  # Rows
    (0x00280011, "US", [struct.pack("<H", v) for v in _US] + [b"\x01\x02\x03"]),  # Columns
    (0x00280100, "US", [struct.pack("<H", v) for v in _US]),  # BitsAllocated
    (0x00280101, "US", [struct.pack("<H", v) for v in _US]),  # BitsStored
    (0x00280102, "US", [struct.pack("<H", v) for v in _US]),  # HighBit
    (0x00280103, "US", [struct.pack("<H", v) for v in (0, 1, 2, 65535)]),  # PixelRepresentation
    (0x00280002, "US", [struct.pack("<H", v) for v in (0, 1, 2, 3, 4, 65535)]),  # SamplesPerPixel
    (
        0x00280004,
        "CS",
        [b"MONOCHROME1", b"MONOCHROME2", b"RGB", b"PALETTE COLOR", b"YBR_FULL", b"", b"\xff\xfe"],
    ),  # PhotometricInterpretation
    (0x00280008, "IS", [b"0", b"1", b"2", b"-1", b"x", b"99999999", b""]),  # NumberOfFrames
    (0x00281050, "DS", [b"0", b"-1e308", b"1e308", b"nan", b"inf", b"x", b"1\\2"]),  # Center
    (0x00281051, "DS", [b"0", b"-5", b"1e-300", b"nan", b"inf", b"x", b""]),  # WindowWidth
    (0x00281052, "DS", [b"0", b"1e308", b"nan", b"x"]),  # RescaleIntercept
    (0x00281053, "DS", [b"0", b"-1", b"1e308", b"nan", b"inf", b"x"]),  # RescaleSlope
    (0x00281056, "CS", [b"SIGMOID", b"LINEAR_EXACT", b"BOGUS"]),  # VOILUTFunction
    (0x00080060, "CS", [b"CR", b"DX", b"CT", b"", b"OT", b"\x00\x00"]),  # Modality
    (0x00185101, "CS", [b"PA", b"LL", b"LATERAL", b""]),  # ViewPosition
    (0x00180015, "CS", [b"CHEST", b"HAND", b""]),  # BodyPartExamined
    (0x00080005, "CS", [b"ISO_IR 192", b"ISO_IR 999", b"GB18030", b"\\\\"]),  # SpecificCharSet
    (0x00100010, "PN", ["Ñandú^Pérez".encode("latin-1"), "山田".encode(), b"\xff" * 7]),
    (0x00280030, "DS", [b"0\\0", b"-1\\1", b"x", b"1"]),  # PixelSpacing
    (0x7FE00010, "OW", [b"", b"\x00" * 7, b"\x00" * 100]),  # PixelData replaced
]
_SPECIAL = {0x7FE00010: "delete"}


@dataclass(frozen=True)
class Mutation:
    """One way of breaking a seed (hypothesis draws these)."""

    seed: str
    header: tuple[tuple[int, int | None], ...] = ()  # (field index, value index or None=delete)
    ops: tuple[tuple[str, int, int, bytes], ...] = ()  # (op, position, length, bytes)


def _small(ds: Dataset) -> Dataset:
    arr = ds.pixel_array[::6, ::6][:128, :128]
    ds.Rows, ds.Columns = arr.shape
    ds.PixelData = np.ascontiguousarray(arr).tobytes()
    return ds


@lru_cache(maxsize=1)
def _seed_datasets() -> dict[str, tuple[Dataset, str]]:
    mono2 = _small(pydicom.dcmread(sample_path("chest_cr_mono2.dcm")))
    mono1 = _small(pydicom.dcmread(sample_path("chest_cr_mono1.dcm")))
    out: dict[str, tuple[Dataset, str]] = {
        "explicit_le": (mono2, ExplicitVRLittleEndian),
        "explicit_le_mono1": (mono1, ExplicitVRLittleEndian),
        "implicit_le": (mono2, ImplicitVRLittleEndian),
        "deflated": (mono2, DeflatedExplicitVRLittleEndian),
    }
    be = copy.deepcopy(mono2)  # (pydicom.Dataset(ds) would share the elements)
    be.PixelData = np.frombuffer(mono2.PixelData, "<u2").byteswap().tobytes()
    be["PixelData"].VR = "OW"
    out["big_endian"] = (be, ExplicitVRBigEndian)
    for name, ts in (("rle", RLELossless), ("jpegls", JPEGLSLossless), ("j2k", JPEG2000Lossless)):
        ds = copy.deepcopy(mono1)
        try:
            ds.compress(ts)
        except Exception:  # encoder plugin missing: that encoding is left out
            continue
        out[name] = (ds, ts)
    jpeg = pydicom.dcmread(sample_path("chest_cr_jpeg_lossless.dcm"))
    out["jpeg_lossless_832"] = (jpeg, jpeg.file_meta.TransferSyntaxUID)
    return out


def seeds() -> list[str]:
    """Names of the seeds."""
    return sorted(_seed_datasets())


@dataclass(frozen=True)
class Mutated:
    """A mutated instance: the Part 10 file, and the C-STORE it stands for."""

    data: bytes  # the whole Part 10 file (what read_image gets)
    body: bytes  # the data set after the file meta (what a C-STORE carries)
    sop_class: str
    sop_instance: str
    transfer_syntax: str


def apply(m: Mutation) -> Mutated:
    """Build the mutated instance.

    Each call gives the data set a fresh SOP Instance UID (so receive-path examples are never
    duplicates of each other) before the header changes and byte operations.
    """
    base, ts = _seed_datasets()[m.seed]
    ds = copy.deepcopy(base)
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    big = ts == ExplicitVRBigEndian
    for field_index, value_index in m.header:
        tag, vr, values = HEADER_FIELDS[field_index % len(HEADER_FIELDS)]
        if value_index is None:
            if tag in ds:
                del ds[tag]
            continue
        value = values[value_index % len(values)]
        if big and vr == "US" and len(value) == 2:
            value = value[::-1]
        set_raw(ds, tag, vr, value)
    body = bytearray(encode_dataset(ds, ts))
    for op, pos, n, data in m.ops:
        size = len(body)
        if size == 0:
            break
        pos %= size
        if op == "flip":
            body[pos] ^= data[0] if data and data[0] else 0xFF
        elif op == "truncate":
            del body[pos:]
        elif op == "insert":
            body[pos:pos] = data
        elif op == "delete":
            del body[pos : pos + n]
        elif op == "overwrite":
            body[pos : pos + len(data)] = data
    sop_class, sop = str(ds.SOPClassUID), str(ds.SOPInstanceUID)
    body_bytes = bytes(body)
    return Mutated(part10(body_bytes, sop_class, sop, str(ts)), body_bytes, sop_class, sop, str(ts))


def check_reader(data: bytes) -> str:
    """Property 1; return ``"ok"`` or the rejection reason."""
    from dicom_covid.reader import read_image

    try:
        image = read_image(data)
    except InputRejected as exc:
        assert exc.reason in READER_REASONS, f"undocumented reason {exc.reason!r}: {exc}"
        assert exc.message
        return exc.reason
    px = image.pixels
    assert px.dtype == np.float32 and px.ndim == 2
    assert np.all(np.isfinite(px)) and px.min() >= 0.0 and px.max() <= 1.0
    return "ok"


class ReceivePath:
    """A StorageSCP with its job store and spool, driven without the network.

    The handler gets real pynetdicom ``Event`` objects carrying a real ``C_STORE`` primitive and
    presentation context, exactly what the network layer would hand it.
    """

    def __init__(self, root: Path) -> None:
        from pacs_listener.config import ScpConfig
        from pacs_listener.jobs import JobStore
        from pacs_listener.scp import StorageSCP, _AssocStats
        from pacs_listener.spool import Spool

        self.store = JobStore(root / "jobs.sqlite")
        self.spool = Spool(root / "spool")
        self.scp = StorageSCP(ScpConfig(port=0, min_free_bytes=0), self.store, self.spool)
        # the handler looks up per-association statistics by event.assoc (None here)
        self.scp._assocs[None] = _AssocStats(1, "FUZZER", "127.0.0.1", 0)

    def c_store(self, m: Mutated) -> int:
        """Hand ``m`` to the C-STORE handler as the network layer would; return the status."""
        from pynetdicom import evt
        from pynetdicom.dimse_primitives import C_STORE
        from pynetdicom.events import Event
        from pynetdicom.presentation import PresentationContextTuple

        req = C_STORE()
        req.MessageID = 1
        req.AffectedSOPClassUID = m.sop_class
        req.AffectedSOPInstanceUID = m.sop_instance
        req.Priority = 2
        req.DataSet = io.BytesIO(m.body)
        cx = PresentationContextTuple(1, m.sop_class, m.transfer_syntax)
        event = Event(None, evt.EVT_C_STORE, {"request": req, "context": cx})  # type: ignore[arg-type]
        return int(self.scp._on_store(event))

    def close(self) -> None:
        self.store.close()


def check_receive(path: ReceivePath, m: Mutated) -> str:
    """Property 2; return what happened (``"refused 0xC210"``, ``"skipped reason"``, ...)."""
    from dicom_covid.reader import read_dataset

    sop = m.sop_instance
    status = path.c_store(m)
    assert status in RECEIVE_STATUSES, f"status 0x{status:04X}"
    inst = path.store.instance(sop)
    if status != 0:
        assert inst is None
        return f"refused 0x{status:04X}"
    assert inst is not None
    if inst.state == "skipped":
        assert inst.reason in TRIAGE_REASONS, inst.reason
        assert inst.path is None
        return f"skipped {inst.reason}"
    assert inst.state == "received" and inst.path is not None and inst.path.is_file()
    jobs = path.store.group_stable_studies(0.0)
    assert any(j.study_instance_uid == inst.study_instance_uid for j in jobs)
    try:  # what the worker does with the spooled file before the model
        read_dataset(pydicom.dcmread(inst.path), source=sop)
    except InputRejected as exc:
        assert exc.reason in READER_REASONS, exc.reason
        outcome = f"worker rejects: {exc.reason}"
    else:
        outcome = "analysable"
    path.spool.remove(inst.path)
    return outcome
