"""DICOMweb STOW-RS delivery against a real Orthanc with its DICOMweb plugin, on loopback.

No model is needed: result files are recorded in a real job store and the real
:class:`~pacs_listener.sender.Sender` delivers them, as ``dicom-covid serve`` does. Orthanc is
stopped in the middle (an outage: the tries fail, are rescheduled with backoff and delivered when
it is back), answers 401 to wrong or missing credentials (reported by name of the credentials
file, and dead-lettered after ``max_tries``), and must hold every result in the right study.
``tests/test_kos.py`` sends a real worker's SR, SC and KOS the same way.
"""

from __future__ import annotations

import io
import logging
import sqlite3
import subprocess
import urllib.error
from pathlib import Path

import orthanc as orthanc_mod
import pydicom
import pytest
from pacs_helpers import LogRecorder, chest_cr, free_port, wait_until

from dicom_covid.errors import DeliveryError
from pacs_listener.config import ConfigError, RetryPolicy, SenderConfig, StowDestination
from pacs_listener.jobs import JobStore, ResultFile
from pacs_listener.sender import Sender, stow_files

pytestmark = [
    pytest.mark.timeout(300),
    pytest.mark.skipif(
        not orthanc_mod.dicomweb_available(),
        reason="Orthanc or its DICOMweb plugin is not installed (apt install orthanc-dicomweb)",
    ),
]

USER, PASSWORD = "dicomcovid", "correct horse battery"


class DicomwebOrthanc:
    """A real Orthanc with DICOMweb and basic auth that can be stopped and started again."""

    def __init__(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        self.http_port, self.dicom_port = free_port(), free_port()
        self.config = orthanc_mod.write_config(
            folder,
            free_port(),
            self.http_port,
            self.dicom_port,
            lua=False,
            dicomweb=True,
            users={USER: PASSWORD},
        )
        self.proc: subprocess.Popen | None = None
        self.api: orthanc_mod.Orthanc | None = None

    @property
    def stow_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}/dicom-web/studies"

    def start(self) -> None:
        log = (self.folder / "orthanc.log").open("ab")
        self.proc = subprocess.Popen(
            [orthanc_mod.ORTHANC, str(self.config)], stdout=log, stderr=subprocess.STDOUT
        )
        log.close()
        self.api = orthanc_mod.Orthanc(
            self.http_port, self.dicom_port, "ORTHANC", self.folder, self.proc, (USER, PASSWORD)
        )

        def up() -> bool:
            assert self.proc.poll() is None, "Orthanc exited while starting"
            try:
                self.api.get("/system")
                return True
            except (urllib.error.URLError, ConnectionError, OSError):
                return False

        wait_until(up, 60, interval=0.2, what="Orthanc to answer")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(30)
        self.proc = None

    def instances(self, study_uid: str) -> set[str]:
        """SOP Instance UIDs Orthanc holds in a study."""
        sid = self.api.study_id(study_uid)
        if sid is None:
            return set()
        return {
            self.api.get(f"/instances/{i['ID']}/simplified-tags")["SOPInstanceUID"]
            for i in self.api.get(f"/studies/{sid}/instances")
        }


@pytest.fixture
def pacs(tmp_path: Path):
    server = DicomwebOrthanc(tmp_path / "orthanc")
    server.start()
    yield server
    server.stop()


