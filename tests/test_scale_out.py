"""Scale-out: several ``serve`` nodes share one PostgreSQL job store and one storage root.

Two listener nodes (each also a sender) and two worker nodes, every one a real
``dicom-covid serve`` in its own process group with its own state folder, share a throw-away
PostgreSQL cluster (``tests/postgres.py``) and a storage root (a local folder here; NFS or SMB
in production). Two dcmtk ``storescu`` senders send 200 chest radiographs in 50 studies, half
to each listener. Midway, the worker node holding a claim is killed with SIGKILL (its service
and worker process, as a power cut would), and one listener is killed and restarted, after
which what its ``storescu`` was not acknowledged is sent again, as a PACS would.

The dead worker node's jobs are taken over by the other worker node once their lease expires
(``--lease``); at the end every acknowledged instance has exactly one SR and one SC at the
destination (a real pynetdicom storage SCP; a re-send of the same SOP Instance UID is allowed),
and nothing failed.
"""

from __future__ import annotations

import os
import re
import subprocess
import threading
import time
from pathlib import Path

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
from live_service import ServeProcess, run_cli
from pacs_helpers import PATIENT_ID, PATIENT_NAME, DestinationSCP, wait_until
from pydicom.uid import generate_uid

from pacs_listener.jobs import JobStore

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

STUDIES = 50
PER_STUDY = 4
LEASE = 8.0


def _require_storescu() -> None:
    if subprocess.run(["which", STORESCU], capture_output=True).returncode != 0:
        if os.environ.get("CI") == "true":
            pytest.fail("CI needs dcmtk's storescu (apt-get install dcmtk)")
        pytest.skip("dcmtk storescu not installed")


