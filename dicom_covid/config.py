"""Frozen configuration objects passed down the call chain.

Only the CLI reads environment variables; library code receives these objects.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "BUNDLE_ENV",
    "CHECKOUT_BUNDLE_DIR",
    "DEFAULT_BUNDLE_DIR",
    "PACKAGED_BUNDLE_DIR",
    "ReaderConfig",
    "default_bundle_dir",
    "default_data_dir",
]

_PACKAGE_DIR = Path(__file__).resolve().parent

#: Environment variable naming the bundle folder used when none is passed.
BUNDLE_ENV = "DICOM_COVID_BUNDLE"

#: ``monai_bundle/`` of a source checkout: next to the packages, beside ``pyproject.toml``. The
#: one source of truth of every model; absent where dicom-covid was installed from a wheel.
CHECKOUT_BUNDLE_DIR = _PACKAGE_DIR.parent / "monai_bundle"

#: The default model's part of the bundle inside an installed package: ``setup.py`` copies it
#: from ``monai_bundle/`` when it builds a wheel (facts, weights, the files they reference,
#: ``configs/``, licence and model card). Absent in a source checkout.
PACKAGED_BUNDLE_DIR = _PACKAGE_DIR / "_default_bundle"


def _is_checkout() -> bool:
    root = _PACKAGE_DIR.parent
    return (root / "pyproject.toml").is_file() and (
        CHECKOUT_BUNDLE_DIR / "configs" / "metadata.json"
    ).is_file()


#: The bundle shipped with this copy of dicom-covid: :data:`CHECKOUT_BUNDLE_DIR` when running
#: from a source checkout, else :data:`PACKAGED_BUNDLE_DIR`. See :func:`default_bundle_dir` for
#: the folder used when no bundle is passed.
DEFAULT_BUNDLE_DIR = CHECKOUT_BUNDLE_DIR if _is_checkout() else PACKAGED_BUNDLE_DIR


def default_bundle_dir() -> Path:
    """Return the bundle folder used when none is passed.

    In this order: ``$DICOM_COVID_BUNDLE`` when set; ``monai_bundle/`` of the source checkout
    when running from one; the default model's bundle installed inside the package.

    Returns
    -------
    pathlib.Path
        The folder; it may lack ``configs/metadata.json`` (a wrong ``$DICOM_COVID_BUNDLE``, a
        package built without its bundle), which :class:`dicom_covid.bundle.Bundle` reports.
    """
    env = os.environ.get(BUNDLE_ENV)
    if env:
        return Path(env)
    return DEFAULT_BUNDLE_DIR


def default_data_dir() -> Path:
    """Return the labelled development set folder.

    ``$DICOM_COVID_DATA`` when set, otherwise ``../shared/data/cxr`` relative to the
    project root.

    Returns
    -------
    pathlib.Path
        Folder expected to hold ``manifest.csv`` and ``images/``.
    """
    env = os.environ.get("DICOM_COVID_DATA")
    if env:
        return Path(env)
    return Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "cxr"


@dataclass(frozen=True)
class ReaderConfig:
    """What the image reader accepts.

    Attributes
    ----------
    allowed_modalities : tuple of str
        DICOM Modality values accepted (default CR, DX and the X-ray-like ``OT``/``XC`` used by
        Secondary Capture exports of radiographs).
    reject_lateral : bool
        Reject images whose View Position is LL/RL/LATERAL (default True): the models were trained
        on frontal views only.
    check_body_part : bool
        Reject images whose Body Part Examined is set to something other than the chest
        (default True).
    min_size, max_size : int
        Smallest and largest accepted Rows/Columns (defaults 64 and 16384).
    max_pixels : int
        Largest Rows x Columns x Number of Frames decoded (default 64 Mi = 8192 x 8192; the
        largest detector of a chest radiograph is about 4300 x 4300). Checked from the header
        before anything is decoded: a larger image is rejected as ``too_large``.
    max_decoded_bytes : int
        Largest decoded size, Rows x Columns x Frames x Samples x BitsAllocated / 8 (default
        256 MiB); checked from the header like ``max_pixels``. Reading an image needs about
        ten times its pixel count in bytes on top (float64 copies), so the defaults keep one
        image under about 1 GiB.
    """

    allowed_modalities: tuple[str, ...] = ("CR", "DX", "OT", "XC", "")
    reject_lateral: bool = True
    check_body_part: bool = True
    min_size: int = 64
    max_size: int = 16384
    max_pixels: int = 64 * 2**20
    max_decoded_bytes: int = 256 * 2**20
