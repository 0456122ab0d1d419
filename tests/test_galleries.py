"""The one rule for images shown in committed figures, and the gallery sampling helpers."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
from helpers import ROOT

from dicom_covid.analysis.galleries import licence_allows_gallery, may_show, showable, spread
from dicom_covid.training.data import ManifestRow, read_manifest


@pytest.mark.parametrize(
    ("licence", "allowed"),
    [
        ("CC BY", True),
        ("CC BY 3.0", True),
        ("CC BY 4.0", True),
        ("cc by 4.0", True),
        ("CC-BY 2.0", True),
        ("  CC BY   4.0 ", True),
        ("CC0", True),
        ("CC0 1.0", True),
        ("public domain", True),
        ("CC BY-NC-SA", False),
        ("CC BY-NC-SA 4.0", False),
        ("CC BY-SA 4.0", False),
        ("CC BY-NC 4.0", False),
        ("CC BY-ND 4.0", False),
        ("CC BY 4.0 (NC)", False),
        ("listed as authorized for everyone", False),
        (
            "NIH Clinical Center: usable without restriction, with citation (via "
            "muhammedtalo/COVID-19 selection)",
            False,
        ),
        ("unspecified (README: research purposes only)", False),
        ("unverified (Kaggle COVID-19 Radiography DB; images from RSNA/NIH CXR14)", False),
        ("", False),
        (None, False),
    ],
)
def test_licence_rule(licence: str | None, allowed: bool) -> None:
    assert licence_allows_gallery(licence) is allowed


def _row(licence: str, status: str | None = "open", label: str = "covid") -> ManifestRow:
    extra = {"license": licence}
    if status is not None:
        extra["license_status"] = status
    return ManifestRow(path=Path(f"{licence}-{status}.png"), label=label, extra=extra)


def test_license_status_must_be_open_where_the_manifest_has_it() -> None:
    assert may_show(_row("CC BY 4.0"))
    assert may_show(_row("CC BY 4.0", status=None))  # manifests without the column
    assert not may_show(_row("CC BY 4.0", status="unverified"))
    assert not may_show(_row("CC BY 4.0", status="research-only-unspecified"))
    assert not may_show(_row("CC BY-NC-SA 4.0"))


def test_showable_keeps_order_and_reads_rows_of_wrapped_items() -> None:
    rows = [_row("CC BY"), _row("CC BY-NC-SA"), _row("CC0"), _row("CC BY", "unverified")]
    assert showable(rows) == [rows[0], rows[2]]
    wrapped = [(i, r) for i, r in enumerate(rows)]
    assert showable(wrapped, row_of=lambda item: item[1]) == [wrapped[0], wrapped[2]]


@pytest.mark.parametrize(
    ("n_items", "n", "expected"),
    [
        (10, 3, [0, 3, 6]),
        (10, 0, []),
        (2, 5, [0, 1]),
        (0, 3, []),
        (7, 7, list(range(7))),
    ],
)
def test_spread(n_items: int, n: int, expected: list[int]) -> None:
    assert spread(list(range(n_items)), n) == expected


def test_rule_on_the_development_set() -> None:
    """On the real manifest the rule picks exactly the CC BY (3.0, 4.0) images."""
    data = ROOT.parent / "shared" / "data" / "cxr"
    if not (data / "manifest.csv").is_file():
        pytest.skip(f"development set not found at {data}")
    rows = read_manifest(data)
    shown = showable(rows)
    assert shown, "no image of the development set may be shown"
    assert {r.extra["license"] for r in shown} == {"CC BY", "CC BY 3.0", "CC BY 4.0"}
    assert all(r.extra["license_status"] == "open" for r in shown)
    assert not any("NC" in r.extra["license"] for r in shown)


@pytest.mark.parametrize("module", ["cli/heatmap.py", "cli/lungs.py"])
def test_commands_hold_no_licence_rule_of_their_own(module: str) -> None:
    """Both figure commands use analysis.galleries: no licence name in their code (help aside)."""
    tree = ast.parse((ROOT / "dicom_covid" / module).read_text())
    in_help = {
        id(node)
        for kw in ast.walk(tree)
        if isinstance(kw, ast.keyword) and kw.arg == "help"
        for node in ast.walk(kw.value)
    }
    strings = [
        node.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant)
        and isinstance(node.value, str)
        and id(node) not in in_help
    ]
    assert not [t for t in strings if re.search(r"CC ?BY|CC0|public domain", t, re.I)]
    assert any(
        isinstance(node, ast.ImportFrom) and node.module == "analysis.galleries"
        for node in ast.walk(tree)
    )