def _secret(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.write_text(text + "\n")
    path.chmod(0o600)
    return path


def _files(folder: Path, n: int = 2) -> tuple[str, list[Path], list[str]]:
    """``n`` chest images of one new study written as Part 10 files."""
    folder.mkdir(parents=True, exist_ok=True)
    study = chest_cr().StudyInstanceUID
    paths, uids = [], []
    for i in range(n):
        ds = chest_cr(study)
        path = folder / f"{i}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
        uids.append(str(ds.SOPInstanceUID))
    return study, paths, uids


def test_stow_files_stores_in_orthanc_and_reports_auth_failures(
    tmp_path: Path, pacs: DicomwebOrthanc
) -> None:
    study, paths, uids = _files(tmp_path / "files")
    good = _secret(tmp_path, "good.basic", f"{USER}:{PASSWORD}")
    bad = _secret(tmp_path, "bad.basic", f"{USER}:wrong")

    with pytest.raises(DeliveryError, match=r"refused our credentials \(HTTP 401") as info:
        stow_files(paths, StowDestination(pacs.stow_url, basic_auth_file=bad))
    assert str(bad) in str(info.value) and "wrong" not in str(info.value)
    with pytest.raises(DeliveryError, match="give a basic-auth file"):
        stow_files(paths, StowDestination(pacs.stow_url))
    assert pacs.instances(study) == set()

    confirmed = []
    errors = stow_files(
        paths,
        StowDestination(pacs.stow_url, basic_auth_file=good),
        on_result=lambda i, e: confirmed.append((i, e)),
        max_bytes=1,  # one request per file
    )
    assert errors == [None, None] and sorted(confirmed) == [(0, None), (1, None)]
    assert pacs.instances(study) == set(uids)
    # at least once: sending again (same SOP Instance UIDs) is confirmed and keeps one copy
    assert stow_files(paths, StowDestination(pacs.stow_url, basic_auth_file=good)) == [None] * 2
    assert pacs.instances(study) == set(uids)
    sid = pacs.api.study_id(study)
    assert len(pacs.api.get(f"/studies/{sid}/instances")) == 2
    [hit] = pacs.api.post("/tools/lookup", uids[0].encode())
    stored = pydicom.dcmread(io.BytesIO(pacs.api.get_bytes(f"/instances/{hit['ID']}/file")))
    assert stored.PixelData == pydicom.dcmread(paths[0]).PixelData  # byte for byte

    wrong_url = pacs.stow_url[: -len("studies")] + "nowhere"
    with pytest.raises(DeliveryError, match=r"HTTP 404 .*ends in /studies"):
        stow_files(paths, StowDestination(wrong_url, basic_auth_file=good))


def test_stow_destination_checks_its_settings(tmp_path: Path) -> None:
    good = _secret(tmp_path, "good.basic", f"{USER}:{PASSWORD}")
    token = _secret(tmp_path, "t.token", "abc")
    with pytest.raises(ConfigError, match="no credentials in the URL"):
        StowDestination(f"http://{USER}:pw@127.0.0.1:8042/dicom-web/studies")
    with pytest.raises(ConfigError, match="not both"):
        StowDestination("http://h/dicom-web/studies", basic_auth_file=good, token_file=token)
    with pytest.raises(ConfigError, match="user:password"):
        StowDestination("http://h/dicom-web/studies", basic_auth_file=token)
    with pytest.raises(ConfigError, match="not an http"):
        StowDestination("ftp://h/studies")
    d = StowDestination.from_mapping(
        {"url": "http://h:8042/dicom-web/studies/", "token_file": "t.token"}, tmp_path
    )
    assert str(d) == "stowrs:http://h:8042/dicom-web/studies" and d.auth == "bearer"
    assert "abc" not in repr(d)


def _deliveries(store_path: Path) -> list[sqlite3.Row]:
    con = sqlite3.connect(store_path)
    con.row_factory = sqlite3.Row
    try:
        return con.execute("SELECT * FROM deliveries ORDER BY result_id").fetchall()
    finally:
        con.close()


def _queue(store: JobStore, paths: list[Path], uids: list[str], study: str, target: str) -> int:
    for uid, path in zip(uids, paths, strict=True):
        store.add_instance(uid, study, path=path)
    [job] = store.group_stable_studies(0)
    store.claim_job("test")
    for uid, path in zip(uids, paths, strict=True):
        store.record_results(job.id, uid, [ResultFile("sr", uid, study, path)], [target])
    store.finish_job(job.id)
    return job.id


def test_sender_retries_through_an_outage_and_dead_letters_auth_failures(
    tmp_path: Path, pacs: DicomwebOrthanc
) -> None:
    good = _secret(tmp_path, "good.basic", f"{USER}:{PASSWORD}")
    dest = StowDestination(pacs.stow_url, basic_auth_file=good)
    retry = RetryPolicy(base_delay=0.2, max_delay=0.5, max_tries=3)
    store = JobStore(tmp_path / "state" / "jobs.sqlite")
    sender = Sender(store, SenderConfig(stowrs=(dest,), retry=retry))
    target = str(dest)
    assert sender.targets == (target,)
    study, paths, uids = _files(tmp_path / "results")
    job_id = _queue(store, paths, uids, study, target)

    pacs.stop()  # the outage: tries fail and are rescheduled with backoff, nothing is lost
    assert sender.deliver_due(target) == 0
    rows = _deliveries(store.path)
    assert [(r["state"], r["tries"]) for r in rows] == [("pending", 1)] * 2
    assert "could not be reached" in rows[0]["last_error"]
    assert sender.deliver_due(target) == 0  # not due yet: backing off
    pacs.start()
    wait_until(lambda: sender.deliver_due(target) == 2, 10, interval=0.1, what="delivery")
    assert [r["state"] for r in _deliveries(store.path)] == ["delivered"] * 2
    assert store.job(job_id).state == "delivered"
    assert pacs.instances(study) == set(uids)

    # wrong credentials: reported clearly, retried, then dead-lettered for 'dicom-covid retry'
    bad = _secret(tmp_path, "bad.basic", f"{USER}:wrong")
    bad_dest = StowDestination(pacs.stow_url, basic_auth_file=bad)
    store2 = JobStore(tmp_path / "state2" / "jobs.sqlite")
    sender2 = Sender(store2, SenderConfig(stowrs=(bad_dest,), retry=retry))
    study2, paths2, uids2 = _files(tmp_path / "results2", n=1)
    job2 = _queue(store2, paths2, uids2, study2, target)
    log = LogRecorder()
    logging.getLogger("pacs_listener").addHandler(log)
    try:
        wait_until(
            lambda: (sender2.deliver_due(target), store2.job(job2).state == "dead")[1],
            20,
            interval=0.1,
            what="the delivery dead-lettered",
        )
    finally:
        logging.getLogger("pacs_listener").removeHandler(log)
    [row] = _deliveries(store2.path)
    assert row["state"] == "dead" and row["tries"] == 3
    assert "refused our credentials (HTTP 401 Unauthorized)" in row["last_error"]
    assert str(bad) in row["last_error"]
    assert "dead-lettered" in log.text and "refused our credentials" in log.text
    assert "wrong" not in log.text and PASSWORD not in log.text
    assert pacs.instances(study2) == set()
    store.close()
    store2.close()
