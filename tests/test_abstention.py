"""Abstention ("indeterminate") and the transfer recipe's pieces: preprocessing, leave-out runs.

The committed default model is checked on the generated and packaged non-chest corpus: none of
it may get "COVID-19 suspected", and at least 95 % must be flagged indeterminate.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from pydicom.data import get_testdata_file
from typer.testing import CliRunner

from dicom_covid.abstention import REASONS, AbstentionPolicy, FeatureDensity, pixel_reasons
from dicom_covid.bundle import Bundle
from dicom_covid.cli.main import app
from dicom_covid.prediction import DISCLAIMER, Prediction
from dicom_covid.preprocessing import Preprocessing
from dicom_covid.reader import read_image
from dicom_covid.training.data import balanced_weights, read_manifest
from dicom_covid.training.train import TRANSFER_PREPROCESSING, fit_temperature


def _prediction(**kw) -> Prediction:
    base = dict(
        probabilities={"covid": 0.9, "normal": 0.05, "pneumonia": 0.05},
        label="covid",
        covid_score=0.9,
        covid_threshold=0.5,
        covid_suspected=True,
        model_name="m",
        model_title="M",
        bundle_version="0",
    )
    base.update(kw)
    return Prediction(**base)


def test_prediction_outcomes_and_json() -> None:
    assert _prediction().outcome == "suspected"
    p = _prediction(covid_suspected=False, abstained=True, abstention_reasons=("blank_image",))
    assert p.outcome == "indeterminate"
    assert p.decision.startswith("Indeterminate") and "blank_image" in p.decision
    d = p.to_dict()
    assert d["outcome"] == "indeterminate" and d["abstention_reasons"] == ["blank_image"]
    assert d["disclaimer"] == DISCLAIMER
    json.dumps(d)


def test_pixel_reasons_flag_blank_and_constant_images_only() -> None:
    rng = np.random.default_rng(0)
    assert pixel_reasons(np.zeros((64, 64))) == ("blank_image",)
    assert pixel_reasons(np.full((64, 64), 0.5)) == ("blank_image",)
    assert pixel_reasons(np.full((64, 64), np.nan)) == ("blank_image",)
    mostly = np.zeros((64, 64))
    mostly[:3] = 1.0
    assert pixel_reasons(mostly) == ("blank_image",)
    assert pixel_reasons(rng.random((64, 64))) == ()
    assert pixel_reasons(read_image(get_testdata_file("RG1_UNCR.dcm")).pixels) == ()


def test_feature_density_separates_and_round_trips(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    train = np.concatenate([rng.normal(c, 1.0, (200, 16)) for c in (0.0, 3.0)])
    y = np.repeat([0, 1], 200)
    density = FeatureDensity.fit(train, y, dims=8)
    near = density.distance(rng.normal(0.0, 1.0, (50, 16)))
    far = density.distance(rng.normal(20.0, 1.0, (50, 16)))
    assert far.min() > near.max()
    density.save(tmp_path / "d.safetensors")
    again = FeatureDensity.load(tmp_path / "d.safetensors")
    np.testing.assert_allclose(again.distance(train[:5]), density.distance(train[:5]), rtol=1e-4)


def test_policy_from_facts_and_site_overrides() -> None:
    facts = {"lung_fraction": [0.1, 0.6], "ood": {"threshold": 12.0}, "uncertainty_margin": 0.05}
    policy = AbstentionPolicy.from_facts(facts)
    assert policy.ood_threshold == 12.0 and policy.lung_fraction == (0.1, 0.6)
    assert policy.reasons(lung_fraction=0.01) == ("no_lung_fields",)
    assert policy.reasons(ood_ratio=1.5) == ("out_of_distribution",)
    assert policy.reasons(covid_score=0.52, covid_threshold=0.5) == ("uncertain",)
    assert (
        policy.reasons(lung_fraction=0.3, ood_ratio=0.5, covid_score=0.9, covid_threshold=0.5) == ()
    )
    off = AbstentionPolicy.from_facts(facts, {"enabled": False})
    assert not off.abstains(("uncertain",)) and policy.abstains(("uncertain",))
    only = AbstentionPolicy.from_facts(facts, {"checks": ["blank_image"]})
    assert only.reasons(lung_fraction=0.01) == ()
    with pytest.raises(ValueError, match="unknown abstention setting"):
        AbstentionPolicy.from_facts(facts, {"margin": 0.1})
    with pytest.raises(ValueError, match="unknown abstention check"):
        AbstentionPolicy.from_facts(facts, {"checks": ["pediatric"]})
    assert set(REASONS) == set(AbstentionPolicy().checks)


def test_lung_crop_preprocessing_crops_a_chest_and_keeps_a_non_chest() -> None:
    prep = Preprocessing(96, TRANSFER_PREPROCESSING)
    chest = read_image(get_testdata_file("RG1_UNCR.dcm"))
    img, info = prep(chest.pixels)
    assert img.shape == (1, 96, 96) and 0.0 <= float(img.min()) <= float(img.max()) <= 1.0
    assert info["lung_crop"] and 0.1 < info["lung_fraction"] < 0.7
    t, b, left, r = info["lung_box"]
    assert 0 <= t < b <= 1 and 0 <= left < r <= 1 and (b - t) * (r - left) < 0.95
    _, flat = prep(np.zeros((300, 300), np.float32))
    assert not flat["lung_crop"] and "lung_box" not in flat


def test_balanced_weights_balance_classes(cxr_data: Path) -> None:
    rows = read_manifest(cxr_data, "train")
    w = balanced_weights(rows)
    assert np.isclose(w.sum(), 1.0)
    for label in ("covid", "normal", "pneumonia"):
        share = w[[r.label == label for r in rows]].sum()
        assert np.isclose(share, 1 / 3)
    # A small source gets more weight per image than a large one of the same label.
    per_image = {r.source: wi for r, wi in zip(rows, w, strict=True) if r.label == "covid"}
    assert per_image["ieee8023"] > per_image["c19r_covid"]


def test_fit_temperature_recovers_a_known_scale() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, (4000, 3))
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    targets = np.array([rng.choice(3, p=row) for row in p])
    assert abs(fit_temperature(logits * 2.0, targets) - 2.0) < 0.2


def test_default_model_never_suspects_covid_on_non_chest_images() -> None:
    from dicom_covid.inference import Predictor
    from dicom_covid.training.abstention_fit import non_chest_corpus

    bundle = Bundle()
    assert bundle.facts().raw.get("abstention"), "the default model has no abstention facts"
    predictor = Predictor()
    corpus = non_chest_corpus()
    assert len(corpus) >= 30
    preds = predictor.predict_batch([im for _, im in corpus])
    suspected = [n for (n, _), p in zip(corpus, preds, strict=True) if p.outcome == "suspected"]
    assert not suspected
    flagged = np.mean([p.abstained for p in preds])
    assert flagged >= 0.95, f"only {flagged:.2%} of non-chest images flagged"
    # The sample chest CR keeps its verdict.
    sample = Predictor().predict(read_image(get_testdata_file("RG1_UNCR.dcm")))
    assert sample.outcome in ("suspected", "not_suspected", "indeterminate")


def test_abstention_can_be_turned_off_per_site() -> None:
    from dicom_covid.inference import Predictor

    blank = read_image(get_testdata_file("RG1_UNCR.dcm"))
    blank = type(blank)(pixels=np.zeros_like(blank.pixels), source="blank", format="png")
    on = Predictor().predict(blank)
    off = Predictor(abstention={"enabled": False}).predict(blank)
    assert on.abstained and "blank_image" in on.abstention_reasons
    assert not off.abstained and "blank_image" in off.abstention_reasons


def test_crossval_trains_without_the_group_and_reports_it(cxr_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "cv"
    result = CliRunner().invoke(
        app,
        [
            "crossval",
            "run",
            "--leave-out",
            "figure1+actualmed",
            "--recipe",
            "transfer",
            "--data",
            str(cxr_data),
            "--output-dir",
            str(out),
            "--epochs",
            "1",
            "--image-size",
            "64",
            "--max-train-per-class",
            "4",
            "--max-val-per-class",
            "3",
            "--batch-size",
            "4",
            "--no-progress",
        ],
    )
    assert result.exit_code == 0, result.output
    held = json.loads((out / "heldout.json").read_text())
    facts = json.loads((out / "model.json").read_text())
    assert held["n"] == 52 and held["counts"]["covid"] == 34
    assert held["covid_auc"] is not None and len(held["covid_auc_ci"]) == 2
    assert not {"figure1", "actualmed"} & set(facts["training_data"]["sources"])
    assert facts["training_data"]["excluded_sources"] == ["actualmed", "figure1"]
    assert facts["preprocessing"]["pipeline"] == "lung_crop_clahe" and facts["temperature"] > 0
    report = CliRunner().invoke(app, ["crossval", "report", str(tmp_path)])
    assert report.exit_code == 0 and "figure1+actualmed | transfer" in report.output
    args = ["crossval", "run", "--leave-out", "nosuchsource", "--data", str(cxr_data)]
    bad = CliRunner().invoke(app, [*args, "--output-dir", str(tmp_path / "x")])
    assert bad.exit_code != 0
    assert "known sources" in bad.output + str(bad.exception), bad.output


def test_temperature_is_applied_to_probabilities(tmp_path: Path) -> None:
    from dicom_covid.inference import Predictor

    p = Predictor()
    image = read_image(get_testdata_file("RG1_UNCR.dcm"))
    x, _ = p.prepared(image)
    with torch.no_grad():
        logits = p.model(x[None]).float() / p.temperature
    np.testing.assert_allclose(
        p.probabilities([image])[0], torch.softmax(logits, 1)[0].numpy(), atol=1e-5
    )
