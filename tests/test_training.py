"""Training: few steps on a tiny subset, resume, export, install, two-process torchrun."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_engine import Interrupted, killed_after_first_epoch, same_weights
from typer.testing import CliRunner

from dicom_covid.bundle import Bundle, install_model
from dicom_covid.cli.main import app
from dicom_covid.errors import DataError
from dicom_covid.models import BACKBONES, build_model
from dicom_covid.preprocessing import Preprocessing
from dicom_covid.training import train as train_module
from dicom_covid.training.data import LABELS, read_manifest, subsample
from dicom_covid.training.train import TrainConfig

ROOT = Path(__file__).resolve().parent.parent
TINY = [
    "--max-train-per-class",
    "4",
    "--max-val-per-class",
    "2",
    "--max-steps-per-epoch",
    "2",
    "--batch-size",
    "4",
    "--image-size",
    "64",
    "--no-progress",
]


def _run(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=600, cwd=ROOT)


def test_train_then_resume(cxr_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    runner = CliRunner()
    first = runner.invoke(
        app,
        [
            "train",
            "--backbone",
            "efficientnet_lite0",
            "--data",
            str(cxr_data),
            "--output-dir",
            str(out),
            "--epochs",
            "1",
            *TINY,
        ],
    )
    assert first.exit_code == 0, first.output
    ckpt = torch.load(out / "last.pt", map_location="cpu", weights_only=False)
    assert ckpt["epoch"] == 0
    assert len(json.loads((out / "history.json").read_text())) == 1

    second = runner.invoke(
        app,
        [
            "train",
            "--backbone",
            "efficientnet_lite0",
            "--data",
            str(cxr_data),
            "--output-dir",
            str(out),
            "--epochs",
            "2",
            "--resume",
            *TINY,
        ],
    )
    assert second.exit_code == 0, second.output
    history = json.loads((out / "history.json").read_text())
    assert [h["epoch"] for h in history] == [0, 1], "resume continues at epoch 1, not from 0"
    ckpt = torch.load(out / "last.pt", map_location="cpu", weights_only=False)
    assert ckpt["epoch"] == 1

    facts = json.loads((out / "model.json").read_text())
    assert facts["input_size"] == 64 and facts["labels"] == ["covid", "normal", "pneumonia"]
    assert 0.0 <= facts["covid_threshold"] <= 1.0
    from safetensors.torch import load_file

    weights = load_file(str(out / "model.safetensors"))
    assert all(v.dtype == torch.float16 for v in weights.values() if v.is_floating_point())

    bundle_dir = tmp_path / "bundle"
    shutil.copytree(ROOT / "monai_bundle" / "configs", bundle_dir / "configs")
    install_model(out, bundle_dir, make_default=True)
    bundle = Bundle(bundle_dir)
    assert bundle.default_model == "efficientnet_lite0"
    assert bundle.facts().input_size == 64


def test_init_checkpoint_and_unknown_backbone(cxr_data: Path, tmp_path: Path) -> None:
    ckpt = tmp_path / "mine.pt"
    reference = build_model("alexnet")
    torch.save(reference.state_dict(), ckpt)
    model = build_model("alexnet", init_checkpoint=ckpt)
    for key, value in reference.state_dict().items():
        assert torch.equal(model.state_dict()[key], value)
    result = CliRunner().invoke(
        app,
        [
            "train",
            "--backbone",
            "nonexistent",
            "--data",
            str(cxr_data),
            "--output-dir",
            str(tmp_path / "x"),
        ],
    )
    assert result.exit_code == 1
    assert "unknown backbone" in result.output and "resnet50" in result.output


def test_manifest_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"manifest\.csv"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.csv").write_text("path,label\na.png,flu\n")
    with pytest.raises(DataError, match="not one of"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.csv").write_text("file,label\na.png,covid\n")
    with pytest.raises(DataError, match="'path' and 'label'"):
        read_manifest(tmp_path)


def test_subsample_is_seeded(cxr_data: Path) -> None:
    rows = read_manifest(cxr_data, "val")
    a, b = subsample(rows, 5, seed=1), subsample(rows, 5, seed=1)
    assert [r.path for r in a] == [r.path for r in b]
    assert len(a) == 15
    assert [r.path for r in subsample(rows, 5, seed=2)] != [r.path for r in a]


def _noise_data(folder: Path) -> Path:
    """Two train images and one val image per class, 40x40 noise, with a manifest."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    lines = ["path,label,split"]
    for label in LABELS:
        for i, split in enumerate(("train", "train", "val")):
            name = f"{label}{i}.png"
            Image.fromarray(rng.integers(0, 256, (40, 40), dtype=np.uint8)).save(folder / name)
            lines.append(f"{name},{label},{split}")
    (folder / "manifest.csv").write_text("\n".join(lines) + "\n")
    return folder


