"""A real ``dicom-covid serve`` subprocess for the reliability and security tests.

The service runs in its own process group (so a test can kill it and its worker together with
SIGKILL, as a power cut would), with stdout and stderr captured to files (a pipe could fill up and
block a busy service) and its log file in the test's folder. Every run's captured output is kept,
so a test can search everything the service ever printed.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

from pacs_helpers import free_port

ROOT = Path(__file__).resolve().parent.parent
CLI = ROOT / ".venv" / "bin" / "dicom-covid"

__all__ = ["CLI", "ServeProcess", "run_cli"]


class ServeProcess:
    """``dicom-covid serve`` with a state folder that outlives restarts.

    Parameters
    ----------
    folder : pathlib.Path
        Test folder: ``state/``, ``service.log`` and the captured output go here.
    bundle : pathlib.Path
        Model bundle (``--bundle``).
    args : sequence of str
        Further ``serve`` flags (destinations, quiet period, TLS, ...).
    port : int, optional
        Port to listen on (default: a free one, kept across restarts).
    allow : str or None
        ``--allow-ae`` value (default ``ORTHANC``); None for none.
    umask : int, optional
        Umask the service runs with (to check file modes do not depend on it).
    state, log : pathlib.Path, optional
        State folder and log file elsewhere than ``folder/state`` and ``folder/service.log``
        (e.g. on a small file system); the captured stdout and stderr stay in ``folder``.
    """

    def __init__(
        self,
        folder: Path,
        bundle: Path,
        args: tuple[str, ...] | list[str] = (),
        port: int | None = None,
        allow: str | None = "ORTHANC",
        umask: int | None = None,
        state: Path | None = None,
        log: Path | None = None,
    ) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.state = Path(state) if state else self.folder / "state"
        self.log = Path(log) if log else self.folder / "service.log"
        self.bundle = bundle
        self.args = list(args)
        self.port = port or free_port()
        self.allow = allow
        self.umask = umask
        self.proc: subprocess.Popen | None = None
        self.runs = 0
        self._out: list[Path] = []

    def command(self) -> list[str]:
        cmd = [
            str(CLI),
            "serve",
            "--state-dir",
            str(self.state),
            "--port",
            str(self.port),
            "--bundle",
            str(self.bundle),
            "--log-file",
            str(self.log),
            "--min-free-mb",
            "0",
        ]
        if self.allow:
            cmd += ["--allow-ae", self.allow]
        return cmd + self.args

    def start(self, wait: bool = True, timeout: float = 240.0) -> ServeProcess:
        """Start the service; with ``wait``, block until its worker has loaded the model."""
        self.runs += 1
        out = self.folder / f"run{self.runs}.stdout"
        err = self.folder / f"run{self.runs}.stderr"
        self._out += [out, err]
        umask = self.umask
        mark = self.log.stat().st_size if self.log.exists() else 0
        with out.open("wb") as o, err.open("wb") as e:
            self.proc = subprocess.Popen(
                self.command(),
                stdout=o,
                stderr=e,
                start_new_session=True,  # own process group: killpg reaches the worker too
                preexec_fn=(lambda: os.umask(umask)) if umask is not None else None,
            )
        if wait:
            self.wait_ready(timeout, mark)
        return self

    def wait_ready(self, timeout: float = 240.0, mark: int = 0) -> None:
        """Wait for "service running" in the log (written after ``mark``)."""
        deadline = time.monotonic() + timeout
        while True:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"serve exited with {self.proc.returncode} before it was ready:\n"
                    + self.output()[-4000:]
                )
            if self.log.exists():
                with self.log.open("rb") as f:
                    f.seek(mark)
                    if b"service running" in f.read():
                        return
            if time.monotonic() > deadline:
                raise AssertionError(f"serve not ready after {timeout} s:\n{self.output()[-4000:]}")
            time.sleep(0.1)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 120.0) -> int:
        """SIGTERM and wait; return the exit status."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL the whole process group (service, worker, resource tracker) and reap it."""
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(60)
        # the group may outlive its leader for a moment; make sure nothing of it is left
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.killpg(self.proc.pid, 0)
            except ProcessLookupError:
                return
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                return
            time.sleep(0.05)

    def output(self) -> str:
        """Everything every run printed on stdout and stderr so far."""
        return "\n".join(p.read_text(errors="replace") for p in self._out if p.exists())

    def output_bytes(self) -> bytes:
        return b"\n".join(p.read_bytes() for p in self._out if p.exists())

    def log_files(self) -> list[Path]:
        """The log file and the captured outputs."""
        return [p for p in (self.log, *self._out) if p.exists()]

    def close(self) -> None:
        """Stop the service if it still runs (test teardown)."""
        if self.alive():
            self.stop()


def run_cli(*args: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
    """Run ``dicom-covid ARGS`` as a subprocess and capture its output."""
    return subprocess.run(
        [str(CLI), *args], capture_output=True, text=True, timeout=timeout, check=False
    )
