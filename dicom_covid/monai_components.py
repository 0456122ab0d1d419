"""Components that the MONAI bundle configs (``monai_bundle/configs/*.json``) instantiate.

The configs are read by :class:`monai.bundle.ConfigParser` (``python -m monai.bundle run ...``);
everything they build comes from this module or from the rest of the package, so the bundle runs
the same reader, preprocessing and weights as :class:`~dicom_covid.inference.Predictor`:

* :func:`list_images` - the data list (``[{"image": path}, ...]``) of a folder;
* :class:`LoadXray` / :class:`LoadXrayd` - :func:`~dicom_covid.reader.read_image` as a transform;
* :class:`PreprocessXray` / :class:`PreprocessXrayd` - :func:`~dicom_covid.transforms.preprocess`;
* :func:`load_bundle_weights` - a trained model's weights from the bundle into a network;
* :class:`ClassificationRunner` - the inference loop that writes probabilities as CSV and JSON;
* :func:`export_state_dict` - a ``.pt`` state dict for ``monai.bundle ckpt_export``;
* :func:`write_evaluation` - the output step of ``configs/evaluate.json``.

RESEARCH USE ONLY: every file written here carries the disclaimer.
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from monai.transforms import MapTransform, Transform
from torch import nn
from tqdm.auto import tqdm

from .errors import DataError, InputRejected
from .reader import IMAGE_SUFFIXES, XrayImage, find_images, read_image
from .transforms import preprocess

if TYPE_CHECKING:
    from .bundle import Bundle, ModelFacts

__all__ = [
    "IMAGE_SUFFIXES",
    "REJECTED_KEY",
    "ClassificationRunner",
    "LoadXray",
    "LoadXrayd",
    "PreprocessXray",
    "PreprocessXrayd",
    "export_state_dict",
    "list_images",
    "load_bundle_weights",
    "write_evaluation",
]

logger = logging.getLogger(__name__)


#: Key :class:`LoadXrayd` sets to the rejection reason (``""`` when the image was read).
REJECTED_KEY = "rejected"


def list_images(
    dataset_dir: str | Path, key: str = "image", path_key: str = "path"
) -> list[dict[str, str]]:
    """Data list of a folder: every DICOM, PNG or JPEG file below it, sorted.

    Parameters
    ----------
    dataset_dir : path
        Folder to search recursively (hidden files are skipped), or a single file.
    key : str
        Key of the path that the loader replaces by the pixels.
    path_key : str
        Key of a copy of the path that stays (for the output).

    Returns
    -------
    list of dict
        ``[{key: path, path_key: path}, ...]``.

    Raises
    ------
    DataError
        When the folder does not exist or holds no candidate file.
    """
    root = Path(dataset_dir)
    if root.is_file():
        return [{key: str(root), path_key: str(root)}]
    if not root.is_dir():
        raise DataError(
            f"{root}: no such folder. Pass --dataset_dir pointing at a folder of DICOM files."
        )
    files = find_images([root])
    if not files:
        raise DataError(
            f"{root}: no DICOM, PNG or JPEG file found (suffixes .dcm, .dicom, .png, .jpg, "
            ".jpeg or none). Pass --dataset_dir pointing at a folder of images."
        )
    return [{key: str(f), path_key: str(f)} for f in files]


class LoadXray(Transform):
    """Read a chest radiograph with :func:`~dicom_covid.reader.read_image`.

    Returns the :class:`~dicom_covid.reader.XrayImage`; its ``pixels`` are ``float32 (H, W)`` in
    ``[0, 1]`` with 1 = bright (MONOCHROME1, BitsStored and VOI LUT handled by the reader).

    Raises
    ------
    InputRejected
        When the file cannot be classified (not DICOM, colour, lateral, ...).
    """

    def __call__(self, path: str | Path) -> XrayImage:
        return read_image(path)


class LoadXrayd(MapTransform):
    """Dictionary wrapper of :class:`LoadXray`: replaces each path by its pixels.

    Parameters
    ----------
    keys : hashable or sequence of hashables
        Keys holding file paths.
    on_reject : {"raise", "mark"}
        ``"raise"`` lets :class:`~dicom_covid.errors.InputRejected` propagate; ``"mark"`` puts a
        blank 64 x 64 image in its place and the reason code (e.g. ``"lateral_view"``) under
        :data:`REJECTED_KEY`, so that a batch keeps going and the writer can list the file as
        rejected (it gets no probabilities).
    allow_missing_keys : bool
        Skip keys that are absent.
    """

    def __init__(
        self,
        keys: Hashable | Sequence[Hashable],
        on_reject: str = "mark",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if on_reject not in ("raise", "mark"):
            raise ValueError(f"on_reject must be 'raise' or 'mark', got {on_reject!r}")
        self.on_reject = on_reject
        self.loader = LoadXray()

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        d.setdefault(REJECTED_KEY, "")
        for key in self.key_iterator(d):
            try:
                d[key] = self.loader(d[key]).pixels
            except InputRejected as exc:
                if self.on_reject == "raise":
                    raise
                logger.warning("%s rejected (%s): %s", d[key], exc.reason, exc.message)
                d[key] = np.zeros((64, 64), dtype=np.float32)
                d[REJECTED_KEY] = exc.reason
        return d


class PreprocessXray(Transform):
    """Network input ``(3, size, size)`` of reader pixels (:func:`.transforms.preprocess`).

    Parameters
    ----------
    size : int
        Network input side.
    mean, std : sequence of 3 floats
        Per-channel normalisation of the trained model.
    pipeline : mapping, optional
        The model facts' ``preprocessing`` entry (see :mod:`dicom_covid.preprocessing`);
        the plain resize when absent.
    """

    def __init__(
        self,
        size: int,
        mean: Sequence[float],
        std: Sequence[float],
        pipeline: Mapping[str, Any] | None = None,
    ) -> None:
        self.size = int(size)
        self.mean = tuple(float(v) for v in mean)
        self.std = tuple(float(v) for v in std)
        self.pipeline = dict(pipeline or {})
        self._prep = None
        if self.pipeline.get("pipeline", "resize") != "resize":
            from .preprocessing import Preprocessing
            from .transforms import RepeatNormalize

            self._prep = Preprocessing(self.size, self.pipeline)
            self._normalize = RepeatNormalize(self.mean, self.std)

    def __call__(self, pixels: np.ndarray | torch.Tensor) -> torch.Tensor:
        if self._prep is not None:
            return self._normalize(self._prep(pixels)[0])
        return preprocess(pixels, self.size, self.mean, self.std)


class PreprocessXrayd(MapTransform):
    """Dictionary wrapper of :class:`PreprocessXray`."""

    def __init__(
        self,
        keys: Hashable | Sequence[Hashable],
        size: int,
        mean: Sequence[float],
        std: Sequence[float],
        allow_missing_keys: bool = False,
        pipeline: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.op = PreprocessXray(size, mean, std, pipeline)

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.op(d[key])
        return d


def load_bundle_weights(network: nn.Module, facts: ModelFacts) -> nn.Module:
    """Load a trained model's weights (``facts.weights``, fp16 safetensors) into ``network``.

    Parameters
    ----------
    network : torch.nn.Module
        Built by :func:`~dicom_covid.models.build_model` for ``facts.name``.
    facts : ModelFacts
        From :meth:`~dicom_covid.bundle.Bundle.facts`.

    Returns
    -------
    torch.nn.Module
        ``network`` (in float32, eval mode).

    Raises
    ------
    BundleError
        When the weights cannot be read.
    """
    from .models import load_checkpoint_weights

    network.load_state_dict(load_checkpoint_weights(facts.weights))
    return network.float().eval()


def export_state_dict(facts: ModelFacts, output_dir: str | Path) -> Path:
    """Write a trained model's weights as a float32 ``<name>.pt`` state dict.

    ``python -m monai.bundle ckpt_export`` loads checkpoints with ``torch.load``; the bundle
    ships safetensors, so this is the conversion step before an export (see the comment in
    ``configs/inference.json``).

    Parameters
    ----------
    facts : ModelFacts
        The model (``facts.weights`` is read).
    output_dir : path
        Folder to write into (created when missing).

    Returns
    -------
    pathlib.Path
        ``output_dir/<name>.pt``.
    """
    from .models import load_checkpoint_weights

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    target = out / f"{facts.name}.pt"
    torch.save(load_checkpoint_weights(facts.weights), target)
    logger.info("wrote %s (float32 state dict of %s)", target, facts.name)
    return target


class ClassificationRunner:
    """Classify every item of a data loader and write the probabilities.

    A deliberately small evaluator: batches from ``dataloader`` (dicts with ``image``, the file
    path under ``path_key`` and :data:`REJECTED_KEY`) go through ``inferer(x, network)`` and a
    softmax; rejected items are listed, not classified.

    Parameters
    ----------
    network : torch.nn.Module
        The model, weights loaded.
    dataloader : iterable
        Yields collated dict batches (e.g. :class:`monai.data.DataLoader` over a
        :class:`monai.data.Dataset` of :func:`list_images` with :class:`LoadXrayd` and
        :class:`PreprocessXrayd`).
    bundle : Bundle
        Gives the version for the output.
    facts : ModelFacts
        Labels, threshold and names of the model.
    output_dir : path
        Where ``<name>_predictions.csv`` and ``<name>_predictions.json`` go.
    device : str or torch.device
        Where the forward pass runs.
    inferer : callable, optional
        ``inferer(inputs, network) -> logits``, e.g. :class:`monai.inferers.SimpleInferer`;
        ``network(inputs)`` when None.
    image_key, path_key : str
        Keys of the input tensor and of the file path in each batch.
    progress : bool
        Show a progress bar.
    """

    def __init__(
        self,
        network: nn.Module,
        dataloader: Iterable[Mapping[str, Any]],
        bundle: Bundle,
        facts: ModelFacts,
        output_dir: str | Path,
        device: str | torch.device = "cpu",
        inferer: Callable[[torch.Tensor, nn.Module], torch.Tensor] | None = None,
        image_key: str = "image",
        path_key: str = "path",
        progress: bool = True,
    ) -> None:
        self.network = network
        self.dataloader = dataloader
        self.bundle = bundle
        self.facts = facts
        self.output_dir = Path(output_dir)
        self.device = torch.device(device)
        self.inferer = inferer
        self.image_key = image_key
        self.path_key = path_key
        self.progress = progress

    @torch.no_grad()
    def run(self) -> dict[str, Any]:
        """Run the loop and write the outputs.

        Returns
        -------
        dict
            What was written to the JSON file (``results``, ``rejected``, model identity,
            ``disclaimer``) plus ``files`` (the two paths).
        """
        from .prediction import DISCLAIMER

        labels = list(self.facts.labels)
        covid = labels.index("covid")
        threshold = self.facts.covid_threshold
        net = self.network.to(self.device).eval()
        results: list[dict[str, Any]] = []
        rejected: list[dict[str, str]] = []
        for batch in tqdm(
            self.dataloader,
            desc=f"classifying ({self.facts.name})",
            unit="batch",
            disable=not self.progress,
        ):
            x = batch[self.image_key]
            x = x.as_tensor() if hasattr(x, "as_tensor") else torch.as_tensor(x)
            x = x.to(self.device)
            logits = self.inferer(x, net) if self.inferer is not None else net(x)
            temperature = float(self.facts.raw.get("temperature", 1.0))
            probs = torch.softmax(logits.float() / temperature, dim=1).cpu().numpy()
            paths = list(batch[self.path_key])
            reasons = list(batch.get(REJECTED_KEY, [""] * len(paths)))
            for path, reason, p in zip(paths, reasons, probs, strict=True):
                if reason:
                    rejected.append({"path": str(path), "reason": str(reason)})
                    continue
                score = float(p[covid])
                suspected = score >= threshold
                results.append(
                    {
                        "path": str(path),
                        "probabilities": {lab: float(v) for lab, v in zip(labels, p, strict=True)},
                        "label": labels[int(np.argmax(p))],
                        "covid_score": score,
                        "covid_suspected": bool(suspected),
                        "decision": "COVID-19 suspected" if suspected else "COVID-19 not suspected",
                    }
                )
        self.output_dir.mkdir(parents=True, exist_ok=True)
        stem = f"{self.facts.name}_predictions"
        json_path = self.output_dir / f"{stem}.json"
        csv_path = self.output_dir / f"{stem}.csv"
        summary: dict[str, Any] = {
            "model": self.facts.name,
            "model_title": self.facts.title,
            "bundle_version": self.bundle.version,
            "labels": labels,
            "covid_threshold": threshold,
            "results": results,
            "rejected": rejected,
            "disclaimer": DISCLAIMER,
        }
        json_path.write_text(json.dumps(summary, indent=2) + "\n")
        with csv_path.open("w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(
                [
                    "path",
                    "status",
                    *(f"p_{lab}" for lab in labels),
                    "label",
                    "decision",
                    "reject_reason",
                    "model",
                    "bundle_version",
                    "disclaimer",
                ]
            )
            for r in results:
                writer.writerow(
                    [r["path"], "classified"]
                    + [f"{r['probabilities'][lab]:.6f}" for lab in labels]
                    + [r["label"], r["decision"], "", self.facts.name, self.bundle.version]
                    + [DISCLAIMER]
                )
            for r in rejected:
                writer.writerow(
                    [r["path"], "rejected"]
                    + [""] * len(labels)
                    + ["", "", r["reason"], self.facts.name, self.bundle.version, DISCLAIMER]
                )
        logger.info(
            "%s: %d classified, %d rejected; wrote %s and %s",
            self.facts.name,
            len(results),
            len(rejected),
            csv_path,
            json_path,
        )
        summary["files"] = {"csv": str(csv_path), "json": str(json_path)}
        return summary


def write_evaluation(result: dict, output_dir: str | Path, report: bool = True) -> dict[str, Path]:
    """Write the output of :func:`~dicom_covid.analysis.evaluate.evaluate_model`.

    Parameters
    ----------
    result : dict
        The evaluation result.
    output_dir : path
        Folder for ``metrics.json`` (everything but the per-image predictions) and, with
        ``report``, ``report.md``, the figures and ``predictions.csv``.
    report : bool
        Also write the markdown report with figures.

    Returns
    -------
    dict of str to pathlib.Path
        The files written, by kind.
    """
    from .analysis.evaluate import to_json_ready

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}
    if report:
        from .analysis.report import write_report

        files.update(write_report(result, out))
    summary = {k: v for k, v in result.items() if k != "predictions"}
    files["metrics"] = out / "metrics.json"
    files["metrics"].write_text(json.dumps(to_json_ready(summary), indent=2) + "\n")
    logger.info(
        "%s on %d images: accuracy %.3f, macro AUC %.3f; wrote %s",
        result.get("model"),
        result.get("n", 0),
        result.get("accuracy", float("nan")),
        result.get("macro_auc", float("nan")),
        files["metrics"],
    )
    return files
