"""Delivery of results: C-STORE SCU to DICOM destinations, STOW-RS to DICOMweb servers, or a copy
into an output folder.

Each target (``AE@host:port``, ``stowrs:<url>`` or ``dir:<path>``) has its own thread, so a
destination that is down does not hold up the others. A thread takes the target's due
deliveries from the job store, sends them over one association (or in STOW-RS requests of at
most :data:`STOW_MAX_BYTES`), and marks each (result, target) delivered right after the
destination confirmed it; a failed try is rescheduled with exponential backoff
(:class:`RetryPolicy`) and dead-lettered after ``max_tries``. Results stay on disk until
delivered, so an outage or a restart loses nothing, and a restart does not resend what was
confirmed.
"""

from __future__ import annotations

import json
import logging
import ssl
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

import pydicom
import requests
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE

from dicom_covid.errors import DeliveryError

from .config import ConfigError, Destination, SenderConfig, StowDestination, TlsConfig
from .jobs import Delivery, JobStore
from .spool import atomic_copy, is_disk_full, safe_name

__all__ = [
    "STOW_MAX_BYTES",
    "Sender",
    "client_ssl_context",
    "proposed_transfer_syntaxes",
    "send_files",
    "stow_files",
]

logger = logging.getLogger(__name__)

#: C-STORE statuses that mean the destination has the instance (success and warnings).
_OK_STATUSES = {0x0000, 0xB000, 0xB006, 0xB007}


_DISK_FULL = "disk full:"

#: Largest body of one STOW-RS request in bytes (a single larger file still goes alone).
STOW_MAX_BYTES = 32 * 2**20
#: What an HTTP status of a STOW-RS server means for the operator (PS3.18 table 10.5.3-1).
_HTTP_HINTS = {
    400: "the server could not parse the request",
    404: "no STOW-RS resource at this URL; it usually ends in /studies (e.g. "
    "http://host:8042/dicom-web/studies)",
    405: "this URL does not accept POST; it usually ends in /studies",
    413: "the request is too large for the server",
    415: "the server does not accept application/dicom",
    503: "the server is busy or unavailable",
}


def client_ssl_context(tls: TlsConfig) -> ssl.SSLContext:
    """TLS context of the SCU: verifies the destination (against ``tls.ca`` when given) and
    presents our certificate for mutual TLS."""
    ctx = ssl.create_default_context(
        ssl.Purpose.SERVER_AUTH, cafile=str(tls.ca) if tls.ca else None
    )
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(tls.cert), str(tls.key))
    return ctx


def proposed_transfer_syntaxes(file_syntax: str) -> list[str]:
    """Transfer syntaxes proposed for a result file: its own, then Explicit and Implicit VR
    Little Endian (each once, in that order)."""
    out: list[str] = []
    for ts in (file_syntax, ExplicitVRLittleEndian, ImplicitVRLittleEndian):
        if str(ts) not in out:
            out.append(str(ts))
    return out


def send_files(
    paths: Sequence[Path],
    destination: Destination,
    config: SenderConfig,
    on_result: Callable[[int, str | None], None] | None = None,
) -> list[str | None]:
    """Send DICOM files to a destination over one association.

    Parameters
    ----------
    paths : sequence of pathlib.Path
        DICOM Part 10 files.
    destination : Destination
        The C-STORE SCP.
    config : SenderConfig
        Calling AE title, timeouts, TLS.
    on_result : callable, optional
        Called as ``on_result(index, error)`` right after the destination answered for file
        ``index`` (``error`` None when it confirmed it), before the next file is sent, so the
        caller can commit each confirmation at once.

    Returns
    -------
    list of (str or None)
        Per file: None when the destination confirmed it, else what went wrong.

    Raises
    ------
    DeliveryError
        When no association could be established (nothing was sent).
    """
    datasets = []
    errors: list[str | None] = []
    for p in paths:
        try:
            datasets.append(pydicom.dcmread(p))
            errors.append(None)
        except Exception as exc:  # the result file itself is unreadable
            datasets.append(None)
            errors.append(f"cannot read {p.name}: {type(exc).__name__}: {exc}")
    ae = AE(ae_title=config.ae_title)
    ae.acse_timeout = config.acse_timeout
    ae.dimse_timeout = config.dimse_timeout
    ae.network_timeout = config.network_timeout
    ae.connection_timeout = config.acse_timeout
    wanted: dict[str, list[str]] = {}
    for ds in datasets:
        if ds is None:
            continue
        syntaxes = wanted.setdefault(str(ds.SOPClassUID), [])
        for ts in proposed_transfer_syntaxes(str(ds.file_meta.TransferSyntaxUID)):
            if ts not in syntaxes:
                syntaxes.append(ts)
    for sop_class, syntaxes in wanted.items():
        ae.add_requested_context(sop_class, syntaxes)
    if not wanted:
        return errors
    tls_args = None
    if config.tls is not None:
        tls_args = (client_ssl_context(config.tls), destination.host)
    assoc = ae.associate(
        destination.host, destination.port, ae_title=destination.ae_title, tls_args=tls_args
    )
    if not assoc.is_established:
        what = (
            "rejected the association"
            if assoc.is_rejected
            else ("aborted the association" if assoc.is_aborted else "could not be reached")
        )
        raise DeliveryError(
            f"{destination} {what}; check that it is running and knows our AE title "
            f"{config.ae_title}"
        )
    try:
        for i, ds in enumerate(datasets):
            if ds is None:
                continue
            try:
                status = assoc.send_c_store(ds)
            except Exception as exc:
                errors[i] = f"{type(exc).__name__}: {exc}"
                continue
            code = int(getattr(status, "Status", -1)) if status else -1
            if code in _OK_STATUSES:
                errors[i] = None
            elif code == -1:
                errors[i] = "no response (association aborted or timed out)"
            else:
                errors[i] = f"C-STORE status 0x{code:04X}"
            if on_result is not None:
                on_result(i, errors[i])
            if not assoc.is_established:
                for j in range(i + 1, len(datasets)):
                    if datasets[j] is not None:
                        errors[j] = "association lost"
                break
    finally:
        if assoc.is_established:
            assoc.release()
    return errors


