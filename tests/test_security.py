"""Security of the listener as deployed: who may associate, TLS, resource limits, no patient data
in any log, private state files, no path escapes through UIDs.

Most tests run against one real ``dicom-covid serve`` subprocess started with an allow-list tied
to a host (``--allow-ae ORTHANC@127.0.0.1``), two associations at most, a 16 KiB PDU limit,
3-second association, request, mid-PDU and idle timeouts and at most 6 pending connections per
peer (``[scp]`` in a TOML file), debug logging (``-v``, the
most talkative setting) and umask 000, so file modes cannot come from the umask. The TLS tests
use an in-process listener and throw-away CAs made with ``openssl``. ``tests/test_scp.py``
already checks the plain allow-list, the host check, a limit of one association and TLS with a
trusted or missing client certificate in-process; these tests extend them.
"""

from __future__ import annotations

import contextlib
import errno
import shutil
import socket
import ssl
import stat
import struct
import subprocess
import time
from pathlib import Path

import pydicom
import pytest
from badinputs import encode_dataset, part10, set_raw
from live_service import ServeProcess
from pacs_helpers import (
    broken_pixels,
    chest_cr,
    ct_slice,
    echo,
    free_port,
    lateral_cr,
    model_bundle,
    scu,
    send,
    wait_until,
)
from pydicom.uid import generate_uid
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from dicom_covid.errors import DeliveryError
from pacs_listener.config import AllowedCaller, Destination, ScpConfig, SenderConfig, TlsConfig
from pacs_listener.jobs import JobStore
from pacs_listener.scp import StorageSCP
from pacs_listener.sender import send_files
from pacs_listener.spool import Spool

pytestmark = pytest.mark.timeout(300)

NAME, PID, BIRTH = "Doe^Jane", "PID-31337", "19700231x"  # BIRTH: an invalid DA on purpose
MAX_PDU = 16384


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return model_bundle(tmp_path_factory.mktemp("bundle"))


@pytest.fixture(scope="module")
def guarded(tmp_path_factory, bundle: Path):
    folder = tmp_path_factory.mktemp("guarded")
    config = folder / "serve.toml"
    config.write_text(
        "[scp]\nacse_timeout = 3.0\nnetwork_timeout = 3.0\nassociate_timeout = 3.0\n"
        "pdu_timeout = 3.0\nmaximum_pending_per_peer = 6\n"
    )
    svc = ServeProcess(
        folder,
        bundle,
        [
            "--config",
            str(config),
            "--max-associations",
            "2",
            "--max-pdu",
            str(MAX_PDU),
            "--quiet-period",
            "0.3",
            "--keep-spool",
            "-v",
        ],
        allow="ORTHANC@127.0.0.1",
        umask=0,
    )
    svc.start()
    try:
        yield svc
    finally:
        svc.close()


def _store(svc: ServeProcess) -> JobStore:
    return JobStore(svc.state / "jobs.sqlite", create=False)


def _rejection(assoc) -> tuple[int, int, int]:
    """(result, source, diagnostic) of the A-ASSOCIATE-RJ the requestor received."""
    assert assoc.is_rejected
    rsp = assoc.acceptor.primitive
    return (int(rsp.result), int(rsp.result_source), int(rsp.diagnostic))


def _associate(port: int, calling: str = "ORTHANC", bind: str | None = None):
    ae = scu(calling, [("1.2.840.10008.5.1.4.1.1.1", ["1.2.840.10008.1.2.1"])])
    return ae.associate(
        "127.0.0.1", port, ae_title="DICOMCOVID", bind_address=(bind, 0) if bind else None
    )


# -- who may associate -------------------------------------------------------------------------


def test_allow_list_checks_calling_ae_and_host(guarded: ServeProcess) -> None:
    _serves(guarded)
    ok = _associate(guarded.port)
    assert ok.is_established
    ok.release()
    # the right AE title from another address of this machine: rejected, permanent,
    # service user, "calling AE title not recognised"
    other_host = _associate(guarded.port, bind="127.0.0.2")
    assert not other_host.is_established and _rejection(other_host) == (1, 1, 3)
    intruder = _associate(guarded.port, calling="INTRUDER")
    assert not intruder.is_established and _rejection(intruder) == (1, 1, 3)
    log = guarded.log.read_text()
    assert "association from AE 'ORTHANC' at 127.0.0.2" in log
    assert "association from AE 'INTRUDER' at 127.0.0.1" in log
    _serves(guarded)


