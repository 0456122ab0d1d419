"""DICOM result objects: TID 1500 Comprehensive SR and heat-map Secondary Capture.

Writers are tested by writing to disk, reading back (pydicom, highdicom) and running the DCMTK
and dicom3tools checkers (``dsrdump``, ``dciodvfy``) on the files.
"""

from __future__ import annotations

import copy
import shutil
import subprocess
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from helpers import make_throwaway_bundle
from matplotlib.path import Path as PolyPath
from pydicom.data import get_testdata_file
from pydicom.sr.codedict import codes as pydicom_codes
from pydicom.uid import ComprehensiveSRStorage

from dicom_covid.errors import InputRejected, ResultEncodingError
from dicom_covid.inference import DISCLAIMER, Predictor
from dicom_covid.reader import read_dataset
from dicom_covid.results import ResultSet, analyse, build_heatmap_sc, build_sr, codes
from dicom_covid.results.common import SC_SERIES_NUMBER, SR_SERIES_NUMBER, source_header
from dicom_covid.results.sc import BANNER, DISPLAY_SIZE, display_shape
from dicom_covid.results.sr import read_sr_result

SAMPLES = Path(__file__).resolve().parent.parent / "sample_dicoms"
RG1 = get_testdata_file("RG1_UNCR.dcm")


def _dciodvfy(path: Path) -> None:
    if shutil.which("dciodvfy") is None:
        pytest.skip("dciodvfy (dicom3tools) is not installed")
    run = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=120)
    output = run.stdout + run.stderr
    errors = [line for line in output.splitlines() if line.startswith("Error")]
    assert not errors, f"dciodvfy {path.name}:\n{output}"


