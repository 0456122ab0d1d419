"""The Key Object Selection that flags a suspected image: built, validated, sent, shown in Orthanc.

:func:`dicom_covid.results.kos.build_kos` is checked on a real radiograph (pydicom's RG1 CR) with
``dciodvfy``; then the worker (a real model from a throw-away bundle: a low threshold makes its
outcome "suspected", a high one "not suspected") writes it next to the SR and SC only for the
suspected image, and the real sender delivers it by STOW-RS to Orthanc's DICOMweb plugin, which
must store it in the image's study.
"""

from __future__ import annotations

import io
import shutil
import subprocess
from pathlib import Path

import orthanc as orthanc_mod
import pydicom
import pytest
from helpers import make_throwaway_bundle
from pacs_helpers import chest_cr, free_port, wait_until
from pydicom.data import get_testdata_file
from pydicom.uid import KeyObjectSelectionDocumentStorage

from dicom_covid.errors import ResultEncodingError
from dicom_covid.prediction import Prediction
from dicom_covid.results.kos import KOS_SERIES_NUMBER, build_kos
from pacs_listener.config import SenderConfig, StowDestination
from pacs_listener.jobs import JobStore
from pacs_listener.sender import Sender
from pacs_listener.spool import Spool
from pacs_listener.worker import JobProcessor, load_analysis

pytestmark = pytest.mark.timeout(300)


def _prediction(score: float, threshold: float = 0.5, abstained: bool = False) -> Prediction:
    return Prediction(
        probabilities={"covid": score, "normal": 1 - score, "pneumonia": 0.0},
        label="covid" if score >= 0.5 else "normal",
        covid_score=score,
        covid_threshold=threshold,
        covid_suspected=score >= threshold and not abstained,
        model_name="efficientnet_lite0",
        model_title="EfficientNet-Lite0",
        bundle_version="0.1.0",
        abstained=abstained,
        abstention_reasons=("uncertain",) if abstained else (),
    )


def _dciodvfy(path: Path) -> None:
    if shutil.which("dciodvfy") is None:
        pytest.skip("dciodvfy (dicom3tools) is not installed")
    run = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=120)
    output = run.stdout + run.stderr
    errors = [line for line in output.splitlines() if line.startswith("Error")]
    assert not errors, f"dciodvfy {path.name}:\n{output}"


def test_kos_lists_the_suspected_image_and_is_dciodvfy_clean(tmp_path: Path) -> None:
    source = pydicom.dcmread(get_testdata_file("RG1_UNCR.dcm"))
    kos = build_kos(source, _prediction(0.9))
    path = tmp_path / "ko.dcm"
    kos.save_as(path, enforce_file_format=True)
    _dciodvfy(path)
    back = pydicom.dcmread(path)
    assert back.SOPClassUID == KeyObjectSelectionDocumentStorage
    assert back.StudyInstanceUID == source.StudyInstanceUID
    assert back.SeriesInstanceUID != source.SeriesInstanceUID
    assert back.SeriesNumber == KOS_SERIES_NUMBER
    assert "research only" in back.SeriesDescription
    assert back.PatientID == source.PatientID and back.PatientName == source.PatientName
    title = back.ConceptNameCodeSequence[0]
    assert (title.CodeValue, title.CodingSchemeDesignator) == ("113000", "DCM")
    assert title.CodeMeaning == "Of Interest"
    [evidence] = back.CurrentRequestedProcedureEvidenceSequence
    [series] = evidence.ReferencedSeriesSequence
    assert series.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    texts = [i.TextValue for i in back.ContentSequence if i.ValueType == "TEXT"]
    images = [i for i in back.ContentSequence if i.ValueType == "IMAGE"]
    assert len(images) == 1
    assert images[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert any("RESEARCH USE ONLY" in t and "COVID-19 suspected" in t for t in texts)
    # the same image and model give the same instance (at-least-once delivery keeps one copy)
    assert build_kos(source, _prediction(0.9)).SOPInstanceUID == back.SOPInstanceUID


@pytest.mark.parametrize(
    "prediction", [_prediction(0.2), _prediction(0.51, abstained=True)], ids=["not", "indet"]
)
def test_kos_is_refused_unless_suspected(prediction: Prediction) -> None:
    source = pydicom.dcmread(get_testdata_file("RG1_UNCR.dcm"))
    with pytest.raises(ResultEncodingError, match="only 'suspected'"):
        build_kos(source, prediction)


def _job(store: JobStore, spool: Spool) -> tuple[int, str, str]:
    ds = chest_cr()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    study = str(ds.StudyInstanceUID)
    path = spool.write(study, ds.SOPInstanceUID, buf.getvalue())
    store.add_instance(ds.SOPInstanceUID, study, path=path)
    [job] = store.group_stable_studies(0)
    return job.id, study, str(ds.SOPInstanceUID)


@pytest.mark.skipif(
    not orthanc_mod.dicomweb_available(), reason="Orthanc or its DICOMweb plugin is missing"
)
def test_worker_sends_kos_only_for_suspected_and_orthanc_stores_it(tmp_path: Path) -> None:
    folder = tmp_path / "orthanc"
    with orthanc_mod.running_orthanc(folder, free_port(), lua=False, dicomweb=True) as pacs:
        url = f"{pacs.url}/dicom-web/studies"
        dest = StowDestination(url)
        target = str(dest)
        store = JobStore(tmp_path / "state" / "jobs.sqlite")
        spool = Spool(tmp_path / "state" / "spool")
        sender = Sender(store, SenderConfig(stowrs=(dest,)))
        studies = {}
        for name, threshold in (("suspected", 0.0), ("not_suspected", 1.0)):
            bundle = make_throwaway_bundle(tmp_path / name, covid_threshold=threshold)
            analyse = load_analysis(bundle, None)
            proc = JobProcessor(
                store, tmp_path / "state" / "results", [target], analyse, kos_for_suspected=True
            )
            job_id, study, image = _job(store, spool)
            assert proc.process(store.claim_job("w")) == "results_written"
            kinds = sorted(r.kind for r in store.results(job_id))
            studies[name] = (study, image, kinds)
        assert studies["suspected"][2] == ["ko", "sc", "sr"]
        assert studies["not_suspected"][2] == ["sc", "sr"]
        wait_until(
            lambda: sender.deliver_due(target) == 0 and not store.due_deliveries([target]),
            30,
            what="every result delivered",
        )
        for name, (study, _image, kinds) in studies.items():
            sid = pacs.study_id(study)
            classes = sorted(
                pacs.get(f"/instances/{i['ID']}/simplified-tags")["SOPClassUID"]
                for i in pacs.get(f"/studies/{sid}/instances")
            )
            has_kos = str(KeyObjectSelectionDocumentStorage) in classes
            assert has_kos == (name == "suspected"), (name, classes)
            assert len(classes) == len(kinds)
        store.close()