# -- resource limits ---------------------------------------------------------------------------


def _serves(svc: ServeProcess, timeout: float = 10.0) -> None:
    """Wait until the service accepts a C-ECHO again (an association that just ended may hold
    its slot for a moment)."""
    wait_until(lambda: echo(svc.port)[:2] == (True, 0), timeout, interval=0.2, what="C-ECHO")


def _can_associate(port: int) -> bool:
    assoc = _associate(port)
    if assoc.is_established:
        assoc.release()
        return True
    return False


def test_association_limit_rejects_the_extra_one_then_frees_idle_slots(
    guarded: ServeProcess,
) -> None:
    _serves(guarded)
    held = [_associate(guarded.port) for _ in range(2)]
    try:
        assert all(a.is_established for a in held)
        extra = _associate(guarded.port)
        # rejected, transient, service provider (presentation), "local limit exceeded"
        assert not extra.is_established and _rejection(extra) == (2, 3, 2)
        held[0].release()
        wait_until(lambda: _can_associate(guarded.port), 10, what="the released slot")
        # a client that holds an association open and says nothing is cut off after the idle
        # timeout (3 s here), so idle peers cannot hold every slot for long
        t0 = time.monotonic()
        wait_until(lambda: not held[1].is_established, 15, what="the idle association to close")
        assert time.monotonic() - t0 < 10
        assert held[1].is_aborted
    finally:
        for a in held:
            if a.is_established:
                a.release()
    _serves(guarded)


def test_silent_tcp_connections_are_dropped(guarded: ServeProcess) -> None:
    """Connections that never send an A-ASSOCIATE-RQ are closed after the ACSE timeout."""
    _serves(guarded)
    socks = [socket.create_connection(("127.0.0.1", guarded.port), timeout=20) for _ in range(3)]
    t0 = time.monotonic()
    try:
        for s in socks:
            with contextlib.suppress(ConnectionResetError):  # a reset is a close too
                assert s.recv(1) == b""  # the service closed it
        assert time.monotonic() - t0 < 15
    finally:
        for s in socks:
            s.close()
    _serves(guarded)


def _closed_by_service(sock: socket.socket, within: float) -> float:
    """Wait until the service closes ``sock`` (EOF or reset, after an optional A-ABORT PDU);
    return the seconds it took. Fails when it is still open after ``within`` seconds."""
    t0 = time.monotonic()
    sock.settimeout(within)
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        pass
    except TimeoutError:
        raise AssertionError(f"the service kept the connection open for {within} s") from None
    return time.monotonic() - t0


def _half_pdu(port: int, length: int = 0xFFFFFFF0, body: bytes = b"", bind: str = "127.0.0.1"):
    """A raw connection that sends the header of an A-ASSOCIATE-RQ announcing ``length`` bytes
    (and ``body``), then nothing."""
    s = socket.create_connection(("127.0.0.1", port), timeout=20, source_address=(bind, 0))
    s.sendall(struct.pack(">BBL", 0x01, 0, length) + body)
    return s


def test_stalled_half_pdus_and_silent_sockets_cannot_lock_out_a_sender(
    guarded: ServeProcess,
) -> None:
    """Acceptance of issue 11, item 1: while 8 stalled half-PDUs (an A-ASSOCIATE-RQ header
    claiming ~4 GB, then silence) and 10 silent TCP sockets are held open, from the allow-listed
    address itself and from another one, an allow-listed C-ECHO and C-STORE succeed within 5 s."""
    _serves(guarded)
    held: list[socket.socket] = []
    try:
        for i in range(8):
            held.append(_half_pdu(guarded.port, bind="127.0.0.1" if i % 2 else "127.0.0.3"))
        for i in range(10):
            bind = "127.0.0.1" if i % 2 else "127.0.0.3"
            held.append(
                socket.create_connection(("127.0.0.1", guarded.port), source_address=(bind, 0))
            )
        time.sleep(0.5)  # every attacker is connected and waiting
        t0 = time.monotonic()
        assert echo(guarded.port)[:2] == (True, 0)
        ds = chest_cr()
        assert send([ds], guarded.port) == [0]
        took = time.monotonic() - t0
        assert took < 5.0, f"echo + C-STORE took {took:.1f} s"
        # the 4 GB claims were refused at once, the silent ones within the 3 s request timeout
        for s in held[:8]:
            assert _closed_by_service(s, 2.0) < 2.0
        for s in held[8:]:
            assert _closed_by_service(s, 8.0) < 8.0
    finally:
        for s in held:
            s.close()
    with _store(guarded) as store:
        assert store.instance(ds.SOPInstanceUID) is not None
    log = guarded.log.read_text()
    assert "announced an A-ASSOCIATE-RQ of 4294967280 bytes" in log
    _serves(guarded)


