"""The lung-field U-Net at run time: network, post-processing and :class:`LungSegmenter`.

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

This module is what inference, preprocessing and the abstention check load; it imports neither
the training code nor matplotlib.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..bundle import Bundle
from ..errors import BundleError
from ..transforms import ResizeSquare

if TYPE_CHECKING:
    from ..reader import XrayImage

__all__ = ["DEFAULT_ARCHITECTURE", "LungSegmenter", "build_unet", "postprocess"]


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
        from ..models import load_checkpoint_weights

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
    def probabilities(self, images: Sequence[np.ndarray | torch.Tensor]) -> np.ndarray:
        """P(lung) at the network resolution for several images, in one forward pass.

        Parameters
        ----------
        images : sequence of array
            ``(H, W)`` pixels in ``[0, 1]`` (sizes may differ: each is resized to the network's
            input size on its own).

        Returns
        -------
        numpy.ndarray
            ``float32 (N, S, S)``. The network runs in eval mode (batch norm with its stored
            statistics), so an image's map does not depend on the others in the batch.
        """
        if not len(images):
            return np.zeros((0, self.input_size, self.input_size), dtype=np.float32)
        resize = ResizeSquare(self.input_size)
        x = torch.stack([resize(pixels) for pixels in images]).to(self.device)
        return torch.sigmoid(self.model(_zscore(x)))[:, 0].float().cpu().numpy()

    def probability(self, pixels: np.ndarray | torch.Tensor) -> np.ndarray:
        """P(lung) at the network resolution, ``float32 (S, S)``, for ``(H, W)`` pixels."""
        return self.probabilities([pixels])[0]

    def clean(self, prob: np.ndarray) -> np.ndarray:
        """The post-processed mask of a probability map (:func:`postprocess`, the facts' values)."""
        return postprocess(
            prob, self.threshold, self.keep_components, self.min_component_fraction, self.fill_holes
        )

    def lung_fractions(self, images: Sequence[XrayImage | np.ndarray]) -> list[float]:
        """:meth:`lung_fraction` of several images, with one forward pass for all of them.

        Parameters
        ----------
        images : sequence of XrayImage or numpy.ndarray
            Radiographs, or their ``(H, W)`` pixels in ``[0, 1]``.

        Returns
        -------
        list of float
        """
        pixels = [np.asarray(getattr(im, "pixels", im), dtype=np.float32) for im in images]
        return [float(self.clean(prob).mean()) for prob in self.probabilities(pixels)]

    def lung_fraction(self, image: XrayImage | np.ndarray) -> float:
        """Share of the image covered by the (post-processed) lung fields, at network size.

        Cheap (no resize to the source resolution): used by the abstention check
        ``no_lung_fields`` and by the lung-crop preprocessing.
        """
        return self.lung_fractions([image])[0]

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
