"""Make the committed sample chest radiographs in ``sample_dicoms/``.

Two kinds of sample:

* **Encodings** (``chest_*.dcm``, seven files): ``RG1_UNCR.dcm`` from PyPI ``pydicom-data`` (MIT
  licence), a real PA chest computed radiograph (1955 x 1841, MONOCHROME1, 15 bits stored) from
  David Clunie's compressed-sample set, already anonymised there as ``CompressedSamples^RG1``.
  Each output is the same chest, downsampled with an antialiased Lanczos filter to
  :data:`LONG_SIDE` pixels on the long side (15-bit range kept), de-identified again under our own
  sample identity, stored in another encoding. They carry no diagnosis.
* **Labelled films** (:data:`LABELLED`: ``covid19_cr_pa.dcm``, ``pneumonia_cr_pa.dcm``): one
  COVID-19 and one non-COVID pneumonia film from the *train* split of the labelled development
  set (``$DICOM_COVID_DATA``), openly licensed (CC BY), converted to DICOM CR, so the quick start
  and the viewer demo show both outcomes. Skipped when the development set is absent.

Every file gets new deterministic UIDs and its own single-image study, so PACS tests can send
every file as a separate study. See ``README.md`` next to this script.

Run once from the repository root (outputs are committed)::

    .venv/bin/python sample_dicoms/make_samples.py

Every file is read back and checked pixel for pixel, and validated with ``dciodvfy``
(dicom3tools) when it is installed; the script exits non-zero on any dciodvfy ``Error`` line.
The JPEG Lossless sample needs ``dcmcjpeg`` (dcmtk): no Python package here encodes JPEG
Lossless (pylibjpeg-libjpeg only decodes), so it is skipped when dcmtk is absent.
"""

from __future__ import annotations

import argparse
import copy
import csv
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
)

HERE = Path(__file__).resolve().parent
SOURCE_FILE = "RG1_UNCR.dcm"
#: Output size of the long side (rows); the short side keeps the aspect ratio. Chosen so that
#: the seven files stay under ~8 MB together (1024 would give ~11 MB).
LONG_SIDE = 832
#: Nominal detector pixel size of the original in mm (its Pixel Spacing is 0\0, which is invalid).
NOMINAL_SPACING_MM = 0.168
PATIENT_NAME = "Sample^ChestCR"
PATIENT_ID = "DCOVID-SAMPLE-001"
#: Seed of the deterministic UIDs: rerunning the script reproduces identical files.
UID_SEED = "dicom-covid sample_dicoms v1"
NO_LABEL_NOTE = (
    "dicom-covid pipeline test sample; carries NO diagnosis label. Derived from pydicom-data "
    f"{SOURCE_FILE} (MIT licence): downsampled, de-identified, new UIDs."
)

#: Attributes removed from the original: identifying (PS3.15 basic profile "X"), retired, or
#: describing the original geometry (collimator edges in original pixel coordinates).
REMOVE = (
    "OtherPatientIDs",
    "InstitutionName",
    "InstitutionalDepartmentName",
    "StationName",
    "DeviceSerialNumber",
    "InstanceCreatorUID",
    "PostprocessingFunction",
    "ImageAndFluoroscopyAreaDoseProduct",
    "CollimatorShape",
    "CollimatorLeftVerticalEdge",
    "CollimatorRightVerticalEdge",
    "CollimatorUpperHorizontalEdge",
    "CollimatorLowerHorizontalEdge",
    "DateOfLastCalibration",
    "TimeOfLastCalibration",
    "TimezoneOffsetFromUTC",
    "Sensitivity",  # 0 in the original: not recorded
    "ProcessingFunction",  # vendor processing parameters, meaningless after resampling
)


