"""``dicom-covid demo``: Orthanc, the OHIF viewer and dicom-covid on one machine, in one command.

What runs (all on loopback, each a child process with its log in the state folder)::

    storescu ──C-STORE──► Orthanc ──(forward.lua, stable study)──► dicom-covid serve
                            ▲  │                                          │
                            │  └── DICOMweb ◄── nginx ◄── browser (OHIF)  │
                            └──────────────── SR + heat-map SC ◄──────────┘

* **Orthanc** (Debian package) with ``deploy/orthanc/orthanc.json`` + ``forward.lua`` and the
  overrides in ``deploy/demo/orthanc-overrides.json`` (DICOMweb plugin, short ``StableAge``);
* **nginx** in the foreground with ``deploy/demo/nginx.conf.template``: it serves the prebuilt
  OHIF viewer (``npm pack @ohif/app@<pinned>``, ``dist/`` only, kept in
  ``~/.cache/dicom-covid/ohif-<version>/``), ``deploy/demo/app-config.js`` and proxies
  ``/dicom-web/`` to Orthanc;
* **dicom-covid serve**, to which Orthanc forwards each stable CR/DX study and which sends the
  Comprehensive SR and the Grad-CAM Secondary Capture back into the same study.

The command installs what is missing (``apt-get``: nginx-light, Orthanc and its DICOMweb plugin,
dcmtk; ``npm pack``: OHIF), sends sample studies with ``storescu``, waits until their results are
served by DICOMweb, prints the viewer and study URLs and the elapsed time, and keeps running until
Ctrl-C or ``dicom-covid demo --stop`` (process ids are recorded in ``<state-dir>/demo.json``).

:class:`DemoStack` is the same machinery as a Python API; ``tests/test_viewer.py`` drives it.
RESEARCH USE ONLY - NOT FOR DIAGNOSTIC USE.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Any

import typer

from ..errors import DicomCovidError
from ._app import app
from .common import BundleOption, ModelOption, fail_on_error, setup_logging

__all__ = [
    "DEFAULT_SAMPLES",
    "DemoError",
    "DemoPorts",
    "DemoStack",
    "StudyResults",
    "cache_dir",
    "default_state_dir",
    "ensure_installed",
    "ensure_ohif",
    "install_apt_packages",
    "missing_apt_packages",
    "pins",
    "stop_recorded",
]

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[2]
DEMO_DIR = ROOT / "deploy" / "demo"
ORTHANC_DEPLOY_DIR = ROOT / "deploy" / "orthanc"
SAMPLES_DIR = ROOT / "sample_dicoms"
#: Samples sent by default: two CR studies that show both outcomes with the default model, a
#: COVID-19 film ("suspected") and a non-COVID pneumonia film ("not suspected"), see
#: ``sample_dicoms/README.md``. ``--all-samples`` sends every file (also the DX and the
#: compressed ones).
DEFAULT_SAMPLES = ("covid19_cr_pa.dcm", "pneumonia_cr_pa.dcm")
ORTHANC_BIN = "/usr/sbin/Orthanc"
NGINX_BIN = "/usr/sbin/nginx"
NGINX_MIME_TYPES = Path("/etc/nginx/mime.types")
#: Preferred ports, used when free and not configured (else any free port).
PREFERRED_PORTS = {"viewer": 3000, "orthanc_http": 8042, "orthanc_dicom": 4242, "serve": 11112}
ORTHANC_AET = "ORTHANC"
SERVE_AET = "DICOMCOVID"
SENDER_AET = "DEMO"
SR_MODALITY = "SR"
#: Order in which the processes are stopped (the viewer first, the PACS last).
STOP_ORDER = ("nginx", "serve", "orthanc")
#: Words each recorded process's command line must contain before ``--stop`` signals it (the
#: children's also name the state folder, so a recycled pid is never mistaken for one of them).
_CMDLINE_TOKENS = {
    "nginx": ("nginx",),
    "serve": ("dicom_covid.cli.main", "serve"),
    "orthanc": ("Orthanc",),
    "demo": ("dicom", "demo"),
}
_STATE_FILE = "demo.json"
#: storescu proposes uncompressed syntaxes plus at most the one compressed syntax named here.
_STORESCU_SYNTAX_OPTION = {
    "1.2.840.10008.1.2.4.50": ["-xy"],  # JPEG baseline
    "1.2.840.10008.1.2.4.51": ["-xx"],  # JPEG extended
    "1.2.840.10008.1.2.4.70": ["-xs"],  # JPEG lossless SV1
    "1.2.840.10008.1.2.4.80": ["-xt"],  # JPEG-LS lossless
    "1.2.840.10008.1.2.4.81": ["-xu"],  # JPEG-LS near-lossless
    "1.2.840.10008.1.2.4.90": ["-xv"],  # JPEG 2000 lossless
    "1.2.840.10008.1.2.4.91": ["-xw"],  # JPEG 2000
    "1.2.840.10008.1.2.5": ["-xr"],  # RLE lossless
}
_OWN_ENTRIES = ("orthanc", "serve", "nginx", "app-config.js", _STATE_FILE)


class DemoError(DicomCovidError):
    """The demo cannot be installed, started or stopped."""


# -- installation ---------------------------------------------------------------------------


def pins() -> dict[str, Any]:
    """The pinned versions in ``deploy/demo/pins.json`` (OHIF package, version, integrity).

    Raises
    ------
    DemoError
        When the file is missing (the demo needs a source checkout of dicom-covid).
    """
    path = DEMO_DIR / "pins.json"
    if not path.is_file():
        raise DemoError(
            f"{path} not found: 'dicom-covid demo' needs a source checkout of dicom-covid "
            "(deploy/, sample_dicoms/). Run it from a git clone installed with pip install -e ."
        )
    return json.loads(path.read_text())


def cache_dir() -> Path:
    """Where downloads are kept: ``$XDG_CACHE_HOME/dicom-covid`` (default ``~/.cache``)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "dicom-covid"


