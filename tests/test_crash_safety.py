"""Crash safety: ``kill -9`` of the whole service while a PACS sends, then restart and resend.

dcmtk's ``storescu`` sends 200 chest radiographs in 50 studies (distinct UIDs) to a real
``dicom-covid serve``. Four times the service's whole process group (listener, worker, resource
tracker) is killed with SIGKILL, as a power cut would, at a seeded random moment while it
receives, analyses or delivers, and restarted on the same state folder; what ``storescu`` did
not get a success response for is sent again, as a PACS would. At the end every instance
acknowledged with success must have exactly one SR and one SC at the destination (a real
pynetdicom storage SCP recording every arrival), and no source may have two different result
objects.

Exactly-once delivery over DICOM is impossible: a kill between the destination's response and
our commit of it makes the result go out again after the restart, with the same SOP Instance UID
(so a PACS keeps one copy). The sender commits each confirmation right after it arrives, so such
re-deliveries are bounded by one per kill; they are counted and reported.

Every test here runs the service with two worker processes and batches of up to four images
(``--workers 2 --batch-size 4``), so a kill also lands between two workers' claims and in the
middle of a batch; :func:`test_kill_9_of_one_worker_of_two_loses_nothing` kills one worker alone.

To keep the run short on two CPU cores the images are 256 x 256 (the reader accepts 64 and
up) and the model is the throw-away EfficientNet-Lite0 bundle at an input size of 64 pixels:
every image is still a real candidate that goes through the reader, the model, Grad-CAM and the
SR and SC builders.
"""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

import pydicom
import pytest
from crash_helpers import (
    SC_CLASS,
    SR_CLASS,
    STORESCU,
    acknowledged,
    fast_bundle,
    results_per_source,
    small_cr,
    storescu,
)
from live_service import ServeProcess
from pacs_helpers import PATIENT_ID, PATIENT_NAME, DestinationSCP, send, wait_until
from pydicom.uid import generate_uid

from pacs_listener.jobs import JobStore

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

STUDIES = 50
PER_STUDY = 4
KILLS = 4
SEED = 20261127
#: Where each kill lands: while storescu sends, while the worker analyses a job, while the
#: sender delivers; the exact moment inside it is seeded-random (seconds after it is reached).
PHASES = ("receiving", "analysing", "receiving", "delivering")
DELAYS = {"receiving": (0.2, 2.5), "analysing": (0.0, 1.0), "delivering": (0.0, 0.3)}
#: Two worker processes sharing the job store, batches of up to four images across studies.
WORKERS = ["--workers", "2", "--batch-size", "4"]


def _reach(store: JobStore, phase: str, timeout: float = 90.0) -> bool:
    """Wait until the service is in ``phase``; False when it never got there."""
    if phase == "receiving":
        return True  # storescu has just started
    delivered = store.counts()["deliveries"]["delivered"]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        c = store.counts()
        if phase == "analysing" and c["jobs"]["running"]:
            return True
        if phase == "delivering" and c["deliveries"]["delivered"] > delivered:
            return True
        time.sleep(0.02)
    return False