@dataclass(frozen=True)
class LabelledSample:
    """A labelled film of the development set's train split, to be stored as a DICOM CR.

    The manifest row at ``manifest_path`` must carry ``label``, ``licence`` and split ``train``;
    the script stops otherwise, so a changed data set cannot silently swap the image.
    """

    name: str  #: output file stem
    number: int  #: accession number suffix (the seven encodings use 1..7)
    manifest_path: str  #: ``path`` column of ``manifest.csv``
    label: str  #: expected manifest label
    licence: str  #: expected ``license`` column
    finding: str  #: what the Image Comments and Study Description call it
    patient_name: str
    patient_id: str
    #: burned-in text to blank before conversion: (first row, last row + 1, first col, last col + 1)
    blank: tuple[int, int, int, int] | None = None


#: The labelled films, chosen because the bundle's default model (efficientnet_lite0_v2) classifies
#: them correctly without abstaining; ``tests/test_predict.py`` checks that it still does.
LABELLED = (
    LabelledSample(
        name="covid19_cr_pa",
        number=8,
        manifest_path="images/ieee8023/12941_2020_358_Fig1_HTML.jpg",
        label="covid",
        licence="CC BY 4.0",
        finding="COVID-19 pneumonia",
        patient_name="Sample^Covid19",
        patient_id="DCOVID-SAMPLE-002",
    ),
    LabelledSample(
        name="pneumonia_cr_pa",
        number=9,
        manifest_path="images/ieee8023/X-ray_of_cyst_in_pneumocystis_pneumonia_1.jpg",
        label="pneumonia",
        licence="CC BY",
        finding="Pneumocystis pneumonia (non-COVID)",
        patient_name="Sample^Pneumonia",
        patient_id="DCOVID-SAMPLE-003",
        blank=(0, 10, 376, 457),  # the date printed on the film, top right
    ),
)
#: Nominal study date of the labelled films: the date of the source repository snapshot
#: (ieee8023/covid-chestxray-dataset as hida6's fork, 2020-06-22); the real dates are unknown.
LABELLED_DATE = "20200622"
#: The labelled films are published as 8-bit JPEGs; they are stored with 12 bits, as a CR would be.
LABELLED_BITS = 12
#: Nominal field of view of the long side in mm (a 35 x 43 cm or 43 x 43 cm plate); the published
#: images carry no calibration, so Pixel Spacing is this divided by the long side in pixels.
LABELLED_FIELD_MM = 430.0


def _uid(name: str, what: str) -> str:
    """Deterministic UUID-derived UID (PS3.5 B.2): name-based UUID v5 under 2.25."""
    return f"2.25.{uuid.uuid5(uuid.NAMESPACE_OID, f'{UID_SEED}/{name}/{what}').int}"


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item


def downsample(pixels: np.ndarray, long_side: int = LONG_SIDE) -> np.ndarray:
    """Antialiased (Lanczos) resize so the long side is ``long_side``; 15-bit range kept."""
    rows, cols = pixels.shape
    scale = long_side / max(rows, cols)
    size = (round(cols * scale), round(rows * scale))  # PIL takes (width, height)
    out = Image.fromarray(pixels.astype(np.float32), mode="F").resize(
        size, Image.Resampling.LANCZOS
    )
    return np.clip(np.rint(np.asarray(out)), 0, 2**15 - 1).astype(np.uint16)


