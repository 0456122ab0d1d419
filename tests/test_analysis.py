"""The analysis package: public names, lazy loading, and its one-way dependency on training."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import dicom_covid.analysis as analysis

TRAINING = Path(__file__).resolve().parents[1] / "dicom_covid" / "training"


def test_all_names_resolve() -> None:
    for name in analysis.__all__:
        assert getattr(analysis, name) is not None, name
    assert set(analysis.__all__) <= set(dir(analysis))
    with pytest.raises(AttributeError):
        analysis.no_such_name  # noqa: B018


def test_import_loads_no_module_torch_or_matplotlib() -> None:
    code = (
        "import sys; import dicom_covid.analysis; "
        "print(*(m for m in sys.modules if m.startswith(('dicom_covid.analysis.', 'torch', "
        "'matplotlib'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == []


def test_training_never_imports_analysis() -> None:
    """Analysis reads training's data and metrics; training must not depend on analysis."""
    offenders = []
    for path in sorted(TRAINING.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            if any("analysis" in name.split(".") for name in names):
                offenders.append(f"{path.name}:{node.lineno}")
    assert offenders == []
