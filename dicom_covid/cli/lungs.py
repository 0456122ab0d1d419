"""``dicom-covid lungs``: the lung-field segmenter and the heat-share shortcut indicator.

* ``dicom-covid lungs train --output-dir DIR [--install]``: train the U-Net on the reference
  lung masks of the development set (torchxrayvision wheel), select on val, Dice on test.
* ``dicom-covid lungs install --run-dir DIR``: copy a finished run into the bundle.
* ``dicom-covid lungs evaluate [--output-dir DIR]``: Dice of the bundle's segmenter against the
  reference masks of a split, as JSON and markdown (optionally a contour figure).
* ``dicom-covid lungs heat-share --model a,b --output-dir DIR``: share of each model's Grad-CAM
  heat inside the lung fields over a labelled split (JSON, markdown, box plot).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated

import typer

from ._app import HELP_MARKUP, HelpGroup, app
from .common import BundleOption, DataOption, fail_on_error, setup_logging

logger = logging.getLogger(__name__)

lungs_app = typer.Typer(
    help="Lung-field segmentation and the share of Grad-CAM heat inside the lungs (a shortcut "
    "indicator). RESEARCH USE ONLY - NOT FOR DIAGNOSTIC USE.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    rich_markup_mode=HELP_MARKUP,
    cls=HelpGroup,
)
app.add_typer(lungs_app, name="lungs")

MasksOption = Annotated[
    Path | None,
    typer.Option(
        envvar="DICOM_COVID_LUNG_MASKS",
        help="semantic_masks_v7labs_lungs.zip or a torchxrayvision wheel (default: the "
        "installed torchxrayvision package).",
        exists=True,
        dir_okay=False,
    ),
]
LungBundleOption = Annotated[
    Path | None,
    typer.Option(
        help="Bundle holding the lung segmenter (default: the bundle shipped with dicom-covid).",
        exists=True,
        file_okay=False,
    ),
]
VerboseOption = Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")]


def _fmt(v: object) -> str:
    return "n/a" if v is None else f"{v:.4f}"


@lungs_app.command("train")
def train(
    output_dir: Annotated[Path, typer.Option(file_okay=False, help="Run folder.")],
    data: DataOption = None,
    masks: MasksOption = None,
    epochs: Annotated[int, typer.Option(min=1, help="Training epochs.")] = 20,
    input_size: Annotated[int, typer.Option(min=32, help="Network input side in pixels.")] = 128,
    batch_size: Annotated[int, typer.Option(min=1)] = 4,
    lr: Annotated[float, typer.Option(help="AdamW learning rate.")] = 3e-3,
    seed: Annotated[int, typer.Option()] = 0,
    resume: Annotated[
        bool, typer.Option(help="Continue from OUTPUT_DIR/checkpoint.pt when present.")
    ] = True,
    install: Annotated[
        bool, typer.Option("--install", help="Install the result into the bundle.")
    ] = False,
    bundle: BundleOption = None,
    limit: Annotated[
        int | None, typer.Option(min=1, help="Use at most N cases per split (smoke tests).")
    ] = None,
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
    verbose: VerboseOption = False,
) -> None:
    """Train the lung-field U-Net on the reference masks (train), select on val, Dice on test."""
    setup_logging(verbose)
    from ..config import default_data_dir
    from ..lungs.install import install_segmenter
    from ..lungs.training import train_segmenter

    with fail_on_error():
        facts_path = train_segmenter(
            data if data is not None else default_data_dir(),
            output_dir,
            masks=masks,
            epochs=epochs,
            input_size=input_size,
            batch_size=batch_size,
            lr=lr,
            seed=seed,
            resume=resume,
            progress=progress,
            limit=limit,
        )
        facts = json.loads(facts_path.read_text())
        s = facts["dice"]["test"]["summary"]
        typer.echo(
            f"test Dice: mean {_fmt(s.get('mean'))} median {_fmt(s.get('median'))} "
            f"min {_fmt(s.get('min'))} (n={s.get('n')})"
        )
        typer.echo(f"facts: {facts_path}")
        if install:
            typer.echo(f"installed: {install_segmenter(output_dir, bundle)}")


@lungs_app.command("install")
def install(
    run_dir: Annotated[
        Path,
        typer.Option(exists=True, file_okay=False, help="Run folder of `dicom-covid lungs train`."),
    ],
    bundle: BundleOption = None,
    verbose: VerboseOption = False,
) -> None:
    """Install a trained lung segmenter (lung_unet.safetensors + .json) into the bundle."""
    setup_logging(verbose)
    from ..lungs.install import install_segmenter

    with fail_on_error():
        typer.echo(f"installed: {install_segmenter(run_dir, bundle)}")


@lungs_app.command("evaluate")
def evaluate(
    data: DataOption = None,
    split: Annotated[str, typer.Option(help="Split whose reference masks are used.")] = "test",
    masks: MasksOption = None,
    lung_bundle: LungBundleOption = None,
    output_dir: Annotated[
        Path | None,
        typer.Option(file_okay=False, help="Write lung_dice.json and lung_dice.md here."),
    ] = None,
    contours: Annotated[
        int,
        typer.Option(
            min=0,
            help="Also draw predicted vs reference contours of this many images whose licence "
            "allows publishing them (CC BY, CC0, public domain; downscaled to 256 px, with "
            "source credit) into OUTPUT_DIR/lung_contours.png.",
        ),
    ] = 0,
    verbose: VerboseOption = False,
) -> None:
    """Dice of the bundle's lung segmenter against the reference lung masks of a split."""
    setup_logging(verbose, quiet=not verbose)
    from ..analysis.galleries import showable, spread
    from ..config import default_data_dir
    from ..lungs.figures import contour_figure
    from ..lungs.reference import ReferenceMasks, evaluate_segmenter
    from ..lungs.reference import reference_cases as cases_of
    from ..lungs.segmenter import LungSegmenter

    with fail_on_error():
        data_dir = data if data is not None else default_data_dir()
        segmenter = LungSegmenter(lung_bundle)
        ref = ReferenceMasks(masks)
        result = evaluate_segmenter(segmenter, data_dir, split, ref)
        s = result["summary"]
        typer.echo(
            f"{split} Dice: mean {_fmt(s.get('mean'))} median {_fmt(s.get('median'))} "
            f"min {_fmt(s.get('min'))} IQR {_fmt(s.get('q1'))}-{_fmt(s.get('q3'))} (n={s['n']})"
        )
        if output_dir is not None:
            output_dir.mkdir(parents=True, exist_ok=True)
            (output_dir / "lung_dice.json").write_text(json.dumps(result, indent=2) + "\n")
            lines = [
                f"# Lung segmenter Dice ({split})",
                "",
                "RESEARCH USE ONLY - NOT FOR DIAGNOSTIC USE",
                "",
                "| n | mean | median | min | q1 | q3 | max |",
                "|---:|---:|---:|---:|---:|---:|---:|",
                f"| {s['n']} | {_fmt(s.get('mean'))} | {_fmt(s.get('median'))} | "
                f"{_fmt(s.get('min'))} | {_fmt(s.get('q1'))} | {_fmt(s.get('q3'))} | "
                f"{_fmt(s.get('max'))} |",
                "",
                "| image | licence | Dice |",
                "|---|---|---:|",
                *(
                    f"| {p['path']} | {p['license']} | {p['dice']:.4f} |"
                    for p in result["per_image"]
                ),
                "",
            ]
            (output_dir / "lung_dice.md").write_text("\n".join(lines))
            typer.echo(f"report: {output_dir / 'lung_dice.md'}")
            if contours:
                shown = showable(cases_of(data_dir, split, ref), row_of=lambda c: c.row)
                picked = spread(shown, contours)
                out = contour_figure(segmenter, picked, output_dir / "lung_contours.png")
                typer.echo(f"contours: {out}")


