"""Lung-field segmentation and the "share of Grad-CAM heat inside the lung fields" indicator.

A model that classifies chest X-rays should look at the lungs. Where its Grad-CAM heat sits
outside them (burned-in labels, borders, collimation, text, the shoulders of a child), it is
probably using a shortcut. This module gives

* :class:`LungSegmenter`: a small MONAI ``UNet`` (2-D, one input channel) that outlines both lung
  fields of a frontal radiograph, loaded from the bundle (``models/lung_unet.safetensors`` and
  ``models/lung_unet.json``, registered under ``dicom_covid.lung_segmenter`` in
  ``configs/metadata.json``). The network's arguments, its input size, normalisation and the
  post-processing (threshold, connected components, hole filling) come from the facts JSON,
  not from code.
* :func:`heat_share` and :func:`top_heat_share`: how much of a heat map lies inside a mask.
* :class:`ReferenceMasks`: the lung masks shipped with the ``torchxrayvision`` wheel (V7 Labs
  annotations of ieee8023 images) matched to the development set, used to train the segmenter
  and to measure it (Dice).
* :func:`train_segmenter`, :func:`evaluate_segmenter`, :func:`install_segmenter` and
  :func:`heat_share_study` (the per-model report of ``dicom-covid lungs heat-share``).

Segmentation pipeline (every number from the facts JSON)::

    XrayImage.pixels (H, W) in [0, 1]
      -> ResizeSquare(input_size)          antialiased, aspect ratio not kept (as the classifiers)
      -> per-image z-score                 (x - mean(x)) / std(x)
      -> UNet -> sigmoid                   P(lung) at input_size x input_size
      -> bilinear resize to (H, W)
      -> P >= threshold
      -> keep the `keep_components` largest 8-connected components, dropping any smaller than
         `min_component_fraction` of the largest
      -> fill holes

Heat share definition: ``sum(heat * mask) / sum(heat)`` over the source-resolution Grad-CAM map
(values in ``[0, 1]``). A heat map spread evenly over the image gives the lung area fraction;
1.0 means all heat inside the lungs. RESEARCH USE ONLY.
"""

from __future__ import annotations

import importlib.util
import io
import json
import logging
import math
import time
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .bundle import Bundle
from .errors import BundleError, DataError
from .transforms import ResizeSquare

if TYPE_CHECKING:
    from .reader import XrayImage
    from .training.data import ManifestRow

__all__ = [
    "MASKS_INSTALL_HINT",
    "LungSegmenter",
    "ReferenceMasks",
    "build_unet",
    "contour_figure",
    "dice",
    "evaluate_segmenter",
    "find_mask_archive",
    "heat_share",
    "heat_share_study",
    "install_segmenter",
    "postprocess",
    "reference_cases",
    "top_heat_share",
    "train_segmenter",
    "write_heat_share_report",
]

logger = logging.getLogger(__name__)

#: Path of the mask archive inside the torchxrayvision package / wheel.
_ARCHIVE_IN_PACKAGE = "data/semantic_masks_v7labs_lungs.zip"
_ARCHIVE_IN_WHEEL = "torchxrayvision/" + _ARCHIVE_IN_PACKAGE

#: How to get the reference masks (appears in every error about them).
MASKS_INSTALL_HINT = (
    "The reference lung masks ship with the torchxrayvision wheel: run "
    "`pip install --no-deps torchxrayvision==1.5.7` (only its data file is used, the package is "
    "never imported), or pass --masks pointing at semantic_masks_v7labs_lungs.zip or at a "
    "downloaded torchxrayvision-1.5.7 wheel (`pip download torchxrayvision==1.5.7 --no-deps`)."
)

#: Network of the shipped segmenter (written into the facts JSON; read back from there).
DEFAULT_ARCHITECTURE: dict[str, Any] = {
    "class": "monai.networks.nets.UNet",
    "args": {
        "spatial_dims": 2,
        "in_channels": 1,
        "out_channels": 1,
        "channels": [8, 16, 32, 64, 128],
        "strides": [2, 2, 2, 2],
        "num_res_units": 1,
        "norm": "batch",
    },
}


# --------------------------------------------------------------------------------------------
# heat share
# --------------------------------------------------------------------------------------------


