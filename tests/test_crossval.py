"""Leave-source-out runs: switching ingredients of the transfer recipe off, and the ablation table.

Everything here but the last test runs without training; the last trains a few images for one
epoch (a few seconds) to check that a switched-off ingredient reaches the exported facts.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from dicom_covid.cli.main import app
from dicom_covid.errors import DataError
from dicom_covid.preprocessing import Preprocessing, clahe
from dicom_covid.training import crossval as cv
from dicom_covid.training.train import (
    TRANSFER_INGREDIENTS,
    TRANSFER_PREPROCESSING,
    TrainConfig,
    recipe_parts,
    recipe_variant,
)

#: What each switched-off ingredient changes in :func:`recipe_parts` (field: new value).
CHANGES: dict[str, dict[str, Any]] = {
    "lung_crop": {"preprocessing": {**TRANSFER_PREPROCESSING, "lung_crop": None}},
    "clahe": {"preprocessing": {**TRANSFER_PREPROCESSING, "clahe": None}},
    "scramble": {"scramble": False},
    "balanced": {"balanced": False},
    "label_smoothing": {"label_smoothing": 0.0},
    "temperature": {"temperature": False},
}


def test_full_transfer_recipe_is_unchanged() -> None:
    full = recipe_parts("transfer", (), 0.1)
    assert full.variant == "transfer" and full.preprocessing == TRANSFER_PREPROCESSING
    assert full.scramble and full.balanced and full.temperature and full.label_smoothing == 0.1
    assert TrainConfig("b", Path("d"), Path("o")).without == ()
    v1 = recipe_parts("v1", (), 0.05)
    assert v1.preprocessing == {} and not (v1.scramble or v1.balanced or v1.temperature)


@pytest.mark.parametrize("ingredient", TRANSFER_INGREDIENTS)
def test_without_switches_off_exactly_that_ingredient(ingredient: str) -> None:
    assert set(CHANGES) == set(TRANSFER_INGREDIENTS)
    full = asdict(recipe_parts("transfer", (), 0.1))
    less = asdict(recipe_parts("transfer", (ingredient,), 0.1))
    changed = {k: v for k, v in less.items() if v != full[k]}
    assert changed == {"variant": f"transfer−{ingredient}", **CHANGES[ingredient]}


def test_variant_names_follow_the_ingredient_order() -> None:
    assert recipe_variant("transfer", ["scramble", "clahe"]) == "transfer−clahe−scramble"
    assert recipe_parts("transfer", ["scramble", "clahe"]).variant == "transfer−clahe−scramble"


@pytest.mark.parametrize(
    ("recipe", "without", "message"),
    [
        ("transfer", ("augment",), "ingredients of the transfer recipe are lung_crop"),
        ("v1", ("clahe",), "applies to the transfer recipe only"),
        ("v2", (), "is not one of v1, transfer"),
    ],
)
def test_recipe_parts_rejects_what_it_cannot_switch_off(
    recipe: str, without: tuple[str, ...], message: str
) -> None:
    with pytest.raises(DataError, match=message):
        recipe_parts(recipe, without)


def test_preprocessing_steps_can_be_switched_off() -> None:
    rng = np.random.default_rng(0)
    pixels = rng.random((300, 260)).astype(np.float32)
    no_crop = Preprocessing(64, recipe_parts("transfer", ("lung_crop",)).preprocessing)
    neither = Preprocessing(64, recipe_parts("transfer", ("lung_crop", "clahe")).preprocessing)
    # Without the lung crop nothing is segmented (no segmenter is loaded) and no facts result.
    assert not no_crop.needs_segmenter and no_crop.segmenter is None
    plain, info = neither(pixels)
    equalised, info2 = no_crop(pixels)
    assert info == info2 == {} and no_crop.segmenter is None
    assert plain.shape == equalised.shape == (1, 64, 64)
    assert np.array_equal(equalised.numpy(), clahe(plain).numpy())
    no_clahe = Preprocessing(64, recipe_parts("transfer", ("clahe",)).preprocessing)
    assert no_clahe.needs_segmenter and not no_clahe.applies_clahe
    assert "lung crop" in no_clahe.describe() and "CLAHE" not in no_clahe.describe()
    assert "lung crop" not in no_crop.describe() and "CLAHE" in no_crop.describe()


def test_cli_passes_without_to_the_run(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    seen: dict[str, Any] = {}

    def fake_crossval(cfg: TrainConfig, group: str, progress: bool = True) -> dict[str, Any]:
        seen["cfg"] = cfg
        return {"covid_auc": 0.7, "accuracy": 0.6, "n": 3}

    monkeypatch.setattr(cv, "crossval", fake_crossval)
    args = ["crossval", "run", "--leave-out", "figure1", "--data", str(tmp_path), "--threads", "1"]
    result = CliRunner().invoke(app, [*args, "--without", "scramble", "--without", "clahe"])
    assert result.exit_code == 0, result.output
    cfg = seen["cfg"]
    assert cfg.without == ("clahe", "scramble") and cfg.label_smoothing == 0.1
    assert Path(cfg.output_dir) == Path("runs/crossval/transfer-no-clahe-no-scramble/figure1")
    assert "transfer−clahe−scramble without figure1" in result.output
    # Defaults unchanged: no ingredient switched off, the usual folder.
    assert CliRunner().invoke(app, args).exit_code == 0
    assert seen["cfg"].without == () and seen["cfg"].output_dir.parts[-2] == "transfer"
    assert seen["cfg"].seed == 0
    assert CliRunner().invoke(app, [*args, "--seed", "1"]).exit_code == 0
    assert seen["cfg"].seed == 1
    bad = CliRunner().invoke(app, [*args, "--without", "augment"])
    assert bad.exit_code == 1 and "lung_crop, clahe, scramble" in bad.output
    v1 = CliRunner().invoke(app, [*args, "--recipe", "v1", "--without", "clahe"])
    assert v1.exit_code == 1 and "transfer recipe only" in v1.output


def test_crossval_records_the_variant(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / "manifest.csv").write_text("path,label,source\na.jpg,covid,figure1\n")
    done = SimpleNamespace(epochs_run=1, best_epoch=1, best_val_auc=0.5)
    monkeypatch.setattr(cv, "train", lambda cfg: done)
    metrics = {"accuracy": 1.0, "covid_auc": None, "n": 1}
    monkeypatch.setattr(cv, "evaluate_heldout", lambda *args: dict(metrics))
    cfg = TrainConfig(
        "efficientnet_lite0", tmp_path, tmp_path / "run", recipe="transfer", without=("clahe",)
    )
    (tmp_path / "run").mkdir()
    m = cv.crossval(cfg, "figure1", progress=False)
    saved = json.loads((tmp_path / "run" / "heldout.json").read_text())
    assert m["variant"] == saved["variant"] == "transfer−clahe"
    assert saved["without"] == ["clahe"] and saved["train_config"]["without"] == ["clahe"]


def _result(variant_without: list[str], scores: list[float], size: int = 160) -> dict[str, Any]:
    labels = ["covid", "covid", "covid", "normal", "pneumonia", "normal"]
    return {
        "group": "g",
        "recipe": "transfer",
        "without": variant_without,
        "variant": recipe_variant("transfer", variant_without),
        "image_size": size,
        "max_train_per_class": 700,
        "epochs": 4,
        "seed": 0,
        "counts": {"covid": 3, "normal": 2, "pneumonia": 1},
        "n": 6,
        "covid_auc": 0.8,
        "covid_auc_ci": [0.5, 1.0],
        "covid_sensitivity": 0.67,
        "covid_specificity": 0.5,
        "accuracy": 0.5,
        "predictions": [
            {"path": f"{i}.jpg", "label": lab, "probs": [s, 1 - s, 0.0]}
            for i, (lab, s) in enumerate(zip(labels, scores, strict=True))
        ],
    }


def test_ablation_table_compares_each_variant_with_the_full_recipe() -> None:
    full = _result([], [0.9, 0.8, 0.7, 0.2, 0.3, 0.1])
    same = _result(["clahe"], [0.9, 0.8, 0.7, 0.2, 0.3, 0.1])
    worse = _result(["scramble"], [0.9, 0.2, 0.7, 0.8, 0.3, 0.1])
    bigger = _result([], [0.9, 0.8, 0.7, 0.2, 0.3, 0.1], size=224)
    diff = cv.paired_auc_difference(same, full, n_resamples=50)
    assert diff == (0.0, [0.0, 0.0])
    d, (low, high) = cv.paired_auc_difference(worse, full, n_resamples=200)
    assert d == pytest.approx(6 / 9 - 1) and low <= d <= high
    table = cv.ablation_table([bigger, worse, same, full]).splitlines()
    rows = [line.split(" | ")[1] for line in table[2:]]
    assert rows == ["transfer", "transfer−clahe", "transfer−scramble", "transfer"]
    assert "(reference)" in table[2] and "+0.000" in table[3] and "224 / 700 / 4 / 0" in table[5]
    assert "| g | transfer−clahe |" in cv.summary_table([full, same])


@pytest.mark.slow
def test_a_tiny_ablation_run_exports_the_variant(cxr_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "cv" / "run"
    args = ["crossval", "run", "--leave-out", "figure1", "--data", str(cxr_data)]
    small = ["--epochs", "1", "--image-size", "48", "--max-train-per-class", "3"]
    small += ["--max-val-per-class", "3", "--batch-size", "3", "--no-progress", "--threads", "1"]
    more = ["--without", "lung_crop", "--without", "temperature", "--cache-dir", str(tmp_path)]
    result = CliRunner().invoke(app, [*args, *small, *more, "--output-dir", str(out)])
    assert result.exit_code == 0, result.output
    facts = json.loads((out / "model.json").read_text())
    assert facts["preprocessing"]["lung_crop"] is None and facts["temperature"] == 1.0
    assert facts["recipe_variant"] == "transfer−lung_crop−temperature"
    report = CliRunner().invoke(app, ["crossval", "report", str(tmp_path / "cv"), "--ablation"])
    assert report.exit_code == 0 and "| figure1 | transfer−lung_crop−temperature |" in (
        report.output
    )
