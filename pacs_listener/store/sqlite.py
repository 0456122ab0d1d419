"""The embedded job store: one SQLite file (WAL, ``synchronous=FULL``) for one machine.

The file is created with mode 0600 in a folder with mode 0700 (SQLite gives its ``-wal`` and
``-shm`` files the same mode). Each thread gets its own connection; write transactions are
``BEGIN IMMEDIATE``, so they are serialised by the database and a claim is exclusive across
the processes of one machine.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

from ..spool import ensure_private_dir
from ..states import (
    DELIVERY_TRANSITIONS,
    INSTANCE_TRANSITIONS,
    JOB_TRANSITIONS,
    transition_trigger,
)
from .base import SCHEMA_VERSION, StoreError, joined_transaction

__all__ = ["SQLiteBackend"]

#: Bytes the write-ahead log is truncated to after a checkpoint (``journal_size_limit``).
WAL_LIMIT = 2**20

#: Columns added after schema version 1: (table, column, definition).
MIGRATIONS = (
    ("jobs", "not_before", "REAL"),
    ("jobs", "disk_waits", "INTEGER NOT NULL DEFAULT 0"),
    ("instances", "reserve_bytes", "INTEGER NOT NULL DEFAULT 0"),
    ("results", "outcome", "TEXT"),  # version 3: the prediction's outcome, for the metrics
    ("jobs", "lease_until", "REAL"),  # version 5: claims expire unless renewed
)

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    study_instance_uid TEXT NOT NULL,
    state TEXT NOT NULL,
    reason TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    claimed_by TEXT,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    delivered_at REAL,
    not_before REAL,
    disk_waits INTEGER NOT NULL DEFAULT 0,
    lease_until REAL
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs (state, id);
CREATE TABLE IF NOT EXISTS instances (
    sop_instance_uid TEXT PRIMARY KEY,
    study_instance_uid TEXT NOT NULL,
    series_instance_uid TEXT NOT NULL DEFAULT '',
    sop_class_uid TEXT NOT NULL DEFAULT '',
    calling_ae TEXT NOT NULL DEFAULT '',
    path TEXT,
    state TEXT NOT NULL,
    reason TEXT,
    job_id INTEGER REFERENCES jobs (id),
    duplicates INTEGER NOT NULL DEFAULT 0,
    reserve_bytes INTEGER NOT NULL DEFAULT 0,
    received_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS instances_state ON instances (state, job_id);
CREATE INDEX IF NOT EXISTS instances_study ON instances (study_instance_uid);
CREATE INDEX IF NOT EXISTS instances_job ON instances (job_id);
CREATE TABLE IF NOT EXISTS results (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id INTEGER NOT NULL REFERENCES jobs (id),
    source_sop_instance_uid TEXT NOT NULL REFERENCES instances (sop_instance_uid),
    kind TEXT NOT NULL,
    sop_instance_uid TEXT NOT NULL UNIQUE,
    study_instance_uid TEXT NOT NULL,
    path TEXT NOT NULL,
    created_at REAL NOT NULL,
    outcome TEXT,
    UNIQUE (source_sop_instance_uid, kind)
);
CREATE INDEX IF NOT EXISTS results_job ON results (job_id);
CREATE TABLE IF NOT EXISTS deliveries (
    result_id INTEGER NOT NULL REFERENCES results (id),
    target TEXT NOT NULL,
    state TEXT NOT NULL,
    tries INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL,
    last_error TEXT,
    delivered_at REAL,
    PRIMARY KEY (result_id, target)
);
CREATE INDEX IF NOT EXISTS deliveries_due ON deliveries (state, next_attempt_at);
CREATE TABLE IF NOT EXISTS nodes (
    node_id TEXT PRIMARY KEY,
    host TEXT NOT NULL,
    pid INTEGER NOT NULL,
    roles TEXT NOT NULL,
    version TEXT NOT NULL,
    started_at REAL NOT NULL,
    heartbeat_at REAL NOT NULL
);
"""


