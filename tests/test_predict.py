"""``dicom-covid predict`` with the bundle's default model on the committed sample DICOMs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from pydicom.data import get_testdata_file
from typer.testing import CliRunner

from dicom_covid.bundle import Bundle
from dicom_covid.cli.main import app
from dicom_covid.inference import DISCLAIMER, Predictor

runner = CliRunner()


def test_default_bundle_has_a_trained_default_model() -> None:
    bundle = Bundle()
    assert bundle.default_model in bundle.available()
    facts = bundle.facts()
    assert facts.labels == ("covid", "normal", "pneumonia")
    assert 0.0 < facts.covid_threshold < 1.0


def test_predict_samples_json(sample_dir: Path) -> None:
    files = sorted(sample_dir.glob("*.dcm"))
    assert len(files) >= 5
    result = runner.invoke(app, ["predict", "--json", str(sample_dir)])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["disclaimer"] == DISCLAIMER
    assert out["rejected"] == []
    assert len(out["results"]) == len(files)
    scores = []
    for r in out["results"]:
        probs = r["probabilities"]
        assert set(probs) == {"covid", "normal", "pneumonia"}
        assert abs(sum(probs.values()) - 1.0) < 1e-4
        assert r["outcome"] in ("suspected", "not_suspected", "indeterminate")
        # A real chest CR: the model may be unsure, but it is never out of its domain.
        assert not {"blank_image", "no_lung_fields", "out_of_distribution"} & set(
            r["abstention_reasons"]
        ), r
        if r["outcome"] != "indeterminate":
            assert r["decision"] in ("COVID-19 suspected", "COVID-19 not suspected")
            assert r["covid_suspected"] == (r["covid_score"] >= r["covid_threshold"])
        else:
            assert not r["covid_suspected"] and r["decision"].startswith("Indeterminate")
        if Path(r["path"]).name.startswith("chest_"):
            scores.append([probs["covid"], probs["normal"], probs["pneumonia"]])
    # The chest_* samples are one radiograph in several encodings: the model agrees with itself.
    assert len(scores) == 7
    scores = np.array(scores)
    assert np.ptp(scores, axis=0).max() < 0.05, scores


def test_predict_table_and_rejections(sample_dir: Path, tmp_path: Path) -> None:
    good = next(iter(sorted(sample_dir.glob("*.dcm"))))
    shutil.copy(good, tmp_path / "good.dcm")
    shutil.copy(get_testdata_file("CT_small.dcm"), tmp_path / "ct.dcm")
    (tmp_path / "notes.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    result = runner.invoke(app, ["predict", str(tmp_path)])
    assert result.exit_code == 2, "a rejected input makes the exit status non-zero"
    assert "good.dcm" in result.stdout and "COVID-19" in result.stdout
    assert "REJECTED (wrong_modality)" in result.stdout
    assert "REJECTED (corrupt)" in result.stdout
    assert DISCLAIMER in result.stdout


def test_predict_unknown_model_is_a_clear_error(sample_dir: Path) -> None:
    result = runner.invoke(app, ["predict", "--model", "nope", str(sample_dir)])
    assert result.exit_code == 1
    assert "not in the bundle" in result.output


def test_predictor_api_matches_cli(sample_dir: Path) -> None:
    good = sorted(sample_dir.glob("*.dcm"))[0]
    pred = Predictor().predict_path(good)
    result = runner.invoke(app, ["predict", "--json", str(good)])
    cli = json.loads(result.stdout)["results"][0]
    for label, p in pred.probabilities.items():
        assert abs(cli["probabilities"][label] - p) < 1e-6


#: the labelled samples (see sample_dicoms/README.md): file, manifest label, expected outcome
LABELLED_OUTCOMES = [
    ("covid19_cr_pa.dcm", "covid", "suspected"),
    ("pneumonia_cr_pa.dcm", "pneumonia", "not_suspected"),
]


@pytest.mark.parametrize(("name", "label", "outcome"), LABELLED_OUTCOMES)
def test_default_model_gives_each_labelled_sample_its_outcome(
    name: str, label: str, outcome: str, sample_dir: Path
) -> None:
    """The quick start and the viewer demo rely on these films showing both outcomes."""
    bundle = Bundle()
    if bundle.default_model not in bundle.available():
        pytest.skip(f"the trained default model {bundle.default_model!r} is not in monai_bundle/")
    pred = Predictor(bundle).predict_path(sample_dir / name)
    assert not pred.abstained and pred.abstention_reasons == (), pred
    assert pred.label == label, pred.probabilities
    assert pred.covid_suspected == (outcome == "suspected"), pred.probabilities
    # Well clear of the threshold, so a retrained default model that still gets them right does
    # not flip the demo's outcome by a hair.
    assert abs(pred.covid_score - pred.covid_threshold) > 0.2, pred.probabilities
    result = runner.invoke(app, ["predict", "--json", str(sample_dir / name)])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["results"][0]["outcome"] == outcome
