"""``dicom-covid predict``: classify DICOM/PNG/JPEG files or folders."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated

import typer

from ._app import app
from .common import BundleOption, ModelOption, fail_on_error, setup_logging

logger = logging.getLogger(__name__)


@app.command()
def predict(
    paths: Annotated[
        list[Path],
        typer.Argument(
            help="DICOM, PNG or JPEG files, or folders to search recursively.", exists=True
        ),
    ],
    model: ModelOption = None,
    bundle: BundleOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    batch_size: Annotated[int, typer.Option(min=1, help="Images per forward pass.")] = 8,
    device: Annotated[
        str, typer.Option(help="Torch device: cpu, or cuda (mixed precision) on a GPU.")
    ] = "cpu",
    abstain: Annotated[
        bool,
        typer.Option(
            help="Give 'Indeterminate' instead of a verdict for images the model should not "
            "judge (blank, no lung fields, unlike its training data, too close to the "
            "threshold). --no-abstain gives every image a verdict (reasons still listed)."
        ),
    ] = True,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False,
) -> None:
    """Classify chest X-rays: probabilities of covid/normal/pneumonia and the screening decision.

    Rejected inputs (not DICOM, colour, CT, lateral, ...) are listed with their reason; the rest
    are still classified. Exit status 0 when every input was classified, 2 when any was rejected,
    1 on a usage or bundle error. RESEARCH USE ONLY - NOT FOR DIAGNOSTIC USE.
    """
    setup_logging(verbose, quiet=not verbose)
    from ..errors import InputRejected
    from ..inference import DISCLAIMER, Predictor
    from ..reader import find_images, read_image

    files = find_images(paths)
    with fail_on_error():
        predictor = Predictor(
            bundle, model, device=device, abstention=None if abstain else {"enabled": False}
        )
    accepted, rejected = [], []
    for f in files:
        try:
            accepted.append((f, read_image(f)))
        except InputRejected as exc:
            rejected.append({"path": str(f), "reason": exc.reason, "message": exc.message})
    results = []
    images = [im for _, im in accepted]
    preds = predictor.predict_batch(images, batch_size=batch_size) if images else []
    for (f, _), pred in zip(accepted, preds, strict=True):
        results.append({"path": str(f), **pred.to_dict()})

    if as_json:
        typer.echo(
            json.dumps(
                {
                    "model": predictor.facts.name,
                    "bundle_version": predictor.bundle.version,
                    "results": results,
                    "rejected": rejected,
                    "disclaimer": DISCLAIMER,
                },
                indent=2,
            )
        )
    else:
        labels = predictor.labels
        name_w = max([len(r["path"]) for r in results + rejected] + [4])
        typer.echo(
            f"model: {predictor.facts.title} ({predictor.facts.name}), bundle "
            f"{predictor.bundle.version}, COVID threshold "
            f"{predictor.facts.covid_threshold:.3f}"
        )
        header = f"{'file':<{name_w}}  " + "  ".join(f"{lab:>9}" for lab in labels)
        typer.echo(header + "  decision")
        for r in results:
            cells = "  ".join(f"{r['probabilities'][lab]:>9.3f}" for lab in labels)
            typer.echo(f"{r['path']:<{name_w}}  {cells}  {r['decision']}")
        for r in rejected:
            typer.echo(f"{r['path']:<{name_w}}  REJECTED ({r['reason']}): {r['message']}")
        typer.echo(DISCLAIMER)
    if rejected:
        raise typer.Exit(2)
