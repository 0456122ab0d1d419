"""Shared helpers of the PACS service benchmarks (not a benchmark itself).

* :class:`Serve` runs ``dicom-covid serve`` as a subprocess on a free loopback port and waits
  until its worker has loaded the model;
* :func:`make_copies` writes distinct-UID copies of a sample image (optionally shrunk);
* :func:`storescu` times one dcmtk ``storescu`` call;
* :func:`job_stages` reads the per-stage timestamps the job store keeps;
* ``python benchmarks/_pacs.py bare-scp --port P --folder D`` runs the bare pynetdicom SCP that
  only spools (tmp file, fsync, rename, fsync folder): the floor of the service's design.

Orthanc is started with ``tests/orthanc.py`` (the same configuration the integration test
uses), so the benchmark measures exactly the deployed ``deploy/orthanc/`` set-up.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import platform
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "sample_dicoms" / "chest_cr_mono1.dcm"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
IMPLICIT_LE = "1.2.840.10008.1.2"
#: Largest PDU of every SCP in the benchmarks (the service's default ``maximum_pdu_size``).
MAX_PDU = 65536

#: Polling intervals built into the service (``pacs_listener``): they are configuration, not
#: work, and show up in the per-stage timings.
GROUPER_INTERVAL = "min(0.5, max(0.05, quiet/4)) s"
WORKER_POLL_S = 0.5
SENDER_POLL_S = 1.0


class BenchmarkError(RuntimeError):
    """A benchmark could not run (missing tool, service did not start, ...)."""


# -- machine and tools ------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port free on loopback right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def machine() -> str:
    """One line about the machine: CPUs, load average, Python."""
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return (
        f"machine: {os.cpu_count()} CPU(s) {platform.machine()}, load average {load}, "
        f"Python {platform.python_version()}"
    )


def require_tool(name: str) -> str:
    """Path of an executable, or :class:`BenchmarkError` naming the package to install."""
    path = shutil.which(name)
    if path is None:
        raise BenchmarkError(f"{name} not found on PATH; install dcmtk (apt install dcmtk).")
    return path


def cli() -> list[str]:
    """Command line of ``dicom-covid`` (next to this interpreter, else on PATH)."""
    here = Path(sys.executable).parent / "dicom-covid"
    if here.is_file():
        return [str(here)]
    found = shutil.which("dicom-covid")
    if found:
        return [found]
    return [sys.executable, "-m", "dicom_covid.cli.main"]


def resolve_bundle(bundle: Path | None) -> Path:
    """The bundle to run with: ``bundle`` when given, else the project's when it is trained.

    Raises
    ------
    BenchmarkError
        When no bundle was given and the default model's weights are missing.
    """
    if bundle is not None:
        return bundle
    from dicom_covid.bundle import Bundle

    b = Bundle()
    if b.default_model not in b.available():
        raise BenchmarkError(
            f"the default model {b.default_model!r} of {b.root} has no weights yet; train it or "
            "pass --bundle FOLDER (e.g. a throw-away bundle from tests/helpers.py)."
        )
    return b.root


def tests_module(name: str):
    """A helper module of ``tests/`` (e.g. ``orthanc``: a real Orthanc on free loopback ports;
    ``postgres``: a throw-away PostgreSQL cluster), imported by name."""
    import importlib

    tests = str(ROOT / "tests")
    if tests not in sys.path:
        sys.path.insert(0, tests)
    return importlib.import_module(name)


def orthanc_module():
    """``tests/orthanc.py`` (starts a real Orthanc on free loopback ports)."""
    return tests_module("orthanc")


def exit_on_sigterm() -> None:
    """Turn SIGTERM into ``SystemExit`` so context managers stop Orthanc and the service."""

    def handler(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


# -- statistics -------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """``q``-quantile (0..1) by linear interpolation between closest ranks."""
    v = sorted(values)
    if not v:
        return float("nan")
    pos = q * (len(v) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def median(values: Sequence[float]) -> float:
    """Median (nan for no values)."""
    return percentile(values, 0.5)


# -- data -------------------------------------------------------------------------------------


def make_copies(
    folder: Path,
    n: int,
    source: Path = SAMPLE,
    shrink: int = 1,
    per_study: int = 1,
    prefix: str = "img",
) -> list[Path]:
    """Write ``n`` copies of ``source`` with fresh Study/Series/SOP Instance UIDs.

    Parameters
    ----------
    folder : pathlib.Path
        Where the files go (created).
    n : int
        Number of copies.
    source : pathlib.Path
        An uncompressed single-frame image (default ``sample_dicoms/chest_cr_mono1.dcm``).
    shrink : int
        Keep every ``shrink``-th row and column (1: full size) to make cheap instances.
    per_study : int
        Images per study (each study has one series).
    prefix : str
        File name prefix.

    Returns
    -------
    list of pathlib.Path
        The files, in order.
    """
    import numpy as np
    import pydicom
    from pydicom.uid import generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    ds = pydicom.dcmread(source)
    if shrink > 1:
        arr = np.ascontiguousarray(ds.pixel_array[::shrink, ::shrink])
        ds.Rows, ds.Columns = (int(x) for x in arr.shape)
        ds.PixelData = arr.tobytes()
        for kw in ("PixelSpacing", "ImagerPixelSpacing"):
            if kw in ds:
                setattr(ds, kw, [float(x) * shrink for x in ds[kw].value])
    out = []
    study = series = ""
    for i in range(n):
        if i % per_study == 0:
            study, series = generate_uid(), generate_uid()
        ds.StudyInstanceUID = study
        ds.SeriesInstanceUID = series
        ds.SOPInstanceUID = generate_uid()
        ds.InstanceNumber = i % per_study + 1
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        path = folder / f"{prefix}{i:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        out.append(path)
    return out


def warm_page_cache(paths: Sequence[Path]) -> int:
    """Read every file once so no sender starts with a cold cache; return the bytes read."""
    return sum(len(p.read_bytes()) for p in paths)


def transfer_syntax(path: Path) -> str:
    """Transfer Syntax UID of a stored file."""
    import pydicom

    return str(pydicom.filereader.read_file_meta_info(path).TransferSyntaxUID)


# -- DICOM ------------------------------------------------------------------------------------


def echo(port: int, called: str, calling: str = "BENCH") -> bool:
    """True when a C-ECHO to ``called@127.0.0.1:port`` succeeds."""
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 5
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    if not assoc.is_established:
        return False
    try:
        status = assoc.send_c_echo()
        return bool(status) and int(status.Status) == 0
    finally:
        assoc.release()


def wait_for_echo(
    port: int, called: str, timeout: float, proc=None, calling: str = "BENCH"
) -> None:
    """Wait until ``called`` answers C-ECHO (fail early when ``proc`` exits)."""
    logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            raise BenchmarkError(f"{called} exited with {proc.returncode} before answering")
        with contextlib.suppress(Exception):
            if echo(port, called, calling):
                return
        if time.monotonic() > deadline:
            raise BenchmarkError(f"{called} on port {port} did not answer C-ECHO in {timeout} s")
        time.sleep(0.2)


def storescu(
    files: Sequence[Path], port: int, called: str, calling: str = "BENCH", timeout: float = 600
) -> float:
    """Send ``files`` over one association with dcmtk ``storescu``; return the seconds it ran.

    ``storescu`` proposes only the uncompressed transfer syntaxes (Explicit VR Little Endian
    first) for the SOP classes of the files (``-R``), so every SCP stores the same encoding.

    Raises
    ------
    BenchmarkError
        When storescu fails (association refused, an instance not stored).
    """
    cmd = [require_tool("storescu"), "-R", "-aet", calling, "-aec", called, "127.0.0.1", str(port)]
    t0 = time.perf_counter()
    out = subprocess.run([*cmd, *map(str, files)], capture_output=True, text=True, timeout=timeout)
    elapsed = time.perf_counter() - t0
    if out.returncode != 0 or "E:" in out.stderr:
        raise BenchmarkError(
            f"storescu to {called} failed ({out.returncode}): {out.stderr[-2000:]}"
        )
    return elapsed


# -- the service ------------------------------------------------------------------------------


@dataclass
class Serve:
    """``dicom-covid serve`` in a subprocess on a free loopback port.

    Parameters
    ----------
    folder : pathlib.Path
        Its state folder is ``folder/state``; its log ``folder/serve.log``.
    bundle : pathlib.Path
        MONAI bundle.
    quiet_period : float
        ``--quiet-period``.
    destinations : sequence of str
        ``--destination`` values (``AE@host:port``); none: results go to ``--output-dir``.
    output_dir : pathlib.Path, optional
        ``--output-dir``.
    port : int, optional
        Port (default: a free one).
    extra : sequence of str
        Further flags.
    calling : str
        Calling AE title of the readiness C-ECHO (one the service accepts).
    """

    folder: Path
    bundle: Path
    quiet_period: float = 1.0
    destinations: Sequence[str] = ()
    output_dir: Path | None = None
    port: int = 0
    extra: Sequence[str] = ()
    ae_title: str = "DICOMCOVID"
    calling: str = "BENCH"
    proc: subprocess.Popen | None = None
    ready_s: float = float("nan")

    @property
    def state_dir(self) -> Path:
        return self.folder / "state"

    @property
    def db_path(self) -> Path:
        return self.state_dir / "jobs.sqlite"

    @property
    def log_path(self) -> Path:
        return self.folder / "serve.log"

    def log(self) -> str:
        """What the service logged so far."""
        p = self.log_path
        return p.read_text(errors="replace") if p.exists() else ""

    def start(self, timeout: float = 600.0) -> Serve:
        """Start and wait until the worker has loaded the model and the SCP answers C-ECHO."""
        self.folder.mkdir(parents=True, exist_ok=True)
        self.port = self.port or free_port()
        cmd = [
            *cli(),
            "serve",
            "--ae-title",
            self.ae_title,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--state-dir",
            str(self.state_dir),
            "--quiet-period",
            str(self.quiet_period),
            "--bundle",
            str(self.bundle),
            "--retry-base",
            "0.5",
            "--min-free-mb",
            "64",
        ]
        for d in self.destinations:
            cmd += ["--destination", d]
        if self.output_dir is not None:
            cmd += ["--output-dir", str(self.output_dir)]
        cmd += list(self.extra)
        t0 = time.perf_counter()
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + timeout
            while "service running" not in self.log():
                if self.proc.poll() is not None:
                    raise BenchmarkError(
                        f"dicom-covid serve exited with {self.proc.returncode}:\n"
                        f"{self.log()[-3000:]}"
                    )
                if time.monotonic() > deadline:
                    raise BenchmarkError(f"dicom-covid serve not ready within {timeout} s")
                time.sleep(0.2)
            wait_for_echo(self.port, self.ae_title, 30, self.proc, calling=self.calling)
        except BaseException:
            self.stop()
            raise
        self.ready_s = time.perf_counter() - t0
        return self

    def stop(self, timeout: float = 120.0) -> int | None:
        """SIGTERM and wait; return the exit status."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode

    def __enter__(self) -> Serve:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextlib.contextmanager
