"""t-SNE maps of a model's penultimate-layer embeddings.

:func:`embed_rows` reads labelled images with :func:`~dicom_covid.reader.read_image`, runs the
shared preprocessing and takes :func:`~dicom_covid.models.embed` (the features the classifier
head sees); the head applied to those features gives the class probabilities as well, so each
image goes through the network once. :func:`tsne_2d` projects the features to 2-D (scikit-learn
``TSNE``, PCA initialisation, seeded; features are first reduced to 50 dimensions with PCA), and
:func:`plot_tsne` draws two scatter plots side by side: coloured by true class and coloured by
source collection. A map in which sources form their own islands inside a class shows that the
model can tell the collections apart, a warning sign for shortcut learning.

RESEARCH USE ONLY: the figures describe a model, not patients.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import DataError, InputRejected
from ..inference import DISCLAIMER, Predictor
from ..models import GapClassifier, embed
from ..reader import read_image
from ..training.data import ManifestRow

__all__ = [
    "Embeddings",
    "classifier_head",
    "embed_rows",
    "plot_tsne",
    "run_tsne",
    "tsne_2d",
    "write_coordinates",
]

logger = logging.getLogger(__name__)

_CLASS_COLOURS = {"covid": "#c0392b", "normal": "#2471a3", "pneumonia": "#229954"}


@dataclass
class Embeddings:
    """Penultimate-layer features of labelled images.

    Attributes
    ----------
    rows : list of ManifestRow
        The images that were read, in order.
    features : numpy.ndarray
        ``float32 (N, D)``.
    probabilities : numpy.ndarray
        ``float32 (N, C)`` softmax outputs of the model, columns in ``labels`` order.
    labels : tuple of str
        The model's labels.
    rejected : list of dict
        ``path``, ``reason`` of the rows that could not be read.
    """

    rows: list[ManifestRow]
    features: np.ndarray
    probabilities: np.ndarray
    labels: tuple[str, ...]
    rejected: list[dict[str, str]] = field(default_factory=list)


def classifier_head(model: nn.Module) -> nn.Module:
    """The module that maps :func:`~dicom_covid.models.embed` features to logits.

    Parameters
    ----------
    model : torch.nn.Module
        A registry backbone (timm, torchvision ResNet/Inception or ``GapClassifier``).

    Returns
    -------
    torch.nn.Module
    """
    if isinstance(model, GapClassifier):
        return model.classifier
    if hasattr(model, "get_classifier"):  # timm
        return model.get_classifier()
    return model.fc  # torchvision ResNet / Inception-v3


def _relative(row: ManifestRow) -> str:
    return row.extra.get("path") or str(row.path)


@torch.no_grad()
def embed_rows(
    predictor: Predictor,
    rows: Sequence[ManifestRow],
    batch_size: int = 16,
    progress: bool = True,
) -> Embeddings:
    """Embed labelled images with a bundle model.

    Parameters
    ----------
    predictor : Predictor
        The model (its facts give the preprocessing).
    rows : sequence of ManifestRow
        Images to embed (e.g. a split of :func:`~dicom_covid.training.data.read_manifest`).
    batch_size : int
        Images per forward pass.
    progress : bool
        Show a progress bar.

    Returns
    -------
    Embeddings

    Raises
    ------
    DataError
        When no image can be read.
    """
    model = predictor.model.eval()
    head = classifier_head(model)
    kept: list[ManifestRow] = []
    rejected: list[dict[str, str]] = []
    feats: list[np.ndarray] = []
    probs: list[np.ndarray] = []
    batch: list[torch.Tensor] = []

    def flush() -> None:
        if batch:
            x = torch.cat(batch)
            f = embed(model, x).float()
            feats.append(f.cpu().numpy())
            probs.append(torch.softmax(head(f).float(), dim=1).cpu().numpy())
            batch.clear()

    for row in tqdm(
        rows, desc=f"embedding ({predictor.facts.name})", unit="img", disable=not progress
    ):
        try:
            image = read_image(row.path)
        except InputRejected as exc:
            logger.warning("%s rejected (%s)", _relative(row), exc.reason)
            rejected.append({"path": _relative(row), "reason": exc.reason})
            continue
        kept.append(row)
        batch.append(predictor.input_tensor(image))
        if len(batch) >= batch_size:
            flush()
    flush()
    if not kept:
        raise DataError(f"none of the {len(rows)} images could be read; nothing to embed.")
    return Embeddings(
        rows=kept,
        features=np.concatenate(feats).astype(np.float32),
        probabilities=np.concatenate(probs).astype(np.float32),
        labels=tuple(predictor.labels),
        rejected=rejected,
    )


def tsne_2d(
    features: np.ndarray, *, seed: int = 0, perplexity: float = 30.0, pca_dims: int = 50
) -> np.ndarray:
    """Project features to 2-D with t-SNE.

    Parameters
    ----------
    features : numpy.ndarray
        ``(N, D)``, N >= 5.
    seed : int
        Seed of the PCA and of t-SNE.
    perplexity : float
        t-SNE perplexity; lowered to ``(N - 1) / 3`` for small N (scikit-learn needs it below N).
    pca_dims : int
        Features are first reduced to this many PCA components when D and N are larger.

    Returns
    -------
    numpy.ndarray
        ``float32 (N, 2)``.

    Raises
    ------
    DataError
        With fewer than 5 images.
    """
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    x = np.asarray(features, dtype=np.float64)
    n = x.shape[0]
    if n < 5:
        raise DataError(f"t-SNE needs at least 5 images, got {n}; raise --max-per-class.")
    if x.shape[1] > pca_dims and n > pca_dims:
        x = PCA(n_components=pca_dims, random_state=seed).fit_transform(x)
    perp = float(min(perplexity, max(1.0, (n - 1) / 3.0)))
    if perp != perplexity:
        logger.info("t-SNE perplexity lowered to %.1f for %d images", perp, n)
    tsne = TSNE(
        n_components=2, perplexity=perp, init="pca", learning_rate="auto", random_state=seed
    )
    return tsne.fit_transform(x).astype(np.float32)


def plot_tsne(
    coords: np.ndarray,
    classes: Sequence[str],
    sources: Sequence[str],
    path: str | Path,
    title: str = "",
) -> Path:
    """Two scatter plots side by side: coloured by class (left) and by source (right).

    Parameters
    ----------
    coords : numpy.ndarray
        ``(N, 2)`` t-SNE coordinates.
    classes, sources : sequence of str
        True label and source collection of each point.
    path : path
        PNG to write.
    title : str
        Figure title (the research-use disclaimer is added below it).

    Returns
    -------
    pathlib.Path
    """
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    coords = np.asarray(coords)
    classes = np.asarray([str(c) for c in classes])
    sources = np.asarray([str(s) or "(none)" for s in sources])
    fig = Figure(figsize=(13, 6.2))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2)
    size = 14 if len(coords) > 300 else 30
    panels = [
        ("coloured by class", classes, _CLASS_COLOURS),
        ("coloured by source", sources, None),
    ]
    for ax, (name, values, colours) in zip(axes, panels, strict=True):
        groups = sorted(set(values.tolist()))
        # Sources get another palette than the classes, so that no colour means both.
        cmap = colormaps["Dark2"]
        for i, g in enumerate(groups):
            m = values == g
            colour = (colours or {}).get(g, cmap(i % cmap.N))
            ax.scatter(
                coords[m, 0],
                coords[m, 1],
                s=size,
                color=colour,
                alpha=0.75,
                linewidths=0,
                label=f"{g} ({int(m.sum())})",
            )
        ax.set_title(name)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.legend(loc="best", fontsize=8, markerscale=1.5, framealpha=0.8)
    fig.suptitle(f"{title}\n{DISCLAIMER}" if title else DISCLAIMER, fontsize=11)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    return out


def write_coordinates(path: str | Path, emb: Embeddings, coords: np.ndarray) -> Path:
    """Write one CSV row per image: path, label, source, prediction, probabilities, x, y.

    Parameters
    ----------
    path : path
        CSV to write.
    emb : Embeddings
        The embedded images.
    coords : numpy.ndarray
        ``(N, 2)`` t-SNE coordinates of ``emb``.

    Returns
    -------
    pathlib.Path
    """
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(
            ["path", "label", "source", "predicted"]
            + [f"p_{lab}" for lab in emb.labels]
            + ["tsne_x", "tsne_y", "disclaimer"]
        )
        for row, p, (x, y) in zip(emb.rows, emb.probabilities, coords, strict=True):
            writer.writerow(
                [_relative(row), row.label, row.source, emb.labels[int(np.argmax(p))]]
                + [f"{v:.6f}" for v in p]
                + [f"{x:.4f}", f"{y:.4f}", DISCLAIMER]
            )
    return out


def run_tsne(
    predictor: Predictor,
    rows: Sequence[ManifestRow],
    output_dir: str | Path,
    *,
    name: str | None = None,
    perplexity: float = 30.0,
    seed: int = 0,
    batch_size: int = 16,
    progress: bool = True,
) -> dict[str, Path]:
    """Embed ``rows``, project with t-SNE and write the figure and the coordinates.

    Parameters
    ----------
    predictor : Predictor
        The model.
    rows : sequence of ManifestRow
        Labelled images.
    output_dir : path
        Folder for ``<name>.png`` and ``<name>.csv``.
    name : str, optional
        File stem (default ``tsne_<model>``).
    perplexity, seed : see :func:`tsne_2d`.
    batch_size, progress : see :func:`embed_rows`.

    Returns
    -------
    dict of str to pathlib.Path
        ``png`` and ``csv``.
    """
    emb = embed_rows(predictor, rows, batch_size=batch_size, progress=progress)
    coords = tsne_2d(emb.features, seed=seed, perplexity=perplexity)
    stem = name or f"tsne_{predictor.facts.name}"
    out = Path(output_dir)
    title = (
        f"t-SNE of {predictor.facts.title} penultimate-layer embeddings "
        f"({len(emb.rows)} images, {emb.features.shape[1]}-d)"
    )
    files = {
        "png": plot_tsne(
            coords,
            [r.label for r in emb.rows],
            [r.source for r in emb.rows],
            out / f"{stem}.png",
            title,
        ),
        "csv": write_coordinates(out / f"{stem}.csv", emb, coords),
    }
    logger.info(
        "t-SNE of %d images (%d rejected) written to %s", len(emb.rows), len(emb.rejected), out
    )
    return files
