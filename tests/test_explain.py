"""Grad-CAM heat maps, overlay and hot-region outline (dicom_covid.explain)."""

from __future__ import annotations

import contextlib
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import make_throwaway_bundle
from matplotlib.path import Path as PolyPath
from pydicom.data import get_testdata_file

from dicom_covid.errors import BundleError
from dicom_covid.explain import (
    CAM_METHODS,
    CamHeat,
    Explainer,
    hot_region_outline,
    overlay,
    resolve_layer,
)
from dicom_covid.inference import Predictor
from dicom_covid.models import BACKBONES, build_model
from dicom_covid.reader import XrayImage, read_image
from dicom_covid.transforms import preprocess

LABELS = ("covid", "normal", "pneumonia")


def _synthetic_xray(rows: int = 260, cols: int = 300) -> XrayImage:
    """A smooth, non-square grayscale image (bright 'lungs' on a dark background)."""
    y, x = np.mgrid[0:rows, 0:cols].astype(np.float32)
    img = 0.2 + 0.6 * np.exp(-(((x - cols * 0.3) / 50) ** 2 + ((y - rows * 0.5) / 80) ** 2))
    img += 0.5 * np.exp(-(((x - cols * 0.7) / 45) ** 2 + ((y - rows * 0.5) / 70) ** 2))
    return XrayImage(pixels=np.clip(img, 0, 1).astype(np.float32), source="synthetic", format="png")


def _stub_predictor(name: str):
    """The parts of a Predictor that Explainer uses, for a random-weight registry backbone."""
    spec = BACKBONES[name]
    torch.manual_seed(0)
    model = build_model(name, len(LABELS)).eval()

    def prepared(image: XrayImage) -> tuple[torch.Tensor, dict]:
        return preprocess(image.pixels, spec.input_size, spec.mean, spec.std), {}

    return SimpleNamespace(
        model=model,
        labels=LABELS,
        facts=SimpleNamespace(gradcam_layer=spec.gradcam_layer),
        device=torch.device("cpu"),
        to_device=lambda x: x,
        autocast=contextlib.nullcontext,
        prepared=prepared,
        prepared_batch=lambda images: [prepared(image) for image in images],
    )


@pytest.fixture(scope="module")
def predictor(tmp_path_factory) -> Predictor:
    return Predictor(make_throwaway_bundle(tmp_path_factory.mktemp("bundle")))


@pytest.fixture(scope="module")
def chest() -> XrayImage:
    return read_image(get_testdata_file("RG1_UNCR.dcm"))


@pytest.mark.parametrize("name", list(BACKBONES))
def test_every_backbone_target_layer_gives_a_cam(name):
    stub = _stub_predictor(name)
    assert resolve_layer(stub.model, BACKBONES[name].gradcam_layer) is not None
    image = _synthetic_xray()
    explainer = Explainer(stub)
    spreads = []
    for target in LABELS:  # with random weights a class's CAM may be all negative (flat 0)
        heat = explainer.heatmap(image, target=target)
        assert heat.shape == image.shape
        assert heat.dtype == np.float32
        assert np.all(np.isfinite(heat))
        assert heat.min() >= 0.0 and heat.max() <= 1.0
        spreads.append(float(heat.max() - heat.min()))
        if spreads[-1] > 0.5:
            break
    assert max(spreads) > 0.5, f"{name}: every CAM is flat ({spreads})"


def test_heatmap_is_at_source_resolution(predictor, chest):
    explainer = Explainer(predictor)
    heat = explainer.heatmap(chest)
    assert heat.shape == chest.shape == (1955, 1841)
    assert heat.dtype == np.float32
    assert heat.min() >= 0.0 and heat.max() <= 1.0
    assert heat.max() > 0.5


def test_heatmap_maps_back_with_the_square_resize_geometry(predictor, chest):
    """Squashing the heat map back to S x S gives the network-resolution CAM again."""
    explainer = Explainer(predictor)
    cam = explainer.cam(chest)
    size = predictor.facts.input_size
    assert cam.shape == (size, size)
    heat = explainer.heatmap(chest)
    back = F.interpolate(torch.from_numpy(heat)[None, None], size=(size, size), mode="area")[0, 0]
    assert np.abs(back.numpy() - cam).max() < 0.05
    peak_cam = np.unravel_index(np.argmax(cam), cam.shape)
    peak_heat = np.unravel_index(np.argmax(heat), heat.shape)
    rows, cols = chest.shape
    assert abs(peak_heat[0] / rows - (peak_cam[0] + 0.5) / size) < 2 / size
    assert abs(peak_heat[1] / cols - (peak_cam[1] + 0.5) / size) < 2 / size


