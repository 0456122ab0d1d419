"""Operations endpoint of ``dicom-covid serve --metrics-port``: Prometheus metrics and probes.

One small HTTP server (a thread of the service process) answers:

``/metrics``
    Prometheus text format (OpenMetrics when the scraper asks for it), built with
    ``prometheus_client``.
``/healthz``
    Liveness: 200 while the service runs (listener, grouper and sender up), 503 once it stops or
    a fatal error ended it.
``/readyz``
    Readiness: 200 once the worker has loaded the model *and* the job store accepts a write;
    503 with the reason otherwise (model still loading, worker restarting, disk full, ...).

**Process model.** The service has three kinds of actors in two processes: the listener and the
sender (threads of the service process) and the worker (its own process). Counters kept in
memory would see only one process and restart at zero with it, so every count and every
duration histogram is *derived from the SQLite job store* on each scrape (one read transaction,
:meth:`pacs_listener.jobs.JobStore.metrics`). That store is the service's durable truth, so the
numbers agree with ``dicom-covid status``, whichever process did the work, and survive restarts
(a restart never makes a counter go down). Only what never reaches the store is counted in
memory, in the process that sees it: C-STORE requests the listener refused, by status.
No label carries patient data: states, reasons, outcome codes, stages and delivery targets only.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

from .jobs import STAGES, JobStore
from .store import STORE_ERRORS

__all__ = [
    "LATENCY_BUCKETS",
    "NAMESPACE",
    "MetricsServer",
    "ServiceProbe",
    "StoreCollector",
]

logger = logging.getLogger(__name__)

#: Prefix of every metric name.
NAMESPACE = "dicom_covid"
#: Upper bounds (seconds) of the stage-duration histograms: sub-second analysis up to the hours
#: a delivery can wait through a destination outage.
LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 14400)


@dataclass
class ServiceProbe:
    """What the endpoint asks the running service (callables, so it never holds the service).

    Attributes
    ----------
    alive : callable
        ``alive() -> (bool, str)``: the service runs (liveness), with a short reason.
    model_loaded : callable
        ``model_loaded() -> bool``: the worker has loaded the model.
    model_info : dict of str to str
        Labels of the ``dicom_covid_model`` Info metric (name, title, kind, version, ...).
    """

    alive: Callable[[], tuple[bool, str]]
    model_loaded: Callable[[], bool]
    model_info: Mapping[str, str] = field(default_factory=dict)


class StoreCollector(Collector):
    """Collector whose metrics are read from the job store on every scrape.

    Parameters
    ----------
    location : pathlib.Path or str
        The job store: the SQLite file (``<state_dir>/jobs.sqlite``) or a ``postgresql://``
        URL.
    probe : ServiceProbe
        Model facts and readiness.
    root : pathlib.Path, optional
        The storage root (needed with a PostgreSQL store).
    """

    def __init__(self, location: Path | str, probe: ServiceProbe, root: Path | None = None) -> None:
        self.location = location
        self.root = root
        self.probe = probe
        self._store: JobStore | None = None
        self._lock = threading.Lock()

    def store(self) -> JobStore:
        """This collector's own connection to the store (opened on first use)."""
        if self._store is None:
            self._store = JobStore(self.location, create=False, root=self.root)
        return self._store

    def close(self) -> None:
        """Close the store connection."""
        with self._lock:
            if self._store is not None:
                self._store.close()
                self._store = None

    def collect(self) -> Iterator[Metric]:
        """Yield every metric family (called by ``prometheus_client`` on each scrape)."""
        n = NAMESPACE
        info = InfoMetricFamily(
            f"{n}_model", "Model that analyses the images (name, version of the bundle, ...)."
        )
        info.add_metric([], dict(self.probe.model_info))
        yield info
        ready = GaugeMetricFamily(
            f"{n}_model_loaded", "1 when the worker process has loaded the model, else 0."
        )
        ready.add_metric([], 1.0 if self.probe.model_loaded() else 0.0)
        yield ready
        t0 = time.monotonic()
        with self._lock:
            try:
                m = self.store().metrics(LATENCY_BUCKETS)
                nodes = self.store().nodes()
                up = 1.0
            except (*STORE_ERRORS, OSError) as exc:
                logger.warning("metrics: the job store cannot be read (%s)", exc)
                m, nodes, up = None, [], 0.0
        store_up = GaugeMetricFamily(
            f"{n}_store_up", "1 when the job store could be read for this scrape."
        )
        store_up.add_metric([], up)
        yield store_up
        scrape = GaugeMetricFamily(
            f"{n}_store_scrape_seconds", "Seconds spent reading the job store for this scrape."
        )
        scrape.add_metric([], time.monotonic() - t0)
        yield scrape
        if m is not None:
            yield from self._from_store(m)
        if nodes:
            now = time.time()
            age = GaugeMetricFamily(
                f"{n}_node_heartbeat_age_seconds",
                "Seconds since each node sharing the job store last beat (a node that stopped "
                "beating is down or cut off).",
                labels=["node", "roles"],
            )
            held = GaugeMetricFamily(
                f"{n}_node_jobs_held",
                "Jobs each node's workers hold now (claimed, lease not expired or not yet "
                "taken over).",
                labels=["node"],
            )
            for node in nodes:
                age.add_metric([node.node_id, node.roles], max(0.0, now - node.heartbeat_at))
                held.add_metric([node.node_id], float(node.leases))
            yield age
            yield held

    def _from_store(self, m: dict[str, Any]) -> Iterator[Metric]:
        n = NAMESPACE
        inst = m["instances"]
        yield _counter(
            f"{n}_instances_received",
            "Instances acknowledged by the C-STORE SCP (every state; duplicates not counted).",
            sum(inst.values()),
        )
        skipped = CounterMetricFamily(
            f"{n}_instances_skipped",
            "Instances acknowledged but not analysed (not a frontal CR/DX, our own result, ...).",
            labels=["reason"],
        )
        for reason, count in sorted(m["skipped_reasons"].items()):
            skipped.add_metric([reason], count)
        yield skipped
        yield _counter(
            f"{n}_instances_duplicate",
            "Instances received again after they were acknowledged (not processed again).",
            m["duplicates"],
        )
        yield _counter(
            f"{n}_images_analysed",
            "Images the model analysed (an SR and an SC written).",
            m["analysed"],
        )
        outcomes = CounterMetricFamily(
            f"{n}_outcomes",
            "Analysed images by outcome: suspected, not_suspected, indeterminate (abstained).",
            labels=["outcome"],
        )
        for outcome in ("suspected", "not_suspected", "indeterminate"):
            outcomes.add_metric([outcome], m["outcomes"].get(outcome, 0))
        for outcome, count in sorted(m["outcomes"].items()):
            if outcome not in ("suspected", "not_suspected", "indeterminate"):
                outcomes.add_metric([outcome], count)
        yield outcomes
        yield _gauge(
            f"{n}_images_failed",
            "Images that could not be analysed (state failed; 'dicom-covid retry' re-queues).",
            inst.get("failed", 0),
        )
        instances = GaugeMetricFamily(
            f"{n}_instances", "Instances by pipeline state right now.", labels=["state"]
        )
        for state, count in inst.items():
            instances.add_metric([state], count)
        yield instances
        jobs = GaugeMetricFamily(f"{n}_jobs", "Jobs by state right now.", labels=["state"])
        for state, count in m["jobs"].items():
            jobs.add_metric([state], count)
        yield jobs
        delivered = CounterMetricFamily(
            f"{n}_deliveries_delivered",
            "Result objects confirmed by a destination (or written to the output folder).",
            labels=["target"],
        )
        dead = GaugeMetricFamily(
            f"{n}_deliveries_dead",
            "Result deliveries dead-lettered after the last retry ('dicom-covid retry' re-queues).",
            labels=["target"],
        )
        pending = GaugeMetricFamily(
            f"{n}_deliveries_pending",
            "Result deliveries waiting for their (next) try.",
            labels=["target"],
        )
        for target, per in sorted(m["deliveries"].items()):
            delivered.add_metric([target], per.get("delivered", 0))
            dead.add_metric([target], per.get("dead", 0))
            pending.add_metric([target], per.get("pending", 0))
        yield delivered
        yield dead
        yield pending
        queue = GaugeMetricFamily(
            f"{n}_queue_depth",
            "Work waiting, by stage: instances in their study's quiet period, jobs waiting for "
            "the worker, jobs running, jobs waiting for disk space, result deliveries pending.",
            labels=["stage"],
        )
        jobs_by = m["jobs"]
        for stage, count in (
            ("quiet_period", inst.get("received", 0)),
            ("worker", jobs_by.get("grouped", 0)),
            ("running", jobs_by.get("running", 0)),
            ("disk", jobs_by.get("waiting_for_disk", 0)),
            ("delivery", sum(p.get("pending", 0) for p in m["deliveries"].values())),
        ):
            queue.add_metric([stage], count)
        yield queue
        yield _gauge(
            f"{n}_result_bytes_reserved",
            "Disk space reserved for the results of acknowledged images not yet analysed.",
            m["result_bytes_reserved"],
        )
        yield _gauge(
            f"{n}_oldest_pending_delivery_age_seconds",
            "Age of the oldest result still waiting for delivery (0 when none).",
            m["oldest_pending_delivery_age_s"] or 0.0,
        )
        hist = HistogramMetricFamily(
            f"{n}_job_stage_duration_seconds",
            "Seconds a job spent per stage: grouping (first image -> job), queued, analysis, "
            "delivery, end_to_end (first image -> every result delivered).",
            labels=["stage"],
        )
        for stage in STAGES:
            s = m["stages"][stage]
            buckets = [(_bound(b), c) for b, c in zip(LATENCY_BUCKETS, s["buckets"], strict=True)]
            buckets.append(("+Inf", s["count"]))
            hist.add_metric([stage], buckets, s["sum"])
        yield hist


