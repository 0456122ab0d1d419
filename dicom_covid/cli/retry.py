"""``dicom-covid retry``: re-queue dead-lettered deliveries and failed jobs."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ._app import app


@app.command()
def retry(
    state_dir: Annotated[
        Path,
        typer.Option(
            exists=True,
            file_okay=False,
            help="State folder of 'dicom-covid serve'.",
            envvar="DICOM_COVID_STATE_DIR",
        ),
    ] = Path("dicom-covid-state"),
    job: Annotated[
        int | None,
        typer.Option(
            help="Job id (see 'dicom-covid status'): its dead deliveries are tried again from "
            "scratch, or, for a failed job, its failed images are analysed again."
        ),
    ] = None,
    all_dead: Annotated[
        bool, typer.Option("--all-dead", help="Re-queue every dead-lettered delivery.")
    ] = False,
    all_failed: Annotated[
        bool, typer.Option("--all-failed", help="Analyse the images of every failed job again.")
    ] = False,
) -> None:
    """Re-queue deliveries that were dead-lettered (destination down too long) or failed jobs.

    Works while the service runs: it picks the work up within seconds. Exit status 0 when
    something was re-queued, 2 when there was nothing to re-queue, 1 on a usage error.
    """
    if job is None and not all_dead and not all_failed:
        raise typer.BadParameter("give --job ID, --all-dead or --all-failed.")
    from pacs_listener.jobs import JobStore, StoreError

    try:
        store = JobStore(state_dir / "jobs.sqlite", create=False)
    except FileNotFoundError:
        typer.secho(f"error: {state_dir} holds no jobs.sqlite.", fg=typer.colors.RED, err=True)
        raise typer.Exit(1) from None
    except StoreError as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        raise typer.Exit(1) from None
    with store:
        if job is not None and store.job(job) is None:
            typer.secho(f"error: there is no job {job}.", fg=typer.colors.RED, err=True)
            raise typer.Exit(1)
        n = store.requeue(job_id=job, all_dead=all_dead, all_failed=all_failed)
    typer.echo(f"re-queued {n} job(s)")
    if n == 0:
        raise typer.Exit(2)