@pytest.mark.skipif(
    subprocess.run(["which", STORESCU], capture_output=True).returncode != 0,
    reason="dcmtk storescu not installed",
)
def test_kill_9_while_receiving_loses_nothing_and_duplicates_nothing(
    tmp_path: Path, record_property
) -> None:
    t0 = time.monotonic()
    rng = random.Random(SEED)
    data = tmp_path / "data"
    data.mkdir()
    files: dict[str, Path] = {}
    for s in range(STUDIES):
        study, series = generate_uid(), generate_uid()
        for i in range(PER_STUDY):
            ds = small_cr(study, series)
            path = data / f"s{s:02d}_{i}.dcm"
            ds.save_as(path, enforce_file_format=True)
            files[str(path)] = path
    uid_of = {p: str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in files}
    bundle = fast_bundle(tmp_path / "bundle")

    dest = DestinationSCP(ae_title="PACS").start()
    svc = ServeProcess(
        tmp_path / "svc",
        bundle,
        [
            "--destination",
            dest.address,
            "--quiet-period",
            "0.5",
            "--retry-base",
            "0.2",
            "--retry-max",
            "1",
            "--retry-tries",
            "1000",
            *WORKERS,
        ],
    )
    acked: set[str] = set()
    kills: list[str] = []
    try:
        for k in range(KILLS + 1):
            svc.start()
            pending = sorted(set(files) - acked)
            log = tmp_path / f"storescu{k}.log"
            sender = storescu([files[p] for p in pending], svc.port, log) if pending else None
            if k < KILLS:
                phase = PHASES[k]
                with JobStore(svc.state / "jobs.sqlite", create=False) as store:
                    reached = _reach(store, phase)
                    time.sleep(rng.uniform(*DELAYS[phase]))  # a seeded random point in it
                    c = store.counts()
                kills.append(
                    f"kill {k + 1} ({phase}{'' if reached else ', not reached'}): "
                    f"{len(acked)} acknowledged before this run; instances {c['instances']}, "
                    f"jobs running {c['jobs']['running']}, deliveries {c['deliveries']}"
                )
                svc.kill()
            if sender is not None:
                sender.wait(120)
                acked |= acknowledged(log.read_text())
        # the last run was not killed: everything storescu sent must be acknowledged now
        assert acked == set(files), f"{len(files) - len(acked)} instance(s) never acknowledged"
        expected = {uid_of[p] for p in acked}
        with JobStore(svc.state / "jobs.sqlite", create=False) as store:
            wait_until(
                lambda: store.counts()["instances"]["delivered"] == len(expected),
                480,
                interval=0.5,
                what=f"{len(expected)} delivered instances",
            )
            counts = store.counts()
        time.sleep(1.0)  # anything sent twice would arrive now
    finally:
        svc.close()
        dest.stop()

    per_source = results_per_source(dest.received)  # distinct result objects per source
    arrivals = dest.counts()
    lost = sorted(expected - set(per_source))
    wrong = {s: dict(c) for s, c in per_source.items() if c != {SR_CLASS: 1, SC_CLASS: 1}}
    strangers = sorted(set(per_source) - expected)
    redelivered = sum(n - 1 for n in arrivals.values())
    summary = (
        f"{len(files)} instances in {STUDIES} studies, {len(kills)} kill -9 survived, "
        f"{len(acked)} acknowledged, {len(lost)} lost, {len(wrong)} with duplicate results, "
        f"{redelivered} result(s) re-delivered with the same UID, "
        f"duplicates acknowledged by the listener {counts['duplicates']}, "
        f"{time.monotonic() - t0:.0f} s"
    )
    print("\n".join([*kills, summary]))
    record_property("crash_safety", summary)
    assert len(kills) == KILLS and not any("not reached" in k for k in kills), kills
    assert not lost, f"acknowledged but never analysed: {lost[:5]}"
    assert not wrong, f"sources without exactly one SR and one SC: {list(wrong.items())[:5]}"
    assert not strangers
    assert counts["jobs"]["failed"] == 0 and counts["instances"]["failed"] == 0, counts
    assert redelivered <= len(kills), summary
    log_text = svc.log.read_text()
    assert log_text.count("dicom-covid serve starting") == KILLS + 1
    for secret in (PATIENT_NAME, PATIENT_ID):
        assert secret not in log_text and secret not in svc.output()


class StallingDestination(DestinationSCP):
    """A destination that stores the first results, then stalls on the ``stall_at``-th C-STORE
    (never storing it) until released: the moment to kill the service in mid-association."""

    def __init__(self, stall_at: int) -> None:
        super().__init__(ae_title="PACS")
        self.stall_at = stall_at
        self.stores = 0
        self.stalled = threading.Event()
        self.release = threading.Event()

    def _on_store(self, event) -> int:
        with self._lock:
            self.stores += 1
            n = self.stores
        if n == self.stall_at:
            self.stalled.set()
            self.release.wait(120)
            return 0xA700
        return super()._on_store(event)


@pytest.mark.timeout(600)
def test_kill_in_the_middle_of_a_delivery_batch_resends_nothing_confirmed(
    tmp_path: Path,
) -> None:
    """Eight results wait for a destination that is down; when it is back, the sender sends them
    over one association; the destination confirms five and stalls on the sixth, and the
    service is killed. The five confirmations must already be committed, so after the restart
    only the three others are sent: every result arrives exactly once."""
    study, series = generate_uid(), generate_uid()
    images = [small_cr(study, series) for _ in range(4)]
    dest = StallingDestination(stall_at=6)  # not started: down
    svc = ServeProcess(
        tmp_path / "svc",
        fast_bundle(tmp_path / "bundle"),
        [
            "--destination",
            dest.address,
            "--quiet-period",
            "0.3",
            "--retry-base",
            "0.2",
            "--retry-max",
            "0.5",
            "--retry-tries",
            "1000",
            *WORKERS,
        ],
    )
    try:
        svc.start()
        assert send(images, svc.port) == [0] * 4
        with JobStore(svc.state / "jobs.sqlite", create=False) as store:
            wait_until(
                lambda: store.counts()["deliveries"]["pending"] == 8,
                240,
                what="8 results waiting for the destination",
            )
        assert svc.stop() == 0
        dest.start()
        svc.start()  # on start every pending result is due: one batch, one association
        assert dest.stalled.wait(120), "the sender never reached the sixth result"
        svc.kill()
        dest.release.set()
        with JobStore(svc.state / "jobs.sqlite", create=False) as store:
            assert store.counts()["deliveries"]["delivered"] == 5
        svc.start()
        with JobStore(svc.state / "jobs.sqlite", create=False) as store:
            wait_until(
                lambda: store.counts()["deliveries"]["delivered"] == 8,
                120,
                what="all 8 results delivered",
            )
        time.sleep(0.5)
    finally:
        dest.release.set()
        svc.close()
        dest.stop()
    counts = dest.counts()
    assert len(counts) == 8 and set(counts.values()) == {1}, counts


