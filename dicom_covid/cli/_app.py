"""The typer application every command module registers on."""

from __future__ import annotations

import typer

app = typer.Typer(
    name="dicom-covid",
    help=(
        "Screen chest X-rays for COVID-19 inside a PACS workflow. "
        "RESEARCH USE ONLY - NOT FOR DIAGNOSTIC USE."
    ),
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    add_completion=False,
)
