"""The DICOM listener: C-ECHO and C-STORE SCP in front of the durable job store.

The C-STORE handler stays thin (no torch, no pixel decoding): it checks free disk, parses the
header of ``event.encoded_dataset()``, drops re-sent duplicates and our own results, writes
candidate images to the spool (tmp file, fsync, rename), records every instance in the job store
and answers. Status codes:

========  ===========================================================================
0x0000    stored (or acknowledged: duplicate, skipped object, our own result)
0xA700    out of resources: free disk, less the space reserved for the results of images not yet
          analysed, below ``min_free_bytes``; or spool/store not writable
0xA701    out of resources, permanently: a candidate image larger than ``maximum_image_pixels``
          or ``maximum_image_bytes`` (``too_large``, judged from the header, nothing decoded)
0xA900    data set does not match the SOP class / instance of the C-STORE request
0xC210    cannot understand: the data set cannot be parsed, lacks its UIDs, or is incomplete (a
          value shorter than its length, a CR/DX/SC image without Pixel Data)
0xC211    unexpected error in the handler (logged with a traceback)
========  ===========================================================================

Associations are only accepted from the configured calling AE titles (and hosts); everything
else is rejected with "calling AE title not recognised". The called AE title must be ours
(else "called AE title not recognised") unless ``require_called_ae`` is off. Before pynetdicom
sees a connection, :mod:`pacs_listener.guard` bounds the time and bytes a peer may use until its
A-ASSOCIATE-RQ is complete, and how many such pending connections it may hold. Per association
one log line gives the calling AE, peer address, number of instances and duration; no patient
data is ever logged.
"""

from __future__ import annotations

import io
import logging
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import (
    HTJ2K,
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import AE, DEFAULT_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from .config import ScpConfig, TlsConfig
from .guard import ConnectionGuard, GuardedAssociationServer, GuardLimits
from .jobs import JobStore
from .spool import Spool, free_bytes
from .store import STORE_ERRORS
from .triage import Verdict, incomplete, result_reserve, too_large, triage

__all__ = [
    "STATUS_CANNOT_UNDERSTAND",
    "STATUS_CODES",
    "STATUS_MISMATCH",
    "STATUS_OUT_OF_RESOURCES",
    "STATUS_SUCCESS",
    "STATUS_TOO_LARGE",
    "TRANSFER_SYNTAXES",
    "StorageSCP",
    "server_ssl_context",
    "supported_contexts",
]

logger = logging.getLogger(__name__)

STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_TOO_LARGE = 0xA701
STATUS_MISMATCH = 0xA900
STATUS_CANNOT_UNDERSTAND = 0xC210
STATUS_PROCESSING_FAILURE = 0xC211

#: Every C-STORE status the SCP answers with, and when (the conformance statement's table).
STATUS_CODES: dict[int, tuple[str, str]] = {
    STATUS_SUCCESS: (
        "Success",
        "stored and queued; or acknowledged without processing: a duplicate, an object that is "
        "not a frontal chest CR/DX image (skipped), one of our own results",
    ),
    STATUS_OUT_OF_RESOURCES: (
        "Refused: out of resources",
        "free disk, less the space reserved for results still to be written, below "
        "min_free_bytes; or the spool or job store cannot be written (transient: retry later)",
    ),
    STATUS_TOO_LARGE: (
        "Refused: out of resources",
        "a candidate image declares more than maximum_image_pixels pixels or "
        "maximum_image_bytes decoded (judged from the header; permanent)",
    ),
    STATUS_MISMATCH: (
        "Error: data set does not match SOP class",
        "the data set's SOP Class/Instance UID differs from the C-STORE request's",
    ),
    STATUS_CANNOT_UNDERSTAND: (
        "Error: cannot understand",
        "the data set cannot be parsed, lacks its SOP Instance/Class UID, or is incomplete "
        "(a value shorter than its length, a CR/DX/SC image without Pixel Data)",
    ),
    STATUS_PROCESSING_FAILURE: (
        "Error: processing failure",
        "an unexpected error in the handler (logged with a traceback)",
    ),
}

#: Transfer syntaxes accepted for every storage SOP class: RLE, JPEG (lossless, baseline,
#: extended), JPEG-LS, JPEG 2000, HTJ2K, deflated and uncompressed. pynetdicom takes the first of
#: these that the sender proposes, so compressed encodings come first: an image is then spooled
#: exactly as the PACS holds it, without the PACS transcoding it.
TRANSFER_SYNTAXES = [
    JPEGLSLossless,
    JPEG2000Lossless,
    JPEGLossless,
    JPEGLosslessSV1,
    RLELossless,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    JPEGLSNearLossless,
    JPEG2000,
    HTJ2K,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    ExplicitVRBigEndian,
]


def supported_contexts() -> list[tuple[str, list[str]]]:
    """The presentation contexts the SCP accepts: ``(abstract syntax, transfer syntaxes)``.

    Verification with pynetdicom's default transfer syntaxes, then every storage SOP class of
    pynetdicom's ``AllStoragePresentationContexts`` with :data:`TRANSFER_SYNTAXES`.
    """
    out = [(str(Verification), list(DEFAULT_TRANSFER_SYNTAXES))]
    out += [
        (str(cx.abstract_syntax), list(TRANSFER_SYNTAXES)) for cx in AllStoragePresentationContexts
    ]
    return out


def server_ssl_context(tls: TlsConfig) -> ssl.SSLContext:
    """TLS context of the SCP: our certificate, and client certificates required when a CA is set.

    Raises
    ------
    OSError, ssl.SSLError
        When the certificate, key or CA file cannot be loaded.
    """
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(tls.cert), str(tls.key))
    if tls.ca is not None:
        ctx.load_verify_locations(cafile=str(tls.ca))
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


