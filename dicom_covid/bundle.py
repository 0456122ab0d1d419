"""Access to the model bundle (``monai_bundle/``): which models exist, their facts and weights.

Layout::

    monai_bundle/
      configs/metadata.json      MONAI bundle metadata; ``version``, ``channel_def`` (labels),
                                 ``dicom_covid.default_model`` and ``dicom_covid.models``
      models/<name>.safetensors  fp16 weights, one file per backbone
      models/<name>.json         facts of that trained model: preprocessing, threshold, metrics

A model is either a single trained network (its ``metadata.json`` entry has ``weights`` and
``facts``) or an *ensemble* of such networks (its entry has ``members`` and ``facts``, no
``weights``). An ensemble's facts JSON (``"kind": "ensemble"``) names its members, how their
outputs combine (``"combination": "mean_probability"``: the mean of the members' softmax
outputs, each member with its own preprocessing), its own COVID threshold chosen on the
validation split and its validation metrics; :func:`install_ensemble` writes both. Members must
be single models of the same bundle (no nesting).

Everything inference needs to know about a model comes from here, not from code.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from .config import (
    BUNDLE_ENV,
    CHECKOUT_BUNDLE_DIR,
    DEFAULT_BUNDLE_DIR,
    PACKAGED_BUNDLE_DIR,
    default_bundle_dir,
)
from .errors import BundleError

__all__ = [
    "COMBINATIONS",
    "Bundle",
    "ModelFacts",
    "check_ensemble",
    "install_ensemble",
    "install_model",
]

logger = logging.getLogger(__name__)

#: How an ensemble combines its members' outputs (the facts JSON ``combination``).
COMBINATIONS: tuple[str, ...] = ("mean_probability",)

#: Names an ensemble may have (it becomes the file name ``models/<name>.json``).
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


@dataclass(frozen=True)
class ModelFacts:
    """Facts of one model of the bundle, read from ``models/<name>.json``.

    Attributes
    ----------
    name : str
        Backbone registry key (single model) or the ensemble's name.
    title : str
        Display name.
    labels : tuple of str
        Output order.
    input_size : int
        Square input side. For an ensemble: the largest member input size, the common resolution
        at which :meth:`dicom_covid.explain.Explainer.cam` averages the members' CAMs.
    mean, std : tuple of float
        Normalisation after repeating the image to 3 channels. Empty for an ensemble: each
        member normalises its own input.
    gradcam_layer : str
        Dotted module path of the Grad-CAM target layer; ``""`` for an ensemble (each member
        names its own).
    covid_threshold : float
        Operating point on P(covid) chosen on the validation split (for an ensemble: on the
        mean probability of its members).
    weights : pathlib.Path or None
        The fp16 safetensors file; None for an ensemble.
    raw : dict
        The whole JSON (metrics, training settings).
    members : tuple of str
        Names of the ensemble's single models, in order; ``()`` for a single model.
    kind : str
        ``"single"`` or ``"ensemble"``.
    """

    name: str
    title: str
    labels: tuple[str, ...]
    input_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    gradcam_layer: str
    covid_threshold: float
    weights: Path | None
    raw: dict
    members: tuple[str, ...] = ()
    kind: str = "single"

    @property
    def is_ensemble(self) -> bool:
        """True for an ensemble of bundle models."""
        return self.kind == "ensemble"


class Bundle:
    """A MONAI bundle folder holding dicom-covid models.

    Parameters
    ----------
    root : path, optional
        Bundle folder; defaults to :func:`dicom_covid.config.default_bundle_dir`:
        ``$DICOM_COVID_BUNDLE``, else the checkout's ``monai_bundle/``, else the default model's
        bundle installed with the package.

    Raises
    ------
    BundleError
        When ``configs/metadata.json`` is missing or malformed.
    """

    def __init__(self, root: str | Path | None = None) -> None:
        self.root = Path(root) if root is not None else default_bundle_dir()
        meta_path = self.root / "configs" / "metadata.json"
        if not meta_path.is_file():
            hint = ""
            if root is None and self.root != DEFAULT_BUNDLE_DIR:
                hint = (
                    f" ${BUNDLE_ENV} names it: point ${BUNDLE_ENV} at a bundle folder, or unset "
                    f"it to use the bundle installed with dicom-covid ({DEFAULT_BUNDLE_DIR})."
                )
            elif root is None:
                hint = (
                    " This dicom-covid has no bundle of its own: a source checkout keeps it in "
                    f"{CHECKOUT_BUNDLE_DIR.name}/, a wheel ships the default model in "
                    f"dicom_covid/{PACKAGED_BUNDLE_DIR.name}/. Set ${BUNDLE_ENV} to a bundle "
                    "folder, or reinstall dicom-covid from a wheel built with 'python -m build "
                    "--wheel'."
                )
            raise BundleError(
                f"{meta_path}: bundle metadata not found. Pass --bundle pointing at a "
                f"dicom-covid MONAI bundle folder (it holds configs/metadata.json).{hint}"
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

    def is_ensemble(self, name: str) -> bool:
        """True when ``name`` is listed in the bundle as an ensemble (``members``, no weights)."""
        entry = self._own["models"].get(name)
        return isinstance(entry, dict) and "members" in entry and "weights" not in entry

    def _single_ready(self, name: str) -> bool:
        entry = self._own["models"].get(name)
        return (
            isinstance(entry, dict)
            and "weights" in entry
            and (self.root / entry["weights"]).is_file()
        )

    def available(self, kind: str | None = None) -> list[str]:
        """Names of the models that can be loaded, in the order of ``metadata.json``.

        A single model is available when its weights file is present; an ensemble when its facts
        file is present and every member is an available single model.

        Parameters
        ----------
        kind : {None, "single", "ensemble"}
            Only models of this kind (default: both).

        Returns
        -------
        list of str
        """
        if kind not in (None, "single", "ensemble"):
            raise ValueError(f"kind must be None, 'single' or 'ensemble', got {kind!r}")
        out = []
        for name, entry in self._own["models"].items():
            if self.is_ensemble(name):
                members = entry.get("members") or []
                ok = (
                    kind != "single"
                    and (self.root / entry.get("facts", "")).is_file()
                    and bool(members)
                    and len(set(members)) == len(members)
                    and all(m != name and self._single_ready(m) for m in members)
                )
            else:
                ok = kind != "ensemble" and self._single_ready(name)
            if ok:
                out.append(name)
        return out

    def facts(self, name: str | None = None, allow_ensemble: bool = True) -> ModelFacts:
        """Facts of model ``name`` (default model when None).

        Parameters
        ----------
        name : str, optional
            Model name (a single model or an ensemble).
        allow_ensemble : bool
            False where the caller can only run one network (the MONAI inference config): an
            ensemble name then raises a :class:`BundleError` that says so.

        Returns
        -------
        ModelFacts

        Raises
        ------
        BundleError
            Unknown model, its files are missing, its labels differ from the bundle's; for an
            ensemble also an unknown, missing or nested member.
        """
        name = name or self.default_model
        entry = self._own["models"].get(name)
        if entry is None:
            raise BundleError(
                f"model {name!r} is not in the bundle {self.root}; available: "
                f"{', '.join(self.available()) or 'none'}."
                + (
                    " This installed copy ships only the default model: pass --bundle with the "
                    "repository's monai_bundle/ folder (or set $DICOM_COVID_BUNDLE) for the others."
                    if self.root.resolve() == PACKAGED_BUNDLE_DIR.resolve()
                    else ""
                )
            )
        if self.is_ensemble(name):
            if not allow_ensemble:
                raise BundleError(
                    f"model {name!r} is an ensemble of {', '.join(entry['members'])}; this path "
                    "runs a single network. Use one member, or run the ensemble with "
                    f"'dicom-covid predict --model {name}' (or configs/evaluate.json)."
                )
            return self._ensemble_facts(name, entry)
        weights = self.root / entry["weights"]
        facts_path = self.root / entry["facts"]
        if not weights.is_file() or not facts_path.is_file():
            raise BundleError(
                f"model {name!r}: {weights.name} or {facts_path.name} is missing from "
                f"{self.root / 'models'}; train it (dicom-covid train --backbone {name} "
                "--install) or choose another model."
            )
        raw = self._read_facts(name, facts_path)
        labels = self._check_labels(name, raw)
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

    def _read_facts(self, name: str, path: Path) -> dict:
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise BundleError(
                f"model {name!r}: {path} is not valid JSON ({exc}); restore it from version "
                "control or reinstall the model."
            ) from exc
        if not isinstance(raw, dict):
            raise BundleError(f"model {name!r}: {path} does not hold a JSON object.")
        return raw

    def _check_labels(self, name: str, raw: Mapping) -> tuple[str, ...]:
        labels = tuple(raw.get("labels", ()))
        if labels != self.labels:
            raise BundleError(
                f"model {name!r} was trained with labels {labels}, the bundle declares "
                f"{self.labels}."
            )
        return labels

    def _ensemble_facts(self, name: str, entry: Mapping) -> ModelFacts:
        facts_path = self.root / entry.get("facts", f"models/{name}.json")
        if not facts_path.is_file():
            raise BundleError(
                f"ensemble {name!r}: its facts file {facts_path} is missing; recreate it with "
                f"'dicom-covid ensemble --name {name} --members ...' or choose another model."
            )
        raw = self._read_facts(name, facts_path)
        members = tuple(raw.get("members") or entry.get("members") or ())
        if tuple(entry.get("members") or ()) != members:
            raise BundleError(
                f"ensemble {name!r}: metadata.json lists members {list(entry['members'])}, "
                f"{facts_path.name} lists {list(members)}; recreate it with 'dicom-covid "
                "ensemble'."
            )
        if raw.get("kind", "ensemble") != "ensemble":
            raise BundleError(
                f"ensemble {name!r}: {facts_path.name} has kind {raw.get('kind')!r}, expected "
                "'ensemble'."
            )
        combination = raw.get("combination", "mean_probability")
        if combination not in COMBINATIONS:
            raise BundleError(
                f"ensemble {name!r}: combination {combination!r} is not supported (this version "
                f"knows {', '.join(COMBINATIONS)}); update dicom-covid or recreate the ensemble."
            )
        member_facts = self._check_members(name, members)
        labels = self._check_labels(name, raw)
        self._warn_if_members_changed(name, raw, member_facts)
        largest = max(member_facts, key=lambda f: f.input_size)
        return ModelFacts(
            name=name,
            title=raw.get("title", name),
            labels=labels,
            input_size=largest.input_size,
            mean=(),
            std=(),
            gradcam_layer="",
            covid_threshold=float(raw["covid_threshold"]),
            weights=None,
            raw=raw,
            members=members,
            kind="ensemble",
        )

    def _check_members(self, name: str, members: Sequence[str]) -> list[ModelFacts]:
        """Facts of each member of ensemble ``name``; BundleError for a bad member list."""
        if not members:
            raise BundleError(f"ensemble {name!r} lists no members; recreate it.")
        if len(set(members)) != len(members):
            raise BundleError(
                f"ensemble {name!r} lists a member twice ({', '.join(members)}); recreate it "
                "with each member once."
            )
        out = []
        singles = self.available("single")
        for member in members:
            if member == name:
                raise BundleError(
                    f"ensemble {name!r} lists itself as a member; its members must be single "
                    "models of the bundle."
                )
            if member not in self._own["models"]:
                raise BundleError(
                    f"ensemble {name!r}: member {member!r} is not a model of the bundle "
                    f"{self.root} (single models: {', '.join(singles) or 'none'}); install it "
                    "or recreate the ensemble without it."
                )
            if self.is_ensemble(member):
                raise BundleError(
                    f"ensemble {name!r}: member {member!r} is itself an ensemble; list its "
                    "single models instead."
                )
            if not self._single_ready(member):
                raise BundleError(
                    f"ensemble {name!r}: the weights of member {member!r} are missing from "
                    f"{self.root / 'models'}; train and install it (dicom-covid train --backbone "
                    f"{member} --install) or recreate the ensemble without it."
                )
            out.append(self.facts(member))
        return out

    @staticmethod
    def _warn_if_members_changed(
        name: str, raw: Mapping, member_facts: Sequence[ModelFacts]
    ) -> None:
        recorded = raw.get("member_facts") or {}
        for f in member_facts:
            seen = recorded.get(f.name)
            if seen and seen.get("covid_threshold") != f.raw.get("covid_threshold"):
                logger.warning(
                    "ensemble %s: member %s was retrained after the ensemble was built; its "
                    "threshold and metrics are stale (rerun 'dicom-covid ensemble --name %s')",
                    name,
                    f.name,
                    name,
                )


def install_model(
    run_dir: str | Path,
    bundle_root: str | Path | None = None,
    make_default: bool = False,
    name: str | None = None,
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
    name : str, optional
        Model name in the bundle (default: the backbone's registry key). A second model of the
        same backbone needs its own name (e.g. ``efficientnet_lite0_v2``); its facts keep the
        ``backbone``.

    Returns
    -------
    pathlib.Path
        The installed weights file.
    """
    from .bundle_writer import BundleWriter

    run_dir = Path(run_dir)
    writer = BundleWriter(bundle_root)
    facts = json.loads((run_dir / "model.json").read_text())
    name = name or facts["backbone"]
    target = writer.install_file(run_dir / "model.safetensors", f"models/{name}.safetensors")
    writer.write_json(f"models/{name}.json", facts)
    writer.register_model(
        name,
        {"weights": f"models/{name}.safetensors", "facts": f"models/{name}.json"},
        make_default=make_default,
    )
    logger.info("installed %s into %s", name, writer.root)
    return target


