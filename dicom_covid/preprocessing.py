"""The input pipeline of a model, built from the ``preprocessing`` entry of its bundle facts.

Two pipelines exist; which one a model uses is a model fact, never a code default:

``resize`` (version-1 models, and any facts without a ``preprocessing`` entry)::

    XrayImage.pixels (H, W) in [0, 1] -> ResizeSquare(input_size)

``lung_crop_clahe`` (the transfer recipe, see ``docs/model_card.md``)::

    pixels -> ResizeSquare(base_size)            resolution harmonisation: every source is brought
                                                  to the sharpness of the coarsest one (224 px)
           -> lung crop                           the bundle's lung U-Net; bounding box of both
                                                  lung fields plus a margin; borders, burned-in
                                                  text and collimation fall outside it
           -> ResizeSquare(input_size)
           -> CLAHE(clip_limit, tile_grid)        intensity standardisation (OpenCV)

In ``lung_crop_clahe`` either step may be switched off by setting its entry to ``null``
(``"lung_crop": null`` or ``"clahe": null``): the ablations of the transfer recipe
(``dicom-covid crossval run --without lung_crop|clahe``) train and ship such models. Without the
lung crop nothing is segmented and the facts below are empty.

For a batch (:meth:`Preprocessing.batch`, used by :class:`~dicom_covid.inference.Predictor`)
the lung U-Net runs once over all images of the batch, at the size it was trained for
(``input_size`` of its facts: 128 px, from the 224-px base image); CLAHE runs with OpenCV on the
network-size image, the pipeline's last step.

Both return a ``(1, S, S)`` float tensor in ``[0, 1]`` and a dict of facts about the step
(``lung_fraction``, ``lung_crop``, ``lung_box``), which feeds the out-of-distribution checks of
:mod:`dicom_covid.abstention`. Normalisation to the backbone's mean and std follows
(:class:`~dicom_covid.transforms.RepeatNormalize`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .errors import BundleError
from .transforms import ResizeSquare

__all__ = ["PIPELINES", "Preprocessing", "clahe"]

#: Names of the pipelines this version understands.
PIPELINES = ("resize", "lung_crop_clahe")


def clahe(img: torch.Tensor, clip_limit: float = 2.0, tile_grid: int = 8) -> torch.Tensor:
    """Contrast-limited adaptive histogram equalisation of a ``(1, S, S)`` image in ``[0, 1]``.

    Parameters
    ----------
    img : torch.Tensor
        ``(1, S, S)`` float image in ``[0, 1]``.
    clip_limit : float
        OpenCV clip limit.
    tile_grid : int
        Tiles per side.

    Returns
    -------
    torch.Tensor
        ``(1, S, S)`` float32 in ``[0, 1]``.
    """
    import cv2

    u8 = (img[0].float().clamp(0, 1).numpy() * 255.0 + 0.5).astype(np.uint8)
    out = cv2.createCLAHE(clipLimit=float(clip_limit), tileGridSize=(tile_grid, tile_grid)).apply(
        u8
    )
    return torch.from_numpy(out.astype(np.float32) / 255.0)[None]


@dataclass
class Preprocessing:
    """A model's input pipeline (see the module docstring).

    Parameters
    ----------
    input_size : int
        Network input side.
    spec : mapping
        The facts' ``preprocessing`` entry; ``{}`` for the plain ``resize`` pipeline. In
        ``lung_crop_clahe``, ``lung_crop`` or ``clahe`` set to None switches that step off.
    segmenter : object, optional
        A :class:`dicom_covid.lungs.LungSegmenter` (needed by ``lung_crop_clahe``; loaded from
        ``bundle`` on first use when None).
    bundle : Bundle, optional
        Where the segmenter comes from (default: the project's bundle).

    Raises
    ------
    BundleError
        Unknown pipeline name or malformed parameters.
    """

    input_size: int
    spec: Mapping[str, Any]
    segmenter: Any = None
    bundle: Any = None

    def __post_init__(self) -> None:
        self.spec = dict(self.spec or {})
        self.pipeline = str(self.spec.get("pipeline", "resize"))
        if self.pipeline not in PIPELINES:
            raise BundleError(
                f"preprocessing pipeline {self.pipeline!r} is unknown to this version of "
                f"dicom-covid (known: {', '.join(PIPELINES)}); upgrade dicom-covid or use a "
                "bundle written for it."
            )
        self._resize = ResizeSquare(self.input_size)
        #: Whether the lung crop and CLAHE steps run (both only in ``lung_crop_clahe``).
        self.crops_lungs = self.applies_clahe = False
        if self.pipeline == "lung_crop_clahe":
            try:
                self.base_size = int(self.spec["base_size"])
                crop, eq = self.spec["lung_crop"], self.spec["clahe"]
                self.crops_lungs, self.applies_clahe = crop is not None, eq is not None
                if crop is not None:
                    self.margin = float(crop["margin"])
                    self.min_lung_fraction = float(crop["min_lung_fraction"])
                if eq is not None:
                    self.clip_limit = float(eq["clip_limit"])
                    self.tile_grid = int(eq["tile_grid"])
            except (KeyError, TypeError, ValueError) as exc:
                raise BundleError(
                    f"malformed lung_crop_clahe preprocessing ({exc}); it needs base_size, "
                    "lung_crop (margin, min_lung_fraction, or null) and clahe (clip_limit, "
                    "tile_grid, or null)."
                ) from exc
            self._base = ResizeSquare(self.base_size)

    @property
    def needs_segmenter(self) -> bool:
        """True when the pipeline crops to the lung fields."""
        return self.crops_lungs

    def _lungs(self) -> Any:
        if self.segmenter is None:
            from .lungs.segmenter import LungSegmenter

            self.segmenter = LungSegmenter(self.bundle)
        return self.segmenter

    def lung_box(self, base: torch.Tensor) -> tuple[tuple[int, int, int, int] | None, float]:
        """Bounding box ``(top, bottom, left, right)`` of the lungs in ``base`` and their area.

        Returns ``(None, fraction)`` when the lung fields cover less than ``min_lung_fraction``
        of the image (no plausible lungs: the whole image is kept).
        """
        return self.lung_boxes([base])[0]

    def lung_boxes(
        self, bases: Sequence[torch.Tensor]
    ) -> list[tuple[tuple[int, int, int, int] | None, float]]:
        """:meth:`lung_box` of several base images, with one U-Net forward pass for all.

        Parameters
        ----------
        bases : sequence of torch.Tensor
            ``(1, base_size, base_size)`` images (the pipeline's first resize).

        Returns
        -------
        list of tuple
            Per image, the box (or None) and the lung fraction, as :meth:`lung_box` gives them.
        """
        seg = self._lungs()
        probs = seg.probabilities([base[0] for base in bases])
        return [self._box(base, seg.clean(prob)) for base, prob in zip(bases, probs, strict=True)]

    def _box(
        self, base: torch.Tensor, mask: np.ndarray
    ) -> tuple[tuple[int, int, int, int] | None, float]:
        """The lung box in ``base`` from the U-Net's post-processed ``mask``, and its area."""
        fraction = float(mask.mean())
        if fraction < self.min_lung_fraction:
            return None, fraction
        rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
        scale = base.shape[-1] / mask.shape[-1]
        top, bottom = rows[0] * scale, (rows[-1] + 1) * scale
        left, right = cols[0] * scale, (cols[-1] + 1) * scale
        mh, mw = self.margin * (bottom - top), self.margin * (right - left)
        side = base.shape[-1]
        box = (
            max(0, int(top - mh)),
            min(side, int(np.ceil(bottom + mh))),
            max(0, int(left - mw)),
            min(side, int(np.ceil(right + mw))),
        )
        return box, fraction

    def __call__(self, pixels: np.ndarray | torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        """Network input before normalisation, ``(1, S, S)`` in ``[0, 1]``, and step facts."""
        return self.batch([pixels])[0]

    def batch(
        self, images: Sequence[np.ndarray | torch.Tensor]
    ) -> list[tuple[torch.Tensor, dict[str, Any]]]:
        """The pipeline for several images; the lung U-Net runs once over all of them.

        Parameters
        ----------
        images : sequence of array
            ``(H, W)`` pixels in ``[0, 1]`` (sizes may differ).

        Returns
        -------
        list of tuple
            Per image, what :meth:`__call__` gives for it (the U-Net is in eval mode, so an
            image's lung box does not depend on the other images).
        """
        out = self.geometric_batch(images)
        if self.applies_clahe:  # OpenCV, on the network-size image (the last step)
            out = [(clahe(img, self.clip_limit, self.tile_grid), info) for img, info in out]
        return out

    def geometric(self, pixels: np.ndarray | torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        """The pipeline up to its intensity standardisation: resizing and cropping only.

        This part is linear in the pixel values (interpolation), so inputs that differ by one
        grey level give outputs that differ by at most one grey level; CLAHE, which follows in
        ``lung_crop_clahe``, quantises to 8 bits and may amplify such a step by its local gain.

        Returns
        -------
        tuple
            ``(1, S, S)`` tensor in ``[0, 1]`` and the step facts (lung fraction and box).
        """
        return self.geometric_batch([pixels])[0]

    def geometric_batch(
        self, images: Sequence[np.ndarray | torch.Tensor]
    ) -> list[tuple[torch.Tensor, dict[str, Any]]]:
        """:meth:`geometric` for several images, with one U-Net forward pass for all of them."""
        if self.pipeline == "resize":
            return [(self._resize(pixels), {}) for pixels in images]
        bases = [self._base(pixels) for pixels in images]
        if not self.crops_lungs:
            return [(self._resize(base), {}) for base in bases]
        found = self.lung_boxes(bases)
        return [self._crop(base, *box) for base, box in zip(bases, found, strict=True)]

    def _crop(
        self, base: torch.Tensor, box: tuple[int, int, int, int] | None, fraction: float
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """The lung crop of a base image resized to the input size, and the step facts."""
        info: dict[str, Any] = {"lung_fraction": round(fraction, 4), "lung_crop": box is not None}
        if box is not None:
            t, b, left, r = box
            side = base.shape[-1]
            # Fractions of the source image's height and width (the base image is a square
            # resize of the whole source), to place a Grad-CAM map back on the source.
            info["lung_box"] = (t / side, b / side, left / side, r / side)
            base = base[:, t:b, left:r]
        return self._resize(base), info

    def describe(self) -> str:
        """One line for reports and SR algorithm parameters."""
        if self.pipeline == "resize":
            return f"resize {self.input_size}"
        steps = [f"resize {self.base_size}"]
        if self.crops_lungs:
            steps.append(f"lung crop (margin {self.margin:g})")
        steps.append(f"resize {self.input_size}")
        if self.applies_clahe:
            steps.append(f"CLAHE {self.clip_limit:g}/{self.tile_grid}")
        return ", ".join(steps)
