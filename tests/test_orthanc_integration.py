"""End to end with a real PACS: storescu → Orthanc → Lua → dicom-covid serve → Orthanc.

Orthanc runs with ``deploy/orthanc/`` (orthanc.json + forward.lua) on loopback; the images are
sent to it with dcmtk's ``storescu``; its Lua script forwards the stable CR/DX study to a real
``dicom-covid serve`` subprocess, whose SR and SC must then appear in the same study in Orthanc.
The SR is read back with highdicom and must carry the probabilities the model gives for the
image; ``dsrdump`` must read it and ``dciodvfy`` must find no error in either object.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from pathlib import Path

import pydicom
import pytest
from orthanc import available, running_orthanc
from pacs_helpers import echo, free_port, model_bundle, sample_path, wait_until

ROOT = Path(__file__).resolve().parent.parent
CLI = ROOT / ".venv" / "bin" / "dicom-covid"
SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.33"
SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"

pytestmark = [
    pytest.mark.timeout(600),
    pytest.mark.skipif(not available(), reason="Orthanc is not installed (apt install orthanc)"),
    pytest.mark.skipif(shutil.which("storescu") is None, reason="dcmtk is not installed"),
]


def _samples() -> list[Path]:
    """An uncompressed CR and a JPEG-LS CR (each its own study), or pydicom's RG1 CR."""
    paths = [sample_path("chest_cr_mono2.dcm"), sample_path("chest_cr_jpegls.dcm")]
    return list(dict.fromkeys(paths))


def _dciodvfy_errors(path: Path) -> list[str]:
    out = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=120)
    lines = (out.stdout + out.stderr).splitlines()
    return [line for line in lines if line.startswith("Error")]


def test_orthanc_forwards_and_gets_sr_and_sc_back(tmp_path: Path) -> None:
    bundle = model_bundle(tmp_path)
    samples = _samples()
    serve_port = free_port()
    with running_orthanc(tmp_path / "orthanc", dicomcovid_port=serve_port) as pacs:
        state = tmp_path / "state"
        serve = subprocess.Popen(
            [
                str(CLI),
                "serve",
                "--ae-title",
                "DICOMCOVID",
                "--host",
                "127.0.0.1",
                "--port",
                str(serve_port),
                "--allow-ae",
                "ORTHANC@127.0.0.1",
                "--destination",
                f"ORTHANC@127.0.0.1:{pacs.dicom_port}",
                "--state-dir",
                str(state),
                "--quiet-period",
                "1",
                "--bundle",
                str(bundle),
                "--retry-base",
                "0.5",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            wait_until(
                lambda: serve.poll() is None and echo(serve_port)[0],
                240,
                interval=0.3,
                what="dicom-covid serve",
            )
            sent = subprocess.run(
                [
                    "storescu",
                    "-xt",  # propose JPEG-LS lossless besides the uncompressed syntaxes
                    "-aec",
                    "ORTHANC",
                    "-aet",
                    "MODALITY",
                    "127.0.0.1",
                    str(pacs.dicom_port),
                    *map(str, samples),
                ],
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert sent.returncode == 0, sent.stderr
            studies = {}
            for path in samples:
                uid = pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID
                studies[path] = wait_until(
                    lambda u=uid: pacs.study_id(u), 30, what="the study in Orthanc"
                )

            def series_of(study_id: str) -> list[dict]:
                return pacs.get(f"/studies/{study_id}/series")

            def complete(study_id: str) -> list[dict] | None:
                s = series_of(study_id)
                modalities = sorted(x["MainDicomTags"].get("Modality", "") for x in s)
                return s if len(s) >= 3 and "SR" in modalities else None

            for study_id in studies.values():
                wait_until(
                    lambda sid=study_id: complete(sid),
                    300,
                    interval=1.0,
                    what=f"SR and SC in study {study_id} ({pacs.log()[-2000:]})",
                )
            time.sleep(3.0)  # the results made the study unstable; nothing may be re-forwarded
            _check_results(pacs, studies, bundle, tmp_path)
            status = subprocess.run(
                [str(CLI), "status", "--state-dir", str(state), "--json"],
                capture_output=True,
                text=True,
                timeout=60,
            )
            import json

            counts = json.loads(status.stdout)
            assert counts["jobs"]["delivered"] == len(samples)
            assert counts["duplicates"] == 0 and counts["instances"]["skipped"] == 0
            assert counts["deliveries"] == {"pending": 0, "delivered": 2 * len(samples), "dead": 0}
        finally:
            serve.send_signal(signal.SIGTERM)
            out, _ = serve.communicate(timeout=120)
        assert serve.returncode == 0, out
        assert "association" in out and "opened by ORTHANC at 127.0.0.1" in out
        assert "dicom-covid: sent" in pacs.log()


def _check_results(pacs, studies: dict[Path, str], bundle: Path, tmp_path: Path) -> None:
    import highdicom as hd

    from dicom_covid.inference import Predictor
    from dicom_covid.reader import read_image
    from dicom_covid.results import read_sr_result

    predictor = Predictor(bundle)
    for source, study_id in studies.items():
        src = pydicom.dcmread(source, stop_before_pixels=True)
        series = pacs.get(f"/studies/{study_id}/series")
        assert len(series) == 3, [s["MainDicomTags"] for s in series]  # CR + SR + SC, once each
        by_class: dict[str, Path] = {}
        for s in series:
            (instance_id,) = s["Instances"]
            info = pacs.get(f"/instances/{instance_id}/simplified-tags")
            cls = info["SOPClassUID"]
            if cls in (SR_CLASS, SC_CLASS):
                path = tmp_path / f"{study_id}-{'sr' if cls == SR_CLASS else 'sc'}.dcm"
                path.write_bytes(pacs.get_bytes(f"/instances/{instance_id}/file"))
                by_class[cls] = path
        assert set(by_class) == {SR_CLASS, SC_CLASS}
        sr_ds = pydicom.dcmread(by_class[SR_CLASS])
        sc_ds = pydicom.dcmread(by_class[SC_CLASS])
        for ds in (sr_ds, sc_ds):
            assert ds.StudyInstanceUID == src.StudyInstanceUID
            assert ds.PatientID == src.PatientID
        # the SR, read with highdicom, holds what the model gives for this image
        sr = hd.sr.ComprehensiveSR.from_dataset(sr_ds)
        assert len(sr.content.get_planar_roi_measurement_groups()) == 1
        got = read_sr_result(sr_ds)
        want = predictor.predict(read_image(source)).probabilities
        names = {"covid": "P(COVID-19)", "normal": "P(normal)", "pneumonia": "P(other pneumonia)"}
        for label, p in want.items():
            assert abs(got[names[label]] - p) < 1e-3, (label, got, want)
        assert got["referenced_sop_instance_uid"] == src.SOPInstanceUID
        dump = subprocess.run(
            ["dsrdump", str(by_class[SR_CLASS])], capture_output=True, text=True, timeout=60
        )
        assert dump.returncode == 0, dump.stderr
        assert "Comprehensive SR" in dump.stdout
        if shutil.which("dciodvfy"):
            for path in by_class.values():
                assert _dciodvfy_errors(path) == [], path.name
