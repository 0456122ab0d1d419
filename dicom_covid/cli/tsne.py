"""``dicom-covid tsne``: 2-D t-SNE map of a model's penultimate-layer embeddings of a split."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

from ._app import app
from .common import BundleOption, DataOption, ModelOption, fail_on_error, setup_logging

logger = logging.getLogger(__name__)


@app.command()
def tsne(
    output_dir: Annotated[
        Path,
        typer.Option(file_okay=False, help="Folder for the PNG (two panels) and the CSV."),
    ],
    model: ModelOption = None,
    bundle: BundleOption = None,
    data: DataOption = None,
    split: Annotated[
        str | None, typer.Option(help="Rows whose 'split' column equals this; all rows if empty.")
    ] = "test",
    max_per_class: Annotated[
        int | None,
        typer.Option(min=2, help="Use at most this many images per class (seeded sample)."),
    ] = None,
    perplexity: Annotated[
        float, typer.Option(min=1.0, help="t-SNE perplexity (lowered for small sets).")
    ] = 30.0,
    seed: Annotated[int, typer.Option(help="Seed of the sample, PCA and t-SNE.")] = 0,
    batch_size: Annotated[int, typer.Option(min=1, help="Images per forward pass.")] = 16,
    device: Annotated[str, typer.Option(help="Torch device, e.g. cpu or cuda.")] = "cpu",
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False,
) -> None:
    """Embed a split with a bundle model and draw a t-SNE map coloured by class and by source.

    Writes tsne_<model>_<split>.png (two scatter plots side by side) and tsne_<model>_<split>.csv
    (per image: path, label, source, predicted class, probabilities, t-SNE x/y). Islands of one
    source inside a class hint that the model recognises the collection, not the disease.
    RESEARCH USE ONLY - NOT FOR DIAGNOSTIC USE.
    """
    setup_logging(verbose)
    from ..analysis.tsne import run_tsne
    from ..config import default_data_dir
    from ..inference import DISCLAIMER, Predictor
    from ..training.data import read_manifest, subsample

    data_dir = data if data is not None else default_data_dir()
    with fail_on_error():
        rows = subsample(read_manifest(data_dir, split or None), max_per_class, seed)
        predictor = Predictor(bundle, model, device=device)
        files = run_tsne(
            predictor,
            rows,
            output_dir,
            name=f"tsne_{predictor.facts.name}_{split or 'all'}",
            perplexity=perplexity,
            seed=seed,
            batch_size=batch_size,
            progress=progress,
        )
    typer.echo(f"figure: {files['png']}")
    typer.echo(f"coordinates: {files['csv']}")
    typer.echo(DISCLAIMER)
