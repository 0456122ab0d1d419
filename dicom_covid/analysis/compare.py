"""Side-by-side comparison of evaluated models: a markdown table and a figure.

Inputs are the ``metrics.json`` files that ``dicom-covid evaluate --output-json`` (or
``--report-dir``) writes, optionally with the per-model CPU latency from
``benchmarks/backbone_latency.py --json``. Training facts (input size, epochs, training time,
initialisation, parameters) come from the models' facts JSON in the bundle.

The table follows the paper's results (accuracy per backbone) and goes beyond it: intervals,
COVID sensitivity and specificity at the operating threshold chosen on the validation split,
AUCs, calibration (ECE), parameters and CPU latency. RESEARCH USE ONLY.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ..bundle import Bundle
from ..errors import DataError
from ..inference import DISCLAIMER
from ..models import BACKBONES

__all__ = ["PAPER_ACCURACY", "comparison_rows", "load_metrics", "plot_comparison", "write_markdown"]

logger = logging.getLogger(__name__)

#: Best result reported by the ICECCO 2021 paper (InceptionResNet-v2, test accuracy).
PAPER_ACCURACY = {"inception_resnet_v2": 0.951}


def load_metrics(paths: Sequence[str | Path]) -> list[dict]:
    """Read evaluation results.

    Parameters
    ----------
    paths : sequence of path
        ``metrics.json`` files, or folders holding one (e.g. ``monai_bundle/docs/alexnet_test``).

    Returns
    -------
    list of dict

    Raises
    ------
    DataError
        When a path holds no readable ``metrics.json``.
    """
    out = []
    for p in map(Path, paths):
        f = p / "metrics.json" if p.is_dir() else p
        try:
            result = json.loads(f.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise DataError(
                f"{f}: no readable evaluation result ({exc}); write one with "
                "dicom-covid evaluate --split test --report-dir DIR."
            ) from exc
        if "model" not in result or "accuracy" not in result:
            raise DataError(f"{f}: not a dicom-covid evaluation result (no model/accuracy).")
        out.append(result)
    return out


def _train_facts(bundle: Bundle | None, name: str) -> dict:
    if bundle is None:
        return {}
    try:
        raw = bundle.facts(name).raw
    except Exception:  # a model evaluated from another bundle: no training facts
        return {}
    if raw.get("kind") == "ensemble":
        return {"init": f"ensemble (mean of {len(raw.get('members', []))})"}
    cfg = raw.get("train_config", {})
    history = raw.get("history", [])
    spec = BACKBONES.get(name)
    imagenet = bool(cfg.get("imagenet")) and spec is not None and spec.imagenet_init is not None
    init = "own checkpoint" if cfg.get("init_checkpoint") else "ImageNet" if imagenet else "scratch"
    return {
        "init": init,
        "image_size": cfg.get("image_size") or raw.get("input_size"),
        "epochs": len(history) or cfg.get("epochs"),
        "best_epoch": raw.get("best_epoch"),  # 1-based in the facts
        "train_minutes": round(sum(h.get("train_seconds", 0.0) for h in history) / 60.0, 1),
        "parameters": raw.get("parameters"),
    }


def comparison_rows(
    results: Sequence[dict], bundle: Bundle | None = None, latency: dict | None = None
) -> list[dict]:
    """One flat row per evaluated model, best accuracy first.

    Parameters
    ----------
    results : sequence of dict
        Evaluation results (:func:`load_metrics`), all on the same split.
    bundle : Bundle, optional
        Bundle whose facts give the training settings.
    latency : dict, optional
        ``benchmarks/backbone_latency.py --json`` output.

    Returns
    -------
    list of dict

    Raises
    ------
    DataError
        When the results were computed on different image sets.
    """
    sizes = {(r.get("split"), r.get("n")) for r in results}
    if len(sizes) > 1:
        raise DataError(
            f"the results cover different image sets {sorted(map(str, sizes))}; compare "
            "evaluations of one split only."
        )
    lat = {m["model"]: m for m in (latency or {}).get("models", [])}
    rows = []
    for r in results:
        name = r["model"]
        thr = r.get("covid_at_threshold") or {}
        row = {
            "model": name,
            "title": r.get("model_title", name),
            "n": r["n"],
            "accuracy": r["accuracy"],
            "accuracy_ci": r.get("accuracy_ci"),
            "infected_vs_normal_accuracy": r.get("infected_vs_normal_accuracy"),
            "infected_vs_normal_accuracy_ci": r.get("infected_vs_normal_accuracy_ci"),
            "covid_sensitivity": thr.get("sensitivity"),
            "covid_specificity": thr.get("specificity"),
            "covid_threshold": thr.get("threshold"),
            "covid_auc": r.get("covid_auc"),
            "covid_auc_ci": r.get("covid_auc_ci"),
            "macro_auc": r.get("macro_auc"),
            "macro_auc_ci": r.get("macro_auc_ci"),
            "ece": r.get("ece"),
            "paper_accuracy": PAPER_ACCURACY.get(name),
            "predict_ms": lat.get(name, {}).get("predict_ms"),
        }
        row.update(_train_facts(bundle, name))
        if row.get("parameters") is None and name in lat:
            row["parameters"] = lat[name].get("parameters")
        rows.append(row)
    rows.sort(key=lambda x: -x["accuracy"])
    return rows


def _f(v: object, digits: int = 3) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def _ci(v: object, ci: object) -> str:
    if v is None:
        return "–"
    if not ci:
        return _f(v)
    return f"{v:.3f} ({ci[0]:.3f}–{ci[1]:.3f})"


def write_markdown(rows: Sequence[dict], path: str | Path, figure: str | None = None) -> Path:
    """Write the comparison table as markdown.

    Parameters
    ----------
    rows : sequence of dict
        :func:`comparison_rows` output.
    path : path
        Output ``.md`` file.
    figure : str, optional
        Relative path of the comparison figure to embed.

    Returns
    -------
    pathlib.Path
    """
    path = Path(path)
    n = rows[0]["n"] if rows else 0
    lines = [
        f"# Model comparison on the test split ({n} images)",
        "",
        f"**{DISCLAIMER}.** Metrics of three-class classification (covid / normal / pneumonia) on "
        "the patient-level `test` split, which was never used for training, model selection or "
        "thresholds. Intervals: 95% stratified bootstrap (1000 resamples). COVID sensitivity and "
        "specificity are at each model's operating threshold, chosen on the validation split. "
        "Infected-vs-normal accuracy (covid or pneumonia vs normal) is the two-class figure "
        "closest to the paper's. Latency: one image, batch 1, read + preprocess + forward on this "
        "project's 2-core CPU, all models measured side by side in one run.",
        "",
        "| Model | Init | Input px | Epochs (best) | Train min | Params M | Accuracy (95% CI) | "
        "Infected-vs-normal acc. (95% CI) | COVID sens. / spec. | COVID AUC (95% CI) | "
        "Macro AUC (95% CI) | ECE | CPU ms/image |",
        "|---|---|---:|---:|---:|---:|---|---|---|---|---|---:|---:|",
    ]
    for r in rows:
        epochs = (
            "–"
            if r.get("epochs") is None
            else f"{r['epochs']}" + (f" ({r['best_epoch']})" if r.get("best_epoch") else "")
        )
        params = "–" if r.get("parameters") is None else f"{r['parameters'] / 1e6:.1f}"
        sens_spec = (
            "–"
            if r["covid_sensitivity"] is None
            else f"{r['covid_sensitivity']:.3f} / {r['covid_specificity']:.3f}"
        )
        lines.append(
            f"| {r['title']} | {r.get('init', '–')} | {r.get('image_size') or '–'} | {epochs} | "
            f"{_f(r.get('train_minutes'), 0)} | {params} | "
            f"{_ci(r['accuracy'], r['accuracy_ci'])} | "
            f"{_ci(r['infected_vs_normal_accuracy'], r['infected_vs_normal_accuracy_ci'])} | "
            f"{sens_spec} | {_ci(r['covid_auc'], r['covid_auc_ci'])} | "
            f"{_ci(r['macro_auc'], r['macro_auc_ci'])} | {_f(r['ece'])} | "
            f"{_f(r.get('predict_ms'), 1)} |"
        )
    paper = [r for r in rows if r.get("paper_accuracy")]
    lines += [""]
    for r in paper:
        lines.append(
            f"The paper reports {r['paper_accuracy']:.1%} test accuracy for {r['title']} (its "
            "best model, on its own merge of public data at full resolution with ImageNet "
            "initialisation); its test images differ from ours, so the figures are not a "
            "like-for-like comparison."
        )
    if figure:
        lines += ["", f"![Model comparison]({figure})"]
    lines += ["", f"_{DISCLAIMER}_", ""]
    path.write_text("\n".join(lines))
    return path


def plot_comparison(rows: Sequence[dict], path: str | Path) -> Path:
    """Figure: accuracy and COVID AUC with intervals per model, and accuracy vs CPU latency.

    Parameters
    ----------
    rows : sequence of dict
        :func:`comparison_rows` output.
    path : path
        Output PNG.

    Returns
    -------
    pathlib.Path
    """
    path = Path(path)
    rows = list(rows)[::-1]  # best on top
    titles = [r["title"] if len(r["title"]) <= 22 else r["model"] for r in rows]
    y = np.arange(len(rows))
    fig = Figure(figsize=(15, 0.55 * len(rows) + 2.4))
    axes = fig.subplots(1, 3, gridspec_kw={"width_ratios": [1, 1, 1.1]})
    for ax, key, label in (
        (axes[0], "accuracy", "Accuracy (3 classes)"),
        (axes[1], "covid_auc", "COVID-vs-rest AUC"),
    ):
        vals = np.array([r[key] for r in rows], dtype=float)
        cis = [r.get(f"{key}_ci") or [v, v] for r, v in zip(rows, vals, strict=True)]
        err = np.array(
            [
                [v - c[0] for v, c in zip(vals, cis, strict=True)],
                [c[1] - v for v, c in zip(vals, cis, strict=True)],
            ]
        )
        ax.errorbar(vals, y, xerr=err, fmt="o", color="#2471a3", ecolor="#7f8c8d", capsize=4)
        for yi, v in zip(y, vals, strict=True):
            ax.annotate(
                f"{v:.3f}",
                (v, yi),
                textcoords="offset points",
                xytext=(0, 7),
                ha="center",
                fontsize=8,
            )
        ax.set_yticks(y, titles)
        ax.set_xlabel(f"{label}, 95% CI")
        ax.grid(axis="x", alpha=0.3)
        ax.set_ylim(-0.7, len(rows) - 0.3)
    for yi, r in zip(y, rows, strict=True):
        if r.get("paper_accuracy"):
            axes[0].plot(
                r["paper_accuracy"],
                yi,
                marker="*",
                color="#c0392b",
                markersize=12,
                linestyle="none",
                label="paper",
            )
    if any(r.get("paper_accuracy") for r in rows):
        axes[0].legend(loc="lower left", fontsize=8)
    ax = axes[2]
    timed = [r for r in rows if r.get("predict_ms")]
    for r in timed:
        size = 30 + 6 * (r.get("parameters") or 0) / 1e6
        ax.scatter(r["predict_ms"], r["accuracy"], s=size, alpha=0.6, color="#229954")
        ax.annotate(
            r["title"] if len(r["title"]) <= 22 else r["model"],
            (r["predict_ms"], r["accuracy"]),
            textcoords="offset points",
            xytext=(5, 4),
            fontsize=8,
        )
    ax.set_xscale("log")
    ax.set_xlabel("CPU ms per image (log; marker area ~ parameters)")
    ax.set_ylabel("Accuracy")
    ax.grid(alpha=0.3)
    if not timed:
        ax.text(0.5, 0.5, "no latency figures given", ha="center", transform=ax.transAxes)
    n = rows[0]["n"] if rows else 0
    fig.suptitle(f"Test split, {n} images - {DISCLAIMER}", fontsize=11)
    fig.tight_layout()
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=110)
    return path
