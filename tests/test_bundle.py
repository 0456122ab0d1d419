"""The MONAI bundle: metadata schema, network shapes, TorchScript export and the bundle configs.

The ``python -m monai.bundle`` commands run as subprocesses from the repository root, the way a
user runs them; the models come from throw-away bundles (random weights) so that the tests do not
depend on trained weights, plus the real default model where it is installed.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import ROOT, make_throwaway_bundle

from dicom_covid import read_image
from dicom_covid.bundle import Bundle, backbone_of
from dicom_covid.errors import DataError, InputRejected
from dicom_covid.inference import DISCLAIMER, Predictor
from dicom_covid.models import BACKBONES
from dicom_covid.training.data import LABELS

CONFIGS = ROOT / "monai_bundle" / "configs"
META = CONFIGS / "metadata.json"
INFERENCE = CONFIGS / "inference.json"
SCHEMA = ROOT.parent / "shared" / "monai" / "meta_schema_20240725.json"
SHAPE_KEY = "_meta_#network_data_format#inputs#image#spatial_shape"


def monai_bundle(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run ``python -m monai.bundle ARGS`` from the repository root."""
    env = dict(os.environ, PYTHONWARNINGS="ignore", TQDM_DISABLE="1")
    return subprocess.run(
        [sys.executable, "-m", "monai.bundle", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def check(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, (
        f"exit {proc.returncode}\n{proc.stdout[-3000:]}{proc.stderr[-6000:]}"
    )
    return proc


@pytest.fixture(scope="module")
def throwaway(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A bundle with a randomly initialised EfficientNet-Lite0 (default model)."""
    return make_throwaway_bundle(tmp_path_factory.mktemp("bundle") / "bundle", seed=1)


@pytest.fixture
def schema(tmp_path: Path) -> Path:
    """A writable copy of the MONAI metadata schema (verify_metadata would download it)."""
    if not SCHEMA.is_file():
        pytest.skip(f"MONAI metadata schema not found at {SCHEMA} (shared/monai/ is absent)")
    return Path(shutil.copy(SCHEMA, tmp_path / SCHEMA.name))


# --- configs and metadata ------------------------------------------------------------------------


def test_configs_are_json_and_share_the_network_definition() -> None:
    network_defs = []
    for name in ("inference.json", "train.json", "evaluate.json", "metadata.json"):
        config = json.loads((CONFIGS / name).read_text())
        if name != "metadata.json":
            assert config["network_def"]["_target_"] == "dicom_covid.models.build_model"
            assert "run" in config
            network_defs.append(config["network_def"])
    assert all(d == network_defs[0] for d in network_defs)
    assert (CONFIGS / "logging.conf").is_file()
    assert (ROOT / "monai_bundle" / "LICENSE").read_text().lstrip().startswith("Apache License")
    assert "CC BY 4.0" in (ROOT / "monai_bundle" / "docs" / "data_license.txt").read_text()


def test_metadata_contract() -> None:
    meta = json.loads(META.read_text())
    own = meta["dicom_covid"]
    assert own["default_model"] in own["models"]
    for name, entry in own["models"].items():
        if "members" in entry:  # an ensemble of single models of this bundle
            assert set(entry) >= {"members", "facts"} and "weights" not in entry
            assert all(
                m in BACKBONES and "members" not in own["models"][m] for m in entry["members"]
            )
        else:  # a single model: its backbone is in the registry (named apart, e.g. …_v2)
            assert backbone_of(name) in BACKBONES and name.startswith(backbone_of(name))
            assert set(entry) >= {"weights", "facts"}
    channels = meta["network_data_format"]["outputs"]["pred"]["channel_def"]
    assert tuple(channels[str(i)] for i in range(len(channels))) == LABELS
    assert "RESEARCH USE ONLY" in meta["description"]


def test_verify_metadata_cli(schema: Path) -> None:
    proc = check(
        monai_bundle("verify_metadata", "--meta_file", str(META), "--filepath", str(schema))
    )
    assert "metadata is verified with no error" in proc.stdout + proc.stderr


def test_verify_metadata_catches_a_broken_file(schema: Path, tmp_path: Path) -> None:
    from monai.bundle import verify_metadata

    meta = json.loads(META.read_text())
    del meta["network_data_format"]
    broken = tmp_path / "metadata.json"
    broken.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="network_data_format"):
        verify_metadata(meta_file=str(broken), filepath=str(schema))


# --- network shapes ----------------------------------------------------------------------------


@pytest.mark.parametrize("backbone", sorted(BACKBONES))
def test_verify_net_in_out_every_backbone(backbone: str) -> None:
    from monai.bundle import verify_net_in_out

    size = BACKBONES[backbone].input_size
    verify_net_in_out(
        net_id="network_def",
        meta_file=str(META),
        config_file=str(INFERENCE),
        device="cpu",
        p=1,
        n=1,
        any=1,
        **{"backbone": backbone, SHAPE_KEY: [size, size]},
    )


def test_verify_net_in_out_cli_299_and_a_mismatch() -> None:
    args = ["verify_net_in_out", "network_def", "--config_file", str(INFERENCE)]
    args += ["--meta_file", str(META), "--device", "cpu", "--p", "1", "--n", "1", "--any", "1"]
    proc = check(monai_bundle(*args, "--backbone", "inception_v3", f"--{SHAPE_KEY}", "[299,299]"))
    out = proc.stdout + proc.stderr
    assert "[299, 299]" in out and "verified with no error" in out
    # The check can fail: declare 4 output channels for a 3-class network.
    bad = monai_bundle(
        *args,
        "--backbone",
        "alexnet",
        "--_meta_#network_data_format#outputs#pred#num_channels",
        "4",
    )
    assert bad.returncode != 0
    assert "output channel number" in bad.stderr


# --- inference config ----------------------------------------------------------------------------


def _read_predictions(out_dir: Path, name: str) -> tuple[list[dict], dict]:
    with (out_dir / f"{name}_predictions.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    return rows, json.loads((out_dir / f"{name}_predictions.json").read_text())


def _check_against_predictor(rows: list[dict], predictor: Predictor) -> None:
    for row in rows:
        assert row["status"] == "classified"
        assert row["disclaimer"] == DISCLAIMER
        expected = predictor.predict_path(ROOT / row["path"])
        got = [float(row[f"p_{lab}"]) for lab in predictor.labels]
        np.testing.assert_allclose(
            got, [expected.probabilities[lab] for lab in predictor.labels], atol=1e-4
        )
        assert row["label"] == expected.label
        assert row["decision"] == expected.decision


def test_inference_config_on_sample_dicoms(
    throwaway: Path, tmp_path: Path, sample_dir: Path
) -> None:
    out = tmp_path / "eval"
    # dataset_dir defaults to sample_dicoms/ (relative to the repository root).
    check(
        monai_bundle(
            "run",
            "--config_file",
            str(INFERENCE),
            "--bundle_root",
            str(throwaway),
            "--output_dir",
            str(out),
            "--device",
            "cpu",
        )
    )
    rows, summary = _read_predictions(out, "efficientnet_lite0")
    assert len(rows) == len(sorted(sample_dir.glob("*.dcm"))) == 9  # 7 encodings + 2 labelled
    assert summary["disclaimer"] == DISCLAIMER and summary["rejected"] == []
    assert summary["labels"] == list(LABELS)
    _check_against_predictor(rows, Predictor(throwaway))


def test_inference_config_with_the_real_default_model(tmp_path: Path) -> None:
    bundle = Bundle()
    if bundle.default_model not in bundle.available():
        pytest.skip(f"the trained default model {bundle.default_model!r} is not in monai_bundle/")
    out = tmp_path / "eval"
    check(
        monai_bundle(
            "run", "--config_file", str(INFERENCE), "--output_dir", str(out), "--device", "cpu"
        )
    )
    rows, summary = _read_predictions(out, bundle.default_model)
    assert len(rows) == 9 and summary["bundle_version"] == bundle.version
    _check_against_predictor(rows, Predictor())


def test_loader_marks_rejected_files(sample_dir: Path, tmp_path: Path) -> None:
    from pydicom.data import get_testdata_file

    from dicom_covid.monai_components import LoadXrayd, PreprocessXrayd, list_images

    shutil.copy(sample_dir / "chest_cr_mono2.dcm", tmp_path / "a.dcm")
    shutil.copy(get_testdata_file("CT_small.dcm"), tmp_path / "ct.dcm")
    (tmp_path / "notes.txt").write_text("not an image")
    items = list_images(tmp_path)
    assert [Path(i["image"]).name for i in items] == ["a.dcm", "ct.dcm"]
    load, prep = LoadXrayd("image"), PreprocessXrayd("image", 64, (0.5,) * 3, (0.5,) * 3)
    good, ct = (prep(load(i)) for i in items)
    assert good["rejected"] == "" and good["image"].shape == (3, 64, 64)
    assert ct["rejected"] == "wrong_modality" and ct["image"].shape == (3, 64, 64)
    with pytest.raises(InputRejected):
        LoadXrayd("image", on_reject="raise")(items[1])
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no DICOM"):
        list_images(tmp_path / "empty")
    with pytest.raises(DataError, match="no such folder"):
        list_images(tmp_path / "missing")


# --- TorchScript export ------------------------------------------------------------------------


def test_ckpt_export_torchscript(throwaway: Path, tmp_path: Path) -> None:
    common = ["--config_file", str(INFERENCE), "--bundle_root", str(throwaway)]
    check(monai_bundle("run", "export_checkpoint", *common, "--output_dir", str(tmp_path)))
    pt = tmp_path / "efficientnet_lite0.pt"
    assert pt.is_file()
    ts = tmp_path / "efficientnet_lite0.ts"
    check(
        monai_bundle(
            "ckpt_export",
            "network_def",
            *common,
            "--meta_file",
            str(META),
            "--backbone",
            "efficientnet_lite0",
            "--ckpt_file",
            str(pt),
            "--filepath",
            str(ts),
        )
    )
    extra = {"metadata.json": "", "inference.json": ""}
    scripted = torch.jit.load(str(ts), _extra_files=extra)
    network_def = json.loads(extra["inference.json"])["network_def"]
    assert network_def["name"] == "$dicom_covid.bundle.backbone_of(@backbone, @bundle_root)"
    predictor = Predictor(throwaway)
    x = predictor.input_tensor(read_image(ROOT / "sample_dicoms" / "chest_cr_mono1.dcm"))
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), predictor.model(x), atol=1e-4, rtol=1e-4)


# --- training and evaluation configs -----------------------------------------------------------


def test_train_then_evaluate_configs(cxr_data: Path, throwaway: Path, tmp_path: Path) -> None:
    bundle_root = tmp_path / "bundle"
    shutil.copytree(throwaway, bundle_root)
    run_dir = tmp_path / "run"
    check(
        monai_bundle(
            "run",
            "--config_file",
            str(CONFIGS / "train.json"),
            "--backbone",
            "alexnet",
            "--dataset_dir",
            str(cxr_data),
            "--output_dir",
            str(run_dir),
            "--epochs",
            "1",
            "--max_train_per_class",
            "4",
            "--max_val_per_class",
            "4",
            "--max_steps_per_epoch",
            "1",
            "--batch_size",
            "4",
            "--image_size",
            "64",
            "--device",
            "cpu",
            "--progress",
            "False",
            "--install",
            "True",
            "--bundle_root",
            str(bundle_root),
        )
    )
    facts = json.loads((run_dir / "model.json").read_text())
    assert facts["backbone"] == "alexnet" and facts["input_size"] == 64
    assert facts["train_config"]["max_train_per_class"] == 4
    installed = Bundle(bundle_root).facts("alexnet")
    assert installed.input_size == 64 and installed.weights.is_file()

    out = tmp_path / "eval"
    check(
        monai_bundle(
            "run",
            "--config_file",
            str(CONFIGS / "evaluate.json"),
            "--bundle_root",
            str(bundle_root),
            "--backbone",
            "alexnet",
            "--dataset_dir",
            str(cxr_data),
            "--split",
            "test",
            "--max_per_class",
            "3",
            "--bootstrap",
            "0",
            "--shortcut_control",
            "False",
            "--report",
            "False",
            "--device",
            "cpu",
            "--progress",
            "False",
            "--output_dir",
            str(out),
        )
    )
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["model"] == "alexnet" and metrics["n"] == 9
    assert metrics["disclaimer"] == DISCLAIMER
    assert sum(map(sum, metrics["confusion_matrix"])) == 9
    assert "predictions" not in metrics
