"""Helpers of the kill -9 tests, on one machine (``test_crash_safety.py``) and across nodes
(``test_scale_out.py``): cheap chest images, a fast model bundle, dcmtk's ``storescu`` as the
sending modality, and what a destination received per source image.
"""

from __future__ import annotations

import json
import re
import subprocess
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pydicom
from pacs_helpers import PATIENT_ID, PATIENT_NAME, sample_path
from pydicom.uid import generate_uid

__all__ = [
    "SC_CLASS",
    "SR_CLASS",
    "STORESCU",
    "acknowledged",
    "fast_bundle",
    "results_per_source",
    "small_cr",
    "storescu",
]

#: SOP classes of our results: Comprehensive SR and Secondary Capture.
SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.33"
SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"
STORESCU = "storescu"


def small_cr(study: str, series: str) -> pydicom.Dataset:
    """The sample chest CR downsampled to 256 x 256, with fresh SOP Instance UID."""
    ds = pydicom.dcmread(sample_path("chest_cr_mono2.dcm"))
    arr = ds.pixel_array[::3, ::3][11:267, 2:258]
    assert arr.shape == (256, 256)
    ds.Rows, ds.Columns = arr.shape
    ds.PixelData = np.ascontiguousarray(arr).tobytes()
    for kw in ("PixelSpacing", "ImagerPixelSpacing"):
        if kw in ds:
            setattr(ds, kw, [round(float(v) * 3, 4) for v in ds[kw].value])
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.PatientName, ds.PatientID = PATIENT_NAME, PATIENT_ID
    return ds


def fast_bundle(root: Path, input_size: int = 64) -> Path:
    """The throw-away bundle with the model's input size lowered (cheap inference)."""
    from helpers import make_throwaway_bundle

    make_throwaway_bundle(root)
    facts = root / "models" / "efficientnet_lite0.json"
    data = json.loads(facts.read_text())
    data["input_size"] = input_size
    facts.write_text(json.dumps(data, indent=2))
    return root


def acknowledged(log: str) -> set[str]:
    """Files ``storescu -v`` got a success response for."""
    done, current = set(), None
    for line in log.splitlines():
        m = re.match(r"I: Sending file: (.+)$", line.strip())
        if m:
            current = m.group(1)
        elif "Received Store Response (Success)" in line and current:
            done.add(current)
            current = None
    return done


def storescu(files: list[Path], port: int, log: Path) -> subprocess.Popen:
    cmd = [STORESCU, "-v", "-aet", "ORTHANC", "-aec", "DICOMCOVID", "-to", "30", "-ta", "30"]
    cmd += ["127.0.0.1", str(port), *map(str, files)]
    out = log.open("w")
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=out)


def results_per_source(received: list[pydicom.Dataset]) -> dict[str, Counter]:
    """Distinct result objects (SR, SC) per source image among what a destination received."""
    per_source: dict[str, Counter] = defaultdict(Counter)
    seen: set[str] = set()
    for ds in received:
        uid, cls = str(ds.SOPInstanceUID), str(ds.SOPClassUID)
        if uid in seen:
            continue
        seen.add(uid)
        if cls == SR_CLASS:
            ev = ds.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
            source = str(ev.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
        else:
            assert cls == SC_CLASS, f"unexpected result class {cls}"
            source = str(ds.SourceImageSequence[0].ReferencedSOPInstanceUID)
        per_source[source][cls] += 1
    return per_source