def _stow_auth(destination: StowDestination) -> dict[str, str]:
    """HTTP headers of the destination's credentials (read from their file now)."""
    import base64

    secret = destination.read_secret()
    if destination.auth == "basic":
        return {"Authorization": "Basic " + base64.b64encode(secret.encode()).decode("ascii")}
    if destination.auth == "bearer":
        return {"Authorization": f"Bearer {secret}"}
    return {}


def _uids_in(answer: dict, tag: str) -> dict[str, int | None]:
    """SOP Instance UIDs listed in a sequence of a STOW-RS answer, with their FailureReason."""
    out: dict[str, int | None] = {}
    for item in (answer.get(tag) or {}).get("Value") or []:
        uid = ((item.get("00081155") or {}).get("Value") or [None])[0]
        reason = ((item.get("00081197") or {}).get("Value") or [None])[0]
        if uid:
            out[str(uid)] = int(reason) if reason is not None else None
    return out


def _stow_request(
    parts: Sequence[tuple[str, bytes]], destination: StowDestination, session: requests.Session
) -> list[str | None]:
    """POST one multipart/related body; per part, None when the server stored it."""
    boundary = uuid.uuid4().hex
    body = bytearray()
    for _, data in parts:
        body += f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        body += data
        body += b"\r\n"
    body += f"--{boundary}--\r\n".encode()
    headers = {
        "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
        "Accept": "application/dicom+json",
        **_stow_auth(destination),
    }
    try:
        resp = session.post(
            destination.url,
            data=bytes(body),
            headers=headers,
            timeout=destination.timeout,
            verify=str(destination.ca) if destination.ca else True,
            allow_redirects=False,
        )
    except requests.exceptions.SSLError as exc:
        raise DeliveryError(
            f"{destination}: TLS failed ({exc.__class__.__name__}); check its certificate and "
            "the ca file"
        ) from exc
    except requests.exceptions.RequestException as exc:
        raise DeliveryError(
            f"{destination} could not be reached ({exc.__class__.__name__}); check that it is "
            "running"
        ) from exc
    code = resp.status_code
    if code in (401, 403):
        if destination.auth == "none":
            fix = "give a basic-auth file (user:password) or a bearer token file"
        else:
            which = destination.basic_auth_file or destination.token_file
            fix = f"check the {destination.auth} credentials in {which}"
        raise DeliveryError(
            f"{destination} refused our credentials (HTTP {code} {resp.reason}); {fix}"
        )
    if code not in (200, 202, 409):
        hint = _HTTP_HINTS.get(code, "unexpected answer")
        raise DeliveryError(f"{destination} answered HTTP {code} {resp.reason}: {hint}")
    try:
        answer = json.loads(resp.content) if resp.content else {}
        if isinstance(answer, list):  # some servers wrap the data set in a list
            answer = answer[0] if answer else {}
    except ValueError:
        answer = {}
    stored = _uids_in(answer, "00081199")
    failed = _uids_in(answer, "00081198")
    errors: list[str | None] = []
    for uid, _ in parts:
        if uid in failed:
            reason = failed[uid]
            errors.append(
                f"{destination} did not store it (HTTP {code}, failure reason "
                + (f"0x{reason:04X})" if reason is not None else "not given)")
            )
        elif uid in stored or (code == 200 and not stored and not failed):
            errors.append(None)  # 200 means every instance was stored (PS3.18 10.5.3)
        else:
            errors.append(f"{destination} did not confirm it (HTTP {code})")
    return errors


