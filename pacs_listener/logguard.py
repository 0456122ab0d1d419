"""Logging that a flood of identical errors or a full disk cannot turn against the service.

* :class:`RateLimitFilter` lets at most ``burst`` records with the same logger, level and
  message template through per ``interval`` seconds; the next one let through says how many
  were suppressed.
* :class:`DiskSafeFileHandler` and :class:`DiskSafeStreamHandler` stop writing for a while
  when a write fails (``ENOSPC`` on a full disk, a closed pipe), instead of printing a
  "Logging error" traceback for every record as :mod:`logging` does, and write how many records
  were lost once writing works again. A log on a full disk can neither crash nor spin the
  service.

The library never attaches handlers; ``dicom-covid serve`` does, with
:func:`install_service_logging`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
from pathlib import Path
from typing import TextIO

__all__ = [
    "DiskSafeFileHandler",
    "DiskSafeStreamHandler",
    "RateLimitFilter",
    "install_service_logging",
    "keep_template",
]

_FORMAT = "%(asctime)s %(levelname)s %(processName)s %(name)s: %(message)s"


class RateLimitFilter(logging.Filter):
    """At most ``burst`` identical records per ``interval`` seconds.

    Records are identical when logger name, level and message template (``record.msg``, not
    the formatted arguments) are the same: "instance X refused: disk full" for a thousand
    instances is one kind of record.

    Parameters
    ----------
    burst : int
        Records of one kind let through per interval (default 5).
    interval : float
        Seconds (default 60).
    """

    def __init__(self, burst: int = 5, interval: float = 60.0) -> None:
        super().__init__()
        self.burst = burst
        self.interval = interval
        self._lock = threading.Lock()
        self._seen: dict[tuple[str, int, str], list[float]] = {}  # [window start, n, dropped]

    def filter(self, record: logging.LogRecord) -> bool:
        # decided once per record, however many handlers share this filter
        decided = record.__dict__.get("_rate_limit_passed")
        if decided is not None:
            return bool(decided)
        passed = self._decide(record)
        record.__dict__["_rate_limit_passed"] = passed
        return passed

    def _decide(self, record: logging.LogRecord) -> bool:
        # a record from the worker process arrives formatted; its template travels along
        key = (record.name, record.levelno, str(record.__dict__.get("template", record.msg)))
        now = time.monotonic()
        with self._lock:
            state = self._seen.get(key)
            if state is None or now - state[0] >= self.interval:
                dropped = int(state[2]) if state else 0
                self._seen[key] = [now, 1, 0]
                if len(self._seen) > 10000:  # forget kinds not seen for a while
                    cutoff = now - self.interval
                    self._seen = {k: v for k, v in self._seen.items() if v[0] >= cutoff}
                if dropped:
                    record.msg = f"{record.msg} [{dropped} more like this suppressed]"
                return True
            state[1] += 1
            if state[1] <= self.burst:
                return True
            state[2] += 1
            return False


def keep_template(record: logging.LogRecord) -> bool:
    """Filter for a ``QueueHandler``: keep the message template next to the formatted message,
    so that :class:`RateLimitFilter` in the receiving process still sees records of one kind."""
    record.__dict__.setdefault("template", str(record.msg))
    return True


class _PausesOnError:
    """Mixin for stream handlers: after a failed write, drop records for ``pause`` seconds."""

    pause: float = 30.0
    _paused_until: float = 0.0
    _lost: int = 0

    def _write(self, record: logging.LogRecord) -> None:  # the handler's own emit
        raise NotImplementedError

    def emit(self, record: logging.LogRecord) -> None:
        now = time.monotonic()
        if now < self._paused_until:
            self._lost += 1
            return
        try:
            if self._lost:
                note = logging.LogRecord(
                    "pacs_listener.logguard",
                    logging.WARNING,
                    __file__,
                    0,
                    "%d log record(s) were lost while the log could not be written",
                    (self._lost,),
                    None,
                )
                self._write(note)
                self._lost = 0
            self._write(record)
        except OSError:
            self._lost += 1
            self._paused_until = now + self.pause
            self._drop_stream()
        except Exception:
            self.handleError(record)  # type: ignore[attr-defined]

    def _drop_stream(self) -> None:
        pass


class DiskSafeFileHandler(_PausesOnError, logging.FileHandler):
    """A file handler (mode 0600) that survives a full disk.

    On a failed write the file is closed (discarding what is buffered) and reopened on the
    first record after ``pause`` seconds.

    Parameters
    ----------
    path : pathlib.Path
        Log file, created with mode 0600 when missing.
    pause : float
        Seconds records are dropped after a failed write (default 30).
    """

    def __init__(self, path: Path, pause: float = 30.0) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600))
        super().__init__(path, encoding="utf-8")
        self.pause = pause

    def _write(self, record: logging.LogRecord) -> None:
        if self.stream is None:
            self.stream = self._open()
        msg = self.format(record)
        self.stream.write(msg + self.terminator)
        self.stream.flush()

    def _drop_stream(self) -> None:
        stream, self.stream = self.stream, None  # type: ignore[assignment]
        if stream is not None:
            with contextlib.suppress(Exception):
                stream.close()


class DiskSafeStreamHandler(_PausesOnError, logging.StreamHandler):
    """A stream handler (stderr by default) that pauses after a failed write.

    Parameters
    ----------
    stream : file object, optional
        Default ``sys.stderr``.
    pause : float
        Seconds records are dropped after a failed write (default 30).
    """

    def __init__(self, stream: TextIO | None = None, pause: float = 30.0) -> None:
        super().__init__(stream or sys.stderr)
        self.pause = pause

    def _write(self, record: logging.LogRecord) -> None:
        self.stream.write(self.format(record) + self.terminator)
        self.flush()


def install_service_logging(log_file: Path, level: int, burst: int = 5) -> None:
    """Replace the root logger's handlers by disk-safe, rate-limited stderr and file handlers.

    Parameters
    ----------
    log_file : pathlib.Path
        The service's log file (mode 0600).
    level : int
        Level of both handlers and of the root logger.
    burst : int
        Identical records let through per minute (see :class:`RateLimitFilter`).
    """
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
        with contextlib.suppress(Exception):
            handler.close()
    limit = RateLimitFilter(burst=burst)
    for handler in (DiskSafeStreamHandler(), DiskSafeFileHandler(log_file)):
        handler.setLevel(level)
        handler.setFormatter(logging.Formatter(_FORMAT))
        handler.addFilter(limit)
        root.addHandler(handler)
    root.setLevel(level)
