"""The PACS benchmarks run end to end with tiny parameters and print their figures.

Each benchmark script (``benchmarks/pacs_latency.py``, ``ingest_throughput.py``, ``load.py``) runs
as a subprocess against real peers on loopback (``dicom-covid serve``, Orthanc, dcmtk storescu and
storescp, pynetdicom SCUs and SCPs) and must exit 0 with its figures on stdout. The figures
themselves are not judged (they depend on the machine); their checks are: everything sent was
stored, nothing acknowledged was lost, every image got exactly one SR and one SC.
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from orthanc import available as orthanc_available
from pacs_helpers import model_bundle

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"

needs_dcmtk = pytest.mark.skipif(
    shutil.which("storescu") is None or shutil.which("storescp") is None,
    reason="dcmtk is not installed (apt install dcmtk)",
)

NUMBER = r"\d+(?:\.\d+)?"


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The trained bundle when present, else one throw-away bundle shared by the module."""
    return model_bundle(tmp_path_factory.mktemp("bench-bundle"))


def _run(script: str, *args: str, timeout: float = 400) -> str:
    """Run a benchmark; return its stdout, failing the test on a non-zero exit.

    On timeout the benchmark gets SIGTERM first, so it stops the service and Orthanc it started.
    """
    cmd = [sys.executable, str(BENCH / script), *args]
    proc = subprocess.Popen(
        cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)
        try:
            out, err = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        pytest.fail(f"{script} did not finish within {timeout} s:\n{out}\n{err[-3000:]}")
    assert proc.returncode == 0, f"{script} exited {proc.returncode}:\n{out}\n{err[-5000:]}"
    return out


def test_percentile_and_median() -> None:
    sys.path.insert(0, str(BENCH))
    try:
        import _pacs
    finally:
        sys.path.remove(str(BENCH))
    values = [float(x) for x in range(1, 21)]  # 1..20
    assert _pacs.median(values) == pytest.approx(10.5)
    assert _pacs.percentile(values, 0.95) == pytest.approx(19.05)
    assert _pacs.percentile(values, 0.0) == 1.0 and _pacs.percentile(values, 1.0) == 20.0


def test_copies_have_distinct_uids_and_shrink(tmp_path: Path) -> None:
    import pydicom

    sys.path.insert(0, str(BENCH))
    try:
        import _pacs
    finally:
        sys.path.remove(str(BENCH))
    files = _pacs.make_copies(tmp_path, 4, shrink=2, per_study=2)
    dss = [pydicom.dcmread(f) for f in files]
    assert len({str(d.SOPInstanceUID) for d in dss}) == 4
    assert len({str(d.StudyInstanceUID) for d in dss}) == 2
    src = pydicom.dcmread(_pacs.SAMPLE)
    for d in dss:
        assert d.file_meta.MediaStorageSOPInstanceUID == d.SOPInstanceUID
        assert (d.Rows, d.Columns) == ((src.Rows + 1) // 2, (src.Columns + 1) // 2)
        assert d.pixel_array.shape == (d.Rows, d.Columns)
        assert (d.pixel_array == src.pixel_array[::2, ::2]).all()


@pytest.mark.slow
@pytest.mark.timeout(600)
@needs_dcmtk
def test_ingest_throughput_smoke(bundle: Path) -> None:
    out = _run("ingest_throughput.py", "--instances", "5", "--rounds", "1", "--bundle", str(bundle))
    for scp in ("storescp", "storescp-nagle", "bare", "bare-nofsync", "serve"):
        assert re.search(
            rf"^{scp}\s+{NUMBER}\s+{NUMBER}\s.*\s5/5\s+1\.2\.840\.10008\.1\.2\.1$", out, re.M
        ), out
    assert re.search(rf"ratio serve/storescp: {NUMBER}", out), out
    assert re.search(rf"ratio serve/bare:\s+{NUMBER}", out), out


@pytest.mark.slow
@pytest.mark.timeout(600)
@needs_dcmtk
@pytest.mark.skipif(not orthanc_available(), reason="Orthanc is not installed")
def test_pacs_latency_smoke(bundle: Path) -> None:
    out = _run("pacs_latency.py", "--n", "2", "--warmup", "0", "--smoke", "--bundle", str(bundle))
    assert re.search(rf"over 2 studies .*\n\s+median\s+{NUMBER} s\s+p95\s+{NUMBER} s", out), out
    assert "per stage, from the job store (2 studies)" in out, out
    assert re.search(rf"inference started -> results written \(analysis\)\s+{NUMBER}", out), out
    assert "StableAge 1 s + quiet period 1 s" in out, out


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_load_smoke(bundle: Path) -> None:
    out = _run(
        "load.py",
        "--associations",
        "2",
        "--per-association",
        "3",
        "--deadline",
        "300",
        "--bundle",
        str(bundle),
        "--allow-resends",  # a lost C-STORE response may make the sender re-send (pynetdicom race)
        "--configs",
        "1x1,2x4",
    )
    assert out.count("ingest: 6/6 instances acknowledged over 2 concurrent associations") == 2, out
    assert "== serve --workers 2 --batch-size 4" in out, out
    assert re.search(rf"\n\s+1\s+1\s+{NUMBER}\s+{NUMBER}\s+{NUMBER}\s+1\.00x", out), out
    assert re.search(rf"\n\s+2\s+4\s+{NUMBER}\s+{NUMBER}\s+{NUMBER}\s+{NUMBER}x", out), out
    assert re.search(rf"p95 {NUMBER} ms", out), out
    assert "lost: 0 acknowledged" in out, out
    assert "6 candidate(s), 0 failed, 6 with exactly one SR + one SC" in out, out
    assert re.search(
        r"sink received 1[2-9] object\(s\): \d+ more than once, 0 missing, 0 unexp", out
    ), out
    assert "duplicates without one: 0" in out, out
    assert re.search(rf"inference: 6 image\(s\) in {NUMBER} s .*: {NUMBER} images/s", out), out
    assert re.search(rf"end to end: 6 image\(s\) .*: {NUMBER} images/s", out), out
