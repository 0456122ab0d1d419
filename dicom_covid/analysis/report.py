"""Evaluation report: ``report.md``, a confusion-matrix PNG, ROC-curve PNGs and per-image CSV.

Figures are drawn with matplotlib's object API on the Agg canvas (no pyplot global state, no
display needed). Every output carries the research-use disclaimer.
"""

from __future__ import annotations

import csv
import logging
import math
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from sklearn.metrics import roc_curve

from ..inference import DISCLAIMER
from .evaluate import load_predictions

__all__ = [
    "plot_confusion_matrix",
    "plot_roc_curves",
    "write_markdown",
    "write_predictions_csv",
    "write_report",
]

logger = logging.getLogger(__name__)

_CLASS_COLOURS = {"covid": "#c0392b", "normal": "#2471a3", "pneumonia": "#229954"}
_SHORTCUT_COLOUR = "#7f7f7f"


def _save(fig: Figure, path: Path) -> Path:
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=120)
    return path


def _draw_cm(ax, cm: np.ndarray, labels: list[str], title: str) -> None:
    cm = np.asarray(cm)
    row_sums = cm.sum(axis=1, keepdims=True)
    frac = np.divide(cm, row_sums, out=np.zeros(cm.shape, dtype=float), where=row_sums > 0)
    ax.imshow(frac, cmap="Blues", vmin=0.0, vmax=1.0)
    ax.set_xticks(range(len(labels)), labels)
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=11)
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(
                j,
                i,
                f"{cm[i, j]}\n{frac[i, j]:.0%}",
                ha="center",
                va="center",
                fontsize=10,
                color="white" if frac[i, j] > 0.55 else "black",
            )


def plot_confusion_matrix(
    cm: np.ndarray,
    labels: list[str],
    path: str | Path,
    *,
    title: str = "Model",
    shortcut_cm: np.ndarray | None = None,
) -> Path:
    """Confusion matrix (counts and row percentages), optionally beside the shortcut control's.

    Parameters
    ----------
    cm : array of int, shape (C, C)
        Rows are the truth, columns the prediction.
    labels : list of str
    path : path
        PNG to write.
    title : str
        Title of the model panel.
    shortcut_cm : array of int, optional
        The shortcut control's matrix, drawn as a second panel.

    Returns
    -------
    pathlib.Path
    """
    panels = 2 if shortcut_cm is not None else 1
    fig = Figure(figsize=(4.6 * panels, 4.6), layout="constrained")
    axes = fig.subplots(1, panels, squeeze=False)[0]
    _draw_cm(axes[0], cm, labels, title)
    if shortcut_cm is not None:
        _draw_cm(axes[1], shortcut_cm, labels, "Shortcut control (no lungs)")
    fig.suptitle(DISCLAIMER, fontsize=8, color="#555555")
    return _save(fig, Path(path))