class SQLiteBackend:
    """A job store in one SQLite file.

    Parameters
    ----------
    path : pathlib.Path
        Database file (created with mode 0600, its folder with 0700, when missing).
    create : bool
        Create the file and schema when missing, migrate an older schema (default True);
        False raises ``FileNotFoundError`` for a missing store (``status``/``retry``).

    Raises
    ------
    StoreError
        When the store was written by a newer version of dicom-covid.
    """

    shared = False
    lock_rows = ""

    def __init__(self, path: Path, create: bool = True) -> None:
        self.path = Path(path)
        self.root: Path | None = self.path.parent
        if not self.path.exists():
            if not create:
                raise FileNotFoundError(self.path)
            ensure_private_dir(self.path.parent)
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o600)
            os.close(fd)
        self._local = threading.local()
        self._lock = threading.Lock()
        self._connections: list[sqlite3.Connection] = []
        self._check_version()
        if create:
            self._install()

    def describe(self) -> str:
        """The database file."""
        return str(self.path)

    def _install(self) -> None:
        con = self.connection()
        con.executescript(SCHEMA)  # idempotent (IF NOT EXISTS)
        for table, transitions in (
            ("instances", INSTANCE_TRANSITIONS),
            ("jobs", JOB_TRANSITIONS),
            ("deliveries", DELIVERY_TRANSITIONS),
        ):
            con.execute(transition_trigger(table, transitions))
        for table, column, definition in MIGRATIONS:  # an older store gains them
            have = {r[1] for r in con.execute(f"PRAGMA table_info({table})")}
            if column not in have:
                con.execute(f"ALTER TABLE {table} ADD COLUMN {column} {definition}")
        with self.transaction(con):
            con.execute(
                "INSERT INTO meta (key, value) VALUES ('schema_version', ?) "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (str(SCHEMA_VERSION),),
            )

    def _check_version(self) -> None:
        try:
            row = (
                self.connection()
                .execute("SELECT value FROM meta WHERE key = 'schema_version'")
                .fetchone()
            )
        except sqlite3.OperationalError:  # a new or version-1 store: no meta table yet
            return
        if row is not None and int(row[0]) > SCHEMA_VERSION:
            self.close()
            raise StoreError(
                f"the job store {self.path} has schema version {row[0]}, written by a newer "
                f"dicom-covid (this one reads up to version {SCHEMA_VERSION}); upgrade "
                "dicom-covid or use another --state-dir"
            )

    def connection(self) -> sqlite3.Connection:
        """This thread's connection (opened on first use)."""
        con = getattr(self._local, "con", None)
        if con is None:
            con = sqlite3.connect(
                self.path, timeout=30.0, isolation_level=None, check_same_thread=False
            )
            con.row_factory = sqlite3.Row
            con.execute("PRAGMA journal_mode=WAL")
            con.execute("PRAGMA synchronous=FULL")
            con.execute("PRAGMA foreign_keys=ON")
            con.execute("PRAGMA busy_timeout=30000")
            # after each checkpoint the write-ahead log shrinks back to 1 MiB: without this it
            # keeps the size it grew to (on a full disk, where checkpoints cannot complete, that
            # is all the space there was), and free space would never come back
            con.execute(f"PRAGMA journal_size_limit={WAL_LIMIT}")
            self._local.con = con
            with self._lock:
                self._connections.append(con)
        return con

    def transaction(self, con: sqlite3.Connection) -> contextlib.AbstractContextManager:
        """``BEGIN IMMEDIATE``: the write lock is taken at the start, so reads inside the
        transaction see what the writes will be checked against."""
        return joined_transaction(con, "BEGIN IMMEDIATE")

    @contextlib.contextmanager
    def snapshot(self, con: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
        """A read transaction (WAL: one snapshot, never blocks the writers)."""
        with joined_transaction(con, "BEGIN"):
            yield con

    def lock_grouping(self, con: sqlite3.Connection) -> None:
        """Nothing to do: ``BEGIN IMMEDIATE`` already serialises the writers."""

    def release_space(self) -> None:
        """Checkpoint and truncate the write-ahead log, giving its disk space back (best effort:
        a reader holding an old snapshot or a full disk may stop it; nothing is lost then)."""
        with contextlib.suppress(sqlite3.Error):
            self.connection().execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def pragma(self, name: str) -> object:
        """Value of a PRAGMA (tests check WAL and ``synchronous=FULL``)."""
        return self.connection().execute(f"PRAGMA {name}").fetchone()[0]

    def close(self) -> None:
        """Close every connection this object opened."""
        with self._lock:
            for con in self._connections:
                with contextlib.suppress(sqlite3.Error):
                    con.close()
            self._connections.clear()
        self._local = threading.local()
