"""The one epoch loop every network is trained with (classifiers and the lung U-Net).

:class:`Engine` owns what a training run does around the arithmetic: resuming from the run
folder's checkpoint (model, optimiser, scheduler, every random generator, epoch, best score,
early-stopping count, history), one checkpoint per epoch written atomically, the best state by a
validation score (``best.pt``), early stopping, ``history.json`` and the tqdm bar of each epoch.
A trainer supplies only what differs: its model, optimiser and scheduler, a function that trains
one epoch, and a function that validates and returns the epoch's history record (holding the
score). :func:`dicom_covid.training.train.train` and
:func:`dicom_covid.lungs.training.train_segmenter` both run on it.

Why a loop of our own and not MONAI's ``SupervisedTrainer``/``SupervisedEvaluator``: those need
pytorch-ignite (not a dependency), and their ``CheckpointSaver``/``CheckpointLoader`` handlers
save objects' ``state_dict`` only, not the data-order and augmentation generators (a
``torch.Generator`` of a DataLoader, the ``numpy`` states inside a MONAI ``Compose``) that
resuming bit for bit needs; the classifier also caps steps per epoch, steps its scheduler per
step under a GradScaler, and validates on rank 0 only under DistributedDataParallel, and the
U-Net assembles augmented batches from in-memory tensors without a DataLoader: each would be a
custom handler or iteration function. This module (about 200 lines of code) replaces the two
hand-written copies of the same mechanics (resume, checkpoint, best state, history, bar): the
trainers lost 158 lines and gained 84 (their step and validation functions).

Checkpoint format (``format`` = :data:`CHECKPOINT_FORMAT`)::

    {"format", "model", "optimizer", "scheduler", "epoch", "best_score", "best_epoch",
     "bad_epochs", "history", "rng": {"torch", "numpy", "python", "generators"}, "config"}

``best.pt`` holds ``{"model", "epoch", <score name>: score}``. A checkpoint without ``format``
(written before this engine) is refused with a message saying to start a new run.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from ..bundle_writer import atomic_write
from ..errors import DataError

__all__ = ["CHECKPOINT_FORMAT", "Engine", "EngineResult", "random_generators"]

logger = logging.getLogger(__name__)

#: Version tag of the checkpoints the engine writes.
CHECKPOINT_FORMAT = "dicom_covid.training.engine/1"


def random_generators(obj: Any) -> list[torch.Generator | np.random.RandomState]:
    """Every random generator reachable from ``obj``, in a fixed order.

    Looks through attributes, lists, tuples and dicts, so a MONAI ``Compose`` yields the
    ``numpy`` states of its transforms and of the transforms they wrap.

    Parameters
    ----------
    obj : object
        A ``torch.Generator``, a ``numpy.random.RandomState``, or an object holding them.

    Returns
    -------
    list
        The generators, each once.
    """
    found: list[torch.Generator | np.random.RandomState] = []
    seen: set[int] = set()

    def walk(o: Any, depth: int) -> None:
        if id(o) in seen or depth > 8:
            return
        seen.add(id(o))
        if isinstance(o, torch.Generator | np.random.RandomState):
            found.append(o)
        elif isinstance(o, list | tuple):
            for v in o:
                walk(v, depth + 1)
        elif isinstance(o, dict):
            for v in o.values():
                walk(v, depth + 1)
        elif hasattr(o, "__dict__") and not isinstance(o, torch.nn.Module | torch.Tensor | type):
            for v in vars(o).values():
                walk(v, depth + 1)

    walk(obj, 0)
    return found


def _states(gens: list[torch.Generator | np.random.RandomState]) -> list[Any]:
    return [g.get_state() for g in gens]


def _restore(gens: list[torch.Generator | np.random.RandomState], states: list[Any]) -> None:
    for g, s in zip(gens, states, strict=True):
        g.set_state(s)


@dataclass(frozen=True)
class EngineResult:
    """What :meth:`Engine.run` did.

    Attributes
    ----------
    best_epoch : int
        0-based epoch of the best validation score (-1: none run).
    best_score : float
        That score (-1.0: none run).
    epochs_run : int
        Epochs completed in the run folder, resumed ones included.
    stopped_early : bool
        Stopped for lack of improvement (now or in the run resumed).
    history : list of dict
        One record per epoch (as returned by the validation function).
    """

    best_epoch: int
    best_score: float
    epochs_run: int
    stopped_early: bool
    history: list[dict]


class Engine:
    """Run epochs of a model with resume, checkpoints, best state, early stopping and history.

    Parameters
    ----------
    run_dir : path
        Run folder (created); holds the checkpoint, ``best.pt`` and ``history.json``.
    model : torch.nn.Module
        The network whose ``state_dict`` is saved (not a DDP wrapper).
    optimizer : torch.optim.Optimizer
    scheduler : learning-rate scheduler or None
        Saved and restored; the trainer steps it.
    score_name : str
        Key of the validation record that selects the best epoch (higher is better).
    checkpoint_name : str
        File name of the per-epoch checkpoint (default ``last.pt``).
    min_delta : float
        A score counts as better when it exceeds the best by more than this (default 0).
    patience : int or None
        Stop after this many epochs without a better score; None never stops early.
    generators : mapping of str to object, optional
        Objects holding random generators besides the global ones (a DataLoader's
        ``torch.Generator``, an augmentation); see :func:`random_generators`. Their states are
        checkpointed so a resumed run continues the same random streams.
    config : dict, optional
        JSON-able settings stored in each checkpoint.
    is_main : bool
        This process writes files and validates (rank 0); others only train.
    progress : bool
        Show a tqdm bar per epoch (main process only).
    name : str
        Shown in the bar (``"<name> epoch 2/10"``).
    """

    def __init__(
        self,
        run_dir: str | Path,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: Any | None,
        score_name: str,
        checkpoint_name: str = "last.pt",
        min_delta: float = 0.0,
        patience: int | None = None,
        generators: Mapping[str, Any] | None = None,
        config: dict | None = None,
        is_main: bool = True,
        progress: bool = True,
        name: str = "train",
    ) -> None:
        self.run_dir = Path(run_dir)
        if is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.score_name, self.min_delta, self.patience = score_name, min_delta, patience
        self.checkpoint = self.run_dir / checkpoint_name
        self.best_path = self.run_dir / "best.pt"
        self.generators = {k: random_generators(v) for k, v in (generators or {}).items()}
        self.config = config or {}
        self.is_main, self.progress, self.name = is_main, progress, name
        self.start_epoch, self.best_score, self.best_epoch, self.bad_epochs = 0, -1.0, -1, 0
        self.history: list[dict] = []

    def resume(self) -> int:
        """Load the run folder's checkpoint when there is one.

        Returns
        -------
        int
            The first epoch still to run (0 without a checkpoint).

        Raises
        ------
        DataError
            The checkpoint was written before this engine, or by another trainer.
        """
        if not self.checkpoint.is_file():
            return 0
        ckpt = torch.load(self.checkpoint, map_location="cpu", weights_only=False)
        if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
            raise DataError(
                f"{self.checkpoint} was written by an older version of dicom-covid (before the "
                "common training engine) and cannot be resumed: start a new run (another "
                "output folder, or without resume)"
            )
        if set(ckpt["rng"]["generators"]) != set(self.generators):
            raise DataError(
                f"{self.checkpoint} holds the generators {sorted(ckpt['rng']['generators'])}, "
                f"this trainer {sorted(self.generators)}: it belongs to another kind of run; "
                "start a new run in another output folder"
            )
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(ckpt["scheduler"])
        rng = ckpt["rng"]
        torch.set_rng_state(rng["torch"])
        np.random.set_state(rng["numpy"])
        random.setstate(rng["python"])
        for key, gens in self.generators.items():
            _restore(gens, rng["generators"][key])
        self.start_epoch = int(ckpt["epoch"]) + 1
        self.best_score, self.best_epoch = float(ckpt["best_score"]), int(ckpt["best_epoch"])
        self.bad_epochs, self.history = int(ckpt["bad_epochs"]), list(ckpt["history"])
        if self.is_main:
            logger.info(
                "resumed from %s at epoch %d (best %s %.4f at epoch %d)",
                self.checkpoint,
                self.start_epoch + 1,
                self.score_name,
                self.best_score,
                self.best_epoch + 1,
            )
        return self.start_epoch

    def _save(self, epoch: int, improved: bool, score: float) -> None:
        state = {
            "format": CHECKPOINT_FORMAT,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": None if self.scheduler is None else self.scheduler.state_dict(),
            "epoch": epoch,
            "best_score": self.best_score,
            "best_epoch": self.best_epoch,
            "bad_epochs": self.bad_epochs,
            "history": self.history,
            "rng": {
                "torch": torch.get_rng_state(),
                "numpy": np.random.get_state(),
                "python": random.getstate(),
                "generators": {k: _states(g) for k, g in self.generators.items()},
            },
            "config": self.config,
        }
        atomic_write(self.checkpoint, lambda fh: torch.save(state, fh))
        if improved:
            best = {"model": self.model.state_dict(), "epoch": epoch, self.score_name: score}
            atomic_write(self.best_path, lambda fh: torch.save(best, fh))
        text = json.dumps(self.history, indent=2).encode()
        atomic_write(self.run_dir / "history.json", lambda fh: fh.write(text))

    def run(
        self,
        epochs: int,
        steps: int,
        train_epoch: Callable[[int, tqdm], dict],
        validate: Callable[[int, dict], dict],
    ) -> EngineResult:
        """Train from the resumed epoch up to ``epochs``.

        Parameters
        ----------
        epochs : int
            Last epoch (exclusive, 0-based) of the run.
        steps : int
            Steps per epoch (the bar's length).
        train_epoch : callable
            ``train_epoch(epoch, bar) -> stats``: trains one epoch (model in train mode, the
            scheduler stepped as the trainer wants), updating ``bar``; runs on every process.
        validate : callable
            ``validate(epoch, stats) -> record``: the epoch's history record, which holds
            ``score_name``; runs on the main process only.

        Returns
        -------
        EngineResult
        """
        distributed = dist.is_available() and dist.is_initialized()
        stopped = self.patience is not None and self.bad_epochs >= self.patience
        epoch = self.start_epoch - 1
        for epoch in range(self.start_epoch, self.start_epoch if stopped else epochs):
            bar = tqdm(
                total=steps,
                desc=f"{self.name} epoch {epoch + 1}/{epochs}",
                disable=not (self.progress and self.is_main),
                unit="step",
                leave=False,
            )
            stats = train_epoch(epoch, bar)
            bar.close()
            stop = torch.zeros(1)
            if self.is_main:
                record = validate(epoch, stats)
                score = float(record[self.score_name])
                improved = score > self.best_score + self.min_delta
                if improved:
                    self.best_score, self.best_epoch, self.bad_epochs = score, epoch, 0
                else:
                    self.bad_epochs += 1
                self.history.append(record)
                self._save(epoch, improved, score)
                logger.info(
                    "%s epoch %d/%d: %s%s",
                    self.name,
                    epoch + 1,
                    epochs,
                    ", ".join(f"{k} {v:.4g}" for k, v in record.items() if k != "epoch"),
                    " (best)" if improved else "",
                )
                if self.patience is not None and self.bad_epochs >= self.patience:
                    stop[0] = 1
            if distributed:
                dist.broadcast(stop, src=0)
            if stop.item():
                stopped = True
                if self.is_main:
                    logger.info(
                        "early stop: no better %s for %d epochs", self.score_name, self.patience
                    )
                break
        return EngineResult(self.best_epoch, self.best_score, epoch + 1, stopped, self.history)

    def best_state(self) -> dict[str, torch.Tensor] | None:
        """The weights of the best epoch (``best.pt``), or None when no epoch has run."""
        if self.best_epoch < 0 or not self.best_path.is_file():
            return None
        return torch.load(self.best_path, map_location="cpu", weights_only=False)["model"]
