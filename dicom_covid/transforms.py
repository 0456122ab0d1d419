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
    "SourceScrambleAugment",
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


class SourceScrambleAugment(ChestAugment):
    """:class:`ChestAugment` plus augmentations that destroy cues of the source hospital.

    On top of the geometric and exposure changes of :class:`ChestAugment` (with a wider zoom,
    a random resized crop): Gaussian blur and noise (sharpness and detector noise differ per
    source and re-export), JPEG re-compression at a random quality (some sources are
    re-compressed web copies), and masking of a random border band and of small rectangles
    near the corners (burned-in markers and text). Each applies with probability ``p``.

    Parameters
    ----------
    p : float
        Probability of each of blur, noise, JPEG and masking (default 0.4).
    generator : torch.Generator, optional
        Source of randomness.
    **kwargs
        Passed to :class:`ChestAugment`.
    """

    def __init__(self, p: float = 0.4, generator: torch.Generator | None = None, **kwargs) -> None:
        kwargs.setdefault("scale", (0.85, 1.3))
        kwargs.setdefault("intensity", 0.25)
        super().__init__(generator=generator, **kwargs)
        self.p = p

    def _hit(self) -> bool:
        return self._u(0.0, 1.0) < self.p

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        out = super().__call__(img)
        side = out.shape[-1]
        if self._hit():
            sigma = self._u(0.3, 1.5)
            radius = max(1, math.ceil(2 * sigma))
            xs = torch.arange(-radius, radius + 1, dtype=torch.float32)
            k = torch.exp(-(xs**2) / (2 * sigma**2))
            k = (k / k.sum()).view(1, 1, 1, -1)
            x = F.pad(out[None], (radius, radius, radius, radius), mode="replicate")
            x = F.conv2d(F.conv2d(x, k), k.transpose(-1, -2))
            out = x[0]
        if self._hit():
            std = self._u(0.005, 0.03)
            noise = torch.randn(out.shape, generator=self.generator) * std
            out = (out + noise).clamp_(0.0, 1.0)
        if self._hit():
            import cv2

            quality = int(self._u(25, 90))
            u8 = (out[0].numpy() * 255 + 0.5).astype(np.uint8)
            ok, buf = cv2.imencode(".jpg", u8, [cv2.IMWRITE_JPEG_QUALITY, quality])
            if ok:
                dec = cv2.imdecode(buf, cv2.IMREAD_GRAYSCALE)
                out = torch.from_numpy(dec.astype(np.float32) / 255.0)[None]
        if self._hit():
            out = out.clone()
            band = max(1, int(self._u(0.02, 0.1) * side))
            value = float(self._u(0, 1) > 0.5)
            edge = int(self._u(0, 4))
            if edge == 0:
                out[:, :band] = value
            elif edge == 1:
                out[:, -band:] = value
            elif edge == 2:
                out[:, :, :band] = value
            else:
                out[:, :, -band:] = value
            for _ in range(int(self._u(0, 3))):
                h, w = int(self._u(0.04, 0.1) * side), int(self._u(0.06, 0.2) * side)
                top = int(self._u(0, 0.2) * side) if self._hit() else side - h - 1
                left = int(self._u(0, 1) * (side - w - 1))
                out[:, top : top + h, left : left + w] = float(self._u(0, 1) > 0.5)
        return out


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
