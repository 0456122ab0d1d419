"""Plain records of the job store: what its queries return, and the pipeline's stage names.

No I/O and no database: :class:`~pacs_listener.jobs.JobStore` builds these from rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..states import InstanceState, JobState

__all__ = [
    "INSTANCE_STATES",
    "JOB_STATES",
    "RESULTS_TO_WRITE",
    "STAGES",
    "Delivery",
    "Instance",
    "Job",
    "Node",
    "ResultFile",
]

#: Instance states, in pipeline order, then the terminal side states.
INSTANCE_STATES = tuple(InstanceState)
#: Job states.
JOB_STATES = tuple(JobState)
#: Instance states whose results are still to be written (their disk space is reserved).
RESULTS_TO_WRITE = ("received", "grouped", "inferred")

#: Stages of a job whose durations ``serve --metrics-port`` reports as histograms: SQL of the
#: seconds each took (``j`` is the jobs row; NULL while the stage is not finished).
STAGES = {
    # first image received -> study grouped into a job (the quiet period and the arrivals)
    "grouping": "j.created_at - (SELECT MIN(i.received_at) FROM instances i WHERE i.job_id = j.id)",
    # grouped -> claimed by the worker
    "queued": "j.started_at - j.created_at",
    # claimed -> every image analysed and its results written
    "analysis": "j.finished_at - j.started_at",
    # results written -> the last result confirmed by every destination
    "delivery": "j.delivered_at - j.finished_at",
    # first image received -> every result delivered
    "end_to_end": "j.delivered_at - (SELECT MIN(i.received_at) FROM instances i "
    "WHERE i.job_id = j.id)",
}


@dataclass(frozen=True)
class Job:
    """A study's batch of candidate images.

    Attributes
    ----------
    id : int
    study_instance_uid : str
    state : JobState
    attempts : int
        How many times a worker claimed it.
    reason : str or None
    images : int
        Images left to analyse when :meth:`JobStore.claim_jobs` claimed it (0 otherwise).
    """

    id: int
    study_instance_uid: str
    state: JobState
    attempts: int = 0
    reason: str | None = None
    images: int = 0


@dataclass(frozen=True)
class Instance:
    """One received SOP Instance (no patient data is stored, only UIDs and the file path)."""

    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    sop_class_uid: str
    state: InstanceState
    path: Path | None
    reason: str | None
    job_id: int | None
    reserve_bytes: int = 0


@dataclass(frozen=True)
class ResultFile:
    """A result object written by the worker, ready for delivery.

    Attributes
    ----------
    kind : str
        ``"sr"`` or ``"sc"``.
    sop_instance_uid, study_instance_uid : str
        UIDs of the result object.
    path : pathlib.Path
        The DICOM file.
    """

    kind: str
    sop_instance_uid: str
    study_instance_uid: str
    path: Path


@dataclass(frozen=True)
class Delivery:
    """One result due for one target."""

    result_id: int
    target: str
    tries: int
    job_id: int
    kind: str
    sop_instance_uid: str
    study_instance_uid: str
    path: Path


@dataclass(frozen=True)
class Node:
    """One ``serve`` process using the store, as its last heartbeat recorded it.

    Attributes
    ----------
    node_id : str
        The node's name (``[node] id``; its workers claim jobs as ``<node_id>/worker-<pid>``).
    host : str
        Host name of the machine.
    pid : int
        Process id of the service.
    roles : str
        Comma-separated roles it runs (``listener``, ``worker``, ``sender``).
    version : str
        dicom-covid version.
    started_at, heartbeat_at : float
        Start and last heartbeat (seconds since the epoch).
    leases : int
        Jobs its workers hold now.
    """

    node_id: str
    host: str
    pid: int
    roles: str
    version: str
    started_at: float
    heartbeat_at: float
    leases: int = 0
