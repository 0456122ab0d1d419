"""The heat-share study: Grad-CAM heat inside the lung fields over a labelled split.

:func:`heat_share_study` measures it per image, class and source for bundle models
(``dicom-covid lungs heat-share``); :func:`write_heat_share_report` writes the JSON, markdown and
box-plot figure.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..bundle import Bundle
from ..errors import DataError, InputRejected
from ..lungs.metrics import heat_share, top_heat_share
from ..lungs.segmenter import LungSegmenter

if TYPE_CHECKING:
    from ..reader import XrayImage
    from ..training.data import ManifestRow

__all__ = ["HEAT_SHARE_DEFINITION", "heat_share_study", "write_heat_share_report"]

logger = logging.getLogger(__name__)


#: What the heat-share report means (written into the JSON and markdown).
HEAT_SHARE_DEFINITION = (
    "heat share = sum of the Grad-CAM heat inside the lung mask / total heat, on the heat map "
    "resized to the source image (values in [0, 1]); top-10% share = fraction of the 10 % "
    "hottest pixels that lie inside the lung mask; lung area = fraction of the image covered by "
    "the mask (what a heat map spread evenly over the image would score). The heat map explains "
    "the model's predicted class unless another target is given. A low share means the model "
    "looked outside the lungs (labels, borders, text, collimation): a shortcut indicator, not "
    "proof either way."
)


def _stratified(
    rows: Sequence[ManifestRow], max_per_class: int | None, seed: int
) -> list[ManifestRow]:
    if not max_per_class:
        return list(rows)
    rng = np.random.default_rng(seed)
    picked: list[ManifestRow] = []
    for label in sorted({r.label for r in rows}):
        of_label = sorted((r for r in rows if r.label == label), key=lambda r: str(r.path))
        take = rng.permutation(len(of_label))[:max_per_class]
        picked += [of_label[int(i)] for i in sorted(take)]
    return picked


def _aggregate(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    shares = np.asarray([r["share"] for r in records], dtype=np.float64)
    valid = shares[~np.isnan(shares)]
    top = np.asarray([r["top10_share"] for r in records], dtype=np.float64)
    top = top[~np.isnan(top)]
    area = np.asarray([r["lung_area"] for r in records], dtype=np.float64)
    out: dict[str, Any] = {"n": len(records), "n_no_heat": int(np.isnan(shares).sum())}
    if valid.size:
        out.update(
            mean=float(valid.mean()),
            median=float(np.median(valid)),
            q1=float(np.quantile(valid, 0.25)),
            q3=float(np.quantile(valid, 0.75)),
            frac_below_half=float((valid < 0.5).mean()),
        )
    if top.size:
        out["top10_mean"] = float(top.mean())
    if area.size:
        out["lung_area_mean"] = float(area.mean())
        out["accuracy"] = float(np.mean([r["predicted"] == r["label"] for r in records]))
    return out


def heat_share_study(
    models: Sequence[str],
    data_dir: str | Path,
    split: str | None = "test",
    bundle: Bundle | str | Path | None = None,
    lung_bundle: Bundle | str | Path | None = None,
    max_per_class: int | None = None,
    seed: int = 0,
    target: str = "predicted",
    method: str = "gradcam",
    device: str = "cpu",
    progress: bool = True,
) -> dict[str, Any]:
    """Share of Grad-CAM heat inside the lung fields, per image and aggregated, for bundle models.

    Parameters
    ----------
    models : sequence of str
        Model names in ``bundle`` (empty: the bundle's default model).
    data_dir : path
        Labelled data folder with ``manifest.csv``.
    split : str, optional
        Manifest split (None: all rows).
    bundle : Bundle or path, optional
        Bundle of the classifiers (default: the project's).
    lung_bundle : Bundle or path, optional
        Bundle of the lung segmenter (default: the project's).
    max_per_class : int, optional
        Stratified, seeded subsample of at most this many images per true label.
    seed : int
        Seed of the subsample.
    target : str
        ``"predicted"`` (explain each image's predicted class) or a label.
    method : str
        CAM method (see :data:`dicom_covid.explain.CAM_METHODS`).
    device : str
        Torch device.
    progress : bool
        Show tqdm progress bars.

    Returns
    -------
    dict
        JSON-serialisable: settings, the segmenter's Dice, and per model ``aggregate``,
        ``by_class``, ``by_source`` and ``per_image`` records (``path``, ``label``, ``source``,
        ``predicted``, ``target``, ``share``, ``top10_share``, ``lung_area``).

    Raises
    ------
    DataError, BundleError
        Unusable manifest, unknown model, no lung segmenter.
    ValueError
        Unknown target or method.
    """
    from tqdm.auto import tqdm

    from ..explain import Explainer
    from ..inference import Predictor
    from ..prediction import DISCLAIMER
    from ..reader import read_image
    from ..training.data import read_manifest

    cls_bundle = bundle if isinstance(bundle, Bundle) else Bundle(bundle)
    names = list(models) or [cls_bundle.default_model]
    if target != "predicted" and target not in cls_bundle.labels:
        raise ValueError(
            f"unknown target {target!r}; use 'predicted' or one of {list(cls_bundle.labels)}"
        )
    segmenter = LungSegmenter(lung_bundle, device=device)
    rows = _stratified(read_manifest(data_dir, split), max_per_class, seed)
    images: list[tuple[ManifestRow, XrayImage, np.ndarray]] = []
    skipped = []
    for row in tqdm(rows, desc="lung masks", unit="img", disable=not progress):
        try:
            image = read_image(row.path)
        except InputRejected as exc:
            skipped.append({"path": row.extra.get("path", row.path.name), "reason": exc.reason})
            continue
        images.append((row, image, segmenter.mask(image)))
    if not images:
        raise DataError(f"no readable image in split {split!r} of {data_dir}.")
    result: dict[str, Any] = {
        "disclaimer": DISCLAIMER,
        "definition": HEAT_SHARE_DEFINITION,
        "data_dir": str(data_dir),
        "split": split,
        "max_per_class": max_per_class,
        "seed": seed,
        "target": target,
        "method": method,
        "n_images": len(images),
        "skipped": skipped,
        "segmenter": {
            "weights": str(segmenter.weights.name),
            "test_dice": segmenter.facts.get("dice", {}).get("test", {}).get("summary", {}),
            "measured_on": "adult ieee8023 COVID-19 images only; masks of other sources "
            "(e.g. pediatric Kermany) are unmeasured",
        },
        "models": {},
    }
    for name in names:
        predictor = Predictor(cls_bundle, name, device=device)
        explainer = Explainer(predictor, method)
        labels = list(predictor.labels)
        records = []
        for row, image, mask in tqdm(
            images, desc=f"heat share {name}", unit="img", disable=not progress
        ):
            probs = predictor.probabilities([image])[0]
            predicted = labels[int(np.argmax(probs))]
            tgt = predicted if target == "predicted" else target
            heat = explainer.heatmap(image, tgt)
            records.append(
                {
                    "path": row.extra.get("path", row.path.name),
                    "label": row.label,
                    "source": row.source,
                    "predicted": predicted,
                    "target": tgt,
                    "share": heat_share(heat, mask),
                    "top10_share": top_heat_share(heat, mask, 0.1),
                    "lung_area": float(mask.mean()),
                }
            )
        result["models"][name] = {
            "title": predictor.facts.title,
            "aggregate": _aggregate(records),
            "by_class": {
                lab: _aggregate([r for r in records if r["label"] == lab])
                for lab in labels
                if any(r["label"] == lab for r in records)
            },
            "by_source": {
                src: _aggregate([r for r in records if r["source"] == src])
                for src in sorted({r["source"] for r in records})
            },
            "per_image": records,
        }
        logger.info(
            "%s: mean heat share %.3f over %d images",
            name,
            result["models"][name]["aggregate"].get("mean", float("nan")),
            len(records),
        )
    return result


def _f(v: Any) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"


def _table(groups: dict[str, dict[str, Any]], first: str) -> list[str]:
    lines = [
        f"| {first} | n | mean share | median | IQR | share < 0.5 | top-10% share | lung area "
        "| accuracy |",
        "|---|---:|---:|---:|---|---:|---:|---:|---:|",
    ]
    for key, a in groups.items():
        iqr = f"{_f(a.get('q1'))}-{_f(a.get('q3'))}"
        lines.append(
            f"| {key} | {a['n']} | {_f(a.get('mean'))} | {_f(a.get('median'))} | {iqr} | "
            f"{_f(a.get('frac_below_half'))} | {_f(a.get('top10_mean'))} | "
            f"{_f(a.get('lung_area_mean'))} | {_f(a.get('accuracy'))} |"
        )
    return lines


def write_heat_share_report(result: dict[str, Any], output_dir: str | Path) -> list[Path]:
    """Write ``heat_share.json``, ``heat_share.md`` and ``heat_share.png`` (box plots).

    Parameters
    ----------
    result : dict
        Output of :func:`heat_share_study`.
    output_dir : path
        Folder (created).

    Returns
    -------
    list of pathlib.Path
        The files written.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / "heat_share.json"
    json_path.write_text(json.dumps(result, indent=2, allow_nan=True) + "\n")

    models = result["models"]
    seg = result["segmenter"]
    dice_txt = (
        f"mean {_f(seg['test_dice'].get('mean'))}, median {_f(seg['test_dice'].get('median'))}, "
        f"min {_f(seg['test_dice'].get('min'))} (n={seg['test_dice'].get('n', 0)})"
    )
    md = [
        "# Share of Grad-CAM heat inside the lung fields",
        "",
        f"**{result['disclaimer']}**",
        "",
        f"Split `{result['split']}` of `{Path(result['data_dir']).name}`, "
        f"{result['n_images']} images"
        + (
            f" (stratified seeded subsample: at most {result['max_per_class']} per class, "
            f"seed {result['seed']})"
            if result["max_per_class"]
            else ""
        )
        + f"; CAM method `{result['method']}`, target `{result['target']}`.",
        "",
        f"Definition: {result['definition']}",
        "",
        f"Lung masks: `{seg['weights']}` (Dice on the test reference masks: {dice_txt}; "
        f"{seg['measured_on']}).",
        "",
        "## Per model",
        "",
        *_table({f"{m['title']} (`{k}`)": m["aggregate"] for k, m in models.items()}, "model"),
    ]
    for key, m in models.items():
        md += ["", f"## {m['title']} (`{key}`): by true class", ""]
        md += _table(m["by_class"], "class")
        md += ["", f"### {m['title']}: by source", ""]
        md += _table(m["by_source"], "source")
    if result["skipped"]:
        md += ["", f"{len(result['skipped'])} images were skipped (unreadable)."]
    md += ["", "![heat share per model and class](heat_share.png)", ""]
    md_path = out / "heat_share.md"
    md_path.write_text("\n".join(md))

    classes = sorted({r["label"] for m in models.values() for r in m["per_image"]})
    colours = ["#c0392b", "#2980b9", "#27ae60", "#8e44ad", "#7f8c8d"]
    groups = [*classes, "all"]
    fig = Figure(figsize=(max(5.0, 2.6 * len(models) + 1.5), 4.6))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    width = 0.8 / len(groups)
    for mi, m in enumerate(models.values()):
        for gi, g in enumerate(groups):
            vals = [
                r["share"]
                for r in m["per_image"]
                if (g == "all" or r["label"] == g) and not math.isnan(r["share"])
            ]
            if not vals:
                continue
            pos = mi + (gi - (len(groups) - 1) / 2) * width
            bp = ax.boxplot(
                [vals],
                positions=[pos],
                widths=width * 0.85,
                patch_artist=True,
                showfliers=True,
                flierprops={"markersize": 2.5},
            )
            for patch in bp["boxes"]:
                patch.set_facecolor(colours[gi % len(colours)])
                patch.set_alpha(0.55)
        area = m["aggregate"].get("lung_area_mean")
        if area is not None:
            ax.hlines(area, mi - 0.45, mi + 0.45, colors="#555555", linestyles=":", linewidth=1)
    ax.axhline(0.5, color="#999999", linestyle="--", linewidth=0.8)
    ax.set_xticks(range(len(models)))
    ax.set_xticklabels([m["title"] for m in models.values()], fontsize=9)
    ax.set_xlim(-0.6, len(models) - 0.4)
    ax.set_ylim(0, 1)
    ax.set_ylabel("share of Grad-CAM heat inside the lungs")
    from matplotlib.patches import Patch

    handles = [
        Patch(facecolor=colours[i % len(colours)], alpha=0.55, label=g)
        for i, g in enumerate(groups)
    ]
    ax.legend(
        handles=handles,
        fontsize=8,
        loc="upper right",
        ncols=len(groups),
        title="true class",
        title_fontsize=8,
    )
    ax.set_title(
        f"Heat inside the lung fields ({result['split']}, n={result['n_images']}; dotted: mean "
        "lung area)\nRESEARCH USE ONLY - NOT FOR DIAGNOSTIC USE",
        fontsize=9,
    )
    fig.tight_layout()
    png_path = out / "heat_share.png"
    fig.savefig(png_path, dpi=110)
    return [json_path, md_path, png_path]
