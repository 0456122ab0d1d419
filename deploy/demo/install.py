"""Installing what the demo needs: Debian packages (apt-get) and the prebuilt OHIF viewer (npm)."""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from .common import NGINX_BIN, ORTHANC_BIN, DemoError, cache_dir, pins

__all__ = ["ensure_installed", "ensure_ohif", "install_apt_packages", "missing_apt_packages"]


def missing_apt_packages(packages: Iterable[str]) -> list[str]:
    """The Debian packages among ``packages`` that are not installed."""
    missing = []
    for pkg in packages:
        out = subprocess.run(
            ["dpkg-query", "-W", "-f=${Status}", pkg], capture_output=True, text=True
        )
        if out.returncode != 0 or "install ok installed" not in out.stdout:
            missing.append(pkg)
    return missing


def install_apt_packages(packages: Sequence[str], say: Callable[[str], None] = print) -> None:
    """Install missing Debian packages with ``apt-get`` (through ``sudo -n`` when not root).

    Raises
    ------
    DemoError
        When apt-get is unavailable or fails.
    """
    missing = missing_apt_packages(packages)
    if not missing:
        return
    if shutil.which("apt-get") is None:
        raise DemoError(
            f"the Debian packages {' '.join(missing)} are missing and there is no apt-get; "
            "install their equivalents by hand."
        )
    prefix: list[str] = []
    if os.geteuid() != 0:
        if shutil.which("sudo") is None:
            raise DemoError(
                f"the Debian packages {' '.join(missing)} are missing; run as root or install "
                f"them: sudo apt-get install {' '.join(missing)}"
            )
        prefix = ["sudo", "-n"]
    say(f"[demo] installing Debian packages: {' '.join(missing)}")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (
        [*prefix, "apt-get", "update", "-qq"],
        [*prefix, "apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing],
    ):
        out = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if out.returncode != 0:
            raise DemoError(
                f"'{' '.join(cmd)}' failed with exit status {out.returncode}: "
                f"{(out.stderr or out.stdout).strip()[-800:]}\nInstall the packages by hand "
                f"(apt-get install {' '.join(missing)}) and run the demo again."
            )


def _sri(data_path: Path) -> str:
    digest = hashlib.sha512()
    with data_path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return "sha512-" + base64.b64encode(digest.digest()).decode()


def ensure_ohif(cache: Path | None = None, say: Callable[[str], None] = print) -> Path:
    """The prebuilt OHIF viewer (``dist/`` of the pinned ``@ohif/app``), fetched once.

    ``npm pack`` downloads the package tarball (nothing is built or installed); its sha512 must
    match ``deploy/demo/pins.json``; ``package/dist/`` is unpacked into
    ``<cache>/ohif-<version>/``.

    Parameters
    ----------
    cache : pathlib.Path, optional
        Cache folder (default :func:`cache_dir`).
    say : callable
        Progress printer.

    Returns
    -------
    pathlib.Path
        The folder holding OHIF's ``index.html``.

    Raises
    ------
    DemoError
        When npm is missing, the download fails or the tarball does not match the pin.
    """
    pin = pins()["ohif"]
    target = (cache or cache_dir()) / f"ohif-{pin['version']}"
    if (target / "index.html").is_file():
        return target
    npm = shutil.which("npm")
    if npm is None:
        raise DemoError(
            "npm is needed once to fetch the OHIF viewer and was not found; install Node.js "
            "20+ with npm (e.g. apt-get install npm) and run the demo again."
        )
    spec = f"{pin['package']}@{pin['version']}"
    say(f"[demo] fetching the prebuilt OHIF viewer {spec} (npm pack, ~50 MB)")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".ohif-") as tmp:
        out = subprocess.run(
            [npm, "pack", spec, "--json", "--silent", "--pack-destination", tmp],
            capture_output=True,
            text=True,
            cwd=tmp,
            timeout=900,
        )
        tarballs = list(Path(tmp).glob("*.tgz"))
        if out.returncode != 0 or len(tarballs) != 1:
            raise DemoError(
                f"'npm pack {spec}' failed (exit status {out.returncode}): "
                f"{(out.stderr or out.stdout).strip()[-800:]}\nCheck network access to the npm "
                "registry (npm config get registry)."
            )
        got = _sri(tarballs[0])
        if got != pin["integrity"]:
            raise DemoError(
                f"{tarballs[0].name} has integrity {got}, but deploy/demo/pins.json pins "
                f"{pin['integrity']}; the registry served a different file. Do not use it."
            )
        unpacked = Path(tmp) / "unpacked"
        with tarfile.open(tarballs[0]) as tar:
            members = [m for m in tar.getmembers() if m.name.startswith("package/dist/")]
            tar.extractall(unpacked, members=members, filter="data")
        dist = unpacked / "package" / "dist"
        if not (dist / "index.html").is_file():
            raise DemoError(f"{spec} holds no dist/index.html; pin another version.")
        shutil.rmtree(target, ignore_errors=True)
        dist.rename(target)
    say(f"[demo] OHIF {pin['version']} unpacked into {target}")
    return target


def ensure_installed(browser: bool = False, say: Callable[[str], None] = print) -> Path:
    """Install what the demo needs (Debian packages, OHIF); return OHIF's folder.

    Parameters
    ----------
    browser : bool
        Also install Chromium (for the browser test; the demo itself needs no browser).
    say : callable
        Progress printer.

    Raises
    ------
    DemoError
        When something cannot be installed.
    """
    p = pins()
    packages = list(p["apt"]) + (list(p["apt_browser"]) if browser else [])
    if shutil.which("npm") is None and not (cache_dir() / f"ohif-{p['ohif']['version']}").is_dir():
        packages.append("npm")
    install_apt_packages(packages, say)
    for binary in (ORTHANC_BIN, NGINX_BIN):
        if not Path(binary).is_file():
            raise DemoError(f"{binary} is missing after installing {' '.join(packages)}.")
    return ensure_ohif(say=say)
