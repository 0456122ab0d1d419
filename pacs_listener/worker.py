"""The inference worker: a separate process that turns grouped jobs into SR + SC result files.

:func:`worker_main` runs in a process started with the ``spawn`` method by
:class:`~pacs_listener.service.Service`. It is the only place torch enters the service: it loads
the model once (:class:`dicom_covid.inference.Predictor` and, for the heat map,
:class:`dicom_covid.explain.Explainer`), then claims grouped jobs from the job store and, for
each candidate image, runs :func:`dicom_covid.results.analyse`, writes the SR and the SC
atomically under ``results/<job>/<SOPInstanceUID>/`` and records them (one SR and one SC per
image, enforced by the store) with a pending delivery per target. An image that cannot be
analysed is marked failed with its reason (``InputRejected.reason`` and message) and the job goes
on; the listener is never blocked because it runs in another process.

Results are written only while the results folder keeps ``results_min_free_bytes`` free after
them. When it does not, or a write fails because the disk is full (``ENOSPC``, ``EDQUOT``,
SQLite's "disk is full", PostgreSQL's ``disk_full``), the job is put aside as
``waiting_for_disk`` and claimed again after an exponential backoff, by itself: acknowledged
images are never failed for lack of space.

Importing this module does not import torch; :class:`JobProcessor` does, when built.
"""

from __future__ import annotations

import io
import logging
import logging.handlers
import os
import signal
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom

from dicom_covid.config import ReaderConfig
from dicom_covid.errors import DicomCovidError, InputRejected, ResultEncodingError
from dicom_covid.reader import check_image_size

from .config import ServiceConfig
from .jobs import Instance, Job, JobStore, LeaseLost, ResultFile
from .logguard import keep_template
from .spool import atomic_write, ensure_private_dir, free_bytes, is_disk_full, safe_name
from .store import STORE_ERRORS

__all__ = [
    "Analysis",
    "JobProcessor",
    "load_analysis",
    "torch_threads",
    "worker_main",
    "worker_name",
]

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


class Analysis:
    """The loaded model: ``analysis(dataset)`` for one image, :meth:`batch` for several.

    Built by :func:`load_analysis`; holds the predictor and its Grad-CAM explainer.

    Attributes
    ----------
    model_name : str
        The model's name in the bundle.
    bundle_version : str
        The bundle's version.
    """

    def __init__(self, predictor: Any, explainer: Any = None) -> None:
        self.predictor = predictor
        self.explainer = explainer
        self.model_name: str = predictor.facts.name
        self.bundle_version: str = predictor.bundle.version

    def __call__(self, ds: pydicom.Dataset) -> Any:
        """Results of one image (:func:`dicom_covid.results.analyse`); raises on failure."""
        from dicom_covid.results import analyse

        return analyse(ds, self.predictor, self.explainer)

    def batch(self, datasets: Sequence[pydicom.Dataset]) -> list[Any]:
        """Results of several images from one batched forward pass, or each one's exception
        (:func:`dicom_covid.results.analyse_batch`)."""
        from dicom_covid.results import analyse_batch

        return analyse_batch(datasets, self.predictor, self.explainer, max(1, len(datasets)))


