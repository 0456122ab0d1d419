"""Installing a trained lung segmenter into a bundle (``dicom-covid lungs install``)."""

from __future__ import annotations

import logging
from pathlib import Path

from ..errors import BundleError

__all__ = ["install_segmenter"]

logger = logging.getLogger(__name__)


def install_segmenter(run_dir: str | Path, bundle_root: str | Path | None = None) -> Path:
    """Copy ``lung_unet.safetensors`` + ``lung_unet.json`` of a run into a bundle and register
    them as ``dicom_covid.lung_segmenter`` in ``configs/metadata.json`` (atomically, through
    :class:`~dicom_covid.bundle_writer.BundleWriter`).

    Parameters
    ----------
    run_dir : path
        Output folder of ``dicom-covid lungs train``.
    bundle_root : path, optional
        Bundle folder (default: the project's).

    Returns
    -------
    pathlib.Path
        The installed weights file.

    Raises
    ------
    BundleError
        When the run folder lacks the files.
    """
    from ..bundle_writer import BundleWriter

    run = Path(run_dir)
    src_w, src_f = run / "lung_unet.safetensors", run / "lung_unet.json"
    if not src_w.is_file() or not src_f.is_file():
        raise BundleError(
            f"{run}: lung_unet.safetensors / lung_unet.json not found; run "
            "`dicom-covid lungs train --output-dir DIR` first."
        )
    writer = BundleWriter(bundle_root)
    target = writer.install_file(src_w, "models/lung_unet.safetensors")
    writer.install_file(src_f, "models/lung_unet.json")
    writer.register_lung_segmenter(
        {"weights": "models/lung_unet.safetensors", "facts": "models/lung_unet.json"}
    )
    logger.info("installed the lung segmenter into %s", writer.root)
    return target