def test_a_request_trickled_too_slowly_is_cut_off(guarded: ServeProcess) -> None:
    """A plausible A-ASSOCIATE-RQ (200 bytes announced) of which 10 arrive, then a byte every
    second: closed when the 3-second request timeout ends, however it trickles."""
    _serves(guarded)
    with _half_pdu(guarded.port, 200, b"\0" * 10) as s:
        t0 = time.monotonic()
        with contextlib.suppress(OSError):
            for _ in range(10):
                time.sleep(1.0)
                s.sendall(b"\0")
        took = _closed_by_service(s, 10.0) + (time.monotonic() - t0)
        assert 2.5 < took < 8.0, took
    _serves(guarded)


def test_a_peer_silent_in_the_middle_of_a_pdu_is_cut_off(guarded: ServeProcess) -> None:
    """After a normal association, a P-DATA-TF header announcing 1000 bytes, 10 of them, then
    silence: closed after the 3-second mid-PDU timeout; the slot is free again."""
    _serves(guarded)
    with socket.create_connection(("127.0.0.1", guarded.port), timeout=20) as s:
        s.sendall(_raw_associate_rq())
        assert s.recv(1) == b"\x02"  # A-ASSOCIATE-AC
        s.recv(65536)
        s.sendall(struct.pack(">BBL", 0x04, 0, 1000) + b"\0" * 10)
        assert _closed_by_service(s, 10.0) < 8.0
    _serves(guarded)


def test_wrong_called_ae_title_is_rejected(guarded: ServeProcess) -> None:
    _serves(guarded)
    ae = scu("ORTHANC")
    assoc = ae.associate("127.0.0.1", guarded.port, ae_title="NOT-US")
    # rejected, permanent, service user, "called AE title not recognised"
    assert not assoc.is_established and _rejection(assoc) == (1, 1, 7)
    assert "it called AE title 'NOT-US', not ours (DICOMCOVID)" in guarded.log.read_text()
    _serves(guarded)


def _pdu_sizes(assoc) -> list[int]:
    sizes: list[int] = []
    assoc.bind(evt.EVT_DATA_SENT, lambda event: sizes.append(len(event.data)))
    return sizes


def test_pdu_limit_is_announced_and_oversized_pdus_do_no_harm(guarded: ServeProcess) -> None:
    _serves(guarded)
    ds = chest_cr()
    ae = scu("ORTHANC", [(ds.SOPClassUID, ["1.2.840.10008.1.2.1"])])
    ae.maximum_pdu_size = 0  # we could receive anything; the service announces its limit
    assoc = ae.associate("127.0.0.1", guarded.port, ae_title="DICOMCOVID")
    assert assoc.is_established
    try:
        assert assoc.acceptor.maximum_length == MAX_PDU
        sizes = _pdu_sizes(assoc)
        assert int(assoc.send_c_store(ds).Status) == 0
        p_data = [n for n in sizes if n > 100]
        assert p_data and max(p_data) <= MAX_PDU + 6  # a PDU is its length field + 6 bytes
        # a peer that ignores the limit and sends 1 MiB P-DATA PDUs: pynetdicom reads any PDU
        # length, so the instance is processed normally (what one peer can make the service hold
        # is what it sends, as for any large data set)
        big = chest_cr()
        from pynetdicom.pdu_primitives import MaximumLengthNotification

        for item in assoc.acceptor.primitive.user_information:
            if isinstance(item, MaximumLengthNotification):
                item.maximum_length_received = 2**20  # ignore what the service announced
        sizes.clear()
        assert int(assoc.send_c_store(big).Status) == 0
        assert max(sizes) > 10 * MAX_PDU
    finally:
        assoc.release()
    with _store(guarded) as store:
        assert store.instance(big.SOPInstanceUID).state in (
            "received",
            "grouped",
            "inferred",
            "results_written",
            "delivered",
        )


