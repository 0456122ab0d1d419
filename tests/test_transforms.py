"""Tests of :mod:`dicom_covid.transforms`: the one preprocessing path and the augmentation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dicom_covid.models import IMAGENET_MEAN, IMAGENET_STD
from dicom_covid.transforms import (
    ChestAugment,
    RepeatNormalize,
    RepeatNormalized,
    ResizeSquare,
    ResizeSquared,
    preprocess,
)


def _image(rows: int = 300, cols: int = 260, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((rows, cols), dtype=np.float32)


@pytest.mark.parametrize("size", [32, 224, 299, 512])
@pytest.mark.parametrize("as_tensor", [False, True])
@pytest.mark.parametrize("with_channel", [False, True])
def test_resize_square_shape_dtype_and_range(size, as_tensor, with_channel):
    img = _image()
    if with_channel:
        img = img[None]
    out = ResizeSquare(size)(torch.from_numpy(img) if as_tensor else img)
    assert isinstance(out, torch.Tensor)
    assert out.shape == (1, size, size)
    assert out.dtype == torch.float32
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0


def test_resize_square_clamps_overshoot():
    # a hard edge upsampled with an antialiased filter stays inside [0, 1]
    img = np.zeros((40, 40), np.float32)
    img[:, 20:] = 1.0
    out = ResizeSquare(400)(img)
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0


@pytest.mark.parametrize("size", [37, 50, 100])  # not 512/2^k: plain bilinear is exact there
def test_resize_square_antialiases_a_checkerboard(size):
    """A 1-pixel checkerboard averages to ~0.5; a plain bilinear resize aliases to near 0/1."""
    board = (np.indices((512, 512)).sum(axis=0) % 2).astype(np.float32)
    out = ResizeSquare(size)(board)
    assert float((out - 0.5).abs().max()) < 0.02
    aliased = torch.nn.functional.interpolate(
        torch.from_numpy(board)[None, None],
        size=(size, size),
        mode="bilinear",
        align_corners=False,
        antialias=False,
    )
    assert float((aliased - 0.5).abs().max()) > 0.4  # the test image really does alias


def test_resize_square_keeps_a_constant_image_constant():
    out = ResizeSquare(64)(np.full((123, 77), 0.3, np.float32))
    assert torch.allclose(out, torch.full_like(out, 0.3), atol=1e-6)


@pytest.mark.parametrize(
    ("mean", "std"), [(IMAGENET_MEAN, IMAGENET_STD), ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))]
)
def test_repeat_normalize_values(mean, std):
    img = torch.rand(1, 16, 16)
    out = RepeatNormalize(mean, std)(img)
    assert out.shape == (3, 16, 16)
    for c in range(3):
        torch.testing.assert_close(out[c], (img[0] - mean[c]) / std[c])


def test_dict_wrappers_match_the_array_transforms():
    img = _image()
    d = ResizeSquared(keys="image", size=64)({"image": img, "label": 1})
    assert d["label"] == 1
    torch.testing.assert_close(d["image"], ResizeSquare(64)(img))
    d = RepeatNormalized(keys=["image"], mean=IMAGENET_MEAN, std=IMAGENET_STD)(d)
    torch.testing.assert_close(
        d["image"], RepeatNormalize(IMAGENET_MEAN, IMAGENET_STD)(ResizeSquare(64)(img))
    )


def _augment(seed: int, img: torch.Tensor, **kwargs) -> torch.Tensor:
    return ChestAugment(generator=torch.Generator().manual_seed(seed), **kwargs)(img)


def test_chest_augment_is_repeatable_with_a_seeded_generator():
    img = ResizeSquare(128)(_image())
    torch.testing.assert_close(_augment(7, img), _augment(7, img))
    assert not torch.allclose(_augment(7, img), _augment(8, img))
    # successive calls of one instance draw new parameters
    aug = ChestAugment(generator=torch.Generator().manual_seed(7))
    assert not torch.allclose(aug(img), aug(img))


@pytest.mark.parametrize("seed", range(8))
def test_chest_augment_keeps_shape_and_range(seed):
    img = ResizeSquare(96)(_image(seed=seed))
    out = _augment(seed, img, degrees=20.0, intensity=0.4)
    assert out.shape == img.shape
    assert out.dtype == torch.float32
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    assert float((out - img).abs().mean()) > 0.0


def test_chest_augment_without_change_is_identity():
    img = ResizeSquare(64)(_image())
    out = _augment(0, img, degrees=0.0, scale=(1.0, 1.0), shift=0.0, intensity=0.0)
    torch.testing.assert_close(out, img, atol=1e-5, rtol=0)


@pytest.mark.parametrize("size", [224, 299])
def test_preprocess_returns_three_normalised_channels(size):
    out = preprocess(_image(), size, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    assert out.shape == (3, size, size)
    assert out.dtype == torch.float32
    assert float(out.min()) >= -1.0 and float(out.max()) <= 1.0
    torch.testing.assert_close(out[0], out[1])
    torch.testing.assert_close(out[1], out[2])
    white = preprocess(np.ones((50, 40), np.float32), size, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    torch.testing.assert_close(white, torch.ones(3, size, size))
