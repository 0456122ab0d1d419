"""Manifest-driven data sets for training and evaluation.

A data folder holds ``manifest.csv`` with at least the columns ``path`` (relative to the folder)
and ``label`` (``covid``, ``normal`` or ``pneumonia``); ``split`` (train/val/test, patient-level),
``source``, ``width`` and ``height`` are used when present.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from ..errors import DataError, InputRejected
from ..reader import read_image
from ..transforms import ChestAugment, RepeatNormalize, ResizeSquare

__all__ = [
    "LABELS",
    "CachedImageDataset",
    "ManifestRow",
    "balanced_weights",
    "read_manifest",
    "subsample",
]

logger = logging.getLogger(__name__)

#: Class order used by every model of the project (also declared in the bundle's channel_def).
LABELS: tuple[str, ...] = ("covid", "normal", "pneumonia")


@dataclass(frozen=True)
class ManifestRow:
    """One labelled image of a manifest."""

    path: Path
    label: str
    split: str = ""
    source: str = ""
    extra: dict[str, str] = field(default_factory=dict, compare=False, hash=False)

    @property
    def label_index(self) -> int:
        """Index of :attr:`label` in :data:`LABELS`."""
        return LABELS.index(self.label)


def read_manifest(
    data_dir: str | Path, split: str | None = None, labels: Sequence[str] = LABELS
) -> list[ManifestRow]:
    """Read ``manifest.csv`` of a data folder.

    Parameters
    ----------
    data_dir : path
        Folder holding ``manifest.csv``; image paths are relative to it.
    split : str, optional
        Keep rows whose ``split`` column equals this; all rows when None or when the manifest has
        no ``split`` column.
    labels : sequence of str
        Accepted labels.

    Returns
    -------
    list of ManifestRow

    Raises
    ------
    DataError
        Missing folder/manifest/columns, unknown labels, or an empty selection.
    """
    data_dir = Path(data_dir)
    manifest = data_dir / "manifest.csv"
    if not manifest.is_file():
        raise DataError(
            f"{manifest}: not found. Point --data (or $DICOM_COVID_DATA) at a folder with a "
            "manifest.csv whose columns include 'path' and 'label'."
        )
    with manifest.open(newline="") as fh:
        reader = csv.DictReader(fh)
        columns = set(reader.fieldnames or ())
        if not {"path", "label"} <= columns:
            raise DataError(
                f"{manifest}: columns are {sorted(columns)}; 'path' and 'label' are required."
            )
        rows = []
        for line, rec in enumerate(reader, start=2):
            label = rec["label"].strip().lower()
            if label not in labels:
                raise DataError(
                    f"{manifest}:{line}: label {rec['label']!r} is not one of {list(labels)}."
                )
            if split and "split" in columns and rec.get("split") != split:
                continue
            rows.append(
                ManifestRow(
                    path=data_dir / rec["path"],
                    label=label,
                    split=rec.get("split", "") or "",
                    source=rec.get("source", "") or "",
                    extra=dict(rec),
                )
            )
    if not rows:
        raise DataError(f"{manifest}: no rows for split {split!r}.")
    return rows


class CachedImageDataset(Dataset):
    """Images read once with the project reader, resized to the network input, kept in memory.

    The cache holds ``(1, S, S)`` float16 tensors after
    :class:`~dicom_covid.transforms.ResizeSquare`
    (the shared preprocessing path); augmentation (training) and normalisation are applied per
    item.

    Parameters
    ----------
    rows : sequence of ManifestRow
    size : int
        Network input side.
    mean, std : sequence of float
        Normalisation.
    augment : ChestAugment, optional
        Training augmentation.
    progress : bool
        Show a progress bar while caching.
    """

    def __init__(
        self,
        rows: Sequence[ManifestRow],
        size: int,
        mean: Sequence[float],
        std: Sequence[float],
        augment: ChestAugment | None = None,
        progress: bool = True,
        prepare: Callable[[np.ndarray], torch.Tensor] | None = None,
        cache_dir: str | Path | None = None,
        cache_key: str = "",
    ) -> None:
        self.rows = list(rows)
        self.size = size
        self.augment = augment
        self.normalize = RepeatNormalize(mean, std)
        prepare = prepare or ResizeSquare(size)
        self.images = torch.empty((len(self.rows), 1, size, size), dtype=torch.float16)
        self.targets = torch.tensor([r.label_index for r in self.rows], dtype=torch.long)
        cache: dict[str, torch.Tensor] = {}
        cache_file = None
        if cache_dir is not None:
            # Prepared images (uint8) shared by runs with the same pipeline; never committed.
            digest = hashlib.sha1(f"{cache_key}|{size}".encode()).hexdigest()[:16]
            cache_file = Path(cache_dir) / f"prepared-{digest}.pt"
            if cache_file.is_file():
                cache = torch.load(cache_file, weights_only=True)
        added = 0
        for i, row in enumerate(
            tqdm(
                self.rows,
                desc=f"reading images ({size}px)",
                disable=not progress,
                unit="img",
                leave=False,
            )
        ):
            key = str(row.path)
            if key in cache:
                self.images[i] = cache[key].float().div_(255.0).half()
                continue
            try:
                img = read_image(row.path)
            except InputRejected as exc:
                raise DataError(f"{row.path}: {exc.message}") from exc
            prepared = prepare(img.pixels)
            self.images[i] = prepared.half()
            if cache_file is not None:
                cache[key] = (prepared * 255.0 + 0.5).clamp(0, 255).to(torch.uint8)
                added += 1
        if cache_file is not None and added:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache_file.with_suffix(f".{os.getpid()}.tmp")
            torch.save(cache, tmp)
            os.replace(tmp, cache_file)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        img = self.images[index].float()
        if self.augment is not None:
            img = self.augment(img)
        return self.normalize(img), int(self.targets[index])

    def class_counts(self) -> np.ndarray:
        """Number of items per class, in :data:`LABELS` order."""
        return np.bincount(self.targets.numpy(), minlength=len(LABELS))


def subsample(
    rows: Sequence[ManifestRow], max_per_class: int | None, seed: int
) -> list[ManifestRow]:
    """Keep at most ``max_per_class`` rows per label, stratified by source, chosen with ``seed``."""
    if not max_per_class:
        return list(rows)
    rng = np.random.default_rng(seed)
    out: list[ManifestRow] = []
    for label in LABELS:
        items = [r for r in rows if r.label == label]
        if len(items) <= max_per_class:
            out.extend(items)
            continue
        idx = rng.choice(len(items), size=max_per_class, replace=False)
        out.extend(items[i] for i in sorted(idx))
    return out


def balanced_weights(rows: Sequence[ManifestRow], power: float = 0.5) -> np.ndarray:
    """Sampling weights that balance classes exactly and sources within a class partly.

    A row of source ``s`` and label ``l`` gets ``n(s, l) ** -power``, rescaled so that every
    label carries the same total weight. ``power = 1`` gives each source of a label an equal
    share; ``0.5`` (default) keeps large sources larger without letting them dominate.

    Parameters
    ----------
    rows : sequence of ManifestRow
    power : float

    Returns
    -------
    numpy.ndarray
        One non-negative weight per row, summing to 1.
    """
    counts = Counter((r.source, r.label) for r in rows)
    w = np.array([counts[(r.source, r.label)] ** -power for r in rows], dtype=np.float64)
    labels = np.array([r.label for r in rows])
    present = [lab for lab in LABELS if (labels == lab).any()]
    for lab in present:
        sel = labels == lab
        w[sel] /= w[sel].sum() * len(present)
    return w


def spec_key(spec: object) -> str:
    """Stable text of a preprocessing spec, for cache keys."""
    return json.dumps(spec, sort_keys=True)
