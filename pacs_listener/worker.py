"""The inference worker: a separate process that turns grouped jobs into SR + SC result files.

:func:`worker_main` runs in a process started with the ``spawn`` method by
:class:`~pacs_listener.service.Service`. It is the only place torch enters the service: it loads
the model once (:class:`dicom_covid.inference.Predictor` and, for the heat map,
:class:`dicom_covid.explain.Explainer`), then claims grouped jobs from the SQLite store and, for
each candidate image, runs :func:`dicom_covid.results.analyse`, writes the SR and the SC
atomically under ``results/<job>/<SOPInstanceUID>/`` and records them (one SR and one SC per
image, enforced by the store) with a pending delivery per target. An image that cannot be
analysed is marked failed with its reason (``InputRejected.reason`` and message) and the job goes
on; the listener is never blocked because it runs in another process.

Results are written only while the results folder keeps ``results_min_free_bytes`` free after
them. When it does not, or a write fails because the disk is full (``ENOSPC``, ``EDQUOT``,
SQLite's "disk is full"), the job is put aside as ``waiting_for_disk`` and claimed again after
an exponential backoff, by itself: acknowledged images are never failed for lack of space.

Importing this module does not import torch; :class:`JobProcessor` does, when built.
"""

from __future__ import annotations

import io
import logging
import logging.handlers
import os
import signal
import sqlite3
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pydicom

from dicom_covid.config import ReaderConfig
from dicom_covid.errors import DicomCovidError, InputRejected, ResultEncodingError
from dicom_covid.reader import check_image_size

from .config import ServiceConfig
from .jobs import Instance, Job, JobStore, ResultFile
from .logguard import keep_template
from .spool import atomic_write, ensure_private_dir, free_bytes, is_disk_full, safe_name

__all__ = ["JobProcessor", "load_analysis", "worker_main"]

logger = logging.getLogger(__name__)

#: Header attributes whose values are scrubbed from error messages before they are logged.
_IDENTIFYING = (
    "PatientName",
    "PatientID",
    "OtherPatientIDs",
    "PatientBirthDate",
    "IssuerOfPatientID",
    "AccessionNumber",
    "ReferringPhysicianName",
    "InstitutionName",
    "OperatorsName",
    "PerformingPhysicianName",
)


def scrub(text: str, ds: pydicom.Dataset | None) -> str:
    """Remove the identifying values of ``ds`` from ``text`` (for error messages we log)."""
    if ds is None:
        return text
    for keyword in _IDENTIFYING:
        try:
            value = ds.get(keyword)
        except Exception:
            continue
        values = value if isinstance(value, list | tuple | pydicom.multival.MultiValue) else [value]
        for v in values:
            s = str(v or "").strip()
            if len(s) >= 2:
                text = text.replace(s, "***")
                if "^" in s:
                    for part in s.split("^"):
                        if len(part) >= 3:
                            text = text.replace(part, "***")
    return text


def load_analysis(
    bundle: Path | None,
    model: str | None,
    device: str = "cpu",
    explain: bool = True,
    abstention: Mapping[str, Any] | None = None,
) -> Callable[[pydicom.Dataset], Any]:
    """Load the model once and return ``analyse(dataset) -> ResultSet``.

    ``abstention`` holds the site's overrides of the model's abstention policy (see
    :class:`dicom_covid.abstention.AbstentionPolicy`).

    Raises
    ------
    BundleError
        When the bundle or model cannot be loaded.
    """
    from dicom_covid.inference import Predictor
    from dicom_covid.results import analyse

    predictor = Predictor(bundle, model, device=device, abstention=abstention)
    explainer = None
    if explain:
        from dicom_covid.explain import Explainer

        explainer = Explainer(predictor)

    def run(ds: pydicom.Dataset) -> Any:
        return analyse(ds, predictor, explainer)

    run.model_name = predictor.facts.name  # type: ignore[attr-defined]
    run.bundle_version = predictor.bundle.version  # type: ignore[attr-defined]
    return run


#: Space assumed for an image's results when its record has no estimate (1 MiB SR + SC margin).
_MIN_RESERVE = 2**20


class NoDiskSpace(Exception):
    """Results cannot be written now for lack of disk space (the job waits, it does not fail)."""


