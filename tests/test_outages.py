"""Destination outages against a real Orthanc: queue, deliver on return, dead-letter, retry.

``tests/test_service.py`` proves the same life cycle against a pynetdicom destination inside the
test process; here the destination is a real Orthanc (configured from ``deploy/orthanc/``) that
is stopped and started again on the same ports and storage, the service is the real
``dicom-covid serve`` command, and ``status`` / ``retry`` run as the commands an operator types.
"""

from __future__ import annotations

import json
import subprocess
import time
import urllib.error
from pathlib import Path

import orthanc as orthanc_mod
import pytest
from live_service import ServeProcess, run_cli
from pacs_helpers import chest_cr, free_port, model_bundle, send, wait_until

from pacs_listener.jobs import JobStore

pytestmark = [
    pytest.mark.timeout(420),
    pytest.mark.skipif(not orthanc_mod.available(), reason="Orthanc is not installed"),
]

SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.33"
SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"
MAX_TRIES = 10


class RestartableOrthanc:
    """A real Orthanc that can be stopped and started again on the same ports and storage."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.http_port, self.dicom_port = free_port(), free_port()
        # Orthanc only sends to known modalities; here it only receives, so no Lua forwarding
        self.config = orthanc_mod.write_config(
            folder, free_port(), self.http_port, self.dicom_port, stable_age=1, lua=False
        )
        self.proc: subprocess.Popen | None = None
        self.api: orthanc_mod.Orthanc | None = None
        self.starts = 0

    @property
    def address(self) -> str:
        return f"ORTHANC@127.0.0.1:{self.dicom_port}"

    def start(self, timeout: float = 60.0) -> None:
        self.starts += 1
        log = (self.folder / f"orthanc{self.starts}.log").open("wb")
        self.proc = subprocess.Popen(
            [orthanc_mod.ORTHANC, str(self.config)],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=self.folder,
        )
        log.close()
        self.api = orthanc_mod.Orthanc(
            self.http_port, self.dicom_port, "ORTHANC", self.folder, self.proc
        )

        def up() -> bool:
            assert self.proc.poll() is None, "Orthanc exited while starting"
            try:
                self.api.get("/system")
                return True
            except (urllib.error.URLError, ConnectionError, OSError):
                return False

        wait_until(up, timeout, interval=0.2, what="Orthanc to answer")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None

    def sop_classes(self, study_uid: str) -> list[str]:
        """SOP Class UIDs of the instances Orthanc holds in a study (empty when unknown)."""
        assert self.api is not None
        sid = self.api.study_id(study_uid)
        if sid is None:
            return []
        out = []
        for inst in self.api.get(f"/studies/{sid}/instances"):
            tags = self.api.get(f"/instances/{inst['ID']}/simplified-tags")
            out.append(tags["SOPClassUID"])
        return sorted(out)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return model_bundle(tmp_path_factory.mktemp("bundle"))


def _status(state: Path) -> dict:
    result = run_cli("status", "--state-dir", str(state), "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def _job_of(state: Path, study: str):
    with JobStore(state / "jobs.sqlite", create=False) as store:
        jobs = [j for j in store.jobs() if j.study_instance_uid == study]
    return jobs[0] if len(jobs) == 1 else None


def test_orthanc_outage_queue_redeliver_dead_letter_and_retry(tmp_path: Path, bundle: Path) -> None:
    pacs = RestartableOrthanc(tmp_path / "orthanc")
    pacs.start()
    svc = ServeProcess(
        tmp_path / "svc",
        bundle,
        [
            "--destination",
            pacs.address,
            "--quiet-period",
            "0.3",
            "--retry-base",
            "0.3",
            "--retry-max",
            "2",
            "--retry-tries",
            str(MAX_TRIES),
        ],
    )
    state = svc.state
    try:
        svc.start()
        # 0. Orthanc up: results arrive (the configuration works)
        first = chest_cr()
        assert send([first], svc.port) == [0]
        wait_until(
            lambda: len(pacs.sop_classes(first.StudyInstanceUID)) == 2,
            120,
            interval=0.5,
            what="the first study's results in Orthanc",
        )
        assert pacs.sop_classes(first.StudyInstanceUID) == sorted([SR_CLASS, SC_CLASS])

        # 1. Orthanc stops: results are kept and retried with backoff, then delivered when it
        #    comes back
        pacs.stop()
        second = chest_cr()
        assert send([second], svc.port) == [0]
        target = pacs.address
        wait_until(
            lambda: (
                _status(state)["targets"].get(target, {}).get("pending") == 2
                and _max_tries(state, target) >= 2
            ),
            120,
            interval=0.5,
            what="two failed tries while Orthanc is down",
        )
        queued = _status(state)
        assert queued["backlog"]["deliveries_pending"] == 2
        assert queued["deliveries"]["dead"] == 0
        text = run_cli("status", "--state-dir", str(state)).stdout
        assert f"{target}: pending 2" in text
        pacs.start()
        wait_until(
            lambda: len(pacs.sop_classes(second.StudyInstanceUID)) == 2,
            60,
            interval=0.5,
            what="the queued results in Orthanc after its restart",
        )
        assert pacs.sop_classes(second.StudyInstanceUID) == sorted([SR_CLASS, SC_CLASS])
        wait_until(
            lambda: _job_of(state, second.StudyInstanceUID).state == "delivered",
            30,
            what="the second job delivered",
        )

        # 2. Orthanc stays down: after MAX_TRIES failed tries the job is dead-lettered, shown by
        #    'status', left alone when Orthanc returns, and recovered by 'retry'
        pacs.stop()
        third = chest_cr()
        assert send([third], svc.port) == [0]
        wait_until(
            lambda: (j := _job_of(state, third.StudyInstanceUID)) is not None and j.state == "dead",
            120,
            interval=0.5,
            what="the third job dead-lettered",
        )
        job = _job_of(state, third.StudyInstanceUID)
        assert _max_tries(state, target) >= MAX_TRIES
        status = _status(state)
        assert status["deliveries"]["dead"] == 2 and status["jobs"]["dead"] == 1
        (problem,) = [p for p in status["problems"] if p["job"] == job.id]
        assert (
            problem["state"] == "dead" and problem["study_instance_uid"] == third.StudyInstanceUID
        )
        assert problem["reason"].startswith(f"delivery_failed: {target}")
        text = run_cli("status", "--state-dir", str(state)).stdout
        assert f"job {job.id} (dead) study {third.StudyInstanceUID}: delivery_failed" in text
        pacs.start()
        time.sleep(3.0)  # a dead letter is not retried on its own
        assert pacs.sop_classes(third.StudyInstanceUID) == []
        result = run_cli("retry", "--state-dir", str(state), "--job", str(job.id))
        assert result.returncode == 0 and "re-queued 1 job(s)" in result.stdout, result
        wait_until(
            lambda: len(pacs.sop_classes(third.StudyInstanceUID)) == 2,
            60,
            interval=0.5,
            what="the retried results in Orthanc",
        )
        assert pacs.sop_classes(third.StudyInstanceUID) == sorted([SR_CLASS, SC_CLASS])
        wait_until(
            lambda: _job_of(state, third.StudyInstanceUID).state == "delivered",
            30,
            what="the retried job delivered",
        )
        final = _status(state)
        assert final["jobs"]["delivered"] == 3 and final["deliveries"]["dead"] == 0
        assert final["deliveries"]["delivered"] == 6
        assert run_cli("retry", "--state-dir", str(state), "--all-dead").returncode == 2
        # Orthanc holds exactly the six results: one SR and one SC per study, nothing else
        assert pacs.api.get("/statistics")["CountInstances"] == 6
    finally:
        svc.close()
        pacs.stop()
    assert "dead-lettered" in svc.log.read_text()


def _max_tries(state: Path, target: str) -> int:
    with JobStore(state / "jobs.sqlite", create=False) as store:
        row = (
            store._con()
            .execute(
                "SELECT COALESCE(MAX(tries), 0) FROM deliveries WHERE target = ? AND state != "
                "'delivered'",
                (target,),
            )
            .fetchone()
        )
    return int(row[0])