def test_gradcam_plus_plus_and_other_targets(predictor):
    image = _synthetic_xray()
    for method in ("gradcam++", "layercam"):
        heat = Explainer(predictor, method=method).heatmap(image, target="pneumonia")
        assert heat.shape == image.shape and heat.min() >= 0 and heat.max() <= 1


def test_gradients_reach_frozen_models(tmp_path):
    """Inference code may freeze parameters; Grad-CAM still needs a graph."""
    pred = Predictor(make_throwaway_bundle(tmp_path / "b"))
    for p in pred.model.parameters():
        p.requires_grad_(False)
    heat = Explainer(pred).heatmap(_synthetic_xray())
    assert heat.max() > 0
    assert all(p.grad is None for p in pred.model.parameters())


def test_explainer_errors(predictor):
    with pytest.raises(ValueError, match="unknown CAM method"):
        Explainer(predictor, method="nope")
    with pytest.raises(ValueError, match="unknown target"):
        Explainer(predictor).heatmap(_synthetic_xray(), target="tuberculosis")
    with pytest.raises(BundleError, match="gradcam_layer"):
        resolve_layer(predictor.model, "no.such.layer")
    assert set(CAM_METHODS) >= {"gradcam", "gradcam++"}


def _blobs(rows: int = 400, cols: int = 300) -> np.ndarray:
    y, x = np.mgrid[0:rows, 0:cols].astype(np.float32)
    big = np.exp(-(((x - 90) / 40) ** 2 + ((y - 250) / 60) ** 2))
    small = 0.9 * np.exp(-(((x - 230) / 12) ** 2 + ((y - 80) / 12) ** 2))
    return np.maximum(big, small).astype(np.float32)


def test_outline_surrounds_the_largest_hot_region():
    heat = _blobs()
    rows, cols = heat.shape
    outline = hot_region_outline(heat, level=0.5)
    assert outline.ndim == 2 and outline.shape[1] == 2
    assert 4 <= len(outline) <= 65
    assert np.array_equal(outline[0], outline[-1]), "polygon must be closed"
    assert outline[:, 0].min() >= 0 and outline[:, 0].max() <= cols
    assert outline[:, 1].min() >= 0 and outline[:, 1].max() <= rows
    poly = PolyPath(outline)
    assert poly.contains_point((90, 250)), "centre of the big blob is inside"
    assert not poly.contains_point((230, 80)), "the smaller blob is left out"
    # half-maximum of a Gaussian: x = 90 +- 40 * sqrt(ln 2) = 90 +- 33
    assert 50 < outline[:, 0].max() - outline[:, 0].min() < 85


