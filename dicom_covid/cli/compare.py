"""``dicom-covid compare``: a comparison table and figure of evaluated models."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated

import typer

from ._app import app
from .common import BundleOption, fail_on_error, setup_logging

logger = logging.getLogger(__name__)


@app.command()
def compare(
    results: Annotated[
        list[Path],
        typer.Argument(
            help="metrics.json files of 'dicom-covid evaluate', or the report folders holding "
            "them (all on the same split).",
            exists=True,
        ),
    ],
    output_dir: Annotated[
        Path,
        typer.Option(
            help="Folder for comparison.md, comparison.json and comparison.png.", file_okay=False
        ),
    ],
    latency: Annotated[
        Path | None,
        typer.Option(
            help="JSON from benchmarks/backbone_latency.py --json (CPU ms per image).",
            exists=True,
            dir_okay=False,
        ),
    ] = None,
    bundle: BundleOption = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False,
) -> None:
    """Compare evaluated models side by side: markdown table, JSON and a figure.

    Training settings (input size, epochs, training time, parameters) are read from the
    models' facts in the bundle.
    """
    setup_logging(verbose)
    with fail_on_error():
        from ..analysis.compare import comparison_rows, load_metrics, plot_comparison
        from ..analysis.compare import write_markdown as write_comparison
        from ..bundle import Bundle
        from ..inference import DISCLAIMER

        rows = comparison_rows(
            load_metrics(results),
            Bundle(bundle),
            json.loads(latency.read_text()) if latency else None,
        )
        output_dir.mkdir(parents=True, exist_ok=True)
        plot_comparison(rows, output_dir / "comparison.png")
        md = write_comparison(rows, output_dir / "comparison.md", figure="comparison.png")
        (output_dir / "comparison.json").write_text(
            json.dumps({"models": rows, "disclaimer": DISCLAIMER}, indent=2) + "\n"
        )
        for r in rows:
            typer.echo(
                f"{r['title']:<28} accuracy {r['accuracy']:.3f}  COVID AUC "
                f"{r['covid_auc']:.3f}  macro AUC {r['macro_auc']:.3f}"
            )
        typer.echo(f"written {md} and comparison.png, comparison.json")
        typer.echo(DISCLAIMER)
