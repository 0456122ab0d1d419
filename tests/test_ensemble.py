"""Ensembles of bundle models (dicom_covid.bundle, .inference, .explain, ``dicom-covid ensemble``).

Every bundle here is a throw-away one with two small random-weight members (AlexNet at 64 px and
EfficientNet-Lite0 at 96 px, so the members differ in input size and normalisation).
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from helpers import add_throwaway_model, make_throwaway_bundle
from PIL import Image
from typer.testing import CliRunner

from dicom_covid.bundle import Bundle, install_ensemble
from dicom_covid.cli.main import app
from dicom_covid.errors import BundleError
from dicom_covid.explain import Explainer
from dicom_covid.inference import DISCLAIMER, Predictor
from dicom_covid.reader import XrayImage, read_image
from dicom_covid.training.metrics import choose_threshold

runner = CliRunner()

MEMBERS = ("alexnet", "efficientnet_lite0")
SIZES = {"alexnet": 64, "efficientnet_lite0": 96}
ENSEMBLE = "duo"
THRESHOLD = 0.3


def _two_model_bundle(root: Path) -> Path:
    make_throwaway_bundle(root, "efficientnet_lite0", input_size=SIZES["efficientnet_lite0"])
    add_throwaway_model(root, "alexnet", covid_threshold=0.7, seed=1, input_size=SIZES["alexnet"])
    return root


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny networks: one intra-op thread is as fast and avoids thrashing on a busy machine."""
    import torch

    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory) -> Path:
    root = _two_model_bundle(tmp_path_factory.mktemp("bundle"))
    install_ensemble(ENSEMBLE, MEMBERS, THRESHOLD, {"note": "test"}, bundle_root=root)
    return root


@pytest.fixture(scope="module")
def ensemble(bundle_dir: Path) -> Predictor:
    return Predictor(bundle_dir, ENSEMBLE)


@pytest.fixture
def bundle_copy(bundle_dir: Path, tmp_path: Path) -> Path:
    """A private copy of the module bundle that a test may break."""
    return Path(shutil.copytree(bundle_dir, tmp_path / "bundle"))


def _images() -> list[XrayImage]:
    rng = np.random.default_rng(0)
    out = []
    for rows, cols in ((120, 100), (90, 140), (200, 200)):
        y, x = np.mgrid[0:rows, 0:cols].astype(np.float32)
        img = 0.3 + 0.5 * np.exp(-(((x - cols / 3) / 25) ** 2 + ((y - rows / 2) / 40) ** 2))
        img += 0.1 * rng.random((rows, cols), dtype=np.float32)
        out.append(
            XrayImage(
                pixels=np.clip(img, 0, 1).astype(np.float32), source="synthetic", format="png"
            )
        )
    return out


def _edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def _edit_entry(root: Path, name: str, entry: dict) -> None:
    meta_path = root / "configs" / "metadata.json"
    meta = json.loads(meta_path.read_text())
    meta["dicom_covid"]["models"][name] = entry
    meta_path.write_text(json.dumps(meta))


# --- bundle format -----------------------------------------------------------------------------


def test_facts_and_availability(bundle_dir: Path) -> None:
    bundle = Bundle(bundle_dir)
    assert ENSEMBLE in bundle.available()
    assert ENSEMBLE in bundle.available("ensemble")
    assert ENSEMBLE not in bundle.available("single")
    assert set(MEMBERS) <= set(bundle.available("single"))
    facts = bundle.facts(ENSEMBLE)
    assert facts.is_ensemble and facts.kind == "ensemble"
    assert facts.members == MEMBERS
    assert facts.covid_threshold == THRESHOLD
    assert facts.input_size == max(SIZES.values())
    assert facts.weights is None and facts.mean == () and facts.gradcam_layer == ""
    assert facts.title == "Ensemble of AlexNet, EfficientNet-Lite0"
    assert facts.raw["combination"] == "mean_probability"
    assert facts.raw["validation"] == {"note": "test"}
    assert facts.raw["created"].startswith("20")
    entry = json.loads((bundle_dir / "configs" / "metadata.json").read_text())["dicom_covid"][
        "models"
    ][ENSEMBLE]
    assert entry == {"members": list(MEMBERS), "facts": f"models/{ENSEMBLE}.json"}
    single = bundle.facts("alexnet")
    assert not single.is_ensemble and single.members == () and single.weights.is_file()
    with pytest.raises(BundleError, match="is an ensemble of alexnet, efficientnet_lite0"):
        bundle.facts(ENSEMBLE, allow_ensemble=False)


