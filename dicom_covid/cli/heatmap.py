"""``dicom-covid heatmap``: Grad-CAM overlays of radiographs, or a gallery of a labelled split.

Two modes:

* ``dicom-covid heatmap PATH... --output-dir DIR``: one PNG per input, the heat map blended over
  the radiograph with the class probabilities, the decision and the research-use disclaimer
  burned into a band below the image.
* ``dicom-covid heatmap --gallery --data DIR --split test --output FILE.png``: a grid figure with
  one row per true class and, per row, correctly and wrongly classified images of the split with
  their overlays and probabilities.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from ..reader import find_images
from ._app import app
from .common import BundleOption, ModelOption, fail_on_error, setup_logging

if TYPE_CHECKING:
    import numpy as np

    from ..explain import Explainer
    from ..inference import Prediction, Predictor
    from ..training.data import ManifestRow

logger = logging.getLogger(__name__)

_TARGETS = ("covid", "normal", "pneumonia", "predicted")


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # pragma: no cover - Pillow < 10.1 has no scalable default font
        return ImageFont.load_default()


def _annotate(rgb: np.ndarray, lines: Sequence[str], max_side: int = 1024):
    """Scale an RGB overlay to at most ``max_side`` pixels and add a text band below it.

    Parameters
    ----------
    rgb : numpy.ndarray
        ``uint8 (H, W, 3)``.
    lines : sequence of str
        Text lines; the first is drawn in yellow, the others in white.
    max_side : int
        Longest side of the image part (0: keep the size).

    Returns
    -------
    PIL.Image.Image
    """
    from PIL import Image, ImageDraw

    img = Image.fromarray(rgb)
    if max_side and max(img.size) > max_side:
        scale = max_side / max(img.size)
        img = img.resize(
            (max(1, round(img.width * scale)), max(1, round(img.height * scale))),
            Image.Resampling.LANCZOS,
        )
    width = img.width
    pad = max(4, width // 100)
    size = max(10, width // 42)
    probe = ImageDraw.Draw(img)
    while size > 8 and max(probe.textlength(t, font=_font(size)) for t in lines) > width - 2 * pad:
        size -= 1
    font = _font(size)
    line_h = int(size * 1.35)
    band = Image.new("RGB", (width, img.height + 2 * pad + line_h * len(lines)), (0, 0, 0))
    band.paste(img, (0, 0))
    draw = ImageDraw.Draw(band)
    for i, text in enumerate(lines):
        colour = (255, 221, 0) if i == 0 else (255, 255, 255)
        draw.text((pad, img.height + pad + i * line_h), text, fill=colour, font=font)
    return band


def _lines(pred: Prediction, method: str, target: str) -> list[str]:
    from ..inference import DISCLAIMER

    probs = "  ".join(f"P({lab}) {p:.3f}" for lab, p in pred.probabilities.items())
    return [
        DISCLAIMER,
        f"{pred.model_title} (bundle {pred.bundle_version}) - {method} heat map for '{target}'",
        probs,
        f"{pred.decision} (P(covid) {pred.covid_score:.3f}, threshold "
        f"{pred.covid_threshold:.3f}); most probable: {pred.label}",
    ]


def _write_overlays(
    files: Sequence[Path],
    predictor: Predictor,
    explainer: Explainer,
    target: str,
    output_dir: Path,
    max_side: int,
) -> tuple[list[Path], list[dict[str, str]]]:
    from PIL.PngImagePlugin import PngInfo

    from ..errors import InputRejected
    from ..explain import overlay
    from ..inference import DISCLAIMER
    from ..reader import read_image

    output_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    rejected: list[dict[str, str]] = []
    used: set[str] = set()
    for f in files:
        try:
            image = read_image(f)
        except InputRejected as exc:
            rejected.append({"path": str(f), "reason": exc.reason, "message": exc.message})
            continue
        ((pred, heat),) = explainer.predict_and_explain([image], target)  # one pass
        tgt = pred.label if target == "predicted" else target
        png = _annotate(overlay(image, heat), _lines(pred, explainer.method, tgt), max_side)
        stem = f"{f.stem}_{explainer.method.replace('++', 'pp')}_{tgt}"
        name, k = f"{stem}.png", 1
        while name in used:
            k += 1
            name = f"{stem}_{k}.png"
        used.add(name)
        info = PngInfo()
        info.add_text("Disclaimer", DISCLAIMER)
        info.add_text("Software", f"dicom-covid {pred.model_name} {explainer.method}")
        out = output_dir / name
        png.save(out, pnginfo=info)
        written.append(out)
    return written, rejected


def _write_gallery(
    predictor: Predictor,
    explainer: Explainer,
    rows: Sequence[ManifestRow],
    target: str,
    per_class: int,
    max_scan: int,
    seed: int,
    output: Path,
    subtitle: str,
    progress: bool,
) -> Path:
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from PIL import Image

    from ..analysis.galleries import pick_by_outcome
    from ..explain import overlay
    from ..inference import DISCLAIMER

    labels = list(predictor.labels)
    picks, scanned = pick_by_outcome(predictor, rows, per_class, max_scan, seed, progress)
    credits: list[tuple[str, ManifestRow]] = []
    ncols = 2 * per_class
    fig = Figure(figsize=(2.3 * ncols + 0.6, 2.75 * len(labels) + 1.0))
    FigureCanvasAgg(fig)
    axes = np.atleast_2d(fig.subplots(len(labels), ncols, squeeze=False))
    for r, label in enumerate(labels):
        for kind_i, kind in enumerate(("correct", "wrong")):
            for j in range(per_class):
                ax = axes[r, kind_i * per_class + j]
                ax.set_xticks([])
                ax.set_yticks([])
                if r == 0:
                    ax.set_title(f"{kind} {j + 1}\n", fontsize=10, fontweight="bold")
                if kind_i == 0 and j == 0:
                    ax.set_ylabel(f"true: {label}", fontsize=11, fontweight="bold")
                items = picks[label][kind]
                if j >= len(items):
                    ax.imshow(np.full((256, 256, 3), 255, dtype=np.uint8))  # same cell shape
                    ax.text(
                        0.5,
                        0.5,
                        f"none among\n{scanned[label]} scanned",
                        ha="center",
                        va="center",
                        fontsize=9,
                        color="#555555",
                        transform=ax.transAxes,
                    )
                    for spine in ax.spines.values():
                        spine.set_color("#cccccc")
                    continue
                image, p, row = items[j]
                credits.append((f"{label} / {kind} {j + 1}", row))
                pred = labels[int(np.argmax(p))]
                tgt = pred if target == "predicted" else target
                heat = explainer.heatmap(image, tgt)
                rgb = overlay(image, heat)
                thumb = Image.fromarray(rgb).resize((256, 256), Image.Resampling.LANCZOS)
                ax.imshow(np.asarray(thumb))
                ax.set_xlabel(
                    f"pred {pred} P={p[labels.index(pred)]:.2f}\n"
                    f"P({label})={p[labels.index(label)]:.2f}",
                    fontsize=8.5,
                    color="#1e8449" if kind == "correct" else "#b03a2e",
                )
    explained = "predicted class" if target == "predicted" else target
    fig.suptitle(
        f"{predictor.facts.title}: {explainer.method} heat maps ({explained}) - {subtitle}\n"
        f"{DISCLAIMER}",
        fontsize=11,
    )
    fig.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=100)
    _write_credits(output, credits)
    return output


def _write_credits(output: Path, credits: Sequence[tuple[str, ManifestRow]]) -> Path:
    """Write ``<output stem>_credits.md``: source, licence and origin of every image shown."""
    from ..inference import DISCLAIMER

    lines = [
        f"# Image credits for {output.name}",
        "",
        "Images are shown downscaled to 256 px with a heat map blended over them.",
        "",
        "| Cell | Source | Licence | Original | Link |",
        "|---|---|---|---|---|",
    ]
    for cell, row in credits:
        ex = row.extra
        lines.append(
            f"| {cell} | {row.source} | {ex.get('license', 'unknown')} | "
            f"{ex.get('original_file', '')} | {ex.get('original_url', '')} |"
        )
    lines += ["", f"_{DISCLAIMER}_", ""]
    path = output.with_name(output.stem + "_credits.md")
    path.write_text("\n".join(lines))
    return path


@app.command()
def heatmap(
    paths: Annotated[
        list[Path] | None,
        typer.Argument(
            help="DICOM, PNG or JPEG files, or folders to search recursively.", exists=True
        ),
    ] = None,
    output_dir: Annotated[
        Path | None,
        typer.Option(file_okay=False, help="Folder for the PNG overlays (file mode)."),
    ] = None,
    model: ModelOption = None,
    bundle: BundleOption = None,
    method: Annotated[
        str, typer.Option(help="CAM method: gradcam, gradcam++, xgradcam, hirescam or layercam.")
    ] = "gradcam",
    target: Annotated[
        str,
        typer.Option(help="Class whose score is explained: covid, normal, pneumonia or predicted."),
    ] = "predicted",
    max_side: Annotated[
        int, typer.Option(min=0, help="Longest side of the overlay in pixels (0: source size).")
    ] = 1024,
    gallery: Annotated[
        bool, typer.Option("--gallery", help="Draw a gallery figure of a labelled split instead.")
    ] = False,
    data: Annotated[
        Path | None,
        typer.Option(
            envvar="DICOM_COVID_DATA",
            help="Gallery: folder with manifest.csv (default: the development set).",
            exists=True,
            file_okay=False,
        ),
    ] = None,
    split: Annotated[str, typer.Option(help="Gallery: split to draw from.")] = "test",
    per_class: Annotated[
        int, typer.Option(min=1, max=8, help="Gallery: correct and wrong examples per class.")
    ] = 2,
    max_scan: Annotated[
        int,
        typer.Option(min=1, help="Gallery: images per class classified to find the examples."),
    ] = 48,
    output: Annotated[
        Path | None, typer.Option(dir_okay=False, help="Gallery: PNG file to write.")
    ] = None,
    seed: Annotated[int, typer.Option(help="Gallery: seed of the image sample.")] = 0,
    redistributable: Annotated[
        bool,
        typer.Option(
            "--redistributable",
            help="Gallery: draw only images whose manifest licence allows redistribution with "
            "credit (CC BY, CC BY 3.0/4.0, CC0, public domain), for figures you publish.",
        ),
    ] = False,
    device: Annotated[str, typer.Option(help="Torch device, e.g. cpu or cuda.")] = "cpu",
    progress: Annotated[bool, typer.Option(help="Show a progress bar (gallery).")] = True,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False,
) -> None:
    """Grad-CAM heat maps: PNG overlays of radiographs, or a gallery of a labelled split.

    File mode writes <name>_<method>_<class>.png per input into --output-dir, with the class
    probabilities and the decision burned in. Exit status 0 when every input was drawn, 2 when any
    was rejected (not DICOM, colour, lateral, ...), 1 on a usage or bundle error. A heat map shows
    what the model looked at, not where disease is. RESEARCH USE ONLY - NOT FOR DIAGNOSTIC USE.
    """
    setup_logging(verbose, quiet=not verbose)
    from ..config import default_data_dir
    from ..explain import CAM_METHODS, Explainer
    from ..inference import DISCLAIMER, Predictor

    method = method.lower()
    if method not in CAM_METHODS:
        raise typer.BadParameter(
            f"{method!r} is not one of {', '.join(CAM_METHODS)}", param_hint="--method"
        )
    target = target.lower()
    if target not in _TARGETS:
        raise typer.BadParameter(
            f"{target!r} is not one of {', '.join(_TARGETS)}", param_hint="--target"
        )
    if gallery:
        if paths:
            raise typer.BadParameter("give either PATH... or --gallery, not both")
        if output is None:
            raise typer.BadParameter("--gallery needs --output FILE.png", param_hint="--output")
    elif not paths or output_dir is None:
        raise typer.BadParameter(
            "give PATH... and --output-dir DIR (or --gallery with --data and --output)"
        )

    with fail_on_error():
        predictor = Predictor(bundle, model, device=device)
        explainer = Explainer(predictor, method)
        if gallery:
            from ..analysis.galleries import GALLERY_LICENCE_RULE, showable
            from ..training.data import read_manifest

            data_dir = data if data is not None else default_data_dir()
            rows = read_manifest(data_dir, split or None)
            if redistributable:
                rows = showable(rows)
                if not rows:
                    raise typer.BadParameter(
                        "no image of the split has a redistributable licence in the manifest's "
                        f"'license' column ({GALLERY_LICENCE_RULE})",
                        param_hint="--redistributable",
                    )
            out = _write_gallery(
                predictor,
                explainer,
                rows,
                target,
                per_class,
                max_scan,
                seed,
                output,
                f"{split or 'all'} split of {data_dir.name}",
                progress,
            )
            typer.echo(f"gallery: {out} (credits: {out.stem}_credits.md)")
            typer.echo(DISCLAIMER)
            return
        written, rejected = _write_overlays(
            find_images(paths), predictor, explainer, target, output_dir, max_side
        )
    for path in written:
        typer.echo(str(path))
    for r in rejected:
        typer.echo(f"{r['path']}: REJECTED ({r['reason']}): {r['message']}")
    typer.echo(DISCLAIMER)
    if rejected:
        raise typer.Exit(2)
