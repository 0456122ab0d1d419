"""Access to the model bundle (``monai_bundle/``): which models exist, their facts and weights.

Layout::

    monai_bundle/
      configs/metadata.json      MONAI bundle metadata; ``version``, ``channel_def`` (labels),
                                 ``dicom_covid.default_model`` and ``dicom_covid.models``
      models/<name>.safetensors  fp16 weights, one file per backbone
      models/<name>.json         facts of that trained model: preprocessing, threshold, metrics

Everything inference needs to know about a model comes from here, not from code.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

from .config import DEFAULT_BUNDLE_DIR
from .errors import BundleError

__all__ = ["Bundle", "ModelFacts", "install_model"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelFacts:
    """Facts of one trained model, read from ``models/<name>.json``.

    Attributes
    ----------
    name : str
        Backbone registry key.
    title : str
        Display name.
    labels : tuple of str
        Output order.
    input_size : int
    mean, std : tuple of float
    gradcam_layer : str
    covid_threshold : float
        Operating point on P(covid) chosen on the validation split.
    weights : pathlib.Path
    raw : dict
        The whole JSON (metrics, training settings).
    """

    name: str
    title: str
    labels: tuple[str, ...]
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    gradcam_layer: str
    covid_threshold: float
    weights: Path
    raw: dict


class Bundle:
    """A MONAI bundle folder holding dicom-covid models.

    Parameters
    ----------
    root : path, optional
        Bundle folder; defaults to the ``monai_bundle/`` shipped with the project.

    Raises
    ------
    BundleError
        When ``configs/metadata.json`` is missing or malformed.
    """

    def __init__(self, root: str | Path | None = None) -> None:
        self.root = Path(root) if root is not None else DEFAULT_BUNDLE_DIR
        meta_path = self.root / "configs" / "metadata.json"
        if not meta_path.is_file():
            raise BundleError(
                f"{meta_path}: bundle metadata not found. Pass --bundle pointing at a "
                "dicom-covid MONAI bundle folder (it holds configs/metadata.json)."
            )
        try:
            self.metadata = json.loads(meta_path.read_text())
        except json.JSONDecodeError as exc:
            raise BundleError(f"{meta_path}: not valid JSON ({exc}).") from exc
        own = self.metadata.get("dicom_covid")
        if not isinstance(own, dict) or "models" not in own:
            raise BundleError(f"{meta_path}: no 'dicom_covid.models' section.")
        self._own = own

    @property
    def version(self) -> str:
        """Bundle version (``metadata.json`` ``version``)."""
        return str(self.metadata.get("version", "0.0.0"))

    @property
    def labels(self) -> tuple[str, ...]:
        """Class labels in output order, from ``network_data_format`` ``channel_def``."""
        try:
            chans = self.metadata["network_data_format"]["outputs"]["pred"]["channel_def"]
        except KeyError as exc:
            raise BundleError(
                "metadata.json lacks network_data_format.outputs.pred.channel_def"
            ) from exc
        return tuple(chans[str(i)] for i in range(len(chans)))

    @property
    def default_model(self) -> str:
        """Name of the model used when none is chosen."""
        return str(self._own.get("default_model", ""))

    def available(self) -> list[str]:
        """Names of the models whose weights are present."""
        return [
            n
            for n in self._own["models"]
            if (self.root / self._own["models"][n]["weights"]).is_file()
        ]

    def facts(self, name: str | None = None) -> ModelFacts:
        """Facts of model ``name`` (default model when None).

        Raises
        ------
        BundleError
            Unknown model, or its files are missing.
        """
        name = name or self.default_model
        entry = self._own["models"].get(name)
        if entry is None:
            raise BundleError(
                f"model {name!r} is not in the bundle {self.root}; available: "
                f"{', '.join(self.available()) or 'none'}."
            )
        weights = self.root / entry["weights"]
        facts_path = self.root / entry["facts"]
        if not weights.is_file() or not facts_path.is_file():
            raise BundleError(
                f"model {name!r}: {weights.name} or {facts_path.name} is missing from "
                f"{self.root / 'models'}; train it (dicom-covid train --backbone {name} "
                "--install) or choose another model."
            )
        raw = json.loads(facts_path.read_text())
        labels = tuple(raw["labels"])
        if labels != self.labels:
            raise BundleError(
                f"model {name!r} was trained with labels {labels}, the bundle declares "
                f"{self.labels}."
            )
        return ModelFacts(
            name=name,
            title=raw.get("title", name),
            labels=labels,
            input_size=int(raw["input_size"]),
            mean=tuple(raw["mean"]),
            std=tuple(raw["std"]),
            gradcam_layer=raw["gradcam_layer"],
            covid_threshold=float(raw["covid_threshold"]),
            weights=weights,
            raw=raw,
        )


def install_model(
    run_dir: str | Path, bundle_root: str | Path | None = None, make_default: bool = False
) -> Path:
    """Copy a finished training run (``model.safetensors`` + ``model.json``) into a bundle.

    Parameters
    ----------
    run_dir : path
        Output folder of :func:`dicom_covid.training.train.train`.
    bundle_root : path, optional
        Bundle folder (default: the project's).
    make_default : bool
        Also make it the bundle's default model.

    Returns
    -------
    pathlib.Path
        The installed weights file.
    """
    run_dir = Path(run_dir)
    bundle = Bundle(bundle_root)
    facts = json.loads((run_dir / "model.json").read_text())
    name = facts["backbone"]
    models = bundle.root / "models"
    models.mkdir(exist_ok=True)
    target = models / f"{name}.safetensors"
    shutil.copyfile(run_dir / "model.safetensors", target)
    (models / f"{name}.json").write_text(json.dumps(facts, indent=2) + "\n")
    meta_path = bundle.root / "configs" / "metadata.json"
    meta = json.loads(meta_path.read_text())
    meta["dicom_covid"]["models"][name] = {
        "weights": f"models/{name}.safetensors",
        "facts": f"models/{name}.json",
    }
    if make_default:
        meta["dicom_covid"]["default_model"] = name
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")
    logger.info("installed %s into %s", name, bundle.root)
    return target
