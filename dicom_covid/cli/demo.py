"""``dicom-covid demo``: Orthanc, the OHIF viewer and dicom-covid on one machine, in one command.

The command installs what is missing (``apt-get``: nginx-light, Orthanc and its DICOMweb plugin,
dcmtk; ``npm pack``: OHIF), sends sample studies with ``storescu``, waits until their results are
served by DICOMweb, prints the viewer and study URLs and the elapsed time, and keeps running until
Ctrl-C or ``dicom-covid demo --stop`` (process ids are recorded in ``<state-dir>/demo.json``).

The machinery (installers, nginx and Orthanc configuration, the process supervisor
``DemoStack``) is deployment code and lives in the source checkout, in the package
``deploy/demo/`` next to its templates; this module only parses the options and loads that
package by path (:func:`load_stack`), so the command needs a checkout and says so when run from
an installed wheel. For compatibility, the package's public names can still be imported from
here (``from dicom_covid.cli.demo import DemoStack``), which loads it.
RESEARCH USE ONLY - NOT FOR DIAGNOSTIC USE.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Annotated, Any

import typer

from ..errors import DicomCovidError
from ._app import app
from .common import BundleOption, ModelOption, fail_on_error, setup_logging

__all__ = ["STACK_DIR", "demo", "load_stack"]

#: The demo stack package in the source checkout.
STACK_DIR = Path(__file__).resolve().parents[2] / "deploy" / "demo"
#: Name under which :func:`load_stack` registers it in ``sys.modules``.
_STACK_MODULE = "dicom_covid_demo_stack"


def load_stack() -> ModuleType:
    """The demo stack package ``deploy/demo/`` of the source checkout, imported by its path.

    Returns
    -------
    types.ModuleType
        The package (``DemoStack``, ``DemoPorts``, ``ensure_installed``, ``run``, ...).

    Raises
    ------
    DicomCovidError
        When the checkout's ``deploy/demo/`` is not there (e.g. dicom-covid installed from a
        wheel); the message says to run the demo from a git clone.
    """
    loaded = sys.modules.get(_STACK_MODULE)
    if loaded is not None:
        return loaded
    init = STACK_DIR / "__init__.py"
    if not init.is_file():
        raise DicomCovidError(
            f"{init} not found: 'dicom-covid demo' needs a source checkout of dicom-covid "
            "(deploy/, sample_dicoms/). Run it from a git clone installed with pip install -e ."
        )
    spec = importlib.util.spec_from_file_location(
        _STACK_MODULE, init, submodule_search_locations=[str(STACK_DIR)]
    )
    if spec is None or spec.loader is None:  # pragma: no cover - a file path always has one
        raise DicomCovidError(f"{init} cannot be imported.")
    module = importlib.util.module_from_spec(spec)
    sys.modules[_STACK_MODULE] = module  # before running it: its modules import each other
    try:
        spec.loader.exec_module(module)
    except BaseException:
        for name in [n for n in sys.modules if n.split(".")[0] == _STACK_MODULE]:
            del sys.modules[name]
        raise
    return module


#: Names this module used to define, now the stack package's; still importable from here.
_STACK_NAMES = frozenset(
    {
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
        "running_demo",
        "stop_recorded",
    }
)


def __getattr__(name: str) -> Any:
    """A name of the stack package (``DemoStack``, ``DemoError``, ...), loaded on first use."""
    if name not in _STACK_NAMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(load_stack(), name)


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
    with fail_on_error():
        stack = load_stack()
        state = (state_dir or stack.default_state_dir()).resolve()
        if stop:
            if not stack.stop_recorded(state):
                typer.echo(f"[demo] no demo is running (state folder {state}).")
            else:
                typer.echo("[demo] stopped.")
            return
        stack.run(
            state,
            all_samples=all_samples,
            detach=detach,
            ports={
                "viewer": viewer_port,
                "orthanc_http": orthanc_http_port,
                "orthanc_dicom": orthanc_dicom_port,
                "serve": serve_port,
            },
            bundle=bundle,
            model=model,
            device=device,
            timeout=timeout,
            stop_command="dicom-covid demo --stop" + (f" --state-dir {state}" if state_dir else ""),
            say=typer.echo,
        )
