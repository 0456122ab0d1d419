"""Training the lung-field U-Net on the reference masks (``dicom-covid lungs train``)."""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..prediction import DISCLAIMER
from ..training.engine import Engine
from ..transforms import ResizeSquare
from .metrics import _summary
from .reference import LungCase, ReferenceMasks, _dice_of, reference_cases
from .segmenter import DEFAULT_ARCHITECTURE, _predict_masks_fn, _zscore, build_unet

__all__ = ["train_segmenter"]

logger = logging.getLogger(__name__)


def _stack(cases: Sequence[LungCase], size: int) -> tuple[torch.Tensor, torch.Tensor]:
    resize = ResizeSquare(size)
    images = torch.stack([resize(c.pixels) for c in cases])
    masks = torch.stack(
        [
            (
                F.interpolate(
                    torch.from_numpy(c.mask.astype(np.float32))[None, None],
                    (size, size),
                    mode="area",
                )[0]
                >= 0.5
            ).float()
            for c in cases
        ]
    )
    return images, masks


def _augmenter(size: int, seed: int) -> Callable[[dict], dict]:
    from monai.transforms import (
        Compose,
        RandAdjustContrastd,
        RandAffined,
        RandGaussianNoised,
        RandGaussianSmoothd,
        RandScaleIntensityd,
        RandShiftIntensityd,
    )

    aug = Compose(
        [
            RandAffined(
                keys=("image", "mask"),
                prob=0.9,
                rotate_range=math.radians(12),
                scale_range=(0.15, 0.15),
                translate_range=(0.08 * size, 0.08 * size),
                shear_range=(0.05, 0.05),
                mode=("bilinear", "nearest"),
                padding_mode="zeros",
            ),
            RandAdjustContrastd(keys="image", prob=0.5, gamma=(0.6, 1.6)),
            RandScaleIntensityd(keys="image", prob=0.5, factors=0.2),
            RandShiftIntensityd(keys="image", prob=0.5, offsets=0.1),
            RandGaussianSmoothd(keys="image", prob=0.2, sigma_x=(0.3, 1.0), sigma_y=(0.3, 1.0)),
            RandGaussianNoised(keys="image", prob=0.3, std=0.03),
        ]
    )
    aug.set_random_state(seed=seed)
    return aug


#: Augmentation written into the facts JSON (kept in step with :func:`_augmenter`).
_AUGMENTATION_TEXT = (
    "MONAI RandAffined p=0.9 (rotation +-12 deg, scale +-15 %, shift +-8 %, shear 0.05; mask "
    "nearest), RandAdjustContrastd p=0.5 gamma 0.6-1.6, RandScaleIntensityd p=0.5 +-20 %, "
    "RandShiftIntensityd p=0.5 +-0.1, RandGaussianSmoothd p=0.2 sigma 0.3-1, "
    "RandGaussianNoised p=0.3 std 0.03; no flips (the heart side is kept)"
)


