"""``dicom-covid conformance``: write the DICOM Conformance Statement generated from the code."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ._app import app


@app.command()
def conformance(
    output: Annotated[
        Path | None,
        typer.Option(
            "--output",
            "-o",
            dir_okay=False,
            help="Write the statement to this file (e.g. docs/conformance.md); default: print it.",
        ),
    ] = None,
    check: Annotated[
        bool,
        typer.Option(
            "--check",
            help="Do not write: exit 1 when --output differs from what the code generates.",
        ),
    ] = False,
) -> None:
    """Generate the DICOM Conformance Statement (PS3.2) of 'dicom-covid serve'.

    Its tables (SOP classes, transfer syntaxes, limits, status codes, character sets, codes) are
    built from the service's own presentation contexts and defaults.
    """
    from pacs_listener.conformance import render

    text = render()
    if output is None:
        typer.echo(text, nl=False)
        return
    if check:
        current = output.read_text(encoding="utf-8") if output.is_file() else ""
        if current != text:
            typer.echo(
                f"{output} differs from the code; regenerate it with "
                f"'dicom-covid conformance --output {output}'.",
                err=True,
            )
            raise typer.Exit(1)
        typer.echo(f"{output} is up to date.")
        return
    output.write_text(text, encoding="utf-8")
    typer.echo(f"wrote {output}")
