"""Installing a trained lung segmenter into a bundle (``dicom-covid lungs install``)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from ..bundle import Bundle
from ..errors import BundleError

__all__ = ["install_segmenter"]

logger = logging.getLogger(__name__)


def install_segmenter(run_dir: str | Path, bundle_root: str | Path | None = None) -> Path:
    """Copy ``lung_unet.safetensors`` + ``lung_unet.json`` of a run into a bundle and register
    them as ``dicom_covid.lung_segmenter`` in ``configs/metadata.json``.

    Returns
    -------
    pathlib.Path
        The installed weights file.

    Raises
    ------
    BundleError
        When the run folder lacks the files.
    """
    import shutil

    run = Path(run_dir)
    src_w, src_f = run / "lung_unet.safetensors", run / "lung_unet.json"
    if not src_w.is_file() or not src_f.is_file():
        raise BundleError(
            f"{run}: lung_unet.safetensors / lung_unet.json not found; run "
            "`dicom-covid lungs train --output-dir DIR` first."
        )
    bundle = Bundle(bundle_root)
    models = bundle.root / "models"
    models.mkdir(exist_ok=True)
    shutil.copyfile(src_w, models / "lung_unet.safetensors")
    shutil.copyfile(src_f, models / "lung_unet.json")
    meta_path = bundle.root / "configs" / "metadata.json"
    meta = json.loads(meta_path.read_text())  # re-read: others may have changed it
    meta["dicom_covid"]["lung_segmenter"] = {
        "weights": "models/lung_unet.safetensors",
        "facts": "models/lung_unet.json",
    }
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")
    logger.info("installed the lung segmenter into %s", bundle.root)
    return models / "lung_unet.safetensors"