def test_initial_weights_do_not_depend_on_the_image_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Same seed, same initial network, whether the prepared-image cache is cold or warm (#10).

    The lung-crop pipeline builds its U-Net (random initial weights) only when an image is
    missing from the cache; the stand-in below draws from every global generator for each image
    it prepares, as that did. With a learning rate of 0 the checkpoint holds the initial weights.
    """

    def rng_hungry(size: int, spec: dict) -> object:
        real = Preprocessing(size, spec)

        def prepare(pixels: np.ndarray) -> tuple:
            torch.nn.Conv2d(1, 16, 3)
            np.random.rand(3)
            random.random()
            return real(pixels)

        return prepare

    monkeypatch.setattr(train_module, "Preprocessing", rng_hungry)
    data, cache = _noise_data(tmp_path / "data"), tmp_path / "cache"

    def initial_weights(run: str) -> dict[str, torch.Tensor]:
        cfg = TrainConfig(
            "efficientnet_lite0",
            data,
            tmp_path / run,
            epochs=1,
            batch_size=2,
            lr=0.0,
            image_size=32,
            imagenet=False,
            max_steps_per_epoch=1,
            progress=False,
            cache_dir=cache,
            device="cpu",
        )
        train_module.train(cfg)
        return torch.load(tmp_path / run / "last.pt", map_location="cpu", weights_only=False)[
            "model"
        ]

    cold = initial_weights("cold")  # every image prepared: the generators are drawn from
    assert list(cache.glob("prepared-*.pt"))
    warm = initial_weights("warm")  # every image from the cache: no draws
    names = [name for name, _ in build_model("efficientnet_lite0").named_parameters()]
    assert names and all(torch.equal(cold[name], warm[name]) for name in names)


@pytest.mark.parametrize(
    ("recipe", "without"), [("v1", ()), ("transfer", ("lung_crop",))], ids=["v1", "transfer"]
)
def test_a_killed_run_resumes_to_the_same_weights(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, recipe: str, without: tuple[str, ...]
) -> None:
    """Killed after epoch 1 and resumed, a 2-epoch run ends with the uninterrupted weights.

    Data order, augmentation, the balanced sampler (transfer), dropout, optimiser and the
    per-step learning-rate schedule all continue where they stopped.
    """
    data = _noise_data(tmp_path / "data")

    def cfg(run: str, resume: bool = False) -> TrainConfig:
        return TrainConfig(
            "efficientnet_lite0",
            data,
            tmp_path / run,
            epochs=2,
            batch_size=2,
            lr=1e-2,
            image_size=32,
            imagenet=False,
            max_steps_per_epoch=2,
            progress=False,
            device="cpu",
            resume=resume,
            recipe=recipe,
            without=without,
            patience=5,
        )

    whole = train_module.train(cfg("whole"))
    with monkeypatch.context() as m:
        m.setattr(train_module, "Engine", killed_after_first_epoch(train_module.Engine))
        with pytest.raises(Interrupted):
            train_module.train(cfg("killed"))
    assert not (tmp_path / "killed" / "model.safetensors").exists()
    resumed = train_module.train(cfg("killed", resume=True))

    def last(run: str) -> dict:
        return torch.load(tmp_path / run / "last.pt", map_location="cpu", weights_only=False)

    assert same_weights(last("whole")["model"], last("killed")["model"])
    assert (resumed.best_epoch, resumed.epochs_run) == (whole.best_epoch, whole.epochs_run)
    untimed = [
        [{k: v for k, v in h.items() if k != "train_seconds"} for h in last(run)["history"]]
        for run in ("whole", "killed")
    ]
    assert untimed[0] == untimed[1] and len(untimed[0]) == 2


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_every_backbone_builds_and_runs(name: str) -> None:
    spec = BACKBONES[name]
    model = build_model(name).eval()
    with torch.no_grad():
        out = model(torch.zeros(1, 3, spec.input_size, spec.input_size))
    assert out.shape == (1, 3)
    assert dict(model.named_modules())[spec.gradcam_layer] is not None


@pytest.mark.slow
def test_torchrun_two_cpu_processes(cxr_data: Path, tmp_path: Path) -> None:
    """DistributedDataParallel with gloo: two processes train, rank 0 writes the checkpoint."""
    torchrun = Path(sys.executable).parent / "torchrun"
    cli = Path(sys.executable).parent / "dicom-covid"
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [
            str(torchrun),
            "--standalone",
            "--nproc_per_node",
            "2",
            "--no-python",
            str(cli),
            "train",
            "--backbone",
            "alexnet",
            "--data",
            str(cxr_data),
            "--output-dir",
            str(out),
            "--epochs",
            "1",
            *TINY,
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ckpt = torch.load(out / "last.pt", map_location="cpu", weights_only=False)
    assert ckpt["epoch"] == 0
    assert (out / "model.safetensors").is_file()
    assert proc.stdout.count("best val macro AUC") == 1, "only rank 0 reports"
