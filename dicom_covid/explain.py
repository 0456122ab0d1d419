"""Grad-CAM heat maps: which parts of a chest X-ray drove a class score.

:class:`Explainer` wraps the ``grad-cam`` package (``pytorch_grad_cam``) around a loaded
:class:`~dicom_covid.inference.Predictor`. The target layer of each backbone is named in the
bundle (``ModelFacts.gradcam_layer``, a dotted path into the network), not in code.

Geometry: preprocessing squashes the whole image to ``S x S`` (aspect ratio not kept, see
:mod:`dicom_covid.transforms`), so the ``S x S`` CAM maps back onto the source image by resizing
it to ``(rows, columns)``. A heat map from :meth:`Explainer.heatmap` therefore lines up pixel for
pixel with ``XrayImage.pixels`` and with the source DICOM.

Ensembles: for a predictor of an ensemble of bundle models, :class:`Explainer` runs the CAM of
each member network (each with its own target layer and input size) and averages them:
:meth:`Explainer.heatmap` averages the members' heat maps at the source resolution,
:meth:`Explainer.cam` the members' CAMs resampled to the largest member input size. The mean is
not rescaled, so a region that only some members look at stays cooler than one they all agree on.

Besides the heat map this module gives an RGB :func:`overlay` for display and
:func:`hot_region_outline`, a closed polygon around the hottest region, used as the region of
the DICOM SR. RESEARCH USE ONLY: a heat map shows what a model looked at, not where disease is.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .errors import BundleError

if TYPE_CHECKING:
    from .inference import Predictor
    from .reader import XrayImage

__all__ = ["CAM_METHODS", "Explainer", "hot_region_outline", "overlay", "resolve_layer"]

logger = logging.getLogger(__name__)

#: Names accepted by :class:`Explainer` and the ``pytorch_grad_cam`` class each one uses.
CAM_METHODS: dict[str, str] = {
    "gradcam": "GradCAM",
    "gradcam++": "GradCAMPlusPlus",
    "xgradcam": "XGradCAM",
    "hirescam": "HiResCAM",
    "layercam": "LayerCAM",
}


def resolve_layer(model: nn.Module, path: str) -> nn.Module:
    """Return the sub-module of ``model`` at dotted ``path`` (e.g. ``"features.42"``).

    Parameters
    ----------
    model : torch.nn.Module
        The network.
    path : str
        Dotted module path as given by ``model.named_modules()``.

    Returns
    -------
    torch.nn.Module

    Raises
    ------
    BundleError
        When no module has that path; the message lists the last top-level modules.
    """
    try:
        return model.get_submodule(path)
    except AttributeError:
        names = [n for n, _ in model.named_children()]
        raise BundleError(
            f"Grad-CAM layer {path!r} is not a module of {type(model).__name__} (top-level "
            f"modules: {', '.join(names[-8:])}); fix 'gradcam_layer' in the model's facts JSON "
            "in the bundle."
        ) from None


class Explainer:
    """Grad-CAM (or a variant) for the model of a :class:`~dicom_covid.inference.Predictor`.

    Parameters
    ----------
    predictor : Predictor
        Loaded model; its ``facts.gradcam_layer`` names the target layer. For an ensemble, one
        member explainer per member network (:attr:`members`) does the work.
    method : str
        One of :data:`CAM_METHODS` (default ``"gradcam"``).

    Raises
    ------
    BundleError
        When the target layer does not exist in the network.
    ValueError
        When ``method`` is unknown.

    Notes
    -----
    Hooks are attached to the network only while :meth:`heatmap` runs, so the predictor can be
    used for plain inference in between; do not run :meth:`heatmap` and inference on the same
    predictor from two threads at once.
    """

    def __init__(self, predictor: Predictor, method: str = "gradcam") -> None:
        key = method.lower()
        if key not in CAM_METHODS:
            raise ValueError(
                f"unknown CAM method {method!r}; choose one of: {', '.join(CAM_METHODS)}"
            )
        import pytorch_grad_cam

        self.predictor = predictor
        self.method = key
        self.last_box: tuple[float, float, float, float] | None = None
        self._cam_class = getattr(pytorch_grad_cam, CAM_METHODS[key])
        #: One explainer per member network of an ensemble; empty for a single model.
        self.members: list[Explainer] = []
        if getattr(predictor, "is_ensemble", False):
            self.members = [Explainer(m, method) for m in predictor.members]
            self.layer_name = ", ".join(
                f"{e.predictor.facts.name}:{e.layer_name}" for e in self.members
            )
            self.layer = None
            self._size = max(int(e.predictor.facts.input_size) for e in self.members)
            return
        self.layer_name = predictor.facts.gradcam_layer
        self.layer = resolve_layer(predictor.model, self.layer_name)

    def cam(self, image: XrayImage, target: str = "covid") -> np.ndarray:
        """CAM at the network's input resolution, ``float32 (S, S)`` in ``[0, 1]``.

        Parameters
        ----------
        image : XrayImage
            The radiograph.
        target : str
            Class label whose score is explained (one of the bundle labels).

        Returns
        -------
        numpy.ndarray
            For an ensemble, ``(S, S)`` with ``S`` the largest member input size: the mean of the
            members' CAMs, each resized bilinearly to ``S x S``.
        """
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

        labels = list(self.predictor.labels)
        if target not in labels:
            raise ValueError(f"unknown target {target!r}; the model's labels are {labels}")
        if self.members:
            total = torch.zeros((1, 1, self._size, self._size))
            for member in self.members:
                total += _resize(member.cam(image, target), (self._size, self._size))
            return (total[0, 0] / len(self.members)).clamp_(0.0, 1.0).numpy()
        model = self.predictor.model
        x, info = self.predictor.prepared(image)
        #: Where the network input lies on the source (fractions top, bottom, left, right);
        #: None when it covers the whole image (no lung crop).
        self.last_box = info.get("lung_box")
        x = x[None].to(self.predictor.device)
        x = x.as_tensor() if hasattr(x, "as_tensor") else x  # plain tensor, never a MetaTensor
        # Gradients must reach the target layer even where parameters are frozen.
        x = x.detach().clone().requires_grad_(True)
        with torch.enable_grad(), self._cam_class(model=model, target_layers=[self.layer]) as cam:
            grayscale = cam(input_tensor=x, targets=[ClassifierOutputTarget(labels.index(target))])
        model.zero_grad(set_to_none=True)
        out = np.nan_to_num(np.asarray(grayscale[0], dtype=np.float32), nan=0.0)
        return np.clip(out, 0.0, 1.0)

    def heatmap(self, image: XrayImage, target: str = "covid") -> np.ndarray:
        """Heat map at the source image's resolution.

        Parameters
        ----------
        image : XrayImage
            The radiograph.
        target : str
            Class label whose score is explained (default ``"covid"``).

        Returns
        -------
        numpy.ndarray
            ``float32`` array of shape ``image.shape`` with values in ``[0, 1]`` (1 = hottest).
            For an ensemble, the mean of the members' heat maps.
        """
        rows, cols = image.shape
        if self.members:
            heat = self.members[0].heatmap(image, target)
            for member in self.members[1:]:
                heat += member.heatmap(image, target)
            heat /= len(self.members)
            np.clip(heat, 0.0, 1.0, out=heat)
        else:
            small = self.cam(image, target)
            if self.last_box is None:
                big = _resize(small, (rows, cols))
                heat = big[0, 0].clamp_(0.0, 1.0).numpy().astype(np.float32, copy=False)
            else:
                # The network saw the lung crop only: its map goes back inside the crop box.
                t, b, left, r = self.last_box
                t, b = round(t * rows), max(round(b * rows), round(t * rows) + 1)
                left = round(left * cols)
                r = max(round(r * cols), left + 1)
                heat = np.zeros((rows, cols), dtype=np.float32)
                inner = _resize(small, (b - t, r - left))[0, 0].clamp_(0.0, 1.0).numpy()
                heat[t:b, left:r] = inner
        logger.debug(
            "%s heat map %dx%d for %s (max %.3f)",
            self.method,
            rows,
            cols,
            target,
            float(heat.max()),
        )
        return heat


def _resize(cam: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of a 2-D CAM to ``size`` as a ``(1, 1, rows, cols)`` float32 tensor."""
    small = torch.from_numpy(np.ascontiguousarray(cam, dtype=np.float32))[None, None]
    if tuple(small.shape[-2:]) == tuple(size):
        return small
    return F.interpolate(small, size=size, mode="bilinear", align_corners=False)


