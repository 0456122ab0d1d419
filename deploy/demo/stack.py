"""The demo stack: Orthanc + nginx/OHIF + ``dicom-covid serve`` as child processes."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .common import (
    DEMO_DIR,
    NGINX_BIN,
    NGINX_MIME_TYPES,
    ORTHANC_AET,
    ORTHANC_BIN,
    ORTHANC_DEPLOY_DIR,
    ROOT,
    SENDER_AET,
    SERVE_AET,
    SR_MODALITY,
    STATE_FILE,
    STOP_ORDER,
    DemoError,
)
from .processes import DemoPorts, running_demo

__all__ = ["DemoStack", "StudyResults"]

logger = logging.getLogger(__name__)

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
_OWN_ENTRIES = ("orthanc", "serve", "nginx", "app-config.js", STATE_FILE)


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
        path = self.state_dir / STATE_FILE
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
        from dicom_covid.results.common import SC_SERIES_DESCRIPTION, SR_SERIES_DESCRIPTION

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
            (self.state_dir / STATE_FILE).unlink()

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
