"""``dicom-covid serve --metrics-port``: Prometheus metrics, /healthz and /readyz over real HTTP.

A real ``serve`` subprocess receives studies from a pynetdicom SCU and delivers to a real
pynetdicom destination (and to one that is down, for dead letters); the endpoint is read with
urllib and parsed with prometheus_client's own parser. The service is restarted in the middle:
the counts come from the job store, so they must not go back to zero.
"""

from __future__ import annotations

import urllib.error
import urllib.request
from pathlib import Path

import pytest
from live_service import ServeProcess
from pacs_helpers import (
    DestinationSCP,
    chest_cr,
    ct_slice,
    free_port,
    model_bundle,
    send,
    wait_until,
)
from prometheus_client.parser import text_string_to_metric_families
from pydicom.uid import generate_uid

pytestmark = pytest.mark.timeout(900)


def _get(port: int, path: str) -> tuple[int, str, str]:
    """GET http://127.0.0.1:PORT/PATH; return (status, content type, body)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
            return r.status, r.headers["Content-Type"], r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["Content-Type"], exc.read().decode()


def _scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of /metrics, keyed by (name, sorted labels)."""
    status, ctype, body = _get(port, "/metrics")
    assert status == 200 and ctype.startswith("text/plain")
    out = {}
    for family in text_string_to_metric_families(body):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return model_bundle(tmp_path_factory.mktemp("bundle"))