def stow_files(
    paths: Sequence[Path],
    destination: StowDestination,
    on_result: Callable[[int, str | None], None] | None = None,
    max_bytes: int = STOW_MAX_BYTES,
) -> list[str | None]:
    """Send DICOM files to a DICOMweb server with STOW-RS (PS3.18 section 10.5).

    The files go in ``multipart/related; type="application/dicom"`` POST requests of at most
    ``max_bytes`` each (a larger single file goes alone). An instance counts as delivered when
    the answer lists it in its Referenced SOP Sequence (or, for HTTP 200 without a list, when
    the server stored everything).

    Parameters
    ----------
    paths : sequence of pathlib.Path
        DICOM Part 10 files.
    destination : StowDestination
        The STOW-RS resource and its credentials.
    on_result : callable, optional
        Called as ``on_result(index, error)`` for each file as soon as its request was answered,
        so the caller can commit each confirmation at once.
    max_bytes : int
        Largest body of one request (default :data:`STOW_MAX_BYTES`).

    Returns
    -------
    list of (str or None)
        Per file: None when the server stored it, else what went wrong.

    Raises
    ------
    DeliveryError
        When the server cannot be reached, refuses the credentials (HTTP 401/403) or answers
        with an error status; files answered before stay settled through ``on_result``.
    """
    errors: list[str | None] = [None] * len(paths)
    batches: list[list[tuple[int, str, bytes]]] = [[]]
    size = 0
    for i, p in enumerate(paths):
        try:
            data = Path(p).read_bytes()
            uid = str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID)
        except Exception as exc:  # the result file itself is unreadable
            errors[i] = f"cannot read {Path(p).name}: {type(exc).__name__}: {exc}"
            if on_result is not None:
                on_result(i, errors[i])
            continue
        if batches[-1] and size + len(data) > max_bytes:
            batches.append([])
            size = 0
        batches[-1].append((i, uid, data))
        size += len(data)
    try:
        with requests.Session() as session:
            session.trust_env = False  # no proxy or netrc from the environment
            for batch in batches:
                if not batch:
                    continue
                answers = _stow_request([(u, d) for _, u, d in batch], destination, session)
                for (i, _, _), error in zip(batch, answers, strict=True):
                    errors[i] = error
                    if on_result is not None:
                        on_result(i, error)
    except ConfigError as exc:  # the credentials file went away
        raise DeliveryError(str(exc)) from exc
    return errors