def check_ensemble(bundle: Bundle, name: str, members: Sequence[str]) -> list[ModelFacts]:
    """Check that ``members`` can form the ensemble ``name`` of ``bundle``.

    Parameters
    ----------
    bundle : Bundle
        The bundle the ensemble goes into.
    name : str
        Ensemble name: letters, digits, ``_``, ``-`` and ``.``; not the name of a single model.
    members : sequence of str
        At least two different single models of the bundle whose weights are present.

    Returns
    -------
    list of ModelFacts
        The members' facts, in order.

    Raises
    ------
    BundleError
        Bad name, fewer than two members, or a member that is unknown, missing, an ensemble or
        the ensemble itself.
    """
    from .models import BACKBONES  # lazy: only creating an ensemble needs the registry

    if not _NAME_RE.match(name):
        raise BundleError(
            f"ensemble name {name!r} is not allowed; use up to 64 letters, digits, '_', '-' or "
            "'.', starting with a letter or digit (it becomes models/<name>.json)."
        )
    if name in BACKBONES or (name in bundle._own["models"] and not bundle.is_ensemble(name)):
        raise BundleError(
            f"{name!r} is the name of a single model; give the ensemble another name."
        )
    members = list(members)
    if len(members) < 2:
        raise BundleError(
            f"ensemble {name!r} needs at least two members, got {members or 'none'}; single "
            f"models of {bundle.root}: {', '.join(bundle.available('single')) or 'none'}."
        )
    return bundle._check_members(name, members)


