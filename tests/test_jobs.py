"""The durable job store, the spool, header triage and the service configuration."""

from __future__ import annotations

import sqlite3
import stat
from pathlib import Path

import pydicom
import pytest
from pacs_helpers import basic_sr, chest_cr, ct_slice, lateral_cr

from pacs_listener.config import (
    ROLES,
    AllowedCaller,
    ConfigError,
    Destination,
    RetryPolicy,
    ServiceConfig,
    load_toml,
)
from pacs_listener.jobs import JobStore, LeaseLost, ResultFile
from pacs_listener.spool import Spool, atomic_write, safe_name
from pacs_listener.store import INTEGRITY_ERRORS
from pacs_listener.triage import triage

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request, tmp_path: Path):
    """A new job store on each backend: SQLite in the state folder, and a new database in
    a real PostgreSQL cluster (``tests/postgres.py``) with a storage root beside it."""
    if request.param == "sqlite":
        s = JobStore(tmp_path / "state" / "jobs.sqlite")
    else:
        s = JobStore(request.getfixturevalue("postgres_url"), root=tmp_path / "storage")
    yield s
    s.close()


def _reopen(store: JobStore, **kw) -> JobStore:
    """Another handle on the same store (another process would open it so)."""
    return JobStore(store.location, root=store.root, **kw)


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def _received(store: JobStore, study: str, n: int, now: float, tmp: Path) -> list[str]:
    uids = []
    for i in range(n):
        uid = f"1.2.3.{study}.{int(now)}.{i}"
        store.add_instance(uid, study, path=tmp / f"{uid}.dcm", now=now)
        uids.append(uid)
    return uids


def _results(job_id: int, sop: str, tmp: Path) -> list[ResultFile]:
    return [
        ResultFile(k, f"9.{job_id}.{sop}.{k}", "1.2", tmp / f"{sop}.{k}.dcm") for k in ("sr", "sc")
    ]


def test_store_is_private_wal_and_fully_synchronous(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "state" / "jobs.sqlite")
    assert _mode(tmp_path / "state") == 0o700
    assert _mode(store.path) == 0o600
    assert store.pragma("journal_mode") == "wal"
    assert store.pragma("synchronous") == 2  # FULL
    store.add_instance("1.2.3", "1.2")
    for suffix in ("-wal", "-shm"):
        side = Path(str(store.path) + suffix)
        if side.exists():
            assert _mode(side) == 0o600


def test_duplicate_instance_is_not_added_twice(store: JobStore) -> None:
    assert store.add_instance("1.2.3", "1.2")
    assert not store.add_instance("1.2.3", "1.2")
    assert store.seen("1.2.3") == "duplicate"
    assert store.seen("1.2.4") is None
    assert store.counts()["duplicates"] == 1


def test_study_is_grouped_after_quiet_period_only(store: JobStore, tmp_path: Path) -> None:
    _received(store, "7", 2, now=100.0, tmp=tmp_path)
    store.add_instance("1.2.3.7.ct", "7", state="skipped", reason="wrong_modality", now=104.0)
    assert store.group_stable_studies(5.0, now=108.0) == []  # a CT slice arrived at 104
    jobs = store.group_stable_studies(5.0, now=109.5)
    assert [j.study_instance_uid for j in jobs] == ["7"]
    assert [i.state for i in store.job_instances(jobs[0].id)] == ["grouped", "grouped"]
    # an instance arriving later forms a new job of the same study
    _received(store, "7", 1, now=200.0, tmp=tmp_path / "late")
    jobs2 = store.group_stable_studies(5.0, now=210.0)
    assert len(jobs2) == 1 and jobs2[0].id != jobs[0].id