class Sender:
    """Delivers due results to every configured target until stopped.

    Parameters
    ----------
    store : JobStore
        The job store.
    config : SenderConfig
        Targets, retry policy, TLS.
    on_job_delivered : callable, optional
        Called with a job id when every result of the job has been delivered everywhere.
    batch_size : int
        Results sent over one association (default 50).
    """

    def __init__(
        self,
        store: JobStore,
        config: SenderConfig,
        on_job_delivered: Callable[[int], None] | None = None,
        batch_size: int = 50,
    ) -> None:
        self.store = store
        self.config = config
        self.on_job_delivered = on_job_delivered
        self.batch_size = batch_size
        self._stop = threading.Event()
        self._wake = {t: threading.Event() for t in config.targets()}
        self._threads: list[threading.Thread] = []
        self._destinations = {str(d): d for d in config.destinations}
        self._stowrs = {str(d): d for d in config.stowrs}

    @property
    def targets(self) -> tuple[str, ...]:
        """Target keys served."""
        return self.config.targets()

    def start(self) -> None:
        """Start one delivery thread per target."""
        for target in self.targets:
            t = threading.Thread(
                target=self._loop, args=(target,), name=f"sender {target}", daemon=True
            )
            t.start()
            self._threads.append(t)
        logger.info("delivering results to %s", ", ".join(self.targets) or "nowhere")

    def wake(self) -> None:
        """Look for due deliveries now (called when new results were written)."""
        for event in self._wake.values():
            event.set()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the threads after their current association."""
        self._stop.set()
        self.wake()
        for t in self._threads:
            t.join(timeout)
        self._threads.clear()

    def _loop(self, target: str) -> None:
        failures = 0
        while not self._stop.is_set():
            try:
                n = self.deliver_due(target)
                failures = 0
            except Exception as exc:
                # e.g. the job store cannot be written on a full disk: back off up to 30 s
                failures += 1
                pause = min(30.0, self.config.poll_interval * 2.0**failures)
                logger.error(
                    "delivery to %s: unexpected error (%s: %s); trying again in %.1f s",
                    target,
                    type(exc).__name__,
                    exc,
                    pause,
                    exc_info=failures == 1,
                )
                self._wake[target].wait(pause)
                self._wake[target].clear()
                continue
            if n:
                continue
            due = self.store.next_due([target])
            wait = self.config.poll_interval
            if due is not None:
                wait = max(0.05, min(wait, due - time.time()))
            self._wake[target].wait(wait)
            self._wake[target].clear()

    def deliver_due(self, target: str, now: float | None = None) -> int:
        """Make one delivery pass to ``target``; return how many results were delivered."""
        due = self.store.due_deliveries([target], now=now, limit=self.batch_size)
        if not due:
            return 0
        delivered = 0
        settled: set[int] = set()

        def settle(i: int, error: str | None) -> None:
            nonlocal delivered
            settled.add(i)
            delivered += self._settle(due[i], target, error)

        if target.startswith("dir:"):
            for i, d in enumerate(due):
                error = self._copy(d, Path(target[4:]))
                if error is not None and error.startswith(_DISK_FULL):
                    delay = self.config.retry.delay(d.tries + 1)
                    self.store.delivery_postponed(d.result_id, target, error, delay)
                    logger.warning(
                        "job %d: %s %s not written to %s (%s); trying again in %.0f s, "
                        "not counted as a failed try",
                        d.job_id,
                        d.kind.upper(),
                        d.sop_instance_uid,
                        target,
                        error,
                        delay,
                    )
                    continue
                settle(i, error)
        elif target.startswith("stowrs:"):
            try:
                errors = stow_files([d.path for d in due], self._stowrs[target], on_result=settle)
            except DeliveryError as exc:
                errors = [str(exc)] * len(due)
            except Exception as exc:
                errors = [f"{type(exc).__name__}: {exc}"] * len(due)
            for i, error in enumerate(errors):
                if i not in settled:
                    settle(i, error)
        else:
            dest = self._destinations[target]
            # each confirmation is committed as soon as it arrives (not after the batch), so a
            # crash in the middle of an association re-sends at most the result in flight
            try:
                errors = send_files([d.path for d in due], dest, self.config, on_result=settle)
            except DeliveryError as exc:
                errors = [str(exc)] * len(due)
            except Exception as exc:  # network layer errors, TLS set-up, ...
                errors = [f"{type(exc).__name__}: {exc}"] * len(due)
            for i, error in enumerate(errors):
                if i not in settled:
                    settle(i, error)
        return delivered

    def _settle(self, d: Delivery, target: str, error: str | None) -> int:
        """Record the outcome of one delivery try; return 1 when it was delivered."""
        if error is None:
            state = self.store.delivery_succeeded(d.result_id, target)
            logger.info(
                "job %d: %s %s delivered to %s",
                d.job_id,
                d.kind.upper(),
                d.sop_instance_uid,
                target,
            )
            if state == "delivered":
                self._job_delivered(d.job_id)
        else:
            state = self.store.delivery_failed(d.result_id, target, error, self.config.retry)
            if state == "dead":
                logger.error(
                    "job %d: %s %s dead-lettered for %s after %d tries (%s); re-queue it "
                    "with 'dicom-covid retry --job %d' once the destination works",
                    d.job_id,
                    d.kind.upper(),
                    d.sop_instance_uid,
                    target,
                    d.tries + 1,
                    error,
                    d.job_id,
                )
            else:
                logger.warning(
                    "job %d: %s %s not delivered to %s (try %d: %s); retrying in %.1f s",
                    d.job_id,
                    d.kind.upper(),
                    d.sop_instance_uid,
                    target,
                    d.tries + 1,
                    error,
                    self.config.retry.delay(d.tries + 1),
                )
        return 0 if error else 1

    def _copy(self, d: Delivery, folder: Path) -> str | None:
        try:
            atomic_copy(
                d.path,
                folder / safe_name(d.study_instance_uid) / f"{safe_name(d.sop_instance_uid)}.dcm",
            )
        except OSError as exc:
            prefix = _DISK_FULL if is_disk_full(exc) else "cannot write to"
            return f"{prefix} {folder}: {exc.strerror or exc}"
        return None

    def _job_delivered(self, job_id: int) -> None:
        timings = self.store.job_timings(job_id)
        logger.info(
            "job %d: delivered (queued %s s, analysis %s s, delivery %s s)",
            job_id,
            timings.get("queued_s"),
            timings.get("analysis_s"),
            timings.get("delivery_s"),
        )
        if self.on_job_delivered is not None:
            try:
                self.on_job_delivered(job_id)
            except Exception:
                logger.exception("job %d: clean-up after delivery failed", job_id)
