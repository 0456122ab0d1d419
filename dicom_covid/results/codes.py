"""Every coded concept dicom-covid writes into DICOM, in one place, with its source.

Standard codes come from SNOMED CT (``SCT``), DICOM (``DCM``) and UCUM. Those that pydicom's
code dictionary knows are taken from it (``pydicom.sr.codedict.codes``) so that a typo cannot
creep in; the SNOMED CT codes it lacks (COVID-19, pneumonia, plain chest X-ray) are written out
with their SNOMED CT concept ids and checked by the tests.

Where no standard concept fits (a per-class probability whose *meaning* must read well in a
viewer: OHIF prints "meaning: value unit"), the code is private, in the coding scheme
:data:`SCHEME` (``99DCOVID``), declared in each object's Coding Scheme Identification Sequence
through :data:`CODING_SCHEME`.
"""

from __future__ import annotations

from highdicom.coding_schemes import CodingSchemeIdentificationItem
from highdicom.sr import CodedConcept
from pydicom.sr.codedict import codes

__all__ = [
    "ALGORITHM_FAMILY",
    "CODING_SCHEME",
    "COVID19",
    "DISCLAIMER_COMMENT",
    "INDETERMINATE",
    "MEASUREMENT_REPORT_TITLE",
    "NORMAL",
    "NOT_SUSPECTED",
    "PERCENT",
    "PNEUMONIA",
    "PROBABILITY_CODES",
    "PROCEDURE_CHEST_XRAY",
    "SCHEME",
    "SCREENING_OUTCOME",
    "SCREENING_RESULT",
    "SUSPECTED",
    "THRESHOLD",
    "decision_code",
    "outcome_code",
    "private",
]

#: Coding Scheme Designator of dicom-covid's private codes ("99" prefix: a local scheme, PS3.3
#: Section 8.2).
SCHEME = "99DCOVID"

#: Coding Scheme Identification Sequence item declaring :data:`SCHEME`.
CODING_SCHEME = CodingSchemeIdentificationItem(
    designator=SCHEME,
    name="dicom-covid research codes",
    version="1",
    responsible_organization="dicom-covid developers",
)


def private(value: str, meaning: str) -> CodedConcept:
    """A concept in the private scheme :data:`SCHEME` (value <= 16, meaning <= 64 characters)."""
    if len(value) > 16 or len(meaning) > 64:
        raise ValueError(f"private code {value!r} / {meaning!r} exceeds 16 / 64 characters")
    return CodedConcept(value=value, scheme_designator=SCHEME, meaning=meaning)


# --- findings (SNOMED CT) ---------------------------------------------------------------
#: SNOMED CT 840539006 "Disease caused by severe acute respiratory syndrome coronavirus 2
#: (disorder)", synonym "COVID-19" (SNOMED International, 2020 COVID-19 release).
COVID19 = CodedConcept("840539006", "SCT", "COVID-19")
#: SNOMED CT 233604007 "Pneumonia (disorder)".
PNEUMONIA = CodedConcept("233604007", "SCT", "Pneumonia")
#: SNOMED CT 17621005 "Normal" (qualifier value); in pydicom's dictionary (CID 222 and others).
NORMAL = CodedConcept.from_code(codes.SCT.Normal)
#: SNOMED CT 415684004 "Suspected" (qualifier value); in pydicom's dictionary.
SUSPECTED = CodedConcept.from_code(codes.SCT.Suspected)
#: SNOMED CT 82334004 "Indeterminate" (qualifier value); in pydicom's dictionary: the model
#: abstained (no COVID-19 verdict).
INDETERMINATE = CodedConcept.from_code(codes.SCT.Indeterminate)
#: No SNOMED CT "not suspected" qualifier was verifiable offline: private.
NOT_SUSPECTED = private("not-suspected", "Not suspected")

#: SNOMED CT 399208008 "Plain X-ray of chest (procedure)": the procedure reported.
PROCEDURE_CHEST_XRAY = CodedConcept("399208008", "SCT", "Plain chest X-ray")
#: DCM 126000 "Imaging Measurement Report" (CID 7021), the default TID 1500 title.
MEASUREMENT_REPORT_TITLE = CodedConcept.from_code(codes.DCM.ImagingMeasurementReport)
#: DCM 123110 "Artificial Intelligence" (CID 7162 Algorithm Families).
ALGORITHM_FAMILY = CodedConcept.from_code(codes.DCM.ArtificialIntelligence)
#: DCM 121106 "Comment": the research-use disclaimer as a TEXT item.
DISCLAIMER_COMMENT = CodedConcept.from_code(codes.DCM.Comment)
#: UCUM "%" (percent): probabilities and the threshold are written as 0-100 %.
PERCENT = CodedConcept.from_code(codes.UCUM.Percent)

# --- measurements whose meaning a viewer prints (private) ----------------------------------
#: Probability of each bundle label, by label.
PROBABILITY_CODES: dict[str, CodedConcept] = {
    "covid": private("p-covid", "P(COVID-19)"),
    "normal": private("p-normal", "P(normal)"),
    "pneumonia": private("p-pneumonia", "P(other pneumonia)"),
}
#: Operating threshold on P(COVID-19).
THRESHOLD = private("covid-threshold", "COVID-19 threshold")
#: The screening decision as a measurement name (its value is P(COVID-19) in %), so that a
#: viewer that prints only measurements (OHIF) shows the decision.
SCREENING_RESULT = {
    True: private("covid-susp", "AI: COVID-19 SUSPECTED (research only)"),
    False: private("covid-not-susp", "AI: COVID-19 not suspected (research only)"),
}


#: The screening outcome (see :data:`dicom_covid.prediction.OUTCOMES`) as a measurement name.
SCREENING_OUTCOME = {
    "suspected": SCREENING_RESULT[True],
    "not_suspected": SCREENING_RESULT[False],
    "indeterminate": private("covid-indet", "AI: INDETERMINATE, no COVID-19 verdict (research)"),
}


def outcome_code(outcome: str) -> CodedConcept:
    """Value of the COVID-19 evaluation: Suspected, Not suspected or Indeterminate."""
    return {"suspected": SUSPECTED, "not_suspected": NOT_SUSPECTED}.get(outcome, INDETERMINATE)


def decision_code(suspected: bool) -> CodedConcept:
    """:data:`SUSPECTED` or :data:`NOT_SUSPECTED`, the value of the COVID-19 evaluation."""
    return SUSPECTED if suspected else NOT_SUSPECTED