def load_analysis(
    bundle: Path | None,
    model: str | None,
    device: str = "cpu",
    explain: bool = True,
    abstention: Mapping[str, Any] | None = None,
) -> Analysis:
    """Load the model once and return the :class:`Analysis` that runs it.

    ``abstention`` holds the site's overrides of the model's abstention policy (see
    :class:`dicom_covid.abstention.AbstentionPolicy`).

    Raises
    ------
    BundleError
        When the bundle or model cannot be loaded.
    """
    from dicom_covid.inference import Predictor

    predictor = Predictor(bundle, model, device=device, abstention=abstention)
    explainer = None
    if explain:
        from dicom_covid.explain import Explainer

        explainer = Explainer(predictor)
    return Analysis(predictor, explainer)


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
    worker : str, optional
        The name the jobs were claimed under: results are recorded only while this worker
        still holds the job (a job whose lease expired and was taken over is left to its new
        owner). Default None: no check (a single process owns the store).
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
        worker: str | None = None,
    ) -> None:
        self.worker = worker
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
        return self.process_batch([job])[job.id]

    def process_batch(self, jobs: Sequence[Job]) -> dict[int, str]:
        """Analyse every grouped image of ``jobs`` in one batched forward pass.

        Each image is read and checked on its own; those that pass go through the network
        together (``analyse.batch`` when the analysis has it, else one by one); each result is
        written and recorded on its own. A failing image fails only itself; a job that runs out
        of disk space waits (:meth:`wait_for_disk`) without holding up the others.

        Returns
        -------
        dict
            Job id to the job's new state.
        """
        t0 = time.monotonic()
        work: list[_Item] = []
        for job in jobs:
            todo = self.store.job_instances(job.id, states=("grouped", "inferred"))
            logger.info(
                "job %d: study %s started (attempt %d, %d image(s))",
                job.id,
                job.study_instance_uid,
                job.attempts,
                len(todo),
            )
            work += [_Item(job, inst) for inst in todo]
        waiting: dict[int, str] = {}  # job id -> why it waits for disk space
        for item in work:
            self._read(item, waiting)
        ready = [item for item in work if item.ds is not None and item.job.id not in waiting]
        if ready:
            for item, result in zip(ready, self._analyse([i.ds for i in ready]), strict=True):
                if isinstance(result, Exception):
                    self._fail_item(item, result)
                elif item.job.id not in waiting:
                    self._write(item, result, waiting)
        states: dict[int, str] = {}
        for job in jobs:
            mine = [item for item in work if item.job.id == job.id]
            ok = sum(item.ok for item in mine)
            if job.id in waiting:
                states[job.id] = self.wait_for_disk(job, waiting[job.id], ok)
                continue
            try:
                if any(item.lost for item in mine):
                    raise LeaseLost(f"job {job.id}")
                state = self.store.finish_job(job.id, worker=self.worker)
            except LeaseLost:
                logger.warning(
                    "job %d: study %s was taken over by another worker after this one's lease "
                    "expired; its results are left to that worker",
                    job.id,
                    job.study_instance_uid,
                )
                states[job.id] = "lost"
                continue
            reason = self.store.job(job.id).reason if state == "failed" else None
            logger.info(
                "job %d: study %s %s in %.2f s: %d image(s) analysed, %d failed%s%s",
                job.id,
                job.study_instance_uid,
                state,
                time.monotonic() - t0,
                ok,
                len(mine) - ok,
                f" ({reason})" if reason else "",
                f" (batch of {len(ready)} image(s) from {len(jobs)} job(s))"
                if len(jobs) > 1
                else "",
            )
            states[job.id] = state
        return states

    def _analyse(self, datasets: list[pydicom.Dataset]) -> list[Any]:
        batch = getattr(self.analyse, "batch", None)
        if batch is not None:
            return list(batch(datasets))
        out: list[Any] = []
        for ds in datasets:
            try:
                out.append(self.analyse(ds))
            except Exception as exc:
                out.append(exc)
        return out

    def wait_for_disk(self, job: Job, reason: str, done: int = 0) -> str:
        """Put ``job`` aside until disk space may be back; return ``"waiting_for_disk"``."""
        self.store.release_wal()  # the job store's log may hold the space the results need
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

    def _read(self, item: _Item, waiting: dict[int, str]) -> None:
        """Read and check one spooled image (sets ``item.ds``), or fail it / let its job wait."""
        if item.job.id in waiting:
            return
        inst = item.inst
        try:
            if inst.path is None or not inst.path.is_file():
                raise FileNotFoundError(f"spooled file of {inst.sop_instance_uid} is missing")
            self._check_space(inst)
            ds = pydicom.dcmread(inst.path)
            item.ds = ds  # identifying values are scrubbed from messages from here on
            check_image_size(ds, self.limits, inst.sop_instance_uid)  # before decoding
            item.note = safe_charset(ds)
        except NoDiskSpace as exc:
            waiting[item.job.id] = str(exc)
            item.ds = None
        except Exception as exc:
            self._fail_item(item, exc)
            item.ds = None

    def _write(self, item: _Item, result: Any, waiting: dict[int, str]) -> None:
        """Write and record the result objects of one analysed image."""
        job, sop, ds = item.job, item.inst.sop_instance_uid, item.ds
        try:
            if item.note:
                add_note(result.sr, item.note)
                logger.warning("job %d: image %s: %s Noted in the SR.", job.id, sop, item.note)
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
                job.id,
                sop,
                files,
                self.targets,
                outcome=result.prediction.outcome,
                worker=self.worker,
            )
        except LeaseLost:
            item.lost = True  # the new owner writes its own results; ours were never recorded
            for f in files:
                f.path.unlink(missing_ok=True)
            return
        except Exception as exc:
            if isinstance(exc, (OSError, *STORE_ERRORS)) and is_disk_full(exc):
                waiting[job.id] = (
                    f"writing the results of image {sop} failed: {type(exc).__name__}: "
                    f"{getattr(exc, 'strerror', None) or exc}"
                )
            else:
                self._fail_item(item, exc)
            return
        item.ok = True
        p = result.prediction
        logger.info(
            "job %d: image %s analysed in %.2f s: %s (P(covid)=%.3f, threshold %.3f); SR %s, SC %s",
            job.id,
            sop,
            time.monotonic() - item.t0,
            p.decision,
            p.covid_score,
            p.covid_threshold,
            files[0].sop_instance_uid,
            files[1].sop_instance_uid,
        )

    def _fail_item(self, item: _Item, exc: Exception) -> None:
        """Mark one image failed with the reason ``exc`` stands for (identifiers scrubbed)."""
        ds = item.ds
        if isinstance(exc, InputRejected):
            reason = f"{exc.reason}: {scrub(exc.message, ds)}"
        elif isinstance(exc, ResultEncodingError):
            reason = f"result_encoding: {scrub(str(exc), ds)}"
        elif isinstance(exc, FileNotFoundError):
            reason = f"spool_missing: {exc}"
        elif isinstance(exc, DicomCovidError):
            reason = f"{type(exc).__name__}: {scrub(str(exc), ds)}"
        else:
            message = scrub(f"{type(exc).__name__}: {exc}", ds)
            logger.error(
                "job %d: image %s: unexpected error: %s",
                item.job.id,
                item.inst.sop_instance_uid,
                message,
            )
            reason = f"internal_error: {message}"
        self._fail(item.job, item.inst.sop_instance_uid, reason)

    def _fail(self, job: Job, sop: str, reason: str) -> bool:
        reason = reason[:1000]
        self.store.set_instance_state(sop, "failed", reason)
        logger.warning("job %d: image %s failed: %s", job.id, sop, reason)
        return False


