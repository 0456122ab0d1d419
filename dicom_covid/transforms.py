"""Preprocessing and augmentation, MONAI-shaped: one class per step plus ``…d`` dict wrappers.

The single preprocessing path used by training, evaluation and inference is::

    XrayImage.pixels (H, W) float [0, 1]
      → ResizeSquare(size)        antialiased bilinear resize to size x size (aspect not kept:
                                  stored size and aspect ratio are label shortcuts in the data)
      → RepeatNormalize(mean,std) repeat to 3 channels, (x - mean) / std

:func:`preprocess` chains them. :class:`ChestAugment` is applied between the two during
training only.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.transforms import MapTransform, Transform

__all__ = [
    "ChestAugment",
    "RepeatNormalize",
    "RepeatNormalized",
    "ResizeSquare",
    "ResizeSquared",
    "preprocess",
]


class ResizeSquare(Transform):
    """Resize a ``(H, W)`` or ``(1, H, W)`` image to ``(1, size, size)`` with antialiasing.

    Parameters
    ----------
    size : int
        Output side in pixels.
    """

    def __init__(self, size: int) -> None:
        self.size = int(size)

    def __call__(self, img: np.ndarray | torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(np.asarray(img) if not isinstance(img, torch.Tensor) else img)
        t = t.float()
        if t.ndim == 2:
            t = t[None]
        out = F.interpolate(
            t[None],
            size=(self.size, self.size),
            mode="bilinear",
            align_corners=False,
            antialias=True,
        )[0]
        return out.clamp_(0.0, 1.0)


class RepeatNormalize(Transform):
    """Repeat a ``(1, S, S)`` image to 3 channels and normalise per channel.

    Parameters
    ----------
    mean, std : sequence of 3 floats
        Channel statistics the backbone expects.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        img = torch.as_tensor(img).float()
        return (img.expand(3, -1, -1) - self.mean) / self.std


class ResizeSquared(MapTransform):
    """Dictionary wrapper of :class:`ResizeSquare`."""

    def __init__(self, keys: Sequence[Hashable], size: int, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.op = ResizeSquare(size)

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.op(d[key])
        return d


class RepeatNormalized(MapTransform):
    """Dictionary wrapper of :class:`RepeatNormalize`."""

    def __init__(
        self,
        keys: Sequence[Hashable],
        mean: Sequence[float],
        std: Sequence[float],
        allow_missing_keys: bool = False,
    ):
        super().__init__(keys, allow_missing_keys)
        self.op = RepeatNormalize(mean, std)

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.op(d[key])
        return d


class ChestAugment(Transform):
    """Augmentation suited to chest radiographs, on a ``(1, S, S)`` tensor in ``[0, 1]``.

    Small rotations (±``degrees``), scaling and shifts (patient positioning), brightness,
    contrast and gamma changes (exposure and post-processing differences). No horizontal flip
    (anatomy is not left-right symmetric: heart, aortic knob) and no vertical flip.

    Parameters
    ----------
    degrees : float
        Maximum absolute rotation.
    scale : tuple of float
        Range of isotropic zoom.
    shift : float
        Maximum translation as a fraction of the side.
    intensity : float
        Maximum relative brightness/contrast change.
    generator : torch.Generator, optional
        Source of randomness, for repeatable runs.
    """

    def __init__(
        self,
        degrees: float = 10.0,
        scale: tuple[float, float] = (0.9, 1.15),
        shift: float = 0.06,
        intensity: float = 0.15,
        generator: torch.Generator | None = None,
    ) -> None:
        self.degrees = degrees
        self.scale = scale
        self.shift = shift
        self.intensity = intensity
        self.generator = generator

    def _u(self, lo: float, hi: float) -> float:
        return lo + (hi - lo) * float(torch.rand((), generator=self.generator))

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        angle = math.radians(self._u(-self.degrees, self.degrees))
        s = self._u(*self.scale)
        tx, ty = self._u(-self.shift, self.shift) * 2, self._u(-self.shift, self.shift) * 2
        cos, sin = math.cos(angle) / s, math.sin(angle) / s
        theta = torch.tensor([[cos, -sin, tx], [sin, cos, ty]], dtype=torch.float32)[None]
        grid = F.affine_grid(theta, [1, *img.shape], align_corners=False)
        out = F.grid_sample(
            img[None], grid, mode="bilinear", padding_mode="border", align_corners=False
        )[0]
        contrast = self._u(1 - self.intensity, 1 + self.intensity)
        brightness = self._u(-self.intensity / 2, self.intensity / 2)
        gamma = math.exp(self._u(-self.intensity, self.intensity))
        out = out.clamp(0, 1) ** gamma
        out = (out - 0.5) * contrast + 0.5 + brightness
        return out.clamp_(0.0, 1.0)


def preprocess(
    pixels: np.ndarray | torch.Tensor, size: int, mean: Sequence[float], std: Sequence[float]
) -> torch.Tensor:
    """Turn a reader output into the network input ``(3, size, size)``.

    Parameters
    ----------
    pixels : array ``(H, W)`` in ``[0, 1]``
        :attr:`dicom_covid.reader.XrayImage.pixels`.
    size : int
        Network input side.
    mean, std : sequence of 3 floats
        Normalisation.

    Returns
    -------
    torch.Tensor
    """
    return RepeatNormalize(mean, std)(ResizeSquare(size)(pixels))
