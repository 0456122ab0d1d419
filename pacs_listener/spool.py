"""Durable files: the spool of received instances and the results waiting for delivery.

Every file is written the same way (:func:`atomic_write`): a temporary file in the target folder
opened with mode 0600, written, ``fsync``-ed, renamed into place, and the folder ``fsync``-ed.
A crash leaves either the old state or the complete new file, never half a DICOM file; leftover
``*.tmp`` files are removed by :meth:`Spool.clean_temporary`. Folders are created with mode 0700.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import re
import shutil
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path

__all__ = [
    "Spool",
    "atomic_copy",
    "atomic_write",
    "ensure_private_dir",
    "free_bytes",
    "is_disk_full",
    "safe_name",
    "write_fault",
]

logger = logging.getLogger(__name__)

_UID_RE = re.compile(r"^[0-9][0-9.]{0,63}$")


def ensure_private_dir(path: Path) -> Path:
    """Create ``path`` (and parents) with mode 0700 when missing; tighten it when it exists.

    Every folder created here gets 0700 whatever the umask (``mkdir(parents=True)`` would give
    the missing parents the umask's mode); existing parents are left alone.
    """
    missing = []
    p = Path(path)
    while not p.exists() and p != p.parent:
        missing.append(p)
        p = p.parent
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    for p in (path, *missing):
        with contextlib.suppress(PermissionError, FileNotFoundError):
            os.chmod(p, 0o700)
    return path


def safe_name(uid: str) -> str:
    """A file name for a UID: the UID itself when it is a well-formed UID, else a hash of it."""
    uid = uid.strip().rstrip("\0")
    if _UID_RE.match(uid) and ".." not in uid:
        return uid
    return "x" + hashlib.sha256(uid.encode("utf-8", "replace")).hexdigest()[:40]


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


#: Fault injection for tests: called with the target path before every :func:`atomic_write`
#: writes; it may raise the ``OSError`` a full disk raises (see :func:`write_fault`).
_write_fault: Callable[[Path], None] | None = None


@contextlib.contextmanager
def write_fault(fault: Callable[[Path], None]) -> Iterator[None]:
    """Within the block, call ``fault(path)`` at every :func:`atomic_write`, before it writes.

    For tests of what a full disk does (this process only)::

        def full(path):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))

        with write_fault(full):
            ...
    """
    global _write_fault
    saved, _write_fault = _write_fault, fault
    try:
        yield
    finally:
        _write_fault = saved


_DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


def is_disk_full(exc: BaseException) -> bool:
    """True when ``exc`` means the disk (or the user's quota) is full: ``ENOSPC``/``EDQUOT``,
    SQLite's "database or disk is full", or PostgreSQL's ``disk_full`` (SQLSTATE 53100)."""
    if isinstance(exc, OSError):
        return exc.errno in _DISK_FULL_ERRNOS
    if getattr(exc, "sqlstate", None) == "53100":
        return True
    if isinstance(exc, sqlite3.Error):
        return getattr(exc, "sqlite_errorcode", None) == 13 or "disk is full" in str(exc)
    return False


def atomic_write(path: Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (tmp file, fsync, rename) with mode 0600.

    Raises
    ------
    OSError
        When the file cannot be written (disk full, permissions); no partial file is left.
    """
    if _write_fault is not None:
        _write_fault(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_dir(path.parent)
    return path


def atomic_copy(src: Path, dst: Path) -> Path:
    """Copy ``src`` to ``dst`` atomically (see :func:`atomic_write`)."""
    ensure_private_dir(dst.parent)
    return atomic_write(dst, Path(src).read_bytes())


def free_bytes(path: Path) -> int:
    """Free bytes available to unprivileged users on the file system holding ``path``."""
    return shutil.disk_usage(path).free


class Spool:
    """Received instances, one file per SOP Instance, grouped in a folder per study.

    Parameters
    ----------
    root : pathlib.Path
        Spool folder (created with mode 0700).
    """

    def __init__(self, root: Path) -> None:
        self.root = ensure_private_dir(Path(root))

    def path_for(self, study_uid: str, sop_uid: str) -> Path:
        """Where the instance ``sop_uid`` of study ``study_uid`` is kept."""
        return self.root / safe_name(study_uid) / f"{safe_name(sop_uid)}.dcm"

    def write(self, study_uid: str, sop_uid: str, data: bytes) -> Path:
        """Store the encoded instance durably and return its path.

        Raises
        ------
        OSError
            When it cannot be written.
        """
        path = self.path_for(study_uid, sop_uid)
        ensure_private_dir(path.parent)
        return atomic_write(path, data)

    def remove(self, path: Path | str) -> None:
        """Delete one spooled file (and its study folder when that becomes empty)."""
        p = Path(path)
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
        with contextlib.suppress(OSError):
            p.parent.rmdir()

    def clean_temporary(self) -> int:
        """Remove ``*.tmp`` files a crash left behind; return how many."""
        n = 0
        for tmp in self.root.rglob(".*.tmp"):
            with contextlib.suppress(OSError):
                tmp.unlink()
                n += 1
        if n:
            logger.info("removed %d incomplete spool file(s) left by an earlier run", n)
        return n
