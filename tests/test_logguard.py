"""Logging that neither a flood of identical records nor a full disk can turn against the service.

The full disk is a real one: ``/dev/full`` answers every write with ``ENOSPC``, as a full file
system does (``tests/test_disk_full.py`` has the service's log on a full tmpfs).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import pytest

from pacs_listener.logguard import (
    DiskSafeFileHandler,
    RateLimitFilter,
    install_service_logging,
    keep_template,
)

pytestmark = pytest.mark.timeout(60)


class _Keep(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture
def logger():
    log = logging.getLogger("test_logguard")
    log.propagate = False
    log.setLevel(logging.DEBUG)
    yield log
    for h in list(log.handlers):
        log.removeHandler(h)
    log.propagate = True


def test_identical_records_are_rate_limited_and_counted(logger) -> None:
    limit = RateLimitFilter(burst=3, interval=0.3)
    first, second = _Keep(), _Keep()  # one filter shared by two handlers counts each record once
    for h in (first, second):
        h.addFilter(limit)
        logger.addHandler(h)
    for i in range(50):
        logger.error("instance %s refused: disk full", i)
        logger.warning("another kind %s", i)
    refused = [line for line in first.lines if line.startswith("instance")]
    assert refused == [f"instance {i} refused: disk full" for i in range(3)]
    assert len(first.lines) == 6 and first.lines == second.lines
    first.lines.clear()
    second.lines.clear()
    # records formatted in the worker process keep their template (keep_template)
    for i in range(10):
        record = logger.makeRecord(logger.name, logging.ERROR, __file__, 1, "done %s", (i,), None)
        assert keep_template(record)
        record.msg, record.args = record.getMessage(), None  # what QueueHandler.prepare does
        logger.handle(record)
    assert sum(line.startswith("done") for line in first.lines) == 3
    time.sleep(0.35)
    logger.error("instance %s refused: disk full", 99)
    assert first.lines[-1] == "instance 99 refused: disk full [47 more like this suppressed]"
    assert len(first.lines) == 4
    assert second.lines[-1] == first.lines[-1]


def test_a_full_disk_neither_crashes_nor_spins_the_log(capsys) -> None:
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full on this system")
    handler = DiskSafeFileHandler(Path("/dev/full"), pause=0.2)
    handler.setFormatter(logging.Formatter("%(message)s"))
    record = logging.LogRecord("x", logging.ERROR, __file__, 1, "disk full %d", (1,), None)
    t0 = time.process_time()
    for _ in range(20000):
        handler.handle(record)
    cpu = time.process_time() - t0
    assert cpu < 1.0, f"{cpu:.2f} s of CPU for 20000 records on a full disk"
    assert handler._lost == 20000
    assert "Logging error" not in capsys.readouterr().err  # no traceback per record
    handler.close()


def test_the_log_says_how_much_was_lost_once_it_can_write_again(tmp_path: Path) -> None:
    path = tmp_path / "service.log"
    handler = DiskSafeFileHandler(path, pause=0.1)
    handler.setFormatter(logging.Formatter("%(message)s"))

    def rec(n: int) -> logging.LogRecord:
        return logging.LogRecord("x", logging.INFO, __file__, 1, "line %d", (n,), None)

    handler.handle(rec(1))
    handler.stream.close()  # writes fail now (as on a full disk: OSError from the stream)
    handler.stream = open(os.devnull, "rb")  # noqa: SIM115 - reading stream: write raises
    for n in range(2, 6):
        handler.handle(rec(n))
    time.sleep(0.15)
    handler.handle(rec(6))
    handler.close()
    lines = path.read_text().splitlines()
    assert lines[0] == "line 1"
    assert lines[1] == "4 log record(s) were lost while the log could not be written"
    assert lines[2] == "line 6"
    assert oct(path.stat().st_mode & 0o777) == "0o600"


def test_service_logging_replaces_the_root_handlers(tmp_path: Path) -> None:
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    try:
        install_service_logging(tmp_path / "s.log", logging.INFO, burst=2)
        kinds = sorted(type(h).__name__ for h in root.handlers)
        assert kinds == ["DiskSafeFileHandler", "DiskSafeStreamHandler"]
        for i in range(10):
            logging.getLogger("pacs_listener.x").error("same %d", i)
        for h in root.handlers:
            h.flush()
        assert (tmp_path / "s.log").read_text().count("same") == 2
    finally:
        for h in list(root.handlers):
            root.removeHandler(h)
            h.close()
        for h in saved[0]:
            root.addHandler(h)
        root.setLevel(saved[1])
