"""The training engine: resume equals an uninterrupted run, best state, early stop, old files."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from dicom_covid.errors import DataError
from dicom_covid.training.engine import CHECKPOINT_FORMAT, Engine, EngineResult, random_generators


class Interrupted(Exception):
    """Stands for the process being killed in the middle of an epoch."""


def killed_after_first_epoch(engine: type[Engine]) -> type[Engine]:
    """``engine`` whose process "dies" right after writing the first epoch's checkpoint.

    Trainers take it in place of :class:`Engine` (monkeypatched) to test their resume.
    """

    class Killed(engine):
        def _save(self, epoch: int, improved: bool, score: float) -> None:
            super()._save(epoch, improved, score)
            if epoch == 0:
                raise Interrupted

    return Killed


def same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    """Same keys, every tensor within 1e-6."""
    return a.keys() == b.keys() and all(
        torch.allclose(a[k].float(), b[k].float(), atol=1e-6, rtol=0) for k in a
    )


def _fit(
    run_dir: Path,
    epochs: int = 2,
    resume: bool = False,
    kill_in_epoch: int | None = None,
    scores: list[float] | None = None,
    patience: int | None = None,
    seen: dict[int, dict[str, torch.Tensor]] | None = None,
) -> tuple[nn.Module, EngineResult]:
    """Train a tiny regression net whose every step draws from each kind of random generator."""
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.3), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5)
    x = torch.randn(32, 4, generator=torch.Generator().manual_seed(1))
    gen = torch.Generator().manual_seed(0)
    loader = DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), 8, shuffle=True, generator=gen)
    noise = np.random.RandomState(5)
    engine = Engine(
        run_dir,
        model,
        opt,
        sched,
        "score",
        patience=patience,
        generators={"order": gen, "noise": {"inside": [noise]}},
        progress=False,
        name="tiny",
    )
    if resume:
        engine.resume()

    def train_epoch(epoch: int, bar: object) -> dict:
        model.train()
        for step, (xb, yb) in enumerate(loader):
            if epoch == kill_in_epoch and step == 2:
                raise Interrupted
            jitter = torch.from_numpy(noise.normal(0, 0.1, tuple(xb.shape))).float()
            xb = xb + jitter + 0.01 * float(np.random.rand()) + 0.01 * random.random()
            loss = F.mse_loss(model(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
        return {"loss": float(loss.detach())}

    def validate(epoch: int, stats: dict) -> dict:
        model.eval()
        with torch.no_grad():
            mse = float(F.mse_loss(model(x), x.sum(1, keepdim=True)))
        if seen is not None:
            seen[epoch] = {k: v.clone() for k, v in model.state_dict().items()}
        score = scores[epoch] if scores else -mse
        return {"epoch": epoch, "loss": stats["loss"], "score": score}

    return model, engine.run(epochs, len(loader), train_epoch, validate)


def test_resume_after_a_kill_equals_an_uninterrupted_run(tmp_path: Path) -> None:
    whole, result = _fit(tmp_path / "whole", epochs=3)
    with pytest.raises(Interrupted):
        _fit(tmp_path / "killed", epochs=3, kill_in_epoch=1)
    ckpt = torch.load(tmp_path / "killed" / "last.pt", weights_only=False)
    assert ckpt["format"] == CHECKPOINT_FORMAT and ckpt["epoch"] == 0
    resumed, again = _fit(tmp_path / "killed", epochs=3, resume=True)
    assert same_weights(whole.state_dict(), resumed.state_dict())
    assert again.history == result.history and again.epochs_run == 3
    saved = json.loads((tmp_path / "killed" / "history.json").read_text())
    assert [h["epoch"] for h in saved] == [0, 1, 2]


def test_best_state_and_files(tmp_path: Path) -> None:
    seen: dict[int, dict[str, torch.Tensor]] = {}
    _, result = _fit(tmp_path / "run", epochs=3, scores=[0.5, 0.9, 0.1], seen=seen)
    assert (result.best_epoch, result.best_score, result.stopped_early) == (1, 0.9, False)
    best = torch.load(tmp_path / "run" / "best.pt", weights_only=False)
    assert best["epoch"] == 1 and best["score"] == 0.9
    assert same_weights(best["model"], seen[1]) and not same_weights(best["model"], seen[2])
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [
        "best.pt",
        "history.json",
        "last.pt",
    ], "no temporary files left behind"


def test_early_stop_and_a_stopped_run_stays_stopped(tmp_path: Path) -> None:
    _, result = _fit(tmp_path / "run", epochs=6, scores=[0.5, 0.4, 0.4, 0.9, 1, 1], patience=2)
    assert result.stopped_early and result.epochs_run == 3 and result.best_epoch == 0
    _, again = _fit(tmp_path / "run", epochs=6, scores=[1.0] * 6, patience=2, resume=True)
    assert again.stopped_early and again.epochs_run == 3 and len(again.history) == 3


def test_old_or_foreign_checkpoints_say_start_a_new_run(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    torch.save({"model": {}, "epoch": 0, "best_auc": 0.5, "torch_rng": None}, run / "last.pt")
    with pytest.raises(DataError, match=r"older version.*start a new run"):
        _fit(run, resume=True)
    _fit(run, epochs=1)  # without resume the old file is replaced
    state = torch.load(run / "last.pt", weights_only=False)
    del state["rng"]["generators"]["noise"]
    torch.save(state, run / "last.pt")
    with pytest.raises(DataError, match="another kind of run"):
        _fit(run, resume=True)


def test_random_generators_finds_nested_monai_states() -> None:
    from dicom_covid.lungs.training import _augmenter

    gens = random_generators(_augmenter(32, 0))
    assert len(gens) > 6 and all(isinstance(g, np.random.RandomState) for g in gens)
    g = torch.Generator()
    assert random_generators({"a": [g, g]}) == [g]