def read_store(db_path: Path) -> Iterator[sqlite3.Connection]:
    """A query-only connection to the job store (safe while the service runs: WAL)."""
    con = sqlite3.connect(db_path, timeout=30.0)
    con.row_factory = sqlite3.Row
    con.execute("PRAGMA query_only=1")
    try:
        yield con
    finally:
        con.close()


def job_stages(db_path: Path) -> dict[str, dict[str, float | None]]:
    """Timestamps (epoch seconds) of each job's stages, keyed by Study Instance UID.

    ``received`` is the arrival of the study's last instance in the job, ``grouped`` the job's
    creation (quiet period over), ``started``/``finished`` the worker's claim and end,
    ``delivered`` the moment every result was confirmed by every target. A study with several
    jobs keeps its last one.
    """
    out: dict[str, dict[str, float | None]] = {}
    with read_store(db_path) as con:
        rows = con.execute(
            "SELECT j.id, j.study_instance_uid, j.created_at, j.started_at, j.finished_at, "
            "j.delivered_at, j.state, (SELECT MAX(received_at) FROM instances i "
            "WHERE i.job_id = j.id) AS received FROM jobs j ORDER BY j.id"
        ).fetchall()
    for r in rows:
        out[r["study_instance_uid"]] = {
            "job_id": r["id"],
            "state": r["state"],
            "received": r["received"],
            "grouped": r["created_at"],
            "started": r["started_at"],
            "finished": r["finished_at"],
            "delivered": r["delivered_at"],
        }
    return out


