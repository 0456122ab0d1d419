"""Lung-field segmenter, reference masks, heat share and ``dicom-covid lungs``.

Most tests use a synthetic data set (two dark ellipses as lungs) and a throw-away segmenter
trained for one epoch on it, so they need neither the development set nor torchxrayvision.
The shipped segmenter is checked against the real reference masks when both are present.
"""

from __future__ import annotations

import csv
import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
from helpers import ROOT, make_throwaway_bundle
from PIL import Image
from test_engine import Interrupted, killed_after_first_epoch, same_weights
from typer.testing import CliRunner

from dicom_covid.analysis.heat_study import _stratified
from dicom_covid.bundle import Bundle
from dicom_covid.cli.main import app
from dicom_covid.errors import BundleError, DataError
from dicom_covid.lungs import (
    LungSegmenter,
    ReferenceMasks,
    dice,
    find_mask_archive,
    heat_share,
    install_segmenter,
    postprocess,
    reference_cases,
    top_heat_share,
    train_segmenter,
)
from dicom_covid.reader import read_image
from dicom_covid.training.data import read_manifest

runner = CliRunner()


# --------------------------------------------------------------------------------------------
# synthetic data: a manifest of "radiographs" with two dark ellipses, and a masks archive
# --------------------------------------------------------------------------------------------


def _ellipses(rows: int, cols: int, shift: float = 0.0) -> np.ndarray:
    y, x = np.mgrid[0:rows, 0:cols] / np.array([rows, cols])[:, None, None]
    left = ((x - 0.3 - shift) / 0.14) ** 2 + ((y - 0.5) / 0.3) ** 2 <= 1
    right = ((x - 0.7 - shift) / 0.14) ** 2 + ((y - 0.5) / 0.3) ** 2 <= 1
    return left | right


