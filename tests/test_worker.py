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

import pydicom
import pytest
from pacs_helpers import chest_cr, model_bundle

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
