"""Paths, ports, AE titles, pins and the error of the demo stack (shared by its modules)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from dicom_covid.errors import DicomCovidError

__all__ = [
    "DEFAULT_SAMPLES",
    "DemoError",
    "cache_dir",
    "default_state_dir",
    "pins",
]

#: This folder: the configuration templates and pins next to the code.
DEMO_DIR = Path(__file__).resolve().parent
#: The source checkout (``deploy/demo/`` -> the repository root).
ROOT = DEMO_DIR.parents[1]
ORTHANC_DEPLOY_DIR = ROOT / "deploy" / "orthanc"
SAMPLES_DIR = ROOT / "sample_dicoms"
#: Samples sent by default: two CR studies that show both outcomes with the default model, a
#: COVID-19 film ("suspected") and a non-COVID pneumonia film ("not suspected"), see
#: ``sample_dicoms/README.md``. ``--all-samples`` sends every file (also the DX and the
#: compressed ones).
DEFAULT_SAMPLES = ("covid19_cr_pa.dcm", "pneumonia_cr_pa.dcm")
ORTHANC_BIN = "/usr/sbin/Orthanc"
NGINX_BIN = "/usr/sbin/nginx"
NGINX_MIME_TYPES = Path("/etc/nginx/mime.types")
#: Preferred ports, used when free and not configured (else any free port).
PREFERRED_PORTS = {"viewer": 3000, "orthanc_http": 8042, "orthanc_dicom": 4242, "serve": 11112}
ORTHANC_AET = "ORTHANC"
SERVE_AET = "DICOMCOVID"
SENDER_AET = "DEMO"
SR_MODALITY = "SR"
#: Order in which the processes are stopped (the viewer first, the PACS last).
STOP_ORDER = ("nginx", "serve", "orthanc")
#: The demo's state file in the state folder (process ids, ports, URLs; read by ``--stop``).
STATE_FILE = "demo.json"


class DemoError(DicomCovidError):
    """The demo cannot be installed, started or stopped."""


def pins() -> dict[str, Any]:
    """The pinned versions in ``deploy/demo/pins.json`` (OHIF package, version, integrity).

    Raises
    ------
    DemoError
        When the file is missing (the demo needs a source checkout of dicom-covid).
    """
    path = DEMO_DIR / "pins.json"
    if not path.is_file():
        raise DemoError(
            f"{path} not found: 'dicom-covid demo' needs a source checkout of dicom-covid "
            "(deploy/, sample_dicoms/). Run it from a git clone installed with pip install -e ."
        )
    return json.loads(path.read_text())


def cache_dir() -> Path:
    """Where downloads are kept: ``$XDG_CACHE_HOME/dicom-covid`` (default ``~/.cache``)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "dicom-covid"


def default_state_dir() -> Path:
    """The demo's state folder: ``$XDG_STATE_HOME/dicom-covid/demo`` (``~/.local/state``)."""
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "dicom-covid" / "demo"
