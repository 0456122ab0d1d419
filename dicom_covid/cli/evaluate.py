"""``dicom-covid evaluate``: metrics of a bundle model on a labelled manifest, beside the shortcut
control, as JSON and a markdown report with figures."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated

import typer

from ._app import app
from .common import BundleOption, DataOption, ModelOption, fail_on_error, setup_logging

logger = logging.getLogger(__name__)


def _fmt(value: object) -> str:
    return "n/a" if value is None else f"{value:.3f}"


@app.command()
def evaluate(
    data: DataOption = None,
    split: Annotated[
        str | None,
        typer.Option(
            help="Evaluate rows whose 'split' column equals this (e.g. test); all rows "
            "when not given or when the manifest has no split column."
        ),
    ] = None,
    model: ModelOption = None,
    bundle: BundleOption = None,
    output_json: Annotated[
        Path | None, typer.Option(help="Write the metrics as JSON to this file.", dir_okay=False)
    ] = None,
    report_dir: Annotated[
        Path | None,
        typer.Option(
            help="Write report.md, confusion-matrix and ROC PNGs and predictions.csv "
            "into this folder.",
            file_okay=False,
        ),
    ] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Images per forward pass.")] = 16,
    shortcut: Annotated[
        bool,
        typer.Option(
            help="Fit and evaluate the shortcut control (non-diagnostic cues only) "
            "on the development set's train split."
        ),
    ] = True,
    shortcut_max_rows: Annotated[
        int | None,
        typer.Option(min=10, help="Cap the shortcut control's training images (quick runs)."),
    ] = None,
    cache_dir: Annotated[
        Path | None,
        typer.Option(
            envvar="DICOM_COVID_CACHE",
            file_okay=False,
            help="Cache of shortcut-control features (default ~/.cache/dicom-covid).",
        ),
    ] = None,
    bootstrap: Annotated[
        int, typer.Option(min=0, help="Bootstrap resamples for the 95% intervals (0: none).")
    ] = 1000,
    seed: Annotated[int, typer.Option(help="Seed of the bootstrap and the shortcut control.")] = 0,
    device: Annotated[str, typer.Option(help="Torch device, e.g. cpu or cuda.")] = "cpu",
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False,
) -> None:
    """Evaluate a bundle model on a labelled data folder.

    Reports 3-class accuracy, per-class sensitivity/specificity/PPV, macro and COVID-vs-rest AUC,
    infected-vs-normal accuracy, calibration error, 95% bootstrap intervals and a per-source
    breakdown, next to a shortcut control that sees only image size, intensity and border
    statistics. RESEARCH USE ONLY - NOT FOR DIAGNOSTIC USE.
    """
    setup_logging(verbose)
    from ..analysis.evaluate import evaluate_model, to_json_ready
    from ..analysis.report import write_report
    from ..analysis.shortcut import fit_shortcut
    from ..config import default_data_dir
    from ..errors import DicomCovidError
    from ..inference import DISCLAIMER, Predictor
    from ..training.data import read_manifest

    data_dir = data if data is not None else default_data_dir()
    with fail_on_error():
        rows = read_manifest(data_dir, split)
        if split is None and len({r.split for r in rows}) > 1:
            logger.warning(
                "no --split given: evaluating all %d rows, training rows included", len(rows)
            )
        predictor = Predictor(bundle, model, device=device)
        control = None
        skipped = None
        if shortcut:
            dev = default_data_dir()
            try:
                control = fit_shortcut(
                    dev, "train", max_rows=shortcut_max_rows, seed=seed, cache_dir=cache_dir
                )
            except DicomCovidError as exc:
                skipped = f"development set unusable: {exc}"
                logger.warning("shortcut control skipped (%s)", skipped)
        else:
            skipped = "disabled with --no-shortcut"
        result = evaluate_model(
            predictor,
            rows,
            shortcut=control,
            batch_size=batch_size,
            n_bootstrap=bootstrap,
            seed=seed,
        )
    result["data"] = str(data_dir)
    result["split"] = split
    if skipped:
        result["shortcut_control_skipped"] = skipped

    if report_dir is not None:
        files = write_report(result, report_dir)
        typer.echo(f"report: {files['report']}")
    if output_json is not None:
        output_json.parent.mkdir(parents=True, exist_ok=True)
        summary = {k: v for k, v in result.items() if k != "predictions"}
        output_json.write_text(json.dumps(to_json_ready(summary), indent=2) + "\n")
        typer.echo(f"metrics: {output_json}")

    sc = result["shortcut_control"]
    typer.echo(
        f"{result['model_title']} (bundle {result['bundle_version']}) on {data_dir} "
        f"[{split or 'all rows'}]: {result['n']} images, {result['n_rejected']} rejected"
    )
    for key in ("accuracy", "covid_auc", "macro_auc", "infected_vs_normal_accuracy", "ece"):
        ci = result.get(f"{key}_ci")
        ci_text = f" (95% CI {_fmt(ci[0])}-{_fmt(ci[1])})" if ci else ""
        control_text = f"   shortcut control {_fmt(sc.get(key))}" if sc else ""
        typer.echo(f"  {key:<28} {_fmt(result[key])}{ci_text}{control_text}")
    typer.echo(DISCLAIMER)
