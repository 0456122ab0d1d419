"""The worker's job processing with a real model: a full disk makes a job wait, never fail.

The write call is made to fail with ``ENOSPC`` through the spool's fault-injection hook
(:func:`pacs_listener.spool.write_fault`), exactly where a full disk fails it; the live version
on a real full file system is ``tests/test_disk_full.py``.
"""

from __future__ import annotations

import errno
import io
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pacs_helpers import chest_cr, model_bundle

from dicom_covid.errors import InputRejected
from dicom_covid.results import read_sr_result
from pacs_listener.jobs import JobStore
from pacs_listener.spool import Spool, write_fault
from pacs_listener.triage import result_reserve
from pacs_listener.worker import JobProcessor, load_analysis

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def analyse(tmp_path_factory):
    return load_analysis(model_bundle(tmp_path_factory.mktemp("bundle")), None)


def _queued(root: Path, n: int = 2) -> tuple[JobStore, int, list[str]]:
    """A store with one grouped job of ``n`` spooled chest images."""
    store = JobStore(root / "jobs.sqlite")
    spool = Spool(root / "spool")
    study = chest_cr().StudyInstanceUID
    uids = []
    for _ in range(n):
        ds = chest_cr(study)
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        path = spool.write(study, ds.SOPInstanceUID, buf.getvalue())
        store.add_instance(ds.SOPInstanceUID, study, path=path, reserve_bytes=result_reserve(ds))
        uids.append(ds.SOPInstanceUID)
    [job] = store.group_stable_studies(0)
    return store, job.id, uids


def _disk_full(path: Path) -> None:
    raise OSError(errno.ENOSPC, "No space left on device", str(path))


def test_enospc_at_the_write_makes_the_job_wait_then_resume(tmp_path: Path, analyse) -> None:
    store, job_id, uids = _queued(tmp_path)
    proc = JobProcessor(store, tmp_path / "results", ["dir:/out"], analyse, disk_retry=(0.3, 1))
    calls = []

    def second_write_fails(path: Path) -> None:  # the first image's SR, then the disk is full
        calls.append(path.name)
        if len(calls) > 1:
            _disk_full(path)

    with write_fault(second_write_fails):
        assert proc.process(store.claim_job("w")) == "waiting_for_disk"
    job = store.job(job_id)
    assert job.state == "waiting_for_disk" and job.attempts == 0
    assert job.reason.startswith("waiting_for_disk: writing the results of image")
    assert "No space left on device" in job.reason
    assert [store.instance(u).state for u in uids] == ["grouped", "grouped"]
    assert store.results(job_id) == []
    assert store.claim_job("w") is None  # backing off
    time.sleep(0.35)
    assert proc.process(store.claim_job("w")) == "results_written"
    assert sorted(r.kind for r in store.results(job_id)) == ["sc", "sc", "sr", "sr"]
    assert all(r.path.is_file() for r in store.results(job_id))
    assert [store.instance(u).state for u in uids] == ["results_written"] * 2
    store.close()


def test_below_the_results_floor_nothing_is_analysed_and_the_job_waits(
    tmp_path: Path, analyse
) -> None:
    store, job_id, uids = _queued(tmp_path, 1)
    analysed = []

    def counting(ds: pydicom.Dataset):
        analysed.append(ds.SOPInstanceUID)
        return analyse(ds)

    proc = JobProcessor(store, tmp_path / "results", ["dir:/out"], counting, min_free_bytes=2**62)
    assert proc.process(store.claim_job("w")) == "waiting_for_disk"
    assert not analysed
    assert "above the floor of" in store.job(job_id).reason
    proc.min_free_bytes = 0
    time.sleep(5.1)  # the default first delay
    assert proc.process(store.claim_job("w")) == "results_written"
    assert analysed == uids
    store.close()


def test_other_write_errors_still_fail_the_image(tmp_path: Path, analyse) -> None:
    store, _, uids = _queued(tmp_path, 1)
    proc = JobProcessor(store, tmp_path / "results", [], analyse)

    def denied(path: Path) -> None:
        raise OSError(errno.EACCES, "Permission denied", str(path))

    with write_fault(denied):
        assert proc.process(store.claim_job("w")) == "failed"
    assert store.instance(uids[0]).reason.startswith("internal_error: PermissionError")
    store.close()