def _bound(b: float) -> str:
    return repr(float(b))


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    c = CounterMetricFamily(name, doc)
    c.add_metric([], value)
    return c


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    g = GaugeMetricFamily(name, doc)
    g.add_metric([], value)
    return g


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    timeout = 10  # a client that sends nothing cannot hold the (single) serving thread

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        srv = self.server
        if path == "/metrics":
            encoder, content_type = choose_encoder(self.headers.get("Accept"))
            self._reply(200, encoder(srv.registry), content_type)
        elif path == "/healthz":
            ok, why = srv.probe.alive()
            self._reply(200 if ok else 503, (why + "\n").encode(), "text/plain; charset=utf-8")
        elif path == "/readyz":
            ok, why = srv.readiness()
            self._reply(200 if ok else 503, (why + "\n").encode(), "text/plain; charset=utf-8")
        elif path == "/":
            body = b"dicom-covid: /metrics /healthz /readyz\n"
            self._reply(200, body, "text/plain; charset=utf-8")
        else:
            self._reply(404, b"not found: try /metrics, /healthz or /readyz\n", "text/plain")

    def _reply(self, code: int, body: bytes, content_type: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("metrics: %s " + format, self.address_string(), *args)


class _Server(HTTPServer):
    address_family = socket.AF_INET
    registry: CollectorRegistry
    probe: ServiceProbe
    readiness: Callable[[], tuple[bool, str]]


class _Server6(_Server):
    address_family = socket.AF_INET6


class MetricsServer:
    """The ``/metrics``, ``/healthz`` and ``/readyz`` endpoint of a running service.

    One serving thread (scrapes and probes are small; a silent client is cut off after 10 s).

    Parameters
    ----------
    location : pathlib.Path or str
        The job store the metrics are read from (SQLite file or ``postgresql://`` URL).
    probe : ServiceProbe
        Liveness, model state and model facts of the service.
    host : str
        Address to listen on (default ``127.0.0.1``).
    port : int
        TCP port (0: any free port, see :attr:`address`).
    root : pathlib.Path, optional
        The storage root (needed with a PostgreSQL store).
    """

    def __init__(
        self,
        location: Path | str,
        probe: ServiceProbe,
        host: str = "127.0.0.1",
        port: int = 9464,
        root: Path | None = None,
    ) -> None:
        self.probe = probe
        self.host = host
        self.port = port
        self.registry = CollectorRegistry(auto_describe=False)
        self.collector = StoreCollector(location, probe, root)
        self.registry.register(self.collector)
        #: C-STORE requests refused by the listener, by status (in memory: never in the store).
        self.refused = Counter(
            f"{NAMESPACE}_cstore_refused",
            "C-STORE requests the listener refused, by DIMSE status (0xA700 out of resources, "
            "0xA701 too large, 0xA900 mismatch, 0xC210 cannot understand, 0xC211 error); "
            "since this process started.",
            ["status"],
            registry=self.registry,
        )
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._ready_lock = threading.Lock()

    def count_refused(self, status: int) -> None:
        """Count one refused C-STORE (the listener's ``on_refused`` hook)."""
        self.refused.labels(status=f"0x{status:04X}").inc()

    def readiness(self) -> tuple[bool, str]:
        """``(ready, reason)``: the model is loaded and the job store accepts a write."""
        alive, why = self.probe.alive()
        if not alive:
            return False, f"not ready: {why}"
        if not self.probe.model_loaded():
            return False, "not ready: the worker is loading the model"
        with self._ready_lock:
            try:
                with self.collector._lock:
                    self.collector.store().check_writable()
            except (*STORE_ERRORS, OSError) as exc:
                return False, f"not ready: the job store cannot be written ({exc})"
        return True, "ready"

    @property
    def address(self) -> tuple[str, int]:
        """``(host, port)`` actually listened on."""
        if self._server is None:
            return (self.host, self.port)
        host, port = self._server.server_address[:2]
        return (str(host), int(port))

    def start(self) -> None:
        """Listen and serve in a daemon thread.

        Raises
        ------
        OSError
            When the address cannot be bound.
        """
        server_class = _Server6 if ":" in self.host else _Server
        server = server_class((self.host, self.port), _Handler)
        server.registry = self.registry
        server.probe = self.probe
        server.readiness = self.readiness
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, name="metrics endpoint", daemon=True
        )
        self._thread.start()
        host, port = self.address
        logger.info("metrics on http://%s:%d/metrics (probes /healthz, /readyz)", host, port)

    def stop(self) -> None:
        """Stop serving and close the store connection."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None
        self.collector.close()
