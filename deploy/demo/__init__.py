"""The demo stack of ``dicom-covid demo``: Orthanc, the OHIF viewer and dicom-covid on one machine.

What runs (all on loopback, each a child process with its log in the state folder)::

    storescu ──C-STORE──► Orthanc ──(forward.lua, stable study)──► dicom-covid serve
                            ▲  │                                          │
                            │  └── DICOMweb ◄── nginx ◄── browser (OHIF)  │
                            └──────────────── SR + heat-map SC ◄──────────┘

* **Orthanc** (Debian package) with ``deploy/orthanc/orthanc.json`` + ``forward.lua`` and the
  overrides in ``deploy/demo/orthanc-overrides.json`` (DICOMweb plugin, short ``StableAge``);
* **nginx** in the foreground with ``deploy/demo/nginx.conf.template``: it serves the prebuilt
  OHIF viewer (``npm pack @ohif/app@<pinned>``, ``dist/`` only, kept in
  ``~/.cache/dicom-covid/ohif-<version>/``), ``deploy/demo/app-config.js`` and proxies
  ``/dicom-web/`` to Orthanc;
* **dicom-covid serve**, to which Orthanc forwards each stable CR/DX study and which sends the
  Comprehensive SR and the Grad-CAM Secondary Capture back into the same study.

This is deployment code, not part of the importable library: it lives in the source checkout
next to its templates and is loaded by path by the thin command ``dicom_covid/cli/demo.py``
(:func:`dicom_covid.cli.demo.load_stack`). Modules:

* :mod:`.common`: paths, ports, AE titles, :class:`DemoError`, the pins (``pins.json``);
* :mod:`.install`: ``apt-get`` packages and the OHIF download (:func:`ensure_installed`);
* :mod:`.processes`: :class:`DemoPorts`, finding and stopping a recorded demo
  (:func:`running_demo`, :func:`stop_recorded`);
* :mod:`.stack`: :class:`DemoStack` (configurations, start, send, wait for results, stop), the
  Python API that ``tests/test_viewer.py`` drives;
* :mod:`.session`: :func:`run`, one foreground run of the command.

RESEARCH USE ONLY - NOT FOR DIAGNOSTIC USE.
"""

from __future__ import annotations

from .common import DEFAULT_SAMPLES, DemoError, cache_dir, default_state_dir, pins
from .install import ensure_installed, ensure_ohif, install_apt_packages, missing_apt_packages
from .processes import DemoPorts, running_demo, stop_recorded
from .session import run
from .stack import DemoStack, StudyResults

__all__ = [
    "DEFAULT_SAMPLES",
    "DemoError",
    "DemoPorts",
    "DemoStack",
    "StudyResults",
    "cache_dir",
    "default_state_dir",
    "ensure_installed",
    "ensure_ohif",
    "install_apt_packages",
    "missing_apt_packages",
    "pins",
    "run",
    "running_demo",
    "stop_recorded",
]
