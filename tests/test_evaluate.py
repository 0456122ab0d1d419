"""Tests of ``dicom-covid evaluate``: metrics, the shortcut control and the report."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from helpers import make_throwaway_bundle
from PIL import Image
from sklearn.metrics import roc_auc_score
from typer.testing import CliRunner

from dicom_covid.analysis.evaluate import HEADLINE_METRICS, compute_metrics, to_json_ready
from dicom_covid.analysis.shortcut import (
    FEATURE_NAMES,
    extract_features,
    fit_shortcut,
    shortcut_features,
)
from dicom_covid.cli.main import app
from dicom_covid.inference import DISCLAIMER
from dicom_covid.training.data import LABELS, read_manifest
from dicom_covid.training.metrics import binary_auc, expected_calibration_error

runner = CliRunner()

COVID, NORMAL, PNEUMONIA = 0, 1, 2

# Six rows, predictions (argmax) [covid, normal, normal, normal, pneumonia, covid].
TARGETS = np.array([COVID, COVID, NORMAL, NORMAL, PNEUMONIA, PNEUMONIA])
PROBS = np.array(
    [
        [0.70, 0.20, 0.10],
        [0.30, 0.60, 0.10],
        [0.10, 0.80, 0.10],
        [0.20, 0.50, 0.30],
        [0.10, 0.20, 0.70],
        [0.50, 0.10, 0.40],
    ]
)


# --- compute_metrics on hand-made arrays ------------------------------------------------------


def test_compute_metrics_hand_computed_values() -> None:
    m = compute_metrics(TARGETS, PROBS, n_bootstrap=0)
    assert m["n"] == 6
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    covid = m["per_class"]["covid"]
    # TP 1, FN 1 (row 1), FP 1 (row 5), TN 3
    assert covid["n"] == 2
    assert covid["sensitivity"] == pytest.approx(1 / 2)
    assert covid["specificity"] == pytest.approx(3 / 4)
    assert covid["ppv"] == pytest.approx(1 / 2)
    normal = m["per_class"]["normal"]
    assert (normal["sensitivity"], normal["specificity"], normal["ppv"]) == pytest.approx(
        (1.0, 3 / 4, 2 / 3)
    )
    pneumonia = m["per_class"]["pneumonia"]
    assert (pneumonia["sensitivity"], pneumonia["specificity"], pneumonia["ppv"]) == (
        pytest.approx((1 / 2, 1.0, 1.0))
    )
    # P(covid): positives 0.7, 0.3; negatives 0.1, 0.2, 0.1, 0.5.
    # Pairs won: 0.7 beats all 4; 0.3 beats 3 of 4 -> 7 / 8.
    assert m["covid_auc"] == pytest.approx(7 / 8)
    assert covid["auc"] == pytest.approx(7 / 8)
    # P(normal): positives 0.8, 0.5; negatives 0.2, 0.6, 0.2, 0.1 -> (4 + 3) / 8.
    # P(pneumonia): positives 0.7, 0.4; negatives 0.1, 0.1, 0.1, 0.3 -> 8 / 8.
    assert m["macro_auc"] == pytest.approx((7 / 8 + 7 / 8 + 1.0) / 3)
    # infected (covid or pneumonia) vs normal from the argmax: only row 1 is wrong.
    assert m["infected_vs_normal_accuracy"] == pytest.approx(5 / 6)
    assert "accuracy_ci" not in m


def test_compute_metrics_matches_sklearn_on_random_data() -> None:
    rng = np.random.default_rng(3)
    targets = rng.integers(0, 3, size=300)
    logits = rng.normal(size=(300, 3)) + np.eye(3)[targets] * 1.5
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    m = compute_metrics(targets, probs, n_bootstrap=0)
    assert m["covid_auc"] == pytest.approx(roc_auc_score(targets == 0, probs[:, 0]))
    assert m["macro_auc"] == pytest.approx(roc_auc_score(targets, probs, multi_class="ovr"))
    assert m["accuracy"] == pytest.approx((probs.argmax(1) == targets).mean())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_binary_auc_matches_sklearn_with_ties(seed: int) -> None:
    rng = np.random.default_rng(seed)
    positive = rng.random(200) < 0.3
    score = np.round(rng.random(200) + positive * 0.3, 1)  # coarse: many ties
    assert binary_auc(positive, score) == pytest.approx(roc_auc_score(positive, score))
    assert np.isnan(binary_auc(np.zeros(5, bool), np.arange(5.0)))


def test_ece_perfectly_calibrated_is_zero() -> None:
    # confidence 0.8 everywhere and exactly 8 of 10 right
    probs = np.tile([0.8, 0.1, 0.1], (10, 1))
    targets = np.array([COVID] * 8 + [NORMAL] * 2)
    assert expected_calibration_error(targets, probs) == pytest.approx(0.0)
    assert compute_metrics(targets, probs, n_bootstrap=0)["ece"] == pytest.approx(0.0)


def test_ece_overconfident() -> None:
    # confidence 1.0 and half right: gap 0.5
    probs = np.tile([1.0, 0.0, 0.0], (10, 1))
    targets = np.array([COVID, NORMAL] * 5)
    assert expected_calibration_error(targets, probs) == pytest.approx(0.5)
    # two bins: 4 rows at 0.95 all right (gap 0.05), 6 rows at 0.6 with 3 right (gap 0.1)
    probs = np.array([[0.95, 0.03, 0.02]] * 4 + [[0.6, 0.3, 0.1]] * 6)
    targets = np.array([COVID] * 4 + [COVID, COVID, COVID, NORMAL, NORMAL, PNEUMONIA])
    expected = 0.4 * 0.05 + 0.6 * 0.1
    assert expected_calibration_error(targets, probs) == pytest.approx(expected)


def test_bootstrap_intervals_contain_point_estimate_and_are_seeded() -> None:
    rng = np.random.default_rng(0)
    targets = rng.integers(0, 3, size=150)
    logits = rng.normal(size=(150, 3)) + np.eye(3)[targets]
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    m = compute_metrics(targets, probs, n_bootstrap=300, seed=7)
    for name in HEADLINE_METRICS:
        lo, hi = m[f"{name}_ci"]
        assert lo <= m[name] <= hi, name
        assert hi - lo > 0.01, name  # 150 rows: the interval has some width
    again = compute_metrics(targets, probs, n_bootstrap=300, seed=7)
    assert again["accuracy_ci"] == m["accuracy_ci"]
    other = compute_metrics(targets, probs, n_bootstrap=300, seed=8)
    assert other["covid_auc_ci"] != m["covid_auc_ci"]
    assert m["bootstrap"]["resamples"] == 300
    assert "stratified" in m["bootstrap"]["method"]


def test_per_source_and_threshold_and_json() -> None:
    sources = ["a", "a", "a", "b", "b", "b"]
    m = compute_metrics(TARGETS, PROBS, sources, covid_threshold=0.4, n_bootstrap=20)
    a, b = m["per_source"]["a"], m["per_source"]["b"]
    assert (a["n"], b["n"]) == (3, 3)
    assert a["accuracy"] == pytest.approx(2 / 3)  # rows 0, 2 right
    assert b["accuracy"] == pytest.approx(2 / 3)  # rows 3, 4 right
    assert a["covid_auc"] == pytest.approx(1.0)  # covid 0.7, 0.3 vs normal 0.1
    assert np.isnan(b["covid_auc"])  # no covid row in source b
    assert b["class_counts"] == {"covid": 0, "normal": 1, "pneumonia": 2}
    at = m["covid_at_threshold"]
    # P(covid) >= 0.4 flags rows 0 and 5: one of two covid found, one of four others flagged
    assert (at["sensitivity"], at["specificity"], at["ppv"]) == pytest.approx((0.5, 0.75, 0.5))
    text = json.dumps(to_json_ready(m), allow_nan=False)
    assert json.loads(text)["per_source"]["b"]["covid_auc"] is None


def test_compute_metrics_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError):
        compute_metrics(TARGETS, PROBS[:, :2])
    with pytest.raises(ValueError):
        compute_metrics(np.array([], dtype=int), np.zeros((0, 3)))


# --- shortcut control --------------------------------------------------------------------------


def test_shortcut_features_of_a_synthetic_image() -> None:
    pixels = np.zeros((100, 200), np.float32)
    pixels[:5] = pixels[-5:] = 1.0  # bright top and bottom frame rows
    f = dict(zip(FEATURE_NAMES, shortcut_features(pixels), strict=True))
    assert (f["width"], f["height"], f["aspect_ratio"]) == (200, 100, 2.0)
    assert f["mean"] == pytest.approx(0.1)
    assert f["fraction_white"] == pytest.approx(0.1)
    assert f["fraction_black"] == pytest.approx(0.9)
    assert f["grey_levels"] == 2
    assert f["side_top"] == f["side_bottom"] == 1.0
    assert f["side_left"] == pytest.approx(0.1)
    assert f["corner_top_left"] == f["corner_bottom_right"] == 1.0
    assert 0.0 < f["frame_mean"] < 1.0
    assert f["p50"] == 0.0 and f["p99"] == 1.0


def test_shortcut_control_small_subset(cxr_data: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    control = fit_shortcut(cxr_data, max_rows=240, cache_dir=cache, progress=False)
    assert 200 <= control.n_train <= 250
    assert not control.cache_hit
    assert list((cache / "shortcut").glob("features-*.npz"))
    test_rows = read_manifest(cxr_data, "test")[::8]
    features, targets, rejected = extract_features(test_rows, progress=False)
    assert features.shape == (len(test_rows) - len(rejected), len(FEATURE_NAMES))
    probs = control.predict_proba(features)
    assert probs.shape == (len(targets), len(LABELS))
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-6)
    # non-diagnostic cues alone beat chance by far on this data (that is the point)
    accuracy = (probs.argmax(axis=1) == targets).mean()
    assert accuracy > 0.6
    assert binary_auc(targets == COVID, probs[:, COVID]) > 0.8
    # second fit: features from the cache, same model
    again = fit_shortcut(cxr_data, max_rows=240, cache_dir=cache, progress=False)
    assert again.cache_hit
    np.testing.assert_allclose(again.predict_proba(features), probs)


# --- end to end through the CLI ----------------------------------------------------------------


def _tiny_data(cxr_data: Path, root: Path, per_class: int = 4) -> Path:
    """Copy ``per_class`` test images of each label into ``root`` with a relative manifest."""
    rows = read_manifest(cxr_data, "test")
    chosen = []
    for label in LABELS:
        of_label = [r for r in rows if r.label == label]
        step = max(1, len(of_label) // per_class)
        chosen += of_label[::step][:per_class]
    (root / "images").mkdir(parents=True)
    with (root / "manifest.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "label", "source", "split"])
        for i, r in enumerate(chosen):
            rel = f"images/{i:02d}{r.path.suffix}"
            shutil.copyfile(r.path, root / rel)
            writer.writerow([rel, r.label, r.source, "test"])
        # a colour picture: the reader rejects it, the evaluation goes on
        colour = np.zeros((64, 64, 3), np.uint8)
        colour[..., 0] = 200
        Image.fromarray(colour).save(root / "images" / "colour.png")
        writer.writerow(["images/colour.png", "normal", "other", "test"])
    return root


def test_evaluate_cli_end_to_end(cxr_data: Path, tmp_path: Path) -> None:
    data = _tiny_data(cxr_data, tmp_path / "data")
    bundle = make_throwaway_bundle(tmp_path / "bundle")
    out_json = tmp_path / "out" / "metrics.json"
    report = tmp_path / "report"
    result = runner.invoke(
        app,
        [
            "evaluate",
            "--data", str(data),
            "--split", "test",
            "--bundle", str(bundle),
            "--output-json", str(out_json),
            "--report-dir", str(report),
            "--batch-size", "5",
            "--bootstrap", "50",
            "--shortcut-max-rows", "90",
            "--cache-dir", str(tmp_path / "cache"),
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert DISCLAIMER in result.output
    m = json.loads(out_json.read_text())
    for key in ("accuracy", "covid_auc", "macro_auc", "infected_vs_normal_accuracy", "ece"):
        assert isinstance(m[key], float) and 0.0 <= m[key] <= 1.0, key
    for key in HEADLINE_METRICS:
        lo, hi = m[f"{key}_ci"]
        assert lo <= m[key] <= hi
    assert m["n"] == 12
    assert m["n_rejected"] == 1
    assert m["rejected"][0]["path"] == "images/colour.png"
    assert m["rejected"][0]["reason"] == "colour"
    assert m["model"] == "efficientnet_lite0"
    assert m["bundle_version"]
    assert m["split"] == "test"
    assert m["disclaimer"] == DISCLAIMER
    assert set(m["per_class"]) == set(LABELS)
    assert sum(s["n"] for s in m["per_source"].values()) == 12
    sc = m["shortcut_control"]
    assert sc["n"] == 12 and 0.0 <= sc["accuracy"] <= 1.0 and sc["covid_auc"] is not None
    assert 80 <= sc["n_train"] <= 100
    assert sc["n_evaluated_rows_in_training"] == 0
    assert "predictions" not in m

    text = (report / "report.md").read_text()
    assert DISCLAIMER in text
    assert "shortcut control" in text.lower()
    for png in ("confusion_matrix.png", "roc_one_vs_rest.png", "roc_covid.png"):
        assert f"]({png})" in text
        with Image.open(report / png) as im:
            assert im.format == "PNG" and im.size[0] > 400 and im.size[1] > 400
    with (report / "predictions.csv").open() as fh:
        preds = list(csv.DictReader(fh))
    assert len(preds) == 12
    assert {"p_covid", "shortcut_p_covid"} <= set(preds[0])


def test_evaluate_cli_without_shortcut_and_bad_data(cxr_data: Path, tmp_path: Path) -> None:
    data = _tiny_data(cxr_data, tmp_path / "data", per_class=2)
    bundle = make_throwaway_bundle(tmp_path / "bundle")
    out_json = tmp_path / "m.json"
    args = ["evaluate", "--bundle", str(bundle), "--no-shortcut", "--bootstrap", "0"]
    result = runner.invoke(app, [*args, "--data", str(data), "--output-json", str(out_json)])
    assert result.exit_code == 0, result.output
    m = json.loads(out_json.read_text())
    assert m["shortcut_control"] is None
    assert "--no-shortcut" in m["shortcut_control_skipped"]
    assert m["n"] == 6 and m["split"] is None

    empty = tmp_path / "empty"
    empty.mkdir()
    result = runner.invoke(app, [*args, "--data", str(empty)])
    assert result.exit_code == 1
    assert "manifest.csv" in result.output