def _dsrdump(path: Path) -> str:
    if shutil.which("dsrdump") is None:
        pytest.skip("dsrdump (DCMTK) is not installed")
    run = subprocess.run(["dsrdump", str(path)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, f"dsrdump {path.name} failed:\n{run.stdout}\n{run.stderr}"
    return run.stdout


@pytest.fixture(scope="module")
def predictor(tmp_path_factory) -> Predictor:
    # A low threshold makes the random model's result "suspected" for RG1.
    root = tmp_path_factory.mktemp("bundle")
    return Predictor(make_throwaway_bundle(root, covid_threshold=0.01))


@pytest.fixture(scope="module")
def source() -> pydicom.Dataset:
    return pydicom.dcmread(RG1)


@pytest.fixture(scope="module")
def result(source, predictor) -> ResultSet:
    return analyse(source, predictor)


@pytest.fixture(scope="module")
def written(result, tmp_path_factory) -> tuple[Path, Path]:
    out = tmp_path_factory.mktemp("results")
    sr_path, sc_path = out / "sr.dcm", out / "sc.dcm"
    result.sr.save_as(sr_path, enforce_file_format=True)
    result.sc.save_as(sc_path, enforce_file_format=True)
    return sr_path, sc_path


# --- SR ------------------------------------------------------------------------------------


def test_sr_round_trips_the_prediction(result, written, source):
    sr_path, _ = written
    doc = hd.sr.srread(sr_path)
    assert isinstance(doc, hd.sr.ComprehensiveSR)
    groups = doc.content.get_planar_roi_measurement_groups()
    assert len(groups) == 1
    values = {m.name.meaning: float(m.value) for m in groups[0].get_measurements()}
    pred = result.prediction
    assert values["P(COVID-19)"] == pytest.approx(100 * pred.probabilities["covid"], abs=1e-3)
    assert values["P(normal)"] == pytest.approx(100 * pred.probabilities["normal"], abs=1e-3)
    assert values["P(other pneumonia)"] == pytest.approx(
        100 * pred.probabilities["pneumonia"], abs=1e-3
    )
    assert values["COVID-19 threshold"] == pytest.approx(1.0)
    assert pred.covid_suspected
    assert values["AI: COVID-19 SUSPECTED (research only)"] == pytest.approx(
        100 * pred.covid_score, abs=1e-3
    )
    assert len(values) == 5, "OHIF shows at most five measurement lines"
    units = {m.unit.value for m in groups[0].get_measurements()}
    assert units == {"%"}
    evaluations = {q.name.value: q.value.meaning for q in groups[0].get_qualitative_evaluations()}
    assert evaluations["840539006"] == "Suspected"
    assert groups[0].finding_type.value == "840539006"

    back = read_sr_result(pydicom.dcmread(sr_path))
    assert back["P(COVID-19)"] == pytest.approx(pred.covid_score, abs=1e-5)
    assert back["decision"] == "Suspected"
    assert back["referenced_sop_instance_uid"] == source.SOPInstanceUID


def test_sr_references_the_source_in_a_new_series_of_its_study(written, source):
    sr = pydicom.dcmread(written[0])
    assert sr.SOPClassUID == ComprehensiveSRStorage
    assert sr.StudyInstanceUID == source.StudyInstanceUID
    assert sr.SeriesInstanceUID != source.SeriesInstanceUID
    assert sr.SOPInstanceUID != source.SOPInstanceUID
    assert sr.SeriesNumber == SR_SERIES_NUMBER
    assert "research only" in sr.SeriesDescription
    assert sr.Modality == "SR"
    assert sr.VerificationFlag == "UNVERIFIED"
    assert sr.CompletionFlag == "COMPLETE"
    for keyword in (
        "PatientName",
        "PatientID",
        "PatientBirthDate",
        "PatientSex",
        "StudyID",
        "AccessionNumber",
        "StudyDate",
        "StudyDescription",
    ):
        assert sr.get(keyword) == source.get(keyword), keyword
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0]
    assert evidence.StudyInstanceUID == source.StudyInstanceUID
    ref = evidence.ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert ref.ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert [c.CodingSchemeDesignator for c in sr.CodingSchemeIdentificationSequence] == [
        codes.SCHEME
    ]
    equipment = [e.Manufacturer for e in sr.ContributingEquipmentSequence]
    assert "dicom-covid developers" in equipment
    # the source's Pixel Spacing is 0\0: nothing may copy it
    assert not [e for e in sr.iterall() if e.keyword in ("PixelSpacing", "ImagerPixelSpacing")]


def test_sr_region_is_the_closed_hot_region_outline(result, written, source):
    doc = hd.sr.srread(written[0])
    group = doc.content.get_planar_roi_measurement_groups()[0]
    region = group.roi
    assert region.GraphicType == "POLYLINE"
    pts = np.asarray(region.GraphicData, dtype=float).reshape(-1, 2)
    assert np.array_equal(pts[0], pts[-1]), "the polyline must be closed"
    assert pts[:, 0].min() >= 0 and pts[:, 0].max() <= source.Columns
    assert pts[:, 1].min() >= 0 and pts[:, 1].max() <= source.Rows
    assert np.allclose(pts, result.outline, atol=1e-3)
    peak = np.unravel_index(np.argmax(result.heatmap), result.heatmap.shape)
    assert PolyPath(pts).contains_point((peak[1] + 0.5, peak[0] + 0.5))
    image_ref = region.ContentSequence[0].ReferencedSOPSequence[0]
    assert image_ref.ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert image_ref.ReferencedSOPClassUID == source.SOPClassUID


def test_sr_identifies_the_algorithm_and_says_research_only(written):
    text = _dsrdump(written[0])
    assert 'Algorithm Name")="dicom-covid"' in text
    assert "backbone=efficientnet_lite0" in text
    assert "bundle_version=" in text
    assert '(123110,DCM,"Artificial Intelligence")' in text
    assert "UNVERIFIED" in text
    assert "Imaging Measurement Report" in text
    assert 'TEXT:(,,"Comment")="RESEARCH USE ONLY' in text
    ds = pydicom.dcmread(written[0])
    comments = [
        item.TextValue
        for container in ds.ContentSequence
        if container.ValueType == "CONTAINER"
        for item in container.get("ContentSequence", [])
        if item.ValueType == "TEXT"
    ]
    assert any(DISCLAIMER in c for c in comments)


def test_sr_is_valid_dicom(written):
    _dsrdump(written[0])
    _dciodvfy(written[0])


# --- SC ------------------------------------------------------------------------------------


def test_sc_is_the_overlay_at_display_resolution(result, written, source):
    sc = pydicom.dcmread(written[1])
    rows, cols = display_shape(source.Rows, source.Columns)
    assert max(rows, cols) == DISPLAY_SIZE < max(source.Rows, source.Columns)
    assert abs(rows / cols - source.Rows / source.Columns) < 2 / DISPLAY_SIZE, "aspect kept"
    assert (sc.Rows, sc.Columns) == (rows, cols)
    assert sc.SamplesPerPixel == 3 and sc.PhotometricInterpretation == "RGB"
    assert sc.BitsAllocated == 8
    assert sc.BurnedInAnnotation == "YES"
    assert list(sc.ImageType) == ["DERIVED", "SECONDARY"]
    assert sc.StudyInstanceUID == source.StudyInstanceUID
    assert sc.SeriesInstanceUID not in (source.SeriesInstanceUID, result.sr.SeriesInstanceUID)
    assert sc.SeriesNumber == SC_SERIES_NUMBER
    assert "Grad-CAM" in sc.SeriesDescription and "research only" in sc.SeriesDescription
    assert sc.PatientID == source.PatientID and sc.PatientName == source.PatientName
    assert sc.StudyDescription == source.StudyDescription
    ref = sc.SourceImageSequence[0]
    assert ref.ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert ref.ReferencedSOPClassUID == source.SOPClassUID
    assert "gradcam" in sc.DerivationDescription and DISCLAIMER in sc.DerivationDescription
    assert "PixelSpacing" not in sc, "0\\0 spacing of the source must not be copied"
    image = hd.imread(written[1])
    assert image.SOPInstanceUID == sc.SOPInstanceUID
    pixels = sc.pixel_array
    assert pixels.shape == (rows, cols, 3)
    # the middle of the image is the overlay: the hottest pixel is redder than it is blue
    mid = slice(source.Rows // 5, 4 * source.Rows // 5)
    r, c = np.unravel_index(np.argmax(result.heatmap[mid]), result.heatmap[mid].shape)
    hot = pixels[
        round((r + source.Rows // 5) * rows / source.Rows), round(c * cols / source.Columns)
    ]
    assert int(hot[0]) > int(hot[2])


def test_sc_geometry_describes_its_own_pixels(source, result, tmp_path):
    spaced = copy.deepcopy(source)
    spaced.PixelSpacing = [0.15, 0.2]
    image = read_dataset(spaced)
    sc = build_heatmap_sc(spaced, image, result.prediction, result.heatmap)
    rows, cols = display_shape(source.Rows, source.Columns)
    assert (sc.Rows, sc.Columns) == (rows, cols)
    # the SC covers the same field as the source: spacing x pixels is the same length
    assert float(sc.PixelSpacing[0]) * rows == pytest.approx(0.15 * source.Rows, rel=1e-4)
    assert float(sc.PixelSpacing[1]) * cols == pytest.approx(0.2 * source.Columns, rel=1e-4)
    sc.save_as(tmp_path / "sc.dcm", enforce_file_format=True)
    _dciodvfy(tmp_path / "sc.dcm")
    full = build_heatmap_sc(spaced, image, result.prediction, result.heatmap, max_side=None)
    assert (full.Rows, full.Columns) == (source.Rows, source.Columns)
    assert [float(v) for v in full.PixelSpacing] == [0.15, 0.2]
    small = display_shape(300, 200)
    assert small == (300, 200), "small sources keep their size"


def test_sc_has_burned_in_disclaimer(written):
    pixels = pydicom.dcmread(written[1]).pixel_array
    rows = pixels.shape[0]
    top = pixels[: rows // 12].reshape(-1, 3).astype(int)
    yellow = (top[:, 0] > 200) & (top[:, 1] > 200) & (top[:, 2] < 120)
    assert yellow.sum() > 2000, "the yellow banner text is drawn in the top band"
    assert BANNER.startswith("NOT FOR DIAGNOSTIC USE")


def test_sc_is_valid_dicom(written):
    _dciodvfy(written[1])


# --- both, other sources --------------------------------------------------------------------


def test_results_are_deterministic_per_source_and_model(source, predictor, result):
    image = read_dataset(source)
    again = build_sr(source, result.prediction, result.outline)
    assert again.SOPInstanceUID == result.sr.SOPInstanceUID
    assert again.SeriesInstanceUID == result.sr.SeriesInstanceUID
    chosen = build_heatmap_sc(
        source,
        image,
        result.prediction,
        result.heatmap,
        series_instance_uid="1.2.3.4",
        sop_instance_uid="1.2.3.4.5",
    )
    assert (chosen.SeriesInstanceUID, chosen.SOPInstanceUID) == ("1.2.3.4", "1.2.3.4.5")


@pytest.mark.skipif(
    not (SAMPLES / "chest_dx_presentation.dcm").is_file(), reason="sample_dicoms/ not created yet"
)
def test_source_with_spacing_gets_an_image_library(predictor, tmp_path):
    source = pydicom.dcmread(SAMPLES / "chest_dx_presentation.dcm")
    res = analyse(source, predictor)
    sr_path, sc_path = tmp_path / "sr.dcm", tmp_path / "sc.dcm"
    res.sr.save_as(sr_path, enforce_file_format=True)
    res.sc.save_as(sc_path, enforce_file_format=True)
    text = _dsrdump(sr_path)
    assert "Image Library" in text and "Horizontal Pixel Spacing" in text
    _dciodvfy(sr_path)
    _dciodvfy(sc_path)
    shape = display_shape(source.Rows, source.Columns)
    assert pydicom.dcmread(sc_path).pixel_array.shape == (*shape, 3)


def test_sparse_header_still_builds_valid_objects(source, result, tmp_path):
    sparse = copy.deepcopy(source)
    for keyword in (
        "PatientBirthDate",
        "AccessionNumber",
        "ReferringPhysicianName",
        "PatientOrientation",
        "StudyID",
    ):
        delattr(sparse, keyword)
    sparse.PatientSex = "X"  # not a DICOM value
    sparse.StudyDate = "2004"  # not a DA
    image = read_dataset(sparse)
    sr = build_sr(sparse, result.prediction, result.outline)
    sc = build_heatmap_sc(sparse, image, result.prediction, result.heatmap)
    assert sparse.PatientSex == "X", "the source is not modified"
    for obj, name in ((sr, "sr.dcm"), (sc, "sc.dcm")):
        assert obj.PatientSex == "" and obj.PatientBirthDate == "" and obj.StudyDate == ""
        obj.save_as(tmp_path / name, enforce_file_format=True)
        _dciodvfy(tmp_path / name)
    assert sc.PatientOrientation == ""


def test_builders_refuse_what_they_cannot_encode(source, result):
    image = read_dataset(source)
    no_uid = copy.deepcopy(source)
    del no_uid.SOPInstanceUID
    with pytest.raises(ResultEncodingError, match="SOPInstanceUID"):
        build_sr(no_uid, result.prediction, result.outline)
    outside = result.outline.copy()
    outside[:, 0] += source.Columns
    with pytest.raises(ResultEncodingError, match="leaves the"):
        build_sr(source, result.prediction, outside)
    with pytest.raises(ResultEncodingError, match=r"K >= 4"):
        build_sr(source, result.prediction, np.zeros((2, 2)))
    with pytest.raises(ResultEncodingError, match="source's"):
        build_heatmap_sc(source, image, result.prediction, result.heatmap[:-1])


def test_analyse_rejects_non_chest_images(predictor):
    ct = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    with pytest.raises(InputRejected):
        analyse(ct, predictor)


def test_not_suspected_reads_so(source, result):
    pred = result.prediction
    negative = type(pred)(**{**pred.__dict__, "covid_threshold": 0.99, "covid_suspected": False})
    sr = build_sr(source, negative, result.outline)
    back = read_sr_result(sr)
    assert back["decision"] == "Not suspected"
    assert back["AI: COVID-19 not suspected (research only)"] == pytest.approx(
        pred.covid_score, abs=1e-5
    )


# --- codes ---------------------------------------------------------------------------------


def _known(scheme: str, value: str) -> str | None:
    """Meaning of a code in pydicom's dictionary, or None when pydicom does not list it."""
    from pydicom.sr._concepts_dict import concepts

    for entries in concepts.get(scheme, {}).values():
        if value in entries:
            return entries[value][0]
    return None


def test_codes_match_pydicoms_dictionary():
    concepts = [v for v in vars(codes).values() if isinstance(v, hd.sr.CodedConcept)]
    concepts += list(codes.PROBABILITY_CODES.values()) + list(codes.SCREENING_RESULT.values())
    assert len(concepts) >= 15
    for concept in concepts:
        if concept.scheme_designator == codes.SCHEME:
            assert len(concept.value) <= 16 and len(concept.meaning) <= 64
            continue
        meaning = _known(concept.scheme_designator, concept.value)
        if meaning is not None:
            assert meaning == concept.meaning, concept
    # SNOMED CT codes pydicom does not list are the ones documented in codes.py
    assert _known("SCT", codes.COVID19.value) is None
    assert codes.COVID19.value == "840539006" and codes.PNEUMONIA.value == "233604007"
    assert hd.sr.CodedConcept.from_code(pydicom_codes.SCT.Normal) == codes.NORMAL


def test_source_header_is_clean_and_leaves_the_source_alone(source):
    header = source_header(source)
    assert "PixelData" not in header and "PixelSpacing" not in header  # 0\\0 dropped
    assert "PixelSpacing" in source and "PixelData" in source
    assert header.PatientID == source.PatientID
    assert header.SOPInstanceUID == source.SOPInstanceUID