def default_state_dir() -> Path:
    """The demo's state folder: ``$XDG_STATE_HOME/dicom-covid/demo`` (``~/.local/state``)."""
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "dicom-covid" / "demo"


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


# -- ports and processes --------------------------------------------------------------------


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("0.0.0.0", port))  # Orthanc binds every interface; be as strict
        except OSError:
            return False
    return True


def _any_free_port(taken: set[int]) -> int:
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port not in taken and _port_free(port):
            return port


@dataclass(frozen=True)
class DemoPorts:
    """TCP ports of the demo (all on loopback, except that Orthanc binds every interface)."""

    viewer: int
    orthanc_http: int
    orthanc_dicom: int
    serve: int

    @classmethod
    def pick(cls, any_free: bool = False, **configured: int | None) -> DemoPorts:
        """Configured ports (must be free), else the preferred ones when free, else free ones.

        Parameters
        ----------
        any_free : bool
            Ignore the preferred ports (tests: never collide with a running demo).
        **configured : int or None
            ``viewer``, ``orthanc_http``, ``orthanc_dicom``, ``serve``; None or 0 = choose.

        Raises
        ------
        DemoError
            When a configured port is in use.
        """
        chosen: dict[str, int] = {}
        for name in PREFERRED_PORTS:
            want = configured.get(name)
            if want:
                if not _port_free(want) or want in chosen.values():
                    raise DemoError(
                        f"port {want} (--{name.replace('_', '-')}-port) is in use; choose "
                        "another or leave it out to take a free one."
                    )
                chosen[name] = want
        for name, preferred in PREFERRED_PORTS.items():
            if name in chosen:
                continue
            if not any_free and preferred not in chosen.values() and _port_free(preferred):
                chosen[name] = preferred
            else:
                chosen[name] = _any_free_port(set(chosen.values()))
        return cls(**chosen)


