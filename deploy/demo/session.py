"""One foreground run of ``dicom-covid demo``: install, start, send the samples, report, wait."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

from .common import DEFAULT_SAMPLES, SAMPLES_DIR, DemoError
from .install import ensure_installed
from .processes import DemoPorts, running_demo
from .stack import DemoStack, StudyResults

__all__ = ["run"]


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
    from dicom_covid.bundle import Bundle

    b = Bundle(bundle)
    name = model or b.default_model
    if name not in b.available():
        raise DemoError(
            f"the bundle {b.root} has no trained weights for model '{name}' (available: "
            f"{', '.join(b.available()) or 'none'}). Train and install one (dicom-covid train "
            "--install --make-default) or pass --bundle/--model."
        )


def run(
    state: Path,
    *,
    all_samples: bool = False,
    detach: bool = False,
    ports: dict[str, int | None] | None = None,
    bundle: Path | None = None,
    model: str | None = None,
    device: str | None = None,
    timeout: float = 600.0,
    stop_command: str = "dicom-covid demo --stop",
    say: Callable[[str], None] = print,
) -> None:
    """Start the stack, send the sample studies, print where to see the results, and wait.

    Runs until Ctrl-C or SIGTERM (``dicom-covid demo --stop``), then stops the processes; with
    ``detach`` it returns once the results are in and leaves them running.

    Parameters
    ----------
    state : pathlib.Path
        The state folder (absolute).
    all_samples : bool
        Send every file of ``sample_dicoms/`` instead of :data:`DEFAULT_SAMPLES`.
    detach : bool
        Return once the results are in, leaving the demo running.
    ports : dict, optional
        Configured ports (``viewer``, ``orthanc_http``, ``orthanc_dicom``, ``serve``; None or 0:
        choose), see :meth:`DemoPorts.pick`.
    bundle, model, device
        Passed to ``dicom-covid serve`` (None: its defaults).
    timeout : float
        Seconds to wait for the results.
    stop_command : str
        The command that stops a detached demo (printed).
    say : callable
        Printer of progress and of the report.

    Raises
    ------
    DemoError
        When a demo already runs, something cannot be installed or started, or no results come.
    """
    t0 = min(_process_start_time(), time.time())
    running = running_demo(state)
    if running is not None:
        raise DemoError(
            f"a demo is already running (viewer {running.get('viewer_url')}); stop it "
            "with 'dicom-covid demo --stop' or use another --state-dir."
        )
    samples = _samples(all_samples)
    _check_bundle(bundle, model)
    dist = ensure_installed(browser=False, say=say)
    t_installed = time.time()
    stack = DemoStack(
        state, dist, DemoPorts.pick(**(ports or {})), bundle=bundle, model=model, device=device
    )

    def on_signal(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    leave_running = False
    try:
        stack.start(say=say)
        t_up = time.time()
        say(f"[demo] sending {len(samples)} sample study(ies) to Orthanc")
        uids = stack.send(samples)
        results = stack.wait_for_results(uids, timeout=timeout, sent_at=time.time())
        t_done = time.time()
        _report(stack, results, (t0, t_installed, t_up, t_done), say)
        if detach:
            say(f"[demo] left running; stop it with: {stop_command}")
            leave_running = True
            return
        say("[demo] running; press Ctrl-C (or run 'dicom-covid demo --stop') to stop.")
        while True:
            time.sleep(1.0)
            stack.check_alive()
    except KeyboardInterrupt:
        say("\n[demo] stopping ...")
    finally:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        if leave_running:
            stack.close_logs()
        else:
            stack.stop()
            say("[demo] stopped.")


def _report(
    stack: DemoStack,
    results: list[StudyResults],
    times: tuple[float, float, float, float],
    say: Callable[[str], None],
) -> None:
    t0, t_installed, t_up, t_done = times
    say("")
    say("RESEARCH USE ONLY - NOT FOR DIAGNOSTIC USE.")
    say(f"OHIF viewer (study list): {stack.viewer_url}")
    for r in results:
        say(f"  study: {stack.study_url(r.study_instance_uid)}")
        for modality, desc, _ in sorted(r.series):
            say(f"    {modality:<3} {desc}")
    say(f"Orthanc Explorer: {stack.orthanc_url}/app/explorer.html")
    say(
        f"Results available {t_done - t0:.1f} s after start (install/check "
        f"{t_installed - t0:.1f} s, services up {t_up - t_installed:.1f} s, "
        f"sent -> SR + heat map served by DICOMweb {t_done - t_up:.1f} s)."
    )
    say(
        "In OHIF: open a study, then double-click the 'dicom-covid AI result' series in the "
        "left panel: the hot region is outlined on the image, the probabilities are in its "
        "text box; the heat map is the 'dicom-covid Grad-CAM heat map' series."
    )
