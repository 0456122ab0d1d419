"""The PACS service: listener, study grouping, worker processes and sender, run together.

:class:`Service` owns the state folder and wires the parts::

    PACS ──C-STORE──► StorageSCP ──► spool/ + jobs.sqlite ◄── grouper (quiet period)
                                          │
                   worker process(es) ◄──┘ (claim batches of grouped jobs; torch lives only there)
                                          │ results/ + pending deliveries
                                          ▼
                                       Sender ──C-STORE──► destinations / output folder

On start it removes incomplete temporary files, puts jobs a previous run left ``running`` back
in the queue, and resumes pending deliveries. :meth:`Service.run` blocks until SIGINT/SIGTERM
(or :meth:`Service.stop`), then shuts down in order: stop listening, stop grouping, let the
workers finish their batches, let the sender finish its association.

``[worker] workers`` (``serve --workers N``) starts N worker processes on the same job store;
claims are exclusive, and when one worker dies only the jobs it claimed go back to the queue
(the others keep theirs) and it is restarted after a backoff.

Scale-out: with a PostgreSQL job store (``job_store``) and a storage root every node mounts
(``storage_root``), any number of nodes share the work, each running some of the roles
(``role``: ``listener``, ``worker``, ``sender``, or ``all``). Every node records a heartbeat in
the store; a claim carries a lease its worker renews, so the jobs of a node that dies are taken
over by another node once the lease expires; a restarting node frees its own claims at once.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import queue
import signal
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dicom_covid.errors import DicomCovidError

from .config import ServiceConfig
from .jobs import JobStore, StoreError
from .scp import StorageSCP
from .sender import Sender
from .spool import Spool, ensure_private_dir
from .store import STORE_ERRORS

__all__ = ["Service", "ServiceError"]

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class _WorkerSlot:
    """One of the service's worker processes and its restart state."""

    index: int
    process: Any = None
    ready: bool = False
    restarts: int = 0
    restart_at: float = 0.0


class ServiceError(DicomCovidError):
    """The service cannot start or had to stop (model not loadable, port in use, ...)."""