def test_two_listeners_two_workers_one_postgresql_lose_nothing(
    tmp_path: Path, postgres_url: str, record_property
) -> None:
    _require_storescu()
    t0 = time.monotonic()
    files: list[list[Path]] = [[], []]  # per listener
    uid_of: dict[Path, str] = {}
    for s in range(STUDIES):
        study, series = generate_uid(), generate_uid()
        folder = tmp_path / "data" / f"s{s:02d}"
        folder.mkdir(parents=True)
        for i in range(PER_STUDY):
            ds = small_cr(study, series)
            path = folder / f"{i}.dcm"
            ds.save_as(path, enforce_file_format=True)
            files[s % 2].append(path)
            uid_of[path] = str(ds.SOPInstanceUID)
    bundle = fast_bundle(tmp_path / "bundle")
    shared = tmp_path / "shared"
    dest = DestinationSCP(ae_title="PACS").start()
    common = [
        "--job-store",
        postgres_url,
        "--storage-root",
        str(shared),
        "--lease",
        str(LEASE),
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
    ]

    def node(name: str, role: str, *extra: str) -> ServeProcess:
        return ServeProcess(
            tmp_path / name, bundle, [*common, "--role", role, "--node-id", name, *extra]
        )

    listeners = [node(f"listener-{i}", "listener,sender") for i in (1, 2)]
    workers = [node(f"worker-{i}", "worker", "--workers", "1", "--batch-size", "4") for i in (1, 2)]
    nodes = [*listeners, *workers]
    acked: set[Path] = set()
    victim: list[int] = []
    try:
        for n in nodes:
            n.start()
        senders = [
            storescu(files[i], listeners[i].port, tmp_path / f"storescu{i}.log") for i in (0, 1)
        ]
        store = JobStore(postgres_url, create=False, root=shared)
        log1 = tmp_path / "storescu1.log"
        wait_until(
            lambda: log1.read_text().count("Received Store Response (Success)") >= 25,
            120,
            interval=0.02,
            what="25 instances acknowledged by listener-2",
        )
        listeners[1].kill()  # kill -9 of a listener in the middle of its association
        senders[1].wait(120)
        done = acknowledged(log1.read_text())
        acked |= {p for p in files[1] if str(p) in done}
        pending = [p for p in files[1] if p not in acked]
        assert pending, "listener-2 was killed after storescu had finished"
        listeners[1].start()  # restarted; what it did not acknowledge is sent again
        senders[1] = storescu(pending, listeners[1].port, tmp_path / "storescu1b.log")

        def worker_1_holds_a_claim() -> bool:
            return any(n.node_id == "worker-1" and n.leases for n in store.nodes())

        wait_until(worker_1_holds_a_claim, 240, interval=0.05, what="worker-1 holding a claim")
        victim = [j.id for j in store.jobs(["running"])]
        killed_at = time.monotonic()
        taken: list[float] = []

        def watch_takeover() -> None:  # when worker-2 logs the first takeover
            while not taken and time.monotonic() - killed_at < 300:
                if "taken over" in workers[1].log.read_text(errors="replace"):
                    taken.append(time.monotonic() - killed_at)
                time.sleep(0.2)

        threading.Thread(target=watch_takeover, daemon=True).start()
        workers[0].kill()  # kill -9 of the node: its service and its worker process
        for i, log in ((0, "storescu0.log"), (1, "storescu1b.log")):
            senders[i].wait(300)
            done = acknowledged((tmp_path / log).read_text())
            acked |= {p for p in files[i] if str(p) in done}
        assert acked == set(uid_of), f"{len(uid_of) - len(acked)} instance(s) never acknowledged"
        expected = {uid_of[p] for p in acked}
        wait_until(
            lambda: store.counts()["instances"]["delivered"] == len(expected),
            600,
            interval=0.5,
            what=f"{len(expected)} delivered instances",
        )
        counts = store.counts()
        takeover_s = taken[0] if taken else float("inf")
        status = run_cli("status", "--job-store", postgres_url, "--storage-root", str(shared))
        store.close()
        time.sleep(1.0)  # anything sent twice would arrive now
    finally:
        for n in nodes:
            n.close()
        dest.stop()
    took_over = re.findall(
        r"job (\d+): the lease of worker-1/worker-\d+ expired (\d+) s ago",
        workers[1].log.read_text(),
    )
    per_source = results_per_source(dest.received)
    arrivals = dest.counts()
    lost = sorted(expected - set(per_source))
    wrong = {s: dict(c) for s, c in per_source.items() if c != {SR_CLASS: 1, SC_CLASS: 1}}
    redelivered = sum(n - 1 for n in arrivals.values())
    summary = (
        f"{len(uid_of)} instances in {STUDIES} studies to 2 listeners, 2 worker nodes; "
        f"listener-2 killed after {len(done)} of {len(files[1])} and restarted, worker-1 "
        f"killed while {len(victim)} job(s) ran; "
        f"{len(acked)} acknowledged, {len(lost)} lost, {len(wrong)} with duplicate results, "
        f"{len(took_over)} job(s) taken over (lease {LEASE:.0f} s; claimed again "
        f"{', '.join(ago for _, ago in took_over)} s after it expired, "
        f"first {takeover_s:.0f} s after the kill), {redelivered} "
        f"result(s) re-delivered with the same UID, {time.monotonic() - t0:.0f} s"
    )
    print(summary)
    record_property("scale_out", summary)
    assert not lost, f"acknowledged but never analysed: {lost[:5]}"
    assert not wrong, f"sources without exactly one SR and one SC: {list(wrong.items())[:5]}"
    assert set(per_source) == expected
    assert counts["jobs"]["failed"] == 0 and counts["instances"]["failed"] == 0, counts
    assert took_over, "worker-2 never took over the dead node's jobs"
    # the lease lapses at most LEASE after the kill (renewed every third of it), and worker-2
    # claims the job as soon as it is free again (within one batch and poll)
    assert all(float(ago) <= LEASE for _, ago in took_over), took_over
    assert takeover_s <= 2 * LEASE + 30, summary
    assert "node        worker-2 (worker" in status.stdout, status.stdout
    assert "node        listener-1 (listener,sender" in status.stdout, status.stdout
    for n in nodes:  # logs without patient data, on every node
        text = n.log.read_text() + n.output()
        assert PATIENT_NAME not in text and PATIENT_ID not in text


def _lua_order(study_id: str, names: list[str]) -> list[str]:
    """The listener order ``deploy/orthanc/forward.lua`` gives a study (its hash, in Python)."""
    h = 0
    for ch in study_id.encode():
        h = (h * 31 + ch) % 1000003
    names = sorted(names)
    return [names[(h + k) % len(names)] for k in range(len(names))]


def _orthanc_study_id(patient_id: str, study_uid: str) -> str:
    """Orthanc's id of a study: SHA-1 of ``PatientID|StudyInstanceUID`` in five groups."""
    import hashlib

    h = hashlib.sha1(f"{patient_id}|{study_uid}".encode()).hexdigest()
    return "-".join(h[i : i + 8] for i in range(0, 40, 8))