def _jet(values: np.ndarray) -> np.ndarray:
    """Jet colour map of ``values`` in ``[0, 1]`` as float RGB in ``[0, 1]``."""
    v = np.clip(values, 0.0, 1.0)[..., None]
    centres = np.array([0.75, 0.5, 0.25], dtype=np.float32)  # R, G, B peaks
    return np.clip(1.5 - np.abs(4.0 * v - 4.0 * centres), 0.0, 1.0)


def overlay(image: XrayImage | np.ndarray, heatmap: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """Blend a heat map in a jet colour map over the grayscale radiograph.

    The colour is weighted by the heat (``alpha * sqrt(heat)``) so that cold regions keep the
    plain radiograph and hot regions turn yellow to red.

    Parameters
    ----------
    image : XrayImage or numpy.ndarray
        The radiograph, or its ``(H, W)`` pixels in ``[0, 1]``.
    heatmap : numpy.ndarray
        ``(H, W)`` values in ``[0, 1]``, same shape as the image.
    alpha : float
        Largest opacity of the colour, in ``[0, 1]``.

    Returns
    -------
    numpy.ndarray
        ``uint8`` RGB array ``(H, W, 3)``.

    Raises
    ------
    ValueError
        When the shapes differ or ``alpha`` is outside ``[0, 1]``.
    """
    pixels = np.asarray(getattr(image, "pixels", image), dtype=np.float32)
    heat = np.asarray(heatmap, dtype=np.float32)
    if pixels.shape != heat.shape or pixels.ndim != 2:
        raise ValueError(
            f"image {pixels.shape} and heat map {heat.shape} must be the same (H, W) shape"
        )
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    heat = np.clip(np.nan_to_num(heat), 0.0, 1.0)
    gray = np.clip(pixels, 0.0, 1.0)[..., None]
    weight = (alpha * np.sqrt(heat))[..., None]
    rgb = (1.0 - weight) * gray + weight * _jet(heat)
    return np.round(rgb * 255.0).astype(np.uint8)


def hot_region_outline(
    heatmap: np.ndarray, level: float = 0.5, max_points: int = 64, work_size: int = 256
) -> np.ndarray:
    """Closed polygon around the largest connected region where ``heat >= level * max``.

    Parameters
    ----------
    heatmap : numpy.ndarray
        ``(H, W)`` heat map.
    level : float
        Fraction of the maximum that defines "hot", in ``(0, 1]``.
    max_points : int
        Most vertices of the polygon (the closing point not counted); at least 4.
    work_size : int
        The outline is traced on a copy of the heat map at most this many pixels a side.

    Returns
    -------
    numpy.ndarray
        ``float32 (K, 2)`` of (column, row) image coordinates in DICOM's convention (``0, 0`` is
        the top-left corner of the top-left pixel, ``W, H`` the bottom-right corner of the
        image); the last point repeats the first. ``K >= 4``. A flat heat map gives the image
        border.

    Raises
    ------
    ValueError
        When the heat map is not 2-D or ``level`` is outside ``(0, 1]``.
    """
    import cv2

    heat = np.nan_to_num(np.asarray(heatmap, dtype=np.float32))
    if heat.ndim != 2 or min(heat.shape) < 1:
        raise ValueError(f"heat map must be a 2-D array, got shape {heat.shape}")
    if not 0.0 < level <= 1.0:
        raise ValueError(f"level must be in (0, 1], got {level}")
    max_points = max(int(max_points), 4)
    rows, cols = heat.shape
    scale = min(1.0, work_size / max(rows, cols))
    h, w = max(1, round(rows * scale)), max(1, round(cols * scale))
    small = cv2.resize(heat, (w, h), interpolation=cv2.INTER_AREA) if (h, w) != heat.shape else heat
    sx, sy = cols / w, rows / h  # source pixels per work pixel
    peak = float(small.max())
    border = np.array([[0, 0], [cols, 0], [cols, rows], [0, rows], [0, 0]], dtype=np.float32)
    if peak <= 0.0 or float(small.min()) >= peak:
        return border
    mask = (small >= level * peak).astype(np.uint8)
    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    if count < 2:
        return border
    biggest = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    region = (labels == biggest).astype(np.uint8)
    contours, _ = cv2.findContours(region, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    contour = max(contours, key=cv2.contourArea).reshape(-1, 2).astype(np.float32)
    epsilon, poly = 0.5, contour
    while len(poly) > max_points:
        poly = cv2.approxPolyDP(contour[:, None, :], epsilon, closed=True).reshape(-1, 2)
        epsilon *= 1.5
    if len(poly) < 3 or abs(cv2.contourArea(poly.astype(np.float32))) < 1.0:
        x, y, bw, bh = (int(v) for v in stats[biggest, :4])
        poly = np.array([[x, y], [x + bw, y], [x + bw, y + bh], [x, y + bh]], dtype=np.float32)
        pts = poly * np.array([sx, sy], dtype=np.float32)
    else:
        # Contour vertices are work-pixel indices; their centres sit at +0.5.
        pts = (poly.astype(np.float32) + 0.5) * np.array([sx, sy], dtype=np.float32)
    pts[:, 0] = np.clip(pts[:, 0], 0.0, cols)
    pts[:, 1] = np.clip(pts[:, 1], 0.0, rows)
    return np.vstack([pts, pts[:1]]).astype(np.float32)
