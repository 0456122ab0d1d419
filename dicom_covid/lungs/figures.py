"""Figures of the lung segmenter: predicted vs reference contours (matplotlib, loaded lazily)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .metrics import dice
from .reference import LungCase
from .segmenter import LungSegmenter

__all__ = ["contour_figure"]


def contour_figure(
    segmenter: LungSegmenter,
    cases: Sequence[LungCase],
    output: str | Path,
    show_image: bool = True,
    max_side: int = 256,
) -> Path:
    """Predicted (red) and reference (green) lung contours of a few cases, with source credit.

    Parameters
    ----------
    segmenter : LungSegmenter
    cases : sequence of LungCase
        Cases to draw; only show images whose licence allows it (e.g. CC BY).
    output : path
        PNG file.
    show_image : bool
        Draw the radiograph under the contours (downscaled to ``max_side``); else a blank
        background.
    max_side : int
        Longest side of each panel's image in pixels.

    Returns
    -------
    pathlib.Path
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    output = Path(output)
    n = max(1, len(cases))
    fig = Figure(figsize=(3.4 * n, 4.3))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, n, squeeze=False)[0]
    for ax, case in zip(axes, cases, strict=False):
        pred = segmenter.mask(case.pixels)
        rows, cols = case.pixels.shape
        scale = min(1.0, max_side / max(rows, cols))
        size = (max(1, round(rows * scale)), max(1, round(cols * scale)))

        def small(a: np.ndarray, size: tuple[int, int] = size) -> np.ndarray:
            t = torch.from_numpy(np.asarray(a, dtype=np.float32))[None, None]
            return F.interpolate(t, size=size, mode="area")[0, 0].numpy()

        background = small(case.pixels) if show_image else np.ones(size, dtype=np.float32)
        ax.imshow(background, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        ax.contour(small(case.mask), levels=[0.5], colors=["#2ecc71"], linewidths=1.6)
        ax.contour(small(pred), levels=[0.5], colors=["#e74c3c"], linewidths=1.2, linestyles="--")
        ax.set_xticks([])
        ax.set_yticks([])
        url = case.row.extra.get("original_url", "") or "ieee8023/covid-chestxray-dataset"
        ax.set_title(f"Dice {dice(pred, case.mask):.3f}", fontsize=10)
        ax.set_xlabel(
            f"{Path(case.row.extra.get('original_file', case.row.path.name)).name[:38]}\n"
            f"{case.row.extra.get('license', '')}; source: {url[:48]}\n"
            "via ieee8023/covid-chestxray-dataset",
            fontsize=6.5,
        )
    fig.suptitle(
        "Lung fields: reference (green, V7 Labs) vs predicted (red dashed)\n"
        "RESEARCH USE ONLY - NOT FOR DIAGNOSTIC USE",
        fontsize=10,
    )
    fig.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=100)
    return output
