"""``dicom-covid status``: what the PACS service has received, analysed and delivered."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from ._app import app

if TYPE_CHECKING:
    from pacs_listener.jobs import JobStore

#: The ``--job-store`` option of ``status`` and ``retry`` (as ``serve`` takes it).
JobStoreOption = Annotated[
    str | None,
    typer.Option(
        help="postgresql:// URL of a shared job store (as given to 'serve'); default: the "
        "SQLite store in --state-dir.",
        envvar="DICOM_COVID_JOB_STORE",
    ),
]
#: The ``--storage-root`` option of ``status`` and ``retry``.
StorageRootOption = Annotated[
    Path | None,
    typer.Option(
        file_okay=False,
        help="Storage root of a shared job store (as given to 'serve'); default: --state-dir.",
        envvar="DICOM_COVID_STORAGE_ROOT",
    ),
]


def open_service_store(
    state_dir: Path, job_store: str | None, storage_root: Path | None
) -> JobStore:
    """The job store of a service, for ``status`` and ``retry``.

    Parameters
    ----------
    state_dir : pathlib.Path
        The service's state folder (its SQLite store, unless ``job_store`` is given).
    job_store : str or None
        ``postgresql://`` URL of a shared store.
    storage_root : pathlib.Path or None
        The shared store's storage root (default ``state_dir``).

    Raises
    ------
    typer.Exit
        With status 1 and a message when there is no store or it cannot be opened.
    """
    from pacs_listener.jobs import JobStore, StoreError

    try:
        if job_store:
            return JobStore(job_store, create=False, root=storage_root or state_dir)
        if not state_dir.is_dir():
            raise FileNotFoundError(state_dir)
        return JobStore(state_dir / "jobs.sqlite", create=False)
    except FileNotFoundError:
        where = "that database" if job_store else f"{state_dir}"
        typer.secho(
            f"error: {where} holds no dicom-covid job store; give the --state-dir (or "
            "--job-store) of 'dicom-covid serve'.",
            fg=typer.colors.RED,
            err=True,
        )
        raise typer.Exit(1) from None
    except StoreError as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        raise typer.Exit(1) from None


def _line(title: str, counts: dict[str, int]) -> str:
    return f"{title:<12}" + ", ".join(f"{k} {v}" for k, v in counts.items())


@app.command()
def status(
    state_dir: Annotated[
        Path,
        typer.Option(
            file_okay=False,
            help="State folder of 'dicom-covid serve'.",
            envvar="DICOM_COVID_STATE_DIR",
        ),
    ] = Path("dicom-covid-state"),
    job_store: JobStoreOption = None,
    storage_root: StorageRootOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    problems: Annotated[
        int, typer.Option(min=0, help="How many failed/dead jobs to list (default 10).")
    ] = 10,
) -> None:
    """Show counts per state, the backlog, the nodes, and the latest failed or dead jobs.

    Safe while the service runs (read-only). With a shared job store (--job-store) it shows
    every node: its roles, last heartbeat and the jobs its workers hold. Exit status 0, or 1
    when there is no job store.
    """
    import time

    store = open_service_store(state_dir, job_store, storage_root)
    with store:
        counts = store.counts()
        reserved = store.pending_result_bytes()
        bad = store.jobs(states=("failed", "dead"), limit=problems) if problems else []
        nodes = store.nodes()
        where = store.describe()
        root = store.root
    now = time.time()
    counts["nodes"] = [
        {
            "node": n.node_id,
            "host": n.host,
            "pid": n.pid,
            "roles": n.roles,
            "version": n.version,
            "last_heartbeat_age_s": round(max(0.0, now - n.heartbeat_at), 1),
            "leases": n.leases,
        }
        for n in nodes
    ]
    try:
        free: int | None = shutil.disk_usage(root).free
    except OSError:
        free = None
    counts["disk"] = {"free_bytes": free, "reserved_for_results_bytes": reserved}
    counts["problems"] = [
        {
            "job": j.id,
            "study_instance_uid": j.study_instance_uid,
            "state": j.state,
            "reason": j.reason,
        }
        for j in bad
    ]
    if as_json:
        typer.echo(json.dumps(counts, indent=2))
        return
    typer.echo(f"dicom-covid service state in {where}")
    typer.echo(_line("instances", counts["instances"]))
    typer.echo(_line("jobs", counts["jobs"]))
    typer.echo(_line("deliveries", counts["deliveries"]))
    for target, n in counts["targets"].items():
        typer.echo(f"  {target}: " + ", ".join(f"{k} {v}" for k, v in n.items()))
    b = counts["backlog"]
    age = b["oldest_pending_delivery_age_s"]
    typer.echo(
        f"backlog     {b['instances_waiting_for_quiet_period']} image(s) waiting for the quiet "
        f"period, {b['jobs_waiting_for_worker']} job(s) for the worker, "
        f"{b['deliveries_pending']} delivery(ies) pending"
        + (f" (oldest {age:.0f} s)" if age is not None else "")
    )
    if free is not None:
        typer.echo(
            f"disk        {free / 2**20:.0f} MiB free in the state folder, "
            f"{reserved / 2**20:.0f} MiB of it reserved for results still to be written"
            + (
                "; FULL: new images are refused (0xA700) and results wait until space is freed"
                if free <= reserved
                else ""
            )
        )
    if b["jobs_waiting_for_disk"]:
        nxt = b["next_disk_retry_in_s"]
        typer.echo(
            f"disk        {b['jobs_waiting_for_disk']} job(s) wait for free disk space to write "
            f"their results (waited {b['disk_waits']} time(s); next try in {nxt:.0f} s); they "
            "resume by themselves once space is freed"
        )
    if counts["skipped_reasons"]:
        typer.echo(_line("skipped", counts["skipped_reasons"]))
    if counts["duplicates"]:
        typer.echo(f"duplicates  {counts['duplicates']} re-sent instance(s) acknowledged")
    for n in counts["nodes"]:
        typer.echo(
            f"node        {n['node']} ({n['roles']}; host {n['host']}, pid {n['pid']}): last "
            f"heartbeat {n['last_heartbeat_age_s']:.0f} s ago, {n['leases']} job(s) held"
        )
    for p in counts["problems"]:
        typer.echo(f"job {p['job']} ({p['state']}) study {p['study_instance_uid']}: {p['reason']}")
