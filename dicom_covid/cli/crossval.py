"""``dicom-covid crossval``: leave-source-out validation of a training recipe.

* ``dicom-covid crossval run --leave-out GROUP --recipe transfer``: train without the group's
  sources, evaluate on every image of the group (``<output-dir>/heldout.json``).
* ``dicom-covid crossval run --leave-out GROUP --recipe transfer --without clahe``: the same
  with an ingredient of the transfer recipe switched off (repeatable; an ablation, shown as
  ``transfer−clahe``).
* ``dicom-covid crossval report DIR``: one markdown table (and JSON) of every ``heldout.json``
  under ``DIR``, recipes side by side; ``--ablation``: the variants of the transfer recipe
  against the full recipe (``ablation.md``, ``ablation.json``).

Groups: ``ieee8023+figure1+actualmed``, ``c19r_covid+c19r_rsna``,
``nih_pneumonia+nih_normal+quex_opacity``, ``kermany``, or any sources joined by ``+``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated

import typer

from ._app import HELP_MARKUP, HelpGroup, app
from .common import DataOption, fail_on_error, setup_logging

logger = logging.getLogger(__name__)

crossval_app = typer.Typer(
    help="Leave-source-out validation: train without a group of sources, test on it. "
    "RESEARCH USE ONLY - NOT FOR DIAGNOSTIC USE.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    rich_markup_mode=HELP_MARKUP,
    cls=HelpGroup,
)
app.add_typer(crossval_app, name="crossval")


@crossval_app.command("run")
def run(
    leave_out: Annotated[
        str,
        typer.Option(help="Held-out group: a group name or sources joined by '+'."),
    ],
    recipe: Annotated[str, typer.Option(help="Training recipe: v1 or transfer.")] = "transfer",
    without: Annotated[
        list[str] | None,
        typer.Option(
            help="Switch off an ingredient of the transfer recipe (repeatable): lung_crop, "
            "clahe, scramble, balanced, label_smoothing, temperature."
        ),
    ] = None,
    backbone: Annotated[str, typer.Option(help="Backbone registry key.")] = "efficientnet_lite0",
    data: DataOption = None,
    output_dir: Annotated[
        Path | None,
        typer.Option(
            help="Run folder (default runs/crossval/<recipe>[-no-<ingredient>...]/<group>)."
        ),
    ] = None,
    epochs: Annotated[int, typer.Option(min=1)] = 4,
    image_size: Annotated[int, typer.Option(min=32)] = 160,
    batch_size: Annotated[int, typer.Option(min=1)] = 32,
    lr: Annotated[float, typer.Option()] = 6e-4,
    max_train_per_class: Annotated[
        int | None, typer.Option(help="Subsample train to this many images per class.")
    ] = 700,
    max_val_per_class: Annotated[int | None, typer.Option()] = 150,
    seed: Annotated[
        int, typer.Option(help="Seed of the train subsample, augmentation, sampling and head.")
    ] = 0,
    threads: Annotated[int | None, typer.Option(help="Torch threads.")] = None,
    cache_dir: Annotated[
        Path | None, typer.Option(help="Cache of prepared images shared between runs.")
    ] = Path("runs/cache"),
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Train RECIPE without a source group and measure it on that group only."""
    setup_logging(verbose)
    from ..config import default_data_dir
    from ..training.crossval import crossval
    from ..training.train import (
        RECIPE_LABEL_SMOOTHING,
        TRANSFER_INGREDIENTS,
        TrainConfig,
        recipe_parts,
    )

    off = tuple(name for name in TRANSFER_INGREDIENTS if name in set(without or ()))
    with fail_on_error():
        parts = recipe_parts(recipe, without or ())
    run_name = recipe + "".join(f"-no-{name}" for name in off)
    cfg = TrainConfig(
        backbone=backbone,
        data_dir=data or default_data_dir(),
        output_dir=output_dir or Path("runs") / "crossval" / run_name / leave_out,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        image_size=image_size,
        resume=True,
        patience=epochs,
        max_train_per_class=max_train_per_class,
        max_val_per_class=max_val_per_class,
        progress=progress,
        recipe=recipe,
        cache_dir=cache_dir,
        threads=threads,
        seed=seed,
        label_smoothing=RECIPE_LABEL_SMOOTHING[recipe],
        without=off,
    )
    with fail_on_error():
        m = crossval(cfg, leave_out, progress)
    auc = "n/a (one class)" if m["covid_auc"] is None else f"{m['covid_auc']:.3f}"
    typer.echo(
        f"{parts.variant} without {leave_out}: COVID-vs-rest AUC {auc}, "
        f"accuracy {m['accuracy']:.3f} on {m['n']} held-out images; "
        f"{Path(cfg.output_dir) / 'heldout.json'}"
    )


@crossval_app.command("report")
def report(
    runs: Annotated[Path, typer.Argument(exists=True, file_okay=False, help="Folder of runs.")],
    output: Annotated[
        Path | None, typer.Option(help="Also write the table (markdown) and results (JSON) here.")
    ] = None,
    ablation: Annotated[
        bool,
        typer.Option(
            "--ablation",
            help="Transfer-recipe variants against the full recipe, with paired AUC changes "
            "(writes ablation.md and ablation.json instead of crossval.*).",
        ),
    ] = False,
) -> None:
    """Table of every held-out result under RUNS."""
    from ..training.crossval import ablation_table, summary_table

    results = [json.loads(p.read_text()) for p in sorted(runs.rglob("heldout.json"))]
    if not results:
        typer.echo(f"no heldout.json under {runs}; run 'dicom-covid crossval run' first.", err=True)
        raise typer.Exit(2)
    table = ablation_table(results) if ablation else summary_table(results)
    name = "ablation" if ablation else "crossval"
    typer.echo(table)
    if output is not None:
        output.mkdir(parents=True, exist_ok=True)
        (output / f"{name}.md").write_text(table + "\n")
        slim = [{k: v for k, v in r.items() if k != "predictions"} for r in results]
        (output / f"{name}.json").write_text(json.dumps(slim, indent=2) + "\n")
