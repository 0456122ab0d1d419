"""The listener: a real non-blocking SCP on loopback, real pynetdicom associations against it."""

from __future__ import annotations

import io
import logging
import shutil
import socket
import ssl
import stat
import struct
import subprocess
import sys
import time
from pathlib import Path

import pydicom
import pytest
from pacs_helpers import (
    PATIENT_ID,
    PATIENT_NAME,
    basic_sr,
    chest_cr,
    ct_slice,
    echo,
    free_port,
    lateral_cr,
    sample_path,
    scu,
    send,
)
from pydicom.dataset import FileMetaDataset
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from pacs_listener.config import (
    AllowedCaller,
    ConfigError,
    Destination,
    ScpConfig,
    SenderConfig,
    TlsConfig,
)
from pacs_listener.jobs import JobStore, ResultFile
from pacs_listener.scp import (
    STATUS_CANNOT_UNDERSTAND,
    STATUS_MISMATCH,
    STATUS_OUT_OF_RESOURCES,
    StorageSCP,
)
from pacs_listener.sender import send_files
from pacs_listener.spool import Spool

pytestmark = pytest.mark.timeout(120)


class Listener:
    """An SCP with its store and spool in a temporary folder."""

    def __init__(self, root: Path, **scp: object) -> None:
        cfg = dict(port=free_port(), allowed_callers=(AllowedCaller("ORTHANC"),), min_free_bytes=0)
        cfg.update(scp)
        self.store = JobStore(root / "jobs.sqlite")
        self.spool = Spool(root / "spool")
        self.scp = StorageSCP(ScpConfig(**cfg), self.store, self.spool)

    @property
    def port(self) -> int:
        return self.scp.address[1]

    def state(self, sop: str) -> tuple[str, str | None] | None:
        inst = self.store.instance(sop)
        return (inst.state, inst.reason) if inst else None

    def __enter__(self) -> Listener:
        self.scp.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.scp.stop()
        self.store.close()


@pytest.fixture
def listener(tmp_path: Path):
    with Listener(tmp_path) as lis:
        yield lis


def test_c_echo(listener: Listener) -> None:
    assert echo(listener.port) == (True, 0x0000, False)


def test_unknown_calling_ae_is_rejected(listener: Listener, caplog) -> None:
    caplog.set_level(logging.INFO)
    established, _, rejected = echo(listener.port, calling="INTRUDER")
    assert not established and rejected
    assert "'INTRUDER'" in caplog.text and "allow-list" in caplog.text
    assert echo(listener.port)[0]  # the listener still serves allowed callers


def test_host_check(tmp_path: Path) -> None:
    with Listener(tmp_path, allowed_callers=(AllowedCaller("ORTHANC", "10.11.12.13"),)) as lis:
        assert echo(lis.port)[2]  # right AE, wrong host: rejected
    with Listener(
        tmp_path / "b", allowed_callers=(AllowedCaller.parse("ORTHANC@127.0.0.1"),)
    ) as lis:
        assert echo(lis.port)[:2] == (True, 0)


def test_candidate_is_spooled_privately_and_queued(listener: Listener) -> None:
    ds = chest_cr()
    assert send([ds], listener.port) == [0]
    inst = listener.store.instance(ds.SOPInstanceUID)
    assert inst.state == "received" and inst.study_instance_uid == ds.StudyInstanceUID
    assert inst.path.is_file() and stat.S_IMODE(inst.path.stat().st_mode) == 0o600
    assert stat.S_IMODE(inst.path.parent.stat().st_mode) == 0o700
    back = pydicom.dcmread(inst.path)
    assert back.SOPInstanceUID == ds.SOPInstanceUID
    assert back.PixelData == ds.PixelData


