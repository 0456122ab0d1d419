"""``dicom-covid heatmap`` (overlays, gallery) and ``dicom-covid tsne`` with throw-away models."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import make_throwaway_bundle
from PIL import Image
from pydicom.data import get_testdata_file
from typer.testing import CliRunner

from dicom_covid.analysis.tsne import classifier_head, tsne_2d
from dicom_covid.cli.main import app
from dicom_covid.inference import DISCLAIMER, Predictor
from dicom_covid.models import BACKBONES, build_model, embed
from dicom_covid.reader import read_image
from dicom_covid.training.data import LABELS, read_manifest

runner = CliRunner()


@pytest.fixture(scope="module")
def throwaway(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A bundle with a randomly initialised EfficientNet-Lite0 (default model)."""
    return make_throwaway_bundle(tmp_path_factory.mktemp("bundle") / "bundle", seed=2)


@pytest.fixture(scope="module")
def tiny_data(cxr_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data folder whose manifest lists 4 test images per class (absolute image paths)."""
    rows = read_manifest(cxr_data, "test")
    root = tmp_path_factory.mktemp("tiny")
    columns = list(rows[0].extra)
    picked = []
    for label in LABELS:
        of_label = [r for r in rows if r.label == label]
        picked += of_label[:: max(1, len(of_label) // 4)][:4]
    with (root / "manifest.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        for r in picked:
            writer.writerow({**r.extra, "path": str(r.path.resolve())})
    return root


def test_heatmap_overlay_png(throwaway: Path, sample_dir: Path, tmp_path: Path) -> None:
    src = sample_dir / "chest_cr_mono1.dcm"
    out = tmp_path / "heat"
    args = ["heatmap", str(src), "--bundle", str(throwaway), "--output-dir", str(out)]
    result = runner.invoke(app, [*args, "--method", "gradcam++", "--target", "covid"])
    assert result.exit_code == 0, result.output
    png = out / "chest_cr_mono1_gradcampp_covid.png"
    assert png.is_file() and str(png) in result.stdout and DISCLAIMER in result.stdout

    image = read_image(src)
    with Image.open(png) as im:
        assert im.text["Disclaimer"] == DISCLAIMER
        rgb = np.asarray(im.convert("RGB")).astype(int)
    rows, cols = image.shape
    # Image part: the source size (<= 1024) with a text band below it.
    assert rgb.shape[1] == cols and rows + 40 < rgb.shape[0] < rows + 400
    picture, band = rgb[:rows], rgb[rows:]
    # The overlay is coloured, a grayscale radiograph would have R == G == B everywhere.
    assert np.abs(picture[..., 0] - picture[..., 2]).mean() > 10
    gray = np.round(np.clip(image.pixels, 0, 1) * 255)
    assert np.abs(picture.mean(axis=2) - gray).mean() > 5
    # Text was burned into the band: yellow (disclaimer) and white pixels on black.
    yellow = (band[..., 0] > 200) & (band[..., 1] > 180) & (band[..., 2] < 80)
    assert yellow.sum() > 200
    assert (band.min(axis=2) > 200).sum() > 200

    # --target predicted explains the most probable class; --max-side scales the picture.
    predicted = Predictor(throwaway).predict(image).label
    result = runner.invoke(app, [*args, "--max-side", "256"])
    assert result.exit_code == 0, result.output
    with Image.open(out / f"chest_cr_mono1_gradcam_{predicted}.png") as im:
        assert im.width == round(cols * 256 / max(rows, cols))


def test_heatmap_rejections_and_usage_errors(
    throwaway: Path, sample_dir: Path, tmp_path: Path
) -> None:
    shutil.copy(sample_dir / "chest_cr_mono2.dcm", tmp_path / "good.dcm")
    shutil.copy(get_testdata_file("CT_small.dcm"), tmp_path / "ct.dcm")
    out = tmp_path / "heat"
    base = ["heatmap", "--bundle", str(throwaway), "--output-dir", str(out)]
    result = runner.invoke(app, [*base, str(tmp_path / "good.dcm"), str(tmp_path / "ct.dcm")])
    assert result.exit_code == 2, result.output
    assert "REJECTED (wrong_modality)" in result.stdout
    written = list(out.iterdir())
    assert len(written) == 1 and written[0].name.startswith("good_gradcam_")

    good = str(tmp_path / "good.dcm")
    assert runner.invoke(app, [*base, good, "--method", "nope"]).exit_code == 2
    assert runner.invoke(app, [*base, good, "--target", "tumour"]).exit_code == 2
    assert runner.invoke(app, ["heatmap", "--bundle", str(throwaway), good]).exit_code == 2
    missing = runner.invoke(app, [*base, good, "--model", "resnet50"])
    assert missing.exit_code == 1 and "resnet50" in missing.output


def test_heatmap_gallery(throwaway: Path, tiny_data: Path, tmp_path: Path) -> None:
    output = tmp_path / "figs" / "gallery.png"
    args = [
        "heatmap", "--gallery", "--bundle", str(throwaway), "--data", str(tiny_data),
        "--per-class", "1", "--max-scan", "4", "--output", str(output), "--no-progress",
    ]  # fmt: skip
    result = runner.invoke(app, [*args, "--split", "test"])
    assert result.exit_code == 0, result.output
    with Image.open(output) as im:
        assert 300 < im.width < 2000 and 400 < im.height < 2000
        rgb = np.asarray(im.convert("RGB")).astype(int)
    # At least one cell holds a coloured overlay.
    assert (np.abs(rgb[..., 0] - rgb[..., 2]) > 60).sum() > 1000
    assert DISCLAIMER in result.stdout
    # Every image shown is credited with its source and licence.
    credits = (output.parent / "gallery_credits.md").read_text()
    cells = [line for line in credits.splitlines() if line.startswith("| ") and "/" in line]
    assert 1 <= len(cells) <= 6
    manifest = {r.extra["original_file"]: r.extra["license"] for r in read_manifest(tiny_data)}
    for line in cells:
        original, licence = line.split(" | ")[3], line.split(" | ")[2]
        assert manifest[original] == licence

    # --redistributable draws only images whose licence allows publishing them.
    from dicom_covid.analysis.galleries import licence_allows_gallery, may_show

    allowed = [r for r in read_manifest(tiny_data) if may_show(r)]
    result = runner.invoke(app, [*args, "--redistributable"])
    if not allowed:
        assert result.exit_code == 2 and "redistributable" in result.output
        return
    assert result.exit_code == 0, result.output
    credits = (output.parent / "gallery_credits.md").read_text()
    shown = [ln.split(" | ")[2] for ln in credits.splitlines() if ln.startswith("| ") and "/" in ln]
    assert shown and all(licence_allows_gallery(licence) for licence in shown)


def test_tsne_command(throwaway: Path, tiny_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "tsne"
    args = ["tsne", "--bundle", str(throwaway), "--data", str(tiny_data), "--split", "test"]
    result = runner.invoke(app, [*args, "--output-dir", str(out), "--no-progress"])
    assert result.exit_code == 0, result.output
    png = out / "tsne_efficientnet_lite0_test.png"
    with Image.open(png) as im:
        assert im.width > 1000 and im.height > 500
    with (out / "tsne_efficientnet_lite0_test.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 12
    assert sorted({r["label"] for r in rows}) == list(LABELS)
    assert all(r["source"] for r in rows) and all(r["disclaimer"] == DISCLAIMER for r in rows)
    xy = np.array([[float(r["tsne_x"]), float(r["tsne_y"])] for r in rows])
    assert np.isfinite(xy).all() and xy.std(axis=0).min() > 0
    # The probabilities from the embedding match the predictor's.
    predictor = Predictor(throwaway)
    first = read_image(rows[0]["path"])
    expected = predictor.predict(first).probabilities
    got = {lab: float(rows[0][f"p_{lab}"]) for lab in LABELS}
    assert got == pytest.approx(expected, abs=1e-4)
    assert rows[0]["predicted"] == max(expected, key=expected.get)


def test_tsne_2d_is_seeded_and_handles_small_sets() -> None:
    rng = np.random.default_rng(0)
    feats = np.vstack([rng.normal(m, 1.0, (6, 80)) for m in (0.0, 8.0)]).astype(np.float32)
    a, b = tsne_2d(feats, seed=3), tsne_2d(feats, seed=3)
    np.testing.assert_array_equal(a, b)
    assert a.shape == (12, 2)
    # Two well separated clusters stay apart.
    d_within = np.linalg.norm(a[:6] - a[:6].mean(0), axis=1).mean()
    d_between = np.linalg.norm(a[:6].mean(0) - a[6:].mean(0))
    assert d_between > 2 * d_within
    from dicom_covid.errors import DataError

    with pytest.raises(DataError, match="at least 5"):
        tsne_2d(feats[:4])


@pytest.mark.parametrize("backbone", sorted(BACKBONES))
def test_classifier_head_maps_embeddings_to_logits(backbone: str) -> None:
    torch.manual_seed(0)
    model = build_model(backbone).eval()
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        logits = model(x)
        via_head = classifier_head(model)(embed(model, x))
    torch.testing.assert_close(via_head, logits, atol=1e-4, rtol=1e-4)