def _raw_associate_rq(calling: str = "ORTHANC") -> bytes:
    """Our own A-ASSOCIATE-RQ bytes (from pynetdicom's encoder)."""
    from pynetdicom.pdu import A_ASSOCIATE_RQ
    from pynetdicom.pdu_primitives import A_ASSOCIATE, MaximumLengthNotification
    from pynetdicom.presentation import build_context

    prim = A_ASSOCIATE()
    prim.application_context_name = "1.2.840.10008.3.1.1.1"
    prim.calling_ae_title = calling
    prim.called_ae_title = "DICOMCOVID"
    cx = build_context(Verification)
    cx.context_id = 1
    prim.presentation_context_definition_list = [cx]
    ml = MaximumLengthNotification()
    ml.maximum_length_received = MAX_PDU
    prim.user_information = [ml]
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(prim)
    return pdu.encode()


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param(struct.pack(">BBL", 0x04, 0, 0xFFFFFFFF) + b"\0" * 1024, id="p_data_4gib"),
        pytest.param(struct.pack(">BBL", 0x01, 0, 0xFFFFFFF0) + b"\0" * 64, id="assoc_rq_4gib"),
        pytest.param(struct.pack(">BBL", 0xFF, 0, 16) + b"\0" * 16, id="unknown_pdu_type"),
        pytest.param(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", id="http_request"),
    ],
)
def test_malformed_pdus_close_the_connection_and_nothing_else(
    guarded: ServeProcess, payload: bytes
) -> None:
    """A PDU claiming 4 GiB (then the peer gives up), an unknown PDU type, or plain HTTP: the
    connection ends, nothing is recorded, the service keeps serving."""
    with _store(guarded) as store:
        before = sum(store.counts()["instances"].values())
    with socket.create_connection(("127.0.0.1", guarded.port), timeout=20) as s:
        if payload[0] == 0x04:  # P-DATA only makes sense inside an association
            s.sendall(_raw_associate_rq())
            assert s.recv(1) == b"\x02"  # A-ASSOCIATE-AC
            s.recv(65536)
        try:
            s.sendall(payload)
            # The guard may already have aborted and closed (it reads 6 bytes and decides):
            # then shutdown() says "not connected", which is the connection ending, as wanted.
            s.shutdown(socket.SHUT_WR)
            s.settimeout(15)
            while s.recv(65536):
                pass
        except (ConnectionResetError, BrokenPipeError):
            pass
        except OSError as exc:
            if exc.errno != errno.ENOTCONN:
                raise
    assert guarded.alive()
    _serves(guarded)
    with _store(guarded) as store:
        assert sum(store.counts()["instances"].values()) == before  # nothing new recorded


# -- TLS ---------------------------------------------------------------------------------------


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


_EC = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]


def _ca(d: Path, name: str) -> None:
    _openssl(
        "req",
        "-x509",
        *_EC,
        "-keyout",
        f"{name}.key",
        "-out",
        f"{name}.crt",
        "-days",
        "2",
        "-subj",
        f"/CN={name}",
        cwd=d,
    )


