"""Helpers shared by the CLI commands: logging set-up and error reporting."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import typer

from ..errors import DicomCovidError

__all__ = ["fail_on_error", "setup_logging"]


def setup_logging(verbose: bool = False, quiet: bool = False) -> None:
    """Attach a stderr handler to the root logger (only the CLI does this)."""
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
        force=True,
    )


@contextmanager
def fail_on_error() -> Iterator[None]:
    """Turn a :class:`~dicom_covid.errors.DicomCovidError` into a message and exit status 1."""
    try:
        yield
    except DicomCovidError as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        raise typer.Exit(1) from None
