"""Training loop for any registry backbone.

Features: patient-level splits from the manifest, class-balanced loss, chest-X-ray augmentation,
mixed precision on GPU, seeded runs, and DistributedDataParallel when started by ``torchrun``
(gloo on CPU, nccl on GPU). The epoch loop is :class:`dicom_covid.training.engine.Engine`: a
checkpoint every epoch (``last.pt``) and on improvement (``best.pt``), ``resume``, early stopping
on validation macro AUC, ``history.json``.

A finished run leaves in its output folder ``model.safetensors`` (fp16 weights of the best epoch)
and ``model.json`` (backbone, preprocessing, labels, the COVID threshold chosen on the validation
split, validation metrics and the training settings), which :func:`dicom_covid.bundle.install_model`
copies into the bundle.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler
from tqdm.auto import tqdm

from ..errors import DataError
from ..models import build_model, get_spec
from ..preprocessing import Preprocessing
from ..transforms import ChestAugment, SourceScrambleAugment
from .data import LABELS, CachedImageDataset, balanced_weights, read_manifest, spec_key, subsample
from .engine import Engine
from .metrics import choose_threshold, macro_auc

__all__ = [
    "RECIPES",
    "RECIPE_LABEL_SMOOTHING",
    "TRANSFER_INGREDIENTS",
    "TRANSFER_PREPROCESSING",
    "RecipeParts",
    "TrainConfig",
    "TrainResult",
    "recipe_parts",
    "recipe_variant",
    "train",
]

logger = logging.getLogger(__name__)

#: Training recipes. ``v1``: resize to the input size, :class:`ChestAugment`, class-weighted
#: loss, uniform shuffling (the version-1 models). ``transfer``: the recipe built for hospitals
#: the model has not seen: :data:`TRANSFER_PREPROCESSING` (resolution harmonisation, lung crop,
#: CLAHE), :class:`SourceScrambleAugment`, source- and class-balanced sampling, temperature
#: scaling on the val split.
RECIPES = ("v1", "transfer")

#: Preprocessing written into the facts of a ``transfer`` model (see
#: :mod:`dicom_covid.preprocessing`).
TRANSFER_PREPROCESSING = {
    "pipeline": "lung_crop_clahe",
    "base_size": 224,
    "lung_crop": {"margin": 0.08, "min_lung_fraction": 0.08},
    "clahe": {"clip_limit": 2.0, "tile_grid": 8},
}

#: Label smoothing each recipe is run with by ``dicom-covid crossval run``.
RECIPE_LABEL_SMOOTHING = {"v1": 0.05, "transfer": 0.1}

#: Ingredients of the ``transfer`` recipe that :attr:`TrainConfig.without` can switch off, one
#: at a time or together (ablations). What each becomes when switched off:
#:
#: * ``lung_crop``: no crop to the lung fields (resolution harmonisation and CLAHE stay);
#: * ``clahe``: no CLAHE (resolution harmonisation and lung crop stay);
#: * ``scramble``: :class:`ChestAugment` (the ``v1`` augmentation) instead of
#:   :class:`SourceScrambleAugment`;
#: * ``balanced``: uniform shuffling with a class-weighted loss (as ``v1``) instead of source-
#:   and class-balanced sampling;
#: * ``label_smoothing``: label smoothing 0;
#: * ``temperature``: no temperature scaling (temperature 1; the threshold is still chosen on
#:   the val split).
TRANSFER_INGREDIENTS: tuple[str, ...] = (
    "lung_crop",
    "clahe",
    "scramble",
    "balanced",
    "label_smoothing",
    "temperature",
)


@dataclass(frozen=True)
class RecipeParts:
    """What a training recipe does, after any ingredients were switched off.

    Built by :func:`recipe_parts`; the one place where recipes are defined.

    Attributes
    ----------
    variant : str
        Display name, the recipe followed by ``−ingredient`` for each switched-off one, e.g.
        ``"transfer−clahe"`` (see :func:`recipe_variant`).
    preprocessing : dict
        The facts' ``preprocessing`` entry (``{}``: plain resize, see
        :mod:`dicom_covid.preprocessing`).
    scramble : bool
        :class:`SourceScrambleAugment` (True) or :class:`ChestAugment` (False).
    balanced : bool
        Source- and class-balanced sampling without loss weights (True) or uniform shuffling
        with a class-weighted loss (False).
    label_smoothing : float
        Cross-entropy label smoothing.
    temperature : bool
        Fit a softmax temperature on the val split at export.
    """

    variant: str
    preprocessing: dict
    scramble: bool
    balanced: bool
    label_smoothing: float
    temperature: bool


def recipe_variant(recipe: str, without: Sequence[str] = ()) -> str:
    """Display name of a recipe with ingredients switched off, e.g. ``"transfer−clahe"``.

    Parameters
    ----------
    recipe : str
        A name of :data:`RECIPES`.
    without : sequence of str
        Switched-off ingredients (any order; shown in :data:`TRANSFER_INGREDIENTS` order).

    Returns
    -------
    str
        ``recipe`` itself when nothing is switched off.
    """
    off = set(without)
    return recipe + "".join(f"−{name}" for name in TRANSFER_INGREDIENTS if name in off)


def recipe_parts(
    recipe: str, without: Sequence[str] = (), label_smoothing: float = 0.05
) -> RecipeParts:
    """Resolve a recipe, minus the ingredients in ``without``, into what training does.

    Parameters
    ----------
    recipe : str
        ``"v1"`` or ``"transfer"`` (see :data:`RECIPES`).
    without : sequence of str
        Ingredients of the ``transfer`` recipe to switch off (see
        :data:`TRANSFER_INGREDIENTS`); must be empty for ``v1``.
    label_smoothing : float
        The configured label smoothing (0 when ``label_smoothing`` is switched off).

    Returns
    -------
    RecipeParts

    Raises
    ------
    DataError
        Unknown recipe or ingredient, or ingredients switched off in a recipe without them.
    """
    if recipe not in RECIPES:
        raise DataError(f"recipe {recipe!r} is not one of {', '.join(RECIPES)}")
    off = set(without)
    unknown = sorted(off - set(TRANSFER_INGREDIENTS))
    if unknown:
        raise DataError(
            f"cannot switch off {', '.join(unknown)}: the ingredients of the transfer recipe "
            f"are {', '.join(TRANSFER_INGREDIENTS)}"
        )
    if recipe != "transfer":
        if off:
            raise DataError(
                f"--without {', '.join(sorted(off))} applies to the transfer recipe only; "
                f"recipe {recipe!r} has none of its ingredients (use --recipe transfer)"
            )
        return RecipeParts(recipe, {}, False, False, label_smoothing, False)
    prep = json.loads(json.dumps(TRANSFER_PREPROCESSING))
    if "lung_crop" in off:
        prep["lung_crop"] = None
    if "clahe" in off:
        prep["clahe"] = None
    return RecipeParts(
        variant=recipe_variant(recipe, sorted(off)),
        preprocessing=prep,
        scramble="scramble" not in off,
        balanced="balanced" not in off,
        label_smoothing=0.0 if "label_smoothing" in off else label_smoothing,
        temperature="temperature" not in off,
    )


@dataclass(frozen=True)
class TrainConfig:
    """Settings of one training run; every field has a documented default.

    Attributes
    ----------
    backbone : str
        Registry key (see :data:`dicom_covid.models.BACKBONES`).
    data_dir : pathlib.Path
        Folder with ``manifest.csv`` (train and val splits are used).
    output_dir : pathlib.Path
        Where checkpoints, history and the exported model go.
    epochs : int
        Maximum epochs (default 10).
    batch_size : int
        Per-process batch size (default 32).
    lr : float
        Peak AdamW learning rate (default 5e-4), with 1 epoch of linear warm-up then cosine decay.
    weight_decay : float
        AdamW weight decay (default 1e-4).
    label_smoothing : float
        Cross-entropy label smoothing (default 0.05).
    image_size : int or None
        Input side; None takes the backbone's registry size.
    imagenet : bool
        Start from packaged ImageNet weights where they exist (EfficientNet-Lite0).
    init_checkpoint : pathlib.Path or None
        A user's own checkpoint to start from.
    resume : bool
        Continue from ``output_dir/last.pt`` when it exists.
    patience : int
        Stop after this many epochs without a better validation macro AUC (default 3).
    seed : int
        Seed for data order, augmentation and initialisation (default 0).
    max_train_per_class, max_val_per_class : int or None
        Subsample the splits (stratified, seeded) to fit a CPU budget.
    max_steps_per_epoch : int or None
        Cap the optimiser steps per epoch (smoke tests).
    num_workers : int
        DataLoader workers (default 0: images are cached in memory).
    device : str or None
        ``"cuda"``, ``"cpu"``; None picks CUDA when available.
    progress : bool
        Show progress bars.
    recipe : str
        ``"v1"`` or ``"transfer"`` (see :data:`RECIPES`).
    exclude_sources : tuple of str
        Manifest sources left out of training and validation (leave-source-out runs).
    cache_dir : pathlib.Path or None
        Where prepared images are cached between runs (uint8; never commit it).
    threads : int or None
        Torch intra-op threads (None: torch's default).
    without : tuple of str
        Ingredients of the ``transfer`` recipe switched off for an ablation (see
        :data:`TRANSFER_INGREDIENTS`; default none).
    """

    backbone: str
    data_dir: Path
    output_dir: Path
    epochs: int = 10
    batch_size: int = 32
    lr: float = 5e-4
    weight_decay: float = 1e-4
    label_smoothing: float = 0.05
    image_size: int | None = None
    imagenet: bool = True
    init_checkpoint: Path | None = None
    resume: bool = False
    patience: int = 3
    seed: int = 0
    max_train_per_class: int | None = None
    max_val_per_class: int | None = None
    max_steps_per_epoch: int | None = None
    num_workers: int = 0
    device: str | None = None
    progress: bool = True
    recipe: str = "v1"
    exclude_sources: tuple[str, ...] = ()
    cache_dir: Path | None = None
    threads: int | None = None
    without: tuple[str, ...] = ()


@dataclass(frozen=True)
class TrainResult:
    """What a finished run produced."""

    output_dir: Path
    best_epoch: int
    best_val_auc: float
    epochs_run: int
    stopped_early: bool
    wall_seconds: float


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _dist_info() -> tuple[int, int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    return world, rank, local


def _json_default(value: object) -> object:
    if isinstance(value, Path):
        return str(value)
    raise TypeError(type(value))


@torch.no_grad()
def predict_loader(
    model: nn.Module,
    loader: DataLoader,
    device: torch.device,
    progress: bool = False,
    desc: str = "validating",
    logits: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Softmax probabilities (or raw logits) and targets of every item of ``loader``."""
    model.eval()
    probs, targets = [], []
    for x, y in tqdm(loader, desc=desc, disable=not progress, leave=False, unit="batch"):
        out = model(x.to(device, non_blocking=True)).float()
        probs.append((out if logits else torch.softmax(out, dim=1)).cpu().numpy())
        targets.append(np.asarray(y))
    return np.concatenate(probs), np.concatenate(targets)


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def fit_temperature(logits: np.ndarray, targets: np.ndarray) -> float:
    """Softmax temperature minimising the negative log-likelihood of ``targets``.

    Parameters
    ----------
    logits : numpy.ndarray
        ``(N, C)`` raw network outputs (val split).
    targets : numpy.ndarray
        ``(N,)`` class indices.

    Returns
    -------
    float
        The best temperature on a grid from 0.5 to 5 (step 0.01).
    """
    grid = np.arange(0.5, 5.0001, 0.01)
    idx = np.arange(len(targets))
    nll = [-np.log(_softmax(logits / t)[idx, targets] + 1e-12).mean() for t in grid]
    return float(round(grid[int(np.argmin(nll))], 2))


def _manifest_version(data_dir: Path) -> int:
    import re

    readme = Path(data_dir) / "README.md"
    if readme.is_file():
        m = re.search(r"\*\*Version (\d+)\*\*", readme.read_text(errors="replace"))
        if m:
            return int(m.group(1))
    return 1


def train(cfg: TrainConfig) -> TrainResult:
    """Train ``cfg.backbone`` and export the best epoch.

    Parameters
    ----------
    cfg : TrainConfig

    Returns
    -------
    TrainResult

    Raises
    ------
    DataError
        When the manifest or an image is unusable.
    BundleError
        Unknown backbone or unreadable ``init_checkpoint``.
    """
    start = time.time()
    world, rank, local_rank = _dist_info()
    distributed = world > 1
    use_cuda = (cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")) == "cuda"
    if distributed and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    device = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    is_main = rank == 0
    _seed_everything(cfg.seed)

    spec = get_spec(cfg.backbone)
    size = cfg.image_size or spec.input_size
    out = Path(cfg.output_dir)
    if is_main:
        out.mkdir(parents=True, exist_ok=True)

    parts = recipe_parts(cfg.recipe, cfg.without, cfg.label_smoothing)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    excluded = set(cfg.exclude_sources)

    def rows_of(split: str, cap: int | None):
        rows = [r for r in read_manifest(cfg.data_dir, split) if r.source not in excluded]
        return subsample(rows, cap, cfg.seed)

    train_rows = rows_of("train", cfg.max_train_per_class)
    val_rows = rows_of("val", cfg.max_val_per_class)
    show = cfg.progress and is_main
    aug_gen = torch.Generator().manual_seed(cfg.seed + rank)
    augment = (
        SourceScrambleAugment(generator=aug_gen)
        if parts.scramble
        else ChestAugment(generator=aug_gen)
    )
    prep_spec = parts.preprocessing
    prep = Preprocessing(size, prep_spec)

    def prepare(pixels):
        return prep(pixels)[0]

    data_kw = {
        "progress": show,
        "prepare": prepare,
        "cache_dir": cfg.cache_dir,
        "cache_key": spec_key(prep_spec),
    }
    train_ds = CachedImageDataset(train_rows, size, spec.mean, spec.std, augment, **data_kw)
    val_ds = CachedImageDataset(val_rows, size, spec.mean, spec.std, None, **data_kw)

    # Preparing the images consumes the global random generators or not depending on the cache
    # (the lung U-Net is built, with random initial weights, only when an image is missing from
    # it), so re-seed them here: the network's initial weights, the sample order and everything
    # after depend on cfg.seed alone, whatever the state of cfg.cache_dir.
    _seed_everything(cfg.seed)
    model = build_model(
        cfg.backbone,
        len(LABELS),
        imagenet=cfg.imagenet and spec.imagenet_init is not None,
        init_checkpoint=cfg.init_checkpoint,
    ).to(device)
    # channels_last speeds up convolutions on both oneDNN (CPU, ~1.7x here) and cuDNN.
    model = model.to(memory_format=torch.channels_last)
    net = (
        nn.parallel.DistributedDataParallel(model, device_ids=[local_rank] if use_cuda else None)
        if distributed
        else model
    )

    counts = train_ds.class_counts().astype(np.float64)
    class_weight = torch.tensor(
        counts.sum() / (len(LABELS) * np.maximum(counts, 1)), dtype=torch.float32, device=device
    )
    if distributed:
        sampler = DistributedSampler(
            train_ds, num_replicas=world, rank=rank, shuffle=True, seed=cfg.seed, drop_last=True
        )
    elif parts.balanced:
        # Classes balanced by sampling (so no loss weights), sources within a class partly.
        class_weight = None
        sampler = torch.utils.data.WeightedRandomSampler(
            torch.as_tensor(balanced_weights(train_rows)),
            num_samples=len(train_ds),
            replacement=True,
            generator=torch.Generator().manual_seed(cfg.seed + 7),
        )
    else:
        sampler = None
    gen = torch.Generator().manual_seed(cfg.seed)
    train_loader = DataLoader(
        train_ds,
        batch_size=cfg.batch_size,
        shuffle=sampler is None,
        sampler=sampler,
        drop_last=True,
        num_workers=cfg.num_workers,
        generator=gen,
        pin_memory=use_cuda,
    )
    val_loader = DataLoader(
        val_ds, batch_size=max(cfg.batch_size, 32), shuffle=False, num_workers=cfg.num_workers
    )

    steps_per_epoch = len(train_loader)
    if cfg.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, cfg.max_steps_per_epoch)
    total_steps = max(1, steps_per_epoch * cfg.epochs)
    warmup = min(steps_per_epoch, total_steps // 2) or 1
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)

    def lr_lambda(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)
    scaler = torch.amp.GradScaler("cuda", enabled=use_cuda)
    criterion = nn.CrossEntropyLoss(weight=class_weight, label_smoothing=parts.label_smoothing)

    engine = Engine(
        out,
        model,
        optimizer,
        scheduler,
        score_name="val_macro_auc",
        min_delta=1e-5,
        patience=cfg.patience,
        generators={
            "data_order": gen,
            "augment": augment.generator,
            **({"sampler": sampler.generator} if parts.balanced and not distributed else {}),
        },
        config=json.loads(json.dumps(asdict(cfg), default=_json_default)),
        is_main=is_main,
        progress=show,
        name=cfg.backbone,
    )
    if cfg.resume and engine.resume() and distributed:
        # Rank 0's augmentation state is in the checkpoint; the other ranks draw their own.
        augment.generator.manual_seed(cfg.seed + rank + 1000 * engine.start_epoch)

    def train_epoch(epoch: int, bar: tqdm) -> dict:
        if distributed:
            sampler.set_epoch(epoch)
        net.train()
        t0, running, seen = time.time(), 0.0, 0
        for step, (x, y) in enumerate(train_loader):
            if step >= steps_per_epoch:
                break
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            x = x.to(memory_format=torch.channels_last)
            with torch.autocast(device_type="cuda", dtype=torch.float16, enabled=use_cuda):
                loss = criterion(net(x), y)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            running += loss.item() * len(y)
            seen += len(y)
            bar.set_postfix(loss=f"{running / seen:.4f}")
            bar.update()
        return {"train_loss": running / max(seen, 1), "train_seconds": time.time() - t0}

    def validate(epoch: int, stats: dict) -> dict:
        probs, targets = predict_loader(model, val_loader, device, show)
        return {
            "epoch": epoch,
            "train_loss": stats["train_loss"],
            "val_macro_auc": macro_auc(targets, probs),
            "val_accuracy": float((probs.argmax(1) == targets).mean()),
            "train_seconds": round(stats["train_seconds"], 1),
            "lr": scheduler.get_last_lr()[0],
        }

    run = engine.run(cfg.epochs, steps_per_epoch, train_epoch, validate)
    history = run.history

    if is_main:
        export_run(cfg, out, size, val_loader, device, history, train_rows, prep_spec)
    if distributed:
        dist.barrier()
        dist.destroy_process_group()
    return TrainResult(
        out,
        run.best_epoch + 1,
        run.best_score,
        run.epochs_run,
        run.stopped_early,
        time.time() - start,
    )


def export_run(
    cfg: TrainConfig,
    out: Path,
    size: int,
    val_loader: DataLoader,
    device: torch.device,
    history: list[dict],
    train_rows: list | None = None,
    preprocessing: dict | None = None,
) -> None:
    """Write ``model.safetensors`` (fp16, best epoch) and ``model.json`` for a run.

    A ``transfer`` run (unless its ``temperature`` ingredient is switched off) also fits a
    softmax temperature on the val split (minimum negative log-likelihood over a grid) and chooses
    its threshold on the calibrated probabilities.
    """
    from ..bundle_writer import fp16_state_dict, save_weights

    spec = get_spec(cfg.backbone)
    best = torch.load(out / "best.pt", map_location="cpu", weights_only=False)
    model = build_model(cfg.backbone, len(LABELS))
    model.load_state_dict(best["model"])
    model.to(device)
    # Threshold and metrics with the fp16-rounded weights that ship.
    half = fp16_state_dict(model.state_dict())
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in half.items()})
    logits, targets = predict_loader(model, val_loader, device, logits=True)
    parts = recipe_parts(cfg.recipe, cfg.without, cfg.label_smoothing)
    temperature = fit_temperature(logits, targets) if parts.temperature else 1.0
    probs = _softmax(logits / temperature)
    threshold = choose_threshold(
        (targets == LABELS.index("covid")).astype(int), probs[:, LABELS.index("covid")]
    )
    save_weights(half, out / "model.safetensors")
    facts = {
        "backbone": cfg.backbone,
        "title": spec.title,
        "labels": list(LABELS),
        "input_size": size,
        "mean": list(spec.mean),
        "std": list(spec.std),
        "gradcam_layer": spec.gradcam_layer,
        "preprocessing": preprocessing or {"pipeline": "resize"},
        "temperature": temperature,
        "recipe": cfg.recipe,
        **(
            {"recipe_without": list(cfg.without), "recipe_variant": parts.variant}
            if cfg.without
            else {}
        ),
        "covid_threshold": threshold,
        "threshold_rule": "maximum Youden J of COVID-vs-rest on the val split",
        "best_epoch": int(best["epoch"]) + 1,
        "val_macro_auc": float(macro_auc(targets, probs)),
        "val_accuracy": float((probs.argmax(1) == targets).mean()),
        "history": history,
        "train_config": json.loads(json.dumps(asdict(cfg), default=_json_default)),
        "parameters": int(sum(p.numel() for p in model.parameters())),
        "training_data": {
            "dataset": Path(cfg.data_dir).name,
            "manifest_version": _manifest_version(cfg.data_dir),
            "sources": sorted({r.source for r in train_rows or []}),
            "excluded_sources": sorted(cfg.exclude_sources),
            "images": len(train_rows or []),
        },
    }
    (out / "model.json").write_text(json.dumps(facts, indent=2))
    logger.info(
        "exported %s (val macro AUC %.4f, COVID threshold %.3f)",
        out / "model.safetensors",
        facts["val_macro_auc"],
        threshold,
    )
