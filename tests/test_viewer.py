"""End to end in a real browser: the demo stack shows dicom-covid's results in OHIF.

The test starts what ``dicom-covid demo`` starts (:class:`dicom_covid.cli.demo.DemoStack`, on free
ports): Orthanc with its DICOMweb plugin and ``deploy/orthanc/forward.lua``, nginx serving the
pinned prebuilt OHIF viewer, and a real ``dicom-covid serve``. It sends the sample COVID-19 CR with
``storescu``, waits until the SR and the heat map are served by DICOMweb, then drives the system
Chromium with playwright-core (``tests/viewer/drive.mjs``) through the study list and the viewer:

* the study list lists the study and, once selected, its SR and heat-map series;
* the viewer's study browser lists both series by their descriptions;
* double-clicking the SR draws the hot-region outline (an SVG polyline) on the source image and
  a text box holding the probabilities the SR carries;
* double-clicking the heat map shows it as its own image series.

Screenshots go to ``test-artifacts/viewer/``, and also to ``docs/screenshots/`` when
``UPDATE_SCREENSHOTS=1``. What cannot be installed (apt: chromium, nginx-light, Orthanc; npm:
OHIF, playwright-core) makes the test skip with the reason; nothing downloads a browser.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import pydicom
import pytest
from pacs_helpers import model_bundle, sample_path

ROOT = Path(__file__).resolve().parent.parent
DRIVER_DIR = ROOT / "tests" / "viewer"
ARTIFACTS = ROOT / "test-artifacts" / "viewer"
DOC_SHOTS = ROOT / "docs" / "screenshots"
CHROMIUM = "/usr/bin/chromium"
SHOTS = ("study-list.png", "sr-outline.png", "heatmap.png")

pytestmark = pytest.mark.timeout(600)


def _say(message: str) -> None:
    print(message, flush=True)


def _install_or_skip() -> Path:
    """Install the stack and the browser driver; skip (with the reason) when that fails."""
    from dicom_covid.cli.demo import DemoError, ensure_installed, install_apt_packages

    try:
        dist = ensure_installed(browser=True, say=_say)
        if shutil.which("node") is None or shutil.which("npm") is None:
            install_apt_packages(["nodejs", "npm"], say=_say)
    except DemoError as exc:
        pytest.skip(f"the viewer stack cannot be installed here: {exc}")
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"{CHROMIUM} is missing after installing the Debian package chromium")
    if not (DRIVER_DIR / "node_modules" / "playwright-core" / "package.json").is_file():
        out = subprocess.run(
            ["npm", "ci", "--no-audit", "--no-fund", "--loglevel=error"],
            cwd=DRIVER_DIR,
            capture_output=True,
            text=True,
            timeout=600,
        )
        if out.returncode != 0:
            pytest.skip(f"npm ci in tests/viewer failed: {(out.stderr or out.stdout)[-500:]}")
    return dist


def _sr_percentages(orthanc_url: str, dicomweb_url: str, study: str, sr_series: str) -> dict:
    """The SR's measurements in percent, read from the file Orthanc stores."""
    from dicom_covid.results import read_sr_result

    with urllib.request.urlopen(
        f"{dicomweb_url}/studies/{study}/series/{sr_series}/instances", timeout=30
    ) as resp:
        (instance,) = json.loads(resp.read())
    sop_uid = instance["00080018"]["Value"][0]
    req = urllib.request.Request(f"{orthanc_url}/tools/lookup", data=sop_uid.encode())
    with urllib.request.urlopen(req, timeout=30) as resp:
        orthanc_id = json.loads(resp.read())[0]["ID"]
    with urllib.request.urlopen(f"{orthanc_url}/instances/{orthanc_id}/file", timeout=30) as r:
        path = ARTIFACTS / "sr.dcm"
        path.write_bytes(r.read())
    values = read_sr_result(pydicom.dcmread(path))
    return {k: 100.0 * v for k, v in values.items() if isinstance(v, float)}


def _coloured_pixels(png: Path, kind: str) -> int:
    """Pixels of the SR outline's green (0, 255, 0), or colour-map pixels (chroma > 60)."""
    import numpy as np
    from PIL import Image

    # the middle of the viewport (1400x900 page): the image, not OHIF's panels or the banners
    rgb = np.asarray(Image.open(png).convert("RGB")).astype(int)[130:820, 440:1200]
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    if kind == "green":
        return int(((g > 200) & (r < 80) & (b < 80)).sum())
    return int((rgb.max(axis=-1) - rgb.min(axis=-1) > 60).sum())


