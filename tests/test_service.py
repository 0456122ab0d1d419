"""The whole service: listener + grouping + worker process + sender, against real DICOM peers.

The service runs in-process (the worker in its own spawned process) or, for the restart tests, as
a real ``dicom-covid serve`` subprocess; the destination is a real pynetdicom storage SCP.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pydicom
import pytest
from pacs_helpers import (
    PATIENT_ID,
    PATIENT_NAME,
    DestinationSCP,
    LogRecorder,
    basic_sr,
    broken_pixels,
    chest_cr,
    ct_slice,
    free_port,
    model_bundle,
    send,
    wait_until,
)
from pydicom.uid import generate_uid
from typer.testing import CliRunner

from dicom_covid.cli.main import app
from pacs_listener.config import (
    AllowedCaller,
    Destination,
    RetryPolicy,
    ScpConfig,
    ServiceConfig,
    WorkerConfig,
)
from pacs_listener.jobs import JobStore, ResultFile
from pacs_listener.sender import Sender
from pacs_listener.service import Service, ServiceError

ROOT = Path(__file__).resolve().parent.parent
CLI = ROOT / ".venv" / "bin" / "dicom-covid"
SECRETS = (PATIENT_NAME, PATIENT_ID, "Zyxwvutsrq", "Qwertyuiop", "8675309")
SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.33"
SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return model_bundle(tmp_path_factory.mktemp("bundle"))


@pytest.fixture(scope="module")
def recorder():
    """Record every log record (of this process and, forwarded, of the worker)."""
    rec = LogRecorder()
    root = logging.getLogger()
    saved = root.level
    root.addHandler(rec)
    root.setLevel(logging.DEBUG)
    yield rec
    root.removeHandler(rec)
    root.setLevel(saved)


def _config(state: Path, bundle: Path, destinations: list[str], **kw: object) -> ServiceConfig:
    return ServiceConfig(
        state_dir=state,
        scp=ScpConfig(
            port=free_port(), allowed_callers=(AllowedCaller("ORTHANC"),), min_free_bytes=0
        ),
        destinations=tuple(Destination.parse(d) for d in destinations),
        quiet_period=kw.pop("quiet_period", 0.5),
        retry=kw.pop("retry", RetryPolicy(base_delay=0.2, max_delay=0.5, max_tries=5)),
        worker=WorkerConfig(bundle=bundle, poll_interval=0.2),
        **kw,
    )


@pytest.fixture(scope="module")
def running(tmp_path_factory, bundle: Path, recorder: LogRecorder):
    """One service delivering to one destination, shared by the tests of this module."""
    state = tmp_path_factory.mktemp("state")
    with DestinationSCP() as dest:
        svc = Service(_config(state, bundle, [dest.address]), log_level=logging.DEBUG)
        svc.start(wait_ready=True, timeout=240)
        try:
            yield svc, dest, state
        finally:
            svc.stop()


def _results_of(dest: DestinationSCP, study: str, n: int, timeout: float = 120) -> list:
    return wait_until(
        lambda: len(dest.of_study(study)) >= n and dest.of_study(study),
        timeout,
        what=f"{n} result(s) of study {study}",
    )


def _store(state: Path) -> JobStore:
    return JobStore(state / "jobs.sqlite", create=False)


@pytest.mark.timeout(300)
def test_study_gets_one_sr_and_one_sc_per_image(running) -> None:
    svc, dest, state = running
    study = generate_uid()
    cr1, cr2 = chest_cr(study), chest_cr(study, name="chest_cr_mono1.dcm")
    assert send([cr1, ct_slice(study), cr2, basic_sr(study)], svc.address[1]) == [0, 0, 0, 0]
    results = _results_of(dest, study, 4)
    time.sleep(1.0)  # nothing more arrives
    results = dest.of_study(study)
    assert len(results) == 4
    classes = Counter(str(r.SOPClassUID) for r in results)
    assert classes == {SR_CLASS: 2, SC_CLASS: 2}
    referenced = Counter()
    for r in results:
        assert r.StudyInstanceUID == study and r.PatientID == PATIENT_ID  # same study, patient
        assert r.SOPInstanceUID not in (cr1.SOPInstanceUID, cr2.SOPInstanceUID)
        if str(r.SOPClassUID) == SR_CLASS:
            ref = r.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
            referenced[ref.ReferencedSOPSequence[0].ReferencedSOPInstanceUID] += 1
    assert referenced == {cr1.SOPInstanceUID: 1, cr2.SOPInstanceUID: 1}
    assert set(dest.calling) == {"DICOMCOVID"}
    with _store(state) as store:
        jobs = [j for j in store.jobs() if j.study_instance_uid == study]
        assert [j.state for j in jobs] == ["delivered"]
        assert store.instance(cr1.SOPInstanceUID).state == "delivered"
        # delivered: the received images and result files are deleted
        wait_until(
            lambda: not store.files_of_job(jobs[0].id)[0].exists(), 10, what="spool clean-up"
        )


@pytest.mark.timeout(300)
def test_corrupt_image_fails_with_reason_and_next_study_gets_results(running) -> None:
    svc, dest, state = running
    bad, good = broken_pixels(), chest_cr()
    assert send([bad], svc.address[1]) == [0]  # the header is fine: accepted, fails in the worker
    assert send([good], svc.address[1]) == [0]
    _results_of(dest, good.StudyInstanceUID, 2)
    with _store(state) as store:
        inst = wait_until(
            lambda: (i := store.instance(bad.SOPInstanceUID)).state == "failed" and i,
            60,
            what="failed instance",
        )
        assert inst.reason.startswith("decode_failed:")
        (job,) = [j for j in store.jobs() if j.study_instance_uid == bad.StudyInstanceUID]
        assert job.state == "failed" and "decode_failed" in job.reason
    assert dest.of_study(bad.StudyInstanceUID) == []
    result = CliRunner().invoke(app, ["status", "--state-dir", str(state), "--json"])
    assert result.exit_code == 0, result.output
    status = json.loads(result.output)
    assert status["jobs"]["failed"] >= 1
    assert any(p["job"] == job.id and "decode_failed" in p["reason"] for p in status["problems"])
    text = CliRunner().invoke(app, ["status", "--state-dir", str(state)]).output
    assert "instances" in text and "backlog" in text and "decode_failed" in text


@pytest.mark.timeout(300)
def test_duplicates_and_our_own_results_are_not_processed_again(running) -> None:
    svc, dest, state = running
    ds = chest_cr()
    assert send([ds], svc.address[1]) == [0]
    results = _results_of(dest, ds.StudyInstanceUID, 2)
    ours = []
    for r in results:  # what a PACS would forward back to us
        r = pydicom.Dataset(r)
        r.file_meta = pydicom.dataset.FileMetaDataset(results[0].file_meta)
        r.file_meta.MediaStorageSOPClassUID = r.SOPClassUID
        r.file_meta.MediaStorageSOPInstanceUID = r.SOPInstanceUID
        r.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
        ours.append(r)
    assert send([ds, *ours], svc.address[1]) == [0, 0, 0]
    time.sleep(0.5 + 3.0)  # quiet period, and time a (wrong) second job would need
    assert len(dest.of_study(ds.StudyInstanceUID)) == 2
    with _store(state) as store:
        assert [j.state for j in store.jobs() if j.study_instance_uid == ds.StudyInstanceUID] == [
            "delivered"
        ]
        assert store.instance(ds.SOPInstanceUID).state == "delivered"
        for r in ours:
            assert store.instance(r.SOPInstanceUID).reason == "own_result"


@pytest.mark.timeout(120)
def test_logs_never_contain_patient_data(running, recorder: LogRecorder) -> None:
    """Runs after the tests above (same module): everything they logged is checked."""
    text = recorder.text
    assert "dicom-covid-worker" in text  # the worker's records were forwarded and recorded
    assert "association" in text and "job" in text
    for secret in SECRETS:
        assert secret not in text


@pytest.mark.timeout(300)
def test_destination_outage_then_recovery_dead_letter_and_retry(
    tmp_path: Path, bundle: Path
) -> None:
    state = tmp_path / "state"
    soon, late = DestinationSCP(ae_title="SOON"), DestinationSCP(ae_title="LATE")  # both down
    cfg = _config(
        state,
        bundle,
        [soon.address, late.address],
        retry=RetryPolicy(base_delay=0.2, max_delay=0.4, max_tries=6),
    )
    svc = Service(cfg)
    svc.start(wait_ready=True, timeout=240)
    try:
        ds = chest_cr()
        assert send([ds], svc.address[1]) == [0]
        with _store(state) as store:
            # both destinations fail; SOON comes back while its results are being retried
            wait_until(
                lambda: (
                    store.counts()["targets"].get(soon.address, {}).get("pending")
                    and _tries(store, soon.address) >= 1
                ),
                120,
                what="a failed try",
            )
            soon.start()
            _results_of(soon, ds.StudyInstanceUID, 2, timeout=30)
            # LATE stays down: dead-lettered after max_tries
            wait_until(lambda: store.counts()["deliveries"]["dead"] == 2, 60, what="dead letters")
            (job,) = store.jobs()
            assert job.state == "dead" and late.address in job.reason
            late.start()
            time.sleep(1.0)
            assert late.of_study(ds.StudyInstanceUID) == []  # dead letters are not retried alone
            result = CliRunner().invoke(app, ["retry", "--state-dir", str(state), "--all-dead"])
            assert result.exit_code == 0 and "re-queued 1 job(s)" in result.output
            _results_of(late, ds.StudyInstanceUID, 2, timeout=30)
            wait_until(lambda: store.job(job.id).state == "delivered", 10, what="delivered")
        assert sorted(soon.counts().values()) == [1, 1]  # exactly once each
        assert sorted(late.counts().values()) == [1, 1]
        result = CliRunner().invoke(app, ["retry", "--state-dir", str(state), "--all-dead"])
        assert result.exit_code == 2  # nothing left to re-queue
    finally:
        svc.stop()
        soon.stop()
        late.stop()


def _tries(store: JobStore, target: str) -> int:
    con = store._con()
    return con.execute(
        "SELECT COALESCE(MAX(tries), 0) FROM deliveries WHERE target = ?", (target,)
    ).fetchone()[0]


def test_results_go_to_the_output_folder_without_destination(tmp_path: Path) -> None:
    """The sender's folder target: atomic copies as <StudyUID>/<SOPInstanceUID>.dcm, once."""
    cfg = ServiceConfig(state_dir=tmp_path / "state", output_dir=tmp_path / "out")
    store = JobStore(cfg.db_path)
    ds = chest_cr()
    store.add_instance(ds.SOPInstanceUID, ds.StudyInstanceUID)
    (job,) = store.group_stable_studies(0.0)
    store.claim_job("w")
    result = tmp_path / "sr.dcm"
    ds.save_as(result, enforce_file_format=True)
    files = [ResultFile("sr", "1.2.3.4", ds.StudyInstanceUID, result)]
    targets = cfg.sender().targets()
    assert targets == (f"dir:{(tmp_path / 'out').resolve()}",)
    store.record_results(job.id, ds.SOPInstanceUID, files, targets)
    store.finish_job(job.id)
    delivered = []
    sender = Sender(store, cfg.sender(), on_job_delivered=delivered.append)
    assert sender.deliver_due(targets[0]) == 1
    assert sender.deliver_due(targets[0]) == 0
    out = tmp_path / "out" / ds.StudyInstanceUID / "1.2.3.4.dcm"
    assert out.read_bytes() == result.read_bytes()
    assert delivered == [job.id] and store.job(job.id).state == "delivered"
    store.close()


