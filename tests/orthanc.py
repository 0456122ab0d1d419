"""A real Orthanc on loopback for tests, configured from ``deploy/orthanc/``.

>>> with running_orthanc(tmp_path, dicomcovid_port=11112) as pacs:  # doctest: +SKIP
...     pacs.get("/system")

The configuration is ``deploy/orthanc/orthanc.json`` with free HTTP and DICOM ports, storage in
the temporary folder, ``deploy/orthanc/forward.lua`` as Lua script, a short ``StableAge`` and the
``dicomcovid`` modality pointing at the test's ``dicom-covid serve``. Orthanc has no bind-address
setting; ``RemoteAccessAllowed`` stays false so its REST API only answers on loopback.
"""

from __future__ import annotations

import base64
import contextlib
import json
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy" / "orthanc"
ORTHANC = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
#: Orthanc's DICOMweb plugin as the Debian package ``orthanc-dicomweb`` installs it.
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def available() -> bool:
    """True when the Orthanc binary is installed."""
    return Path(ORTHANC).is_file()


def dicomweb_available() -> bool:
    """True when Orthanc and its DICOMweb plugin are installed."""
    return available() and DICOMWEB_PLUGIN.is_file()


@dataclass
class Orthanc:
    """A running Orthanc: its ports, AE title and a tiny REST client."""

    http_port: int
    dicom_port: int
    aet: str
    folder: Path
    process: subprocess.Popen
    auth: tuple[str, str] | None = None  # (user, password) when authentication is on

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def _call(self, method: str, path: str, body: object = None) -> bytes:
        data = None
        if body is not None:
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method)
        if self.auth is not None:
            token = base64.b64encode(":".join(self.auth).encode()).decode()
            req.add_header("Authorization", f"Basic {token}")
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.read()

    def get(self, path: str) -> object:
        """GET a JSON resource."""
        return json.loads(self._call("GET", path))

    def get_bytes(self, path: str) -> bytes:
        """GET raw bytes (e.g. ``/instances/{id}/file``)."""
        return self._call("GET", path)

    def post(self, path: str, body: object) -> object:
        """POST and decode the JSON answer."""
        return json.loads(self._call("POST", path, body) or b"null")

    def study_id(self, study_instance_uid: str) -> str | None:
        """Orthanc's id of a study, by Study Instance UID."""
        for hit in self.post("/tools/lookup", study_instance_uid.encode()):
            if hit.get("Type") == "Study":
                return hit["ID"]
        return None

    def log(self) -> str:
        """What Orthanc printed so far."""
        p = self.folder / "orthanc.log"
        return p.read_text(errors="replace") if p.exists() else ""


def write_config(
    folder: Path,
    dicomcovid_port: int,
    http_port: int,
    dicom_port: int,
    stable_age: int = 1,
    lua: bool = True,
    dicomweb: bool = False,
    users: dict[str, str] | None = None,
    listeners: list[int] | None = None,
) -> Path:
    """Write the deploy configuration adapted to a test into ``folder``; return its path.

    ``dicomweb`` loads the DICOMweb plugin (STOW-RS at ``/dicom-web/studies``); ``users``
    (name: password) turns on HTTP basic authentication of the REST API and DICOMweb;
    ``listeners`` (ports) replaces the one ``dicomcovid`` modality by ``dicomcovid-1``,
    ``dicomcovid-2``, ... (the listeners of a multi-node service, see ``forward.lua``).
    """
    cfg = json.loads((DEPLOY / "orthanc.json").read_text())
    storage = folder / "storage"
    storage.mkdir(parents=True, exist_ok=True)
    cfg.update(
        Name="dicom-covid test",
        HttpPort=http_port,
        DicomPort=dicom_port,
        StorageDirectory=str(storage),
        IndexDirectory=str(storage),
        StableAge=stable_age,
        LuaScripts=[str(DEPLOY / "forward.lua")] if lua else [],
        RemoteAccessAllowed=False,
        AuthenticationEnabled=bool(users),
    )
    if users:
        cfg["RegisteredUsers"] = dict(users)
    if dicomweb:
        cfg["Plugins"] = [str(DICOMWEB_PLUGIN)]
        cfg["DicomWeb"] = {"Enable": True, "Root": "/dicom-web/"}
    cfg["DicomModalities"]["dicomcovid"]["Port"] = dicomcovid_port
    cfg["DicomModalities"]["dicomcovid"]["Host"] = "127.0.0.1"
    if listeners:
        entry = cfg["DicomModalities"].pop("dicomcovid")
        for i, port in enumerate(listeners, start=1):
            cfg["DicomModalities"][f"dicomcovid-{i}"] = {**entry, "Port": port}
    path = folder / "orthanc.json"
    path.write_text(json.dumps(cfg, indent=2))
    return path


@contextlib.contextmanager
def running_orthanc(
    folder: Path,
    dicomcovid_port: int,
    stable_age: int = 1,
    lua: bool = True,
    timeout: float = 60.0,
    dicomweb: bool = False,
    users: dict[str, str] | None = None,
    listeners: list[int] | None = None,
) -> Iterator[Orthanc]:
    """Start Orthanc with the deploy configuration, wait for ``/system``, stop it afterwards.

    Parameters
    ----------
    folder : pathlib.Path
        Folder for the configuration, storage and log.
    dicomcovid_port : int
        Port of the ``dicom-covid serve`` the Lua script forwards to.
    stable_age : int
        Orthanc's ``StableAge`` in seconds.
    lua : bool
        Load ``deploy/orthanc/forward.lua``.
    timeout : float
        Seconds to wait for the REST API.
    dicomweb, users : bool, dict
        Load the DICOMweb plugin; basic-auth users (see :func:`write_config`).
    listeners : list of int, optional
        Ports of several dicom-covid listeners instead of ``dicomcovid_port``.
    """
    folder.mkdir(parents=True, exist_ok=True)
    http_port, dicom_port = _free_port(), _free_port()
    config = write_config(
        folder, dicomcovid_port, http_port, dicom_port, stable_age, lua, dicomweb, users, listeners
    )
    log = (folder / "orthanc.log").open("wb")
    proc = subprocess.Popen(
        [ORTHANC, str(config)], stdout=log, stderr=subprocess.STDOUT, cwd=folder
    )
    auth = next(iter(users.items())) if users else None
    pacs = Orthanc(http_port, dicom_port, "ORTHANC", folder, proc, auth)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"Orthanc exited with {proc.returncode}:\n{pacs.log()}")
            try:
                pacs.get("/system")
                break
            except (urllib.error.URLError, ConnectionError, OSError):
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"Orthanc did not answer within {timeout} s:\n{pacs.log()}"
                    ) from None
                time.sleep(0.2)
        yield pacs
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        log.close()