def install_ensemble(
    name: str,
    members: Sequence[str],
    threshold: float,
    validation: Mapping,
    bundle_root: str | Path | Bundle | None = None,
    title: str | None = None,
    make_default: bool = False,
    extra: Mapping | None = None,
) -> Path:
    """Register an ensemble of bundle models: write ``models/<name>.json`` and its metadata entry.

    An existing ensemble of the same name is replaced; a single model never is.

    Parameters
    ----------
    name : str
        Ensemble name (see :func:`check_ensemble`).
    members : sequence of str
        Single models of the bundle whose softmax outputs are averaged.
    threshold : float
        COVID operating threshold on the mean P(covid), chosen on the validation split (see
        :func:`dicom_covid.training.ensemble.fit_ensemble`).
    validation : mapping
        Validation metrics and data description, stored under ``"validation"``.
    bundle_root : path or Bundle, optional
        Bundle folder (default: the project's).
    title : str, optional
        Display name (default: ``"Ensemble of <member titles>"``).
    make_default : bool
        Also make it the bundle's default model.
    extra : mapping, optional
        More keys for the facts JSON (e.g. ``threshold_rule``).

    Returns
    -------
    pathlib.Path
        The facts file written.

    Raises
    ------
    BundleError
        See :func:`check_ensemble`; also a threshold outside ``[0, 1]``.
    """
    bundle = bundle_root if isinstance(bundle_root, Bundle) else Bundle(bundle_root)
    member_facts = check_ensemble(bundle, name, members)
    threshold = float(threshold)
    if not 0.0 <= threshold <= 1.0:
        raise BundleError(f"ensemble {name!r}: threshold {threshold} is outside [0, 1].")
    facts = {
        "kind": "ensemble",
        "name": name,
        "title": title or "Ensemble of " + ", ".join(f.title for f in member_facts),
        "labels": list(bundle.labels),
        "members": list(members),
        "combination": "mean_probability",
        "covid_threshold": threshold,
        **dict(extra or {}),
        "validation": dict(validation),
        "member_facts": {
            f.name: {
                "title": f.title,
                "input_size": f.input_size,
                "covid_threshold": f.raw.get("covid_threshold"),
                "val_macro_auc": f.raw.get("val_macro_auc"),
            }
            for f in member_facts
        },
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
    }
    from .bundle_writer import BundleWriter

    writer = BundleWriter(bundle)  # a passed Bundle sees the new metadata too
    target = writer.write_json(f"models/{name}.json", facts)
    writer.register_model(
        name, {"members": list(members), "facts": f"models/{name}.json"}, make_default
    )
    logger.info("installed ensemble %s (%s) into %s", name, ", ".join(members), bundle.root)
    return target


