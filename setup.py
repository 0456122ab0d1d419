"""Build hooks: ship the default model inside the package.

``pyproject.toml`` holds the project's metadata; this file only adds two setuptools commands.
``monai_bundle/`` (in git) stays the one source of truth of every model. When a wheel is built,
``build_py`` copies the part of it that the default model needs into
``dicom_covid/_default_bundle/`` of the build tree (never into the source tree), so an installed
wheel classifies images without a checkout; ``sdist`` puts the same files into the source
archive, so a wheel built from it has them too. Other models are used with ``--bundle FOLDER``.

What the default model needs (``default_bundle_files``): ``configs/`` (``metadata.json`` with
``dicom_covid.models`` cut to the shipped models), the model's facts and weights (for an
ensemble: each member's), the out-of-distribution file its facts name
(``abstention.ood.file``), the lung-field U-Net (``dicom_covid.lung_segmenter``: lung crop and
the no-lung-fields check), and the bundle's ``LICENSE``, ``docs/README.md`` (model card) and
``docs/data_license.txt``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.sdist import sdist

HERE = Path(__file__).resolve().parent
BUNDLE = HERE / "monai_bundle"
#: Where the default model's bundle goes inside the package (``dicom_covid.config``).
PACKAGED = Path("dicom_covid") / "_default_bundle"
#: Bundle files shipped whatever the default model is (MONAI bundle layout, licences).
ALWAYS = ("LICENSE", "docs/README.md", "docs/data_license.txt")


def default_bundle_files(root: Path) -> tuple[list[str], dict]:
    """The files of bundle ``root`` that its default model needs, and the metadata to ship.

    Parameters
    ----------
    root : pathlib.Path
        A dicom-covid MONAI bundle folder.

    Returns
    -------
    files : list of str
        Paths relative to ``root``, sorted; ``configs/metadata.json`` is not among them.
    metadata : dict
        ``configs/metadata.json`` with ``dicom_covid.models`` cut to the default model (and its
        members, for an ensemble).

    Raises
    ------
    SystemExit
        The bundle, its default model or one of the files it names is missing.
    """
    meta_path = root / "configs" / "metadata.json"
    if not meta_path.is_file():
        raise SystemExit(
            f"{meta_path} not found: building dicom-covid needs its model bundle "
            "(monai_bundle/ of the git checkout, or of the sdist)."
        )
    meta = json.loads(meta_path.read_text())
    own = meta["dicom_covid"]
    name = own.get("default_model", "")
    models = own["models"]
    if name not in models:
        raise SystemExit(f"{meta_path}: default model {name!r} is not among its models.")
    names = [name, *models[name].get("members", [])]
    files = {p.relative_to(root).as_posix() for p in (root / "configs").iterdir() if p.is_file()}
    files.discard("configs/metadata.json")
    files.update(ALWAYS)
    for model in names:
        entry = models[model]
        files.add(entry["facts"])
        if "weights" in entry:
            files.add(entry["weights"])
        facts = json.loads((root / entry["facts"]).read_text())
        ood = (facts.get("abstention") or {}).get("ood") or {}
        if ood.get("file"):
            files.add(ood["file"])
    segmenter = own.get("lung_segmenter")
    if isinstance(segmenter, dict):
        files.update((segmenter["weights"], segmenter["facts"]))
    missing = sorted(f for f in files if not (root / f).is_file())
    if missing:
        raise SystemExit(
            f"{root}: the default model {name!r} needs {', '.join(missing)}, which are missing; "
            "restore them (git, or 'dicom-covid train --install') before building."
        )
    own["models"] = {m: models[m] for m in names}
    return sorted(files), meta


def copy_default_bundle(source: Path, target: Path) -> None:
    """Write the default model's part of bundle ``source`` into the folder ``target``.

    Parameters
    ----------
    source : pathlib.Path
        The full bundle (``monai_bundle/``).
    target : pathlib.Path
        Destination; replaced when it exists.
    """
    files, meta = default_bundle_files(source)
    if target.exists():
        shutil.rmtree(target)
    for rel in files:
        (target / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source / rel, target / rel)
    (target / "configs").mkdir(parents=True, exist_ok=True)
    (target / "configs" / "metadata.json").write_text(json.dumps(meta, indent=2) + "\n")


class BuildPyWithBundle(build_py):
    """``build_py`` that also puts the default model's bundle into the built package."""

    def run(self) -> None:
        """Build the packages, then copy the bundle (not for an editable install)."""
        super().run()
        if self.editable_mode or self.dry_run:
            return  # an editable install reads monai_bundle/ of the checkout
        copy_default_bundle(BUNDLE, Path(self.build_lib) / PACKAGED)


class SdistWithBundle(sdist):
    """``sdist`` that includes the default model's bundle as ``monai_bundle/``."""

    def make_release_tree(self, base_dir: str, files: list[str]) -> None:
        """Lay out the archive's files, then add the bundle."""
        super().make_release_tree(base_dir, files)
        copy_default_bundle(BUNDLE, Path(base_dir) / "monai_bundle")


setup(cmdclass={"build_py": BuildPyWithBundle, "sdist": SdistWithBundle})