def _roc(is_positive: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    if is_positive.all() or not is_positive.any():
        return None
    fpr, tpr, _ = roc_curve(is_positive, score)
    return fpr, tpr


def plot_roc_curves(
    targets: np.ndarray,
    probs: np.ndarray,
    labels: list[str],
    path: str | Path,
    *,
    shortcut_probs: np.ndarray | None = None,
    aucs: dict[str, float] | None = None,
    shortcut_covid_auc: float | None = None,
    covid_threshold: float | None = None,
    covid_only: bool = False,
    title: str = "",
) -> Path:
    """One-vs-rest ROC curves, the COVID curve highlighted, the shortcut control's COVID curve
    dashed beside it.

    Parameters
    ----------
    targets : array of int, shape (N,)
    probs : array of float, shape (N, C)
    labels : list of str
    path : path
        PNG to write.
    shortcut_probs : array of float, shape (N, C), optional
    aucs : dict, optional
        AUC per label for the legend.
    shortcut_covid_auc : float, optional
        AUC of the shortcut control's COVID curve for the legend.
    covid_threshold : float, optional
        Marks the model's operating point on the COVID curve.
    covid_only : bool
        Draw only the COVID curves (model and control).
    title : str

    Returns
    -------
    pathlib.Path
    """
    targets = np.asarray(targets)
    covid = labels.index("covid")
    fig = Figure(figsize=(5.8, 5.6), layout="constrained")
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], color="#bbbbbb", lw=1, ls=":", label="chance")
    order = [c for c in range(len(labels)) if c != covid] + [covid]  # COVID drawn on top
    for c in order:
        if covid_only and c != covid:
            continue
        curve = _roc(targets == c, probs[:, c])
        if curve is None:
            continue
        name = labels[c]
        auc = (aucs or {}).get(name)
        text = f"{name} vs rest" + (f" (AUC {auc:.3f})" if auc is not None else "")
        ax.plot(
            *curve,
            lw=3.0 if c == covid else 1.4,
            color=_CLASS_COLOURS.get(name),
            alpha=1.0 if c == covid else 0.8,
            label=text,
        )
    if covid_threshold is not None:
        flagged = probs[:, covid] >= covid_threshold
        is_covid = targets == covid
        if is_covid.any() and (~is_covid).any():
            ax.plot(
                flagged[~is_covid].mean(),
                flagged[is_covid].mean(),
                "o",
                ms=8,
                color=_CLASS_COLOURS["covid"],
                mec="black",
                label=f"operating point (P(covid) ≥ {covid_threshold:.2f})",
            )
    if shortcut_probs is not None:
        curve = _roc(targets == covid, shortcut_probs[:, covid])
        if curve is not None:
            text = "shortcut control, covid vs rest"
            if shortcut_covid_auc is not None:
                text += f" (AUC {shortcut_covid_auc:.3f})"
            ax.plot(*curve, lw=2.2, ls="--", color=_SHORTCUT_COLOUR, label=text)
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_aspect("equal")
    ax.set_xlabel("false positive rate (1 - specificity)")
    ax.set_ylabel("true positive rate (sensitivity)")
    ax.set_title(title or ("COVID vs rest ROC" if covid_only else "One-vs-rest ROC"), fontsize=11)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.suptitle(DISCLAIMER, fontsize=8, color="#555555")
    return _save(fig, Path(path))