@dataclass(eq=False)
class _Item:
    """One image of a batch on its way through :meth:`JobProcessor.process_batch`."""

    job: Job
    inst: Instance
    ds: pydicom.Dataset | None = None
    note: str | None = None
    ok: bool = False
    lost: bool = False
    t0: float = field(default_factory=time.monotonic)


def _child_logging(log_queue: Any, level: int) -> None:
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    if log_queue is not None:
        handler = logging.handlers.QueueHandler(log_queue)
        handler.addFilter(keep_template)  # rate limiting in the service sees the template
        root.addHandler(handler)
    root.setLevel(level)
    # highdicom logs each module it copies at INFO (eight lines per result object): our own
    # per-image line says what happened; keep its warnings
    logging.getLogger("highdicom").setLevel(max(level, logging.WARNING))


def worker_name(node: str, pid: int) -> str:
    """The name a worker process claims jobs under (``claimed_by`` in the job store):
    ``<node>/worker-<pid>``, so a restarting node can release its own claims."""
    return f"{node}/worker-{pid}"


def _renew_leases(store: JobStore, name: str, stop: threading.Event) -> None:
    """Renew the worker's leases every third of the lease until ``stop`` is set (a thread of
    the worker process, on its own connection: it keeps beating while a batch runs)."""
    while not stop.wait(store.lease / 3):
        try:
            store.renew_leases(name)
        except Exception as exc:  # the database is unreachable: the claims may lapse
            logger.warning("%s: renewing the job leases failed (%s)", name, type(exc).__name__)


def torch_threads(config: ServiceConfig) -> int:
    """Torch intra-op threads of one worker: ``[worker] threads``, else the CPU cores shared
    evenly among the worker processes (at least 1)."""
    wc = config.worker
    if wc.threads:
        return wc.threads
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, (cores or 1) // wc.workers)