@lungs_app.command("heat-share")
def heat_share(
    output_dir: Annotated[Path, typer.Option(file_okay=False, help="Folder for the report.")],
    model: Annotated[
        str | None,
        typer.Option(
            "--model",
            "--backbone",
            help="Comma-separated model names in the bundle (default: the bundle's default).",
        ),
    ] = None,
    bundle: BundleOption = None,
    lung_bundle: LungBundleOption = None,
    data: DataOption = None,
    split: Annotated[str, typer.Option(help="Manifest split ('' for all rows).")] = "test",
    max_per_class: Annotated[
        int | None,
        typer.Option(min=1, help="Stratified seeded subsample: at most N images per class."),
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of the subsample.")] = 0,
    target: Annotated[
        str, typer.Option(help="Class whose heat is measured: predicted, covid, normal, ...")
    ] = "predicted",
    method: Annotated[str, typer.Option(help="CAM method (gradcam, gradcam++, ...).")] = "gradcam",
    device: Annotated[str, typer.Option(help="Torch device, e.g. cpu or cuda.")] = "cpu",
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
    verbose: VerboseOption = False,
) -> None:
    """Share of each model's Grad-CAM heat inside the lung fields over a labelled split.

    Writes heat_share.json (per image and aggregated), heat_share.md (tables per model, per
    class, per source) and heat_share.png (box plots). A low share suggests shortcut learning.
    RESEARCH USE ONLY - NOT FOR DIAGNOSTIC USE.
    """
    setup_logging(verbose, quiet=not verbose)
    from ..analysis.heat_study import heat_share_study, write_heat_share_report
    from ..config import default_data_dir
    from ..explain import CAM_METHODS
    from ..inference import DISCLAIMER

    if method.lower() not in CAM_METHODS:
        raise typer.BadParameter(
            f"{method!r} is not one of {', '.join(CAM_METHODS)}", param_hint="--method"
        )
    names = [m.strip() for m in (model or "").split(",") if m.strip()]
    with fail_on_error():
        try:
            result = heat_share_study(
                names,
                data if data is not None else default_data_dir(),
                split or None,
                bundle=bundle,
                lung_bundle=lung_bundle,
                max_per_class=max_per_class,
                seed=seed,
                target=target.lower(),
                method=method.lower(),
                device=device,
                progress=progress,
            )
        except ValueError as exc:
            raise typer.BadParameter(str(exc), param_hint="--target") from None
        paths = write_heat_share_report(result, output_dir)
    for name, m in result["models"].items():
        a = m["aggregate"]
        typer.echo(
            f"{name}: mean share {_fmt(a.get('mean'))} median {_fmt(a.get('median'))} "
            f"share<0.5 {_fmt(a.get('frac_below_half'))} lung area "
            f"{_fmt(a.get('lung_area_mean'))} (n={a['n']})"
        )
    for p in paths:
        typer.echo(str(p))
    typer.echo(DISCLAIMER)
