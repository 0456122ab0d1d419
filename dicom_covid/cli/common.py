"""Helpers shared by the CLI commands: logging set-up and error reporting."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer

from ..errors import DicomCovidError

__all__ = ["BundleOption", "DataOption", "ModelOption", "fail_on_error", "setup_logging"]

#: ``--model/--backbone``: a model of the bundle, shared by every command that classifies.
ModelOption = Annotated[
    str | None,
    typer.Option(
        "--model",
        "--backbone",
        help="Model name in the bundle (default: the bundle's default).",
    ),
]
#: ``--bundle``: the MONAI bundle folder.
BundleOption = Annotated[
    Path | None,
    typer.Option(
        help="MONAI bundle folder (default: $DICOM_COVID_BUNDLE, else the bundle shipped with "
        "dicom-covid: the checkout's monai_bundle/, or the default model of an installed wheel).",
        exists=True,
        file_okay=False,
    ),
]
#: ``--data``: a labelled data folder, shared by every command that reads one.
DataOption = Annotated[
    Path | None,
    typer.Option(
        envvar="DICOM_COVID_DATA",
        help="Labelled data folder: manifest.csv with path and label columns (split and source "
        "where a command uses them), image paths relative to it. Default: the development set.",
        exists=True,
        file_okay=False,
    ),
]


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
