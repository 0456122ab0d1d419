"""Abstain instead of guessing: when a model gives no COVID-19 verdict, and why.

A classifier answers every input with three probabilities, whether the input is a chest film
from a hospital like its training sources, a child, a CT slice relabelled as CR, or a test
pattern. :class:`AbstentionPolicy` decides, per image, whether the answer may be shown. Each
check gives a reason code (:data:`REASONS`); any reason makes the outcome ``"indeterminate"``
(:class:`dicom_covid.prediction.Prediction`), which is written as a coded finding in the SR and
burned into the Secondary Capture.

Checks, in order (thresholds from the model's bundle facts, entry ``abstention``; a site may
override each one, see ``serve``'s ``[abstention]`` configuration):

``blank_image``
    The windowed image is (nearly) constant: pixel standard deviation below ``min_pixel_std``
    or more than ``max_mode_fraction`` of the pixels in one of 64 grey levels.
``no_lung_fields``
    The bundle's lung U-Net finds lung fields covering less than ``lung_fraction[0]`` or more
    than ``lung_fraction[1]`` of the image (not a frontal chest radiograph).
``out_of_distribution``
    The network's penultimate features lie further from the training data than almost all
    validation images: class-conditional Mahalanobis distance (shared covariance, after a PCA)
    above the ``ood_percentile`` of the val split. Statistics in ``models/<name>.ood.safetensors``.
``uncertain``
    P(COVID-19) lies within ``uncertainty_margin`` of the threshold (a margin chosen on the val
    split).

This module needs numpy only; the features come from :class:`dicom_covid.inference.Predictor`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["REASONS", "AbstentionPolicy", "FeatureDensity", "pixel_reasons"]

#: Reason codes and what they mean, as shown to users.
REASONS: dict[str, str] = {
    "blank_image": "the image is blank or nearly constant after windowing",
    "no_lung_fields": "no plausible lung fields were found (is this a frontal chest radiograph?)",
    "out_of_distribution": "the image is unlike the films the model was trained on",
    "uncertain": "P(COVID-19) is too close to the threshold for a verdict",
}


def pixel_reasons(
    pixels: np.ndarray, min_pixel_std: float = 0.02, max_mode_fraction: float = 0.9
) -> tuple[str, ...]:
    """``("blank_image",)`` when ``pixels`` (windowed, in ``[0, 1]``) carry no image, else ``()``.

    Parameters
    ----------
    pixels : numpy.ndarray
        ``(H, W)`` float image in ``[0, 1]``.
    min_pixel_std : float
        Minimum standard deviation of an image worth classifying.
    max_mode_fraction : float
        Maximum share of pixels in the most common of 64 grey levels.

    Returns
    -------
    tuple of str
    """
    a = np.asarray(pixels, dtype=np.float32)
    step = max(1, int(np.ceil(np.sqrt(a.size / 262_144))))  # <= ~256k samples
    a = a[::step, ::step]
    if not np.isfinite(a).all() or float(a.std()) < min_pixel_std:
        return ("blank_image",)
    hist = np.bincount(np.clip((a * 64).astype(np.int64), 0, 63).ravel(), minlength=64)
    if hist.max() > max_mode_fraction * a.size:
        return ("blank_image",)
    return ()


@dataclass(frozen=True)
class FeatureDensity:
    """Class-conditional Gaussian model of a network's penultimate features.

    ``distance(f) = min_c sqrt((z - mu_c)^T P (z - mu_c))`` with ``z = (f - mean) @ components``
    (a PCA of the training features), ``mu_c`` the class means and ``P`` the shared precision.

    Attributes
    ----------
    mean : numpy.ndarray
        ``(D,)`` feature mean.
    components : numpy.ndarray
        ``(D, K)`` PCA basis.
    class_means : numpy.ndarray
        ``(C, K)``.
    precision : numpy.ndarray
        ``(K, K)``.
    """

    mean: np.ndarray
    components: np.ndarray
    class_means: np.ndarray
    precision: np.ndarray

    @classmethod
    def fit(cls, features: np.ndarray, targets: np.ndarray, dims: int = 64) -> FeatureDensity:
        """Fit on training features ``(N, D)`` with class indices ``(N,)``."""
        f = np.asarray(features, dtype=np.float64)
        mean = f.mean(axis=0)
        centred = f - mean
        _, _, vt = np.linalg.svd(centred, full_matrices=False)
        components = vt[: min(dims, vt.shape[0])].T
        z = centred @ components
        classes = np.unique(targets)
        class_means = np.stack([z[targets == c].mean(axis=0) for c in classes])
        resid = z - class_means[np.searchsorted(classes, targets)]
        cov = resid.T @ resid / max(1, len(z) - len(classes))
        cov += np.eye(cov.shape[0]) * 1e-6 * np.trace(cov) / cov.shape[0]
        return cls(mean, components, class_means, np.linalg.inv(cov))

    def distance(self, features: np.ndarray) -> np.ndarray:
        """Mahalanobis distance of each row of ``features`` ``(N, D)`` to the nearest class."""
        z = (np.asarray(features, dtype=np.float64) - self.mean) @ self.components
        d = z[:, None, :] - self.class_means[None]
        m = np.einsum("nck,kl,ncl->nc", d, self.precision, d)
        return np.sqrt(np.maximum(m.min(axis=1), 0.0))

    def save(self, path: str | Path) -> None:
        """Write the statistics as safetensors (float32), atomically."""
        from .bundle_writer import atomic_write

        data = self.to_bytes()
        atomic_write(path, lambda fh: fh.write(data))

    def to_bytes(self) -> bytes:
        """The statistics as the bytes of a safetensors file (float32)."""
        from safetensors.numpy import save

        return save(
            {
                "mean": self.mean.astype(np.float32),
                "components": np.ascontiguousarray(self.components, dtype=np.float32),
                "class_means": self.class_means.astype(np.float32),
                "precision": np.ascontiguousarray(self.precision, dtype=np.float32),
            }
        )

    @classmethod
    def load(cls, path: str | Path) -> FeatureDensity:
        """Read statistics written by :meth:`save`."""
        from safetensors.numpy import load_file

        t = load_file(str(path))
        return cls(
            *(t[k].astype(np.float64) for k in ("mean", "components", "class_means", "precision"))
        )


@dataclass(frozen=True)
class AbstentionPolicy:
    """When a model abstains (see the module docstring).

    Attributes
    ----------
    enabled : bool
        False turns abstention off: every image gets a verdict (reasons are still computed
        and logged as facts of the prediction).
    min_pixel_std, max_mode_fraction : float
        The ``blank_image`` check.
    lung_fraction : tuple of float
        Plausible share of the image covered by lung fields; outside it: ``no_lung_fields``.
    ood_threshold : float or None
        Feature distance above which an image is ``out_of_distribution``; None: no check.
    uncertainty_margin : float
        Half-width of the band around the COVID-19 threshold where the model is ``uncertain``;
        0 turns the check off.
    checks : tuple of str
        Reason codes that make the model abstain (default: all of :data:`REASONS`).
    """

    enabled: bool = True
    min_pixel_std: float = 0.02
    max_mode_fraction: float = 0.9
    lung_fraction: tuple[float, float] = (0.08, 0.7)
    ood_threshold: float | None = None
    uncertainty_margin: float = 0.0
    checks: tuple[str, ...] = field(default_factory=lambda: tuple(REASONS))

    @classmethod
    def from_facts(
        cls, facts: Mapping[str, Any] | None, overrides: Mapping[str, Any] | None = None
    ) -> AbstentionPolicy:
        """The policy of a model's facts (``abstention`` entry), with a site's overrides.

        Parameters
        ----------
        facts : mapping or None
            The model's ``abstention`` facts.
        overrides : mapping, optional
            Site settings with the attribute names of this class (``enabled``,
            ``uncertainty_margin``, ``ood_threshold``, ``lung_fraction``, ``checks``, ...).

        Raises
        ------
        ValueError
            Unknown setting or reason code.
        """
        f = dict(facts or {})
        policy = cls(
            min_pixel_std=float(f.get("min_pixel_std", cls.min_pixel_std)),
            max_mode_fraction=float(f.get("max_mode_fraction", cls.max_mode_fraction)),
            lung_fraction=tuple(f.get("lung_fraction", cls.lung_fraction)),  # type: ignore[arg-type]
            ood_threshold=(
                float(f["ood"]["threshold"]) if isinstance(f.get("ood"), Mapping) else None
            ),
            uncertainty_margin=float(f.get("uncertainty_margin", 0.0)),
        )
        if overrides:
            known = set(cls.__dataclass_fields__)
            unknown = set(overrides) - known
            if unknown:
                raise ValueError(
                    f"unknown abstention setting(s) {sorted(unknown)}; known: {sorted(known)}"
                )
            values = dict(overrides)
            if "lung_fraction" in values:
                values["lung_fraction"] = tuple(values["lung_fraction"])
            if "checks" in values:
                values["checks"] = tuple(values["checks"])
                bad = set(values["checks"]) - set(REASONS)
                if bad:
                    raise ValueError(f"unknown abstention check(s) {sorted(bad)}: {list(REASONS)}")
            policy = replace(policy, **values)
        return policy

    def reasons(
        self,
        pixels: np.ndarray | None = None,
        lung_fraction: float | None = None,
        ood_ratio: float | None = None,
        covid_score: float | None = None,
        covid_threshold: float | None = None,
    ) -> tuple[str, ...]:
        """Reason codes that apply to one image (whatever :attr:`enabled` says).

        Parameters
        ----------
        pixels : numpy.ndarray, optional
            Windowed ``(H, W)`` pixels in ``[0, 1]``.
        lung_fraction : float, optional
            Share of the image covered by the lung fields.
        ood_ratio : float, optional
            Feature distance (see :class:`FeatureDensity`) divided by :attr:`ood_threshold`.
        covid_score, covid_threshold : float, optional
            P(COVID-19) and the model's threshold.

        Returns
        -------
        tuple of str
        """
        out: list[str] = []
        if pixels is not None:
            out += pixel_reasons(pixels, self.min_pixel_std, self.max_mode_fraction)
        if lung_fraction is not None and not (
            self.lung_fraction[0] <= lung_fraction <= self.lung_fraction[1]
        ):
            out.append("no_lung_fields")
        if ood_ratio is not None and ood_ratio > 1.0:
            out.append("out_of_distribution")
        if (
            self.uncertainty_margin > 0
            and covid_score is not None
            and covid_threshold is not None
            and abs(covid_score - covid_threshold) < self.uncertainty_margin
        ):
            out.append("uncertain")
        return tuple(r for r in out if r in self.checks)

    def abstains(self, reasons: tuple[str, ...]) -> bool:
        """True when the model gives no verdict for an image with these reasons."""
        return self.enabled and bool(reasons)
