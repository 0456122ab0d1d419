"""Shortcut control: how well non-diagnostic image cues alone predict the label.

Public chest X-ray collections differ in image size, compression, exposure and borders, and the
labels are tied to the collection each image came from. A classifier can score well by learning
where an image came from rather than what its lungs look like. The shortcut control measures that
ceiling: a gradient-boosting model (:class:`sklearn.ensemble.HistGradientBoostingClassifier`)
trained on the development set's train split using only

* the stored image size: width, height, aspect ratio;
* global intensity statistics of the reader's ``[0, 1]`` pixels: mean, standard deviation,
  percentiles, the fraction of black and of white pixels, the number of distinct grey levels;
* border statistics: mean and standard deviation of the outer 5 % frame, each corner's mean and
  the mean of each side of the frame.

None of them looks at the lungs. Every evaluation report shows the control beside the model.

Features of the training split are cached (``.npz`` in the cache folder, keyed by the SHA-256 of
``manifest.csv`` and the feature version) so repeated evaluations only fit the small model.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits
from tqdm.auto import tqdm

from ..errors import DataError, InputRejected
from ..reader import XrayImage, read_image
from ..training.data import LABELS, ManifestRow, read_manifest

__all__ = [
    "FEATURE_NAMES",
    "ShortcutControl",
    "default_cache_dir",
    "extract_features",
    "fit_shortcut",
    "shortcut_features",
]

logger = logging.getLogger(__name__)

#: Bumped whenever :func:`shortcut_features` changes, so stale caches are not reused.
FEATURE_VERSION = 1
_PERCENTILES = (1, 5, 10, 25, 50, 75, 90, 95, 99)
#: Names of the columns returned by :func:`shortcut_features`, in order.
FEATURE_NAMES: tuple[str, ...] = (
    "width",
    "height",
    "aspect_ratio",
    "mean",
    "std",
    *(f"p{p:02d}" for p in _PERCENTILES),
    "fraction_black",
    "fraction_white",
    "grey_levels",
    "frame_mean",
    "frame_std",
    "corner_top_left",
    "corner_top_right",
    "corner_bottom_left",
    "corner_bottom_right",
    "side_top",
    "side_bottom",
    "side_left",
    "side_right",
)


def default_cache_dir() -> Path:
    """Default cache folder, ``~/.cache/dicom-covid``."""
    return Path.home() / ".cache" / "dicom-covid"


def shortcut_features(image: XrayImage | np.ndarray) -> np.ndarray:
    """Non-diagnostic features of one image (see :data:`FEATURE_NAMES`).

    Parameters
    ----------
    image : XrayImage or numpy.ndarray
        A reader image, or its ``(rows, columns)`` pixels in ``[0, 1]``.

    Returns
    -------
    numpy.ndarray
        ``float32`` vector of ``len(FEATURE_NAMES)`` values.
    """
    pixels = image.pixels if isinstance(image, XrayImage) else np.asarray(image)
    pixels = pixels.astype(np.float32, copy=False)
    rows, cols = pixels.shape
    flat = pixels.ravel()
    percentiles = np.percentile(flat, _PERCENTILES)
    # grey levels counted on a 1/1023 grid: separates 8-bit files from 10-16-bit ones
    levels = np.unique(np.round(flat * 1023.0).astype(np.int16)).size
    br = max(1, round(0.05 * rows))
    bc = max(1, round(0.05 * cols))
    frame_mask = np.zeros((rows, cols), dtype=bool)
    frame_mask[:br] = frame_mask[-br:] = True
    frame_mask[:, :bc] = frame_mask[:, -bc:] = True
    frame = pixels[frame_mask]
    values = [
        cols,
        rows,
        cols / rows,
        float(flat.mean()),
        float(flat.std()),
        *percentiles.tolist(),
        float((flat <= 1.0 / 255.0).mean()),
        float((flat >= 254.0 / 255.0).mean()),
        levels,
        float(frame.mean()),
        float(frame.std()),
        float(pixels[:br, :bc].mean()),
        float(pixels[:br, -bc:].mean()),
        float(pixels[-br:, :bc].mean()),
        float(pixels[-br:, -bc:].mean()),
        float(pixels[:br].mean()),
        float(pixels[-br:].mean()),
        float(pixels[:, :bc].mean()),
        float(pixels[:, -bc:].mean()),
    ]
    return np.asarray(values, dtype=np.float32)


def extract_features(
    rows: Sequence[ManifestRow], progress: bool = True, desc: str = "shortcut features"
) -> tuple[np.ndarray, np.ndarray, list[dict[str, str]]]:
    """Read each row's image and compute :func:`shortcut_features`.

    Parameters
    ----------
    rows : sequence of ManifestRow
    progress : bool
        Show a tqdm progress bar.
    desc : str
        Progress bar label.

    Returns
    -------
    features : numpy.ndarray
        ``(M, F)`` features of the images that were read.
    targets : numpy.ndarray
        ``(M,)`` label indices in :data:`~dicom_covid.training.data.LABELS` order.
    rejected : list of dict
        ``{"path", "reason", "message"}`` for each image the reader rejected (not fatal).
    """
    feats: list[np.ndarray] = []
    targets: list[int] = []
    rejected: list[dict[str, str]] = []
    for row in tqdm(rows, desc=desc, unit="img", disable=not progress, leave=False):
        try:
            image = read_image(row.path)
        except InputRejected as exc:
            rejected.append({"path": str(row.path), "reason": exc.reason, "message": exc.message})
            continue
        feats.append(shortcut_features(image))
        targets.append(row.label_index)
    features = np.stack(feats) if feats else np.zeros((0, len(FEATURE_NAMES)), np.float32)
    return features, np.asarray(targets, dtype=np.int64), rejected


@dataclass
class ShortcutControl:
    """A fitted shortcut model.

    Attributes
    ----------
    model : sklearn.ensemble.HistGradientBoostingClassifier
    feature_names : tuple of str
    n_train : int
        Training images (after any cap and rejections).
    manifest_sha256 : str
        Hash of the training manifest.
    train_paths : frozenset of str
        Resolved paths of the training images, to detect overlap with evaluated rows.
    seconds : dict of str to float
        ``{"features": ..., "fit": ...}`` wall time; ``features`` is ~0 on a cache hit.
    cache_hit : bool
        Whether the training features came from the cache.
    """

    model: object
    feature_names: tuple[str, ...] = FEATURE_NAMES
    n_train: int = 0
    manifest_sha256: str = ""
    train_paths: frozenset[str] = field(default_factory=frozenset)
    seconds: dict[str, float] = field(default_factory=dict)
    cache_hit: bool = False

    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        """Class probabilities ``(N, len(LABELS))`` in :data:`LABELS` order.

        Classes missing from the training data get probability 0.
        """
        features = np.asarray(features, dtype=np.float32)
        out = np.zeros((features.shape[0], len(LABELS)), dtype=np.float64)
        if features.shape[0]:
            with threadpool_limits(limits=1, user_api="openmp"):
                out[:, self.model.classes_] = self.model.predict_proba(features)
        return out

    def describe(self) -> dict[str, object]:
        """JSON-ready description (what the control is, how it was trained)."""
        return {
            "method": "HistGradientBoostingClassifier on non-diagnostic cues "
            "(image size, global intensity statistics, border statistics)",
            "features": list(self.feature_names),
            "n_train": self.n_train,
            "train_manifest_sha256": self.manifest_sha256,
            "features_cached": self.cache_hit,
            "seconds": {k: round(v, 2) for k, v in self.seconds.items()},
        }


def _cap_rows(rows: list[ManifestRow], max_rows: int, seed: int) -> list[ManifestRow]:
    """At most ``max_rows`` rows, sampled with ``seed`` keeping the label proportions."""
    if max_rows >= len(rows):
        return rows
    rng = np.random.default_rng(seed)
    labels = np.array([r.label for r in rows])
    keep: list[int] = []
    for label in LABELS:
        idx = np.flatnonzero(labels == label)
        n = round(max_rows * idx.size / len(rows))
        keep.extend(rng.choice(idx, size=min(idx.size, max(1, n)), replace=False).tolist())
    return [rows[i] for i in sorted(keep)]


def fit_shortcut(
    data_dir: str | Path,
    split: str = "train",
    *,
    max_rows: int | None = None,
    seed: int = 0,
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> ShortcutControl:
    """Fit the shortcut control on a data folder's training split.

    Parameters
    ----------
    data_dir : path
        The development set (folder with ``manifest.csv``).
    split : str
        Split to train on (default ``"train"``).
    max_rows : int, optional
        Cap on training images, sampled per label with ``seed`` (for tests).
    seed : int
        Seed of the row sample and of the gradient-boosting model.
    cache_dir : path, optional
        Where features are cached (default :func:`default_cache_dir`); caching is skipped when
        the folder cannot be written.
    progress : bool
        Show a progress bar while extracting features.

    Returns
    -------
    ShortcutControl

    Raises
    ------
    DataError
        When the manifest is unusable or no training image can be read.
    """
    from sklearn.ensemble import HistGradientBoostingClassifier

    data_dir = Path(data_dir)
    rows = read_manifest(data_dir, split)
    if max_rows:
        rows = _cap_rows(rows, max_rows, seed)
    manifest_hash = hashlib.sha256((data_dir / "manifest.csv").read_bytes()).hexdigest()
    subset = f"{max_rows}-{seed}" if max_rows else "all"
    key = f"{manifest_hash[:20]}-{split}-{subset}-v{FEATURE_VERSION}"
    cache_root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cache_file = cache_root / "shortcut" / f"features-{key}.npz"

    t0 = time.perf_counter()
    cache_hit = False
    features = targets = None
    if cache_file.is_file():
        try:
            with np.load(cache_file) as npz:
                features, targets = npz["features"], npz["targets"]
            cache_hit = features.shape[1] == len(FEATURE_NAMES)
        except (OSError, ValueError, KeyError) as exc:
            logger.warning("ignoring unreadable shortcut cache %s (%s)", cache_file, exc)
    if not cache_hit:
        features, targets, rejected = extract_features(
            rows, progress=progress, desc=f"shortcut features ({split} split)"
        )
        if rejected:
            logger.warning(
                "shortcut control: %d training images rejected by the reader", len(rejected)
            )
        try:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache_file.with_suffix(".tmp.npz")
            np.savez(tmp, features=features, targets=targets)
            tmp.replace(cache_file)
        except OSError as exc:
            logger.warning("cannot cache shortcut features in %s (%s)", cache_file.parent, exc)
    else:
        logger.info("shortcut control: features from cache %s", cache_file)
    t_features = time.perf_counter() - t0
    if features is None or features.shape[0] == 0:
        raise DataError(
            f"{data_dir}: no readable image in split {split!r} to fit the shortcut control."
        )

    t1 = time.perf_counter()
    model = HistGradientBoostingClassifier(max_iter=200, learning_rate=0.1, random_state=seed)
    # One OpenMP thread: on a small, busy machine the threads' spin-waits make the fit over ten
    # times slower (36 s instead of 2.5 s for the full train split on 2 shared cores).
    with threadpool_limits(limits=1, user_api="openmp"):
        model.fit(features, targets)
    t_fit = time.perf_counter() - t1
    logger.info(
        "shortcut control fitted on %d images (features %.1fs, fit %.1fs)",
        features.shape[0],
        t_features,
        t_fit,
    )
    return ShortcutControl(
        model=model,
        n_train=int(features.shape[0]),
        manifest_sha256=manifest_hash,
        train_paths=frozenset(str(r.path.resolve()) for r in rows),
        seconds={"features": t_features, "fit": t_fit},
        cache_hit=cache_hit,
    )