@pytest.mark.parametrize(
    "name",
    [
        "chest_cr_j2k.dcm",
        "chest_cr_jpegls.dcm",
        "chest_cr_jpeg_lossless.dcm",
        "chest_cr_rle.dcm",
        "chest_dx_presentation.dcm",
    ],
)
def test_compressed_transfer_syntaxes_are_accepted(listener: Listener, name: str) -> None:
    path = sample_path(name)
    if path.name != name:
        pytest.skip(f"sample_dicoms/{name} not present")
    src = pydicom.dcmread(path, stop_before_pixels=True)
    assert send([path], listener.port) == [0]
    inst = listener.store.instance(src.SOPInstanceUID)
    assert inst.state == "received"
    assert pydicom.dcmread(inst.path).file_meta.TransferSyntaxUID == src.file_meta.TransferSyntaxUID


def test_other_objects_are_acknowledged_and_skipped(listener: Listener) -> None:
    study = generate_uid()
    ct, sr, lat = ct_slice(study), basic_sr(study), lateral_cr(study)
    assert send([ct, sr, lat], listener.port) == [0, 0, 0]
    assert listener.state(ct.SOPInstanceUID) == ("skipped", "wrong_modality")
    assert listener.state(sr.SOPInstanceUID) == ("skipped", "not_image")
    assert listener.state(lat.SOPInstanceUID) == ("skipped", "lateral_view")
    assert not list(listener.spool.root.rglob("*.dcm"))  # nothing kept of skipped objects
    assert listener.store.group_stable_studies(0.0) == []  # no job for a study without candidates


def test_own_results_are_recognised(listener: Listener) -> None:
    ours = chest_cr()
    ours.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ours.file_meta.MediaStorageSOPClassUID = ours.SOPClassUID
    ours.Manufacturer = "dicom-covid developers"
    # an SC whose SOP Instance UID the job store knows as one of our results, unmarked
    known = chest_cr()
    listener.store.add_instance("1.2.99.1", known.StudyInstanceUID, path=Path("x"))
    (job,) = listener.store.group_stable_studies(0.0)
    listener.store.record_results(
        job.id,
        "1.2.99.1",
        [ResultFile("sc", known.SOPInstanceUID, known.StudyInstanceUID, Path("y"))],
        ["T"],
    )
    assert send([ours, known], listener.port) == [0, 0]
    assert listener.state(ours.SOPInstanceUID) == ("skipped", "own_result")
    assert listener.state(known.SOPInstanceUID) == ("skipped", "own_result")


def test_duplicate_is_acknowledged_not_requeued(listener: Listener, caplog) -> None:
    caplog.set_level(logging.INFO)
    ds = chest_cr()
    assert send([ds], listener.port) == [0]
    assert send([ds, ds], listener.port) == [0, 0]
    assert listener.store.counts()["instances"]["received"] == 1
    assert listener.store.counts()["duplicates"] == 2
    assert "already received" in caplog.text


def _file_with_body(
    tmp_path: Path, body: bytes, sop_class: str = CTImageStorage, sop_uid: str | None = None
) -> Path:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid or generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    buf = io.BytesIO()
    buf.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(buf, meta)
    path = tmp_path / f"{meta.MediaStorageSOPInstanceUID}.dcm"
    path.write_bytes(buf.getvalue() + body)
    return path


def test_unparseable_data_set_gets_cannot_understand(listener: Listener, tmp_path: Path) -> None:
    # a sequence item longer than the data: pydicom cannot parse it
    bad_sq = (
        b"\x08\x00\x40\x11SQ\x00\x00\xff\xff\xff\xff"
        + b"\xfe\xff\x00\xe0"
        + (1000).to_bytes(4, "little")
        + b"xx"
    )
    garbage = bytes(range(256)) * 4  # parses into nonsense without any UID
    paths = [_file_with_body(tmp_path, bad_sq), _file_with_body(tmp_path, garbage)]
    assert send(paths, listener.port) == [STATUS_CANNOT_UNDERSTAND] * 2
    assert listener.store.counts()["instances"] == {
        k: 0 for k in listener.store.counts()["instances"]
    }
    ds = chest_cr()  # the listener goes on
    assert send([ds], listener.port) == [0]


def test_data_set_not_matching_request_gets_a900(listener: Listener, tmp_path: Path) -> None:
    ds = ct_slice()
    # the file meta, and so the C-STORE request, names another SOP Instance than the data set
    path = _file_with_body(tmp_path, _dataset_bytes(ds), sop_class=ds.SOPClassUID)
    assert send([path], listener.port) == [STATUS_MISMATCH]
    assert listener.store.instance(ds.SOPInstanceUID) is None


