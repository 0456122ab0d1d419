"""pacs_listener: the DICOM service of dicom-covid (``dicom-covid serve``). RESEARCH USE ONLY.

A PACS (e.g. Orthanc) forwards chest X-ray studies; the service stores them durably, groups each
study after a quiet period, analyses every frontal CR/DX image in a separate worker process and
sends one Comprehensive SR and one Grad-CAM Secondary Capture per image back into the same study.

Modules: :mod:`~pacs_listener.config` (frozen settings), :mod:`~pacs_listener.scp` (listener),
:mod:`~pacs_listener.triage` (header-only candidate check), :mod:`~pacs_listener.jobs` (SQLite job
store), :mod:`~pacs_listener.spool` (atomic files), :mod:`~pacs_listener.worker` (inference
process), :mod:`~pacs_listener.sender` (delivery) and :mod:`~pacs_listener.service` (all of it).

Nothing here imports torch or MONAI except the worker process, when it loads the model.
"""

from __future__ import annotations

import logging

from .config import (
    AllowedCaller,
    ConfigError,
    Destination,
    RetryPolicy,
    ScpConfig,
    SenderConfig,
    ServiceConfig,
    TlsConfig,
    WorkerConfig,
)

__all__ = [
    "AllowedCaller",
    "ConfigError",
    "Destination",
    "JobStore",
    "RetryPolicy",
    "ScpConfig",
    "SenderConfig",
    "Service",
    "ServiceConfig",
    "StorageSCP",
    "TlsConfig",
    "WorkerConfig",
]

logging.getLogger(__name__).addHandler(logging.NullHandler())


def __getattr__(name: str):  # lazy: keep ``import pacs_listener`` free of pynetdicom and sqlite
    if name == "JobStore":
        from .jobs import JobStore

        return JobStore
    if name == "StorageSCP":
        from .scp import StorageSCP

        return StorageSCP
    if name == "Service":
        from .service import Service

        return Service
    raise AttributeError(f"module 'pacs_listener' has no attribute {name!r}")