def _check_pair(heat: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    h = np.asarray(heat, dtype=np.float64)
    m = np.asarray(mask)
    if h.ndim != 2 or h.shape != m.shape:
        raise ValueError(
            f"heat map {h.shape} and mask {m.shape} must be 2-D arrays of the same shape "
            "(resize the heat map to the image, e.g. Explainer.heatmap)"
        )
    if not np.all(np.isfinite(h)):
        raise ValueError("heat map holds NaN or infinite values")
    if h.size and float(h.min()) < 0.0:
        raise ValueError(f"heat map has negative values (min {float(h.min()):.3g}); expected >= 0")
    return h, m.astype(bool)


def heat_share(heat: np.ndarray, mask: np.ndarray) -> float:
    """Share of the total heat that lies inside a mask: ``sum(heat[mask]) / sum(heat)``.

    Parameters
    ----------
    heat : numpy.ndarray
        ``(H, W)`` non-negative heat map (e.g. :meth:`dicom_covid.explain.Explainer.heatmap`).
    mask : numpy.ndarray
        ``(H, W)`` boolean mask (e.g. :meth:`LungSegmenter.mask`).

    Returns
    -------
    float
        In ``[0, 1]``; ``nan`` when the heat map is all zero (nothing to share).

    Raises
    ------
    ValueError
        Shapes differ, not 2-D, negative or non-finite heat.

    Notes
    -----
    A heat map that is uniform over the image gives the mask's area fraction, so compare the
    share with the lung area fraction of the same image.
    """
    h, m = _check_pair(heat, mask)
    total = float(h.sum())
    if total <= 0.0:
        return float("nan")
    return float(h[m].sum() / total)


def top_heat_share(heat: np.ndarray, mask: np.ndarray, top: float = 0.1) -> float:
    """Share of the hottest ``top`` fraction of pixels that lies inside a mask.

    The hottest pixels are those with heat at or above the ``1 - top`` quantile; ties at the
    threshold are all counted. Less sensitive than :func:`heat_share` to a faint glow spread
    over the whole image.

    Parameters
    ----------
    heat, mask : numpy.ndarray
        As in :func:`heat_share`.
    top : float
        Fraction of pixels called hot, in ``(0, 1]``.

    Returns
    -------
    float
        In ``[0, 1]``; ``nan`` when the heat map is all zero.
    """
    if not 0.0 < top <= 1.0:
        raise ValueError(f"top must be in (0, 1], got {top}")
    h, m = _check_pair(heat, mask)
    if float(h.max(initial=0.0)) <= 0.0:
        return float("nan")
    cut = float(np.quantile(h, 1.0 - top))
    hot = h >= cut if cut > 0.0 else h > 0.0
    return float(m[hot].mean())


def dice(pred: np.ndarray, ref: np.ndarray) -> float:
    """Dice coefficient ``2 |A & B| / (|A| + |B|)`` of two boolean masks (1.0 when both empty)."""
    a = np.asarray(pred, dtype=bool)
    b = np.asarray(ref, dtype=bool)
    if a.shape != b.shape:
        raise ValueError(f"masks differ in shape: {a.shape} vs {b.shape}")
    denom = int(a.sum()) + int(b.sum())
    return 1.0 if denom == 0 else float(2.0 * np.logical_and(a, b).sum() / denom)


# --------------------------------------------------------------------------------------------
# reference masks (torchxrayvision wheel)
# --------------------------------------------------------------------------------------------


def find_mask_archive(path: str | Path | None = None) -> Path:
    """Locate the lung-mask archive.

    Parameters
    ----------
    path : path, optional
        ``semantic_masks_v7labs_lungs.zip``, or a ``torchxrayvision-*.whl`` holding it. When
        None, the file inside an installed ``torchxrayvision`` package is used (found without
        importing the package).

    Returns
    -------
    pathlib.Path

    Raises
    ------
    DataError
        When the archive cannot be found; the message says how to install it.
    """
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise DataError(f"{p}: lung-mask archive not found. {MASKS_INSTALL_HINT}")
        return p
    spec = importlib.util.find_spec("torchxrayvision")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(folder) / _ARCHIVE_IN_PACKAGE
        if candidate.is_file():
            return candidate
    raise DataError(f"reference lung masks not found. {MASKS_INSTALL_HINT}")


class ReferenceMasks:
    """The V7 Labs lung masks of the torchxrayvision wheel, looked up by image file stem.

    Parameters
    ----------
    path : path, optional
        See :func:`find_mask_archive`.

    Notes
    -----
    Masks are 8-bit images at the original image resolution, 255 inside the lungs; a few have
    JPEG ringing, so a pixel counts as lung when its value is at least 128. :meth:`for_row`
    resizes a mask to the stored image size (area averaging, then >= 0.5).
    """

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = find_mask_archive(path)
        try:
            outer = zipfile.ZipFile(self.path)
            if _ARCHIVE_IN_WHEEL in outer.namelist():  # a wheel: the archive is inside
                self._zip = zipfile.ZipFile(io.BytesIO(outer.read(_ARCHIVE_IN_WHEEL)))
            else:
                self._zip = outer
        except (zipfile.BadZipFile, OSError) as exc:
            raise DataError(
                f"{self.path}: not a readable zip ({exc}). {MASKS_INSTALL_HINT}"
            ) from exc
        self._by_stem: dict[str, str] = {}
        for name in self._zip.namelist():
            if name.endswith("/"):
                continue
            stem = Path(name).stem
            self._by_stem.setdefault(stem, name)
        if not self._by_stem:
            raise DataError(f"{self.path}: holds no masks. {MASKS_INSTALL_HINT}")

    def __len__(self) -> int:
        return len(self._by_stem)

    @staticmethod
    def stem_of(row: ManifestRow) -> str:
        """File stem of a manifest row's ``original_file`` (empty when the column is absent)."""
        original = row.extra.get("original_file", "") or ""
        return Path(original.replace("\\", "/")).stem if original else ""

    def has(self, row: ManifestRow) -> bool:
        """Whether a mask exists for this row (ieee8023 images only)."""
        return row.source == "ieee8023" and self.stem_of(row) in self._by_stem

    def original(self, stem: str) -> np.ndarray:
        """The mask at its original resolution, boolean ``(H, W)``."""
        from PIL import Image

        with Image.open(io.BytesIO(self._zip.read(self._by_stem[stem]))) as im:
            return np.asarray(im.convert("L")) >= 128

    def for_row(self, row: ManifestRow, shape: tuple[int, int] | None = None) -> np.ndarray:
        """Mask of a manifest row, resized to ``shape`` (default: the row's ``height, width``).

        Raises
        ------
        DataError
            No mask for the row, or its aspect ratio does not match the stored image.
        """
        stem = self.stem_of(row)
        if stem not in self._by_stem:
            raise DataError(f"{row.path.name}: no reference lung mask (stem {stem!r}).")
        if shape is None:
            shape = (int(row.extra["height"]), int(row.extra["width"]))
        big = self.original(stem)
        rows, cols = shape
        if abs((big.shape[1] / big.shape[0]) / (cols / rows) - 1.0) > 0.03:
            raise DataError(
                f"{row.path.name}: reference mask {big.shape[1]}x{big.shape[0]} does not match "
                f"the stored image {cols}x{rows} (aspect ratio); is the manifest current?"
            )
        t = torch.from_numpy(big.astype(np.float32))[None, None]
        small = F.interpolate(t, size=(rows, cols), mode="area")[0, 0]
        return (small >= 0.5).numpy()


@dataclass(frozen=True)
class LungCase:
    """An image of the development set with its reference lung mask at the stored size."""

    row: ManifestRow
    pixels: np.ndarray
    mask: np.ndarray


def reference_cases(
    data_dir: str | Path,
    split: str,
    masks: ReferenceMasks | str | Path | None = None,
    limit: int | None = None,
) -> list[LungCase]:
    """Images of ``split`` that have a reference lung mask, with their masks.

    Parameters
    ----------
    data_dir : path
        Data folder with ``manifest.csv`` (columns ``original_file``, ``width``, ``height``).
    split : str
        ``train``, ``val`` or ``test``.
    masks : ReferenceMasks or path, optional
        Mask source (default: the installed torchxrayvision package).
    limit : int, optional
        Keep the first ``limit`` cases (sorted by path), for quick checks.

    Returns
    -------
    list of LungCase
        Sorted by image path.

    Raises
    ------
    DataError
        No masks installed, or no image of the split has one.
    """
    from .reader import read_image
    from .training.data import read_manifest

    ref = masks if isinstance(masks, ReferenceMasks) else ReferenceMasks(masks)
    rows = sorted(
        (r for r in read_manifest(data_dir, split) if ref.has(r)), key=lambda r: str(r.path)
    )
    if not rows:
        raise DataError(
            f"no image of split {split!r} in {data_dir} has a reference lung mask in "
            f"{ref.path} (masks exist for ieee8023 images, matched on original_file)."
        )
    cases = []
    for row in rows[:limit] if limit else rows:
        pixels = read_image(row.path).pixels
        cases.append(LungCase(row, pixels, ref.for_row(row, pixels.shape)))
    return cases


# --------------------------------------------------------------------------------------------
# network, post-processing, segmenter
# --------------------------------------------------------------------------------------------


def build_unet(architecture: dict[str, Any]) -> nn.Module:
    """Build the network described by ``architecture`` (``{"class": ..., "args": {...}}``).

    Only ``monai.networks.nets.UNet`` is accepted, so a facts file cannot instantiate arbitrary
    classes.

    Raises
    ------
    BundleError
        Unknown class or bad arguments.
    """
    from monai.networks.nets import UNet

    cls = architecture.get("class")
    if cls not in {"monai.networks.nets.UNet", "UNet"}:
        raise BundleError(
            f"lung segmenter architecture {cls!r} is not supported; the facts JSON must name "
            "monai.networks.nets.UNet."
        )
    args = dict(architecture.get("args", {}))
    for key in ("channels", "strides"):
        if key in args:
            args[key] = tuple(args[key])
    try:
        return UNet(**args)
    except (TypeError, ValueError) as exc:
        raise BundleError(f"lung segmenter architecture args {args} are invalid ({exc}).") from exc


def _zscore(x: torch.Tensor) -> torch.Tensor:
    """Per-image z-score of a ``(N, 1, S, S)`` batch."""
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    std = x.std(dim=(1, 2, 3), keepdim=True).clamp_min(1e-3)
    return (x - mean) / std


def postprocess(
    prob: np.ndarray,
    threshold: float = 0.5,
    keep_components: int = 2,
    min_component_fraction: float = 0.05,
    fill_holes: bool = True,
) -> np.ndarray:
    """Turn a lung probability map into a clean mask.

    Parameters
    ----------
    prob : numpy.ndarray
        ``(H, W)`` probabilities.
    threshold : float
        ``prob >= threshold`` is lung.
    keep_components : int
        Keep this many largest 8-connected components (2: the two lungs).
    min_component_fraction : float
        Drop a kept component smaller than this fraction of the largest one.
    fill_holes : bool
        Fill holes inside the kept components.

    Returns
    -------
    numpy.ndarray
        Boolean ``(H, W)``; empty when nothing reaches the threshold.
    """
    from scipy import ndimage

    mask = np.asarray(prob) >= threshold
    labels, count = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
    if count == 0:
        return mask
    sizes = np.bincount(labels.ravel())[1:]
    order = np.argsort(sizes)[::-1][: max(1, int(keep_components))]
    keep = [i + 1 for i in order if sizes[i] >= min_component_fraction * sizes[order[0]]]
    out = np.isin(labels, keep)
    if fill_holes:
        out = ndimage.binary_fill_holes(out)
    return out


def _segmenter_entry(bundle: Bundle) -> tuple[Path, Path]:
    entry = bundle.metadata.get("dicom_covid", {}).get("lung_segmenter")
    meta = bundle.root / "configs" / "metadata.json"
    if not isinstance(entry, dict) or "weights" not in entry or "facts" not in entry:
        raise BundleError(
            f"{meta}: no 'dicom_covid.lung_segmenter' entry; train and install one with "
            "`dicom-covid lungs train --install` or pass a bundle that has one."
        )
    weights, facts = bundle.root / entry["weights"], bundle.root / entry["facts"]
    if not weights.is_file() or not facts.is_file():
        raise BundleError(
            f"lung segmenter files {weights.name} / {facts.name} are missing from "
            f"{bundle.root / 'models'}; run `dicom-covid lungs train --install`."
        )
    return weights, facts


class LungSegmenter:
    """The bundle's lung-field U-Net, ready to outline lungs at the source resolution.

    Parameters
    ----------
    bundle : Bundle or path, optional
        Bundle holding the segmenter (default: the project's ``monai_bundle/``).
    device : str
        Torch device.

    Attributes
    ----------
    facts : dict
        The facts JSON (architecture, input size, post-processing, Dice results).

    Raises
    ------
    BundleError
        No segmenter registered, files missing, or the facts do not describe the weights.
    """

    def __init__(self, bundle: Bundle | str | Path | None = None, device: str = "cpu") -> None:
        self.bundle = bundle if isinstance(bundle, Bundle) else Bundle(bundle)
        weights, facts_path = _segmenter_entry(self.bundle)
        try:
            self.facts: dict[str, Any] = json.loads(facts_path.read_text())
            self.input_size = int(self.facts["input_size"])
            post = self.facts["postprocessing"]
            self.threshold = float(post["threshold"])
            self.keep_components = int(post["keep_components"])
            self.min_component_fraction = float(post["min_component_fraction"])
            self.fill_holes = bool(post["fill_holes"])
            arch = self.facts["architecture"]
        except (KeyError, TypeError, ValueError, json.JSONDecodeError) as exc:
            raise BundleError(f"{facts_path}: malformed lung segmenter facts ({exc}).") from exc
        if self.facts.get("normalisation", "per_image_zscore") != "per_image_zscore":
            raise BundleError(
                f"{facts_path}: normalisation {self.facts['normalisation']!r} is unknown; "
                "this version supports per_image_zscore."
            )
        from .models import load_checkpoint_weights

        net = build_unet(arch)
        try:
            net.load_state_dict(load_checkpoint_weights(weights))
        except RuntimeError as exc:
            raise BundleError(
                f"{weights}: weights do not fit the architecture in {facts_path.name} ({exc})."
            ) from exc
        self.device = torch.device(device)
        self.model = net.eval().to(self.device)
        self.weights = weights

    @torch.no_grad()
    def probability(self, pixels: np.ndarray) -> np.ndarray:
        """P(lung) at the network resolution, ``float32 (S, S)``, for ``(H, W)`` pixels."""
        x = ResizeSquare(self.input_size)(pixels)[None].to(self.device)
        return torch.sigmoid(self.model(_zscore(x)))[0, 0].float().cpu().numpy()

    def lung_fraction(self, image: XrayImage | np.ndarray) -> float:
        """Share of the image covered by the (post-processed) lung fields, at network size.

        Cheap (no resize to the source resolution): used by the abstention check
        ``no_lung_fields`` and by the lung-crop preprocessing.
        """
        pixels = np.asarray(getattr(image, "pixels", image), dtype=np.float32)
        mask = postprocess(
            self.probability(pixels),
            self.threshold,
            self.keep_components,
            self.min_component_fraction,
            self.fill_holes,
        )
        return float(mask.mean())

    @torch.no_grad()
    def mask(self, image: XrayImage | np.ndarray) -> np.ndarray:
        """Lung-field mask at the source resolution.

        Parameters
        ----------
        image : XrayImage or numpy.ndarray
            The radiograph, or its ``(H, W)`` pixels in ``[0, 1]``.

        Returns
        -------
        numpy.ndarray
            Boolean array of the image's shape.

        Raises
        ------
        ValueError
            When the pixels are not a 2-D array.
        """
        pixels = np.asarray(getattr(image, "pixels", image), dtype=np.float32)
        if pixels.ndim != 2 or min(pixels.shape) < 2:
            raise ValueError(f"expected a 2-D grayscale image, got shape {pixels.shape}")
        prob = torch.from_numpy(self.probability(pixels))[None, None]
        big = F.interpolate(prob, size=pixels.shape, mode="bilinear", align_corners=False)
        return postprocess(
            big[0, 0].numpy(),
            self.threshold,
            self.keep_components,
            self.min_component_fraction,
            self.fill_holes,
        )


# --------------------------------------------------------------------------------------------
# training, evaluation, installation
# --------------------------------------------------------------------------------------------


def _summary(values: Sequence[float]) -> dict[str, float | int]:
    v = np.asarray([x for x in values if not math.isnan(x)], dtype=np.float64)
    if v.size == 0:
        return {"n": 0}
    q1, med, q3 = np.quantile(v, [0.25, 0.5, 0.75])
    return {
        "n": int(v.size),
        "mean": float(v.mean()),
        "median": float(med),
        "min": float(v.min()),
        "max": float(v.max()),
        "q1": float(q1),
        "q3": float(q3),
    }


def _dice_of(
    predict_mask: Callable[[np.ndarray], np.ndarray], cases: Sequence[LungCase]
) -> list[dict[str, Any]]:
    out = []
    for c in cases:
        out.append(
            {
                "path": str(Path(c.row.extra.get("path", c.row.path.name))),
                "license": c.row.extra.get("license", ""),
                "dice": dice(predict_mask(c.pixels), c.mask),
            }
        )
    return out


def evaluate_segmenter(
    segmenter: LungSegmenter,
    data_dir: str | Path,
    split: str = "test",
    masks: ReferenceMasks | str | Path | None = None,
    limit: int | None = None,
) -> dict[str, Any]:
    """Dice of the segmenter against the reference masks of a split, at the stored image size.

    Returns
    -------
    dict
        ``split``, ``summary`` (n, mean, median, min, max, q1, q3) and ``per_image``
        (``path``, ``license``, ``dice``).
    """
    cases = reference_cases(data_dir, split, masks, limit)
    per_image = _dice_of(segmenter.mask, cases)
    return {
        "split": split,
        "summary": _summary([p["dice"] for p in per_image]),
        "per_image": per_image,
    }


def _stack(cases: Sequence[LungCase], size: int) -> tuple[torch.Tensor, torch.Tensor]:
    resize = ResizeSquare(size)
    images = torch.stack([resize(c.pixels) for c in cases])
    masks = torch.stack(
        [
            (
                F.interpolate(
                    torch.from_numpy(c.mask.astype(np.float32))[None, None],
                    (size, size),
                    mode="area",
                )[0]
                >= 0.5
            ).float()
            for c in cases
        ]
    )
    return images, masks


def _augmenter(size: int, seed: int) -> Callable[[dict], dict]:
    from monai.transforms import (
        Compose,
        RandAdjustContrastd,
        RandAffined,
        RandGaussianNoised,
        RandGaussianSmoothd,
        RandScaleIntensityd,
        RandShiftIntensityd,
    )

    aug = Compose(
        [
            RandAffined(
                keys=("image", "mask"),
                prob=0.9,
                rotate_range=math.radians(12),
                scale_range=(0.15, 0.15),
                translate_range=(0.08 * size, 0.08 * size),
                shear_range=(0.05, 0.05),
                mode=("bilinear", "nearest"),
                padding_mode="zeros",
            ),
            RandAdjustContrastd(keys="image", prob=0.5, gamma=(0.6, 1.6)),
            RandScaleIntensityd(keys="image", prob=0.5, factors=0.2),
            RandShiftIntensityd(keys="image", prob=0.5, offsets=0.1),
            RandGaussianSmoothd(keys="image", prob=0.2, sigma_x=(0.3, 1.0), sigma_y=(0.3, 1.0)),
            RandGaussianNoised(keys="image", prob=0.3, std=0.03),
        ]
    )
    aug.set_random_state(seed=seed)
    return aug


#: Augmentation written into the facts JSON (kept in step with :func:`_augmenter`).
_AUGMENTATION_TEXT = (
    "MONAI RandAffined p=0.9 (rotation +-12 deg, scale +-15 %, shift +-8 %, shear 0.05; mask "
    "nearest), RandAdjustContrastd p=0.5 gamma 0.6-1.6, RandScaleIntensityd p=0.5 +-20 %, "
    "RandShiftIntensityd p=0.5 +-0.1, RandGaussianSmoothd p=0.2 sigma 0.3-1, "
    "RandGaussianNoised p=0.3 std 0.03; no flips (the heart side is kept)"
)


def _predict_masks_fn(
    net: nn.Module, size: int, post: dict[str, Any]
) -> Callable[[np.ndarray], np.ndarray]:
    """A mask function with the same steps as :meth:`LungSegmenter.mask` for a bare network."""

    @torch.no_grad()
    def fn(pixels: np.ndarray) -> np.ndarray:
        x = ResizeSquare(size)(pixels)[None]
        prob = torch.sigmoid(net(_zscore(x)))
        big = F.interpolate(prob, size=pixels.shape, mode="bilinear", align_corners=False)
        return postprocess(big[0, 0].numpy(), **post)

    return fn


def train_segmenter(
    data_dir: str | Path,
    output_dir: str | Path,
    masks: ReferenceMasks | str | Path | None = None,
    epochs: int = 30,
    input_size: int = 128,
    batch_size: int = 4,
    lr: float = 3e-3,
    seed: int = 0,
    architecture: dict[str, Any] | None = None,
    resume: bool = False,
    progress: bool = True,
    limit: int | None = None,
) -> Path:
    """Train the lung-field U-Net on the train masks, select on val, measure Dice on test.

    Writes into ``output_dir``: ``checkpoint.pt`` (after every epoch, for ``resume``),
    ``lung_unet.safetensors`` (fp16, best validation epoch) and ``lung_unet.json`` (facts:
    architecture, input size, post-processing, training data, Dice on val and test, date).

    Parameters
    ----------
    data_dir : path
        Development set folder (manifest with ``original_file``, ``width``, ``height``).
    output_dir : path
        Run folder.
    masks : ReferenceMasks or path, optional
        Mask source (see :func:`find_mask_archive`).
    epochs, input_size, batch_size, lr, seed
        Training settings (AdamW, cosine learning-rate decay, Dice + BCE loss).
    architecture : dict, optional
        ``{"class": "monai.networks.nets.UNet", "args": {...}}``; default
        :data:`DEFAULT_ARCHITECTURE`.
    resume : bool
        Continue from ``output_dir/checkpoint.pt`` when present.
    progress : bool
        Show tqdm progress bars.
    limit : int, optional
        Use at most this many cases per split (smoke tests).

    Returns
    -------
    pathlib.Path
        The facts JSON.
    """
    from monai.losses import DiceCELoss
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    started = time.time()
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    ref = masks if isinstance(masks, ReferenceMasks) else ReferenceMasks(masks)
    arch = json.loads(json.dumps(architecture or DEFAULT_ARCHITECTURE))
    post = {
        "threshold": 0.5,
        "keep_components": 2,
        "min_component_fraction": 0.05,
        "fill_holes": True,
    }
    logger.info("reading reference cases from %s", data_dir)
    train_cases = reference_cases(data_dir, "train", ref, limit)
    val_cases = reference_cases(data_dir, "val", ref, limit)
    test_cases = reference_cases(data_dir, "test", ref, limit)
    x_train, y_train = _stack(train_cases, input_size)
    x_val, y_val = _stack(val_cases, input_size)

    torch.manual_seed(seed)
    net = build_unet(arch)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, epochs))
    loss_fn = DiceCELoss(sigmoid=True)
    aug = _augmenter(input_size, seed)
    gen = torch.Generator().manual_seed(seed)
    history: list[dict[str, float]] = []
    best = {"epoch": -1, "val_dice": -1.0}
    best_state: dict[str, torch.Tensor] | None = None
    start_epoch = 0
    ckpt = out / "checkpoint.pt"
    if resume and ckpt.is_file():
        state = torch.load(ckpt, map_location="cpu", weights_only=False)
        net.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        gen.set_state(state["gen"])
        history, best, best_state = state["history"], state["best"], state["best_state"]
        start_epoch = int(state["epoch"]) + 1
        aug.set_random_state(seed=seed + start_epoch)
        logger.info("resumed at epoch %d (best val Dice %.4f)", start_epoch, best["val_dice"])

    n = len(train_cases)
    for epoch in range(start_epoch, epochs):
        net.train()
        order = torch.randperm(n, generator=gen)
        total, t0 = 0.0, time.time()
        bar = tqdm(
            range(0, n, batch_size), desc=f"lungs epoch {epoch + 1}/{epochs}", disable=not progress
        )
        for i in bar:
            idx = order[i : i + batch_size]
            items = [aug({"image": x_train[j], "mask": y_train[j]}) for j in idx.tolist()]
            xb = torch.stack(
                [torch.as_tensor(it["image"]).as_subclass(torch.Tensor) for it in items]
            )
            yb = torch.stack(
                [torch.as_tensor(it["mask"]).as_subclass(torch.Tensor) for it in items]
            )
            loss = loss_fn(net(_zscore(xb.float().clamp(0, 1))), (yb > 0.5).float())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            value = float(loss.detach())
            total += value * len(idx)
            bar.set_postfix(loss=f"{value:.3f}")
        sched.step()
        net.eval()
        with torch.no_grad():
            pv = torch.sigmoid(net(_zscore(x_val))) >= 0.5
        inter = (pv & (y_val > 0.5)).sum(dim=(1, 2, 3)).float()
        denom = (pv.sum(dim=(1, 2, 3)) + (y_val > 0.5).sum(dim=(1, 2, 3))).float()
        val_dice = float((2 * inter / denom.clamp_min(1)).mean())
        history.append(
            {
                "epoch": epoch + 1,
                "loss": total / n,
                "val_dice_net_res": val_dice,
                "seconds": time.time() - t0,
            }
        )
        logger.info(
            "epoch %d/%d loss %.4f val Dice (%dpx, raw) %.4f (%.0fs)",
            epoch + 1,
            epochs,
            total / n,
            input_size,
            val_dice,
            time.time() - t0,
        )
        if val_dice > best["val_dice"]:
            best = {"epoch": epoch + 1, "val_dice": val_dice}
            best_state = {k: v.detach().clone() for k, v in net.state_dict().items()}
        torch.save(
            {
                "model": net.state_dict(),
                "opt": opt.state_dict(),
                "sched": sched.state_dict(),
                "gen": gen.get_state(),
                "history": history,
                "best": best,
                "best_state": best_state,
                "epoch": epoch,
            },
            ckpt,
        )

    if best_state is not None:
        net.load_state_dict(best_state)
    net.eval()
    # fp16 weights, as shipped; measure what is shipped.
    state16 = {
        k: (v.half() if v.is_floating_point() else v).contiguous()
        for k, v in net.state_dict().items()
    }
    weights = out / "lung_unet.safetensors"
    save_file(state16, str(weights))
    net.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state16.items()})
    net.eval()

    # Threshold chosen on val (post-processed masks at the stored size).
    thresholds = [0.3, 0.4, 0.5, 0.6, 0.7]
    val_by_threshold = {}
    for t in thresholds:
        fn = _predict_masks_fn(net, input_size, {**post, "threshold": t})
        val_by_threshold[t] = float(np.mean([d["dice"] for d in _dice_of(fn, val_cases)]))
    post["threshold"] = max(thresholds, key=lambda t: (val_by_threshold[t], -abs(t - 0.5)))
    fn = _predict_masks_fn(net, input_size, post)
    val_dice = _dice_of(fn, val_cases)
    test_dice = _dice_of(fn, test_cases)
    facts = {
        "name": "lung_unet",
        "title": "Lung-field U-Net (MONAI UNet, 2-D)",
        "task": "Binary segmentation of both lung fields on frontal chest radiographs "
        "(used to measure where Grad-CAM heat falls). RESEARCH USE ONLY.",
        "architecture": arch,
        "input_size": input_size,
        "normalisation": "per_image_zscore",
        "resize": "antialiased bilinear to input_size x input_size, aspect ratio not kept "
        "(dicom_covid.transforms.ResizeSquare)",
        "postprocessing": post,
        "training": {
            "data": (
                "Development set (shared/data/cxr) ieee8023 images with a V7 Labs lung mask from "
                "the torchxrayvision 1.5.7 wheel (semantic_masks_v7labs_lungs.zip), matched on "
                "the file stem of original_file; masks resized to the stored image size "
                "(area averaging, >= 0.5). All are adult COVID-19 images."
            ),
            "masks_archive": ref.path.name,
            "n_train": len(train_cases),
            "n_val": len(val_cases),
            "n_test": len(test_cases),
            "epochs": epochs,
            "best_epoch": best["epoch"],
            "batch_size": batch_size,
            "optimizer": f"AdamW lr {lr} weight decay 1e-4, cosine decay to 0",
            "loss": "MONAI DiceCELoss(sigmoid=True)",
            "augmentation": _AUGMENTATION_TEXT,
            "model_selection": "epoch with the best mean val Dice at the network resolution; "
            "threshold then chosen on val (post-processed masks at the stored size) from "
            f"{thresholds}",
            "val_dice_by_threshold": {str(k): v for k, v in val_by_threshold.items()},
            "seed": seed,
            "history": history,
            "wall_seconds": round(time.time() - started, 1),
            "torch_threads": torch.get_num_threads(),
        },
        "dice": {
            "note": "Dice of the post-processed mask against the reference mask, both at the "
            "stored image size (long side <= 512 px).",
            "val": {"summary": _summary([d["dice"] for d in val_dice]), "per_image": val_dice},
            "test": {"summary": _summary([d["dice"] for d in test_dice]), "per_image": test_dice},
        },
        "parameters": int(sum(p.numel() for p in net.parameters())),
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
        "disclaimer": "RESEARCH USE ONLY - NOT FOR DIAGNOSTIC USE",
    }
    facts_path = out / "lung_unet.json"
    facts_path.write_text(json.dumps(facts, indent=2) + "\n")
    logger.info(
        "lung segmenter: test Dice mean %.4f median %.4f min %.4f (n=%d)",
        facts["dice"]["test"]["summary"]["mean"],
        facts["dice"]["test"]["summary"]["median"],
        facts["dice"]["test"]["summary"]["min"],
        len(test_cases),
    )
    return facts_path