class Service:
    """Everything ``dicom-covid serve`` runs.

    Parameters
    ----------
    config : ServiceConfig
        The configuration.
    log_level : int, optional
        Level of the worker process's logging (default: the root logger's effective level).
    """

    def __init__(self, config: ServiceConfig, log_level: int | None = None) -> None:
        self.config = config
        self.log_level = (
            log_level if log_level is not None else logging.getLogger().getEffectiveLevel()
        )
        self.store: JobStore | None = None
        self.scp: StorageSCP | None = None
        self.sender: Sender | None = None
        self._ctx = multiprocessing.get_context("spawn")
        self._workers: list[_WorkerSlot] = []
        self._worker_stop: Any = None
        self._status: Any = None
        self._log_queue: Any = None
        self._threads: list[threading.Thread] = []
        self._stop = threading.Event()
        self._worker_ready = threading.Event()
        self._fatal: str | None = None
        self._restarts = 0
        self._saved_validation: int | None = None
        self.metrics: Any = None
        self.model_info: dict[str, str] = {}
        self._started_at = time.time()

    # -- life cycle --------------------------------------------------------------------------

    @property
    def address(self) -> tuple[str, int]:
        """Where the listener listens."""
        assert self.scp is not None
        return self.scp.address

    def _beat(self) -> None:
        """Record this node's heartbeat in the job store."""
        assert self.store is not None
        from dicom_covid import __version__

        self.store.heartbeat(
            self.config.node,
            host=socket.gethostname(),
            pid=os.getpid(),
            roles=",".join(self.config.roles),
            version=__version__,
            started_at=self._started_at,
        )

    def start(self, wait_ready: bool = False, timeout: float = 300.0) -> None:
        """Start every part; with ``wait_ready`` block until the worker has loaded the model.

        Raises
        ------
        ServiceError
            When the model is unusable, the port cannot be bound or the state folder cannot
            be written.
        """
        c = self.config
        roles = c.roles
        if "worker" in roles:
            self._check_model()
        from pydicom import config as pydicom_config

        self._saved_validation = pydicom_config.settings.reading_validation_mode
        pydicom_config.settings.reading_validation_mode = pydicom_config.IGNORE
        try:
            ensure_private_dir(Path(c.state_dir))
            ensure_private_dir(c.storage)
            self.store = JobStore(c.store_location, root=c.storage, lease=c.lease)
            spool = Spool(c.spool_dir)
            results = Spool(c.results_dir)
            if not self.store.shared:  # a shared folder may hold other nodes' files in flight
                spool.clean_temporary()
                results.clean_temporary()
        except (OSError, *STORE_ERRORS) as exc:
            where = c.state_dir if c.storage == Path(c.state_dir) else c.storage
            raise ServiceError(
                f"cannot use the state folder {where}: {exc}. Choose a writable folder "
                "with --state-dir (or --storage-root)."
            ) from exc
        except StoreError as exc:
            raise ServiceError(str(exc)) from exc
        # the last run stopped, not the job: free its claims at once (on a shared store only
        # this node's; the other nodes' stay theirs, or are taken over when their lease expires)
        self.store.release_running(count_attempt=False, node=c.node if self.store.shared else None)
        self._beat()
        logger.info(
            "node %s: job store %s, storage %s, role(s) %s",
            c.node,
            self.store.describe(),
            c.storage,
            ", ".join(roles),
        )
        if "sender" in roles:
            self._report_orphans()
        self._log_queue = self._ctx.Queue()
        self._start_thread(self._forward_logs, "log forwarder")
        if c.metrics_port is not None:
            self._start_metrics()
        if "listener" in roles:
            self.scp = StorageSCP(
                c.scp,
                self.store,
                spool,
                on_refused=self.metrics.count_refused if self.metrics is not None else None,
            )
            try:
                self.scp.start()
            except OSError as exc:
                self._shutdown_partial()
                raise ServiceError(
                    f"cannot listen on {c.scp.host}:{c.scp.port} ({exc.strerror or exc}); "
                    "choose another --port or stop the program using it."
                ) from exc
            self._start_thread(self._group_loop, "grouper")
        if "sender" in roles:
            self.sender = Sender(self.store, c.sender(), on_job_delivered=self._cleanup_job)
            self.sender.start()
        self._start_thread(self._heartbeat_loop, "heartbeat")
        if "worker" not in roles:
            self._worker_ready.set()  # nothing to load: ready as soon as it listens/sends
            logger.info("node %s: service running (role(s) %s)", c.node, ", ".join(roles))
            return
        self._worker_stop = self._ctx.Event()
        self._status = self._ctx.Queue()
        self._workers = [_WorkerSlot(i) for i in range(c.worker.workers)]
        for slot in self._workers:
            self._start_worker(slot)
        self._start_thread(self._monitor_loop, "worker monitor")
        if wait_ready:
            deadline = time.monotonic() + timeout
            while not self._worker_ready.is_set():
                if self._fatal:
                    self.stop()
                    raise ServiceError(self._fatal)
                if time.monotonic() > deadline:
                    self.stop()
                    raise ServiceError(f"the worker did not load the model within {timeout} s")
                self._worker_ready.wait(0.1)

    def _check_model(self) -> None:
        """Fail fast (before binding the port) when the bundle or model is unusable."""
        from dicom_covid.bundle import Bundle

        wc = self.config.worker
        try:
            bundle = Bundle(wc.bundle)
            facts = bundle.facts(wc.model)
        except DicomCovidError as exc:
            raise ServiceError(str(exc)) from exc
        self.model_info = {
            "name": facts.name,
            "title": facts.title,
            "kind": facts.kind,
            "members": "+".join(facts.members),
            "version": bundle.version,
            "covid_threshold": f"{facts.covid_threshold:.4f}",
        }

    def _start_metrics(self) -> None:
        from .metrics import MetricsServer, ServiceProbe

        c = self.config
        probe = ServiceProbe(alive=self._alive, model_loaded=self._worker_ready.is_set)
        probe.model_info = self.model_info
        self.metrics = MetricsServer(
            c.store_location, probe, c.metrics_host, c.metrics_port, root=c.storage
        )
        try:
            self.metrics.start()
        except OSError as exc:
            self.metrics = None
            self._shutdown_partial()
            raise ServiceError(
                f"cannot serve metrics on {c.metrics_host}:{c.metrics_port} "
                f"({exc.strerror or exc}); choose another --metrics-port or stop the program "
                "using it."
            ) from exc

    def _alive(self) -> tuple[bool, str]:
        """Liveness for ``/healthz``: ``(running, reason)``."""
        if self._fatal:
            return False, f"stopped: {self._fatal}"
        if self._stop.is_set():
            return False, "stopping"
        dead = [t.name for t in self._threads if not t.is_alive()]
        if dead:
            return False, f"thread(s) stopped: {', '.join(dead)}"
        worker = "running" if self._worker_ready.is_set() else "loading the model"
        return True, f"ok (worker {worker})"

    def _report_orphans(self) -> None:
        assert self.store is not None
        targets = set(self.config.sender().targets())
        for target, n in self.store.counts()["targets"].items():
            if target not in targets and n["pending"]:
                logger.warning(
                    "%d result(s) wait for delivery to %s, which is no longer configured; add "
                    "it back with --destination to deliver them",
                    n["pending"],
                    target,
                )

    def _start_thread(self, fn: Any, name: str) -> None:
        t = threading.Thread(target=fn, name=name, daemon=True)
        t.start()
        self._threads.append(t)

    def _start_worker(self, slot: _WorkerSlot) -> None:
        from .worker import worker_main

        slot.ready = False
        slot.process = self._ctx.Process(
            target=worker_main,
            args=(
                self.config,
                self._worker_stop,
                self._status,
                self._log_queue,
                self.log_level,
                slot.index,
            ),
            name=f"dicom-covid-worker-{slot.index + 1}",
            daemon=True,
        )
        slot.process.start()
        logger.info(
            "worker %d/%d (process %d) started; loading the model",
            slot.index + 1,
            len(self._workers),
            slot.process.pid,
        )

    @property
    def ready(self) -> bool:
        """True once the workers have loaded the model (and while at least one runs)."""
        return self._worker_ready.is_set()

    @property
    def worker_pid(self) -> int | None:
        """Process id of the first worker (None when not running)."""
        pids = self.worker_pids
        return pids[0] if pids else None

    @property
    def worker_pids(self) -> list[int]:
        """Process ids of the running workers."""
        return [
            slot.process.pid
            for slot in self._workers
            if slot.process is not None and slot.process.pid is not None
        ]

    def run(self) -> int:
        """Block until SIGINT/SIGTERM or :meth:`stop`; return the exit status (0 or 1)."""
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, self._on_signal)
        try:
            while not self._stop.wait(0.5):
                pass
        finally:
            self.stop()
        if self._fatal:
            logger.error("stopped: %s", self._fatal)
            return 1
        return 0

    def _on_signal(self, signum: int, frame: object) -> None:
        logger.info("received %s; shutting down", signal.Signals(signum).name)
        self._stop.set()

    def stop(self, worker_timeout: float = 60.0) -> None:
        """Shut down cleanly (idempotent)."""
        self._stop.set()
        if self.scp is not None:
            self.scp.stop()
            self.scp = None
        if self._workers:
            self._worker_stop.set()
            deadline = time.monotonic() + worker_timeout
            for slot in self._workers:
                if slot.process is None:
                    continue
                slot.process.join(max(0.0, deadline - time.monotonic()))
                if slot.process.is_alive():
                    logger.warning(
                        "worker %d did not stop within %.0f s; terminating it",
                        slot.index + 1,
                        worker_timeout,
                    )
                    slot.process.terminate()
                    slot.process.join(10)
            self._workers = []
        if self.sender is not None:
            self.sender.stop()
            self.sender = None
        self._shutdown_partial()
        logger.info("service stopped")

    def _shutdown_partial(self) -> None:
        self._stop.set()
        if self.metrics is not None:
            self.metrics.stop()
            self.metrics = None
        if self._log_queue is not None:
            with contextlib.suppress(Exception):
                self._log_queue.put(None)
        for t in self._threads:
            t.join(5)
        self._threads.clear()
        if self._log_queue is not None:
            self._log_queue.close()
            self._log_queue = None
        if self.store is not None:
            self.store.close()
            self.store = None
        if self._saved_validation is not None:
            from pydicom import config as pydicom_config

            pydicom_config.settings.reading_validation_mode = self._saved_validation
            self._saved_validation = None

    def __enter__(self) -> Service:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- background loops --------------------------------------------------------------------

    def _forward_logs(self) -> None:
        """Hand the worker's log records to this process's handlers."""
        q = self._log_queue
        while True:
            try:
                record = q.get(timeout=0.5)
            except queue.Empty:
                if self._stop.is_set() and not self._workers:
                    return
                continue
            except (EOFError, OSError):
                return
            if record is None:
                return
            logging.getLogger(record.name).handle(record)

    def _group_loop(self) -> None:
        quiet = self.config.quiet_period
        interval = max(0.05, min(0.5, quiet / 4))
        wait, failures = interval, 0
        while not self._stop.wait(wait):
            try:
                self.store.group_stable_studies(quiet)
            except Exception as exc:
                # e.g. the disk is full: back off (up to 30 s) instead of failing every interval,
                # with the traceback only the first time
                failures += 1
                wait = min(30.0, interval * 2.0**failures)
                logger.error(
                    "grouping studies failed (%s: %s); retrying in %.1f s",
                    type(exc).__name__,
                    exc,
                    wait,
                    exc_info=failures == 1,
                )
            else:
                if failures:
                    logger.info("grouping studies works again after %d failed tries", failures)
                wait, failures = interval, 0

    def _heartbeat_loop(self) -> None:
        """Beat every few seconds (``status`` shows each node's last heartbeat)."""
        interval = max(1.0, min(10.0, self.config.lease / 4))
        while not self._stop.wait(interval):
            try:
                self._beat()
            except Exception as exc:  # the store is unreachable: the sender and worker say so
                logger.warning("node heartbeat failed (%s: %s)", type(exc).__name__, exc)

    def _monitor_loop(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(queue.Empty, EOFError, OSError):
                kind, index, detail = self._status.get(timeout=0.5)
                slot = self._workers[index]
                if kind == "ready":
                    slot.ready = True
                    if all(s.ready for s in self._workers) and not self._worker_ready.is_set():
                        n = len(self._workers)
                        logger.info(
                            "%s ready (model %s); service running",
                            "worker" if n == 1 else f"{n} workers",
                            detail,
                        )
                        self._worker_ready.set()
                    elif self._worker_ready.is_set():
                        logger.info("worker %d ready again (model %s)", index + 1, detail)
                else:
                    self._fatal = f"the worker cannot load the model: {detail}"
                    self._stop.set()
                    return
            for slot in self._workers:
                if self._stop.is_set():
                    return
                w = slot.process
                if w is None or w.is_alive():
                    if w is None and time.monotonic() >= slot.restart_at:
                        self._start_worker(slot)
                    continue
                self._worker_died(slot)

    def _worker_died(self, slot: _WorkerSlot) -> None:
        """A worker process exited on its own: release its jobs, restart it after a backoff."""
        from .worker import worker_name

        w = slot.process
        assert w is not None
        if not self._worker_ready.is_set():
            self._fatal = (
                f"the worker process exited (exit code {w.exitcode}) before it loaded "
                "the model; see the messages above"
            )
            self._stop.set()
            return
        slot.ready = False
        slot.process = None
        slot.restarts += 1
        self._restarts += 1
        delay = min(60.0, 2.0 ** min(slot.restarts, 6))
        slot.restart_at = time.monotonic() + delay
        if not any(s.ready for s in self._workers):
            self._worker_ready.clear()
        assert self.store is not None
        released = self.store.release_running(claimed_by=worker_name(self.config.node, w.pid))
        logger.error(
            "worker %d (process %d) exited unexpectedly (exit code %s); its %d job(s) go "
            "back to the queue and a new worker starts in %.0f s",
            slot.index + 1,
            w.pid,
            w.exitcode,
            released,
            delay,
        )

    def _cleanup_job(self, job_id: int) -> None:
        """Delete a delivered job's received images and result files (unless keep_spool)."""
        if self.config.keep_spool or self.store is None:
            return
        roots = {self.config.spool_dir.resolve(), self.config.results_dir.resolve()}
        for path in self.store.files_of_job(job_id):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            parent = path.parent.resolve()
            while parent not in roots and any(r in parent.parents for r in roots):
                try:
                    parent.rmdir()  # only when empty
                except OSError:
                    break
                parent = parent.parent