def _dataset_bytes(ds: pydicom.Dataset) -> bytes:
    """The encoded data set (explicit VR little endian) without preamble and file meta."""
    buf = pydicom.filebase.DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, False
    pydicom.filewriter.write_dataset(buf, ds)
    return buf.getvalue()


def test_free_disk_floor_answers_out_of_resources(tmp_path: Path) -> None:
    with Listener(tmp_path, min_free_bytes=2**62) as lis:
        ds = chest_cr()
        assert send([ds], lis.port) == [STATUS_OUT_OF_RESOURCES]
        assert lis.store.instance(ds.SOPInstanceUID) is None
        assert not list(lis.spool.root.rglob("*.dcm"))
        assert echo(lis.port)[:2] == (True, 0)  # still answers C-ECHO


def test_association_limit(tmp_path: Path) -> None:
    with Listener(tmp_path, maximum_associations=1) as lis:
        first = scu().associate("127.0.0.1", lis.port, ae_title="DICOMCOVID")
        assert first.is_established
        try:
            second = scu().associate("127.0.0.1", lis.port, ae_title="DICOMCOVID")
            assert not second.is_established and second.is_rejected
        finally:
            first.release()


def test_called_ae_title_must_be_ours_unless_configured(tmp_path: Path) -> None:
    with Listener(tmp_path / "strict") as lis:
        assert echo(lis.port, called="SOMEONE")[:3] == (False, None, True)
        assert echo(lis.port)[:2] == (True, 0)
    with Listener(tmp_path / "any", require_called_ae=False) as lis:
        assert echo(lis.port, called="SOMEONE")[:2] == (True, 0)


def test_pending_connections_push_out_their_own_oldest(tmp_path: Path) -> None:
    """With 2 pending connections allowed per peer and 3 in total, silent sockets of one address
    only push out that address's oldest; a full gate drops the oldest of all; a client that
    sends its request at once always gets in."""
    with Listener(tmp_path, maximum_pending=3, maximum_pending_per_peer=2) as lis:
        gate = lis.scp._server.guard.gate

        def connect(bind: str) -> socket.socket:
            s = socket.create_connection(("127.0.0.1", lis.port), source_address=(bind, 0))
            s.settimeout(5)
            return s

        a1, a2 = connect("127.0.0.2"), connect("127.0.0.2")
        b1 = connect("127.0.0.3")
        time.sleep(0.3)
        assert gate.counts() == (3, {"127.0.0.2": 2, "127.0.0.3": 1})
        a3 = connect("127.0.0.2")  # pushes out a1, its own oldest
        assert a1.recv(1) == b""
        time.sleep(0.3)
        assert gate.counts() == (3, {"127.0.0.2": 2, "127.0.0.3": 1})
        assert echo(lis.port)[:2] == (True, 0)  # pushed out a2, the oldest of all
        assert a2.recv(1) == b""
        time.sleep(0.3)
        assert gate.counts() == (2, {"127.0.0.2": 1, "127.0.0.3": 1})
        for s in (a1, a2, a3, b1):
            s.close()


def test_out_of_order_or_oversized_first_pdu_gets_an_abort(tmp_path: Path) -> None:
    with Listener(tmp_path, maximum_associate_rq_size=1024) as lis:
        for header, reason in (
            (struct.pack(">BBL", 0x04, 0, 100), 2),  # P-DATA before any association
            (struct.pack(">BBL", 0x01, 0, 1025), 6),  # larger than the limit
            (b"GET / ", 1),  # not DICOM at all
        ):
            with socket.create_connection(("127.0.0.1", lis.port), timeout=5) as s:
                s.sendall(header)
                # A-ABORT, source: service provider, with the reason; then the service closes
                assert s.recv(10) == struct.pack(">BBLBBBB", 0x07, 0, 4, 0, 0, 2, reason)
                assert s.recv(1) == b""
        assert echo(lis.port)[:2] == (True, 0)