def worker_main(
    config: ServiceConfig,
    stop_event: Any,
    status_queue: Any,
    log_queue: Any = None,
    log_level: int = logging.INFO,
    slot: int = 0,
) -> None:
    """Entry point of a worker process.

    Claims up to ``[worker] batch_size`` images across ready jobs (waiting at most
    ``batch_wait`` seconds for more to become ready when fewer are), analyses them in one
    batched pass and records the results; :class:`JobStore` claims are exclusive, so several
    worker processes share one store.

    Parameters
    ----------
    config : ServiceConfig
        Service configuration (state folder, targets, model).
    stop_event : multiprocessing.Event
        Set by the service to stop after the current batch.
    status_queue : multiprocessing.Queue
        Receives ``("ready", slot, model_name)`` once the model is loaded, or
        ``("error", slot, message)``.
    log_queue : multiprocessing.Queue, optional
        Log records are sent here for the service process to handle.
    log_level : int
        Level of this process's root logger.
    slot : int
        Which of the service's workers this is (0 to ``workers - 1``).
    """
    _child_logging(log_queue, log_level)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the service decides when we stop
    signal.signal(signal.SIGTERM, lambda *_: stop_event.set())
    from pydicom import config as pydicom_config

    pydicom_config.settings.reading_validation_mode = pydicom_config.IGNORE
    name = worker_name(config.node, os.getpid())
    wc = config.worker
    try:
        t0 = time.monotonic()
        import torch

        threads = torch_threads(config)
        torch.set_num_threads(threads)
        analysis = load_analysis(wc.bundle, wc.model, wc.device, wc.explain, wc.abstention)
    except DicomCovidError as exc:
        logger.error("%s: the model cannot be loaded: %s", name, exc)
        status_queue.put(("error", slot, str(exc)))
        return
    except Exception as exc:
        logger.exception("%s: the model cannot be loaded", name)
        status_queue.put(("error", slot, f"{type(exc).__name__}: {exc}"))
        return
    logger.info(
        "%s: model %s (bundle %s) loaded in %.1f s; %d torch thread(s), batches of up to %d "
        "image(s)",
        name,
        analysis.model_name,
        analysis.bundle_version,
        time.monotonic() - t0,
        threads,
        wc.batch_size,
    )
    status_queue.put(("ready", slot, analysis.model_name))
    store = JobStore(config.store_location, root=config.storage, lease=config.lease)
    leases_stop = threading.Event()
    threading.Thread(
        target=_renew_leases, args=(store, name, leases_stop), name="lease renewal", daemon=True
    ).start()
    limits = ReaderConfig(
        max_pixels=config.scp.maximum_image_pixels,
        max_decoded_bytes=config.scp.maximum_image_bytes,
    )
    processor = JobProcessor(
        store,
        config.results_dir,
        config.sender().targets(),
        analysis,
        limits,
        min_free_bytes=config.results_min_free_bytes,
        disk_retry=(wc.disk_retry_base, wc.disk_retry_max),
        kos_for_suspected=wc.kos_for_suspected,
        worker=name,
    )
    unsettled: list[Job] = []  # jobs whose state could not be recorded (disk full)
    pause = 0.0
    parent = os.getppid()
    try:
        while not stop_event.is_set():
            if os.getppid() != parent:  # the service died (kill -9): never outlive it
                logger.warning("%s: the service process is gone; stopping", name)
                break
            jobs: list[Job] = []
            try:
                while unsettled:
                    processor.wait_for_disk(unsettled[0], "the job store could not be written")
                    unsettled.pop(0)
                jobs = _claim_batch(store, name, wc, stop_event)
                if not jobs:
                    stop_event.wait(wc.poll_interval)
                    continue
                processor.process_batch(jobs)
                pause = 0.0
            except (OSError, *STORE_ERRORS) as exc:
                if not is_disk_full(exc):
                    raise  # a real fault: the service restarts the worker and counts it
                # the job store itself cannot be written: back off instead of retrying every
                # poll interval, and put the jobs aside as soon as that can be recorded
                unsettled = unsettled or jobs
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
        leases_stop.set()
        store.close()
        logger.info("%s: stopped", name)


def _claim_batch(store: JobStore, name: str, wc: Any, stop_event: Any) -> list[Job]:
    """Claim up to ``wc.batch_size`` images' jobs, waiting up to ``wc.batch_wait`` for more."""
    jobs = store.claim_jobs(name, wc.batch_size, wc.max_job_attempts)
    if not jobs or wc.batch_size <= 1 or wc.batch_wait <= 0:
        return jobs
    deadline = time.monotonic() + wc.batch_wait
    images = sum(j.images for j in jobs)  # counted by the claim itself
    while images < wc.batch_size and not stop_event.wait(min(0.02, wc.batch_wait)):
        more = store.claim_jobs(name, wc.batch_size - images, wc.max_job_attempts)
        images += sum(j.images for j in more)
        jobs += more
        if time.monotonic() >= deadline:
            break
    return jobs
