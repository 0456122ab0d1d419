"""Classification of chest radiographs with a model from the bundle.

:class:`Predictor` loads a model once and classifies :class:`~dicom_covid.reader.XrayImage`
objects, files or batches; each result is a :class:`Prediction`. RESEARCH USE ONLY: a prediction
is a screening aid for research, never a diagnosis.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .bundle import Bundle, ModelFacts
from .errors import BundleError
from .models import build_model, load_checkpoint_weights
from .preprocessing import Preprocessing
from .reader import XrayImage, read_image
from .transforms import RepeatNormalize

__all__ = ["DISCLAIMER", "Prediction", "Predictor"]

logger = logging.getLogger(__name__)

#: Printed or embedded in every output.
DISCLAIMER = "RESEARCH USE ONLY - NOT FOR DIAGNOSTIC USE"


@dataclass(frozen=True)
class Prediction:
    """Result of classifying one image.

    Attributes
    ----------
    probabilities : dict of str to float
        Softmax probability per label, in the bundle's label order.
    label : str
        Most probable label.
    covid_score : float
        ``probabilities["covid"]``.
    covid_threshold : float
        Operating threshold of the model.
    covid_suspected : bool
        ``covid_score >= covid_threshold``: the screening decision.
    model_name, model_title : str
        Model name (backbone key or ensemble name) and display name.
    bundle_version : str
        Version of the bundle the model came from.
    image_facts : dict
        What the reader used (format, view, photometric interpretation, ...); no patient data.
    model_members : tuple of str
        Member models when the model is an ensemble, else empty.
    """

    probabilities: dict[str, float]
    label: str
    covid_score: float
    covid_threshold: float
    covid_suspected: bool
    model_name: str
    model_title: str
    bundle_version: str
    image_facts: dict = field(default_factory=dict)
    model_members: tuple[str, ...] = ()

    @property
    def decision(self) -> str:
        """``"COVID-19 suspected"`` or ``"COVID-19 not suspected"``."""
        return "COVID-19 suspected" if self.covid_suspected else "COVID-19 not suspected"

    def to_dict(self) -> dict:
        """JSON-serialisable form, with the decision and the research-use disclaimer."""
        d = asdict(self)
        d["decision"] = self.decision
        d["disclaimer"] = DISCLAIMER
        return d


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
        Torch device (default ``"cpu"``).

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
    ) -> None:
        self.bundle = bundle if isinstance(bundle, Bundle) else Bundle(bundle)
        self.facts: ModelFacts = self.bundle.facts(model)
        self.device = torch.device(device)
        self.labels = self.facts.labels
        self._covid = self.labels.index("covid")
        self._model: nn.Module | None = None
        self._members: list[Predictor] = []
        if self.facts.is_ensemble:
            self._members = [Predictor(self.bundle, m, device) for m in self.facts.members]
            logger.info(
                "loaded ensemble %s (%s) from bundle %s",
                self.facts.name,
                ", ".join(self.facts.members),
                self.bundle.version,
            )
            return
        self._load_network()
        logger.info("loaded model %s from bundle %s", self.facts.name, self.bundle.version)

    def _load_network(self) -> None:
        f = self.facts
        net = build_model(f.raw.get("backbone", f.name), len(f.labels))
        net.load_state_dict(load_checkpoint_weights(f.weights))
        self._model = net.eval().to(self.device)
        #: The model's input pipeline, from its facts (see :mod:`dicom_covid.preprocessing`).
        self.preprocessing = Preprocessing(f.input_size, f.raw.get("preprocessing") or {})
        self._normalize = RepeatNormalize(f.mean, f.std)
        #: Softmax temperature fitted on the val split (1.0 when the model was not calibrated).
        self.temperature = float(f.raw.get("temperature", 1.0))

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
        self.device = torch.device(device)
        self.labels = self.facts.labels
        self._covid = self.labels.index("covid")
        self._members = []
        self._load_network()
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
        if self.is_ensemble:
            raise BundleError(self._no_single_network("input tensor"))
        return self.prepared(image)[0][None].to(self.device)

    def prepared(self, image: XrayImage) -> tuple[torch.Tensor, dict]:
        """Normalised network input ``(3, S, S)`` and the preprocessing facts of one image.

        Raises
        ------
        BundleError
            For an ensemble: each member has its own input (see :attr:`members`).
        """
        if self.is_ensemble:
            raise BundleError(self._no_single_network("input tensor"))
        img, info = self.preprocessing(image.pixels)
        return self._normalize(img), info

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
        out = []
        for i in range(0, len(images), batch_size):
            x = torch.cat([self.input_tensor(im) for im in images[i : i + batch_size]])
            logits = self.model(x).float() / self.temperature
            out.append(torch.softmax(logits, dim=1).cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, len(self.labels)))

    def to_prediction(self, probs: np.ndarray, image: XrayImage | None = None) -> Prediction:
        """Wrap one row of probabilities as a :class:`Prediction`."""
        score = float(probs[self._covid])
        return Prediction(
            probabilities={lab: float(p) for lab, p in zip(self.labels, probs, strict=True)},
            label=self.labels[int(np.argmax(probs))],
            covid_score=score,
            covid_threshold=self.facts.covid_threshold,
            covid_suspected=score >= self.facts.covid_threshold,
            model_name=self.facts.name,
            model_title=self.facts.title,
            bundle_version=self.bundle.version,
            image_facts=image.facts() if image is not None else {},
            model_members=tuple(self.facts.members),
        )

    def predict(self, image: XrayImage) -> Prediction:
        """Classify one image."""
        return self.to_prediction(self.probabilities([image])[0], image)

    def predict_path(self, path: str | Path) -> Prediction:
        """Read (see :func:`~dicom_covid.reader.read_image`) and classify one file.

        Raises
        ------
        InputRejected
            When the file is not a classifiable chest radiograph.
        """
        return self.predict(read_image(path))
