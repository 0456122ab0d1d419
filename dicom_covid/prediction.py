"""The result of classifying one radiograph, as plain data (no torch).

:class:`Prediction`, the screening decision and :data:`DISCLAIMER` live here so that everything
that *uses* a result (the DICOM result writers in :mod:`dicom_covid.results`, the PACS service,
the MONAI components) needs neither torch nor a model. :mod:`dicom_covid.inference` makes them.

A prediction has one of three outcomes (:attr:`Prediction.outcome`):

* ``"suspected"``: P(COVID-19) reached the model's threshold;
* ``"not_suspected"``: it did not;
* ``"indeterminate"``: the model abstained (see :mod:`dicom_covid.abstention`): the input lies
  outside what the model was trained on (not a chest radiograph, a child, an unusual exposure)
  or the model is unsure. No COVID-19 verdict is given; :attr:`Prediction.abstention_reasons`
  says why. RESEARCH USE ONLY: no outcome is a diagnosis.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

__all__ = ["DISCLAIMER", "OUTCOMES", "Prediction"]

#: Printed or embedded in every output.
DISCLAIMER = "RESEARCH USE ONLY - NOT FOR DIAGNOSTIC USE"

#: The outcome codes, in the order they are documented.
OUTCOMES = ("suspected", "not_suspected", "indeterminate")


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
        The screening decision: ``covid_score >= covid_threshold`` and the model did not
        abstain. Always False for an indeterminate result.
    model_name, model_title : str
        Model name (backbone key or ensemble name) and display name.
    bundle_version : str
        Version of the bundle the model came from.
    image_facts : dict
        What the reader used (format, view, photometric interpretation, ...); no patient data.
    model_members : tuple of str
        Member models when the model is an ensemble, else empty.
    abstained : bool
        True when the model gives no verdict (outcome ``"indeterminate"``).
    abstention_reasons : tuple of str
        Reason codes of an abstention (see :data:`dicom_covid.abstention.REASONS`).
    ood_score : float or None
        Feature distance to the training data, in units of its val-split abstention threshold
        (> 1 is out of distribution); None when the model has no such statistics.
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
    abstained: bool = False
    abstention_reasons: tuple[str, ...] = ()
    ood_score: float | None = None

    @property
    def outcome(self) -> str:
        """One of :data:`OUTCOMES`."""
        if self.abstained:
            return "indeterminate"
        return "suspected" if self.covid_suspected else "not_suspected"

    @property
    def decision(self) -> str:
        """``"COVID-19 suspected"``, ``"COVID-19 not suspected"`` or ``"Indeterminate"``."""
        if self.abstained:
            return "Indeterminate (no COVID-19 verdict: " + ", ".join(self.abstention_reasons) + ")"
        return "COVID-19 suspected" if self.covid_suspected else "COVID-19 not suspected"

    def to_dict(self) -> dict:
        """JSON-serialisable form, with the outcome, decision and research-use disclaimer."""
        d = asdict(self)
        d["abstention_reasons"] = list(self.abstention_reasons)
        d["model_members"] = list(self.model_members)
        d["outcome"] = self.outcome
        d["decision"] = self.decision
        d["disclaimer"] = DISCLAIMER
        return d
