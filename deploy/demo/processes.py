"""Ports and process ids of the demo: choosing free ports, finding and stopping a running demo."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .common import PREFERRED_PORTS, STATE_FILE, STOP_ORDER, DemoError

__all__ = ["DemoPorts", "running_demo", "stop_recorded"]

#: Words each recorded process's command line must contain before ``--stop`` signals it (the
#: children's also name the state folder, so a recycled pid is never mistaken for one of them).
_CMDLINE_TOKENS = {
    "nginx": ("nginx",),
    "serve": ("dicom_covid.cli.main", "serve"),
    "orthanc": ("Orthanc",),
    "demo": ("dicom", "demo"),
}


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("0.0.0.0", port))  # Orthanc binds every interface; be as strict
        except OSError:
            return False
    return True


def _any_free_port(taken: set[int]) -> int:
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port not in taken and _port_free(port):
            return port


@dataclass(frozen=True)
class DemoPorts:
    """TCP ports of the demo (all on loopback, except that Orthanc binds every interface)."""

    viewer: int
    orthanc_http: int
    orthanc_dicom: int
    serve: int

    @classmethod
    def pick(cls, any_free: bool = False, **configured: int | None) -> DemoPorts:
        """Configured ports (must be free), else the preferred ones when free, else free ones.

        Parameters
        ----------
        any_free : bool
            Ignore the preferred ports (tests: never collide with a running demo).
        **configured : int or None
            ``viewer``, ``orthanc_http``, ``orthanc_dicom``, ``serve``; None or 0 = choose.

        Raises
        ------
        DemoError
            When a configured port is in use.
        """
        chosen: dict[str, int] = {}
        for name in PREFERRED_PORTS:
            want = configured.get(name)
            if want:
                if not _port_free(want) or want in chosen.values():
                    raise DemoError(
                        f"port {want} (--{name.replace('_', '-')}-port) is in use; choose "
                        "another or leave it out to take a free one."
                    )
                chosen[name] = want
        for name, preferred in PREFERRED_PORTS.items():
            if name in chosen:
                continue
            if not any_free and preferred not in chosen.values() and _port_free(preferred):
                chosen[name] = preferred
            else:
                chosen[name] = _any_free_port(set(chosen.values()))
        return cls(**chosen)


def _pid_alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def _pid_is(pid: int, name: str, state_dir: Path | None = None) -> bool:
    """True when ``pid`` lives and its command line is that of the demo's process ``name``."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return False
    words = [*_CMDLINE_TOKENS[name], *([str(state_dir)] if state_dir is not None else [])]
    return _pid_alive(pid) and all(w in cmdline for w in words)


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while _pid_alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def running_demo(state_dir: Path) -> dict | None:
    """The recorded state of a demo whose processes still run, else None."""
    path = state_dir / STATE_FILE
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    children = state.get("pids", {})
    if any(_pid_is(int(pid), name, state_dir) for name, pid in children.items() if pid):
        return state
    if state.get("demo_pid") and _pid_is(int(state["demo_pid"]), "demo"):
        return state
    return None


def stop_recorded(state_dir: Path, say: Callable[[str], None] = print) -> bool:
    """Stop the demo recorded in ``state_dir`` (``dicom-covid demo --stop``).

    The foreground ``dicom-covid demo`` is asked to stop first (it stops its children in
    order); any recorded process still alive after that is sent SIGTERM. A recorded pid is only
    signalled while its command line still names the program that was started.

    Returns
    -------
    bool
        False when no demo was running.
    """
    state = running_demo(state_dir)
    if state is None:
        return False
    demo_pid = int(state.get("demo_pid", 0))
    if demo_pid and demo_pid != os.getpid() and _pid_is(demo_pid, "demo"):
        say(f"[demo] asking dicom-covid demo (pid {demo_pid}) to stop")
        os.kill(demo_pid, signal.SIGTERM)
        _wait_gone(demo_pid, 120)
    pids = state.get("pids", {})
    for name in STOP_ORDER:
        pid = int(pids.get(name, 0))
        if pid and _pid_is(pid, name, state_dir):
            say(f"[demo] stopping {name} (pid {pid})")
            os.kill(pid, signal.SIGTERM)
            if not _wait_gone(pid, 90):
                os.kill(pid, signal.SIGKILL)
                _wait_gone(pid, 10)
    with contextlib.suppress(FileNotFoundError):
        (state_dir / STATE_FILE).unlink()
    return True