def test_scp_timeouts_must_be_positive() -> None:
    for name in ("associate_timeout", "pdu_timeout", "network_timeout"):
        with pytest.raises(ConfigError, match=name):
            ScpConfig(**{name: 0})


def test_association_is_logged_without_patient_data(listener: Listener, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    study = generate_uid()
    cr, ct = chest_cr(study), ct_slice(study)
    assert send([cr, ct], listener.port) == [0, 0]
    # the release is logged by the association thread shortly after the SCU returns
    import time

    deadline = time.monotonic() + 10
    while "released by ORTHANC" not in caplog.text and time.monotonic() < deadline:
        time.sleep(0.05)
    text = caplog.text
    assert "opened by ORTHANC at 127.0.0.1" in text
    assert "2 instance(s) received (1 queued, 1 skipped, 0 duplicate, 0 refused)" in text
    assert cr.SOPInstanceUID in text and study in text
    for secret in (PATIENT_NAME, PATIENT_ID, "Zyxwvutsrq", "Qwertyuiop"):
        assert secret not in text


# -- TLS ---------------------------------------------------------------------------------------


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def certificates(tmp_path_factory) -> Path:
    """A throw-away CA, a server certificate for 127.0.0.1 and a client certificate."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl not installed")
    d = tmp_path_factory.mktemp("tls")
    key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _openssl(
        "req",
        "-x509",
        *key,
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-days",
        "2",
        "-subj",
        "/CN=dicom-covid test CA",
        cwd=d,
    )
    for name, san in (("server", "IP:127.0.0.1,DNS:localhost"), ("client", "DNS:orthanc")):
        _openssl(
            "req",
            *key,
            "-keyout",
            f"{name}.key",
            "-out",
            f"{name}.csr",
            "-subj",
            f"/CN={name}",
            cwd=d,
        )
        (d / f"{name}.ext").write_text(f"subjectAltName={san}\n")
        _openssl(
            "x509",
            "-req",
            "-in",
            f"{name}.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            f"{name}.crt",
            "-days",
            "2",
            "-extfile",
            f"{name}.ext",
            cwd=d,
        )
    return d


def test_tls_with_client_certificates(tmp_path: Path, certificates: Path) -> None:
    c = certificates
    tls = TlsConfig(cert=c / "server.crt", key=c / "server.key", ca=c / "ca.crt")
    with Listener(tmp_path, tls=tls) as lis:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(c / "ca.crt"))
        ctx.load_cert_chain(str(c / "client.crt"), str(c / "client.key"))
        assert echo(lis.port, tls_args=(ctx, "127.0.0.1"))[:2] == (True, 0)
        ds = chest_cr()
        assert send([ds], lis.port, tls_args=(ctx, "127.0.0.1")) == [0]
        # the service's own SCU (the sender) with the same kind of identity
        result = tmp_path / "result.dcm"
        chest_cr().save_as(result, enforce_file_format=True)
        client = TlsConfig(cert=c / "client.crt", key=c / "client.key", ca=c / "ca.crt")
        sent = send_files(
            [result],
            Destination("DICOMCOVID", "127.0.0.1", lis.port),
            SenderConfig(ae_title="ORTHANC", tls=client),
        )
        assert sent == [None]
        # no client certificate: the handshake fails, nothing is accepted
        anon = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(c / "ca.crt"))
        assert not echo(lis.port, tls_args=(anon, "127.0.0.1"))[0]
        assert not echo(lis.port)[0]  # plain TCP against a TLS port


def test_listener_never_imports_torch() -> None:
    """Importing the listener (and the rest of pacs_listener) leaves torch, MONAI, highdicom and
    the inference module out of the process; only the worker process loads them."""
    code = (
        "import sys, pacs_listener.scp\n"
        "import pacs_listener, pacs_listener.service, pacs_listener.worker, pacs_listener.sender\n"
        "bad = [m for m in ('torch', 'monai', 'dicom_covid.inference', 'highdicom') "
        "if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_public_api() -> None:
    import pacs_listener

    for name in pacs_listener.__all__:
        assert getattr(pacs_listener, name) is not None
    assert pacs_listener.Service.__module__ == "pacs_listener.service"