def _pid_alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def _pid_is(pid: int, name: str, state_dir: Path | None = None) -> bool:
    """True when ``pid`` lives and its command line is that of the demo's process ``name``."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return False
    words = [*_CMDLINE_TOKENS[name], *([str(state_dir)] if state_dir is not None else [])]
    return _pid_alive(pid) and all(w in cmdline for w in words)


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while _pid_alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def _http(url: str, timeout: float = 10.0, data: bytes | None = None) -> bytes:
    req = urllib.request.Request(url, data=data, method="POST" if data is not None else "GET")
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return resp.read()


def _tail(path: Path, chars: int = 2000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


@dataclass
class StudyResults:
    """What DICOMweb serves for one sent study once dicom-covid's results arrived."""

    study_instance_uid: str
    #: ``(modality, series description, series instance UID)`` of every series.
    series: list[tuple[str, str, str]]
    #: Seconds from sending to the results being served by DICOMweb (through nginx).
    seconds: float

    def series_uid(self, modality: str) -> str:
        """The Series Instance UID of the first series of ``modality``."""
        return next(uid for m, _, uid in self.series if m == modality)

    def description(self, modality: str) -> str:
        """The Series Description of the first series of ``modality``."""
        return next(d for m, d, _ in self.series if m == modality)


@dataclass
class DemoStack:
    """Orthanc + nginx/OHIF + ``dicom-covid serve`` as child processes.

    Parameters
    ----------
    state_dir : pathlib.Path
        Folder for configurations, logs, Orthanc's storage and the service's state; the demo's
        own entries in it are replaced on :meth:`start`.
    ohif_dist : pathlib.Path
        The prebuilt OHIF viewer (:func:`ensure_ohif`).
    ports : DemoPorts
        Ports to use.
    bundle : pathlib.Path, optional
        MONAI bundle of ``dicom-covid serve`` (default: the shipped one).
    model : str, optional
        Model name in the bundle.
    device : str, optional
        Torch device of the worker.
    """

    state_dir: Path
    ohif_dist: Path
    ports: DemoPorts
    bundle: Path | None = None
    model: str | None = None
    device: str | None = None
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)
    started_at: float = 0.0
    _logs: list[Any] = field(default_factory=list)

    def __post_init__(self) -> None:
        # absolute: the children run elsewhere, and --stop recognises them by this path
        self.state_dir = Path(self.state_dir).resolve()
        if self.bundle is not None:
            self.bundle = Path(self.bundle).resolve()

    # -- addresses ----------------------------------------------------------------------------

    @property
    def viewer_url(self) -> str:
        """The OHIF study list."""
        return f"http://127.0.0.1:{self.ports.viewer}/"

    def study_url(self, study_instance_uid: str) -> str:
        """OHIF's viewer opened on one study."""
        query = urllib.parse.urlencode({"StudyInstanceUIDs": study_instance_uid})
        return f"http://127.0.0.1:{self.ports.viewer}/viewer?{query}"

    @property
    def dicomweb_url(self) -> str:
        """DICOMweb root as the viewer sees it (nginx → Orthanc)."""
        return f"http://127.0.0.1:{self.ports.viewer}/dicom-web"

    @property
    def orthanc_url(self) -> str:
        """Orthanc's REST API and Explorer (loopback only)."""
        return f"http://127.0.0.1:{self.ports.orthanc_http}"

    # -- configuration ------------------------------------------------------------------------

    def _clean(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        for name in _OWN_ENTRIES:
            path = self.state_dir / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()

    def write_configs(self) -> None:
        """Write Orthanc's, nginx's and OHIF's configuration into the state folder."""
        s = self.state_dir
        orthanc_dir = s / "orthanc"
        (orthanc_dir / "storage").mkdir(parents=True, exist_ok=True)
        cfg = json.loads((ORTHANC_DEPLOY_DIR / "orthanc.json").read_text())
        cfg.update(json.loads((DEMO_DIR / "orthanc-overrides.json").read_text()))
        cfg["Plugins"] = [p for p in cfg.get("Plugins", []) if Path(p).is_file()]
        if not any("DicomWeb" in p for p in cfg["Plugins"]):
            raise DemoError(
                "Orthanc's DICOMweb plugin (/usr/share/orthanc/plugins/libOrthancDicomWeb.so) "
                "is missing; apt-get install orthanc-dicomweb."
            )
        cfg.update(
            HttpPort=self.ports.orthanc_http,
            DicomPort=self.ports.orthanc_dicom,
            DicomAet=ORTHANC_AET,
            StorageDirectory=str(orthanc_dir / "storage"),
            IndexDirectory=str(orthanc_dir / "storage"),
            LuaScripts=[str(ORTHANC_DEPLOY_DIR / "forward.lua")],
        )
        cfg["DicomModalities"]["dicomcovid"].update(
            AET=SERVE_AET, Host="127.0.0.1", Port=self.ports.serve
        )
        (orthanc_dir / "orthanc.json").write_text(json.dumps(cfg, indent=2))

        nginx_dir = s / "nginx"
        for sub in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
            (nginx_dir / "tmp" / sub).mkdir(parents=True, exist_ok=True)
        user_line = ""
        if os.geteuid() == 0:
            # Workers would drop to "nobody", who cannot read a cache under /root.
            user_line = "user root;"
        text = (DEMO_DIR / "nginx.conf.template").read_text()
        for token, value in {
            "@USER_LINE@": user_line,
            "@STATE_DIR@/nginx-tmp": str(nginx_dir / "tmp"),
            "@STATE_DIR@/app-config.js": str(s / "app-config.js"),
            "@STATE_DIR@": str(nginx_dir),
            "@MIME_TYPES@": str(NGINX_MIME_TYPES),
            "@VIEWER_PORT@": str(self.ports.viewer),
            "@OHIF_DIST@": str(self.ohif_dist),
            "@ORTHANC_HTTP_PORT@": str(self.ports.orthanc_http),
        }.items():
            text = text.replace(token, value)
        if re.search(r"@[A-Z_]+@", text):
            raise DemoError("deploy/demo/nginx.conf.template holds an unknown @TOKEN@.")
        (nginx_dir / "nginx.conf").write_text(text)
        shutil.copyfile(DEMO_DIR / "app-config.js", s / "app-config.js")

    # -- life cycle ---------------------------------------------------------------------------

    def _spawn(self, name: str, cmd: list[str], cwd: Path) -> None:
        log = (self.state_dir / name / f"{name}.log").open("ab")
        self._logs.append(log)
        # Own session: a Ctrl-C in the terminal reaches only the demo, which stops the children
        # in order; --detach leaves them running after the terminal closes.
        self.processes[name] = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            start_new_session=True,
        )
        logger.debug("started %s (pid %d)", name, self.processes[name].pid)

    def log_path(self, name: str) -> Path:
        """The log file of ``orthanc``, ``serve`` or ``nginx``."""
        return self.state_dir / name / f"{name}.log"

    def start(self, timeout: float = 300.0, say: Callable[[str], None] = print) -> None:
        """Write the configurations, start the three processes and wait until they answer.

        Raises
        ------
        DemoError
            When a process exits or does not answer within ``timeout`` seconds.
        """
        if shutil.which("storescu") is None:
            raise DemoError("dcmtk's storescu is missing; apt-get install dcmtk.")
        running = running_demo(self.state_dir)
        if running is not None:
            raise DemoError(
                f"a demo already runs with the state folder {self.state_dir} (viewer "
                f"{running.get('viewer_url')}); stop it with 'dicom-covid demo --stop'."
            )
        self._clean()
        self.write_configs()
        self.started_at = time.time()
        s = self.state_dir
        (s / "serve").mkdir(exist_ok=True, mode=0o700)
        serve_cmd = [
            sys.executable,
            "-m",
            "dicom_covid.cli.main",
            "serve",
            "--ae-title",
            SERVE_AET,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.ports.serve),
            "--allow-ae",
            f"{ORTHANC_AET}@127.0.0.1",
            "--destination",
            f"{ORTHANC_AET}@127.0.0.1:{self.ports.orthanc_dicom}",
            "--state-dir",
            str(s / "serve" / "state"),
            "--quiet-period",
            "1",
            "--retry-base",
            "1",
        ]
        for flag, value in (("--bundle", self.bundle), ("--model", self.model)):
            if value is not None:
                serve_cmd += [flag, str(value)]
        if self.device is not None:
            serve_cmd += ["--device", self.device]
        self._spawn("serve", serve_cmd, ROOT)
        self._spawn("orthanc", [ORTHANC_BIN, str(s / "orthanc" / "orthanc.json")], s / "orthanc")
        self._spawn(
            "nginx",
            [
                NGINX_BIN,
                "-p",
                str(s / "nginx"),
                "-e",
                str(s / "nginx" / "nginx-error.log"),
                "-c",
                str(s / "nginx" / "nginx.conf"),
            ],
            s / "nginx",
        )
        self.record()
        say(
            f"[demo] starting Orthanc (:{self.ports.orthanc_http} HTTP, :{self.ports.orthanc_dicom}"
            f" DICOM), OHIF via nginx (:{self.ports.viewer}) and dicom-covid serve "
            f"(:{self.ports.serve})"
        )
        self._wait("Orthanc", lambda: _http(self.orthanc_url + "/system"), timeout)
        self._wait("OHIF (nginx)", lambda: _http(self.viewer_url + "app-config.js"), timeout)
        self._wait("DICOMweb via nginx", lambda: _http(self.dicomweb_url + "/studies"), timeout)
        self._wait("dicom-covid serve", self._echo_serve, timeout)

    def _echo_serve(self) -> bool:
        out = subprocess.run(
            [
                "echoscu",
                "-aet",
                ORTHANC_AET,
                "-aec",
                SERVE_AET,
                "-to",
                "5",
                "127.0.0.1",
                str(self.ports.serve),
            ],
            capture_output=True,
            timeout=30,
        )
        return out.returncode == 0

    def check_alive(self) -> None:
        """Raise :class:`DemoError` (with the log's end) when a process has exited."""
        for name, proc in self.processes.items():
            if proc.poll() is not None:
                raise DemoError(
                    f"{name} exited with status {proc.returncode}; the end of "
                    f"{self.log_path(name)}:\n{_tail(self.log_path(name))}"
                )

    def _wait(self, what: str, probe: Callable[[], object], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            self.check_alive()
            try:
                if probe():
                    return
            except (urllib.error.URLError, OSError, subprocess.SubprocessError):
                pass
            if time.monotonic() > deadline:
                raise DemoError(f"{what} did not answer within {timeout:.0f} s.")
            time.sleep(0.25)

    def record(self) -> None:
        """Write ``demo.json``: process ids, ports and URLs (read by ``--stop``)."""
        state = {
            "pids": {name: proc.pid for name, proc in self.processes.items()},
            "demo_pid": os.getpid(),
            "ports": asdict(self.ports),
            "viewer_url": self.viewer_url,
            "orthanc_url": self.orthanc_url,
            "started_at": self.started_at,
        }
        path = self.state_dir / _STATE_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2))
        tmp.replace(path)

    def send(self, paths: Sequence[Path]) -> list[str]:
        """C-STORE ``paths`` to Orthanc with ``storescu``; return their Study Instance UIDs.

        storescu proposes one compressed transfer syntax per run, so the files are sent in one
        association per transfer syntax.

        Raises
        ------
        DemoError
            When storescu fails.
        """
        import pydicom

        studies: dict[str, None] = {}
        by_syntax: dict[str, list[Path]] = {}
        for p in paths:
            ds = pydicom.dcmread(p, stop_before_pixels=True)
            studies[str(ds.StudyInstanceUID)] = None
            by_syntax.setdefault(str(ds.file_meta.TransferSyntaxUID), []).append(Path(p))
        for syntax, files in by_syntax.items():
            option = _STORESCU_SYNTAX_OPTION.get(syntax, [])
            out = subprocess.run(
                [
                    "storescu",
                    *option,
                    "-aet",
                    SENDER_AET,
                    "-aec",
                    ORTHANC_AET,
                    "127.0.0.1",
                    str(self.ports.orthanc_dicom),
                    *map(str, files),
                ],
                capture_output=True,
                text=True,
                timeout=300,
            )
            if out.returncode != 0:
                raise DemoError(
                    f"storescu could not send {', '.join(f.name for f in files)} to Orthanc: "
                    f"{out.stderr.strip()[-800:]}"
                )
        return list(studies)

    def _qido_series(self, study_uid: str) -> list[tuple[str, str, str]]:
        url = f"{self.dicomweb_url}/studies/{study_uid}/series"
        try:
            body = _http(url)
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                return []
            raise
        out = []
        for item in json.loads(body or b"[]"):

            def tag(key: str, item: dict = item) -> str:
                values = item.get(key, {}).get("Value") or [""]
                return str(values[0])

            out.append((tag("00080060"), tag("0008103E"), tag("0020000E")))
        return out

    def _failed_jobs(self) -> list[str]:
        db = self.state_dir / "serve" / "state" / "jobs.sqlite"
        if not db.is_file():
            return []
        from pacs_listener.jobs import JobStore

        with JobStore(db, create=False) as store:
            return [f"job {j.id}: {j.state} ({j.reason})" for j in store.jobs(("failed", "dead"))]

    def wait_for_results(
        self, study_uids: Sequence[str], timeout: float = 600.0, sent_at: float | None = None
    ) -> list[StudyResults]:
        """Poll DICOMweb (through nginx) until every study holds an SR and a heat-map series.

        Raises
        ------
        DemoError
            On timeout, when a process exits, or when the service failed a job.
        """
        from ..results.common import SC_SERIES_DESCRIPTION, SR_SERIES_DESCRIPTION

        sent_at = time.time() if sent_at is None else sent_at
        deadline = time.monotonic() + timeout
        done: dict[str, StudyResults] = {}
        while len(done) < len(study_uids):
            self.check_alive()
            for uid in study_uids:
                if uid in done:
                    continue
                with contextlib.suppress(urllib.error.URLError, OSError, ValueError):
                    series = self._qido_series(uid)
                    found = {(m, d) for m, d, _ in series}
                    if (SR_MODALITY, SR_SERIES_DESCRIPTION) in found and any(
                        d == SC_SERIES_DESCRIPTION for _, d in found
                    ):
                        done[uid] = StudyResults(uid, series, time.time() - sent_at)
            if len(done) == len(study_uids):
                break
            failed = self._failed_jobs()
            if failed:
                raise DemoError(
                    "dicom-covid could not analyse a study: " + "; ".join(failed) + ". See "
                    f"{self.state_dir / 'serve' / 'state' / 'service.log'}."
                )
            if time.monotonic() > deadline:
                raise DemoError(
                    f"no results after {timeout:.0f} s for {len(study_uids) - len(done)} "
                    f"study(ies). The end of {self.log_path('serve')}:\n"
                    f"{_tail(self.log_path('serve'))}"
                )
            time.sleep(0.5)
        return [done[u] for u in study_uids]

    def stop(self, timeout: float = 90.0) -> None:
        """Stop the processes (nginx, then the service, then Orthanc) and close the logs."""
        for name in STOP_ORDER:
            proc = self.processes.get(name)
            if proc is None or proc.poll() is not None:
                continue
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                logger.warning("%s did not stop within %.0f s; killing it", name, timeout)
                proc.kill()
                proc.wait(10)
        self.close_logs()
        with contextlib.suppress(FileNotFoundError):
            (self.state_dir / _STATE_FILE).unlink()

    def close_logs(self) -> None:
        """Close this process's handles on the log files (the processes keep theirs)."""
        for log in self._logs:
            log.close()
        self._logs.clear()

    def __enter__(self) -> DemoStack:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def running_demo(state_dir: Path) -> dict | None:
    """The recorded state of a demo whose processes still run, else None."""
    path = state_dir / _STATE_FILE
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    children = state.get("pids", {})
    if any(_pid_is(int(pid), name, state_dir) for name, pid in children.items() if pid):
        return state
    if state.get("demo_pid") and _pid_is(int(state["demo_pid"]), "demo"):
        return state
    return None


