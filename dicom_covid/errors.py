"""Exceptions raised by dicom-covid.

Every error says what was found and what to do about it. The tree::

    DicomCovidError
    ├── InputRejected          an input cannot be classified (not DICOM, colour, CT, lateral)
    ├── BundleError            the model bundle is missing, incomplete or inconsistent
    ├── DataError              a training/evaluation manifest or data folder is unusable
    ├── ResultEncodingError    a result object (SR, Secondary Capture) could not be built
    └── DeliveryError          results could not be sent to a DICOM destination

``InputRejected`` carries a short machine-readable ``reason`` (for example ``"lateral_view"``) next
to its human-readable message, so callers such as the PACS listener can map it to a job state.
"""

from __future__ import annotations

__all__ = [
    "BundleError",
    "DataError",
    "DeliveryError",
    "DicomCovidError",
    "InputRejected",
    "ResultEncodingError",
]


class DicomCovidError(Exception):
    """Base class of every error raised on purpose by dicom-covid."""


class InputRejected(DicomCovidError):
    """An input image cannot be classified.

    Parameters
    ----------
    reason : str
        Machine-readable reason code, e.g. ``"not_dicom"``, ``"no_pixel_data"``, ``"colour"``,
        ``"wrong_modality"``, ``"lateral_view"``, ``"bad_dimensions"``, ``"decode_failed"``.
    message : str
        What was found and how to fix it.
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message

    def __reduce__(self):  # keep picklable across process boundaries
        return (type(self), (self.reason, self.message))


class BundleError(DicomCovidError):
    """The model bundle is missing, incomplete or does not match the code."""


class DataError(DicomCovidError):
    """A manifest or data folder used for training or evaluation is unusable."""


class ResultEncodingError(DicomCovidError):
    """A DICOM result object (SR or Secondary Capture) could not be built."""


class DeliveryError(DicomCovidError):
    """Results could not be delivered to a DICOM destination."""