def install_segmenter(run_dir: str | Path, bundle_root: str | Path | None = None) -> Path:
    """Copy ``lung_unet.safetensors`` + ``lung_unet.json`` of a run into a bundle and register
    them as ``dicom_covid.lung_segmenter`` in ``configs/metadata.json``.

    Returns
    -------
    pathlib.Path
        The installed weights file.

    Raises
    ------
    BundleError
        When the run folder lacks the files.
    """
    import shutil

    run = Path(run_dir)
    src_w, src_f = run / "lung_unet.safetensors", run / "lung_unet.json"
    if not src_w.is_file() or not src_f.is_file():
        raise BundleError(
            f"{run}: lung_unet.safetensors / lung_unet.json not found; run "
            "`dicom-covid lungs train --output-dir DIR` first."
        )
    bundle = Bundle(bundle_root)
    models = bundle.root / "models"
    models.mkdir(exist_ok=True)
    shutil.copyfile(src_w, models / "lung_unet.safetensors")
    shutil.copyfile(src_f, models / "lung_unet.json")
    meta_path = bundle.root / "configs" / "metadata.json"
    meta = json.loads(meta_path.read_text())  # re-read: others may have changed it
    meta["dicom_covid"]["lung_segmenter"] = {
        "weights": "models/lung_unet.safetensors",
        "facts": "models/lung_unet.json",
    }
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")
    logger.info("installed the lung segmenter into %s", bundle.root)
    return models / "lung_unet.safetensors"


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


# --------------------------------------------------------------------------------------------
# heat share over a labelled split
# --------------------------------------------------------------------------------------------

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

    from .errors import InputRejected
    from .explain import Explainer
    from .inference import DISCLAIMER, Predictor
    from .reader import read_image
    from .training.data import read_manifest

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
