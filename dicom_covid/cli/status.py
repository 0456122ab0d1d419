"""``dicom-covid status``: what the PACS service has received, analysed and delivered."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Annotated

import typer

from ._app import app


def _line(title: str, counts: dict[str, int]) -> str:
    return f"{title:<12}" + ", ".join(f"{k} {v}" for k, v in counts.items())


@app.command()
def status(
    state_dir: Annotated[
        Path,
        typer.Option(
            exists=True,
            file_okay=False,
            help="State folder of 'dicom-covid serve'.",
            envvar="DICOM_COVID_STATE_DIR",
        ),
    ] = Path("dicom-covid-state"),
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    problems: Annotated[
        int, typer.Option(min=0, help="How many failed/dead jobs to list (default 10).")
    ] = 10,
) -> None:
    """Show counts per state, the backlog, and the latest failed or dead jobs.

    Safe while the service runs (read-only). Exit status 0, or 1 when the folder holds no job
    database.
    """
    from pacs_listener.jobs import JobStore, StoreError

    try:
        store = JobStore(state_dir / "jobs.sqlite", create=False)
    except FileNotFoundError:
        typer.secho(
            f"error: {state_dir} holds no jobs.sqlite; give the --state-dir of "
            "'dicom-covid serve'.",
            fg=typer.colors.RED,
            err=True,
        )
        raise typer.Exit(1) from None
    except StoreError as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        raise typer.Exit(1) from None
    with store:
        counts = store.counts()
        reserved = store.pending_result_bytes()
        bad = store.jobs(states=("failed", "dead"), limit=problems) if problems else []
    try:
        free: int | None = shutil.disk_usage(state_dir).free
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
    typer.echo(f"dicom-covid service state in {state_dir}")
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
    for p in counts["problems"]:
        typer.echo(f"job {p['job']} ({p['state']}) study {p['study_instance_uid']}: {p['reason']}")