def stop_recorded(state_dir: Path, say: Callable[[str], None] = print) -> bool:
    """Stop the demo recorded in ``state_dir`` (``dicom-covid demo --stop``).

    The foreground ``dicom-covid demo`` is asked to stop first (it stops its children in
    order); any recorded process still alive after that is sent SIGTERM. A recorded pid is only
    signalled while its command line still names the program that was started.

    Returns
    -------
    bool
        False when no demo was running.
    """
    state = running_demo(state_dir)
    if state is None:
        return False
    demo_pid = int(state.get("demo_pid", 0))
    if demo_pid and demo_pid != os.getpid() and _pid_is(demo_pid, "demo"):
        say(f"[demo] asking dicom-covid demo (pid {demo_pid}) to stop")
        os.kill(demo_pid, signal.SIGTERM)
        _wait_gone(demo_pid, 120)
    pids = state.get("pids", {})
    for name in STOP_ORDER:
        pid = int(pids.get(name, 0))
        if pid and _pid_is(pid, name, state_dir):
            say(f"[demo] stopping {name} (pid {pid})")
            os.kill(pid, signal.SIGTERM)
            if not _wait_gone(pid, 90):
                os.kill(pid, signal.SIGKILL)
                _wait_gone(pid, 10)
    with contextlib.suppress(FileNotFoundError):
        (state_dir / _STATE_FILE).unlink()
    return True