def test_metrics_and_probes_of_a_live_service(tmp_path: Path, bundle: Path) -> None:
    dest = DestinationSCP().start()
    down = f"DOWN@127.0.0.1:{free_port()}"  # nothing listens there
    mport = free_port()
    common = ["--quiet-period", "0.5", "--metrics-port", str(mport), "--destination", dest.address]
    serve = ServeProcess(
        tmp_path,
        bundle,
        [*common, "--destination", down, "--retry-tries", "1", "--retry-base", "0.1"],
    )
    try:
        # /readyz answers 503 while the worker loads the model, then 200
        serve.start(wait=False)
        answers: list[int] = []

        def ready() -> bool:
            try:
                answers.append(_get(mport, "/readyz")[0])
            except OSError:  # not listening yet
                return False
            return answers[-1] == 200

        wait_until(ready, timeout=240, interval=0.05)
        assert answers[0] == 503, answers[:5]
        serve.wait_ready()
        status, _, body = _get(mport, "/healthz")
        assert status == 200 and body.startswith("ok")
        assert _get(mport, "/nowhere")[0] == 404

        m = _scrape(mport)
        assert _value(m, "dicom_covid_model_loaded") == 1
        # the node this service is (one machine: one node, every role) and its heartbeat
        (beat,) = [k for k in m if k[0] == "dicom_covid_node_heartbeat_age_seconds"]
        assert dict(beat[1])["roles"] == "listener,worker,sender"
        assert 0 <= m[beat] < 60
        assert _value(m, "dicom_covid_node_jobs_held", node=dict(beat[1])["node"]) == 0
        info = [k for k in m if k[0] == "dicom_covid_model_info"]
        assert len(info) == 1
        labels = dict(info[0][1])
        assert labels["name"] and labels["version"] and labels["kind"] in ("single", "ensemble")
        assert _value(m, "dicom_covid_instances_received_total") == 0

        # one study: two chest radiographs and a CT slice (skipped); one image too large
        study = generate_uid()
        huge = chest_cr(study)
        huge.Rows = huge.Columns = 20000  # 400 Mi pixels declared: refused from the header
        statuses = send([chest_cr(study), chest_cr(study), ct_slice(study), huge], serve.port)
        assert statuses == [0, 0, 0, 0xA701]

        def settled() -> bool:
            m = _scrape(mport)
            return (
                _value(m, "dicom_covid_images_analysed_total") == 2
                and _value(m, "dicom_covid_deliveries_delivered_total", target=dest.address) == 4
                and _value(m, "dicom_covid_deliveries_dead", target=down) == 4
            )

        wait_until(settled, timeout=300)
        m = _scrape(mport)
        assert _value(m, "dicom_covid_instances_received_total") == 3
        skipped = {dict(k[1])["reason"]: v for k, v in m.items() if k[0].endswith("skipped_total")}
        assert sum(skipped.values()) == 1, skipped
        outcomes = {
            dict(k[1])["outcome"]: v for k, v in m.items() if k[0] == "dicom_covid_outcomes_total"
        }
        assert set(outcomes) >= {"suspected", "not_suspected", "indeterminate"}
        assert sum(outcomes.values()) == 2, outcomes
        assert _value(m, "dicom_covid_images_failed") == 0
        assert _value(m, "dicom_covid_jobs", state="dead") == 1
        assert _value(m, "dicom_covid_cstore_refused_total", status="0xA701") == 1
        for stage in ("quiet_period", "worker", "running", "disk", "delivery"):
            assert _value(m, "dicom_covid_queue_depth", stage=stage) == 0, stage
        hist = "dicom_covid_job_stage_duration_seconds"
        for stage in ("grouping", "queued", "analysis"):
            assert _value(m, f"{hist}_count", stage=stage) == 1, stage
            assert _value(m, f"{hist}_bucket", stage=stage, le="+Inf") == 1
        assert _value(m, f"{hist}_sum", stage="analysis") > 0
        assert _value(m, f"{hist}_sum", stage="grouping") >= 0.5  # the quiet period
        assert _value(m, f"{hist}_count", stage="delivery") == 0  # the job is dead
        # OpenMetrics when the scraper asks for it
        req = urllib.request.Request(
            f"http://127.0.0.1:{mport}/metrics",
            headers={"Accept": "application/openmetrics-text; version=1.0.0"},
        )
        with urllib.request.urlopen(req, timeout=10) as r:
            assert r.headers["Content-Type"].startswith("application/openmetrics-text")
            assert r.read().decode().rstrip().endswith("# EOF")

        # restart without the dead destination: counts come from the store, not from memory
        assert serve.stop() == 0
        serve.args = common
        serve.start()
        m = _scrape(mport)
        assert _value(m, "dicom_covid_instances_received_total") == 3
        assert _value(m, "dicom_covid_images_analysed_total") == 2
        assert _value(m, "dicom_covid_cstore_refused_total", status="0xA701") == 0  # in memory
        assert send([chest_cr()], serve.port) == [0]
        wait_until(
            lambda: _value(_scrape(mport), f"{hist}_count", stage="end_to_end") == 1, timeout=300
        )
        m = _scrape(mport)
        assert _value(m, "dicom_covid_instances_received_total") == 4
        assert _value(m, "dicom_covid_images_analysed_total") == 3
        assert _value(m, "dicom_covid_deliveries_delivered_total", target=dest.address) == 6
        assert _value(m, "dicom_covid_deliveries_dead", target=down) == 4
        assert _value(m, f"{hist}_count", stage="delivery") == 1
        assert _value(m, f"{hist}_count", stage="analysis") == 2
        e2e = _value(m, f"{hist}_sum", stage="end_to_end")
        assert e2e >= _value(m, f"{hist}_sum", stage="delivery") > 0

        # stopping: the endpoint goes away with the service
        assert serve.stop() == 0
        with pytest.raises(OSError):
            _get(mport, "/healthz")
        # no patient data in any label or in the log
        from pacs_helpers import PATIENT_ID, PATIENT_NAME

        assert "dicom_covid" in str(m)
        for text in (str(m), serve.output()):
            assert PATIENT_NAME not in text and PATIENT_ID not in text
    finally:
        serve.close()
        dest.stop()


def test_metrics_port_in_use_is_a_clear_error(tmp_path: Path, bundle: Path) -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        serve = ServeProcess(tmp_path, bundle, ["--metrics-port", str(port)])
        serve.start(wait=False)
        assert serve.proc is not None
        assert serve.proc.wait(120) == 1
        assert "cannot serve metrics" in serve.output()