def test_job_runs_to_delivered_and_deliveries_are_exactly_once(
    store: JobStore, tmp_path: Path
) -> None:
    uids = _received(store, "5", 2, now=0.0, tmp=tmp_path)
    (job,) = store.group_stable_studies(1.0, now=10.0)
    claimed = store.claim_job("w1")
    assert claimed.id == job.id and claimed.state == "running"
    assert store.claim_job("w2") is None
    store.record_results(job.id, uids[0], _results(job.id, uids[0], tmp_path), ["A", "B"])
    with pytest.raises(INTEGRITY_ERRORS):  # one SR + one SC per image, ever
        store.record_results(job.id, uids[0], _results(job.id, uids[0], tmp_path), ["A"])
    store.set_instance_state(uids[1], "failed", "decode_failed: truncated")
    assert store.finish_job(job.id) == "results_written"
    due_a = store.due_deliveries(["A"])
    assert len(due_a) == 2 and {d.kind for d in due_a} == {"sr", "sc"}
    for d in due_a:
        store.delivery_succeeded(d.result_id, "A")
    assert store.due_deliveries(["A"]) == []
    assert store.job(job.id).state == "results_written"  # B still pending
    states = [store.delivery_succeeded(d.result_id, "B") for d in store.due_deliveries(["B"])]
    assert states[-1] == "delivered"
    assert store.instance(uids[0]).state == "delivered"
    assert store.instance(uids[1]).state == "failed"
    c = store.counts()
    assert c["deliveries"]["delivered"] == 4 and c["jobs"]["delivered"] == 1


def test_job_without_any_result_fails_with_reasons(store: JobStore, tmp_path: Path) -> None:
    uids = _received(store, "6", 1, now=0.0, tmp=tmp_path)
    (job,) = store.group_stable_studies(1.0, now=10.0)
    store.claim_job("w")
    store.set_instance_state(uids[0], "failed", "colour: the image is colour")
    assert store.finish_job(job.id) == "failed"
    assert store.job(job.id).reason == "1 image(s) failed: colour"
    assert store.requeue(job_id=job.id) == 1  # analyse again
    assert store.job(job.id).state == "grouped"
    assert store.instance(uids[0]).state == "grouped"


def test_backoff_dead_letter_and_requeue(store: JobStore, tmp_path: Path) -> None:
    uids = _received(store, "8", 1, now=0.0, tmp=tmp_path)
    (job,) = store.group_stable_studies(1.0, now=10.0)
    store.claim_job("w")
    store.record_results(job.id, uids[0], _results(job.id, uids[0], tmp_path)[:1], ["D"], now=0)
    policy = RetryPolicy(base_delay=2.0, max_delay=5.0, max_tries=3)
    assert [policy.delay(n) for n in (1, 2, 3, 4)] == [2.0, 4.0, 5.0, 5.0]
    store.finish_job(job.id, now=0)
    (d,) = store.due_deliveries(["D"], now=0)
    assert store.delivery_failed(d.result_id, "D", "refused", policy, now=0) == "pending"
    assert store.due_deliveries(["D"], now=1.9) == []  # backing off
    assert store.due_deliveries(["D"], now=2.0)
    assert store.delivery_failed(d.result_id, "D", "refused", policy, now=2) == "pending"
    assert store.delivery_failed(d.result_id, "D", "refused", policy, now=6) == "dead"
    job_after = store.job(job.id)
    assert job_after.state == "dead" and "refused" in job_after.reason
    assert store.instance(uids[0]).state == "dead"
    assert store.due_deliveries(["D"], now=1e12) == []
    assert store.requeue(all_dead=True) == 1
    assert store.job(job.id).state == "results_written"
    (again,) = store.due_deliveries(["D"])
    assert again.tries == 0


def test_unfinished_job_resumes_after_restart(tmp_path: Path) -> None:
    path = tmp_path / "jobs.sqlite"
    s1 = JobStore(path)
    _received(s1, "9", 1, now=0.0, tmp=tmp_path)
    (job,) = s1.group_stable_studies(1.0, now=10.0)
    s1.claim_job("dead-worker")
    s1.close()  # the process "crashes" with the job running
    s2 = JobStore(path)
    assert s2.release_running() == 1
    again = s2.claim_job("new-worker")
    assert again.id == job.id and again.attempts == 2
    s2.release_running()
    s2.claim_job("x")
    s2.release_running()
    assert s2.claim_job("y", max_attempts=3) is None  # crashed the worker 3 times: failed
    assert s2.job(job.id).state == "failed"
    assert s2.job(job.id).reason.startswith("worker_crashed")
    s2.close()