def _issue(d: Path, ca: str, name: str, san: str) -> None:
    _openssl(
        "req", *_EC, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=d
    )
    (d / f"{name}.ext").write_text(f"subjectAltName={san}\n")
    _openssl(
        "x509",
        "-req",
        "-in",
        f"{name}.csr",
        "-CA",
        f"{ca}.crt",
        "-CAkey",
        f"{ca}.key",
        "-CAcreateserial",
        "-out",
        f"{name}.crt",
        "-days",
        "2",
        "-extfile",
        f"{name}.ext",
        cwd=d,
    )


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    """Two unrelated CAs; server, client and destination certificates; a self-signed client."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl not installed")
    d = tmp_path_factory.mktemp("pki")
    _ca(d, "ca_a")
    _ca(d, "ca_b")
    _issue(d, "ca_a", "server", "IP:127.0.0.1")
    _issue(d, "ca_a", "client", "DNS:orthanc")
    _issue(d, "ca_b", "foreign_client", "DNS:orthanc")
    _issue(d, "ca_b", "foreign_dest", "IP:127.0.0.1")
    _issue(d, "ca_a", "wrong_host_dest", "DNS:pacs.example.org")
    _openssl(
        "req",
        "-x509",
        *_EC,
        "-keyout",
        "selfsigned.key",
        "-out",
        "selfsigned.crt",
        "-days",
        "2",
        "-subj",
        "/CN=orthanc",
        "-addext",
        "subjectAltName=DNS:orthanc",
        cwd=d,
    )
    for key in d.glob("*.key"):
        key.chmod(0o600)
    return d


class _Listener:
    def __init__(self, root: Path, tls: TlsConfig) -> None:
        self.store = JobStore(root / "jobs.sqlite")
        cfg = ScpConfig(
            port=free_port(), allowed_callers=(AllowedCaller("ORTHANC"),), min_free_bytes=0, tls=tls
        )
        self.scp = StorageSCP(cfg, self.store, Spool(root / "spool"))

    def __enter__(self) -> _Listener:
        self.scp.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.scp.stop()
        self.store.close()


def _client(pki: Path, name: str | None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki / "ca_a.crt"))
    if name:
        ctx.load_cert_chain(str(pki / f"{name}.crt"), str(pki / f"{name}.key"))
    return ctx


def test_tls_accepts_only_peers_certified_by_our_ca(tmp_path: Path, pki: Path) -> None:
    tls = TlsConfig(cert=pki / "server.crt", key=pki / "server.key", ca=pki / "ca_a.crt")
    with _Listener(tmp_path, tls) as lis:
        port = lis.scp.address[1]
        trusted = _client(pki, "client")
        ds = chest_cr()
        assert send([ds], port, tls_args=(trusted, "127.0.0.1")) == [0]
        for name in ("foreign_client", "selfsigned"):
            untrusted = _client(pki, name)
            assert echo(port, tls_args=(untrusted, "127.0.0.1"))[0] is False, name
            with pytest.raises(AssertionError, match="not accepted"):
                send([chest_cr()], port, tls_args=(untrusted, "127.0.0.1"))
        # the service's own identity is only trusted by clients that trust our CA
        other_ca = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki / "ca_b.crt"))
        other_ca.load_cert_chain(str(pki / "client.crt"), str(pki / "client.key"))
        assert echo(port, tls_args=(other_ca, "127.0.0.1"))[0] is False
        assert echo(port, tls_args=(trusted, "127.0.0.1"))[:2] == (True, 0)
        assert lis.store.counts()["instances"]["received"] == 1  # only the trusted one


def _tls_destination(pki: Path, cert: str) -> tuple[AE, object, int]:
    ae = AE(ae_title="PACS")
    for cx in AllStoragePresentationContexts:
        ae.add_supported_context(cx.abstract_syntax, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(str(pki / f"{cert}.crt"), str(pki / f"{cert}.key"))
    ctx.load_verify_locations(str(pki / "ca_a.crt"))
    ctx.verify_mode = ssl.CERT_REQUIRED
    received: list[str] = []

    def on_store(event):
        received.append(str(event.request.AffectedSOPInstanceUID))
        return 0

    port = free_port()
    server = ae.start_server(
        ("127.0.0.1", port),
        block=False,
        ssl_context=ctx,
        evt_handlers=[(evt.EVT_C_STORE, on_store)],
    )
    server.received = received  # type: ignore[attr-defined]
    return ae, server, port


def test_sender_delivers_only_to_destinations_certified_by_our_ca(
    tmp_path: Path, pki: Path
) -> None:
    result = tmp_path / "result.dcm"
    ds = chest_cr()
    ds.save_as(result, enforce_file_format=True)
    ours = TlsConfig(cert=pki / "client.crt", key=pki / "client.key", ca=pki / "ca_a.crt")
    config = SenderConfig(ae_title="ORTHANC", tls=ours)
    for cert, ok in (("server", True), ("foreign_dest", False), ("wrong_host_dest", False)):
        _, server, port = _tls_destination(pki, cert)
        try:
            dest = Destination("PACS", "127.0.0.1", port)
            if ok:
                assert send_files([result], dest, config) == [None]
                assert server.received == [ds.SOPInstanceUID]
            else:
                with pytest.raises(DeliveryError):
                    send_files([result], dest, config)
                assert server.received == [], cert
        finally:
            server.shutdown()


# -- path escapes, patient data, file modes ------------------------------------------------------


def test_uids_cannot_escape_the_state_folder(guarded: ServeProcess, tmp_path: Path) -> None:
    _serves(guarded)
    target = tmp_path / "escaped"
    ds = chest_cr()
    ds.StudyInstanceUID = "../" * 12 + str(target).lstrip("/")
    ds.SeriesInstanceUID = "/" + str(target / "series")
    assert send([ds], guarded.port) == [0]
    with _store(guarded) as store:
        inst = wait_until(lambda: store.instance(ds.SOPInstanceUID), 10, what="the instance")
        assert inst.path is not None
        assert guarded.state.resolve() in inst.path.resolve().parents
        assert inst.path.parent.name.startswith("x")  # a hash, not the UID
        wait_until(
            lambda: store.instance(ds.SOPInstanceUID).state in ("delivered", "failed"),
            120,
            what="the instance to be settled",
        )
    assert not target.exists() and not (tmp_path / "escaped").exists()
    for p in guarded.state.rglob("*"):
        assert ".." not in p.relative_to(guarded.state).parts


@pytest.fixture(scope="module")
def patient_run(guarded: ServeProcess):
    """A named patient through every path: analysed, failed, skipped, refused, duplicate."""
    _serves(guarded)
    study = generate_uid()

    def named(ds: pydicom.Dataset) -> pydicom.Dataset:
        ds.PatientName, ds.PatientID = NAME, PID
        set_raw(ds, 0x00100030, "DA", BIRTH.encode())  # Patient's Birth Date, invalid
        return ds

    good = named(chest_cr(study))
    bad = named(broken_pixels(study))
    lateral = named(lateral_cr(study))
    ct = named(ct_slice(study))
    assert send([good, bad, lateral, ct, good], guarded.port) == [0, 0, 0, 0, 0]
    mismatch = named(chest_cr())
    path = guarded.folder / "mismatch.dcm"
    path.write_bytes(
        part10(
            encode_dataset(mismatch),
            mismatch.SOPClassUID,
            generate_uid(),
            mismatch.file_meta.TransferSyntaxUID,
        )
    )
    assert send([path], guarded.port) == [0xA900]
    with _store(guarded) as store:
        wait_until(
            lambda: (
                store.instance(good.SOPInstanceUID).state == "delivered"
                and store.instance(bad.SOPInstanceUID).state == "failed"
            ),
            180,
            what="the named patient's study to be settled",
        )
    return study


def test_state_files_are_private_whatever_the_umask(guarded: ServeProcess, patient_run) -> None:
    """The service ran with umask 000: every folder in the state is 0700, every file 0600."""
    state = guarded.state
    files = [p for p in state.rglob("*") if p.is_file()]
    names = {p.name for p in files}
    assert {"jobs.sqlite", "jobs.sqlite-wal", "jobs.sqlite-shm"} <= names
    assert any(p.parent.parent.name == "spool" for p in files)  # a spooled image (kept)
    assert any(p.name in ("sr.dcm", "sc.dcm") for p in files)  # results
    assert any(p.relative_to(state).parts[0] == "output" for p in files)  # delivered copies
    loose = [
        f"{p.relative_to(state)} {oct(stat.S_IMODE(p.stat().st_mode))}"
        for p in [state, *state.rglob("*")]
        if stat.S_IMODE(p.stat().st_mode) != (0o700 if p.is_dir() else 0o600)
    ]
    assert not loose, loose
    assert stat.S_IMODE(guarded.log.stat().st_mode) == 0o600


def test_no_patient_data_in_any_log_or_in_the_job_store(guarded: ServeProcess, patient_run) -> None:
    """Search the log file, the service's and worker's stdout and stderr (debug logging on), and
    the job store database, for the patient's name, ID and birth date in any form."""
    time.sleep(0.5)
    assert guarded.stop() == 0
    secrets = {NAME, PID, BIRTH, "Doe^", "^Jane", "Jane", "31337", "Doe Jane", "Jane Doe"}
    files = [*guarded.log_files(), *guarded.state.glob("jobs.sqlite*")]
    assert len(files) >= 4
    text = b"\n".join(p.read_bytes() for p in files)
    assert b"association" in text and b"job" in text and b"DEBUG" in text
    leaked = sorted(s for s in secrets if s.encode() in text)
    assert not leaked, f"patient data found: {leaked}"