@pytest.mark.slow
def test_demo_results_show_in_ohif(tmp_path: Path) -> None:
    from dicom_covid.cli.demo import DemoPorts, DemoStack
    from dicom_covid.results.common import SC_SERIES_DESCRIPTION, SR_SERIES_DESCRIPTION

    dist = _install_or_skip()
    bundle = model_bundle(tmp_path)
    sample = sample_path("covid19_cr_pa.dcm")  # the screenshots show a suspected case
    header = pydicom.dcmread(sample, stop_before_pixels=True)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    for old in ARTIFACTS.glob("*.png"):
        old.unlink()
    timings: dict[str, float] = {}

    t0 = time.monotonic()
    stack = DemoStack(tmp_path / "demo", dist, DemoPorts.pick(any_free=True), bundle=bundle)
    with stack:
        timings["services_up_s"] = time.monotonic() - t0
        sent = time.monotonic()
        (study,) = stack.send([sample])
        assert study == header.StudyInstanceUID
        (results,) = stack.wait_for_results([study], timeout=300)
        timings["sent_to_results_in_dicomweb_s"] = time.monotonic() - sent
        assert results.description("SR") == SR_SERIES_DESCRIPTION
        assert SC_SERIES_DESCRIPTION in [d for _, d, _ in results.series]
        sc_series = next(uid for _, d, uid in results.series if d == SC_SERIES_DESCRIPTION)
        want = _sr_percentages(
            stack.orthanc_url, stack.dicomweb_url, study, results.series_uid("SR")
        )

        config = {
            "viewerUrl": stack.viewer_url,
            "studyInstanceUid": study,
            "accession": str(header.AccessionNumber),
            "srDescription": SR_SERIES_DESCRIPTION,
            "scDescription": SC_SERIES_DESCRIPTION,
            "outDir": str(ARTIFACTS),
            "chromium": CHROMIUM,
            "timeoutMs": 90_000,
        }
        cfg_path = tmp_path / "drive.json"
        cfg_path.write_text(json.dumps(config))
        browser_start = time.monotonic()
        run = subprocess.run(
            ["node", str(DRIVER_DIR / "drive.mjs"), str(cfg_path)],
            capture_output=True,
            text=True,
            timeout=400,
        )
        timings["browser_s"] = time.monotonic() - browser_start
        (ARTIFACTS / "drive.log").write_text(run.stdout + run.stderr)
        result = json.loads((ARTIFACTS / "result.json").read_text())
        assert run.returncode == 0, (
            f"{result.get('error')}\nsee {ARTIFACTS}/failure.png; browser console errors: "
            f"{result.get('consoleErrors')}"
        )
    timings["total_s"] = time.monotonic() - t0
    timings["results_visible_in_ohif_after_send_s"] = (
        browser_start - sent + result["steps"]["sr_outline"] / 1000.0
    )
    (ARTIFACTS / "timings.json").write_text(
        json.dumps({**timings, "browser_steps_ms": result["steps"]}, indent=2)
    )
    _say(f"viewer test timings: {json.dumps(timings)}")

    # The study list: the study, and once selected its SR and heat-map series.
    assert str(header.AccessionNumber) in result["studyListText"]
    assert SR_SERIES_DESCRIPTION in result["studyListText"]
    assert SC_SERIES_DESCRIPTION in result["studyListText"]
    # The viewer's study browser lists both result series.
    assert SR_SERIES_DESCRIPTION in result["studyBrowserText"]
    assert SC_SERIES_DESCRIPTION in result["studyBrowserText"]

    # The SR: an outline with real geometry and a text box with the SR's probabilities.
    shapes = result["sr"]["shapes"]
    assert any(s["tag"] == "ellipse" or s["points"] >= 4 for s in shapes), shapes
    text = "\n".join(result["sr"]["texts"])
    for name in ("P(COVID-19)", "P(normal)", "P(other pneumonia)"):
        match = re.search(re.escape(name) + r": ([0-9.]+) %", text)
        assert match, (name, text)
        assert abs(float(match.group(1)) - want[name]) < 0.006, (name, match.group(1), want)
    assert "research only" in text
    assert str(header.SeriesDescription) in result["srViewportOverlay"]  # on the source image

    # The heat map: its own series, displayed as an image.
    assert SC_SERIES_DESCRIPTION in result["heatmap"]["overlay"]
    assert sc_series in result["heatmap"]["imageId"]

    # What the screenshots show: the green outline, the heat map's red.
    for name in SHOTS:
        assert (ARTIFACTS / name).stat().st_size > 20_000, name
    assert _coloured_pixels(ARTIFACTS / "sr-outline.png", "green") > 300
    assert _coloured_pixels(ARTIFACTS / "heatmap.png", "green") < 50
    assert _coloured_pixels(ARTIFACTS / "heatmap.png", "colour") > 10_000  # not a grey image

    if os.environ.get("UPDATE_SCREENSHOTS") == "1":
        DOC_SHOTS.mkdir(parents=True, exist_ok=True)
        for name in SHOTS:
            shutil.copyfile(ARTIFACTS / name, DOC_SHOTS / f"ohif-{name}")


def test_demo_stop_without_a_running_demo(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from dicom_covid.cli.main import app

    out = CliRunner().invoke(app, ["demo", "--stop", "--state-dir", str(tmp_path)])
    assert out.exit_code == 0, out.output
    assert "no demo is running" in out.output


def test_demo_refuses_a_configured_port_in_use() -> None:
    import socket

    from dicom_covid.cli.demo import DemoError, DemoPorts

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(DemoError, match=f"port {port}"):
            DemoPorts.pick(viewer=port)
        ports = DemoPorts.pick(any_free=True)
    assert len({ports.viewer, ports.orthanc_http, ports.orthanc_dicom, ports.serve}) == 4


def test_demo_without_the_checkout_says_so(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """From an installed wheel (no deploy/demo/), the command fails with what to do."""
    import sys

    from typer.testing import CliRunner

    from dicom_covid.cli import demo as demo_command
    from dicom_covid.cli.main import app

    monkeypatch.setattr(demo_command, "STACK_DIR", tmp_path / "deploy" / "demo")
    monkeypatch.delitem(sys.modules, demo_command._STACK_MODULE, raising=False)
    out = CliRunner().invoke(app, ["demo", "--stop", "--state-dir", str(tmp_path)])
    assert out.exit_code == 1, out.output
    assert "needs a source checkout" in out.output


def test_demo_stack_is_not_part_of_the_library() -> None:
    """The CLI loads the stack (deploy/demo/) only when the command runs."""
    import sys

    code = (
        "import sys, dicom_covid.cli.main; "
        "print([m for m in sys.modules if m.startswith('dicom_covid_demo_stack')])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    from dicom_covid.cli.demo import STACK_DIR, DemoStack

    assert Path(sys.modules[DemoStack.__module__].__file__).parent == STACK_DIR