def test_status_store_must_exist(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        JobStore(tmp_path / "nope.sqlite", create=False)


def test_spool_writes_atomically_and_privately(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    p = spool.write("1.2.3", "1.2.3.4", b"DICM" * 10)
    assert p.read_bytes() == b"DICM" * 10
    assert _mode(p) == 0o600 and _mode(p.parent) == 0o700 and _mode(spool.root) == 0o700
    assert not list(spool.root.rglob("*.tmp"))
    (p.parent / ".x.dcm.1.abc.tmp").write_bytes(b"half")
    assert spool.clean_temporary() == 1
    assert safe_name("1.2.840.10008.1") == "1.2.840.10008.1"
    assert "/" not in safe_name("../../etc/passwd") and safe_name("../x").startswith("x")


def test_atomic_write_leaves_no_partial_file(tmp_path: Path) -> None:
    target = tmp_path / "missing-dir" / "f.dcm"
    with pytest.raises(OSError):
        atomic_write(target, b"x")
    assert not target.exists()


@pytest.mark.parametrize(
    ("make", "candidate", "reason"),
    [
        (lambda: chest_cr(), True, ""),
        (lambda: chest_cr(name="chest_dx_presentation.dcm"), True, ""),
        (lambda: ct_slice(), False, "wrong_modality"),
        (lambda: basic_sr(), False, "not_image"),
        (lambda: lateral_cr(), False, "lateral_view"),
    ],
    ids=["cr", "dx", "ct", "sr", "lateral"],
)
def test_triage(make, candidate: bool, reason: str) -> None:
    v = triage(make())
    assert (v.candidate, v.reason) == (candidate, reason)
    assert "Zyxwvutsrq" not in v.detail


@pytest.mark.parametrize(
    ("keyword", "value"),
    [("Manufacturer", "dicom-covid developers"), ("Manufacturer", "DICOM-COVID")],
)
def test_triage_recognises_our_own_results(keyword: str, value: str) -> None:
    ds = chest_cr()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"  # a Secondary Capture like ours
    assert triage(ds).candidate
    setattr(ds, keyword, value)
    assert triage(ds).reason == "own_result"
    other = chest_cr()
    item = pydicom.Dataset()
    item.Manufacturer = "dicom-covid developers"
    other.ContributingEquipmentSequence = [item]
    assert triage(other).reason == "own_result"


def test_triage_other_body_part_and_colour() -> None:
    ds = chest_cr()
    ds.BodyPartExamined = "HAND"
    assert triage(ds).reason == "not_chest"
    ds = chest_cr()
    ds.PhotometricInterpretation = "RGB"
    assert triage(ds).reason == "colour"


def test_config_parsing_and_toml(tmp_path: Path) -> None:
    d = Destination.parse("ORTHANC@127.0.0.1:4242")
    assert (d.ae_title, d.host, d.port) == ("ORTHANC", "127.0.0.1", 4242)
    assert str(Destination.parse("PACS@[::1]:104")) == "PACS@[::1]:104"
    for bad in ("ORTHANC", "ORTHANC@host", "@h:1", "A@h:99999", "A" * 17 + "@h:1"):
        with pytest.raises(ConfigError):
            Destination.parse(bad)
    assert AllowedCaller.parse("PACS@10.0.0.5") == AllowedCaller("PACS", "10.0.0.5")
    toml = tmp_path / "serve.toml"
    toml.write_text(
        'state_dir = "state"\nquiet_period = 1.5\ndestinations = ["A@127.0.0.1:1"]\n'
        '[scp]\nport = 1234\nallowed_callers = ["ORTHANC"]\n[retry]\nmax_tries = 2\n'
    )
    cfg = ServiceConfig.from_mapping(load_toml(toml), root=tmp_path)
    assert cfg.state_dir == tmp_path / "state" and cfg.quiet_period == 1.5
    assert cfg.scp.port == 1234 and cfg.scp.allowed_callers == (AllowedCaller("ORTHANC"),)
    assert cfg.retry.max_tries == 2 and cfg.destinations[0].port == 1
    assert cfg.sender().targets() == ("A@127.0.0.1:1",)
    assert ServiceConfig(state_dir=tmp_path).sender().targets() == (
        f"dir:{(tmp_path / 'output').resolve()}",
    )
    # the CLI's flags go over the file's values, the rest of the file stays
    cli = cfg.override(scp={"port": 4321}, retry={"base_delay": 0.5}, quiet_period=2.0)
    assert cli.scp.port == 4321 and cli.scp.allowed_callers == (AllowedCaller("ORTHANC"),)
    assert cli.retry.base_delay == 0.5 and cli.retry.max_tries == 2 and cli.quiet_period == 2.0
    with pytest.raises(ConfigError, match="nonsense"):
        cfg.override(scp={"nonsense": 1})
    toml.write_text("bogus = 1\n")
    with pytest.raises(ConfigError, match="bogus"):
        ServiceConfig.from_mapping(load_toml(toml))


def test_job_waiting_for_disk_backs_off_and_never_fails(store: JobStore, tmp_path: Path) -> None:
    uids = _received(store, "7", 2, now=1000.0, tmp=tmp_path)
    [job] = store.group_stable_studies(5, now=1010.0)
    assert store.claim_job("w", now=1010.0).id == job.id
    store.set_instance_state(uids[0], "inferred")
    assert store.wait_for_disk(job.id, "disk full", 2.0, 5.0, now=1010.0) == 2.0
    assert store.job(job.id).state == "waiting_for_disk"
    assert store.instance(uids[0]).state == "grouped"  # analysed again when it resumes
    backlog = store.counts(now=1011.0)["backlog"]
    assert backlog["jobs_waiting_for_disk"] == 1 and backlog["next_disk_retry_in_s"] == 1.0
    assert store.claim_job("w", now=1011.0) is None  # not yet
    delays = []
    now = 1012.0
    for _ in range(6):  # many more waits than max_job_attempts: never failed for it
        claimed = store.claim_job("w", max_attempts=3, now=now)
        assert claimed is not None and claimed.id == job.id and claimed.attempts == 1
        delays.append(store.wait_for_disk(job.id, "disk full", 2.0, 5.0, now=now))
        now += delays[-1]
    assert delays == [4.0, 5.0, 5.0, 5.0, 5.0, 5.0]  # doubling, capped
    assert store.counts(now=now)["backlog"]["disk_waits"] == 7
    claimed = store.claim_job("w", now=now)
    for uid in uids:
        store.record_results(job.id, uid, _results(job.id, uid, tmp_path), ["dir:/x"], now=now)
    assert store.finish_job(job.id) == "results_written"
    assert store.counts()["backlog"]["jobs_waiting_for_disk"] == 0


def test_space_for_results_still_to_write_is_reserved(store: JobStore, tmp_path: Path) -> None:
    store.add_instance("1.1", "9", path=tmp_path / "a.dcm", reserve_bytes=3000)
    store.add_instance("1.2", "9", path=tmp_path / "b.dcm", reserve_bytes=4000)
    store.add_instance("1.3", "9", state="skipped", reason="not_image", reserve_bytes=0)
    assert store.pending_result_bytes() == 7000
    [job] = store.group_stable_studies(0)
    store.claim_job("w")
    store.record_results(job.id, "1.1", _results(job.id, "1.1", tmp_path), ["dir:/x"])
    assert store.pending_result_bytes() == 4000  # 1.1's results are written


def test_version_1_store_gains_the_new_columns(tmp_path: Path) -> None:
    path = tmp_path / "jobs.sqlite"
    con = sqlite3.connect(path)
    con.executescript(
        "CREATE TABLE jobs (id INTEGER PRIMARY KEY AUTOINCREMENT, study_instance_uid TEXT NOT "
        "NULL, state TEXT NOT NULL, reason TEXT, attempts INTEGER NOT NULL DEFAULT 0, claimed_by "
        "TEXT, created_at REAL NOT NULL, updated_at REAL NOT NULL, started_at REAL, finished_at "
        "REAL, delivered_at REAL);"
        "CREATE TABLE instances (sop_instance_uid TEXT PRIMARY KEY, study_instance_uid TEXT NOT "
        "NULL, series_instance_uid TEXT NOT NULL DEFAULT '', sop_class_uid TEXT NOT NULL DEFAULT "
        "'', calling_ae TEXT NOT NULL DEFAULT '', path TEXT, state TEXT NOT NULL, reason TEXT, "
        "job_id INTEGER, duplicates INTEGER NOT NULL DEFAULT 0, received_at REAL NOT NULL, "
        "updated_at REAL NOT NULL);"
        "INSERT INTO instances VALUES ('1.1', '9', '', '', '', 'a.dcm', 'received', NULL, NULL, "
        "0, 1.0, 1.0);"
    )
    con.commit()
    con.close()
    with JobStore(path) as store:
        assert store.instance("1.1").reserve_bytes == 0
        assert store.pending_result_bytes() == 0
        [job] = store.group_stable_studies(0)
        store.claim_job("w")
        assert store.wait_for_disk(job.id, "full", 1.0, 2.0) == 1.0


def test_disk_full_errors_are_recognised() -> None:
    import errno

    from pacs_listener.spool import is_disk_full

    assert is_disk_full(OSError(errno.ENOSPC, "No space left on device"))
    assert is_disk_full(OSError(errno.EDQUOT, "Disk quota exceeded"))
    assert is_disk_full(sqlite3.OperationalError("database or disk is full"))
    assert not is_disk_full(OSError(errno.EACCES, "Permission denied"))
    assert not is_disk_full(sqlite3.OperationalError("database is locked"))
    assert not is_disk_full(ValueError("x"))


def test_claim_jobs_fills_a_batch_across_studies(store: JobStore, tmp_path: Path) -> None:
    for study, n in (("1", 3), ("2", 2), ("3", 4), ("4", 1)):
        _received(store, study, n, now=0.0, tmp=tmp_path)
    jobs = store.group_stable_studies(1.0, now=10.0)
    assert len(jobs) == 4
    first = store.claim_jobs("w1", 5)
    assert [j.study_instance_uid for j in first] == ["1", "2"]  # 3 + 2 images
    assert all(j.state == "running" and j.attempts == 1 for j in first)
    # a job larger than the batch is still claimed, alone
    assert [j.study_instance_uid for j in store.claim_jobs("w2", 2)] == ["3"]
    assert [j.study_instance_uid for j in store.claim_jobs("w2", 8)] == ["4"]
    assert store.claim_jobs("w3", 8) == []
    assert {j.id: j.state for j in store.jobs()} == {j.id: "running" for j in jobs}


def test_dead_worker_releases_only_its_own_jobs(store: JobStore, tmp_path: Path) -> None:
    for study in ("1", "2"):
        _received(store, study, 1, now=0.0, tmp=tmp_path)
    store.group_stable_studies(1.0, now=10.0)
    (a,) = store.claim_jobs("worker-1", 1)
    (b,) = store.claim_jobs("worker-2", 1)
    assert store.release_running(claimed_by="worker-1") == 1
    states = {j.id: j.state for j in store.jobs()}
    assert states == {a.id: "grouped", b.id: "running"}
    again = store.claim_job("worker-3")
    assert again.id == a.id and again.attempts == 2  # the crash counts towards max_attempts


def _claim_all(location: str, root: str, name: str, out) -> None:
    s = JobStore(location, create=False, root=Path(root))
    got = []
    while True:
        jobs = s.claim_jobs(name, 3)
        if not jobs:
            break
        got += [j.id for j in jobs]
    s.close()
    out.put(got)


def test_claims_are_exclusive_across_processes(store: JobStore, tmp_path: Path) -> None:
    import multiprocessing

    for s in range(60):
        _received(store, str(s), 1 + s % 3, now=0.0, tmp=tmp_path)
    assert len(store.group_stable_studies(1.0, now=10.0)) == 60
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    procs = [
        ctx.Process(target=_claim_all, args=(str(store.location), str(store.root), f"w{i}", out))
        for i in range(4)
    ]
    for p in procs:
        p.start()
    claimed = [out.get(timeout=50) for _ in procs]
    for p in procs:
        p.join(10)
    ids = [i for got in claimed for i in got]
    assert len(ids) == 60 and len(set(ids)) == 60  # every job once, by one worker


def test_the_store_refuses_state_changes_its_machine_does_not_allow(
    store: JobStore, tmp_path: Path
) -> None:
    """The state machines of :mod:`pacs_listener.states` are triggers: even raw SQL cannot
    take a delivered job back to running or a skipped instance into the pipeline."""
    from pacs_listener.states import JOB_TRANSITIONS, JobState, allowed

    uids = _received(store, "5", 1, now=0.0, tmp=tmp_path)
    store.add_instance("1.2.3.skip", "5", state="skipped", reason="wrong_modality", now=0.0)
    (job,) = store.group_stable_studies(1.0, now=10.0)
    store.claim_job("w")
    store.record_results(job.id, uids[0], _results(job.id, uids[0], tmp_path), [])
    assert store.finish_job(job.id) == "delivered"  # no targets: delivered at once
    con = _reopen(store)._con()  # raw SQL on a connection of its own (autocommit)
    for sql in (
        "UPDATE jobs SET state = 'running'",
        "UPDATE instances SET state = 'grouped' WHERE sop_instance_uid = '1.2.3.skip'",
        "UPDATE instances SET state = 'received' WHERE sop_instance_uid = '1.2.3.5.0.0'",
    ):
        with pytest.raises(INTEGRITY_ERRORS, match="state machine"):
            con.execute(sql)
    con.execute("UPDATE jobs SET state = 'delivered'")  # the same state is always allowed
    con.close()
    assert store.job(job.id).state is JobState.DELIVERED
    assert not allowed(JOB_TRANSITIONS, "delivered", "running")
    assert allowed(JOB_TRANSITIONS, "failed", "grouped")


def test_a_store_from_a_newer_version_is_not_opened(tmp_path: Path) -> None:
    from pacs_listener.jobs import StoreError

    path = tmp_path / "jobs.sqlite"
    JobStore(path).close()
    con = sqlite3.connect(path)
    con.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    con.commit()
    con.close()
    for create in (True, False):
        with pytest.raises(StoreError, match="schema version 99, written by a newer"):
            JobStore(path, create=create)


def test_an_expired_lease_is_taken_over_and_the_old_owner_records_nothing(
    store: JobStore, tmp_path: Path
) -> None:
    """A worker that stops renewing its lease (its node died, it froze) loses the job after
    the lease; should it wake up, its results are refused, so the job is done once."""
    uids = _received(store, "8", 1, now=0.0, tmp=tmp_path)
    (job,) = store.group_stable_studies(1.0, now=10.0)
    store.lease = 30.0
    (a,) = store.claim_jobs("node-a/worker-1", 4, now=100.0)
    assert store.claim_jobs("node-b/worker-1", 4, now=120.0) == []  # lease still held
    assert store.renew_leases("node-a/worker-1", now=125.0) == 1  # renewed to 155
    assert store.claim_jobs("node-b/worker-1", 4, now=150.0) == []
    (b,) = store.claim_jobs("node-b/worker-1", 4, now=156.0)  # expired: taken over
    assert b.id == a.id and b.attempts == 2 and b.images == 1
    with pytest.raises(LeaseLost):
        store.record_results(
            job.id, uids[0], _results(job.id, uids[0], tmp_path), [], worker="node-a/worker-1"
        )
    with pytest.raises(LeaseLost):
        store.finish_job(job.id, worker="node-a/worker-1")
    assert store.results(job.id) == []
    store.record_results(
        job.id, uids[0], _results(job.id, uids[0], tmp_path), [], worker="node-b/worker-1"
    )
    assert store.finish_job(job.id, worker="node-b/worker-1") == "delivered"
    assert len(store.results(job.id)) == 2


def test_a_restarting_node_releases_only_its_own_claims(store: JobStore, tmp_path: Path) -> None:
    for study in ("1", "2", "3"):
        _received(store, study, 1, now=0.0, tmp=tmp_path)
    store.group_stable_studies(1.0, now=10.0)
    store.claim_jobs("node-a/worker-7", 1)
    store.claim_jobs("node-a.b/worker-8", 1)  # a node whose name starts like the other's
    store.claim_jobs("node-b/worker-9", 1)
    for node, pid in (("node-a", 1), ("node-a.b", 2), ("node-b", 3)):
        store.heartbeat(node, host="h", pid=pid, roles="worker", version="1", started_at=0.0)
    assert {n.node_id: n.leases for n in store.nodes()} == {"node-a": 1, "node-a.b": 1, "node-b": 1}
    assert store.release_running(count_attempt=False, node="node-a") == 1
    running = {j.id for j in store.jobs(["running"])}
    assert len(running) == 2
    again = store.claim_job("node-c/worker-1")
    assert again.attempts == 0 + 1  # a node restart does not count against the job
    assert {n.node_id: n.leases for n in store.nodes()}["node-a"] == 0


def test_due_deliveries_are_claimed_on_a_shared_store(store: JobStore, tmp_path: Path) -> None:
    """Two senders of a shared store never get the same delivery at once; after the lease
    the delivery is due again (its sender died before recording the outcome)."""
    uids = _received(store, "9", 2, now=0.0, tmp=tmp_path)
    (job,) = store.group_stable_studies(1.0, now=10.0)
    store.claim_job("w")
    for uid in uids:
        store.record_results(job.id, uid, _results(job.id, uid, tmp_path), ["PACS@h:1"], now=20.0)
    first = store.due_deliveries(["PACS@h:1"], now=30.0)
    assert len(first) == 4
    second = store.due_deliveries(["PACS@h:1"], now=31.0)
    if store.shared:
        assert second == []
        later = store.due_deliveries(["PACS@h:1"], now=30.0 + store.lease + 1)
        assert {d.result_id for d in later} == {d.result_id for d in first}
    else:  # one machine, one sender: nothing to claim
        assert len(second) == 4


def test_scale_out_settings(tmp_path: Path) -> None:
    """Roles, the shared store URL, the storage root and the node id, from TOML and checked."""
    toml = tmp_path / "node.toml"
    toml.write_text(
        'job_store = "postgresql://dc@db/dc"\nstorage_root = "shared"\nrole = "listener,sender"\n'
        'node_id = "node-a"\nlease = 20\n'
    )
    c = ServiceConfig.from_mapping(load_toml(toml), root=tmp_path)
    assert c.store_location == "postgresql://dc@db/dc"
    assert c.spool_dir == tmp_path / "shared" / "spool"
    assert c.results_dir == tmp_path / "shared" / "results"
    assert c.roles == ("listener", "sender") and c.node == "node-a" and c.lease == 20.0
    one = ServiceConfig(state_dir=tmp_path / "s")  # one machine: nothing changes
    assert one.store_location == tmp_path / "s" / "jobs.sqlite"
    assert one.spool_dir == tmp_path / "s" / "spool" and one.roles == ROLES
    # a default node id is stable for a state folder and differs between two of them
    assert one.node == ServiceConfig(state_dir=tmp_path / "s").node
    assert one.node != ServiceConfig(state_dir=tmp_path / "t").node
    for bad, match in (
        ({"role": "cook"}, "role 'cook' is not known"),
        ({"role": ""}, "is not known"),
        ({"job_store": "mysql://x"}, "must be a postgresql:// URL"),
        ({"lease": 1.0}, "at least 3 seconds"),
        ({"node_id": "a/b"}, "must be 1-64 letters"),
    ):
        with pytest.raises(ConfigError, match=match):
            ServiceConfig(**bad)


def test_a_store_url_password_never_reaches_messages() -> None:
    from pacs_listener.store import redact_url

    assert redact_url("postgresql://dc:s3cret@db:5432/dc") == "postgresql://dc:***@db:5432/dc"
    assert redact_url("postgresql://dc@db/dc") == "postgresql://dc@db/dc"
    assert redact_url(Path("/var/lib/x/jobs.sqlite")) == "/var/lib/x/jobs.sqlite"


def test_postgres_connections_stay_bounded_by_the_threads_alive(postgres_url, tmp_path) -> None:
    """The listener serves each association in its own thread; connections of ended threads
    are closed, so a long-running listener never exhausts the server's connections."""
    import threading

    store = JobStore(postgres_url, root=tmp_path)
    try:
        for i in range(30):  # thirty associations, one after the other
            t = threading.Thread(target=store.add_instance, args=(f"1.2.{i}", "1.2"))
            t.start()
            t.join()
        store.add_instance("1.2.main", "1.2")  # a new connection closes the ended threads' ones
        assert store.backend.open_connections <= 2
        con = store._con()
        n = con.execute(
            "SELECT COUNT(*) FROM pg_stat_activity WHERE datname = current_database()"
        ).fetchone()[0]
        assert n <= 3, n
        assert store.counts()["instances"]["received"] == 31
    finally:
        store.close()