@pytest.mark.timeout(600)
def test_repeated_kills_of_the_whole_service_do_not_fail_the_job_they_interrupt(
    tmp_path: Path,
) -> None:
    """A job interrupted by three kill -9 of the whole service (not a worker crash seen by a
    running service) is not charged for them: the fourth run analyses it instead of failing it
    as "worker_crashed" (max_job_attempts is 3)."""
    study, series = generate_uid(), generate_uid()
    images = [small_cr(study, series) for _ in range(4)]  # a job long enough to be caught
    svc = ServeProcess(
        tmp_path / "svc", fast_bundle(tmp_path / "bundle"), ["--quiet-period", "0.2", *WORKERS]
    )
    try:
        for k in range(3):
            svc.start()
            if k == 0:
                assert send(images, svc.port) == [0] * 4
            with JobStore(svc.state / "jobs.sqlite", create=False) as store:
                wait_until(
                    lambda: store.counts()["jobs"]["running"] == 1,
                    60,
                    interval=0.01,
                    what="the job to run",
                )
            svc.kill()
        svc.start()
        with JobStore(svc.state / "jobs.sqlite", create=False) as store:
            wait_until(
                lambda: store.counts()["jobs"]["delivered"] == 1,
                120,
                what="the job delivered",
            )
            (job,) = store.jobs()
            assert job.state == "delivered" and job.attempts == 1
    finally:
        svc.close()


@pytest.mark.timeout(600)
def test_kill_9_of_one_worker_of_two_loses_nothing(tmp_path: Path) -> None:
    """Two workers, batches of four: 48 images in 12 studies arrive; the worker holding a claim
    is killed with SIGKILL while the service runs. The other worker keeps working, only the
    dead worker's jobs go back to the queue, a new worker replaces it, and every image gets
    exactly one SR and one SC at the destination, with no job failed."""
    import sqlite3

    images = []
    for _ in range(12):
        study, series = generate_uid(), generate_uid()
        images += [small_cr(study, series) for _ in range(4)]
    dest = DestinationSCP(ae_title="PACS").start()
    svc = ServeProcess(
        tmp_path / "svc",
        fast_bundle(tmp_path / "bundle"),
        ["--destination", dest.address, "--quiet-period", "0.3", *WORKERS],
    )
    db = svc.state / "jobs.sqlite"
    try:
        svc.start()
        assert send(images, svc.port) == [0] * len(images)
        victim: list[str] = []

        def claimed() -> bool:
            con = sqlite3.connect(db, timeout=30)
            try:
                victim[:] = [
                    r[0]
                    for r in con.execute(
                        "SELECT claimed_by FROM jobs WHERE state = 'running' LIMIT 1"
                    )
                ]
            finally:
                con.close()
            return bool(victim)

        wait_until(claimed, 120, interval=0.02, what="a worker holding a claim")
        pid = int(victim[0].rsplit("/worker-", 1)[1])  # claimed as <node>/worker-<pid>
        os.kill(pid, signal.SIGKILL)
        with JobStore(db, create=False) as store:
            wait_until(
                lambda: store.counts()["instances"]["delivered"] == len(images),
                300,
                interval=0.5,
                what=f"{len(images)} delivered instances",
            )
            counts = store.counts()
        time.sleep(0.5)
    finally:
        svc.close()
        dest.stop()
    log = svc.log.read_text()
    assert re.search(
        rf"worker \d \(process {pid}\) exited unexpectedly \(exit code -9\); its [1-9]\d* job", log
    )
    per_source = results_per_source(dest.received)
    expected = {str(ds.SOPInstanceUID) for ds in images}
    assert set(per_source) == expected
    assert all(c == {SR_CLASS: 1, SC_CLASS: 1} for c in per_source.values())
    assert counts["jobs"]["failed"] == 0 and counts["instances"]["failed"] == 0, counts
    # two workers loaded the model, then the replacement of the killed one
    assert len(set(re.findall(r"(worker-\d+): model", log))) == 3


def _running(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@pytest.mark.timeout(300)
def test_workers_do_not_outlive_a_killed_service(tmp_path: Path) -> None:
    """kill -9 of the service process alone (not its group) leaves no worker behind polling
    the job store: each notices within seconds and stops, so a restarted service is alone."""
    svc = ServeProcess(tmp_path / "svc", fast_bundle(tmp_path / "bundle"), WORKERS)
    try:
        svc.start()
        pids = [int(p) for p in re.findall(r"worker-(\d+): model", svc.log.read_text())]
        assert len(pids) == 2 and all(_running(p) for p in pids)
        assert svc.proc is not None
        os.kill(svc.proc.pid, signal.SIGKILL)
        wait_until(
            lambda: not any(_running(p) for p in pids), 30, what="the orphaned workers to stop"
        )
    finally:
        svc.close()