def _missing_member(root: Path) -> str:
    (root / "models" / "alexnet.safetensors").unlink()
    return "weights of member 'alexnet' are missing"


def _unknown_member(root: Path) -> str:
    members = ["alexnet", "resnet18x"]
    _edit_entry(root, ENSEMBLE, {"members": members, "facts": f"models/{ENSEMBLE}.json"})
    _edit_json(root / "models" / f"{ENSEMBLE}.json", members=members)
    return "member 'resnet18x' is not a model of the bundle"


def _self_member(root: Path) -> str:
    members = ["alexnet", ENSEMBLE]
    _edit_entry(root, ENSEMBLE, {"members": members, "facts": f"models/{ENSEMBLE}.json"})
    _edit_json(root / "models" / f"{ENSEMBLE}.json", members=members)
    return "lists itself as a member"


def _nested_member(root: Path) -> str:
    shutil.copy(root / "models" / f"{ENSEMBLE}.json", root / "models" / "inner.json")
    _edit_json(root / "models" / "inner.json", name="inner")
    _edit_entry(root, "inner", {"members": list(MEMBERS), "facts": "models/inner.json"})
    members = ["alexnet", "inner"]
    _edit_entry(root, ENSEMBLE, {"members": members, "facts": f"models/{ENSEMBLE}.json"})
    _edit_json(root / "models" / f"{ENSEMBLE}.json", members=members)
    return "member 'inner' is itself an ensemble"


def _labels_mismatch(root: Path) -> str:
    _edit_json(root / "models" / f"{ENSEMBLE}.json", labels=["covid", "normal"])
    return "labels"


def _members_disagree(root: Path) -> str:
    _edit_json(root / "models" / f"{ENSEMBLE}.json", members=list(reversed(MEMBERS)))
    return "metadata.json lists members"


def _missing_facts(root: Path) -> str:
    (root / "models" / f"{ENSEMBLE}.json").unlink()
    return "facts file .* is missing"


def _unknown_combination(root: Path) -> str:
    _edit_json(root / "models" / f"{ENSEMBLE}.json", combination="majority_vote")
    return "combination 'majority_vote' is not supported"


@pytest.mark.parametrize(
    "breaker",
    [
        _missing_member,
        _unknown_member,
        _self_member,
        _nested_member,
        _labels_mismatch,
        _members_disagree,
        _missing_facts,
        _unknown_combination,
    ],
)
def test_broken_ensembles_are_clear_errors(bundle_copy: Path, breaker) -> None:
    message = breaker(bundle_copy)
    bundle = Bundle(bundle_copy)
    with pytest.raises(BundleError, match=message):
        bundle.facts(ENSEMBLE)
    with pytest.raises(BundleError, match=message):
        Predictor(bundle, ENSEMBLE)
    if breaker in (_missing_member, _unknown_member, _self_member, _nested_member, _missing_facts):
        assert ENSEMBLE not in bundle.available()


