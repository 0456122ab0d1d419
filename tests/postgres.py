"""A throw-away PostgreSQL cluster for the tests: ``initdb`` + ``pg_ctl`` on a free loopback
port in a temporary folder.

PostgreSQL refuses to run as root, so when the tests run as root (CI does) the cluster runs
as the ``postgres`` system user the Debian package creates, in a folder that user owns. Trust
authentication on loopback only; nothing outside the machine can connect. Each test gets its
own database (:meth:`Postgres.new_database`), so tests never see each other's jobs.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

__all__ = ["Postgres", "bin_dir", "running_postgres"]

USER = "dicomcovid"


def bin_dir() -> Path | None:
    """Folder of the newest installed PostgreSQL server binaries (Debian layout), or None."""
    found = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/initdb"),
        key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0,
    )
    if found:
        return found[-1].parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Postgres:
    """A running cluster."""

    port: int
    data: Path
    _counter: itertools.count = field(default_factory=lambda: itertools.count(1))

    def url(self, database: str = "postgres") -> str:
        """Connection URL of one database of the cluster."""
        return f"postgresql://{USER}@127.0.0.1:{self.port}/{database}"

    def new_database(self) -> str:
        """Create an empty database; return its URL."""
        import psycopg

        name = f"test_{os.getpid()}_{next(self._counter)}"
        with psycopg.connect(self.url(), autocommit=True) as con:
            con.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def log(self) -> str:
        """The server's log (for failure messages)."""
        path = self.data / "server.log"
        return path.read_text(errors="replace") if path.exists() else ""


def _as_postgres_user() -> dict:
    """``subprocess`` arguments that run a command as the ``postgres`` user when we are root."""
    if os.geteuid() != 0:
        return {}
    try:
        pw = pwd.getpwnam("postgres")
    except KeyError:
        pytest.fail("running as root needs the 'postgres' system user (apt-get install postgresql)")
    return {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}


@contextlib.contextmanager
def running_postgres(fsync: bool = False) -> Iterator[Postgres]:
    """Start a cluster; stop it and delete its files afterwards.

    Skips when PostgreSQL is not installed, and fails instead under ``CI=true``.

    Parameters
    ----------
    fsync : bool
        Flush commits to disk as a production server does (default False: the tests check
        behaviour, not durability against power loss, and run faster without).
    """
    binaries = bin_dir()
    if binaries is None:
        why = "PostgreSQL is not installed (apt-get install postgresql)"
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI needs {why}")
        pytest.skip(why)
    run_as = _as_postgres_user()
    folder = Path(tempfile.mkdtemp(prefix="dicom-covid-pg-"))
    data, sockets = folder / "data", folder / "sockets"
    sockets.mkdir()
    if run_as:
        for p in (folder, sockets):
            os.chown(p, run_as["user"], run_as["group"])
    port = _free_port()
    env = {**os.environ, "LC_ALL": "C"}
    try:
        subprocess.run(
            [
                binaries / "initdb",
                "-D",
                data,
                "-U",
                USER,
                "--auth=trust",
                "--locale=C",
                "-E",
                "UTF8",
                "--no-sync",
            ],
            check=True,
            capture_output=True,
            env=env,
            cwd=folder,
            **run_as,
        )
        options = (
            f"-p {port} -k {sockets} -c listen_addresses=127.0.0.1 "
            f"-c fsync={'on' if fsync else 'off'} -c max_connections=200"
        )
        subprocess.run(
            [
                binaries / "pg_ctl",
                "-D",
                data,
                "-l",
                data / "server.log",
                "-o",
                options,
                "-w",
                "-t",
                "60",
                "start",
            ],
            check=True,
            capture_output=True,
            env=env,
            cwd=folder,
            **run_as,
        )
    except subprocess.CalledProcessError as exc:
        shutil.rmtree(folder, ignore_errors=True)
        pytest.fail(f"PostgreSQL did not start: {exc.stderr.decode(errors='replace')}")
    try:
        yield Postgres(port, data)
    finally:
        subprocess.run(
            [binaries / "pg_ctl", "-D", data, "-m", "immediate", "-w", "stop"],
            capture_output=True,
            env=env,
            cwd=folder,
            **run_as,
        )
        shutil.rmtree(folder, ignore_errors=True)
