"""``dicom-covid train``: train any backbone on a labelled manifest."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Annotated

import typer

from ._app import app
from .common import DataOption, fail_on_error, setup_logging

logger = logging.getLogger(__name__)


@app.command()
def train(
    backbone: Annotated[
        str,
        typer.Option(
            help="Backbone: resnet50, vgg16, alexnet, inception_v3, inception_resnet_v2, "
            "efficientnet_lite0."
        ),
    ] = "efficientnet_lite0",
    data: DataOption = None,
    output_dir: Annotated[
        Path | None,
        typer.Option(
            help="Run folder for checkpoints and the exported model (default runs/<backbone>)."
        ),
    ] = None,
    epochs: Annotated[int, typer.Option(min=1, help="Maximum epochs.")] = 10,
    batch_size: Annotated[int, typer.Option(min=1, help="Batch size per process.")] = 32,
    lr: Annotated[float, typer.Option(help="Peak AdamW learning rate.")] = 5e-4,
    weight_decay: Annotated[float, typer.Option(help="AdamW weight decay.")] = 1e-4,
    image_size: Annotated[
        int | None,
        typer.Option(help="Input side in pixels (default: the backbone's registry size)."),
    ] = None,
    imagenet: Annotated[
        bool,
        typer.Option(
            help="Start from packaged ImageNet weights where they exist (EfficientNet-Lite0)."
        ),
    ] = True,
    init_checkpoint: Annotated[
        Path | None,
        typer.Option(
            exists=True,
            dir_okay=False,
            help="Start from your own checkpoint (.pt/.safetensors; mismatching tensors skipped).",
        ),
    ] = None,
    resume: Annotated[bool, typer.Option(help="Continue from <output-dir>/last.pt.")] = False,
    patience: Annotated[
        int,
        typer.Option(
            min=1, help="Early stop after this many epochs without a better val macro AUC."
        ),
    ] = 3,
    seed: Annotated[int, typer.Option(help="Seed for repeatable runs.")] = 0,
    max_train_per_class: Annotated[
        int | None,
        typer.Option(help="Subsample the train split to this many images per class (CPU budgets)."),
    ] = None,
    max_val_per_class: Annotated[
        int | None, typer.Option(help="Subsample the val split to this many images per class.")
    ] = None,
    max_steps_per_epoch: Annotated[
        int | None, typer.Option(help="Cap optimiser steps per epoch (smoke tests).")
    ] = None,
    device: Annotated[
        str | None, typer.Option(help="cuda or cpu (default: cuda if available).")
    ] = None,
    install: Annotated[
        bool, typer.Option(help="Copy the finished model into the bundle (monai_bundle/models/).")
    ] = False,
    make_default: Annotated[
        bool, typer.Option(help="With --install: make it the bundle's default model.")
    ] = False,
    bundle: Annotated[
        Path | None,
        typer.Option(file_okay=False, help="Bundle folder for --install (default: the project's)."),
    ] = None,
    recipe: Annotated[
        str,
        typer.Option(
            help="v1 (resize, class-weighted loss) or transfer (lung crop, CLAHE, source-"
            "scrambling augmentation, source- and class-balanced sampling, temperature scaling)."
        ),
    ] = "v1",
    exclude_source: Annotated[
        list[str] | None,
        typer.Option(help="Leave this manifest source out of train and val (repeatable)."),
    ] = None,
    label_smoothing: Annotated[float, typer.Option(min=0.0, max=0.5)] = 0.05,
    cache_dir: Annotated[
        Path | None,
        typer.Option(help="Cache prepared images here between runs (never commit it)."),
    ] = None,
    threads: Annotated[int | None, typer.Option(min=1, help="Torch CPU threads.")] = None,
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False,
) -> None:
    """Train a backbone on the labelled chest X-ray manifest.

    Checkpoints every epoch (last.pt, best.pt), early stopping on validation macro AUC, and an
    exported fp16 model (model.safetensors + model.json) at the end. Runs under
    ``torchrun --nproc_per_node N`` as DistributedDataParallel (gloo on CPU, nccl on GPU).
    """
    setup_logging(verbose)
    from ..bundle import install_model
    from ..config import default_data_dir
    from ..training.train import TrainConfig
    from ..training.train import train as run_training

    cfg = TrainConfig(
        backbone=backbone,
        data_dir=data or default_data_dir(),
        output_dir=output_dir or Path("runs") / backbone,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        weight_decay=weight_decay,
        image_size=image_size,
        imagenet=imagenet,
        init_checkpoint=init_checkpoint,
        resume=resume,
        patience=patience,
        seed=seed,
        max_train_per_class=max_train_per_class,
        max_val_per_class=max_val_per_class,
        max_steps_per_epoch=max_steps_per_epoch,
        device=device,
        progress=progress,
        recipe=recipe,
        exclude_sources=tuple(exclude_source or ()),
        label_smoothing=label_smoothing,
        cache_dir=cache_dir,
        threads=threads,
    )
    with fail_on_error():
        result = run_training(cfg)
        if int(os.environ.get("RANK", "0")) != 0:
            return
        typer.echo(
            f"{backbone}: best val macro AUC {result.best_val_auc:.4f} at epoch "
            f"{result.best_epoch} ({result.epochs_run} epochs, {result.wall_seconds:.0f} s"
            f"{', stopped early' if result.stopped_early else ''}); model in {result.output_dir}"
        )
        if install:
            target = install_model(result.output_dir, bundle, make_default=make_default)
            typer.echo(f"installed into {target}")