@pytest.mark.parametrize(
    ("name", "members", "message"),
    [
        ("solo", ["alexnet"], "at least two members"),
        ("alexnet", list(MEMBERS), "name of a single model"),
        ("resnet50", list(MEMBERS), "name of a single model"),
        ("../evil", list(MEMBERS), "is not allowed"),
        ("pair", ["alexnet", "alexnet"], "member twice"),
        ("pair", ["alexnet", "vgg16"], "weights of member 'vgg16' are missing"),
        ("pair", ["alexnet", ENSEMBLE], "itself an ensemble"),
    ],
)
def test_install_ensemble_checks(bundle_copy: Path, name: str, members: list, message: str):
    _edit_entry(bundle_copy, "vgg16", {"weights": "models/vgg16.safetensors", "facts": "x.json"})
    with pytest.raises(BundleError, match=message):
        install_ensemble(name, members, 0.5, {}, bundle_root=bundle_copy)
    assert not (bundle_copy / "models" / "solo.json").exists()


def test_stale_member_is_logged(bundle_copy: Path, caplog) -> None:
    _edit_json(bundle_copy / "models" / "alexnet.json", covid_threshold=0.123)
    with caplog.at_level("WARNING", logger="dicom_covid.bundle"):
        Bundle(bundle_copy).facts(ENSEMBLE)
    assert "member alexnet was retrained" in caplog.text


# --- inference ---------------------------------------------------------------------------------


def test_probabilities_are_the_mean_of_the_members(bundle_dir: Path, ensemble: Predictor) -> None:
    images = _images()
    singles = [Predictor(bundle_dir, m) for m in MEMBERS]
    expected = np.mean([p.probabilities(images) for p in singles], axis=0)
    got = ensemble.probabilities(images, batch_size=2)
    assert got.shape == (len(images), 3)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    # the two random members really disagree, so the mean is not one of them
    assert np.abs(singles[0].probabilities(images) - got).max() > 1e-3
    assert [m.facts.name for m in ensemble.members] == list(MEMBERS)
    assert [m.facts.input_size for m in ensemble.members] == [SIZES[m] for m in MEMBERS]
    assert ensemble.probabilities([]).shape == (0, 3)

    pred = ensemble.predict(images[0])
    assert pred.model_name == ENSEMBLE
    assert pred.model_title == "Ensemble of AlexNet, EfficientNet-Lite0"
    assert pred.covid_threshold == THRESHOLD
    assert pred.covid_suspected == (pred.covid_score >= THRESHOLD)
    assert pred.covid_score == pytest.approx(expected[0][0], abs=1e-5)


def test_single_model_api_is_unchanged(bundle_dir: Path, ensemble: Predictor) -> None:
    single = Predictor(bundle_dir, "alexnet")
    assert not single.is_ensemble and single.members == [single]
    assert single.model is not None
    assert tuple(single.input_tensor(_images()[0]).shape) == (1, 3, 64, 64)
    assert ensemble.is_ensemble
    with pytest.raises(BundleError, match="ensemble of alexnet, efficientnet_lite0"):
        _ = ensemble.model
    with pytest.raises(BundleError, match=r"Predictor\.members"):
        ensemble.input_tensor(_images()[0])


def test_predict_cli_with_an_ensemble(bundle_dir: Path, sample_dir: Path) -> None:
    files = sorted(sample_dir.glob("*.dcm"))
    args = ["predict", "--json", "--model", ENSEMBLE, "--bundle", str(bundle_dir)]
    result = runner.invoke(app, [*args, *map(str, files[:2])])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["model"] == ENSEMBLE and out["disclaimer"] == DISCLAIMER
    assert len(out["results"]) == 2
    ens = Predictor(bundle_dir, ENSEMBLE)
    for r, f in zip(out["results"], files[:2], strict=True):
        assert r["model_name"] == ENSEMBLE
        assert r["covid_threshold"] == THRESHOLD
        expected = ens.predict(read_image(f)).probabilities
        for label, p in expected.items():
            assert r["probabilities"][label] == pytest.approx(p, abs=1e-5)


# --- heat maps and DICOM results ---------------------------------------------------------------