#: Character set that unknown Specific Character Set terms fall back to: ISO 8859-1 decodes
#: every byte, so no value is lost (only letters outside ASCII may show wrongly).
FALLBACK_CHARSET = "ISO_IR 100"


def safe_charset(ds: pydicom.Dataset) -> str | None:
    """Replace a Specific Character Set that pydicom does not know by :data:`FALLBACK_CHARSET`.

    Must run before text values are read (pydicom decodes them on first access).

    Returns
    -------
    str or None
        The note for the SR when the character set was replaced, else None.
    """
    from pydicom.charset import python_encoding

    try:
        value = ds.get("SpecificCharacterSet")
    except Exception:
        value = None
    if value is None:
        return None
    terms = [
        str(t).strip()
        for t in (
            value if isinstance(value, list | tuple | pydicom.multival.MultiValue) else [value]
        )
    ]
    unknown = [t for t in terms if t and t not in python_encoding]
    if not unknown:
        return None
    ds.SpecificCharacterSet = FALLBACK_CHARSET
    given = "\\".join(terms)
    return (
        f"The source image's Specific Character Set '{given}' is not a known "
        f"DICOM character set ({', '.join(unknown)}); its text was read as ISO 8859-1 "
        f"(Latin-1, {FALLBACK_CHARSET}) and is written so: letters outside ASCII in names "
        "may differ from the source."
    )


