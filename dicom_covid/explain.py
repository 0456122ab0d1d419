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

One pass: :meth:`Explainer.predict_and_explain` gives the prediction (with the abstention
decision, exactly as :meth:`Predictor.predict <dicom_covid.inference.Predictor.predict>` gives it)
and the heat map from the same forward pass; :meth:`Explainer.predict_and_place` gives the same
heat map not yet resampled (:class:`CamHeat`: each network's CAM and its lung box), so that the
PACS worker draws the outline and the Secondary Capture at their own small resolutions instead of
making a source-size map only to shrink it again (on a 5-Mpixel CR about 20 ms per network to
make it, 40-55 ms to shrink it for the two). Hooks on the CAM layer keep its activations; the
forward runs without an autograd graph up to that layer and records one only from there to the
logits, so the backward pass for the CAM covers the head alone and no weight gets a gradient.
:meth:`Explainer.cam` and :meth:`Explainer.heatmap` use the same pass. The CAM itself is computed
from those activations and gradients by the ``grad-cam`` package's own formulas, so the maps equal
what ``pytorch_grad_cam`` gives with its own forward and backward.

Besides the heat map this module gives an RGB :func:`overlay` for display and
:func:`hot_region_outline`, a closed polygon around the hottest region, used as the region of
the DICOM SR. RESEARCH USE ONLY: a heat map shows what a model looked at, not where disease is.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .errors import BundleError

if TYPE_CHECKING:
    from .inference import Predictor
    from .prediction import Prediction
    from .reader import XrayImage

__all__ = [
    "CAM_METHODS",
    "CamHeat",
    "Explainer",
    "hot_region_outline",
    "overlay",
    "resolve_layer",
]

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
    Hooks are attached to the network only while :meth:`predict_and_explain`, :meth:`cam` or
    :meth:`heatmap` runs, so the predictor can be used for plain inference in between; do not
    run them and inference on the same predictor from two threads at once.
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
        # The method's formulas only (get_cam_image / get_cam_weights), without the hooks,
        # forward and backward that the class's constructor and __call__ would add.
        self._cam_method = _formulas(self._cam_class)
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

    def _networks(self) -> list[Explainer]:
        """The explainers of the single networks: the members, or ``[self]``."""
        return self.members or [self]

    def _target_index(self, target: str) -> int:
        labels = list(self.predictor.labels)
        if target not in labels:
            raise ValueError(f"unknown target {target!r}; the model's labels are {labels}")
        return labels.index(target)

    @contextmanager
    def _one_pass(self) -> Iterator[list[_CamProbe]]:
        """Hooks on the CAM layer and the output of every network while the block runs."""
        probes = [_CamProbe(e.predictor.model, e.layer) for e in self._networks()]
        try:
            yield probes
        finally:
            for probe in probes:
                probe.remove()

    def _cams(
        self, probe: _CamProbe, index: int | Sequence[int], infos: Sequence[dict]
    ) -> list[np.ndarray]:
        """CAMs ``(S, S)`` of one network, per image, from the tensors of a finished pass.

        ``index`` is the explained class, one for all images or one per image.
        """
        cams: list[np.ndarray] = []
        start = 0
        for acts, logits, size in zip(probe.activations, probe.logits, probe.sizes, strict=True):
            if isinstance(index, int):
                score = logits[:, index].sum()
            else:
                rows = torch.as_tensor(index[start : start + len(logits)], device=logits.device)
                score = logits.gather(1, rows[:, None]).sum()
            start += len(logits)
            (grads,) = torch.autograd.grad(score, acts)
            a = acts.detach().float().cpu().numpy()
            g = grads.float().cpu().numpy()
            raw = self._cam_method.get_cam_image(None, self.layer, None, a, g, False)
            cams.extend(_scale_like_grad_cam(raw, size))
        probe.clear()
        if len(cams) != len(infos):
            raise RuntimeError(f"{len(cams)} CAMs from a pass over {len(infos)} images")
        return cams

    @torch.no_grad()
    def _forward(self, images: Sequence[XrayImage], batch_size: int) -> list[dict]:
        """The network's forward pass alone (no probabilities): the preprocessing facts."""
        infos: list[dict] = []
        for i in range(0, len(images), batch_size):
            prepared = self.predictor.prepared_batch(images[i : i + batch_size])
            x = self.predictor.to_device(torch.stack([p[0] for p in prepared]))
            with self.predictor.autocast():
                self.predictor.model(x)
            infos.extend(p[1] for p in prepared)
        return infos

    def _explain(
        self, images: Sequence[XrayImage], target: str, batch_size: int, predict: bool
    ) -> tuple[list[Prediction] | None, list[list[np.ndarray]], list[list[Any]]]:
        """One pass over ``images``: predictions (or None) and, per network, CAMs and boxes.

        With ``predict`` the pass is :meth:`Predictor.predict_batch` (probabilities, features
        for the out-of-distribution check, abstention); without, the networks' forward alone.
        ``target`` ``"predicted"`` (with ``predict`` only) explains each image's predicted class.
        """
        per_image = target == "predicted"
        if per_image and not predict:
            raise ValueError("target 'predicted' needs the prediction of the same pass")
        index: int | list[int] = 0 if per_image else self._target_index(target)
        nets = self._networks()
        with self._one_pass() as probes:
            if predict:
                predictions = self.predictor.predict_batch(images, batch_size)
                infos = [list(e.predictor.last_infos) for e in nets]
                if per_image:
                    index = [self._target_index(p.label) for p in predictions]
            else:
                predictions = None
                infos = [e._forward(images, batch_size) for e in nets]
            cams = [e._cams(p, index, i) for e, p, i in zip(nets, probes, infos, strict=True)]
        boxes = [[info.get("lung_box") for info in net_infos] for net_infos in infos]
        return predictions, cams, boxes

    def predict_and_explain(
        self, images: Sequence[XrayImage], target: str = "covid", batch_size: int = 16
    ) -> list[tuple[Prediction, np.ndarray]]:
        """Classify images and explain them from the same forward pass.

        Parameters
        ----------
        images : sequence of XrayImage
            The radiographs.
        target : str
            Class label whose score is explained (default ``"covid"``), or ``"predicted"``:
            each image's predicted class.
        batch_size : int
            Images per forward pass.

        Returns
        -------
        list of (Prediction, numpy.ndarray)
            Per image, the prediction (with the abstention decision, the same as
            :meth:`Predictor.predict <dicom_covid.inference.Predictor.predict>` gives) and the
            heat map as :meth:`heatmap` gives it (``float32``, the image's shape, ``[0, 1]``).

        Raises
        ------
        ValueError
            When ``target`` is not a label of the model.
        """
        return [(p, heat.at()) for p, heat in self.predict_and_place(images, target, batch_size)]

    def predict_and_place(
        self, images: Sequence[XrayImage], target: str = "covid", batch_size: int = 16
    ) -> list[tuple[Prediction, CamHeat]]:
        """:meth:`predict_and_explain` with each heat map not yet resampled to its image.

        Parameters
        ----------
        images : sequence of XrayImage
            The radiographs.
        target : str
            Class label whose score is explained (default ``"covid"``), or ``"predicted"``.
        batch_size : int
            Images per forward pass.

        Returns
        -------
        list of (Prediction, CamHeat)
            Per image, the prediction and its heat map as a :class:`CamHeat`, whose
            ``at()`` is exactly the array :meth:`predict_and_explain` returns and whose
            ``at(shape)`` is the same map made directly at ``shape``.

        Raises
        ------
        ValueError
            When ``target`` is not a label of the model.
        """
        images = list(images)
        predictions, cams, boxes = self._explain(images, target, batch_size, predict=True)
        assert predictions is not None
        out = []
        for i, (image, prediction) in enumerate(zip(images, predictions, strict=True)):
            out.append((prediction, self._cam_heat(image, cams, boxes, i)))
        return out

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
        _, cams, boxes = self._explain([image], target, 1, predict=False)
        if not self.members:
            #: Where the network input lies on the source (fractions top, bottom, left, right);
            #: None when it covers the whole image (no lung crop).
            self.last_box = boxes[0][0]
            return cams[0][0]
        total = torch.zeros((1, 1, self._size, self._size))
        for member, member_cams, member_boxes in zip(self.members, cams, boxes, strict=True):
            member.last_box = member_boxes[0]
            total += _resize(member_cams[0], (self._size, self._size))
        return (total[0, 0] / len(self.members)).clamp_(0.0, 1.0).numpy()

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
        _, cams, boxes = self._explain([image], target, 1, predict=False)
        heat = self._heat(image, cams, boxes, 0)
        logger.debug(
            "%s heat map %dx%d for %s (max %.3f)",
            self.method,
            *image.shape,
            target,
            float(heat.max()),
        )
        return heat

    def _heat(
        self, image: XrayImage, cams: list[list[np.ndarray]], boxes: list[list[Any]], i: int
    ) -> np.ndarray:
        """Heat map of image ``i`` of a pass from each network's CAM and lung box."""
        return self._cam_heat(image, cams, boxes, i).at()

    def _cam_heat(
        self, image: XrayImage, cams: list[list[np.ndarray]], boxes: list[list[Any]], i: int
    ) -> CamHeat:
        """The :class:`CamHeat` of image ``i`` of a pass (and each network's ``last_box``)."""
        for net, net_boxes in zip(self._networks(), boxes, strict=True):
            net.last_box = net_boxes[i]
        return CamHeat([c[i] for c in cams], [b[i] for b in boxes], image.shape)


class CamHeat:
    """A heat map before resampling: each network's CAM and where it lies on the source.

    :meth:`at` makes the heat map at any resolution with the steps of
    :meth:`Explainer.heatmap`: each network's CAM resized bilinearly onto the whole image or
    into its lung box, the networks' maps averaged, clipped to ``[0, 1]``. ``at()`` (the
    source's shape) *is* :meth:`Explainer.heatmap`'s array. ``at(small)`` stands for that
    array area-averaged down to ``small`` without making it: each pixel is the CAM sampled
    bilinearly at the pixel's centre, times the share of the pixel that the lung box covers
    (so the box's edges fall where they fall on the source). It differs from the area average
    only by the curvature of the CAM within one pixel (a fraction of a grey level at the
    Secondary Capture's size) and costs a fraction of the source-size map.

    Parameters
    ----------
    cams : sequence of numpy.ndarray
        One ``(S, S)`` CAM in ``[0, 1]`` per network (one for a single model).
    boxes : sequence
        Per network, the lung box the CAM covers as fractions ``(top, bottom, left, right)``
        of the source, or None for the whole image.
    shape : tuple of int
        ``(rows, columns)`` of the source image.

    Raises
    ------
    ValueError
        When there is no CAM, or CAMs and boxes differ in number.
    """

    def __init__(
        self, cams: Sequence[np.ndarray], boxes: Sequence[Any], shape: tuple[int, int]
    ) -> None:
        if not cams or len(cams) != len(boxes):
            raise ValueError(f"{len(cams)} CAMs and {len(boxes)} boxes: need one box per CAM")
        self.cams = tuple(cams)
        self.boxes = tuple(boxes)
        #: ``(rows, columns)`` of the source image, the shape of :meth:`at` by default.
        self.shape = (int(shape[0]), int(shape[1]))

    def at(self, shape: tuple[int, int] | None = None) -> np.ndarray:
        """The heat map at ``shape`` (default: the source's), ``float32`` in ``[0, 1]``.

        Parameters
        ----------
        shape : tuple of int, optional
            ``(rows, columns)`` of the result; the lung boxes scale with it.

        Returns
        -------
        numpy.ndarray
        """
        shape = self.shape if shape is None else (int(shape[0]), int(shape[1]))
        if shape == self.shape:
            place = _place
        else:

            def place(cam: np.ndarray, shape: tuple[int, int], box: Any) -> np.ndarray:
                return _place_reduced(cam, self.shape, shape, box)

        heat = place(self.cams[0], shape, self.boxes[0])
        if len(self.cams) > 1:
            for cam, box in zip(self.cams[1:], self.boxes[1:], strict=True):
                heat += place(cam, shape, box)
            heat /= len(self.cams)
            np.clip(heat, 0.0, 1.0, out=heat)
        return heat


class _CamProbe:
    """Hooks of one pass on one network: CAM-layer activations and logits with a short graph.

    The forward runs under ``torch.no_grad`` (as :meth:`Predictor.analyse` does). At the CAM
    layer the hook turns gradients on and hands the rest of the network a detached copy of the
    activations that requires grad, so the graph starts there; at the network's output the
    second hook keeps the logits (with that graph), turns gradients off again and passes on
    detached logits. The ``no_grad`` context restores the mode in any case when it exits.
    """

    def __init__(self, model: nn.Module, layer: nn.Module | None) -> None:
        if layer is None:
            raise BundleError("a CAM probe needs the network's Grad-CAM layer")
        self.activations: list[torch.Tensor] = []
        self.logits: list[torch.Tensor] = []
        #: ``(width, height)`` of the network input of each batch (the CAM's output size).
        self.sizes: list[tuple[int, int]] = []
        self._handles = [
            layer.register_forward_hook(self._at_layer),
            model.register_forward_hook(self._at_output),
        ]

    def _at_layer(self, _module: nn.Module, _args: Any, out: torch.Tensor) -> torch.Tensor:
        torch.set_grad_enabled(True)
        acts = out.detach().requires_grad_(True)
        self.activations.append(acts)
        return acts

    def _at_output(self, _module: nn.Module, args: Any, out: torch.Tensor) -> torch.Tensor:
        self.logits.append(out)
        self.sizes.append((int(args[0].shape[-1]), int(args[0].shape[-2])))
        torch.set_grad_enabled(False)
        return out.detach()

    def clear(self) -> None:
        """Drop the tensors (and graphs) of the pass."""
        self.activations.clear()
        self.logits.clear()
        self.sizes.clear()

    def remove(self) -> None:
        """Remove the hooks and drop the tensors."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.clear()


def _formulas(cam_class: type) -> Any:
    """An object with ``cam_class``'s CAM formulas and nothing else (no hooks, no model)."""
    empty = {"__init__": lambda self: None, "__del__": lambda self: None}
    return type(f"{cam_class.__name__}Formulas", (cam_class,), empty)()


def _scale_like_grad_cam(raw: np.ndarray, size: tuple[int, int]) -> list[np.ndarray]:
    """``pytorch_grad_cam``'s post-processing of a batch of raw CAMs ``(B, h, w)``.

    ReLU, min-max scaling and resize to ``size = (width, height)``
    (``BaseCAM.compute_cam_per_layer``), the
    mean over the one target layer and a second min-max scaling (``aggregate_multi_layers``),
    then NaN to 0 and clipping to ``[0, 1]`` as :meth:`Explainer.cam` always did.
    """
    from pytorch_grad_cam.utils.image import scale_cam_image

    scaled = scale_cam_image(np.maximum(raw, 0), size)[:, None, :]
    cam = scale_cam_image(np.mean(np.maximum(scaled, 0), axis=1))
    cam = np.nan_to_num(np.asarray(cam, dtype=np.float32), nan=0.0)
    return list(np.clip(cam, 0.0, 1.0))


def _place(small: np.ndarray, shape: tuple[int, int], box: Any) -> np.ndarray:
    """A network-input CAM placed on a ``shape`` image: whole image, or inside the lung box."""
    rows, cols = shape
    if box is None:
        big = _resize(small, (rows, cols))
        return big[0, 0].clamp_(0.0, 1.0).numpy().astype(np.float32, copy=False)
    # The network saw the lung crop only: its map goes back inside the crop box.
    t, b, left, r = box
    t, b = round(t * rows), max(round(b * rows), round(t * rows) + 1)
    left = round(left * cols)
    r = max(round(r * cols), left + 1)
    heat = np.zeros((rows, cols), dtype=np.float32)
    heat[t:b, left:r] = _resize(small, (b - t, r - left))[0, 0].clamp_(0.0, 1.0).numpy()
    return heat


def _box_rows_cols(shape: tuple[int, int], box: Any) -> tuple[int, int, int, int]:
    """The lung box in whole pixels of a ``shape`` image, as :func:`_place` rounds it."""
    rows, cols = shape
    if box is None:
        return 0, rows, 0, cols
    t, b, left, r = box
    t, b = round(t * rows), max(round(b * rows), round(t * rows) + 1)
    left = round(left * cols)
    return t, b, left, max(round(r * cols), left + 1)


def _axis_samples(n: int, per_pixel: float, lo: int, hi: int, cam_n: int) -> tuple:
    """Bilinear taps and box coverage of ``n`` output pixels along one axis (see below)."""
    # Output pixel i spans source pixels [i, i + 1) * per_pixel; its centre, in the CAM's index
    # space once the CAM is resized to the box [lo, hi) with align_corners=False, clamped at
    # the borders as torch clamps.
    centre = (np.arange(n, dtype=np.float64) + 0.5) * per_pixel
    u = np.clip((centre - lo) * cam_n / (hi - lo) - 0.5, 0.0, cam_n - 1)
    i0 = np.floor(u).astype(np.intp)
    i1 = np.minimum(i0 + 1, cam_n - 1)
    frac = (u - i0).astype(np.float32)
    start = np.arange(n, dtype=np.float64) * per_pixel
    cover = np.clip(np.minimum(start + per_pixel, hi) - np.maximum(start, lo), 0.0, None)
    return i0, i1, frac, (cover / per_pixel).astype(np.float32)


def _place_reduced(
    small: np.ndarray, source: tuple[int, int], shape: tuple[int, int], box: Any
) -> np.ndarray:
    """:func:`_place` on a ``source`` image, area-averaged to ``shape``, made at ``shape``.

    Each output pixel is the CAM sampled bilinearly at the pixel's centre times the share of
    the pixel inside the lung box (whose edges are rounded to whole source pixels, as
    :func:`_place` rounds them). Inside the box this is the area average up to the CAM's
    curvature within a pixel; on its edges it is the area average of the partly covered pixel.
    """
    cam = np.ascontiguousarray(small, dtype=np.float32)
    if box is None:  # the whole image: a plain bilinear resize (OpenCV's equals torch's here)
        import cv2

        heat = cv2.resize(cam, (shape[1], shape[0]), interpolation=cv2.INTER_LINEAR)
        return np.clip(heat, 0.0, 1.0, out=heat)
    t, b, left, r = _box_rows_cols(source, box)
    r0, r1, rf, rcover = _axis_samples(shape[0], source[0] / shape[0], t, b, cam.shape[0])
    c0, c1, cf, ccover = _axis_samples(shape[1], source[1] / shape[1], left, r, cam.shape[1])
    rows = cam[r0] * (1.0 - rf)[:, None] + cam[r1] * rf[:, None]
    heat = rows[:, c0] * (1.0 - cf) + rows[:, c1] * cf
    heat *= rcover[:, None]
    heat *= ccover
    return np.clip(heat, 0.0, 1.0, out=heat)


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


@lru_cache(maxsize=8)
def _overlay_lut(alpha: float) -> np.ndarray:
    """``uint8 (256, 256, 3)``: the overlay colour of (heat level, gray level), both 0..255."""
    level = np.arange(256, dtype=np.float64) / 255.0
    weight = (alpha * np.sqrt(level))[:, None, None]  # by heat
    colour = _jet(level)[:, None, :]  # by heat
    gray = level[None, :, None]
    lut = np.round(((1.0 - weight) * gray + weight * colour) * 255.0).astype(np.uint8)
    lut.flags.writeable = False
    return lut


def _levels(values: np.ndarray) -> np.ndarray:
    """``values`` in ``[0, 1]`` (NaN as 0, beyond clipped) as ``uint8`` levels 0..255 (rounded)."""
    out = np.multiply(values, np.float32(255.0), dtype=np.float32)  # a copy; inf stays inf
    np.rint(out, out=out)
    np.clip(out, 0.0, 255.0, out=out)
    out[np.isnan(out)] = 0.0
    return out.astype(np.uint8)


def overlay(image: XrayImage | np.ndarray, heatmap: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """Blend a heat map in a jet colour map over the grayscale radiograph.

    The colour is weighted by the heat (``alpha * sqrt(heat)``) so that cold regions keep the
    plain radiograph and hot regions turn yellow to red. Heat and gray are quantised to 256
    levels and the blend is one look-up in a ``256 x 256`` colour table per pixel (vectorised).

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
    # One flat index per pixel (heat level * 256 + gray level): one gather instead of numpy's
    # two-array fancy indexing, which is about four times slower and gives the same colours.
    index = _levels(heat).astype(np.intp)
    index <<= 8
    index |= _levels(pixels)
    return np.take(_overlay_lut(float(alpha)).reshape(-1, 3), index, axis=0)


def hot_region_outline(
    heatmap: np.ndarray | CamHeat, level: float = 0.5, max_points: int = 64, work_size: int = 256
) -> np.ndarray:
    """Closed polygon around the largest connected region where ``heat >= level * max``.

    Parameters
    ----------
    heatmap : numpy.ndarray or CamHeat
        ``(H, W)`` heat map; or a :class:`CamHeat`, whose map is then made directly at the
        work size (``CamHeat.at``) instead of being area-averaged down from ``(H, W)``.
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

    if isinstance(heatmap, CamHeat):
        heat = None
        rows, cols = heatmap.shape
    else:
        heat = np.nan_to_num(np.asarray(heatmap, dtype=np.float32))
        if heat.ndim != 2 or min(heat.shape) < 1:
            raise ValueError(f"heat map must be a 2-D array, got shape {heat.shape}")
        rows, cols = heat.shape
    if not 0.0 < level <= 1.0:
        raise ValueError(f"level must be in (0, 1], got {level}")
    max_points = max(int(max_points), 4)
    scale = min(1.0, work_size / max(rows, cols))
    h, w = max(1, round(rows * scale)), max(1, round(cols * scale))
    if heat is None:
        small = np.nan_to_num(heatmap.at((h, w)))  # type: ignore[union-attr]
    elif (h, w) != heat.shape:
        small = cv2.resize(heat, (w, h), interpolation=cv2.INTER_AREA)
    else:
        small = heat
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