def test_explainer_averages_the_members(bundle_dir: Path, ensemble: Predictor) -> None:
    image = _images()[0]
    explainer = Explainer(ensemble)
    assert [e.predictor.facts.name for e in explainer.members] == list(MEMBERS)
    assert explainer.layer is None and "alexnet:" in explainer.layer_name
    heat = explainer.heatmap(image, target="covid")
    assert heat.shape == image.shape and heat.dtype == np.float32
    assert np.all(np.isfinite(heat)) and heat.min() >= 0.0 and heat.max() <= 1.0
    singles = [Explainer(Predictor(bundle_dir, m)) for m in MEMBERS]
    expected = np.mean([e.heatmap(image, "covid") for e in singles], axis=0)
    np.testing.assert_allclose(heat, expected, atol=1e-5)
    assert heat.max() > 0.25  # not flat: at least one member's CAM has a peak

    cam = explainer.cam(image, target="covid")
    assert cam.shape == (96, 96) and cam.min() >= 0.0 and cam.max() <= 1.0
    assert [e.cam(image, "covid").shape for e in singles] == [(64, 64), (96, 96)]
    with pytest.raises(ValueError, match="unknown target"):
        explainer.heatmap(image, target="tuberculosis")


def test_analyse_and_pacs_worker_with_an_ensemble(bundle_dir: Path, sample_dir: Path) -> None:
    from pacs_listener.worker import load_analysis

    source = pydicom.dcmread(sorted(sample_dir.glob("*.dcm"))[0])
    run = load_analysis(bundle_dir, ENSEMBLE)
    assert run.model_name == ENSEMBLE
    result = run(source)
    assert result.prediction.model_name == ENSEMBLE
    assert result.prediction.covid_threshold == THRESHOLD
    assert result.heatmap.shape == (source.Rows, source.Columns)
    sr, sc = result.datasets
    assert sr.Modality == "SR" and sc.Modality == "OT"
    for ds in (sr, sc):
        assert ds.StudyInstanceUID == source.StudyInstanceUID
        models = [item.ManufacturerModelName for item in ds.ContributingEquipmentSequence]
        assert any("Ensemble of AlexNet, EfficientNet-Lite0" in m for m in models), models
    # The SR's algorithm parameters name the members, so a reader can tell what ran.
    assert result.prediction.model_members == MEMBERS
    params = [
        str(item.TextValue)
        for item in _walk(sr.ContentSequence)
        if getattr(item, "ValueType", "") == "TEXT"
    ]
    assert f"ensemble_members={'+'.join(MEMBERS)}" in params, params


def _walk(seq):
    for item in seq:
        yield item
        yield from _walk(getattr(item, "ContentSequence", []))


def test_monai_inference_config_refuses_an_ensemble(bundle_dir: Path, tmp_path: Path) -> None:
    from monai.bundle import ConfigParser

    root = Path(__file__).resolve().parent.parent
    parser = ConfigParser()
    parser.read_config(str(root / "monai_bundle" / "configs" / "inference.json"))
    parser.read_meta(str(bundle_dir / "configs" / "metadata.json"))
    parser.update(
        {
            "bundle_root": str(bundle_dir),
            "backbone": ENSEMBLE,
            "dataset_dir": str(root / "sample_dicoms"),
            "output_dir": str(tmp_path),
        }
    )
    with pytest.raises(Exception) as info:  # MONAI may wrap the BundleError
        parser.get_parsed_content("evaluator")
    chain, exc = [], info.value
    while exc is not None:
        chain.append(str(exc))
        exc = exc.__cause__ or exc.__context__
    assert any("is an ensemble of alexnet, efficientnet_lite0" in m for m in chain), chain


# --- the ensemble command ----------------------------------------------------------------------

_COLUMNS = [
    "path",
    "label",
    "patient_id",
    "view",
    "source",
    "license",
    "license_status",
    "age_group",
    "original_finding",
    "hospital",
    "width",
    "height",
    "original_file",
    "original_url",
    "split",
]