def add_note(sr: pydicom.Dataset, note: str) -> None:
    """Append a TEXT "Comment" to the SR's Qualitative Evaluations (TID 1500), next to the
    research-use disclaimer."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    item = hd.sr.TextContentItem(
        name=hd.sr.CodedConcept.from_code(codes.DCM.Comment),
        value=note[:1024],
        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
    )
    for container in sr.ContentSequence:
        if container.ValueType == "CONTAINER" and any(
            child.ValueType == "TEXT" for child in container.get("ContentSequence", [])
        ):
            container.ContentSequence.append(item)
            return
    sr.ContentSequence.append(item)


def _encode(ds: pydicom.Dataset) -> bytes:
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


class JobProcessor:
    """Processes claimed jobs with an already loaded analysis function.

    Parameters
    ----------
    store : JobStore
        The job store (this process's own connection).
    results_dir : pathlib.Path
        Folder for result files (mode 0700).
    targets : sequence of str
        Delivery target keys every result is queued for.
    analyse : callable
        ``analyse(dataset) -> ResultSet`` with ``prediction``, ``sr`` and ``sc``.
    limits : ReaderConfig, optional
        ``max_pixels`` and ``max_decoded_bytes`` checked from the header before an image is
        decoded (default: the reader's defaults); a larger image fails as ``too_large``.
    min_free_bytes : int
        Free space the results folder must keep after an image's results (default 0).
    disk_retry : tuple of float
        ``(base, max)`` seconds of the backoff of a job waiting for disk space.
    kos_for_suspected : bool
        Also write a Key Object Selection (kind ``"ko"``, :func:`dicom_covid.results.kos.
        build_kos`) for each image whose outcome is "suspected" (default False).
    """

    def __init__(
        self,
        store: JobStore,
        results_dir: Path,
        targets: Sequence[str],
        analyse: Callable[[pydicom.Dataset], Any],
        limits: ReaderConfig | None = None,
        min_free_bytes: int = 0,
        disk_retry: tuple[float, float] = (5.0, 120.0),
        kos_for_suspected: bool = False,
    ) -> None:
        self.store = store
        self.results_dir = ensure_private_dir(Path(results_dir))
        self.targets = tuple(targets)
        self.analyse = analyse
        self.limits = limits or ReaderConfig()
        self.min_free_bytes = min_free_bytes
        self.disk_retry = disk_retry
        self.kos_for_suspected = kos_for_suspected

    def process(self, job: Job) -> str:
        """Analyse every grouped image of ``job``; return the job's new state."""
        t0 = time.monotonic()
        todo = self.store.job_instances(job.id, states=("grouped", "inferred"))
        logger.info(
            "job %d: study %s started (attempt %d, %d image(s))",
            job.id,
            job.study_instance_uid,
            job.attempts,
            len(todo),
        )
        ok = failed = 0
        try:
            for inst in todo:
                if self._process_image(job, inst):
                    ok += 1
                else:
                    failed += 1
        except NoDiskSpace as exc:
            return self.wait_for_disk(job, str(exc), ok)
        state = self.store.finish_job(job.id)
        reason = self.store.job(job.id).reason if state == "failed" else None
        logger.info(
            "job %d: study %s %s in %.2f s: %d image(s) analysed, %d failed%s",
            job.id,
            job.study_instance_uid,
            state,
            time.monotonic() - t0,
            ok,
            failed,
            f" ({reason})" if reason else "",
        )
        return state

    def wait_for_disk(self, job: Job, reason: str, done: int = 0) -> str:
        """Put ``job`` aside until disk space may be back; return ``"waiting_for_disk"``."""
        delay = self.store.wait_for_disk(job.id, f"waiting_for_disk: {reason}", *self.disk_retry)
        logger.warning(
            "job %d: study %s waits for disk space (%s); %d image(s) written so far; it "
            "resumes by itself in %.0f s",
            job.id,
            job.study_instance_uid,
            reason,
            done,
            delay,
        )
        return "waiting_for_disk"

    def _check_space(self, inst: Instance) -> None:
        need = max(inst.reserve_bytes, _MIN_RESERVE)
        try:
            free = free_bytes(self.results_dir)
        except OSError:
            free = 0
        if free - need < self.min_free_bytes:
            raise NoDiskSpace(
                f"{free // 2**20} MiB free in {self.results_dir}; the results need about "
                f"{need // 2**20 or 1} MiB above the floor of {self.min_free_bytes // 2**20} MiB"
            )

    def _process_image(self, job: Job, inst: Instance) -> bool:
        t0 = time.monotonic()
        sop = inst.sop_instance_uid
        ds = None
        try:
            if inst.path is None or not inst.path.is_file():
                raise FileNotFoundError(f"spooled file of {sop} is missing")
            self._check_space(inst)
            ds = pydicom.dcmread(inst.path)
            check_image_size(ds, self.limits, sop)  # before anything is decoded
            note = safe_charset(ds)
            result = self.analyse(ds)
            if note:
                add_note(result.sr, note)
                logger.warning("job %d: image %s: %s Noted in the SR.", job.id, sop, note)
            self.store.set_instance_state(sop, "inferred")
            files = []
            folder = ensure_private_dir(self.results_dir / str(job.id) / safe_name(sop))
            objects = {"sr": result.sr, "sc": result.sc}
            if self.kos_for_suspected and result.prediction.outcome == "suspected":
                from dicom_covid.results.kos import build_kos

                objects["ko"] = build_kos(ds, result.prediction)
            for kind, obj in objects.items():
                path = atomic_write(folder / f"{kind}.dcm", _encode(obj))
                files.append(
                    ResultFile(kind, str(obj.SOPInstanceUID), str(obj.StudyInstanceUID), path)
                )
            self.store.record_results(
                job.id, sop, files, self.targets, outcome=result.prediction.outcome
            )
        except NoDiskSpace:
            raise
        except InputRejected as exc:
            return self._fail(job, sop, f"{exc.reason}: {scrub(exc.message, ds)}")
        except ResultEncodingError as exc:
            return self._fail(job, sop, f"result_encoding: {scrub(str(exc), ds)}")
        except FileNotFoundError as exc:
            return self._fail(job, sop, f"spool_missing: {exc}")
        except (OSError, sqlite3.Error) as exc:
            if is_disk_full(exc):
                raise NoDiskSpace(
                    f"writing the results of image {sop} failed: {type(exc).__name__}: "
                    f"{getattr(exc, 'strerror', None) or exc}"
                ) from exc
            message = scrub(f"{type(exc).__name__}: {exc}", ds)
            logger.error("job %d: image %s: unexpected error: %s", job.id, sop, message)
            return self._fail(job, sop, f"internal_error: {message}")
        except DicomCovidError as exc:
            return self._fail(job, sop, f"{type(exc).__name__}: {scrub(str(exc), ds)}")
        except Exception as exc:
            message = scrub(f"{type(exc).__name__}: {exc}", ds)
            logger.error("job %d: image %s: unexpected error: %s", job.id, sop, message)
            return self._fail(job, sop, f"internal_error: {message}")
        p = result.prediction
        logger.info(
            "job %d: image %s analysed in %.2f s: %s (P(covid)=%.3f, threshold %.3f); SR %s, SC %s",
            job.id,
            sop,
            time.monotonic() - t0,
            p.decision,
            p.covid_score,
            p.covid_threshold,
            files[0].sop_instance_uid,
            files[1].sop_instance_uid,
        )
        return True

    def _fail(self, job: Job, sop: str, reason: str) -> bool:
        reason = reason[:1000]
        self.store.set_instance_state(sop, "failed", reason)
        logger.warning("job %d: image %s failed: %s", job.id, sop, reason)
        return False


def _child_logging(log_queue: Any, level: int) -> None:
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    if log_queue is not None:
        handler = logging.handlers.QueueHandler(log_queue)
        handler.addFilter(keep_template)  # rate limiting in the service sees the template
        root.addHandler(handler)
    root.setLevel(level)


def worker_main(
    config: ServiceConfig,
    stop_event: Any,
    status_queue: Any,
    log_queue: Any = None,
    log_level: int = logging.INFO,
) -> None:
    """Entry point of the worker process.

    Parameters
    ----------
    config : ServiceConfig
        Service configuration (state folder, targets, model).
    stop_event : multiprocessing.Event
        Set by the service to stop after the current image's job.
    status_queue : multiprocessing.Queue
        Receives ``("ready", model_name)`` once the model is loaded, or ``("error", message)``.
    log_queue : multiprocessing.Queue, optional
        Log records are sent here for the service process to handle.
    log_level : int
        Level of this process's root logger.
    """
    _child_logging(log_queue, log_level)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the service decides when we stop
    signal.signal(signal.SIGTERM, lambda *_: stop_event.set())
    from pydicom import config as pydicom_config

    pydicom_config.settings.reading_validation_mode = pydicom_config.IGNORE
    name = f"worker-{os.getpid()}"
    wc = config.worker
    try:
        t0 = time.monotonic()
        analyse = load_analysis(wc.bundle, wc.model, wc.device, wc.explain, wc.abstention)
    except DicomCovidError as exc:
        logger.error("%s: the model cannot be loaded: %s", name, exc)
        status_queue.put(("error", str(exc)))
        return
    except Exception as exc:
        logger.exception("%s: the model cannot be loaded", name)
        status_queue.put(("error", f"{type(exc).__name__}: {exc}"))
        return
    logger.info(
        "%s: model %s (bundle %s) loaded in %.1f s",
        name,
        analyse.model_name,
        analyse.bundle_version,
        time.monotonic() - t0,
    )
    status_queue.put(("ready", analyse.model_name))
    store = JobStore(config.db_path)
    limits = ReaderConfig(
        max_pixels=config.scp.maximum_image_pixels,
        max_decoded_bytes=config.scp.maximum_image_bytes,
    )
    processor = JobProcessor(
        store,
        config.results_dir,
        config.sender().targets(),
        analyse,
        limits,
        min_free_bytes=config.results_min_free_bytes,
        disk_retry=(wc.disk_retry_base, wc.disk_retry_max),
        kos_for_suspected=wc.kos_for_suspected,
    )
    unsettled: Job | None = None  # a job whose state could not be recorded (disk full)
    pause = 0.0
    try:
        while not stop_event.is_set():
            job = None
            try:
                if unsettled is not None:
                    processor.wait_for_disk(unsettled, "the job store could not be written")
                    unsettled = None
                job = store.claim_job(name, wc.max_job_attempts)
                if job is None:
                    stop_event.wait(wc.poll_interval)
                    continue
                processor.process(job)
                pause = 0.0
            except (OSError, sqlite3.Error) as exc:
                if not is_disk_full(exc):
                    raise  # a real fault: the service restarts the worker and counts it
                # the job store itself cannot be written: back off instead of retrying every
                # poll interval, and put the job aside as soon as that can be recorded
                unsettled = unsettled or job
                pause = min(60.0, max(1.0, pause * 2))
                logger.error(
                    "%s: the disk is full, the job store cannot be written (%s: %s); "
                    "trying again in %.0f s",
                    name,
                    type(exc).__name__,
                    exc,
                    pause,
                )
                stop_event.wait(pause)
    finally:
        store.close()
        logger.info("%s: stopped", name)