# -- the bare SCP (floor of the design) --------------------------------------------------------


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def run_bare_scp(port: int, folder: Path, ae_title: str = "BARE", fsync: bool = True) -> None:
    """A pynetdicom C-STORE SCP whose handler only spools, durably; runs until SIGTERM.

    The handler writes ``event.encoded_dataset()`` to a temporary file, fsyncs it, renames it to
    ``<SOPInstanceUID>.dcm`` and fsyncs the folder (exactly the spool's steps), then answers
    0x0000. No header parsing, no job store: the floor of the service's C-STORE path. With
    ``fsync=False`` both fsyncs are left out (to separate pynetdicom's cost from the disk's).
    """
    from pynetdicom import AE, AllStoragePresentationContexts, evt
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)
    folder.mkdir(parents=True, exist_ok=True)

    def on_store(event) -> int:
        sop = str(event.request.AffectedSOPInstanceUID)
        path = folder / f"{sop}.dcm"
        tmp = folder / f".{sop}.{os.urandom(4).hex()}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(event.encoded_dataset())
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
        if fsync:
            _fsync_dir(folder)
        return 0x0000

    ae = AE(ae_title=ae_title)
    ae.maximum_pdu_size = MAX_PDU
    ae.maximum_associations = 8
    ae.add_supported_context(Verification)
    for cx in AllStoragePresentationContexts:
        ae.add_supported_context(cx.abstract_syntax, [EXPLICIT_LE, IMPLICIT_LE])
    server = ae.start_server(
        ("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)]
    )
    stop = False

    def on_term(*_: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    while not stop:
        time.sleep(0.1)
    server.shutdown()


@contextlib.contextmanager
def bare_scp(folder: Path, ae_title: str = "BARE", fsync: bool = True) -> Iterator[int]:
    """Run :func:`run_bare_scp` in a subprocess; yield its port."""
    port = free_port()
    cmd = [sys.executable, __file__, "bare-scp", "--port", str(port), "--folder", str(folder)]
    proc = subprocess.Popen([*cmd, "--ae-title", ae_title, "--fsync" if fsync else "--no-fsync"])
    try:
        wait_for_echo(port, ae_title, 60, proc)
        yield port
    finally:
        proc.terminate()
        proc.wait(30)


@contextlib.contextmanager
def dcmtk_storescp(folder: Path, ae_title: str = "STORESCP", nodelay: bool = True) -> Iterator[int]:
    """Run dcmtk ``storescp`` writing what it receives byte for byte (``+B``) into ``folder``.

    With ``nodelay`` (default) it runs with ``TCP_NODELAY=1``, dcmtk's run-time switch that
    disables Nagle's algorithm. Debian's dcmtk 3.6.7 leaves Nagle on by default, and then every
    C-STORE response waits for the sender's delayed ACK (about 40 ms on Linux loopback), which
    caps it near 20 instances/s whatever the work.
    """
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    cmd = [
        require_tool("storescp"),
        "-aet",
        ae_title,
        "-od",
        str(folder),
        "+B",
        "-pdu",
        str(MAX_PDU),
        str(port),
    ]
    env = {**os.environ, "TCP_NODELAY": "1" if nodelay else "0"}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        wait_for_echo(port, ae_title, 60, proc)
        yield port
    finally:
        proc.terminate()
        proc.wait(30)


def _main() -> None:
    parser = argparse.ArgumentParser(description="helper processes of the benchmarks")
    sub = parser.add_subparsers(dest="cmd", required=True)
    bare = sub.add_parser("bare-scp", help="the bare spooling SCP")
    bare.add_argument("--port", type=int, required=True)
    bare.add_argument("--folder", type=Path, required=True)
    bare.add_argument("--ae-title", default="BARE")
    bare.add_argument("--fsync", action=argparse.BooleanOptionalAction, default=True)
    args = parser.parse_args()
    if args.cmd == "bare-scp":
        run_bare_scp(args.port, args.folder, args.ae_title, args.fsync)


if __name__ == "__main__":
    _main()
