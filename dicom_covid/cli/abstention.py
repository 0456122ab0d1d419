"""``dicom-covid abstention``: fit and measure when a model gives no verdict.

* ``dicom-covid abstention fit --model NAME [--install]``: feature statistics on the model's
  training sources and thresholds on the val split; ``--install`` writes them into the bundle
  (``models/<name>.ood.safetensors`` and the ``abstention`` entry of ``models/<name>.json``).
* ``dicom-covid abstention evaluate --model NAME --output DIR``: abstention rate and accuracy
  on the rest of the test split, and the share of non-chest images flagged.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated

import typer

from ._app import HELP_MARKUP, HelpGroup, app
from .common import BundleOption, DataOption, ModelOption, fail_on_error, setup_logging

logger = logging.getLogger(__name__)

abstention_app = typer.Typer(
    help="Abstention ('indeterminate' outcome): fit thresholds, measure them. "
    "RESEARCH USE ONLY - NOT FOR DIAGNOSTIC USE.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    rich_markup_mode=HELP_MARKUP,
    cls=HelpGroup,
)
app.add_typer(abstention_app, name="abstention")


@abstention_app.command("fit")
def fit(
    model: ModelOption = None,
    bundle: BundleOption = None,
    data: DataOption = None,
    percentile: Annotated[
        float, typer.Option(min=50, max=100, help="Val percentile of the feature distance.")
    ] = 99.5,
    uncertain_share: Annotated[
        float, typer.Option(min=0, max=0.5, help="Share of val abstained on as 'uncertain'.")
    ] = 0.03,
    layer: Annotated[
        str | None,
        typer.Option(
            help="Module whose channel statistics are the features (default per backbone)."
        ),
    ] = None,
    max_train_per_class: Annotated[
        int, typer.Option(min=10, help="Training images per class for the statistics.")
    ] = 800,
    install: Annotated[bool, typer.Option(help="Write the result into the bundle.")] = False,
    progress: Annotated[bool, typer.Option(help="Progress bars.")] = True,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Fit the abstention thresholds of a single model (train and val splits only)."""
    setup_logging(verbose)
    import tempfile

    from ..bundle import Bundle
    from ..bundle_writer import BundleWriter
    from ..config import default_data_dir
    from ..inference import Predictor
    from ..training.abstention_fit import fit_abstention

    with fail_on_error(), tempfile.TemporaryDirectory(prefix="dicom-covid-abstention-") as tmp:
        b = Bundle(bundle)
        predictor = Predictor(b, model, abstention={"enabled": False})
        name = predictor.facts.name
        relpath = f"models/{name}.ood.safetensors"
        target = b.root / relpath
        # --install: fit into a temporary folder, then copy into the bundle atomically.
        out = Path(tmp if install else Path("runs") / "abstention") / target.name
        out.parent.mkdir(parents=True, exist_ok=True)
        entry = fit_abstention(
            predictor,
            data or default_data_dir(),
            out,
            percentile=percentile,
            uncertain_share=uncertain_share,
            progress=progress,
            layer=layer,
            max_train_per_class=max_train_per_class,
        )
        if install:
            writer = BundleWriter(b)
            out = writer.install_file(out, relpath)
            writer.update_facts(name, {"abstention": entry})
    typer.echo(json.dumps(entry, indent=2))
    typer.echo(f"{'installed into' if install else 'statistics in'} {out}")


@abstention_app.command("evaluate")
def evaluate(
    model: ModelOption = None,
    bundle: BundleOption = None,
    data: DataOption = None,
    split: Annotated[str, typer.Option(help="Labelled split.")] = "test",
    output: Annotated[
        Path | None, typer.Option(help="Folder for abstention.json and abstention.md.")
    ] = None,
    progress: Annotated[bool, typer.Option(help="Progress bars.")] = True,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Abstention rate and accuracy on the rest of SPLIT; share of non-chest images flagged."""
    setup_logging(verbose)
    from ..config import default_data_dir
    from ..inference import Predictor
    from ..prediction import DISCLAIMER
    from ..training.abstention_fit import evaluate_abstention

    with fail_on_error():
        predictor = Predictor(bundle, model)
        result = evaluate_abstention(predictor, data or default_data_dir(), split, progress)
    s, nc = result[split], result["non_chest"]
    lines = [
        f"# Abstention of {result['model']} ({split} split and non-chest images)",
        "",
        f"- {split}: {s['n']} images, {s['abstained']} indeterminate "
        f"({100 * s['abstention_rate']:.1f} %: {s['reasons']}); 3-class accuracy "
        f"{s['accuracy_all']:.3f} on all, {s['accuracy_kept']:.3f} on the images with a verdict; "
        f"COVID sensitivity {s['covid_sensitivity_kept']:.3f}, specificity "
        f"{s['covid_specificity_kept']:.3f} on them.",
        f"- Indeterminate per source: {s['abstained_per_source']}",
        f"- Non-chest images: {nc['flagged']} of {nc['n']} flagged indeterminate "
        f"({100 * nc['flagged_share']:.1f} %); 'COVID-19 suspected': {nc['covid_suspected']}.",
        "",
        "| image | outcome | reasons | P(covid) | OOD score | lung fraction |",
        "|---|---|---|---:|---:|---:|",
    ]
    for o in nc["images"]:
        lines.append(
            f"| {o['image']} | {o['outcome']} | {', '.join(o['reasons'])} | {o['p_covid']} | "
            f"{o['ood_score']} | {o['lung_fraction']} |"
        )
    lines += ["", f"_{DISCLAIMER}_", ""]
    text = "\n".join(lines)
    typer.echo(text)
    if output is not None:
        output.mkdir(parents=True, exist_ok=True)
        (output / "abstention.json").write_text(json.dumps(result, indent=2) + "\n")
        (output / "abstention.md").write_text(text)