@pytest.mark.parametrize("shape", [(1955, 1841), (64, 700)])
def test_outline_scales_to_large_and_flat_images(shape):
    rows, cols = shape
    heat = np.zeros(shape, dtype=np.float32)
    heat[rows // 4 : rows // 2, cols // 4 : cols // 2] = 1.0
    outline = hot_region_outline(heat, max_points=16)
    assert len(outline) <= 17
    xs, ys = outline[:, 0], outline[:, 1]
    tol = 1.5 * max(rows, cols) / 256 + 1  # traced on a copy at most 256 pixels a side
    assert abs(xs.min() - cols // 4) <= tol and abs(xs.max() - cols // 2) <= tol
    assert abs(ys.min() - rows // 4) <= tol and abs(ys.max() - rows // 2) <= tol


def test_outline_edge_cases():
    flat = np.zeros((50, 60), dtype=np.float32)
    border = hot_region_outline(flat)
    assert border.tolist() == [[0, 0], [60, 0], [60, 50], [0, 50], [0, 0]]
    spot = np.zeros((50, 60), dtype=np.float32)
    spot[10, 20] = 1.0
    tiny = hot_region_outline(spot)
    assert len(tiny) >= 4 and np.array_equal(tiny[0], tiny[-1])
    assert PolyPath(tiny).contains_point((20.5, 10.5))
    with pytest.raises(ValueError):
        hot_region_outline(flat, level=0)
    with pytest.raises(ValueError):
        hot_region_outline(np.zeros((3, 4, 5)))


def test_overlay_colours_hot_regions_only():
    image = _synthetic_xray()
    heat = np.zeros(image.shape, dtype=np.float32)
    heat[100:150, 100:150] = 1.0
    rgb = overlay(image, heat, alpha=0.5)
    assert rgb.shape == (*image.shape, 3) and rgb.dtype == np.uint8
    cold = rgb[10, 10].astype(int)
    assert np.ptp(cold) <= 1, "cold pixels stay gray"
    hot = rgb[125, 125].astype(int)
    assert hot[0] > hot[2] + 40, "hottest pixels turn red"
    with pytest.raises(ValueError):
        overlay(image, heat[:-1])
    with pytest.raises(ValueError):
        overlay(image, heat, alpha=2)


def test_overlay_is_the_colour_table_looked_up_per_pixel():
    """The vectorised overlay gives, pixel for pixel, the colour table's entry at (heat level,
    gray level), the levels rounded from [0, 1] with NaN as 0 and the rest clipped."""
    from dicom_covid.explain import _overlay_lut

    def level(v: np.ndarray) -> np.ndarray:  # in float32, as the map and the pixels come
        v = np.clip(np.nan_to_num(v, nan=0.0, posinf=1.0, neginf=0.0), 0.0, 1.0)
        return np.rint(v * np.float32(255.0)).astype(int)

    rng = np.random.default_rng(3)
    pixels, heat = rng.random((2, 70, 90), dtype=np.float32)
    edges = (np.arange(256, dtype=np.float32) + 0.5) / 255  # halfway between two levels
    heat[0, :] = [np.nan, np.inf, -np.inf, -0.3, 1.7, *edges[:85]]
    pixels[1, :] = [*np.nextafter(edges[:45], 1), *np.nextafter(edges[45:90], 0)]
    lut = _overlay_lut(0.45)
    expected = lut[level(heat), level(pixels)]
    assert np.array_equal(overlay(pixels, heat, alpha=0.45), expected)


# --- one pass: prediction and CAM from the same forward ---------------------------------------


def _two_pass_heatmap(predictor: Predictor, image: XrayImage, method: str = "gradcam"):
    """The heat map as it was made before the one-pass path: ``pytorch_grad_cam``'s own
    forward and full backward on the prepared input, then placed on the source."""
    import pytorch_grad_cam
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    from dicom_covid.explain import _place

    heats = []
    for member in predictor.members:
        x, info = member.prepared(image)
        x = x[None].detach().clone().requires_grad_(True)
        layer = resolve_layer(member.model, member.facts.gradcam_layer)
        cls = getattr(pytorch_grad_cam, CAM_METHODS[method])
        with torch.enable_grad(), cls(model=member.model, target_layers=[layer]) as cam:
            small = cam(input_tensor=x, targets=[ClassifierOutputTarget(0)])[0]
        member.model.zero_grad(set_to_none=True)
        small = np.clip(np.nan_to_num(np.asarray(small, dtype=np.float32)), 0.0, 1.0)
        heats.append(_place(small, image.shape, info.get("lung_box")))
    heat = heats[0]
    for other in heats[1:]:
        heat += other
    return np.clip(heat / len(heats), 0.0, 1.0)


def _assert_one_pass_matches_two_passes(predictor: Predictor, method: str = "gradcam") -> None:
    images = [
        _synthetic_xray(),
        _synthetic_xray(200, 180),
        read_image(get_testdata_file("RG1_UNCR.dcm")),
    ]
    explainer = Explainer(predictor, method)
    results = explainer.predict_and_explain(images, batch_size=2)
    assert len(results) == len(images)
    for image, (prediction, heat) in zip(images, results, strict=True):
        before = predictor.predict(image)
        for label, p in before.probabilities.items():
            assert abs(prediction.probabilities[label] - p) < 1e-4
        assert prediction.outcome == before.outcome
        assert prediction.abstention_reasons == before.abstention_reasons
        assert prediction.ood_score == pytest.approx(before.ood_score, abs=1e-4)
        expected = _two_pass_heatmap(predictor, image, method)
        assert heat.shape == image.shape and heat.dtype == np.float32
        assert np.abs(heat - expected).max() < 1e-4
        assert np.abs(explainer.heatmap(image) - expected).max() < 1e-4


@pytest.mark.parametrize("method", ["gradcam", "gradcam++"])
def test_one_pass_equals_the_two_pass_path(predictor, method):
    _assert_one_pass_matches_two_passes(predictor, method)


def test_one_pass_equals_the_two_pass_path_for_an_ensemble(tmp_path):
    from helpers import add_throwaway_model

    from dicom_covid.bundle import install_ensemble

    root = make_throwaway_bundle(tmp_path / "b", "efficientnet_lite0", input_size=96)
    add_throwaway_model(root, "alexnet", covid_threshold=0.7, seed=1, input_size=64)
    install_ensemble(
        "duo", ("alexnet", "efficientnet_lite0"), 0.3, {"note": "test"}, bundle_root=root
    )
    _assert_one_pass_matches_two_passes(Predictor(root, "duo"))


def test_one_pass_leaves_no_hooks_grads_or_grad_mode(predictor):
    model = predictor.model
    hooks = sum(len(m._forward_hooks) for m in model.modules())
    Explainer(predictor).predict_and_explain([_synthetic_xray()])
    assert sum(len(m._forward_hooks) for m in model.modules()) == hooks
    assert torch.is_grad_enabled()
    assert all(p.grad is None for p in model.parameters())


def test_one_pass_explains_each_images_predicted_class(predictor):
    """target="predicted" in one batched pass: each image's map is that of its own predicted
    class (as the two-pass ``heatmap(image, label)`` gives it), within 1e-4."""
    images = [
        _synthetic_xray(),
        _synthetic_xray(200, 180),
        read_image(get_testdata_file("RG1_UNCR.dcm")),
    ]
    explainer = Explainer(predictor)
    results = explainer.predict_and_explain(images, target="predicted", batch_size=2)
    for image, (prediction, heat) in zip(images, results, strict=True):
        assert np.abs(heat - explainer.heatmap(image, prediction.label)).max() < 1e-4
    with pytest.raises(ValueError, match="needs the prediction"):
        explainer._explain(images, "predicted", 2, predict=False)


def test_placed_heat_at_the_source_size_is_the_heat_map(predictor, chest):
    """predict_and_place gives the map predict_and_explain gives, made only when asked."""
    explainer = Explainer(predictor)
    ((prediction, heat),) = explainer.predict_and_place([chest])
    ((same, full),) = explainer.predict_and_explain([chest])
    assert prediction.probabilities == same.probabilities
    assert heat.shape == chest.shape
    assert np.array_equal(heat.at(), full)


@pytest.mark.parametrize("box", [None, (0.08, 0.83, 0.137, 0.9)])
@pytest.mark.parametrize("shape", [(820, 656), (256, 205), (97, 61)])
def test_placed_heat_at_a_smaller_size_is_the_area_average(box, shape):
    """CamHeat.at(small) stands for the source-size map area-averaged down (what the SC and
    the outline used to make from it): within 0.5 % of the heat range everywhere, lung-box
    edges included (measured: at most 0.25 %, at the smallest size)."""
    import cv2

    y, x = np.mgrid[0:192, 0:192].astype(np.float32)
    cams = [
        np.exp(-(((x - 120) / 30) ** 2 + ((y - 70) / 40) ** 2)),
        np.clip(1.0 - np.hypot(x - 50, y - 150) / 120, 0.0, 1.0),
    ]
    for used in (cams[:1], cams):
        heat = CamHeat(used, [box] * len(used), (2500, 2000))
        full = heat.at()
        area = cv2.resize(full, (shape[1], shape[0]), interpolation=cv2.INTER_AREA)
        small = heat.at(shape)
        assert small.shape == shape and small.dtype == np.float32
        assert small.min() >= 0.0 and small.max() <= 1.0
        assert np.abs(small - area).max() < 5e-3
        assert np.abs(small - area).mean() < 2e-4


def test_outline_from_placed_heat_matches_the_outline_of_the_map(predictor, chest):
    explainer = Explainer(predictor)
    ((_, heat),) = explainer.predict_and_place([chest])
    direct, via_map = hot_region_outline(heat), hot_region_outline(heat.at())
    rows, cols = chest.shape
    grid = np.stack(np.mgrid[0:rows:4, 0:cols:4][::-1], -1).reshape(-1, 2) + 0.5
    a = PolyPath(direct).contains_points(grid)
    b = PolyPath(via_map).contains_points(grid)
    assert (a & b).sum() / (a | b).sum() > 0.95


def test_camheat_needs_one_box_per_cam():
    with pytest.raises(ValueError, match="one box per CAM"):
        CamHeat([np.zeros((4, 4), np.float32)], [], (10, 10))
