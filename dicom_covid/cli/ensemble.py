"""``dicom-covid ensemble``: combine trained bundle models into an ensemble usable by name.

The ensemble averages its members' softmax outputs. Its COVID threshold is chosen on the
validation split of the manifest (maximum Youden J, as for a single model) and it is written into
the bundle, after which ``--model NAME`` works in ``predict``, ``evaluate``, ``heatmap`` and
``serve``.
"""

from __future__ import annotations

import logging
from typing import Annotated

import typer

from ._app import app
from .common import BundleOption, DataOption, fail_on_error, setup_logging

logger = logging.getLogger(__name__)


def _fmt(value: object) -> str:
    return "n/a" if value is None else f"{value:.4f}"


@app.command()
def ensemble(
    name: Annotated[
        str, typer.Option(help="Name of the ensemble (the --model name), e.g. paper5.")
    ],
    members: Annotated[
        str,
        typer.Option(
            help="Comma-separated single models of the bundle, e.g. resnet50,vgg16,alexnet; "
            "'all' for every single model whose weights are present."
        ),
    ],
    data: DataOption = None,
    bundle: BundleOption = None,
    title: Annotated[
        str | None,
        typer.Option(help="Display name (default: 'Ensemble of <member titles>')."),
    ] = None,
    default: Annotated[
        bool, typer.Option("--default", help="Make the ensemble the bundle's default model.")
    ] = False,
    max_val_per_class: Annotated[
        int | None,
        typer.Option(min=1, help="Use at most this many val images per class (quick runs)."),
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of the --max-val-per-class subsample.")] = 0,
    batch_size: Annotated[int, typer.Option(min=1, help="Images per forward pass.")] = 16,
    device: Annotated[str, typer.Option(help="Torch device, e.g. cpu or cuda.")] = "cpu",
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False,
) -> None:
    """Create (or replace) an ensemble of bundle models that averages their probabilities.

    Runs every member on the val split of the manifest, chooses the ensemble's COVID threshold
    there (maximum Youden J), records the val metrics of the ensemble and of each member, and
    writes models/<name>.json and its entry in configs/metadata.json. Afterwards use it as
    --model NAME. RESEARCH USE ONLY - NOT FOR DIAGNOSTIC USE.
    """
    setup_logging(verbose)
    from ..bundle import Bundle
    from ..config import default_data_dir
    from ..inference import DISCLAIMER
    from ..training.ensemble import fit_ensemble

    data_dir = data if data is not None else default_data_dir()
    with fail_on_error():
        result = fit_ensemble(
            name,
            members,
            data_dir,
            Bundle(bundle),
            title=title,
            make_default=default,
            max_val_per_class=max_val_per_class,
            seed=seed,
            batch_size=batch_size,
            device=device,
            progress=progress,
        )
    v = result.validation
    typer.echo(
        f"ensemble {result.name}: mean probability of {', '.join(result.members)}\n"
        f"  val split of {data_dir}: {v['n_images']} images, {v['n_rejected']} rejected\n"
        f"  COVID threshold {result.covid_threshold:.4f} (sensitivity "
        f"{_fmt(v['covid_sensitivity'])}, specificity {_fmt(v['covid_specificity'])} on val)"
    )
    typer.echo(f"  {'model':<24} {'macro AUC':>9} {'COVID AUC':>9} {'accuracy':>9}")
    rows = [(result.name, v), *v["members"].items()]
    for label, m in rows:
        typer.echo(
            f"  {label:<24} {_fmt(m['macro_auc']):>9} {_fmt(m['covid_auc']):>9} "
            f"{_fmt(m['accuracy']):>9}"
        )
    typer.echo(f"wrote {result.facts_path}" + (" (default model)" if default else ""))
    typer.echo(DISCLAIMER)