@dataclass
class _AssocStats:
    number: int
    calling_ae: str
    address: str
    port: int
    started: float = field(default_factory=time.monotonic)
    received: int = 0
    queued: int = 0
    skipped: int = 0
    duplicates: int = 0
    refused: int = 0


class StorageSCP:
    """A non-blocking C-ECHO/C-STORE SCP feeding the job store.

    Parameters
    ----------
    config : ScpConfig
        AE title, address, allow-list, limits, TLS, free-disk floor.
    store : JobStore
        Where instances are recorded.
    spool : Spool
        Where candidate images are written.
    on_refused : callable, optional
        Called with the status of every C-STORE answered with a failure status (the metrics
        count them; it must not raise).
    """

    def __init__(
        self,
        config: ScpConfig,
        store: JobStore,
        spool: Spool,
        on_refused: Callable[[int], None] | None = None,
    ) -> None:
        self.config = config
        self.store = store
        self.spool = spool
        self.on_refused = on_refused
        self._server = None
        self._assocs: dict[object, _AssocStats] = {}
        self._lock = threading.Lock()
        self._counter = 0
        self.ae = self._build_ae()

    def _build_ae(self) -> AE:
        c = self.config
        ae = AE(ae_title=c.ae_title)
        ae.maximum_associations = c.maximum_associations
        ae.maximum_pdu_size = c.maximum_pdu_size
        ae.acse_timeout = c.acse_timeout
        ae.dimse_timeout = c.dimse_timeout
        ae.network_timeout = c.network_timeout
        ae.require_called_aet = c.require_called_ae
        for abstract_syntax, syntaxes in supported_contexts():
            ae.add_supported_context(abstract_syntax, syntaxes)
        return ae

    @property
    def address(self) -> tuple[str, int]:
        """``(host, port)`` actually listened on (useful with port 0)."""
        if self._server is None:
            return (self.config.host, self.config.port)
        host, port = self._server.server_address[:2]
        return (str(host), int(port))

    def start(self) -> None:
        """Start listening in background threads.

        Raises
        ------
        OSError
            When the address cannot be bound (port in use, no permission).
        """
        c = self.config
        ctx = server_ssl_context(c.tls) if c.tls else None
        handlers = [
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_ESTABLISHED, self._on_established),
            (evt.EVT_RELEASED, self._on_closed),
            (evt.EVT_ABORTED, self._on_closed),
            (evt.EVT_CONN_CLOSE, self._on_closed),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
        ]
        guard = ConnectionGuard(
            GuardLimits(
                associate_timeout=c.associate_timeout,
                pdu_timeout=c.pdu_timeout,
                maximum_associate_rq_size=c.maximum_associate_rq_size,
                maximum_pending=c.maximum_pending,
                maximum_pending_per_peer=c.maximum_pending_per_peer,
            )
        )
        # AE.start_server(block=False) with our server class: make_server passes the guard on
        server = self.ae.make_server(
            (c.host, c.port),
            evt_handlers=handlers,
            ssl_context=ctx,
            server_class=GuardedAssociationServer,
            guard=guard,
        )
        thread = threading.Thread(
            target=server.serve_forever, name=f"AcceptorServer@{c.port}", daemon=True
        )
        thread.start()
        self.ae._servers.append(server)  # so that AE.shutdown() stops it, as start_server does
        self._server = server
        callers = ", ".join(str(a) for a in c.allowed_callers) or "any calling AE"
        logger.info(
            "listening as %s on %s:%d%s; accepting %s calling %s; max %d associations, "
            "%d pending connections (%d per peer, %g s to associate)",
            c.ae_title,
            *self.address,
            " (TLS)" if ctx else "",
            callers,
            c.ae_title if c.require_called_ae else "any AE title",
            c.maximum_associations,
            c.maximum_pending,
            c.maximum_pending_per_peer,
            c.associate_timeout,
        )
        if not c.allowed_callers:
            logger.warning("no --allow-ae given: associations from any calling AE are accepted")

    def stop(self) -> None:
        """Stop listening and close open associations."""
        if self._server is not None:
            self._server.shutdown()
            self._server = None
        self.ae.shutdown()
        logger.info("listener stopped")

    # -- association handlers ----------------------------------------------------------------

    def _allowed(self, calling_ae: str, address: str) -> bool:
        callers = self.config.allowed_callers
        if not callers:
            return True
        return any(
            a.ae_title == calling_ae and (a.host is None or a.host == address) for a in callers
        )

    def _on_requested(self, event: evt.Event) -> None:
        assoc = event.assoc
        calling = str(assoc.requestor.primitive.calling_ae_title).strip()
        called = str(assoc.requestor.primitive.called_ae_title).strip()
        address = str(assoc.requestor.address)
        if self.config.require_called_ae and called != self.config.ae_title:
            logger.warning(
                "association from AE %r at %s:%s rejected: it called AE title %r, not ours "
                "(%s); configure the sender's destination with our AE title",
                calling,
                address,
                assoc.requestor.port,
                called,
                self.config.ae_title,
            )
            # permanent, service user, "called AE title not recognised"
            assoc.acse.send_reject(0x01, 0x01, 0x07)
            assoc.kill()
            return
        if not self._allowed(calling, address):
            logger.warning(
                "association from AE %r at %s:%s rejected: calling AE title not in the "
                "allow-list (add it with --allow-ae)",
                calling,
                address,
                assoc.requestor.port,
            )
            # permanent, service user, "calling AE title not recognised"; then wait (as
            # pynetdicom does for its own rejections) until the peer has the reject PDU
            assoc.acse.send_reject(0x01, 0x01, 0x03)
            assoc.kill()

    def _on_rejected(self, event: evt.Event) -> None:
        req = event.assoc.requestor
        logger.warning("association from %s:%s rejected", req.address, req.port)

    def _on_established(self, event: evt.Event) -> None:
        req = event.assoc.requestor
        with self._lock:
            self._counter += 1
            stats = _AssocStats(
                self._counter, str(req.ae_title).strip(), str(req.address), int(req.port)
            )
            self._assocs[event.assoc] = stats
        logger.info(
            "association %d: opened by %s at %s:%d",
            stats.number,
            stats.calling_ae,
            stats.address,
            stats.port,
        )

    def _on_closed(self, event: evt.Event) -> None:
        with self._lock:
            stats = self._assocs.pop(event.assoc, None)
        if stats is None:
            return
        how = {"EVT_RELEASED": "released", "EVT_ABORTED": "aborted"}.get(event.event.name, "closed")
        logger.info(
            "association %d: %s by %s at %s:%d after %.2f s: %d instance(s) received "
            "(%d queued, %d skipped, %d duplicate, %d refused)",
            stats.number,
            how,
            stats.calling_ae,
            stats.address,
            stats.port,
            time.monotonic() - stats.started,
            stats.received,
            stats.queued,
            stats.skipped,
            stats.duplicates,
            stats.refused,
        )

    def _stats(self, event: evt.Event) -> _AssocStats:
        with self._lock:
            stats = self._assocs.get(event.assoc)
            if stats is None:  # defensive: handler ran before EVT_ESTABLISHED was seen
                req = event.assoc.requestor
                self._counter += 1
                stats = _AssocStats(
                    self._counter, str(req.ae_title).strip(), str(req.address), int(req.port)
                )
                self._assocs[event.assoc] = stats
            return stats

    # -- DIMSE handlers ----------------------------------------------------------------------

    def _on_echo(self, event: evt.Event) -> int:
        logger.debug("C-ECHO from %s", str(event.assoc.requestor.ae_title).strip())
        return STATUS_SUCCESS

    def _on_store(self, event: evt.Event) -> int:
        stats = self._stats(event)
        stats.received += 1
        try:
            status = self._store(event, stats)
        except Exception:
            logger.exception(
                "association %d: unexpected error while storing an instance", stats.number
            )
            status = STATUS_PROCESSING_FAILURE
        if status not in (STATUS_SUCCESS,):
            stats.refused += 1
            if self.on_refused is not None:
                try:
                    self.on_refused(status)
                except Exception:
                    logger.exception("counting a refused instance failed")
        return status

    def _free_space(self) -> tuple[int, int]:
        """``(free bytes of the spool's file system, bytes reserved for results to write)``."""
        try:
            free = free_bytes(self.spool.root)
        except OSError:
            free = 0
        try:
            reserved = self.store.pending_result_bytes()
        except STORE_ERRORS:
            reserved = 0
        return free, reserved

    def _store(self, event: evt.Event, stats: _AssocStats) -> int:
        req = event.request
        rq_sop = str(req.AffectedSOPInstanceUID or "").strip()
        rq_class = str(req.AffectedSOPClassUID or "").strip()
        floor = self.config.min_free_bytes
        free, reserved = self._free_space()
        if free - reserved < floor:
            logger.error(
                "association %d: instance %s refused (0xA700): %d MiB free in %s, of which %d MiB "
                "are reserved for results still to be written; below the floor of %d MiB. Free "
                "disk space or lower min_free_bytes",
                stats.number,
                rq_sop,
                free // 2**20,
                self.spool.root,
                reserved // 2**20,
                floor // 2**20,
            )
            return STATUS_OUT_OF_RESOURCES

        data = event.encoded_dataset()
        try:
            ds = pydicom.dcmread(io.BytesIO(data), force=True)
            sop = str(ds.get("SOPInstanceUID", "") or "").strip()
            sop_class = str(ds.get("SOPClassUID", "") or "").strip()
            study = str(ds.get("StudyInstanceUID", "") or "").strip()
            series = str(ds.get("SeriesInstanceUID", "") or "").strip()
        except Exception as exc:
            logger.warning(
                "association %d: instance %s refused (0xC210): the data set cannot be parsed (%s)",
                stats.number,
                rq_sop,
                type(exc).__name__,
            )
            return STATUS_CANNOT_UNDERSTAND
        if not sop or not sop_class:
            logger.warning(
                "association %d: instance %s refused (0xC210): no SOP Instance/Class "
                "UID in the data set",
                stats.number,
                rq_sop,
            )
            return STATUS_CANNOT_UNDERSTAND
        try:
            cut = incomplete(ds)
        except Exception as exc:
            cut = type(exc).__name__
        if cut:
            logger.warning(
                "association %d: instance %s refused (0xC210): the data set is incomplete (%s); "
                "the sender should send it again",
                stats.number,
                rq_sop,
                cut,
            )
            return STATUS_CANNOT_UNDERSTAND
        if (rq_sop and sop != rq_sop) or (rq_class and sop_class != rq_class):
            logger.warning(
                "association %d: instance %s refused (0xA900): the data set's SOP Class/Instance "
                "UID (%s / %s) differs from the C-STORE request's (%s / %s)",
                stats.number,
                rq_sop,
                sop_class,
                sop,
                rq_class,
                rq_sop,
            )
            return STATUS_MISMATCH

        try:
            return self._record(ds, data, sop, sop_class, study, series, stats)
        except STORE_ERRORS as exc:
            logger.error(
                "association %d: instance %s refused (0xA700): the job store cannot be written "
                "(%s)",
                stats.number,
                sop,
                exc,
            )
            return STATUS_OUT_OF_RESOURCES

    def _record(
        self,
        ds: Dataset,
        data: bytes,
        sop: str,
        sop_class: str,
        study: str,
        series: str,
        stats: _AssocStats,
    ) -> int:
        """Drop duplicates, record skipped objects, spool and queue candidates."""
        seen = self.store.seen(sop)
        if seen == "duplicate":
            stats.duplicates += 1
            logger.info(
                "association %d: instance %s already received; acknowledged, not processed again",
                stats.number,
                sop,
            )
            return STATUS_SUCCESS

        verdict = _triage_safely(ds, self.config.own_marker)
        if seen == "own_result":
            verdict = Verdict(False, "own_result", "one of our own results")
        if verdict.candidate:
            c = self.config
            try:
                big = too_large(ds, c.maximum_image_pixels, c.maximum_image_bytes)
            except (ValueError, TypeError) as exc:
                verdict, big = Verdict(False, "unreadable_header", type(exc).__name__), None
            if big:
                logger.warning(
                    "association %d: instance %s refused (0xA701 too_large): %s; nothing was "
                    "decoded. Send a smaller export or raise maximum_image_pixels/_bytes",
                    stats.number,
                    sop,
                    big,
                )
                return STATUS_TOO_LARGE
        calling = stats.calling_ae
        if not verdict.candidate or not study:
            reason = verdict.reason or "no_study_uid"
            self.store.add_instance(
                sop,
                study,
                series_instance_uid=series,
                sop_class_uid=sop_class,
                calling_ae=calling,
                state="skipped",
                reason=reason,
            )
            stats.skipped += 1
            logger.info(
                "association %d: instance %s (study %s) skipped: %s (%s)",
                stats.number,
                sop,
                study or "none",
                reason,
                verdict.detail,
            )
            return STATUS_SUCCESS

        reserve = result_reserve(ds)
        free, reserved = self._free_space()
        if free - reserved - len(data) - reserve < self.config.min_free_bytes:
            logger.error(
                "association %d: instance %s refused (0xA700): %d MiB free in %s; keeping it "
                "(%d MiB) and its results (%d MiB) next to the %d MiB reserved for earlier results "
                "would go below the floor of %d MiB. Free disk space or lower min_free_bytes",
                stats.number,
                sop,
                free // 2**20,
                self.spool.root,
                len(data) // 2**20,
                reserve // 2**20,
                reserved // 2**20,
                self.config.min_free_bytes // 2**20,
            )
            return STATUS_OUT_OF_RESOURCES
        try:
            path = self.spool.write(study, sop, data)
        except OSError as exc:
            logger.error(
                "association %d: instance %s refused (0xA700): cannot write the spool (%s)",
                stats.number,
                sop,
                exc.strerror or type(exc).__name__,
            )
            return STATUS_OUT_OF_RESOURCES
        try:
            added = self.store.add_instance(
                sop,
                study,
                series_instance_uid=series,
                sop_class_uid=sop_class,
                calling_ae=calling,
                state="received",
                path=path,
                reserve_bytes=reserve,
            )
        except Exception as exc:
            self.spool.remove(path)
            logger.error(
                "association %d: instance %s refused (0xA700): the job store cannot "
                "be written (%s)",
                stats.number,
                sop,
                exc,
            )
            return STATUS_OUT_OF_RESOURCES
        if not added:  # the same instance arrived on a parallel association
            stats.duplicates += 1
            return STATUS_SUCCESS
        stats.queued += 1
        logger.info(
            "association %d: instance %s of study %s queued (%s)",
            stats.number,
            sop,
            study,
            verdict.detail,
        )
        return STATUS_SUCCESS


def _triage_safely(ds: Dataset, own_marker: str) -> Verdict:
    """:func:`triage`, treating an unreadable header value as a non-candidate."""
    try:
        return triage(ds, own_marker)
    except Exception as exc:
        return Verdict(False, "unreadable_header", type(exc).__name__)