def base_dataset(original: Dataset, pixels: np.ndarray, name: str, number: int) -> Dataset:
    """De-identified MONOCHROME1 CR dataset with ``pixels`` and new UIDs for sample ``name``."""
    ds = Dataset()
    for elem in original:  # everything but the pixels and the trailing padding (FFFC,FFFC)
        if elem.keyword not in ("PixelData", "DataSetTrailingPadding"):
            ds.add(copy.deepcopy(elem))
    for keyword in REMOVE:
        if keyword in ds:
            delattr(ds, keyword)
    rows, cols = pixels.shape

    # identity: one sample patient, one single-image study per file
    ds.PatientName = PATIENT_NAME
    ds.PatientID = PATIENT_ID
    ds.PatientBirthDate = ""
    ds.PatientSex = ""
    ds.ReferringPhysicianName = ""
    ds.AccessionNumber = f"DCSAMPLE{number:02d}"
    ds.StudyID = f"SAMPLE{number:02d}"
    ds.StudyDescription = "Sample chest radiograph (pipeline test, no diagnosis)"
    ds.SeriesDescription = f"dicom-covid sample {name}"
    ds.ImageComments = NO_LABEL_NOTE
    ds.StudyInstanceUID = _uid(name, "study")
    ds.SeriesInstanceUID = _uid(name, "series")
    ds.SOPInstanceUID = _uid(name, "instance")
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = ds.InstanceCreationDate = "20040826"
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = ds.InstanceCreationTime = "120000"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = [  # LO: 64 characters a value
        "dicom-covid make_samples.py",
        "patient name and ID replaced; birth date and sex emptied",
        "dates set to the public sample's creation date",
        "institution, station and device serial removed; new UIDs",
    ]
    ds.DeidentificationMethodCodeSequence = Sequence(
        [_code("113100", "DCM", "Basic Application Confidentiality Profile")]
    )

    # derivation
    ds.ImageType = ["DERIVED", "PRIMARY"]
    ds.DerivationDescription = (
        f"Lanczos downsampled from {original.Rows}x{original.Columns} to {rows}x{cols}"
    )
    source = Dataset()
    source.ReferencedSOPClassUID = original.SOPClassUID
    source.ReferencedSOPInstanceUID = original.SOPInstanceUID
    ds.SourceImageSequence = Sequence([source])

    # pixels and geometry
    ds.Rows, ds.Columns = rows, cols
    spacing = [
        f"{NOMINAL_SPACING_MM * original.Rows / rows:.4f}",
        f"{NOMINAL_SPACING_MM * original.Columns / cols:.4f}",
    ]
    ds.ImagerPixelSpacing = spacing
    ds.PixelSpacing = spacing  # not calibrated: equal to the detector pitch
    ds.PixelData = pixels.tobytes()
    ds["PixelData"].VR = "OW"
    return ds


def to_mono2(ds: Dataset, pixels: np.ndarray) -> np.ndarray:
    """Turn a MONOCHROME1 dataset into MONOCHROME2 in place; returns the inverted pixels."""
    maximum = 2 ** int(ds.BitsStored) - 1
    inverted = (maximum - pixels.astype(np.int32)).astype(np.uint16)
    ds.PhotometricInterpretation = "MONOCHROME2"
    # center' = 2**BitsStored - center makes the LINEAR window of the inverted values exactly
    # 1 - the original window, so MONOCHROME1 and MONOCHROME2 read to identical pixels.
    ds.WindowCenter = f"{maximum + 1 - float(ds.WindowCenter):g}"
    ds.PixelData = inverted.tobytes()
    return inverted


def to_dx(ds: Dataset) -> None:
    """Turn a MONOCHROME2 CR dataset into Digital X-Ray Image Storage - For Presentation."""
    ds.SOPClassUID = DigitalXRayImageStorageForPresentation
    ds.Modality = "DX"
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.PixelIntensityRelationship = "LOG"
    ds.PixelIntensityRelationshipSign = -1  # MONOCHROME2: high values = less X-ray intensity
    ds.RescaleIntercept = "0"
    ds.RescaleSlope = "1"
    ds.RescaleType = "US"
    ds.PresentationLUTShape = "IDENTITY"
    ds.LossyImageCompression = "00"
    ds.BurnedInAnnotation = "NO"
    ds.ImageLaterality = "U"
    ds.AnatomicRegionSequence = Sequence([_code("51185008", "SCT", "Chest")])
    ds.ViewCodeSequence = Sequence([_code("399348003", "SCT", "postero-anterior")])
    ds.ViewCodeSequence[0].ViewModifierCodeSequence = Sequence()
    ds.PatientOrientationCodeSequence = Sequence([_code("C86043", "NCIt", "erect")])
    ds.PositionerType = ""  # type 2, not recorded in the original
    ds.FilterType = "MULTIPLE"  # the original's "0.1Cu 1Al" as DX X-Ray Filtration terms
    ds.FilterMaterial = ["COPPER", "ALUMINUM"]
    ds.DetectorType = "STORAGE"  # photostimulable phosphor plate
    ds.AcquisitionContextSequence = Sequence()
    del ds.PixelSpacing  # DX: 1C, only when calibrated; Imager Pixel Spacing is type 1
    for keyword in ("PlateType", "GeneratorPower", "CollimatorGridName"):  # not in the DX IOD
        if keyword in ds:
            delattr(ds, keyword)