def _write_synthetic(root: Path, wheel: bool = False) -> tuple[Path, Path]:
    """A data folder (manifest.csv + PNGs) and a masks archive (zip, or a wheel holding it)."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    members: dict[str, bytes] = {}
    rows = []
    splits = ["train", "train", "train", "val", "val", "test", "test", "test", "test"]
    for i, split in enumerate(splits):
        label = ("covid", "normal", "pneumonia")[i % 3]
        h, w = 48, 64
        lungs = _ellipses(h, w, shift=rng.uniform(-0.04, 0.04))
        img = np.where(lungs, 0.25, 0.8) + rng.normal(0, 0.03, (h, w))
        name = f"img{i}.png"
        Image.fromarray(np.clip(img * 255, 0, 255).astype(np.uint8)).save(root / "images" / name)
        big = Image.fromarray((_ellipses(2 * h, 2 * w) * 255).astype(np.uint8))
        if i != 8:  # one image without a mask
            buf = io.BytesIO()
            big.save(buf, format="PNG")
            members[f"semantic_masks_v7labs_lungs/orig{i}.png"] = buf.getvalue()
        rows.append(
            {
                "path": f"images/{name}",
                "label": label,
                "source": "ieee8023",
                "license": "CC BY 4.0",
                "original_file": f"ieee8023_hida6/images/orig{i}.jpg",
                "original_url": "https://example.org/synthetic",
                "width": w,
                "height": h,
                "split": split,
            }
        )
    with (root / "manifest.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    inner = io.BytesIO()
    with zipfile.ZipFile(inner, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    if wheel:
        archive = root / "torchxrayvision-1.5.7-py3-none-any.whl"
        with zipfile.ZipFile(archive, "w") as z:
            z.writestr("torchxrayvision/__init__.py", "")
            z.writestr("torchxrayvision/data/semantic_masks_v7labs_lungs.zip", inner.getvalue())
    else:
        archive = root / "semantic_masks_v7labs_lungs.zip"
        archive.write_bytes(inner.getvalue())
    return root, archive


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return _write_synthetic(tmp_path_factory.mktemp("lungdata"))


@pytest.fixture(scope="module")
def lung_bundle(tmp_path_factory: pytest.TempPathFactory, synthetic: tuple[Path, Path]) -> Path:
    """Throw-away bundle: random AlexNet (128 px, cheap) + lung U-Net trained 1 epoch at 32 px."""
    data, archive = synthetic
    root = make_throwaway_bundle(
        tmp_path_factory.mktemp("bundle") / "bundle", backbone="alexnet", seed=3
    )
    run = tmp_path_factory.mktemp("lungrun")
    arch = {
        "class": "monai.networks.nets.UNet",
        "args": {
            "spatial_dims": 2,
            "in_channels": 1,
            "out_channels": 1,
            "channels": [4, 8, 16],
            "strides": [2, 2],
            "num_res_units": 0,
        },
    }
    train_segmenter(
        data, run, masks=archive, epochs=1, input_size=32, architecture=arch, progress=False
    )
    install_segmenter(run, root)
    return root


# --------------------------------------------------------------------------------------------
# heat share, Dice, post-processing
# --------------------------------------------------------------------------------------------


def test_heat_share_synthetic() -> None:
    mask = np.zeros((20, 30), dtype=bool)
    mask[5:15, 5:20] = True
    inside = np.where(mask, 0.7, 0.0)
    outside = np.where(mask, 0.0, 0.3)
    assert heat_share(inside, mask) == pytest.approx(1.0)
    assert heat_share(outside, mask) == pytest.approx(0.0)
    assert heat_share(np.full(mask.shape, 0.4), mask) == pytest.approx(mask.mean())
    mixed = inside + outside
    expected = 0.7 * mask.sum() / (0.7 * mask.sum() + 0.3 * (~mask).sum())
    assert heat_share(mixed, mask) == pytest.approx(expected)
    assert np.isnan(heat_share(np.zeros(mask.shape), mask))
    assert top_heat_share(inside, mask) == pytest.approx(1.0)
    assert top_heat_share(outside, mask) == pytest.approx(0.0)
    ramp = np.tile(np.linspace(0, 1, 30), (20, 1))  # hottest 10 % = last 3 columns, outside
    assert top_heat_share(ramp, mask, top=0.1) == pytest.approx(0.0)
    assert top_heat_share(ramp, np.ones_like(mask), top=0.5) == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("heat", "mask", "match"),
    [
        (np.ones((4, 4)), np.ones((4, 5), bool), "same shape"),
        (np.ones((4,)), np.ones((4,), bool), "2-D"),
        (-np.ones((4, 4)), np.ones((4, 4), bool), "negative"),
        (np.full((4, 4), np.nan), np.ones((4, 4), bool), "NaN"),
    ],
)
def test_heat_share_bad_input(heat: np.ndarray, mask: np.ndarray, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        heat_share(heat, mask)
    with pytest.raises(ValueError, match=match):
        top_heat_share(heat, mask)


def test_top_heat_share_bad_fraction() -> None:
    with pytest.raises(ValueError, match="top"):
        top_heat_share(np.ones((4, 4)), np.ones((4, 4), bool), top=0.0)


def test_dice() -> None:
    a = np.zeros((10, 10), bool)
    b = np.zeros((10, 10), bool)
    assert dice(a, b) == 1.0
    a[:5] = True
    assert dice(a, b) == 0.0
    b[:5] = True
    assert dice(a, b) == 1.0
    b[:, :5] = False
    assert dice(a, b) == pytest.approx(2 * 25 / (50 + 25))
    with pytest.raises(ValueError, match="shape"):
        dice(a, b[:5])


def test_postprocess_keeps_two_largest_and_fills_holes() -> None:
    prob = np.zeros((40, 40), dtype=np.float32)
    prob[5:35, 3:17] = 0.9  # left lung
    prob[5:35, 22:37] = 0.9  # right lung
    prob[15:18, 8:11] = 0.1  # hole in the left lung
    prob[0:2, 0:2] = 0.9  # speck: third component
    out = postprocess(prob, threshold=0.5)
    assert out[16, 9] and not out[0, 0]
    assert out.sum() == 30 * 14 + 30 * 15
    # a second component far smaller than the largest is dropped
    prob[5:35, 22:37] = 0.0
    assert postprocess(prob, 0.5, min_component_fraction=0.05).sum() == 30 * 14
    assert postprocess(np.zeros((8, 8)), 0.5).sum() == 0


def test_package_exports_every_public_name() -> None:
    import dicom_covid.lungs as lungs

    for name in lungs.__all__:
        assert getattr(lungs, name) is not None, name
    with pytest.raises(AttributeError):
        lungs.no_such_name  # noqa: B018


def test_runtime_import_leaves_training_and_figures_out() -> None:
    """Inference loads the segmenter; training, installation and figures stay unloaded."""
    import subprocess
    import sys

    code = (
        "import sys; from dicom_covid.lungs import LungSegmenter, postprocess; "
        "import dicom_covid.lungs.segmenter; "
        "print(*(m for m in sys.modules if m.startswith('dicom_covid.lungs')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = out.stdout.split()
    assert "dicom_covid.lungs.segmenter" in loaded
    for heavy in ("training", "install", "figures"):
        assert f"dicom_covid.lungs.{heavy}" not in loaded


# --------------------------------------------------------------------------------------------
# reference masks and the segmenter on synthetic data
# --------------------------------------------------------------------------------------------


def test_reference_masks_from_zip_and_wheel(tmp_path: Path) -> None:
    data, archive = _write_synthetic(tmp_path / "a")
    _, whl = _write_synthetic(tmp_path / "b", wheel=True)
    for source in (archive, whl):
        cases = reference_cases(data, "test", source)
        assert len(cases) == 3  # the 4th test image has no mask
        for case in cases:
            assert case.mask.shape == case.pixels.shape == (48, 64)
            assert dice(case.mask, _ellipses(48, 64)) > 0.97
    assert len(ReferenceMasks(whl)) == 8


def test_mask_archive_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="pip install --no-deps torchxrayvision"):
        find_mask_archive(tmp_path / "absent.zip")
    bad = tmp_path / "bad.zip"
    bad.write_bytes(b"not a zip")
    with pytest.raises(DataError, match="not a readable zip"):
        ReferenceMasks(bad)
    data, archive = _write_synthetic(tmp_path / "c")
    manifest = data / "manifest.csv"
    manifest.write_text(manifest.read_text().replace("ieee8023", "kermany"))
    with pytest.raises(DataError, match="no image of split"):
        reference_cases(data, "test", archive)


def test_segmenter_from_bundle(lung_bundle: Path, synthetic: tuple[Path, Path]) -> None:
    seg = LungSegmenter(lung_bundle)
    facts = json.loads((lung_bundle / "models" / "lung_unet.json").read_text())
    assert seg.input_size == facts["input_size"] == 32
    assert facts["architecture"]["args"]["channels"] == [4, 8, 16]
    assert {"mean", "median", "min"} <= set(facts["dice"]["test"]["summary"])
    assert len(facts["dice"]["test"]["per_image"]) == 3
    meta = json.loads((lung_bundle / "configs" / "metadata.json").read_text())
    assert meta["dicom_covid"]["lung_segmenter"]["weights"] == "models/lung_unet.safetensors"
    image = read_image(synthetic[0] / "images" / "img5.png")
    mask = seg.mask(image)
    assert mask.shape == image.shape and mask.dtype == bool
    assert seg.mask(image.pixels).shape == image.shape
    with pytest.raises(ValueError, match="2-D"):
        seg.mask(np.zeros((3, 8, 8), dtype=np.float32))


def test_segmenter_bundle_errors(tmp_path: Path, lung_bundle: Path) -> None:
    plain = make_throwaway_bundle(tmp_path / "plain")
    meta_path = plain / "configs" / "metadata.json"
    meta = json.loads(meta_path.read_text())
    meta["dicom_covid"].pop("lung_segmenter", None)
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(BundleError, match="lungs train --install"):
        LungSegmenter(plain)
    meta["dicom_covid"]["lung_segmenter"] = {
        "weights": "models/lung_unet.safetensors",
        "facts": "models/lung_unet.json",
    }
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(BundleError, match="missing"):
        LungSegmenter(plain)
    for name in ("lung_unet.safetensors", "lung_unet.json"):
        (plain / "models" / name).write_bytes((lung_bundle / "models" / name).read_bytes())
    facts = json.loads((plain / "models" / "lung_unet.json").read_text())
    facts["architecture"]["class"] = "os.system"
    (plain / "models" / "lung_unet.json").write_text(json.dumps(facts))
    with pytest.raises(BundleError, match="not supported"):
        LungSegmenter(plain)
    facts["architecture"]["class"] = "monai.networks.nets.UNet"
    facts["architecture"]["args"]["channels"] = [8, 16, 32]
    (plain / "models" / "lung_unet.json").write_text(json.dumps(facts))
    with pytest.raises(BundleError, match="do not fit"):
        LungSegmenter(plain)
    with pytest.raises(BundleError, match="lungs train --output-dir"):
        install_segmenter(tmp_path / "no_run", plain)


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def test_cli_heat_share(lung_bundle: Path, synthetic: tuple[Path, Path], tmp_path: Path) -> None:
    data, _ = synthetic
    out = tmp_path / "hs"
    args = ["lungs", "heat-share", "--bundle", str(lung_bundle), "--lung-bundle", str(lung_bundle)]
    args += ["--data", str(data), "--split", "", "--max-per-class", "2", "--no-progress"]
    result = runner.invoke(app, [*args, "--output-dir", str(out)])
    assert result.exit_code == 0, result.output
    assert "RESEARCH USE ONLY" in result.stdout
    report = json.loads((out / "heat_share.json").read_text())
    model = report["models"]["alexnet"]
    assert report["n_images"] == 6 and len(model["per_image"]) == 6
    assert sorted(model["by_class"]) == ["covid", "normal", "pneumonia"]
    assert all(c["n"] == 2 for c in model["by_class"].values())
    for rec in model["per_image"]:
        assert np.isnan(rec["share"]) or 0.0 <= rec["share"] <= 1.0
        assert rec["target"] == rec["predicted"]
        assert 0.0 <= rec["lung_area"] <= 1.0
    assert (out / "heat_share.png").stat().st_size > 1000
    assert "alexnet" in (out / "heat_share.md").read_text()
    # the subsample is stratified and seeded
    rows = read_manifest(data)
    picked = [r.extra["path"] for r in _stratified(rows, 2, seed=0)]
    assert picked == [r["path"] for r in model["per_image"]]
    assert picked == [r.extra["path"] for r in _stratified(rows, 2, seed=0)]
    assert picked != [r.extra["path"] for r in _stratified(rows, 2, seed=1)]


@pytest.mark.parametrize(
    ("extra", "code", "text"),
    [
        (["--model", "nosuchnet"], 1, "not in the bundle"),
        (["--target", "cancer"], 2, "unknown target"),
        (["--method", "nosuchcam"], 2, "nosuchcam"),
        (["--split", "nosplit"], 1, "no rows for split"),
    ],
)
def test_cli_heat_share_errors(
    lung_bundle: Path, synthetic: tuple[Path, Path], tmp_path: Path, extra, code, text
) -> None:
    args = ["lungs", "heat-share", "--bundle", str(lung_bundle), "--lung-bundle", str(lung_bundle)]
    args += ["--data", str(synthetic[0]), "--split", "", "--output-dir", str(tmp_path / "o")]
    result = runner.invoke(app, [*args, *extra, "--no-progress"])
    assert result.exit_code == code, result.output
    assert text in result.output


def test_cli_train_and_evaluate(tmp_path: Path) -> None:
    data, archive = _write_synthetic(tmp_path / "d", wheel=True)
    bundle = make_throwaway_bundle(tmp_path / "bundle")
    run = tmp_path / "run"
    args = ["lungs", "train", "--data", str(data), "--masks", str(archive), "--output-dir"]
    args += [str(run), "--epochs", "1", "--input-size", "32", "--no-progress", "--install"]
    result = runner.invoke(app, [*args, "--bundle", str(bundle)])
    assert result.exit_code == 0, result.output
    assert "test Dice" in result.stdout and (bundle / "models" / "lung_unet.json").is_file()
    assert Bundle(bundle).metadata["dicom_covid"]["lung_segmenter"]
    out = tmp_path / "eval"
    args = ["lungs", "evaluate", "--data", str(data), "--masks", str(archive), "--lung-bundle"]
    args += [str(bundle), "--output-dir", str(out), "--contours", "2"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "lung_dice.json").read_text())
    assert report["summary"]["n"] == 3 and len(report["per_image"]) == 3
    assert (out / "lung_contours.png").is_file() and (out / "lung_dice.md").is_file()
    missing = runner.invoke(app, [*args[:4], str(tmp_path / "none.zip")])
    assert missing.exit_code == 2  # typer: --masks must exist


def test_a_killed_training_resumes_to_the_same_weights(
    synthetic: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Killed after epoch 1 and resumed, a 2-epoch U-Net run ends with the uninterrupted weights.

    The batch order and every MONAI augmentation's random state continue where they stopped.
    """
    import torch

    from dicom_covid.lungs import training as lung_training

    data, archive = synthetic
    kw = {"masks": archive, "epochs": 2, "input_size": 32, "batch_size": 2, "progress": False}
    whole = json.loads(lung_training.train_segmenter(data, tmp_path / "whole", **kw).read_text())
    with monkeypatch.context() as m:
        m.setattr(lung_training, "Engine", killed_after_first_epoch(lung_training.Engine))
        with pytest.raises(Interrupted):
            lung_training.train_segmenter(data, tmp_path / "killed", **kw)
    resumed = lung_training.train_segmenter(data, tmp_path / "killed", resume=True, **kw)
    resumed_facts = json.loads(resumed.read_text())

    def weights(run: str) -> dict:
        path = tmp_path / run / "checkpoint.pt"
        return torch.load(path, map_location="cpu", weights_only=False)["model"]

    assert same_weights(weights("whole"), weights("killed"))
    untimed = [
        [{k: v for k, v in h.items() if k != "seconds"} for h in f["training"]["history"]]
        for f in (whole, resumed_facts)
    ]
    assert untimed[0] == untimed[1] and [h["epoch"] for h in untimed[0]] == [1, 2]
    assert resumed_facts["training"]["best_epoch"] == whole["training"]["best_epoch"]
    assert resumed_facts["dice"]["test"]["summary"] == whole["dice"]["test"]["summary"]


