"""Job store backends: the database under :class:`pacs_listener.jobs.JobStore`.

:class:`~pacs_listener.jobs.JobStore` holds every query and the state machine; a backend holds
only what differs between databases: connections, transactions, the schema with its state
machine triggers, its migrations, and a few SQL spellings.

- :class:`SQLiteBackend` (the default): one file in the state folder, for one machine.
- :class:`PostgresBackend` (``--job-store postgresql://…``): one database several ``serve``
  nodes share; claims take rows with ``FOR UPDATE SKIP LOCKED``, so they stay exclusive
  across nodes.

Both refuse a database written by a newer dicom-covid (:class:`StoreError`) and migrate one
written by an older one when opened with ``create=True``.
"""

from __future__ import annotations

from pathlib import Path

from .base import (
    INTEGRITY_ERRORS,
    SCHEMA_VERSION,
    STORE_ERRORS,
    Backend,
    LeaseLost,
    StoreError,
    is_store_url,
    redact_url,
)

__all__ = [
    "INTEGRITY_ERRORS",
    "SCHEMA_VERSION",
    "STORE_ERRORS",
    "Backend",
    "LeaseLost",
    "StoreError",
    "is_store_url",
    "open_backend",
    "redact_url",
]


def open_backend(location: str | Path, create: bool = True) -> Backend:
    """The backend for a job store location.

    Parameters
    ----------
    location : str or pathlib.Path
        A ``postgresql://`` (or ``postgres://``) URL, or the path of a SQLite file.
    create : bool
        Create (or migrate) the schema when needed; False opens an existing store only
        (``FileNotFoundError`` for a missing SQLite file).

    Returns
    -------
    Backend
    """
    if is_store_url(location):
        from .postgres import PostgresBackend

        return PostgresBackend(str(location), create=create)
    from .sqlite import SQLiteBackend

    return SQLiteBackend(Path(location), create=create)
