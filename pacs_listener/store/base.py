"""What every job store backend provides, and the errors callers catch for any of them."""

from __future__ import annotations

import contextlib
import re
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

from dicom_covid.errors import DicomCovidError

__all__ = [
    "INTEGRITY_ERRORS",
    "SCHEMA_VERSION",
    "STORE_ERRORS",
    "Backend",
    "LeaseLost",
    "StoreError",
    "is_store_url",
    "redact_url",
]

#: Version 4 installed the state machines as triggers; version 5 adds claim leases
#: (``jobs.lease_until``) and the ``nodes`` table of the processes sharing a store.
SCHEMA_VERSION = 5

try:  # PostgreSQL support is optional (``pip install dicom-covid[postgresql]``)
    import psycopg as _psycopg
except ImportError:  # pragma: no cover - the test and dev extras install it
    _psycopg = None

#: Errors a job store operation may raise, whichever the backend (catch these, not
#: ``sqlite3.Error``).
STORE_ERRORS: tuple[type[BaseException], ...] = (sqlite3.Error,) + (
    (_psycopg.Error,) if _psycopg is not None else ()
)
#: Errors of a refused write: a duplicate key or a state change the machine does not allow.
INTEGRITY_ERRORS: tuple[type[BaseException], ...] = (sqlite3.IntegrityError,) + (
    (_psycopg.IntegrityError,) if _psycopg is not None else ()
)


class StoreError(DicomCovidError):
    """The job store cannot be used (written by a newer dicom-covid, unreachable, ...)."""


class LeaseLost(StoreError):
    """A worker's claim on a job expired and another worker took the job over.

    The worker stopped renewing its lease (it was frozen, or cut off from the database) for
    longer than the lease: its results for that job are not recorded, the new owner's are.
    """


def is_store_url(location: str | Path) -> bool:
    """True when ``location`` names a PostgreSQL database rather than a SQLite file."""
    return isinstance(location, str) and location.startswith(("postgresql://", "postgres://"))


def redact_url(location: str | Path) -> str:
    """``location`` for messages and logs: a URL's password is replaced by ``***``."""
    return re.sub(r"(://[^/:@]*:)[^@/]*@", r"\1***@", str(location))


class Backend(Protocol):
    """The database under a :class:`~pacs_listener.jobs.JobStore`.

    SQL given to :meth:`connection`'s ``execute`` uses ``?`` placeholders and the SQL both
    databases understand; the few spellings that differ come from the backend's attributes.
    """

    #: True when several machines may share this store (claims then need leases to move on
    #: when a node dies, and a starting node releases only its own claims).
    shared: bool
    #: Folder relative result and spool paths are stored against (None: the caller says).
    root: Path | None
    #: Appended to the claim query to lock the rows it returns (or ``""``).
    lock_rows: str

    def describe(self) -> str:
        """The store's location for messages (no password)."""

    def connection(self) -> Any:
        """This thread's connection: ``execute(sql, args)`` returns a cursor with
        ``fetchone``, ``fetchall``, iteration and ``rowcount``; rows are indexable by
        position and by column name."""

    def transaction(self, con: Any) -> contextlib.AbstractContextManager[Any]:
        """A write transaction on ``con`` (joined when one is already open)."""

    def snapshot(self, con: Any) -> contextlib.AbstractContextManager[Any]:
        """A read-only transaction whose queries all see one consistent state."""

    def lock_grouping(self, con: Any) -> None:
        """Inside a transaction: wait until no other process is grouping studies."""

    def release_space(self) -> None:
        """Give back disk space the database holds beyond its data (best effort)."""

    def pragma(self, name: str) -> object:
        """A setting of the database (SQLite: a PRAGMA)."""

    def close(self) -> None:
        """Close every connection."""


@contextlib.contextmanager
def joined_transaction(con: Any, begin: str) -> Iterator[Any]:
    """Run a block in a transaction started with ``begin`` unless ``con`` already has one."""
    if con.in_transaction:  # nested use joins the outer transaction
        yield con
        return
    con.execute(begin)
    try:
        yield con
    except BaseException:
        with contextlib.suppress(*STORE_ERRORS):
            con.execute("ROLLBACK")
        raise
    con.execute("COMMIT")