# --------------------------------------------------------------------------------------------
# the shipped segmenter
# --------------------------------------------------------------------------------------------


def _shipped() -> LungSegmenter:
    try:
        return LungSegmenter()
    except BundleError as exc:
        pytest.skip(f"no lung segmenter in the shipped bundle ({exc})")


def test_shipped_segmenter_on_sample_dicoms(sample_dir: Path) -> None:
    seg = _shipped()
    for name in ("chest_cr_mono1.dcm", "chest_cr_jpegls.dcm"):
        image = read_image(sample_dir / name)
        mask = seg.mask(image)
        assert mask.shape == image.shape
        assert 0.08 < mask.mean() < 0.7, f"{name}: lung area {mask.mean():.3f}"


def test_shipped_segmenter_dice(cxr_data: Path) -> None:
    seg = _shipped()
    try:
        masks = ReferenceMasks()
    except DataError as exc:
        pytest.skip(f"reference lung masks not installed: {exc}")
    recorded = {p["path"]: p["dice"] for p in seg.facts["dice"]["test"]["per_image"]}
    cases = reference_cases(cxr_data, "test", masks, limit=4)
    for case in cases:
        measured = dice(seg.mask(case.pixels), case.mask)
        assert measured >= recorded[case.row.extra["path"]] - 0.01, case.row.extra["path"]
    assert ROOT.joinpath("monai_bundle", "models", "lung_unet.json").is_file()