def _process_start_time() -> float:
    """When this process started (epoch seconds), so that timings include Python's start-up."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return time.time() - (uptime - ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return time.time()


def _samples(all_samples: bool) -> list[Path]:
    if all_samples:
        paths = sorted(SAMPLES_DIR.glob("*.dcm"))
    else:
        paths = [SAMPLES_DIR / name for name in DEFAULT_SAMPLES]
    missing = [p for p in paths if not p.is_file()]
    if missing or not paths:
        raise DemoError(
            f"sample DICOMs not found in {SAMPLES_DIR}; the demo needs a source checkout."
        )
    return paths


def _check_bundle(bundle: Path | None, model: str | None) -> None:
    from ..bundle import Bundle

    b = Bundle(bundle)
    name = model or b.default_model
    if name not in b.available():
        raise DemoError(
            f"the bundle {b.root} has no trained weights for model '{name}' (available: "
            f"{', '.join(b.available()) or 'none'}). Train and install one (dicom-covid train "
            "--install --make-default) or pass --bundle/--model."
        )


@app.command()
def demo(
    stop: Annotated[
        bool, typer.Option("--stop", help="Stop a running demo (the one in --state-dir).")
    ] = False,
    all_samples: Annotated[
        bool,
        typer.Option(
            "--all-samples",
            help=(
                "Send every sample study in sample_dicoms/, nine (default: a COVID-19 and a "
                "pneumonia film)."
            ),
        ),
    ] = False,
    detach: Annotated[
        bool,
        typer.Option(
            "--detach",
            help="Return once the results are in, leaving the demo running (stop it with --stop).",
        ),
    ] = False,
    viewer_port: Annotated[
        int | None,
        typer.Option(min=0, max=65535, help="Port of the OHIF viewer (default 3000 if free)."),
    ] = None,
    orthanc_http_port: Annotated[
        int | None,
        typer.Option(min=0, max=65535, help="Orthanc's HTTP port (default 8042 if free)."),
    ] = None,
    orthanc_dicom_port: Annotated[
        int | None,
        typer.Option(min=0, max=65535, help="Orthanc's DICOM port (default 4242 if free)."),
    ] = None,
    serve_port: Annotated[
        int | None,
        typer.Option(min=0, max=65535, help="Port of dicom-covid serve (default 11112 if free)."),
    ] = None,
    state_dir: Annotated[
        Path | None,
        typer.Option(
            file_okay=False,
            help="Folder for configurations, logs and data (default "
            "~/.local/state/dicom-covid/demo); its demo entries are replaced on start.",
        ),
    ] = None,
    bundle: BundleOption = None,
    model: ModelOption = None,
    device: Annotated[str | None, typer.Option(help="Torch device (default cpu).")] = None,
    timeout: Annotated[
        float, typer.Option(min=1, help="Seconds to wait for the results (default 600).")
    ] = 600.0,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False,
) -> None:
    """Run Orthanc + the OHIF viewer + dicom-covid on this machine and show results in OHIF.

    Installs what is missing (apt: orthanc, orthanc-dicomweb, nginx-light, dcmtk; npm pack:
    the prebuilt OHIF viewer), starts everything on loopback, sends sample chest X-ray studies to
    Orthanc, waits until dicom-covid's SR and heat map are back in the PACS, prints the viewer
    URL, and runs until Ctrl-C (or 'dicom-covid demo --stop' from another terminal).
    RESEARCH USE ONLY - NOT FOR DIAGNOSTIC USE.
    """
    setup_logging(verbose)
    state = (state_dir or default_state_dir()).resolve()
    with fail_on_error():
        if stop:
            if not stop_recorded(state):
                typer.echo(f"[demo] no demo is running (state folder {state}).")
            else:
                typer.echo("[demo] stopped.")
            return
        t0 = min(_process_start_time(), time.time())
        running = running_demo(state)
        if running is not None:
            raise DemoError(
                f"a demo is already running (viewer {running.get('viewer_url')}); stop it "
                "with 'dicom-covid demo --stop' or use another --state-dir."
            )
        samples = _samples(all_samples)
        _check_bundle(bundle, model)
        dist = ensure_installed(browser=False, say=typer.echo)
        t_installed = time.time()
        ports = DemoPorts.pick(
            viewer=viewer_port,
            orthanc_http=orthanc_http_port,
            orthanc_dicom=orthanc_dicom_port,
            serve=serve_port,
        )
        stack = DemoStack(state, dist, ports, bundle=bundle, model=model, device=device)

        def on_signal(signum: int, frame: object) -> None:
            raise KeyboardInterrupt

        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, on_signal)
        leave_running = False
        try:
            stack.start(say=typer.echo)
            t_up = time.time()
            typer.echo(f"[demo] sending {len(samples)} sample study(ies) to Orthanc")
            uids = stack.send(samples)
            results = stack.wait_for_results(uids, timeout=timeout, sent_at=time.time())
            t_done = time.time()
            _report(stack, results, t0, t_installed, t_up, t_done)
            if detach:
                where = f" --state-dir {state}" if state_dir else ""
                typer.echo(f"[demo] left running; stop it with: dicom-covid demo --stop{where}")
                leave_running = True
                return
            typer.echo("[demo] running; press Ctrl-C (or run 'dicom-covid demo --stop') to stop.")
            while True:
                time.sleep(1.0)
                stack.check_alive()
        except KeyboardInterrupt:
            typer.echo("\n[demo] stopping ...")
        finally:
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            if leave_running:
                stack.close_logs()
            else:
                stack.stop()
                typer.echo("[demo] stopped.")


def _report(
    stack: DemoStack,
    results: list[StudyResults],
    t0: float,
    t_installed: float,
    t_up: float,
    t_done: float,
) -> None:
    typer.echo("")
    typer.echo("RESEARCH USE ONLY - NOT FOR DIAGNOSTIC USE.")
    typer.echo(f"OHIF viewer (study list): {stack.viewer_url}")
    for r in results:
        typer.echo(f"  study: {stack.study_url(r.study_instance_uid)}")
        for modality, desc, _ in sorted(r.series):
            typer.echo(f"    {modality:<3} {desc}")
    typer.echo(f"Orthanc Explorer: {stack.orthanc_url}/app/explorer.html")
    typer.echo(
        f"Results available {t_done - t0:.1f} s after start (install/check "
        f"{t_installed - t0:.1f} s, services up {t_up - t_installed:.1f} s, "
        f"sent -> SR + heat map served by DICOMweb {t_done - t_up:.1f} s)."
    )
    typer.echo(
        "In OHIF: open a study, then double-click the 'dicom-covid AI result' series in the "
        "left panel: the hot region is outlined on the image, the probabilities are in its "
        "text box; the heat map is the 'dicom-covid Grad-CAM heat map' series."
    )
