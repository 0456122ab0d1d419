"""Analysis of trained models: evaluation, reports, comparison, t-SNE, shortcut control, heat share.

Nothing here trains a network; :mod:`dicom_covid.training` does that. Analysis reads labelled
manifests and metrics through the training package (:mod:`dicom_covid.training.data`,
:mod:`dicom_covid.training.metrics`), never the other way round. One module per concern:

* :mod:`~dicom_covid.analysis.evaluate`: :func:`evaluate_model` (a bundle model on a labelled
  manifest, with bootstrap intervals and a per-source breakdown), :func:`compute_metrics`,
  :func:`to_json_ready`, :func:`load_predictions` (``dicom-covid evaluate``, the bundle's
  ``configs/evaluate.json``).
* :mod:`~dicom_covid.analysis.report`: :func:`write_report` (``report.md``, confusion matrix,
  ROC curves, per-image CSV).
* :mod:`~dicom_covid.analysis.compare`: :func:`comparison_rows`, :func:`load_metrics`,
  :func:`plot_comparison` (``dicom-covid compare``).
* :mod:`~dicom_covid.analysis.tsne`: :func:`run_tsne`, :func:`tsne_2d` (``dicom-covid tsne``).
* :mod:`~dicom_covid.analysis.shortcut`: :class:`ShortcutControl`, :func:`fit_shortcut` (how well
  non-diagnostic image cues alone predict the label).
* :mod:`~dicom_covid.analysis.heat_study`: :func:`heat_share_study`,
  :func:`write_heat_share_report` (share of Grad-CAM heat inside the lung fields, ``dicom-covid
  lungs heat-share``).
* :mod:`~dicom_covid.analysis.galleries`: :func:`may_show` (the licence rule for images in a
  committed figure), :func:`showable`, :func:`spread`, :func:`pick_by_outcome` (``dicom-covid
  heatmap --gallery``, ``dicom-covid lungs evaluate --contours``).

Every name is imported on first use, so ``import dicom_covid.analysis`` loads neither torch nor
matplotlib. RESEARCH USE ONLY.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .compare import comparison_rows, load_metrics, plot_comparison
    from .evaluate import (
        HEADLINE_METRICS,
        compute_metrics,
        evaluate_model,
        load_predictions,
        to_json_ready,
    )
    from .galleries import may_show, pick_by_outcome, showable, spread
    from .heat_study import HEAT_SHARE_DEFINITION, heat_share_study, write_heat_share_report
    from .report import write_report
    from .shortcut import ShortcutControl, fit_shortcut
    from .tsne import run_tsne, tsne_2d

__all__ = [
    "HEADLINE_METRICS",
    "HEAT_SHARE_DEFINITION",
    "ShortcutControl",
    "comparison_rows",
    "compute_metrics",
    "evaluate_model",
    "fit_shortcut",
    "heat_share_study",
    "load_metrics",
    "load_predictions",
    "may_show",
    "pick_by_outcome",
    "plot_comparison",
    "run_tsne",
    "showable",
    "spread",
    "to_json_ready",
    "tsne_2d",
    "write_heat_share_report",
    "write_report",
]

#: Names loaded on first use, with their module.
_LAZY = {
    "HEADLINE_METRICS": "evaluate",
    "compute_metrics": "evaluate",
    "evaluate_model": "evaluate",
    "load_predictions": "evaluate",
    "to_json_ready": "evaluate",
    "write_report": "report",
    "comparison_rows": "compare",
    "load_metrics": "compare",
    "plot_comparison": "compare",
    "run_tsne": "tsne",
    "tsne_2d": "tsne",
    "ShortcutControl": "shortcut",
    "fit_shortcut": "shortcut",
    "HEAT_SHARE_DEFINITION": "heat_study",
    "may_show": "galleries",
    "showable": "galleries",
    "spread": "galleries",
    "pick_by_outcome": "galleries",
    "heat_share_study": "heat_study",
    "write_heat_share_report": "heat_study",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