def test_service_refuses_an_unusable_bundle(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    svc = Service(
        ServiceConfig(state_dir=tmp_path / "s", worker=WorkerConfig(bundle=tmp_path / "empty"))
    )
    with pytest.raises(ServiceError, match="metadata"):
        svc.start()
    result = subprocess.run(
        [
            str(CLI),
            "serve",
            "--state-dir",
            str(tmp_path / "s"),
            "--bundle",
            str(tmp_path / "empty"),
            "--port",
            str(free_port()),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    assert "metadata" in result.stderr


def test_serve_help_documents_every_flag() -> None:
    result = CliRunner().invoke(app, ["serve", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    for flag in (
        "--ae-title",
        "--host",
        "--port",
        "--allow-ae",
        "--destination",
        "--state-dir",
        "--quiet-period",
        "--config",
        "--model",
        "--bundle",
        "--output-dir",
        "--tls-cert",
        "--tls-key",
        "--tls-ca",
        "--retry-base",
        "--retry-tries",
        "--metrics-port",
        "--metrics-host",
    ):
        assert flag in result.output


# -- the real command, stopped and restarted ------------------------------------------------


def _serve(state: Path, port: int, bundle: Path, log: Path, *extra: str) -> subprocess.Popen:
    cmd = [
        str(CLI),
        "serve",
        "--state-dir",
        str(state),
        "--port",
        str(port),
        "--allow-ae",
        "ORTHANC",
        "--bundle",
        str(bundle),
        "--log-file",
        str(log),
        "--retry-base",
        "0.3",
        "--retry-max",
        "0.6",
        "--retry-tries",
        "1000",
        "--min-free-mb",
        "0",
        *extra,
    ]
    return subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )


def _ready(proc: subprocess.Popen, port: int, timeout: float = 240) -> None:
    from pacs_helpers import echo

    def up() -> bool:
        assert proc.poll() is None, f"serve exited early:\n{proc.stdout.read()}"
        return echo(port)[0]

    wait_until(up, timeout, interval=0.3, what="serve to listen")


def _stop(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 120) -> str:
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=timeout)
    return out


def _worker_pid(pid: int) -> int | None:
    """The spawned worker among the children of ``pid`` (not the resource tracker)."""
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return None
    for child in children:
        try:
            cmdline = Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        if b"multiprocessing" in cmdline and b"resource_tracker" not in cmdline:
            return int(child)
    return None


@pytest.mark.timeout(600)
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses /proc")
def test_restart_resumes_pending_work_and_delivers_exactly_once(
    tmp_path: Path, bundle: Path
) -> None:
    state, log = tmp_path / "state", tmp_path / "service.log"
    port, dest_port = free_port(), free_port()
    dest = DestinationSCP(port=dest_port, ae_title="PACS")  # down for now
    target = ["--destination", dest.address]
    outputs = []

    # 1. a long quiet period: the images are received, then the service stops before grouping
    proc = _serve(state, port, bundle, log, *target, "--quiet-period", "3600")
    try:
        _ready(proc, port)
        study_a = generate_uid()
        first = [chest_cr(study_a), chest_cr(study_a, name="chest_cr_mono1.dcm")]
        assert send(first, port) == [0, 0]
    finally:
        outputs.append(_stop(proc))
    assert proc.returncode == 0
    with _store(state) as store:
        assert store.counts()["instances"]["received"] == 2

    # 2. restart (destination still down): the study is analysed, deliveries wait; the worker is
    #    killed in the middle of a second study's job and that job resumes in a new worker; then
    #    the whole service is killed (SIGKILL) with 6 results waiting
    proc = _serve(state, port, bundle, log, *target, "--quiet-period", "0.5")
    try:
        _ready(proc, port)
        second = chest_cr()
        assert send([second], port) == [0]
        with _store(state) as store:
            wait_until(
                lambda: any(
                    j.state == "running" and j.study_instance_uid == second.StudyInstanceUID
                    for j in store.jobs()
                ),
                120,
                interval=0.05,
                what="the second job to run",
            )
            worker = _worker_pid(proc.pid)
            assert worker is not None
            os.kill(worker, signal.SIGKILL)
            wait_until(
                lambda: store.counts()["deliveries"]["pending"] == 6,
                240,
                what="6 results waiting for the destination",
            )
            (job2,) = [j for j in store.jobs() if j.study_instance_uid == second.StudyInstanceUID]
            assert job2.attempts == 2
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # crash the whole service, worker included
        outputs.append(proc.communicate(timeout=60)[0])
    assert proc.returncode == -signal.SIGKILL

    # 3. restart with the destination up: everything is delivered, once
    dest.start()
    proc = _serve(state, port, bundle, log, *target, "--quiet-period", "0.5")
    try:
        _ready(proc, port)
        wait_until(lambda: len(dest.received) >= 6, 120, what="6 results at the destination")
        with _store(state) as store:
            wait_until(lambda: store.counts()["jobs"]["delivered"] == 2, 30, what="2 jobs")
    finally:
        outputs.append(_stop(proc))
        dest.stop()

    # 4. one more restart: nothing is sent again
    proc = _serve(state, port, bundle, log, *target)
    try:
        _ready(proc, port)
        time.sleep(2.0)
    finally:
        outputs.append(_stop(proc))
    counts = dest.counts()
    assert len(counts) == 6 and set(counts.values()) == {1}, counts
    assert Counter(str(d.SOPClassUID) for d in dest.received) == {SR_CLASS: 3, SC_CLASS: 3}
    assert {d.StudyInstanceUID for d in dest.received} == {study_a, second.StudyInstanceUID}

    # the logs (stdout/stderr of every run, and the log file) hold no patient data
    log_text = log.read_text()
    assert re.search(r"worker 1 \(process \d+\) exited unexpectedly", log_text)
    assert oct(log.stat().st_mode & 0o777) == "0o600"
    for text in (*outputs, log_text):
        assert "association" in text
        for secret in SECRETS:
            assert secret not in text