def _tiny_data(root: Path, per_class: int = 3) -> Path:
    """A labelled folder like the development set: manifest.csv and small PNGs."""
    rng = np.random.default_rng(1)
    (root / "images").mkdir(parents=True)
    rows = []
    for split in ("train", "val"):
        for label in ("covid", "normal", "pneumonia"):
            for i in range(per_class):
                name = f"images/{split}_{label}_{i}.png"
                pixels = (rng.random((72, 80)) * 255).astype(np.uint8)
                Image.fromarray(pixels, mode="L").save(root / name)
                rows.append(
                    {
                        "path": name,
                        "label": label,
                        "patient_id": f"synthetic:{split}{label}{i}",
                        "view": "PA",
                        "source": "synthetic",
                        "license": "CC0",
                        "license_status": "open",
                        "age_group": "adult",
                        "original_finding": label,
                        "hospital": "",
                        "width": 80,
                        "height": 72,
                        "original_file": name,
                        "original_url": "",
                        "split": split,
                    }
                )
    with (root / "manifest.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return root


def test_ensemble_command_end_to_end(bundle_copy: Path, tmp_path: Path) -> None:
    data = _tiny_data(tmp_path / "data")
    args = ["ensemble", "--name", "both", "--members", "all", "--data", str(data)]
    args += ["--bundle", str(bundle_copy), "--title", "Both nets", "--default", "--no-progress"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert DISCLAIMER in result.stdout
    assert "COVID threshold" in result.stdout and "both" in result.stdout

    bundle = Bundle(bundle_copy)
    assert bundle.default_model == "both"
    facts = bundle.facts("both")
    assert facts.members == ("efficientnet_lite0", "alexnet")  # metadata order, singles only
    assert facts.title == "Both nets"
    v = facts.raw["validation"]
    assert v["n_images"] == 9 and v["n_rejected"] == 0 and v["split"] == "val"
    assert v["class_counts"] == {"covid": 3, "normal": 3, "pneumonia": 3}
    assert set(v["members"]) == {"efficientnet_lite0", "alexnet"}
    assert 0.0 <= v["macro_auc"] <= 1.0 and 0.0 <= v["accuracy"] <= 1.0
    assert facts.raw["val_macro_auc"] == v["macro_auc"]

    # the threshold is chosen on the ensemble's val probabilities, as train.py does
    predictor = Predictor(bundle)  # the new default
    assert predictor.facts.name == "both"
    from dicom_covid.training.data import read_manifest

    rows = read_manifest(data, "val")
    probs = predictor.probabilities([read_image(r.path) for r in rows])
    is_covid = np.array([r.label == "covid" for r in rows], dtype=int)
    assert facts.covid_threshold == pytest.approx(choose_threshold(is_covid, probs[:, 0]))

    # --max-val-per-class subsamples the val split
    args = ["ensemble", "--name", "both", "--members", "alexnet,efficientnet_lite0"]
    args += ["--data", str(data), "--bundle", str(bundle_copy), "--max-val-per-class", "2"]
    result = runner.invoke(app, [*args, "--no-progress"])
    assert result.exit_code == 0, result.output
    assert Bundle(bundle_copy).facts("both").raw["validation"]["n_images"] == 6


@pytest.mark.parametrize(
    ("members", "message"),
    [
        ("alexnet,nope", "member 'nope' is not a model of the bundle"),
        ("alexnet", "at least two members"),
    ],
)
def test_ensemble_command_errors(bundle_copy: Path, tmp_path: Path, members, message) -> None:
    data = _tiny_data(tmp_path / "data", per_class=1)
    args = ["ensemble", "--name", "bad", "--members", members, "--data", str(data)]
    result = runner.invoke(app, [*args, "--bundle", str(bundle_copy), "--no-progress"])
    assert result.exit_code == 1
    assert message in result.output
    assert "bad" not in Bundle(bundle_copy).available()