def _fmt(value: object, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _ci(result: dict | None, name: str) -> str:
    if not result or not result.get(f"{name}_ci"):
        return "–"
    lo, hi = result[f"{name}_ci"]
    return f"{_fmt(lo)}–{_fmt(hi)}" if lo is not None and hi is not None else "–"


def write_markdown(result: dict, path: str | Path, images: dict[str, str]) -> Path:
    """Write the markdown report.

    Parameters
    ----------
    result : dict
        Output of :func:`~dicom_covid.analysis.evaluate.evaluate_model` (plus optional ``data``
        and ``split`` keys).
    path : path
        ``report.md`` to write.
    images : dict of str to str
        Caption → PNG file name (relative to the report).

    Returns
    -------
    pathlib.Path
    """
    sc = result.get("shortcut_control")
    labels = list(result["labels"])
    lines = [
        f"# Evaluation of {result.get('model_title', result['model'])}",
        "",
        f"**{DISCLAIMER}.** These figures describe a research model on public data sets; they "
        "say nothing about performance on any patient population.",
        "",
        f"- model: `{result['model']}` (bundle version {result.get('bundle_version', '?')})",
        f"- data: `{result.get('data', '?')}`, split: {result.get('split') or 'all rows'}",
        f"- images evaluated: {result['n']} (rejected by the reader: {result['n_rejected']})",
        "",
        "## Headline metrics",
        "",
        "| metric | model | 95% CI | shortcut control | 95% CI |",
        "|---|---|---|---|---|",
    ]
    names = {
        "accuracy": "3-class accuracy",
        "covid_auc": "COVID-vs-rest AUC",
        "macro_auc": "macro one-vs-rest AUC",
        "infected_vs_normal_accuracy": "infected-vs-normal accuracy",
        "ece": "expected calibration error (15 bins)",
    }
    for key, text in names.items():
        lines.append(
            f"| {text} | {_fmt(result.get(key))} | {_ci(result, key)} | "
            f"{_fmt(sc.get(key)) if sc else '–'} | {_ci(sc, key)} |"
        )
    lines.append("")
    if sc:
        lines += [
            "The **shortcut control** is a gradient-boosting model trained on the development "
            "set's train split with only non-diagnostic cues: image width, height and aspect "
            "ratio, global intensity statistics and border/corner statistics. It never looks at "
            "the lungs. Where the model scores close to it, the model may be recognising the "
            "collection an image came from rather than disease.",
            "",
        ]
        if sc.get("n_evaluated_rows_in_training"):
            lines += [
                f"> Warning: {sc['n_evaluated_rows_in_training']} evaluated images were in the "
                "shortcut control's training split; its scores here are optimistic.",
                "",
            ]
    else:
        lines += ["The shortcut control was not run for this evaluation.", ""]

    at = result.get("covid_at_threshold")
    if at:
        lines += [
            "## COVID screening decision at the model's operating threshold",
            "",
            "| threshold on P(covid) | sensitivity | specificity | PPV |",
            "|---|---|---|---|",
            f"| {_fmt(at['threshold'])} | {_fmt(at['sensitivity'])} | "
            f"{_fmt(at['specificity'])} | {_fmt(at['ppv'])} |",
            "",
        ]

    adult = result.get("adult")
    if adult:
        ci = adult.get("covid_vs_pneumonia_auc_ci") or [None, None]
        se_ci = adult.get("covid_sensitivity_ci") or [None, None]
        sp_ci = adult.get("covid_vs_pneumonia_specificity_ci") or [None, None]
        counts = " / ".join(str(adult["class_counts"].get(lab, 0)) for lab in labels)
        lines += [
            "## Adults: COVID-19 against other pneumonia",
            "",
            "Adult images only (`age_group == adult`). Version 1 of the data could not ask this "
            "question: its pneumonia class was pediatric.",
            "",
            "| n (covid / normal / pneumonia) | 3-class accuracy "
            "| COVID-vs-pneumonia AUC (95 % CI) "
            "| COVID sensitivity @thr (95 % CI) | specificity vs pneumonia @thr (95 % CI) |",
            "|---|---|---|---|---|",
            f"| {adult['n']} ({counts}) | {_fmt(adult['accuracy'])} | "
            f"{_fmt(adult['covid_vs_pneumonia_auc'])} ({_fmt(ci[0])}–{_fmt(ci[1])}) | "
            f"{_fmt(adult.get('covid_sensitivity'))} ({_fmt(se_ci[0])}–{_fmt(se_ci[1])}) | "
            f"{_fmt(adult.get('covid_vs_pneumonia_specificity'))} "
            f"({_fmt(sp_ci[0])}–{_fmt(sp_ci[1])}) |",
            "",
        ]

    lines += [
        "## Per class (argmax label)",
        "",
        "| class | n | sensitivity | specificity | PPV | AUC | shortcut AUC |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in labels:
        m = result["per_class"][name]
        s_auc = sc["per_class"][name]["auc"] if sc else None
        lines.append(
            f"| {name} | {m['n']} | {_fmt(m['sensitivity'])} | "
            f"{_fmt(m['specificity'])} | {_fmt(m['ppv'])} | {_fmt(m['auc'])} | "
            f"{_fmt(s_auc)} |"
        )
    lines += [
        "",
        "## Confusion matrix (rows: truth, columns: prediction)",
        "",
        "| true \\ predicted | " + " | ".join(labels) + " |",
        "|---|" + "---|" * len(labels),
    ]
    for name, row in zip(labels, result["confusion_matrix"], strict=True):
        lines.append(f"| {name} | " + " | ".join(str(v) for v in row) + " |")
    lines.append("")

    if result.get("per_source"):
        lines += [
            "## Per source",
            "",
            "Sources are the public collections images came from; labels are strongly tied "
            "to them.",
            "",
            "| source | n | covid / normal / pneumonia | accuracy | COVID AUC | "
            "shortcut accuracy | shortcut COVID AUC |",
            "|---|---|---|---|---|---|---|",
        ]
        for src, m in result["per_source"].items():
            counts = " / ".join(str(m["class_counts"].get(lab, 0)) for lab in labels)
            s = (sc or {}).get("per_source", {}).get(src, {})
            lines.append(
                f"| {src} | {m['n']} | {counts} | {_fmt(m['accuracy'])} | "
                f"{_fmt(m['covid_auc'])} | {_fmt(s.get('accuracy'))} | "
                f"{_fmt(s.get('covid_auc'))} |"
            )
        lines.append("")

    lines += ["## Figures", ""]
    for caption, name in images.items():
        lines += [f"[{caption}]({name})", "", f"![{caption}]({name})", ""]

    if result.get("rejected"):
        lines += [
            "## Rejected images",
            "",
            "The reader refused these files; they are left out of every metric.",
            "",
            "| path | reason |",
            "|---|---|",
        ]
        lines += [f"| `{r['path']}` | {r['reason']} |" for r in result["rejected"]]
        lines.append("")

    boot = result.get("bootstrap", {})
    lines += [
        "## Method",
        "",
        f"- Confidence intervals: {boot.get('method', 'bootstrap')}, "
        f"{boot.get('resamples', '?')} resamples, seed {boot.get('seed', '?')}, "
        f"{boot.get('confidence', 0.95):.0%} percentile interval.",
        "- Infected vs normal: COVID and pneumonia together against normal, from the argmax label.",
        "- Expected calibration error: top-label, 15 equal-width confidence bins.",
    ]
    if sc:
        lines.append(
            f"- Shortcut control: {sc.get('method', '')}; {sc.get('n_train', '?')} training "
            f"images; features: {', '.join(sc.get('features', []))}."
        )
    lines += ["", f"*{DISCLAIMER}*", ""]
    path = Path(path)
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def write_predictions_csv(result: dict, path: str | Path) -> Path:
    """Per-image probabilities of the model and of the shortcut control."""
    labels = list(result["labels"])
    path = Path(path)
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        header = ["path", "label", "source", "predicted", *(f"p_{lab}" for lab in labels)]
        has_sc = bool(result["predictions"]) and (
            result["predictions"][0]["shortcut_probabilities"] is not None
        )
        if has_sc:
            header += [f"shortcut_p_{lab}" for lab in labels]
        writer.writerow(header)
        for p in result["predictions"]:
            probs = p["probabilities"]
            row = [
                p["path"],
                p["label"],
                p["source"],
                labels[int(np.argmax(probs))],
                *(f"{v:.5f}" for v in probs),
            ]
            if has_sc:
                row += [f"{v:.5f}" for v in p["shortcut_probabilities"]]
            writer.writerow(row)
    return path


def write_report(result: dict, report_dir: str | Path) -> dict[str, Path]:
    """Write ``report.md``, ``confusion_matrix.png``, ``roc_one_vs_rest.png``, ``roc_covid.png``
    and ``predictions.csv`` into ``report_dir``.

    Parameters
    ----------
    result : dict
        Output of :func:`~dicom_covid.analysis.evaluate.evaluate_model`.
    report_dir : path
        Created when missing.

    Returns
    -------
    dict of str to pathlib.Path
        The files written, by kind.
    """
    out = Path(report_dir)
    out.mkdir(parents=True, exist_ok=True)
    labels = list(result["labels"])
    targets, probs, sc_probs = load_predictions(result)
    sc = result.get("shortcut_control")
    aucs = {lab: result["per_class"][lab]["auc"] for lab in labels}
    files: dict[str, Path] = {}
    files["confusion_matrix"] = plot_confusion_matrix(
        np.asarray(result["confusion_matrix"]),
        labels,
        out / "confusion_matrix.png",
        title=f"{result.get('model_title', result['model'])} (accuracy {_fmt(result['accuracy'])})",
        shortcut_cm=np.asarray(sc["confusion_matrix"]) if sc else None,
    )
    common = {
        "shortcut_probs": sc_probs,
        "aucs": aucs,
        "shortcut_covid_auc": sc.get("covid_auc") if sc else None,
    }
    files["roc_one_vs_rest"] = plot_roc_curves(
        targets,
        probs,
        labels,
        out / "roc_one_vs_rest.png",
        title=f"{result.get('model_title', result['model'])}: one-vs-rest ROC",
        **common,
    )
    threshold = (result.get("covid_at_threshold") or {}).get("threshold")
    files["roc_covid"] = plot_roc_curves(
        targets,
        probs,
        labels,
        out / "roc_covid.png",
        covid_only=True,
        covid_threshold=threshold,
        title=f"{result.get('model_title', result['model'])}: COVID vs rest, model and "
        "shortcut control",
        **common,
    )
    files["predictions"] = write_predictions_csv(result, out / "predictions.csv")
    files["report"] = write_markdown(
        result,
        out / "report.md",
        {
            "Confusion matrix": files["confusion_matrix"].name,
            "One-vs-rest ROC curves": files["roc_one_vs_rest"].name,
            "COVID-vs-rest ROC, model and shortcut control": files["roc_covid"].name,
        },
    )
    logger.info("report written to %s", out)
    return files