def _spool(store: JobStore, spool: Spool, ds: pydicom.Dataset) -> None:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    path = spool.write(ds.StudyInstanceUID, ds.SOPInstanceUID, buf.getvalue())
    store.add_instance(
        ds.SOPInstanceUID, ds.StudyInstanceUID, path=path, reserve_bytes=result_reserve(ds)
    )


def test_a_batch_across_studies_matches_one_by_one_and_isolates_a_bad_image(
    tmp_path: Path, analyse
) -> None:
    """Three studies in one batch: two chest images get the results they get one by one
    (probabilities within 1e-4), the broken one fails alone with the reader's reason."""
    from pacs_helpers import broken_pixels

    store = JobStore(tmp_path / "jobs.sqlite")
    spool = Spool(tmp_path / "spool")
    good = [chest_cr(), chest_cr(name="chest_cr_mono1.dcm")]
    bad = broken_pixels()
    for ds in (good[0], bad, good[1]):
        _spool(store, spool, ds)
    assert len(store.group_stable_studies(0)) == 3
    jobs = store.claim_jobs("w", 8)
    assert len(jobs) == 3
    proc = JobProcessor(store, tmp_path / "results", ["dir:/out"], analyse)
    states = proc.process_batch(jobs)
    by_study = {j.study_instance_uid: states[j.id] for j in jobs}
    assert by_study[bad.StudyInstanceUID] == "failed"
    assert [by_study[ds.StudyInstanceUID] for ds in good] == ["results_written"] * 2
    reason = store.instance(bad.SOPInstanceUID).reason
    assert reason.split(":")[0] in {"decode_failed", "truncated", "not_an_image"}, reason
    written = {}
    for r in store.results():
        if r.kind == "sr":
            facts = read_sr_result(pydicom.dcmread(r.path))
            written[facts["referenced_sop_instance_uid"]] = facts["decision"]
    batch = analyse.batch([*good, bad])
    assert isinstance(batch[2], InputRejected)
    for ds, batched in zip(good, batch, strict=False):
        alone = analyse(ds)
        a, b = alone.prediction.probabilities, batched.prediction.probabilities
        assert a.keys() == b.keys()
        np.testing.assert_allclose([b[k] for k in a], [a[k] for k in a], atol=1e-4)
        np.testing.assert_allclose(batched.heatmap, alone.heatmap, atol=1e-4)
        assert written[ds.SOPInstanceUID] == read_sr_result(alone.sr)["decision"]
    store.close()


def test_a_worker_whose_lease_was_taken_over_records_nothing(tmp_path: Path, analyse) -> None:
    """A worker frozen past its lease (another worker took the job over meanwhile) drops its
    results instead of recording them, so the job is done once, by the new owner."""
    store, job_id, uids = _queued(tmp_path)
    store.lease = 5.0
    (job,) = store.claim_jobs("node-a/worker-1", 8)

    def frozen_then_wakes(ds):  # the new owner claims the job while this worker "sleeps"
        if not store.jobs(["running"])[0].attempts > 1:
            (taken,) = store.claim_jobs("node-b/worker-2", 8, now=time.time() + 6.0)
            assert taken.id == job_id
        return analyse(ds)

    stale = JobProcessor(
        store, tmp_path / "results", [], frozen_then_wakes, worker="node-a/worker-1"
    )
    assert stale.process_batch([job]) == {job_id: "lost"}
    assert store.results(job_id) == []
    assert not [p for p in (tmp_path / "results").rglob("*") if p.is_file()]
    owner = JobProcessor(store, tmp_path / "results", [], analyse, worker="node-b/worker-2")
    (mine,) = [j for j in store.jobs(["running"]) if j.id == job_id]
    assert owner.process_batch([mine]) == {job_id: "delivered"}
    assert len(store.results(job_id)) == 2 * len(uids)