@pytest.mark.timeout(300)
def test_orthanc_spreads_studies_over_listeners_and_skips_a_dead_one(tmp_path: Path) -> None:
    """A real Orthanc with the deploy Lua script and three listener entries, the second of
    which is down: each study goes to the listener its Orthanc id picks, or, when that one is
    down, to the next; every instance arrives exactly once."""
    from orthanc import available, running_orthanc
    from pacs_helpers import chest_cr, free_port, send

    if not available():
        if os.environ.get("CI") == "true":
            pytest.fail("CI needs Orthanc (apt-get install orthanc)")
        pytest.skip("Orthanc not installed")
    names = ["dicomcovid-1", "dicomcovid-2", "dicomcovid-3"]
    images: list = []
    while len(images) < 8 or sum(first == "dicomcovid-2" for first in _firsts(images, names)) < 2:
        images.append(chest_cr())  # one-image studies, at least two assigned to the dead one
    live = [DestinationSCP(ae_title="DICOMCOVID").start() for _ in range(2)]
    ports = [live[0].port, free_port(), live[1].port]  # dicomcovid-2 listens nowhere
    by_name = {"dicomcovid-1": live[0], "dicomcovid-3": live[1]}
    try:
        with running_orthanc(tmp_path / "orthanc", 0, listeners=ports) as pacs:
            statuses = send(images, pacs.dicom_port, called="ORTHANC", calling="MODALITY")
            assert statuses == [0] * len(images)
            wait_until(
                lambda: sum(len(d.received) for d in live) >= len(images),
                120,
                interval=0.3,
                what="every study forwarded",
            )
            time.sleep(2.0)  # anything forwarded twice would arrive now
            study_ids = [pacs.study_id(str(ds.StudyInstanceUID)) for ds in images]
            log = pacs.log()
    finally:
        for d in live:
            d.stop()
    expected = {
        str(ds.SOPInstanceUID): next(n for n in _lua_order(sid, names) if n in by_name)
        for ds, sid in zip(images, study_ids, strict=True)
    }
    got = {str(ds.SOPInstanceUID): name for name, d in by_name.items() for ds in d.received}
    assert sum(d.counts().total() for d in live) == len(images), "an instance arrived twice"
    assert got == expected
    dead_first = [sid for sid in study_ids if _lua_order(sid, names)[0] == "dicomcovid-2"]
    assert len(dead_first) >= 2  # the failover was exercised
    for sid in dead_first:
        assert f"dicomcovid-2 did not take study {sid}" in log


def _firsts(images: list, names: list[str]) -> list[str]:
    return [
        _lua_order(_orthanc_study_id(str(ds.PatientID), str(ds.StudyInstanceUID)), names)[0]
        for ds in images
    ]


@pytest.mark.timeout(300)
def test_status_and_retry_work_against_a_shared_store(tmp_path: Path, postgres) -> None:
    """``status`` and ``retry`` take ``--job-store`` as ``serve`` does; an empty database is
    refused with a message."""
    from pacs_listener.config import RetryPolicy
    from pacs_listener.jobs import ResultFile

    empty = postgres.new_database()
    out = run_cli("status", "--job-store", empty, "--storage-root", str(tmp_path))
    assert out.returncode == 1 and "holds no dicom-covid job store" in out.stderr
    url = postgres.new_database()
    with JobStore(url, root=tmp_path) as store:
        store.add_instance("1.2.3.4", "1.2.3", path=tmp_path / "a.dcm", now=0.0)
        (job,) = store.group_stable_studies(1.0, now=10.0)
        store.claim_jobs("node-a/worker-1", 1)
        store.heartbeat("node-a", host="h", pid=1, roles="worker", version="x", started_at=0.0)
        results = [ResultFile(k, f"9.{k}", "1.2.3", tmp_path / f"{k}.dcm") for k in ("sr", "sc")]
        store.record_results(job.id, "1.2.3.4", results, ["PACS@127.0.0.1:1"])
        store.finish_job(job.id)
        for r in store.due_deliveries(["PACS@127.0.0.1:1"], now=time.time() + 3600):
            store.delivery_failed(r.result_id, r.target, "refused", RetryPolicy(max_tries=1))
        assert store.job(job.id).state == "dead"
    status = run_cli("status", "--job-store", url, "--storage-root", str(tmp_path))
    assert status.returncode == 0, status.stderr
    assert "deliveries  pending 0, delivered 0, dead 2" in status.stdout
    assert "node        node-a (worker; host h, pid 1)" in status.stdout
    assert "***" not in url and url.split("@")[-1] in status.stdout
    retry = run_cli("retry", "--job-store", url, "--storage-root", str(tmp_path), "--all-dead")
    assert retry.returncode == 0 and "re-queued 1 job(s)" in retry.stdout
    with JobStore(url, root=tmp_path, create=False) as store:
        assert store.counts()["deliveries"]["pending"] == 2
