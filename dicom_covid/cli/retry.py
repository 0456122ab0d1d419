"""``dicom-covid retry``: re-queue dead-lettered deliveries and failed jobs."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ._app import app
from .status import JobStoreOption, StorageRootOption, open_service_store


@app.command()
def retry(
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
    store = open_service_store(state_dir, job_store, storage_root)
    with store:
        if job is not None and store.job(job) is None:
            typer.secho(f"error: there is no job {job}.", fg=typer.colors.RED, err=True)
            raise typer.Exit(1)
        n = store.requeue(job_id=job, all_dead=all_dead, all_failed=all_failed)
    typer.echo(f"re-queued {n} job(s)")
    if n == 0:
        raise typer.Exit(2)
