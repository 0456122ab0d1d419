"""Packaging: the wheel carries the default model and classifies outside the checkout.

The wheel is built with ``python -m build --wheel`` from a copy of the source tree whose
``monai_bundle/`` is a link to the checkout's (so the checkout's ``build/`` and ``*.egg-info``
stay untouched while others work in it). It is installed into a fresh venv in a temporary folder
that reuses the dependencies of the test interpreter through a ``.pth`` file naming its
site-packages (a ``.pth`` file inside that folder, such as the editable install's finder, is not
processed there, so ``import dicom_covid`` finds the wheel). The installed ``dicom-covid`` then
runs from a folder outside the checkout.

The lookup of the default bundle (``$DICOM_COVID_BUNDLE``, the checkout, the installed copy) is
checked in-process as well, without building anything.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
from helpers import ROOT

from dicom_covid.bundle import Bundle
from dicom_covid.config import (
    BUNDLE_ENV,
    CHECKOUT_BUNDLE_DIR,
    DEFAULT_BUNDLE_DIR,
    PACKAGED_BUNDLE_DIR,
    default_bundle_dir,
)
from dicom_covid.errors import BundleError
from dicom_covid.prediction import DISCLAIMER

SAMPLE = ROOT / "sample_dicoms" / "covid19_cr_pa.dcm"
#: Largest wheel accepted: the default model's weights are about 7 MB; every model is 250 MB.
MAX_WHEEL_BYTES = 20 * 2**20
PACKAGED = "dicom_covid/_default_bundle/"


def run(
    *cmd: str | Path, cwd: Path, env: dict[str, str] | None = None, timeout: int = 600
) -> subprocess.CompletedProcess:
    """Run ``cmd`` and return the completed process (output captured as text)."""
    return subprocess.run(
        [str(c) for c in cmd],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def check(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, (
        f"{proc.args}: exit {proc.returncode}\n{proc.stdout[-3000:]}{proc.stderr[-6000:]}"
    )
    return proc


def clean_env() -> dict[str, str]:
    """The environment without anything that points Python or dicom-covid at the checkout."""
    env = {k: v for k, v in os.environ.items() if k not in (BUNDLE_ENV, "PYTHONPATH")}
    return dict(env, PYTHONWARNINGS="ignore", TQDM_DISABLE="1")


# --- the lookup of the default bundle ------------------------------------------------------


def test_checkout_uses_its_monai_bundle(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(BUNDLE_ENV, raising=False)
    assert DEFAULT_BUNDLE_DIR == CHECKOUT_BUNDLE_DIR == ROOT / "monai_bundle"
    assert default_bundle_dir() == CHECKOUT_BUNDLE_DIR
    assert Bundle().root == CHECKOUT_BUNDLE_DIR
    assert not PACKAGED_BUNDLE_DIR.exists(), "the bundle copy is a build output, never in git"


def test_environment_variable_comes_first(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    shutil.copytree(CHECKOUT_BUNDLE_DIR / "configs", bundle / "configs")
    monkeypatch.setenv(BUNDLE_ENV, str(bundle))
    assert default_bundle_dir() == bundle
    assert Bundle().root == bundle
    assert Bundle(CHECKOUT_BUNDLE_DIR).root == CHECKOUT_BUNDLE_DIR  # an explicit root wins


def test_wrong_environment_variable_says_so(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv(BUNDLE_ENV, str(tmp_path))
    with pytest.raises(BundleError, match=rf"\${BUNDLE_ENV} names it.*unset it"):
        Bundle()


# --- the wheel ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``python -m build --wheel`` of the working tree; fails under ``CI=true`` without build."""
    if importlib.util.find_spec("build") is None:
        msg = "the 'build' package is missing; install the test extra: pip install -e '.[test]'"
        if os.environ.get("CI") == "true":
            pytest.fail(msg)
        pytest.skip(msg)
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "_default_bundle")
    for package in ("dicom_covid", "pacs_listener"):
        shutil.copytree(ROOT / package, src / package, ignore=ignore)
    (src / "monai_bundle").symlink_to(CHECKOUT_BUNDLE_DIR, target_is_directory=True)
    out = tmp / "dist"
    # --no-isolation: the test interpreter's setuptools builds it (no download); a user's plain
    # `python -m build --wheel` runs the same setup.py in an isolated environment.
    check(
        run(
            *(sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", out, src),
            cwd=src,
            env=clean_env(),
        )
    )
    wheels = sorted(out.glob("dicom_covid-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


@pytest.fixture(scope="module")
def venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv outside the checkout with the wheel installed (dependencies reused)."""
    root = tmp_path_factory.mktemp("venv") / "venv"
    check(run(sys.executable, "-m", "venv", "--without-pip", root, cwd=root.parent))
    python = root / "bin" / "python"
    purelib = check(
        run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", cwd=root)
    ).stdout.strip()
    ours = sysconfig.get_paths()
    deps = dict.fromkeys([ours["purelib"], ours["platlib"]])  # ordered, no duplicates
    (Path(purelib) / "_dicom_covid_test_deps.pth").write_text("\n".join(deps) + "\n")
    check(
        run(
            *(sys.executable, "-m", "pip", "--python", python, "install", "--no-deps"),
            *("--no-index", "--no-compile", wheel),
            cwd=root.parent,
            env=clean_env(),
        )
    )
    return root


@pytest.mark.slow
def test_wheel_ships_only_the_default_model(wheel: Path) -> None:
    size = wheel.stat().st_size
    assert size < MAX_WHEEL_BYTES, f"wheel is {size / 2**20:.1f} MiB"
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {n.removeprefix(PACKAGED) for n in names if n.startswith(PACKAGED)}
    full = Bundle(CHECKOUT_BUNDLE_DIR)
    own = full.metadata["dicom_covid"]
    default = full.facts(full.default_model)
    models = [default.name, *default.members]  # an ensemble ships its members
    expected_weights = {own["lung_segmenter"]["weights"]}
    for name in models:
        facts = full.facts(name)
        if facts.weights is not None:
            expected_weights.add(facts.weights.relative_to(full.root).as_posix())
        ood = (facts.raw.get("abstention") or {}).get("ood") or {}
        if ood.get("file"):
            expected_weights.add(ood["file"])
    assert {n for n in shipped if n.endswith(".safetensors")} == expected_weights
    for rel in (
        "configs/metadata.json",
        "configs/inference.json",
        *(own["models"][name]["facts"] for name in models),
        own["lung_segmenter"]["facts"],
        "LICENSE",
        "docs/README.md",
        "docs/data_license.txt",
    ):
        assert rel in shipped, f"{rel} is missing from the wheel"
    meta = json.loads(zipfile.ZipFile(wheel).read(PACKAGED + "configs/metadata.json"))
    assert meta["dicom_covid"]["default_model"] == full.default_model
    assert list(meta["dicom_covid"]["models"]) == models
    assert meta["version"] == full.version
    assert not any(n.startswith(("tests/", "monai_bundle/")) for n in names)


@pytest.mark.slow
def test_installed_wheel_predicts_outside_the_checkout(venv: Path, tmp_path: Path) -> None:
    env = clean_env()
    where = check(
        run(
            venv / "bin" / "python",
            "-c",
            "import dicom_covid, dicom_covid.config as c; "
            "print(dicom_covid.__file__); print(c.default_bundle_dir())",
            cwd=tmp_path,
            env=env,
        )
    ).stdout.split()
    assert Path(where[0]).is_relative_to(venv), where
    assert Path(where[1]).is_relative_to(venv) and where[1].endswith("_default_bundle"), where
    proc = check(run(venv / "bin" / "dicom-covid", "predict", SAMPLE, cwd=tmp_path, env=env))
    default = Bundle(CHECKOUT_BUNDLE_DIR).default_model
    assert proc.stdout.startswith("model: ") and f"({default})" in proc.stdout.splitlines()[0]
    assert any(line.startswith(str(SAMPLE)) for line in proc.stdout.splitlines())
    assert DISCLAIMER in proc.stdout


@pytest.mark.slow
def test_installed_wheel_uses_other_bundles(venv: Path, tmp_path: Path) -> None:
    full = Bundle(CHECKOUT_BUNDLE_DIR)
    others = [m for m in full.available("single") if m != full.default_model]
    if not others:
        pytest.skip("the checkout's bundle has no trained model besides the default")
    other = min(others, key=lambda m: full.facts(m).weights.stat().st_size)
    env = clean_env()
    python = venv / "bin" / "python"
    script = "from dicom_covid.bundle import Bundle; print(Bundle().root, Bundle().available())"
    proc = check(run(python, "-c", script, cwd=tmp_path, env=env))
    assert other not in proc.stdout
    proc = check(
        run(python, "-c", script, cwd=tmp_path, env=dict(env, **{BUNDLE_ENV: str(full.root)}))
    )
    assert str(full.root) in proc.stdout and other in proc.stdout
    proc = run(
        *(venv / "bin" / "dicom-covid", "predict", "--model", other, SAMPLE),
        cwd=tmp_path,
        env=env,
    )
    assert proc.returncode == 1 and f"model {other!r} is not in the bundle" in proc.stderr
    proc = check(
        run(
            *(venv / "bin" / "dicom-covid", "predict", "--model", other),
            *("--bundle", full.root, SAMPLE),
            cwd=tmp_path,
            env=env,
        )
    )
    assert f"({other})" in proc.stdout and DISCLAIMER in proc.stdout