def test_shipped_segmenter_batches_as_it_runs_one_by_one(sample_dir: Path) -> None:
    """One U-Net pass over images of different sizes gives each one its own map (eval mode),
    and the lung-crop pipeline in a batch gives each image the input it gets alone."""
    from dicom_covid.preprocessing import Preprocessing

    seg = _shipped()
    images = [
        read_image(sample_dir / name)
        for name in ("chest_cr_mono1.dcm", "covid19_cr_pa.dcm", "pneumonia_cr_pa.dcm")
    ]
    images.append(type(images[0])(pixels=images[0].pixels[::3, ::2], source="x", format="png"))
    together = seg.probabilities([im.pixels for im in images])
    assert together.shape == (len(images), seg.input_size, seg.input_size)
    for image, prob in zip(images, together, strict=True):
        assert np.abs(prob - seg.probability(image.pixels)).max() < 1e-5
    assert seg.lung_fractions(images) == pytest.approx([seg.lung_fraction(im) for im in images])
    assert seg.probabilities([]).shape == (0, seg.input_size, seg.input_size)
    spec = {
        "pipeline": "lung_crop_clahe",
        "base_size": 224,
        "lung_crop": {"margin": 0.08, "min_lung_fraction": 0.08},
        "clahe": {"clip_limit": 2.0, "tile_grid": 8},
    }
    pre = Preprocessing(192, spec, segmenter=seg)
    for (x, info), image in zip(pre.batch([im.pixels for im in images]), images, strict=True):
        alone, alone_info = pre(image.pixels)
        assert info == alone_info and info["lung_crop"]
        assert np.array_equal(x.numpy(), alone.numpy())