def set_model_facts(bundle: Bundle, name: str, entries: Mapping[str, object]) -> Path:
    """Set top-level entries of a single model's facts JSON, atomically (see
    :meth:`dicom_covid.bundle_writer.BundleWriter.update_facts`).

    Parameters
    ----------
    bundle : Bundle
    name : str
        A single model of the bundle.
    entries : mapping
        Keys to set (replacing what was there).

    Returns
    -------
    pathlib.Path
        The facts file.

    Raises
    ------
    BundleError
        Unknown model or an ensemble.
    """
    from .bundle_writer import BundleWriter

    return BundleWriter(bundle).update_facts(name, entries)


def backbone_of(name: str, bundle_root: str | Path | None = None) -> str:
    """The registry backbone of a model name: its facts' ``backbone`` for a bundle model.

    A bundle model may be named apart from its backbone (``efficientnet_lite0_v2`` is an
    ``efficientnet_lite0``); a registry key that is not a bundle model is returned unchanged.

    Parameters
    ----------
    name : str
        Bundle model name or registry key.
    bundle_root : path, optional
        Bundle folder (default: the project's).

    Returns
    -------
    str
    """
    try:
        bundle = Bundle(bundle_root)
        if name in bundle._own["models"] and not bundle.is_ensemble(name):
            return str(bundle.facts(name).raw.get("backbone", name))
    except BundleError:
        pass
    return name
