"""``dicom-covid serve``: run the DICOM service a PACS forwards chest X-ray studies to."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

from ._app import app
from .common import fail_on_error, setup_logging

logger = logging.getLogger(__name__)

_PANEL_NET = "Network"
_PANEL_DELIVERY = "Delivery"
_PANEL_MODEL = "Model"
_PANEL_TLS = "TLS"
_PANEL_OPS = "Operations"
_PANEL_SCALE = "Scale-out (several nodes)"


@app.command()
def serve(
    ae_title: Annotated[
        str | None,
        typer.Option(
            help="Our AE title (default DICOMCOVID); also the calling AE towards destinations.",
            envvar="DICOM_COVID_AE_TITLE",
            rich_help_panel=_PANEL_NET,
        ),
    ] = None,
    host: Annotated[
        str | None,
        typer.Option(
            help="Address to listen on (default 127.0.0.1, loopback only; 0.0.0.0 for all "
            "interfaces).",
            envvar="DICOM_COVID_HOST",
            rich_help_panel=_PANEL_NET,
        ),
    ] = None,
    port: Annotated[
        int | None,
        typer.Option(
            min=0,
            max=65535,
            help="TCP port to listen on (default 11112).",
            envvar="DICOM_COVID_PORT",
            rich_help_panel=_PANEL_NET,
        ),
    ] = None,
    allow_ae: Annotated[
        list[str] | None,
        typer.Option(
            "--allow-ae",
            help="Calling AE title allowed to send, optionally with its IP: ORTHANC or "
            "ORTHANC@10.0.0.5. Repeatable. Without any, every calling AE is accepted; with some, "
            "others are rejected.",
            rich_help_panel=_PANEL_NET,
        ),
    ] = None,
    max_associations: Annotated[
        int | None,
        typer.Option(
            min=1, help="Concurrent associations accepted (default 8).", rich_help_panel=_PANEL_NET
        ),
    ] = None,
    accept_any_called_ae: Annotated[
        bool | None,
        typer.Option(
            "--accept-any-called-ae/--require-called-ae",
            help="Accept associations whatever called AE title they name (default: only our "
            "--ae-title; others are rejected as 'called AE title not recognised').",
            rich_help_panel=_PANEL_NET,
        ),
    ] = None,
    max_pdu: Annotated[
        int | None,
        typer.Option(
            min=0,
            help="Largest PDU accepted, bytes (default 65536; 0 = unlimited).",
            rich_help_panel=_PANEL_NET,
        ),
    ] = None,
    min_free_mb: Annotated[
        int | None,
        typer.Option(
            min=0,
            help="Free disk space (MiB) the state folder must keep, after the space reserved for "
            "results still to be written; below it C-STORE is answered 0xA700 so the PACS "
            "retries later (default 512). Results are written down to a quarter of it; below "
            "that a job waits for space and resumes by itself.",
            rich_help_panel=_PANEL_NET,
        ),
    ] = None,
    destination: Annotated[
        list[str] | None,
        typer.Option(
            "--destination",
            help="Where results are sent, AE@host:port, e.g. ORTHANC@127.0.0.1:4242. "
            "Repeatable. Without any, results are written to --output-dir.",
            rich_help_panel=_PANEL_DELIVERY,
        ),
    ] = None,
    destination_stowrs: Annotated[
        list[str] | None,
        typer.Option(
            "--destination-stowrs",
            help="DICOMweb STOW-RS URL results are also sent to, e.g. "
            "http://127.0.0.1:8042/dicom-web/studies. Repeatable; retried like --destination.",
            rich_help_panel=_PANEL_DELIVERY,
        ),
    ] = None,
    stowrs_basic_auth_file: Annotated[
        Path | None,
        typer.Option(
            exists=True,
            dir_okay=False,
            help="File whose first line is user:password: HTTP basic auth towards "
            "--destination-stowrs.",
            rich_help_panel=_PANEL_DELIVERY,
        ),
    ] = None,
    stowrs_token_file: Annotated[
        Path | None,
        typer.Option(
            exists=True,
            dir_okay=False,
            help="File whose first line is a bearer token for --destination-stowrs.",
            rich_help_panel=_PANEL_DELIVERY,
        ),
    ] = None,
    stowrs_ca: Annotated[
        Path | None,
        typer.Option(
            exists=True,
            dir_okay=False,
            help="PEM CA bundle for https --destination-stowrs (default: system trust store).",
            rich_help_panel=_PANEL_DELIVERY,
        ),
    ] = None,
    kos_for_suspected: Annotated[
        bool | None,
        typer.Option(
            "--kos-for-suspected/--no-kos-for-suspected",
            help="Also send a Key Object Selection document ('Of Interest') listing each image "
            "whose outcome is 'suspected', for worklists that read KOS (default off).",
            rich_help_panel=_PANEL_DELIVERY,
        ),
    ] = None,
    output_dir: Annotated[
        Path | None,
        typer.Option(
            file_okay=False,
            help="Folder results are written to, as <StudyUID>/<SOPInstanceUID>.dcm (default "
            "<state-dir>/output when there is no --destination).",
            rich_help_panel=_PANEL_DELIVERY,
        ),
    ] = None,
    retry_base: Annotated[
        float | None,
        typer.Option(
            min=0,
            help="First delivery retry delay, seconds (default 5; doubles on each failed try).",
            rich_help_panel=_PANEL_DELIVERY,
        ),
    ] = None,
    retry_max: Annotated[
        float | None,
        typer.Option(
            min=0,
            help="Largest retry delay, seconds (default 600).",
            rich_help_panel=_PANEL_DELIVERY,
        ),
    ] = None,
    retry_tries: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Tries before a delivery is dead-lettered (default 10; "
            "re-queue with 'dicom-covid retry').",
            rich_help_panel=_PANEL_DELIVERY,
        ),
    ] = None,
    state_dir: Annotated[
        Path | None,
        typer.Option(
            file_okay=False,
            help="Folder (mode 0700) for the job database, received images and results "
            "(default ./dicom-covid-state).",
            envvar="DICOM_COVID_STATE_DIR",
        ),
    ] = None,
    job_store: Annotated[
        str | None,
        typer.Option(
            help="postgresql:// URL of a job store several nodes share (give the password in "
            "~/.pgpass or PGPASSWORD, not in the URL). Default: SQLite in the state folder.",
            envvar="DICOM_COVID_JOB_STORE",
            rich_help_panel=_PANEL_SCALE,
        ),
    ] = None,
    storage_root: Annotated[
        Path | None,
        typer.Option(
            file_okay=False,
            help="Folder for received images and results that every node mounts (NFS/SMB); "
            "default: the state folder.",
            envvar="DICOM_COVID_STORAGE_ROOT",
            rich_help_panel=_PANEL_SCALE,
        ),
    ] = None,
    role: Annotated[
        str | None,
        typer.Option(
            help="What this node runs: all (default), listener, worker, sender, or several "
            "separated by commas.",
            rich_help_panel=_PANEL_SCALE,
        ),
    ] = None,
    node_id: Annotated[
        str | None,
        typer.Option(
            help="This node's name in a shared job store, stable across restarts (default: "
            "host name and a digest of the state folder).",
            rich_help_panel=_PANEL_SCALE,
        ),
    ] = None,
    lease: Annotated[
        float | None,
        typer.Option(
            min=3,
            help="Seconds a dead worker's jobs stay claimed before another worker takes them "
            "over (default 60).",
            rich_help_panel=_PANEL_SCALE,
        ),
    ] = None,
    quiet_period: Annotated[
        float | None,
        typer.Option(
            min=0,
            help="Seconds without new images after which a study is analysed (default 5).",
        ),
    ] = None,
    keep_spool: Annotated[
        bool | None,
        typer.Option(
            "--keep-spool/--no-keep-spool",
            help="Keep received images and results after delivery (default: deleted).",
        ),
    ] = None,
    config: Annotated[
        Path | None,
        typer.Option(
            "--config",
            exists=True,
            dir_okay=False,
            help="TOML configuration file (see pacs_listener.config); flags override it.",
            envvar="DICOM_COVID_CONFIG",
        ),
    ] = None,
    model: Annotated[
        str | None,
        typer.Option(
            help="Model name in the bundle (default: the bundle's default).",
            rich_help_panel=_PANEL_MODEL,
        ),
    ] = None,
    bundle: Annotated[
        Path | None,
        typer.Option(
            exists=True,
            file_okay=False,
            help="MONAI bundle folder (default: the bundle shipped with dicom-covid).",
            rich_help_panel=_PANEL_MODEL,
        ),
    ] = None,
    device: Annotated[
        str | None,
        typer.Option(
            help="Torch device of the worker (default cpu).", rich_help_panel=_PANEL_MODEL
        ),
    ] = None,
    workers: Annotated[
        int | None,
        typer.Option(
            min=1,
            max=64,
            help="Worker processes sharing the queue, each with its own model (default 1).",
            rich_help_panel=_PANEL_MODEL,
        ),
    ] = None,
    batch_size: Annotated[
        int | None,
        typer.Option(
            min=1,
            max=256,
            help="Images from ready studies run as one batch (default 8; 1: no batching).",
            rich_help_panel=_PANEL_MODEL,
        ),
    ] = None,
    batch_wait: Annotated[
        float | None,
        typer.Option(
            min=0.0,
            max=10.0,
            help="Seconds a worker waits to fill a batch (default 0.05).",
            rich_help_panel=_PANEL_MODEL,
        ),
    ] = None,
    tls_cert: Annotated[
        Path | None,
        typer.Option(
            exists=True,
            dir_okay=False,
            help="PEM certificate: enables DICOM TLS.",
            rich_help_panel=_PANEL_TLS,
        ),
    ] = None,
    tls_key: Annotated[
        Path | None,
        typer.Option(
            exists=True,
            dir_okay=False,
            help="PEM private key of --tls-cert.",
            rich_help_panel=_PANEL_TLS,
        ),
    ] = None,
    tls_ca: Annotated[
        Path | None,
        typer.Option(
            exists=True,
            dir_okay=False,
            help="PEM CA bundle: client certificates are required and checked against it, and "
            "destinations must present a certificate it signed.",
            rich_help_panel=_PANEL_TLS,
        ),
    ] = None,
    metrics_port: Annotated[
        int | None,
        typer.Option(
            min=0,
            max=65535,
            help="Serve Prometheus metrics on http://HOST:PORT/metrics, with /healthz and "
            "/readyz probes (default: off). Counts come from the job store.",
            envvar="DICOM_COVID_METRICS_PORT",
            rich_help_panel=_PANEL_OPS,
        ),
    ] = None,
    metrics_host: Annotated[
        str | None,
        typer.Option(
            help="Address of the metrics endpoint (default 127.0.0.1; 0.0.0.0 for a Prometheus "
            "server on another host).",
            rich_help_panel=_PANEL_OPS,
        ),
    ] = None,
    log_file: Annotated[
        Path | None,
        typer.Option(
            dir_okay=False,
            help="Also log to this file, mode 0600 (default <state-dir>/service.log).",
        ),
    ] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Warnings and errors only.")] = False,
) -> None:
    """Run the DICOM service: receive studies, analyse chest X-rays, send SR + SC back.

    A PACS (e.g. Orthanc, see deploy/orthanc/) forwards studies by C-STORE. Every frontal CR/DX
    image of a study (once no image arrived for --quiet-period seconds) is analysed in a worker
    process; one Comprehensive SR and one Grad-CAM Secondary Capture per image (and, with
    --kos-for-suspected, a Key Object Selection for a suspected image) go to each --destination
    and --destination-stowrs (retried with backoff while it is down), or to --output-dir.
    Everything is kept in --state-dir, so a restart resumes unfinished work; a result is
    delivered at least once, always with the same SOP Instance UIDs (a PACS keeps one copy). Runs
    until SIGINT/SIGTERM. Logs never contain patient names or IDs.
    RESEARCH USE ONLY - NOT FOR DIAGNOSTIC USE.
    """
    setup_logging(verbose, quiet)
    if not verbose:
        logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    from pacs_listener.config import (
        AllowedCaller,
        Destination,
        ServiceConfig,
        StowDestination,
        TlsConfig,
        load_toml,
    )
    from pacs_listener.logguard import install_service_logging
    from pacs_listener.service import Service

    with fail_on_error():
        cfg = ServiceConfig()
        if config is not None:
            cfg = ServiceConfig.from_mapping(load_toml(config), cfg, root=config.parent)
        scp_changes: dict = {}
        for key, value in (
            ("ae_title", ae_title),
            ("host", host),
            ("port", port),
            ("maximum_associations", max_associations),
            ("maximum_pdu_size", max_pdu),
        ):
            if value is not None:
                scp_changes[key] = value
        if min_free_mb is not None:
            scp_changes["min_free_bytes"] = min_free_mb * 2**20
        if accept_any_called_ae is not None:
            scp_changes["require_called_ae"] = not accept_any_called_ae
        if allow_ae:
            scp_changes["allowed_callers"] = tuple(AllowedCaller.parse(a) for a in allow_ae)
        if tls_cert or tls_key or tls_ca:
            if not (tls_cert and tls_key):
                raise typer.BadParameter("TLS needs both --tls-cert and --tls-key.")
            scp_changes["tls"] = TlsConfig(tls_cert, tls_key, tls_ca)
        top: dict = {}
        if destination:
            top["destinations"] = tuple(Destination.parse(d) for d in destination)
        if destination_stowrs:
            top["stowrs"] = tuple(
                StowDestination(
                    url,
                    basic_auth_file=stowrs_basic_auth_file,
                    token_file=stowrs_token_file,
                    ca=stowrs_ca,
                )
                for url in destination_stowrs
            )
        elif stowrs_basic_auth_file or stowrs_token_file or stowrs_ca:
            raise typer.BadParameter(
                "--stowrs-basic-auth-file, --stowrs-token-file and --stowrs-ca apply to "
                "--destination-stowrs; give the URL too."
            )
        for key, value in (
            ("state_dir", state_dir),
            ("output_dir", output_dir),
            ("quiet_period", quiet_period),
            ("keep_spool", keep_spool),
            ("metrics_port", metrics_port),
            ("metrics_host", metrics_host),
            ("job_store", job_store),
            ("storage_root", storage_root),
            ("role", role),
            ("node_id", node_id),
            ("lease", lease),
        ):
            if value is not None:
                top[key] = value
        retry_changes = {
            k: v
            for k, v in (
                ("base_delay", retry_base),
                ("max_delay", retry_max),
                ("max_tries", retry_tries),
            )
            if v is not None
        }
        worker_changes = {
            k: v
            for k, v in (
                ("model", model),
                ("bundle", bundle),
                ("device", device),
                ("workers", workers),
                ("batch_size", batch_size),
                ("batch_wait", batch_wait),
                ("kos_for_suspected", kos_for_suspected),
            )
            if v is not None
        }
        cfg = cfg.override(scp=scp_changes, retry=retry_changes, worker=worker_changes, **top)
        level = logging.getLogger().getEffectiveLevel()
        # rate-limited, and safe on a full disk (see pacs_listener.logguard)
        install_service_logging(log_file or Path(cfg.state_dir) / "service.log", level)
        logger.info("dicom-covid serve starting. RESEARCH USE ONLY - NOT FOR DIAGNOSTIC USE.")
        service = Service(cfg)
        service.start()
        code = service.run()
    raise typer.Exit(code)
