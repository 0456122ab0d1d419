"""Classification of chest radiographs with a model from the bundle.

:class:`Predictor` loads a model once and classifies :class:`~dicom_covid.reader.XrayImage`
objects, files or batches; each result is a :class:`Prediction`. RESEARCH USE ONLY: a prediction
is a screening aid for research, never a diagnosis.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .abstention import AbstentionPolicy, FeatureDensity
from .bundle import Bundle, ModelFacts
from .errors import BundleError, DicomCovidError
from .models import build_model, load_checkpoint_weights
from .prediction import DISCLAIMER, Prediction
from .preprocessing import Preprocessing
from .reader import XrayImage, read_image
from .transforms import RepeatNormalize

__all__ = ["DISCLAIMER", "Prediction", "Predictor"]

logger = logging.getLogger(__name__)


class Predictor:
    """A bundle model loaded once, ready to classify.

    The model may be a single network or an ensemble of the bundle (see
    :mod:`dicom_covid.bundle`). An ensemble loads each member once, as a member
    :class:`Predictor` with its own preprocessing and input size (:attr:`members`), and
    :meth:`probabilities` returns the mean of the members' softmax outputs; its threshold, name
    and title are the ensemble's own.

    Parameters
    ----------
    bundle : Bundle or path, optional
        Bundle to take the model from (default: the project's ``monai_bundle/``).
    model : str, optional
        Model name in the bundle, single or ensemble (default: the bundle's default model).
    device : str
        Torch device (default ``"cpu"``). On CUDA the networks run in ``channels_last`` memory
        format under automatic mixed precision (bfloat16 where the GPU supports it, else
        float16; probabilities and Grad-CAM are computed in float32 from its outputs).
    abstention : mapping, optional
        A site's overrides of the model's abstention policy (see
        :class:`dicom_covid.abstention.AbstentionPolicy`), e.g. ``{"enabled": False}``.

    Raises
    ------
    BundleError
        Unknown model, missing weights, or (ensemble) a member that is unknown or missing.

    Notes
    -----
    A single model has one network, :attr:`model`, fed by :meth:`input_tensor`. An ensemble has
    none of its own: :attr:`model` and :meth:`input_tensor` raise :class:`BundleError` and the
    networks are those of :attr:`members`.
    """

    def __init__(
        self,
        bundle: Bundle | str | Path | None = None,
        model: str | None = None,
        device: str = "cpu",
        abstention: Mapping[str, Any] | None = None,
    ) -> None:
        self.bundle = bundle if isinstance(bundle, Bundle) else Bundle(bundle)
        self.facts: ModelFacts = self.bundle.facts(model)
        self._set_device(device)
        self.labels = self.facts.labels
        self._covid = self.labels.index("covid")
        self._model: nn.Module | None = None
        self._members: list[Predictor] = []
        if self.facts.is_ensemble:
            self._set_abstention(abstention)
            self._members = [
                Predictor(self.bundle, m, device, abstention) for m in self.facts.members
            ]
            logger.info(
                "loaded ensemble %s (%s) from bundle %s",
                self.facts.name,
                ", ".join(self.facts.members),
                self.bundle.version,
            )
            return
        self._load_network()
        self._set_abstention(abstention)
        logger.info("loaded model %s from bundle %s", self.facts.name, self.bundle.version)

    def _load_network(self) -> None:
        f = self.facts
        net = build_model(f.raw.get("backbone", f.name), len(f.labels))
        net.load_state_dict(load_checkpoint_weights(f.weights))
        self._model = net.eval().to(self.device)
        if self.device.type == "cuda":
            self._model = self._model.to(memory_format=torch.channels_last)
        #: The model's input pipeline, from its facts (see :mod:`dicom_covid.preprocessing`).
        self.preprocessing = Preprocessing(
            f.input_size, f.raw.get("preprocessing") or {}, bundle=self.bundle
        )
        self._normalize = RepeatNormalize(f.mean, f.std)
        #: Softmax temperature fitted on the val split (1.0 when the model was not calibrated).
        self.temperature = float(f.raw.get("temperature", 1.0))
        self._features: list[torch.Tensor] = []
        self._feature_hook: Any = None
        self.feature_layer: str | None = None

    def _set_device(self, device: str) -> None:
        """Check and set the torch device and its mixed-precision type."""
        try:
            self.device = torch.device(device)
        except RuntimeError as exc:
            raise DicomCovidError(
                f"unknown torch device {device!r} ({exc}); use cpu, cuda or cuda:N."
            ) from exc
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise DicomCovidError(
                f"device {device!r} asked for, but torch finds no CUDA GPU on this machine; "
                "use --device cpu or install a CUDA build of torch."
            )
        #: Mixed-precision type on CUDA (None on the CPU: float32 throughout).
        self.amp_dtype: torch.dtype | None = None
        if self.device.type == "cuda":
            self.amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16

    def autocast(self) -> contextlib.AbstractContextManager:
        """The precision context of a forward pass: mixed precision on CUDA, else nothing."""
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def to_device(self, x: torch.Tensor) -> torch.Tensor:
        """A batch ``(N, 3, S, S)`` on this predictor's device (``channels_last`` on CUDA)."""
        x = x.as_tensor() if hasattr(x, "as_tensor") else x  # never a MetaTensor
        if self.device.type == "cuda":
            return x.to(self.device, memory_format=torch.channels_last, non_blocking=True)
        return x.to(self.device)

    def set_feature_layer(self, layer: str | None) -> None:
        """Choose the features of the out-of-distribution check.

        Parameters
        ----------
        layer : str or None
            Dotted module path: the channel means and standard deviations of its output
            (texture statistics, which tell an X-ray from an MR slice or a test pattern); None:
            the penultimate features (input of the last linear layer).
        """
        if self._feature_hook is not None:
            self._feature_hook.remove()
        model = self.model
        self.feature_layer = layer
        if layer:

            def pooled(_m: nn.Module, _args: Any, out: torch.Tensor) -> None:
                o = out.detach().float()
                self._features.append(torch.cat([o.mean((2, 3)), o.std((2, 3))], dim=1))

            self._feature_hook = model.get_submodule(layer).register_forward_hook(pooled)
            return
        linear = [m for m in model.modules() if isinstance(m, nn.Linear)]
        if linear:
            self._feature_hook = linear[-1].register_forward_pre_hook(
                lambda _m, args: self._features.append(args[0].detach().float().flatten(1))
            )

    def _set_abstention(self, overrides: Mapping[str, Any] | None) -> None:
        facts = self.facts.raw.get("abstention") or {}
        #: When this model gives no verdict (see :mod:`dicom_covid.abstention`).
        self.abstention = AbstentionPolicy.from_facts(facts, overrides)
        self.density: FeatureDensity | None = None
        ood = facts.get("ood")
        if isinstance(ood, Mapping) and ood.get("file"):
            path = self.bundle.root / ood["file"]
            if not path.is_file() and self.facts.weights is not None:
                path = self.facts.weights.parent / Path(ood["file"]).name
            if not path.is_file():
                raise BundleError(
                    f"model {self.facts.name!r}: out-of-distribution statistics {path} are "
                    "missing; reinstall the bundle or remove 'abstention.ood' from its facts."
                )
            self.density = FeatureDensity.load(path)
        self._segmenter: Any = None
        if self._model is not None:
            self.set_feature_layer(ood.get("layer") if isinstance(ood, Mapping) else None)

    @classmethod
    def from_run(cls, run_dir: str | Path, device: str = "cpu") -> Predictor:
        """A predictor for a finished training run that is not installed in a bundle.

        Parameters
        ----------
        run_dir : path
            Output folder of :func:`dicom_covid.training.train.train` (``model.json`` and
            ``model.safetensors``).
        device : str
            Torch device.

        Returns
        -------
        Predictor
        """
        import json

        run_dir = Path(run_dir)
        raw = json.loads((run_dir / "model.json").read_text())
        self = cls.__new__(cls)
        self.bundle = Bundle()
        self.facts = ModelFacts(
            name=raw["backbone"],
            title=raw.get("title", raw["backbone"]),
            labels=tuple(raw["labels"]),
            input_size=int(raw["input_size"]),
            mean=tuple(raw["mean"]),
            std=tuple(raw["std"]),
            gradcam_layer=raw["gradcam_layer"],
            covid_threshold=float(raw["covid_threshold"]),
            weights=run_dir / "model.safetensors",
            raw=raw,
        )
        self._set_device(device)
        self.labels = self.facts.labels
        self._covid = self.labels.index("covid")
        self._members = []
        self._model = None
        self._load_network()
        self._set_abstention(None)
        return self

    @property
    def is_ensemble(self) -> bool:
        """True when the model is an ensemble of bundle models."""
        return self.facts.is_ensemble

    @property
    def members(self) -> list[Predictor]:
        """The loaded networks: one :class:`Predictor` per member, or ``[self]`` (single model)."""
        return list(self._members) if self.is_ensemble else [self]

    @property
    def model(self) -> nn.Module:
        """The network (eval mode).

        Raises
        ------
        BundleError
            For an ensemble, which has one network per member (see :attr:`members`).
        """
        if self._model is None:
            raise BundleError(self._no_single_network("model"))
        return self._model

    def _no_single_network(self, what: str) -> str:
        return (
            f"model {self.facts.name!r} is an ensemble of {', '.join(self.facts.members)}: it "
            f"has no single {what}. Choose one of its members instead (in code, "
            "Predictor.members holds one Predictor per member network)."
        )

    def input_tensor(self, image: XrayImage) -> torch.Tensor:
        """Network input ``(1, 3, S, S)`` for one image (the shared preprocessing path).

        Raises
        ------
        BundleError
            For an ensemble: each member has its own input (see :attr:`members`).
        """
        return self.prepared(image)[0][None].to(self.device)

    def prepared(self, image: XrayImage) -> tuple[torch.Tensor, dict]:
        """Normalised network input ``(3, S, S)`` and the preprocessing facts of one image.

        Raises
        ------
        BundleError
            For an ensemble: each member has its own input (see :attr:`members`).
        """
        return self.prepared_batch([image])[0]

    def prepared_batch(self, images: Sequence[XrayImage]) -> list[tuple[torch.Tensor, dict]]:
        """:meth:`prepared` for several images (the lung U-Net of the pipeline runs once).

        Raises
        ------
        BundleError
            For an ensemble: each member has its own input (see :attr:`members`).
        """
        if self.is_ensemble:
            raise BundleError(self._no_single_network("input tensor"))
        batch = self.preprocessing.batch([image.pixels for image in images])
        return [(self._normalize(img), info) for img, info in batch]

    @torch.no_grad()
    def analyse(
        self, images: Sequence[XrayImage], batch_size: int = 16
    ) -> tuple[np.ndarray, list[dict[str, Any]]]:
        """Probabilities ``(N, C)`` and, per image, the facts the abstention checks use.

        Each dict holds ``ood_distance`` (None without statistics), ``lung_fraction`` (None
        when the pipeline did not segment the lungs) and the preprocessing facts.

        Runs under ``torch.no_grad`` (not ``inference_mode``): the Grad-CAM of
        :meth:`Explainer.predict_and_explain <dicom_covid.explain.Explainer.predict_and_explain>`
        records a graph from its layer on during this same forward.
        """
        if self.is_ensemble:
            if not len(images):
                return np.zeros((0, len(self.labels))), []
            runs = [m.analyse(images, batch_size) for m in self._members]
            probs = np.mean(np.stack([r[0] for r in runs]), axis=0)
            infos = []
            for i in range(len(images)):
                dists = [r[1][i]["ood_distance"] for r in runs]
                ratios = [
                    d / m.abstention.ood_threshold
                    for d, m in zip(dists, self._members, strict=True)
                    if d is not None and m.abstention.ood_threshold
                ]
                lungs = [r[1][i]["lung_fraction"] for r in runs if r[1][i]["lung_fraction"]]
                infos.append(
                    {
                        "ood_ratio": max(ratios) if ratios else None,
                        "ood_distance": None,
                        "lung_fraction": lungs[0] if lungs else None,
                    }
                )
            return probs, infos
        out, infos = [], []
        #: Penultimate features of the images of the last :meth:`analyse` call, per batch.
        self.last_features: list[np.ndarray] = []
        for i in range(0, len(images), batch_size):
            prepared = self.prepared_batch(images[i : i + batch_size])
            x = self.to_device(torch.stack([p[0] for p in prepared]))
            self._features.clear()
            with self.autocast():
                logits = self.model(x)
            logits = logits.float() / self.temperature
            out.append(torch.softmax(logits, dim=1).cpu().numpy())
            feats = self._features[-1].cpu().numpy() if self._features else None
            if feats is not None:
                self.last_features.append(feats)
            dist = self.density.distance(feats) if self.density is not None else None
            for j, (_, info) in enumerate(prepared):
                d = None if dist is None else float(dist[j])
                thr = self.abstention.ood_threshold
                infos.append(
                    {
                        **info,
                        "ood_distance": d,
                        "ood_ratio": d / thr if d is not None and thr else None,
                        "lung_fraction": info.get("lung_fraction"),
                    }
                )
        probs = np.concatenate(out) if out else np.zeros((0, len(self.labels)))
        #: The per-image facts of the last :meth:`analyse` call (the Grad-CAM of the same pass
        #: places its map with their ``lung_box``, see :mod:`dicom_covid.explain`).
        self.last_infos = infos
        return probs, infos

    def _lung_fractions(
        self, images: Sequence[XrayImage], batch_size: int = 16
    ) -> list[float | None]:
        """Lung share of each image by the bundle's U-Net (for models that do not crop).

        One U-Net forward pass per ``batch_size`` images. None for every image when the bundle
        has no lung segmenter: the ``no_lung_fields`` check is then skipped (logged once).
        """
        if self._segmenter is None:
            from .lungs.segmenter import LungSegmenter

            try:
                self._segmenter = LungSegmenter(self.bundle, device=str(self.device))
            except BundleError as exc:
                logger.warning("lung-field check off for %s: %s", self.facts.name, exc)
                self._segmenter = False
        if self._segmenter is False:
            return [None] * len(images)
        out: list[float | None] = []
        for i in range(0, len(images), max(1, batch_size)):
            out.extend(self._segmenter.lung_fractions(images[i : i + batch_size]))
        return out

    def predict_batch(self, images: Sequence[XrayImage], batch_size: int = 16) -> list[Prediction]:
        """Classify images, each with its abstention decision."""
        probs, infos = self.analyse(images, batch_size)
        lungs = [info.get("lung_fraction") for info in infos]
        missing = [i for i, lung in enumerate(lungs) if lung is None]
        if missing and "no_lung_fields" in self.abstention.checks:
            found = self._lung_fractions([images[i] for i in missing], batch_size)
            for i, lung in zip(missing, found, strict=True):
                lungs[i] = lung
        out = []
        for image, p, info, lung in zip(images, probs, infos, lungs, strict=True):
            ratio = info.get("ood_ratio")
            score = float(p[self._covid])
            reasons = self.abstention.reasons(
                pixels=image.pixels,
                lung_fraction=lung,
                ood_ratio=ratio,
                covid_score=score,
                covid_threshold=self.facts.covid_threshold,
            )
            out.append(
                self.to_prediction(
                    p,
                    image,
                    reasons=reasons,
                    ood_score=ratio,
                    lung_fraction=lung,
                )
            )
        return out

    @torch.no_grad()
    def probabilities(self, images: Sequence[XrayImage], batch_size: int = 16) -> np.ndarray:
        """Softmax probabilities ``(N, C)`` for a sequence of images.

        For an ensemble, the mean of the members' probabilities (each member preprocesses the
        images for its own input size and normalisation).
        """
        if self.is_ensemble:
            if not len(images):
                return np.zeros((0, len(self.labels)))
            per_member = [m.probabilities(images, batch_size) for m in self._members]
            return np.mean(np.stack(per_member), axis=0)
        return self.analyse(images, batch_size)[0]

    def to_prediction(
        self,
        probs: np.ndarray,
        image: XrayImage | None = None,
        reasons: tuple[str, ...] = (),
        ood_score: float | None = None,
        lung_fraction: float | None = None,
    ) -> Prediction:
        """Wrap one row of probabilities as a :class:`Prediction`.

        ``reasons`` are abstention reason codes; the prediction is indeterminate when the
        policy abstains on them.
        """
        score = float(probs[self._covid])
        abstained = self.abstention.abstains(reasons)
        facts = image.facts() if image is not None else {}
        if lung_fraction is not None:
            facts["lung_fraction"] = round(float(lung_fraction), 4)
        return Prediction(
            probabilities={lab: float(p) for lab, p in zip(self.labels, probs, strict=True)},
            label=self.labels[int(np.argmax(probs))],
            covid_score=score,
            covid_threshold=self.facts.covid_threshold,
            covid_suspected=score >= self.facts.covid_threshold and not abstained,
            model_name=self.facts.name,
            model_title=self.facts.title,
            bundle_version=self.bundle.version,
            image_facts=facts,
            model_members=tuple(self.facts.members),
            abstained=abstained,
            abstention_reasons=tuple(reasons),
            ood_score=None if ood_score is None else round(float(ood_score), 4),
        )

    def predict(self, image: XrayImage) -> Prediction:
        """Classify one image (with the abstention decision)."""
        return self.predict_batch([image])[0]

    def predict_path(self, path: str | Path) -> Prediction:
        """Read (see :func:`~dicom_covid.reader.read_image`) and classify one file.

        Raises
        ------
        InputRejected
            When the file is not a classifiable chest radiograph.
        """
        return self.predict(read_image(path))
