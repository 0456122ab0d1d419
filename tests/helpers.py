"""Test helpers shared by several test modules (not fixtures: plain functions)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def make_throwaway_bundle(
    root: Path,
    backbone: str = "efficientnet_lite0",
    covid_threshold: float = 0.5,
    seed: int = 0,
    input_size: int | None = None,
) -> Path:
    """Write a bundle with one randomly initialised model into ``root``.

    The project's ``configs/metadata.json`` is copied and the model registered in it, so the
    bundle looks like the real one (labels, version) but needs no trained weights.

    Parameters
    ----------
    root : pathlib.Path
        Folder to create the bundle in (e.g. ``tmp_path / "bundle"``).
    backbone : str
        Registry key of the backbone.
    covid_threshold : float
        Operating threshold written into the model facts.
    seed : int
        Torch seed for the random weights.
    input_size : int, optional
        Input side written into the facts (default: the registry's); small sizes keep tests fast.

    Returns
    -------
    pathlib.Path
        ``root``.
    """
    (root / "configs").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(
        ROOT / "monai_bundle" / "configs" / "metadata.json", root / "configs" / "metadata.json"
    )
    add_throwaway_model(root, backbone, covid_threshold, seed, input_size)
    meta_path = root / "configs" / "metadata.json"
    meta = json.loads(meta_path.read_text())
    meta["dicom_covid"]["default_model"] = backbone
    meta_path.write_text(json.dumps(meta, indent=2))
    return root


def add_throwaway_model(
    root: Path,
    backbone: str,
    covid_threshold: float = 0.5,
    seed: int = 0,
    input_size: int | None = None,
) -> Path:
    """Add (or replace) one randomly initialised model in an existing throw-away bundle.

    The default model is left as it is. Parameters as in :func:`make_throwaway_bundle`.

    Returns
    -------
    pathlib.Path
        The weights file written.
    """
    import torch
    from safetensors.torch import save_file

    from dicom_covid.models import BACKBONES, build_model

    spec = BACKBONES[backbone]
    (root / "models").mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = build_model(backbone, 3)
    state = {
        k: (v.half() if v.is_floating_point() else v).contiguous()
        for k, v in model.state_dict().items()
    }
    weights = root / "models" / f"{backbone}.safetensors"
    save_file(state, str(weights))
    facts = {
        "backbone": backbone,
        "title": spec.title,
        "labels": ["covid", "normal", "pneumonia"],
        "input_size": input_size or spec.input_size,
        "mean": list(spec.mean),
        "std": list(spec.std),
        "gradcam_layer": spec.gradcam_layer,
        "covid_threshold": covid_threshold,
    }
    (root / "models" / f"{backbone}.json").write_text(json.dumps(facts, indent=2))
    meta_path = root / "configs" / "metadata.json"
    meta = json.loads(meta_path.read_text())
    meta["dicom_covid"]["models"][backbone] = {
        "weights": f"models/{backbone}.safetensors",
        "facts": f"models/{backbone}.json",
    }
    meta_path.write_text(json.dumps(meta, indent=2))
    return weights
