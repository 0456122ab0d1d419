"""dicom-covid: DICOM-aware COVID-19 screening of chest X-rays. RESEARCH USE ONLY.

The public API is small: read an image, classify it with a bundle model.

>>> from dicom_covid import Predictor, read_image
>>> prediction = Predictor().predict(read_image("chest.dcm"))  # doctest: +SKIP
"""

from __future__ import annotations

import logging

from .errors import (
    BundleError,
    DataError,
    DeliveryError,
    DicomCovidError,
    InputRejected,
    ResultEncodingError,
)


def _version() -> str:
    """The installed distribution's version (``pyproject.toml`` is the one place it is written)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("dicom-covid")
    except PackageNotFoundError:  # imported from a source tree that was never installed
        return "0+unknown"


__version__ = _version()

__all__ = [
    "DISCLAIMER",
    "Bundle",
    "BundleError",
    "DataError",
    "DeliveryError",
    "DicomCovidError",
    "InputRejected",
    "Prediction",
    "Predictor",
    "ResultEncodingError",
    "XrayImage",
    "__version__",
    "read_image",
]

logging.getLogger(__name__).addHandler(logging.NullHandler())


def __getattr__(name: str):  # lazy: importing the package must not import torch
    if name in ("Prediction", "DISCLAIMER"):
        from . import prediction

        return getattr(prediction, name)
    if name == "Predictor":
        from .inference import Predictor

        return Predictor
    if name == "Bundle":
        from .bundle import Bundle

        return Bundle
    if name in ("XrayImage", "read_image"):
        from . import reader

        return getattr(reader, name)
    raise AttributeError(f"module 'dicom_covid' has no attribute {name!r}")
