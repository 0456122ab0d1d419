"""Shared fixtures: paths to the project's sample DICOMs and the labelled data set."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "sample_dicoms"


def data_dir() -> Path:
    """The labelled development set ($DICOM_COVID_DATA, default ../shared/data/cxr)."""
    from dicom_covid.config import default_data_dir

    return default_data_dir()


@pytest.fixture(scope="session")
def cxr_data() -> Path:
    """The labelled development set; skips the test when it is absent."""
    path = data_dir()
    if not (path / "manifest.csv").is_file():
        pytest.skip(
            f"labelled data set not found at {path} (set $DICOM_COVID_DATA to a folder with "
            "manifest.csv; CI always has it)"
        )
    return path


@pytest.fixture(scope="session")
def sample_dir() -> Path:
    """The committed sample chest DICOMs."""
    assert SAMPLES.is_dir(), "sample_dicoms/ is part of the repository"
    return SAMPLES


@pytest.fixture
def restore_env():
    """Restore os.environ after a test that changes it."""
    saved = dict(os.environ)
    yield os.environ
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(scope="session")
def postgres():
    """A throw-away PostgreSQL cluster on loopback for the whole session (see
    ``tests/postgres.py``); skips when PostgreSQL is absent, fails under ``CI=true``."""
    from postgres import running_postgres

    with running_postgres() as cluster:
        yield cluster


@pytest.fixture
def postgres_url(postgres) -> str:
    """URL of a new, empty database in the session's PostgreSQL cluster."""
    return postgres.new_database()


@pytest.fixture(autouse=True)
def _root_logging_restored():
    """Give every test the root logger it started with.

    A command run in-process through ``CliRunner`` calls ``setup_logging``, which points the
    root logger at the runner's captured stderr; once the runner closes it, any later log record
    would fail with "I/O operation on closed file" and mix tracebacks into other tests' output.
    """
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