def manifest_row(data_dir: Path, sample: LabelledSample) -> dict[str, str]:
    """The manifest row of ``sample``, checked against its expected label, licence and split."""
    with open(data_dir / "manifest.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["path"] == sample.manifest_path]
    if len(rows) != 1:
        raise SystemExit(f"{sample.manifest_path}: {len(rows)} manifest rows, expected 1")
    row = rows[0]
    found = (row["label"], row["license"], row["split"])
    if found != (sample.label, sample.licence, "train"):
        raise SystemExit(
            f"{sample.manifest_path}: manifest says label/licence/split {found}, expected "
            f"{(sample.label, sample.licence, 'train')}; choose another image"
        )
    return row


def labelled_pixels(path: Path, sample: LabelledSample) -> np.ndarray:
    """The published 8-bit film as :data:`LABELLED_BITS`-bit MONOCHROME2 pixels.

    Burned-in text in ``sample.blank`` is replaced by the median of the rows just below it.
    """
    pixels = np.asarray(Image.open(path).convert("L")).astype(np.uint32)
    if sample.blank is not None:
        r0, r1, c0, c1 = sample.blank
        pixels[r0:r1, c0:c1] = np.uint32(np.median(pixels[r1 : r1 + 4, c0:c1]))
    if max(pixels.shape) > 1024:
        raise SystemExit(f"{path.name}: {pixels.shape}, expected at most 1024 px a side")
    maximum = 2**LABELLED_BITS - 1
    return ((pixels * maximum + 127) // 255).astype(np.uint16)


def labelled_dataset(row: dict[str, str], pixels: np.ndarray, sample: LabelledSample) -> Dataset:
    """A de-identified DICOM CR (MONOCHROME2) of a labelled film with new deterministic UIDs."""
    ds = Dataset()
    ds.SOPClassUID = ComputedRadiographyImageStorage
    ds.SOPInstanceUID = _uid(sample.name, "instance")
    ds.InstanceCreationDate = ds.StudyDate = ds.SeriesDate = ds.ContentDate = LABELLED_DATE
    ds.InstanceCreationTime = ds.StudyTime = ds.SeriesTime = ds.ContentTime = "120000"

    # patient: one sample patient per film, nothing of the original identity
    ds.PatientName = sample.patient_name
    ds.PatientID = sample.patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = ""
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = [  # LO: 64 characters a value
        "dicom-covid make_samples.py from a published JPEG",
        "sample patient name and ID; birth date and sex empty",
        "nominal dates; no institution or device; new UIDs",
        "burned-in date blanked" if sample.blank else "no burned-in identifiers found",
    ]
    ds.DeidentificationMethodCodeSequence = Sequence(
        [_code("113100", "DCM", "Basic Application Confidentiality Profile")]
    )

    # study and series: one single-image study per film
    ds.StudyInstanceUID = _uid(sample.name, "study")
    ds.SeriesInstanceUID = _uid(sample.name, "series")
    ds.AccessionNumber = f"DCSAMPLE{sample.number:02d}"
    ds.StudyID = f"SAMPLE{sample.number:02d}"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "XR CHEST PA (dicom-covid labelled sample, research use only)"
    ds.Modality = "CR"
    ds.SeriesNumber = 1
    ds.SeriesDescription = f"dicom-covid sample {sample.name}"
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = row["view"]
    ds.Manufacturer = ""

    # image
    ds.InstanceNumber = 1
    ds.PatientOrientation = ["L", "F"]  # frontal film shown as if facing the patient
    ds.ImageType = ["DERIVED", "PRIMARY"]
    ds.DerivationDescription = (
        f"published 8-bit JPEG ({row['width']}x{row['height']}) scaled to "
        f"{LABELLED_BITS} bits" + ("; burned-in date blanked" if sample.blank else "")
    )
    ds.LossyImageCompression = "01"  # the published image is a JPEG
    ds.LossyImageCompressionMethod = "ISO_10918_1"
    ds.BurnedInAnnotation = "NO"
    ds.ImageComments = (
        f"RESEARCH USE ONLY. dicom-covid labelled sample: {sample.finding} "
        f"(development set label '{sample.label}', train split). Source: ieee8023 "
        f"covid-chestxray-dataset, {row['original_url']}, licence {sample.licence}; "
        "see sample_dicoms/README.md for attribution. Shows an outcome; "
        "never a measure of accuracy."
    )
    rows, cols = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = rows, cols
    ds.BitsAllocated = 16
    ds.BitsStored = LABELLED_BITS
    ds.HighBit = LABELLED_BITS - 1
    ds.PixelRepresentation = 0
    spacing = f"{LABELLED_FIELD_MM / max(rows, cols):.4f}"
    ds.ImagerPixelSpacing = [spacing, spacing]
    ds.PixelSpacing = [spacing, spacing]  # not calibrated: equal to the nominal detector pitch
    ds.RescaleIntercept = "0"
    ds.RescaleSlope = "1"
    ds.RescaleType = "US"
    ds.WindowCenter = f"{2 ** (LABELLED_BITS - 1)}"
    ds.WindowWidth = f"{2**LABELLED_BITS}"
    ds.PixelData = pixels.tobytes()
    ds["PixelData"].VR = "OW"
    return ds


def finish(ds: Dataset, transfer_syntax: str = ExplicitVRLittleEndian) -> Dataset:
    """Add file meta information for ``transfer_syntax`` (native, before any compression)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = transfer_syntax
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.file_meta = meta
    return ds


def write(ds: Dataset, path: Path) -> None:
    ds.save_as(path, enforce_file_format=True)


def compress_with(transfer_syntax: str, **kwargs) -> Callable[[Dataset, np.ndarray, Path], None]:
    def _do(ds: Dataset, pixels: np.ndarray, path: Path) -> None:
        ds.compress(transfer_syntax, pixels, generate_instance_uid=False, **kwargs)
        ds.LossyImageCompression = "00"
        write(ds, path)

    return _do


def dcmtk_jpeg_lossless(ds: Dataset, pixels: np.ndarray, path: Path) -> None:
    """JPEG Lossless SV1 through dcmtk's dcmcjpeg (no Python encoder exists for it)."""
    ds.LossyImageCompression = "00"
    with tempfile.TemporaryDirectory() as tmp:
        native = Path(tmp) / "native.dcm"
        write(ds, native)
        subprocess.run(["dcmcjpeg", "+e1", "+un", "-q", str(native), str(path)], check=True)


def validate(path: Path) -> tuple[list[str], list[str]]:
    """``dciodvfy`` errors and warnings for ``path`` (empty lists when dciodvfy is absent)."""
    if shutil.which("dciodvfy") is None:
        return [], []
    proc = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, check=False)
    lines = (proc.stdout + proc.stderr).splitlines()
    return (
        [ln for ln in lines if ln.startswith("Error")],
        [ln for ln in lines if ln.startswith("Warning")],
    )


def _default_data_dir() -> Path:
    """``$DICOM_COVID_DATA``, else ``../shared/data/cxr`` next to the repository."""
    env = os.environ.get("DICOM_COVID_DATA")
    return Path(env) if env else HERE.parent.parent / "shared" / "data" / "cxr"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE, help="output folder")
    parser.add_argument(
        "--data",
        type=Path,
        default=None,
        help="labelled development set (default: $DICOM_COVID_DATA, else ../shared/data/cxr)",
    )
    args = parser.parse_args(argv)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)

    original = pydicom.dcmread(get_testdata_file(SOURCE_FILE))
    small = downsample(original.pixel_array)
    print(f"{SOURCE_FILE}: {original.Rows}x{original.Columns} -> {small.shape[0]}x{small.shape[1]}")

    def mono1(name: str, number: int) -> tuple[Dataset, np.ndarray]:
        return finish(base_dataset(original, small, name, number)), small

    def mono2(name: str, number: int) -> tuple[Dataset, np.ndarray]:
        ds = base_dataset(original, small, name, number)
        inverted = to_mono2(ds, small)
        return finish(ds), inverted

    def dx(name: str, number: int) -> tuple[Dataset, np.ndarray]:
        ds, inverted = mono2(name, number)
        to_dx(ds)
        return finish(ds), inverted

    def plain(ds: Dataset, pixels: np.ndarray, path: Path) -> None:
        write(ds, path)

    plan: list[tuple[str, Callable, Callable, str]] = [
        ("chest_cr_mono1", mono1, plain, ExplicitVRLittleEndian),
        ("chest_cr_mono2", mono2, plain, ExplicitVRLittleEndian),
        ("chest_dx_presentation", dx, plain, ExplicitVRLittleEndian),
        (
            "chest_cr_j2k",
            mono1,
            compress_with(JPEG2000Lossless, encoding_plugin="pylibjpeg"),
            JPEG2000Lossless,
        ),
        (
            "chest_cr_jpegls",
            mono1,
            compress_with(JPEGLSLossless, encoding_plugin="pyjpegls"),
            JPEGLSLossless,
        ),
        ("chest_cr_rle", mono1, compress_with(RLELossless, encoding_plugin="pydicom"), RLELossless),
        ("chest_cr_jpeg_lossless", mono1, dcmtk_jpeg_lossless, JPEGLosslessSV1),
    ]
    failed = False
    total = 0
    jobs: list[tuple[Path, np.ndarray, str]] = []
    for number, (name, build, save, expected_ts) in enumerate(plan, start=1):
        path = out / f"{name}.dcm"
        if save is dcmtk_jpeg_lossless and shutil.which("dcmcjpeg") is None:
            print(f"{path.name}: skipped (dcmcjpeg from dcmtk not installed)")
            continue
        ds, pixels = build(name, number)
        save(ds, pixels, path)
        jobs.append((path, pixels, expected_ts))

    data_dir = args.data or _default_data_dir()
    labelled = LABELLED if (data_dir / "manifest.csv").is_file() else ()
    if not labelled:
        print(f"labelled samples: skipped (no manifest.csv in {data_dir}; set --data)")
    for sample in labelled:
        row = manifest_row(data_dir, sample)
        pixels = labelled_pixels(data_dir / sample.manifest_path, sample)
        path = out / f"{sample.name}.dcm"
        write(finish(labelled_dataset(row, pixels, sample)), path)
        print(f"{sample.manifest_path} ({row['license']}) -> {path.name}")
        jobs.append((path, pixels, ExplicitVRLittleEndian))

    for path, pixels, expected_ts in jobs:
        back = pydicom.dcmread(path)
        if back.file_meta.TransferSyntaxUID != expected_ts:
            raise SystemExit(f"{path.name}: transfer syntax {back.file_meta.TransferSyntaxUID}")
        if not np.array_equal(back.pixel_array, pixels):
            raise SystemExit(f"{path.name}: pixels differ after reading back")
        errors, warnings = validate(path)
        size = path.stat().st_size
        total += size
        print(
            f"{path.name}: {size / 1e6:.2f} MB, {back.file_meta.TransferSyntaxUID.name}, "
            f"dciodvfy {len(errors)} errors, {len(warnings)} warnings"
        )
        for line in errors + warnings:
            print(f"    {line}")
        failed |= bool(errors)
    print(f"total {total / 1e6:.2f} MB")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
