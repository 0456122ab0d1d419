"""Helpers of the PACS service tests: data sets to send, a real SCU and a real destination SCP.

Everything talks DICOM over loopback with pynetdicom; nothing here mocks a peer.
"""

from __future__ import annotations

import copy
import logging
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "sample_dicoms"

#: Distinctive identifiers: the log tests assert they never appear in any log.
PATIENT_NAME = "Zyxwvutsrq^Qwertyuiop"
PATIENT_ID = "PID-8675309-XQZ"


def free_port() -> int:
    """A TCP port free on loopback right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(
    predicate: Callable[[], object], timeout: float, interval: float = 0.1, what: str = "condition"
) -> object:
    """Poll ``predicate`` until it returns something truthy; fail the test after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def sample_path(name: str = "chest_cr_mono2.dcm") -> Path:
    """A sample chest DICOM (falls back to pydicom-data's RG1 CR)."""
    p = SAMPLES / name
    if p.is_file():
        return p
    from pydicom.data import get_testdata_file

    return Path(get_testdata_file("RG1_UNCR.dcm"))


def chest_cr(
    study_uid: str | None = None,
    name: str = "chest_cr_mono2.dcm",
    patient_name: str = PATIENT_NAME,
    patient_id: str = PATIENT_ID,
) -> Dataset:
    """A sample chest radiograph with fresh UIDs (a new study unless ``study_uid`` is given)."""
    ds = pydicom.dcmread(sample_path(name))
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    return ds


def _meta(ds: Dataset, ts: str = ExplicitVRLittleEndian) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ts
    ds.file_meta = meta
    return ds


def ct_slice(study_uid: str | None = None) -> Dataset:
    """A small CT image (not a candidate)."""
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "CT"
    ds.PatientName = PATIENT_NAME
    ds.PatientID = PATIENT_ID
    ds.Rows = ds.Columns = 8
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.PixelData = bytes(8 * 8 * 2)
    return _meta(ds)


def basic_sr(study_uid: str | None = None) -> Dataset:
    """A minimal Basic Text SR from somebody else (not an image)."""
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "SR"
    ds.PatientName = PATIENT_NAME
    ds.PatientID = PATIENT_ID
    ds.ValueType = "CONTAINER"
    return _meta(ds)


def lateral_cr(study_uid: str | None = None) -> Dataset:
    """A chest CR marked as a lateral view (skipped by triage)."""
    ds = chest_cr(study_uid)
    ds.ViewPosition = "LL"
    return ds


def broken_pixels(study_uid: str | None = None) -> Dataset:
    """A chest CR whose header is fine but whose pixel data is truncated (fails in the worker)."""
    ds = chest_cr(study_uid)
    ds.PixelData = ds.PixelData[:1000]
    return ds


def scu(ae_title: str = "ORTHANC", contexts: Iterable[tuple[str, list[str]]] = ()) -> AE:
    """An SCU asking for Verification and the given (SOP class, transfer syntaxes)."""
    ae = AE(ae_title=ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    ae.add_requested_context(Verification)
    for sop_class, syntaxes in contexts:
        ae.add_requested_context(sop_class, syntaxes)
    return ae


def send(
    datasets: list[Dataset | Path],
    port: int,
    called: str = "DICOMCOVID",
    calling: str = "ORTHANC",
    host: str = "127.0.0.1",
    tls_args=None,
) -> list[int]:
    """C-STORE the data sets (or files, sent unparsed) over one association; return statuses.

    Raises
    ------
    AssertionError
        When the association is not accepted.
    """
    wanted: dict[str, list[str]] = {}
    for item in datasets:
        if isinstance(item, Path):
            meta = pydicom.filereader.read_file_meta_info(item)
            sop_class, ts = str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID)
        else:
            sop_class, ts = str(item.SOPClassUID), str(item.file_meta.TransferSyntaxUID)
        syn = wanted.setdefault(sop_class, [])
        for t in (ts, ExplicitVRLittleEndian, ImplicitVRLittleEndian):
            if t not in syn:
                syn.append(t)
    ae = scu(calling, wanted.items())
    assoc = ae.associate(host, port, ae_title=called, tls_args=tls_args)
    assert assoc.is_established, f"association to {called}@{host}:{port} not accepted"
    from pynetdicom import _config

    saved = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True  # files go out byte for byte, never re-encoded
    try:
        out = []
        for item in datasets:
            status = assoc.send_c_store(item)
            out.append(int(status.Status) if status else -1)
        return out
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = saved
        assoc.release()


def echo(
    port: int, called: str = "DICOMCOVID", calling: str = "ORTHANC", tls_args=None
) -> tuple[bool, int | None, bool]:
    """C-ECHO; return (established, status or None, rejected)."""
    ae = scu(calling)
    assoc = ae.associate("127.0.0.1", port, ae_title=called, tls_args=tls_args)
    if not assoc.is_established:
        return False, None, assoc.is_rejected
    try:
        status = assoc.send_c_echo()
        return True, int(status.Status) if status else None, False
    finally:
        assoc.release()


class DestinationSCP:
    """A real pynetdicom storage SCP that keeps what it receives (a stand-in PACS).

    Parameters
    ----------
    port : int, optional
        Port to listen on (default: a free one).
    ae_title : str
        Its AE title.
    """

    def __init__(self, port: int | None = None, ae_title: str = "DEST") -> None:
        self.port = port or free_port()
        self.ae_title = ae_title
        self.received: list[Dataset] = []
        self.calling: list[str] = []
        self._lock = threading.Lock()
        self._server = None
        self.ae = AE(ae_title=ae_title)
        for cx in AllStoragePresentationContexts:
            self.ae.add_supported_context(
                cx.abstract_syntax, [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
            )
        self.ae.add_supported_context(Verification)

    def _on_store(self, event: evt.Event) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        with self._lock:
            self.received.append(copy.deepcopy(ds))
            self.calling.append(str(event.assoc.requestor.ae_title).strip())
        return 0x0000

    def start(self) -> DestinationSCP:
        self._server = self.ae.start_server(
            ("127.0.0.1", self.port), block=False, evt_handlers=[(evt.EVT_C_STORE, self._on_store)]
        )
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def __enter__(self) -> DestinationSCP:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def address(self) -> str:
        """``AE@127.0.0.1:port``."""
        return f"{self.ae_title}@127.0.0.1:{self.port}"

    def counts(self) -> Counter:
        """How many times each SOP Instance UID arrived."""
        with self._lock:
            return Counter(str(ds.SOPInstanceUID) for ds in self.received)

    def of_study(self, study_uid: str) -> list[Dataset]:
        """Received instances of one study."""
        with self._lock:
            return [ds for ds in self.received if ds.StudyInstanceUID == study_uid]


def model_bundle(tmp_root: Path) -> Path:
    """The project's bundle when its default model is trained, else a throw-away bundle."""
    from dicom_covid.bundle import Bundle

    bundle = Bundle()
    if bundle.default_model in bundle.available():
        return bundle.root
    from helpers import make_throwaway_bundle

    return make_throwaway_bundle(tmp_root / "bundle")


class LogRecorder(logging.Handler):
    """Keeps every formatted record (including exceptions) of every logger."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []
        self.setFormatter(logging.Formatter("%(processName)s %(name)s %(levelname)s %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))

    @property
    def text(self) -> str:
        return "\n".join(self.lines)
