"""``dicom-covid compare``: the comparison table and figure from committed evaluation results."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from dicom_covid.analysis.compare import comparison_rows, load_metrics
from dicom_covid.errors import DataError

ROOT = Path(__file__).resolve().parent.parent
_ALL = sorted((ROOT / "monai_bundle" / "docs").glob("*_test/metrics.json"))
# Reports on one image set: most cover the version-1 test split (1,117 images); the version-2
# model's report covers the larger version-2 split and cannot share their table.
_SIZES = Counter(json.loads(p.read_text())["n"] for p in _ALL)
REPORTS = [p for p in _ALL if json.loads(p.read_text())["n"] == _SIZES.most_common(1)[0][0]]


def test_rows_follow_the_committed_results_best_first() -> None:
    assert len(REPORTS) >= 2, "the bundle docs hold the test-split results of its models"
    results = load_metrics(REPORTS)
    rows = comparison_rows(results)
    assert [r["accuracy"] for r in rows] == sorted((r["accuracy"] for r in results), reverse=True)
    by_name = {r["model"]: r for r in results}
    for row in rows:
        src = by_name[row["model"]]
        assert row["covid_auc"] == src["covid_auc"]
        assert row["covid_sensitivity"] == src["covid_at_threshold"]["sensitivity"]
        lo, hi = row["accuracy_ci"]
        assert lo <= row["accuracy"] <= hi


def test_mixed_image_sets_are_refused(tmp_path: Path) -> None:
    a = json.loads(REPORTS[0].read_text())
    b = dict(a, n=a["n"] - 1, model="other")
    (tmp_path / "b.json").write_text(json.dumps(b))
    with pytest.raises(DataError, match="different image sets"):
        comparison_rows(load_metrics([REPORTS[0], tmp_path / "b.json"]))
    (tmp_path / "c.json").write_text("{}")
    with pytest.raises(DataError, match="not a dicom-covid evaluation"):
        load_metrics([tmp_path / "c.json"])


def test_cli_writes_table_json_and_figure(tmp_path: Path) -> None:
    latency = {
        "models": [
            {"model": json.loads(p.read_text())["model"], "predict_ms": 10.0 + i}
            for i, p in enumerate(REPORTS)
        ]
    }
    (tmp_path / "lat.json").write_text(json.dumps(latency))
    out = tmp_path / "cmp"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "dicom_covid.cli.main",
            "compare",
            *map(str, REPORTS),
            "--latency",
            str(tmp_path / "lat.json"),
            "--output-dir",
            str(out),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    md = (out / "comparison.md").read_text()
    assert "RESEARCH USE ONLY" in md and "![Model comparison](comparison.png)" in md
    rows = json.loads((out / "comparison.json").read_text())["models"]
    assert len(rows) == len(REPORTS)
    for r in rows:
        assert f"| {r['title']} |" in md
        assert f"{r['predict_ms']:.1f} |" in md
    assert (out / "comparison.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