def train_segmenter(
    data_dir: str | Path,
    output_dir: str | Path,
    masks: ReferenceMasks | str | Path | None = None,
    epochs: int = 30,
    input_size: int = 128,
    batch_size: int = 4,
    lr: float = 3e-3,
    seed: int = 0,
    architecture: dict[str, Any] | None = None,
    resume: bool = False,
    progress: bool = True,
    limit: int | None = None,
) -> Path:
    """Train the lung-field U-Net on the train masks, select on val, measure Dice on test.

    The epoch loop is :class:`dicom_covid.training.engine.Engine`. Writes into ``output_dir``:
    ``checkpoint.pt`` (after every epoch, for ``resume``), ``best.pt`` and ``history.json``,
    ``lung_unet.safetensors`` (fp16, best validation epoch) and ``lung_unet.json`` (facts:
    architecture, input size, post-processing, training data, Dice on val and test, date).

    Parameters
    ----------
    data_dir : path
        Development set folder (manifest with ``original_file``, ``width``, ``height``).
    output_dir : path
        Run folder.
    masks : ReferenceMasks or path, optional
        Mask source (see :func:`find_mask_archive`).
    epochs, input_size, batch_size, lr, seed
        Training settings (AdamW, cosine learning-rate decay, Dice + BCE loss).
    architecture : dict, optional
        ``{"class": "monai.networks.nets.UNet", "args": {...}}``; default
        :data:`DEFAULT_ARCHITECTURE`.
    resume : bool
        Continue from ``output_dir/checkpoint.pt`` when present.
    progress : bool
        Show tqdm progress bars.
    limit : int, optional
        Use at most this many cases per split (smoke tests).

    Returns
    -------
    pathlib.Path
        The facts JSON.
    """
    from monai.losses import DiceCELoss

    from ..bundle_writer import fp16_state_dict, save_weights

    started = time.time()
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    ref = masks if isinstance(masks, ReferenceMasks) else ReferenceMasks(masks)
    arch = json.loads(json.dumps(architecture or DEFAULT_ARCHITECTURE))
    post = {
        "threshold": 0.5,
        "keep_components": 2,
        "min_component_fraction": 0.05,
        "fill_holes": True,
    }
    logger.info("reading reference cases from %s", data_dir)
    train_cases = reference_cases(data_dir, "train", ref, limit)
    val_cases = reference_cases(data_dir, "val", ref, limit)
    test_cases = reference_cases(data_dir, "test", ref, limit)
    x_train, y_train = _stack(train_cases, input_size)
    x_val, y_val = _stack(val_cases, input_size)

    torch.manual_seed(seed)
    net = build_unet(arch)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, epochs))
    loss_fn = DiceCELoss(sigmoid=True)
    aug = _augmenter(input_size, seed)
    gen = torch.Generator().manual_seed(seed)
    engine = Engine(
        out,
        net,
        opt,
        sched,
        score_name="val_dice_net_res",
        checkpoint_name="checkpoint.pt",
        generators={"data_order": gen, "augment": aug},
        config={"epochs": epochs, "input_size": input_size, "batch_size": batch_size, "lr": lr},
        progress=progress,
        name="lungs",
    )
    if resume:
        engine.resume()
    n = len(train_cases)

    def train_epoch(epoch: int, bar: Any) -> dict:
        net.train()
        order = torch.randperm(n, generator=gen)
        total, t0 = 0.0, time.time()
        for i in range(0, n, batch_size):
            idx = order[i : i + batch_size]
            items = [aug({"image": x_train[j], "mask": y_train[j]}) for j in idx.tolist()]
            xb = torch.stack(
                [torch.as_tensor(it["image"]).as_subclass(torch.Tensor) for it in items]
            )
            yb = torch.stack(
                [torch.as_tensor(it["mask"]).as_subclass(torch.Tensor) for it in items]
            )
            loss = loss_fn(net(_zscore(xb.float().clamp(0, 1))), (yb > 0.5).float())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            value = float(loss.detach())
            total += value * len(idx)
            bar.set_postfix(loss=f"{value:.3f}")
            bar.update()
        sched.step()
        return {"loss": total / n, "t0": t0}

    def validate(epoch: int, stats: dict) -> dict:
        net.eval()
        with torch.no_grad():
            pv = torch.sigmoid(net(_zscore(x_val))) >= 0.5
        inter = (pv & (y_val > 0.5)).sum(dim=(1, 2, 3)).float()
        denom = (pv.sum(dim=(1, 2, 3)) + (y_val > 0.5).sum(dim=(1, 2, 3))).float()
        return {
            "epoch": epoch + 1,
            "loss": stats["loss"],
            "val_dice_net_res": float((2 * inter / denom.clamp_min(1)).mean()),
            "seconds": time.time() - stats["t0"],
        }

    run = engine.run(epochs, math.ceil(n / batch_size), train_epoch, validate)
    history = run.history
    best_state = engine.best_state()
    if best_state is not None:
        net.load_state_dict(best_state)
    net.eval()
    # fp16 weights, as shipped; measure what is shipped.
    state16 = fp16_state_dict(net.state_dict())
    weights = out / "lung_unet.safetensors"
    save_weights(state16, weights)
    net.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state16.items()})
    net.eval()

    # Threshold chosen on val (post-processed masks at the stored size).
    thresholds = [0.3, 0.4, 0.5, 0.6, 0.7]
    val_by_threshold = {}
    for t in thresholds:
        fn = _predict_masks_fn(net, input_size, {**post, "threshold": t})
        val_by_threshold[t] = float(np.mean([d["dice"] for d in _dice_of(fn, val_cases)]))
    post["threshold"] = max(thresholds, key=lambda t: (val_by_threshold[t], -abs(t - 0.5)))
    fn = _predict_masks_fn(net, input_size, post)
    val_dice = _dice_of(fn, val_cases)
    test_dice = _dice_of(fn, test_cases)
    facts = {
        "name": "lung_unet",
        "title": "Lung-field U-Net (MONAI UNet, 2-D)",
        "task": "Binary segmentation of both lung fields on frontal chest radiographs "
        "(used to measure where Grad-CAM heat falls). RESEARCH USE ONLY.",
        "architecture": arch,
        "input_size": input_size,
        "normalisation": "per_image_zscore",
        "resize": "antialiased bilinear to input_size x input_size, aspect ratio not kept "
        "(dicom_covid.transforms.ResizeSquare)",
        "postprocessing": post,
        "training": {
            "data": (
                "Development set (shared/data/cxr) ieee8023 images with a V7 Labs lung mask from "
                "the torchxrayvision 1.5.7 wheel (semantic_masks_v7labs_lungs.zip), matched on "
                "the file stem of original_file; masks resized to the stored image size "
                "(area averaging, >= 0.5). All are adult COVID-19 images."
            ),
            "masks_archive": ref.path.name,
            "n_train": len(train_cases),
            "n_val": len(val_cases),
            "n_test": len(test_cases),
            "epochs": epochs,
            "best_epoch": run.best_epoch + 1,
            "batch_size": batch_size,
            "optimizer": f"AdamW lr {lr} weight decay 1e-4, cosine decay to 0",
            "loss": "MONAI DiceCELoss(sigmoid=True)",
            "augmentation": _AUGMENTATION_TEXT,
            "model_selection": "epoch with the best mean val Dice at the network resolution; "
            "threshold then chosen on val (post-processed masks at the stored size) from "
            f"{thresholds}",
            "val_dice_by_threshold": {str(k): v for k, v in val_by_threshold.items()},
            "seed": seed,
            "history": history,
            "wall_seconds": round(time.time() - started, 1),
            "torch_threads": torch.get_num_threads(),
        },
        "dice": {
            "note": "Dice of the post-processed mask against the reference mask, both at the "
            "stored image size (long side <= 512 px).",
            "val": {"summary": _summary([d["dice"] for d in val_dice]), "per_image": val_dice},
            "test": {"summary": _summary([d["dice"] for d in test_dice]), "per_image": test_dice},
        },
        "parameters": int(sum(p.numel() for p in net.parameters())),
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
        "disclaimer": DISCLAIMER,
    }
    facts_path = out / "lung_unet.json"
    facts_path.write_text(json.dumps(facts, indent=2) + "\n")
    logger.info(
        "lung segmenter: test Dice mean %.4f median %.4f min %.4f (n=%d)",
        facts["dice"]["test"]["summary"]["mean"],
        facts["dice"]["test"]["summary"]["median"],
        facts["dice"]["test"]["summary"]["min"],
        len(test_cases),
    )
    return facts_path
