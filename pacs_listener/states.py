"""The job store's state machines: instance, job and delivery states and their transitions.

Plain data, no I/O: :mod:`pacs_listener.jobs` writes these states and installs the
transitions as SQLite triggers, so a state change the machine does not allow is refused by the
database itself (``sqlite3.IntegrityError``), whoever attempts it.

Instances (one row per SOP Instance UID ever received; ``inferred`` is optional: results may be
recorded straight from ``grouped``)::

    received ──► grouped ──► inferred ──► results_written ──► delivered
        │           ▲  │        │  │             │  ▲            │
        └► skipped  │  └► failed◄┘  │             └► dead ◄──────┘ (retry: back to
                    └───────────────┘ (disk full / worker died)      results_written)

Jobs (one per study and quiet period)::

    grouped ──► running ──► results_written ──► delivered
     ▲  │        ▲  │ │             │   ▲         │
     │  │        │  │ └► failed ◄───┼───┼─────────┘ (retry of a failed job: back to grouped)
     │  │        │  ▼               └► dead (retry: back to results_written)
     │  └► failed  waiting_for_disk (claimed again after a backoff, never failed for it)
     └── running (the worker died: released)

Deliveries (one per result and target): ``pending`` ──► ``delivered`` or ``dead``; a dead
delivery goes back to ``pending`` on ``dicom-covid retry``.
"""

from __future__ import annotations

from enum import StrEnum

__all__ = [
    "DELIVERY_TRANSITIONS",
    "INSTANCE_TRANSITIONS",
    "JOB_TRANSITIONS",
    "DeliveryState",
    "InstanceState",
    "JobState",
    "allowed",
    "transition_trigger",
]


class InstanceState(StrEnum):
    """State of one received instance."""

    RECEIVED = "received"
    GROUPED = "grouped"
    INFERRED = "inferred"
    RESULTS_WRITTEN = "results_written"
    DELIVERED = "delivered"
    SKIPPED = "skipped"
    FAILED = "failed"
    DEAD = "dead"


class JobState(StrEnum):
    """State of one job (the candidate images of one study)."""

    GROUPED = "grouped"
    RUNNING = "running"
    WAITING_FOR_DISK = "waiting_for_disk"
    RESULTS_WRITTEN = "results_written"
    DELIVERED = "delivered"
    FAILED = "failed"
    DEAD = "dead"


class DeliveryState(StrEnum):
    """State of one result's delivery to one target."""

    PENDING = "pending"
    DELIVERED = "delivered"
    DEAD = "dead"


_I, _J, _D = InstanceState, JobState, DeliveryState

#: Allowed instance state changes (an update to the same state is always allowed).
INSTANCE_TRANSITIONS: dict[InstanceState, frozenset[InstanceState]] = {
    _I.RECEIVED: frozenset({_I.GROUPED}),
    _I.GROUPED: frozenset({_I.INFERRED, _I.RESULTS_WRITTEN, _I.FAILED}),
    _I.INFERRED: frozenset({_I.GROUPED, _I.RESULTS_WRITTEN, _I.FAILED}),
    _I.RESULTS_WRITTEN: frozenset({_I.DELIVERED, _I.DEAD}),
    _I.DELIVERED: frozenset({_I.RESULTS_WRITTEN, _I.DEAD}),
    _I.DEAD: frozenset({_I.RESULTS_WRITTEN, _I.DELIVERED}),
    _I.FAILED: frozenset({_I.GROUPED}),
    _I.SKIPPED: frozenset(),
}

#: Allowed job state changes (an update to the same state is always allowed).
JOB_TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    _J.GROUPED: frozenset({_J.RUNNING, _J.FAILED}),
    _J.RUNNING: frozenset({_J.GROUPED, _J.WAITING_FOR_DISK, _J.RESULTS_WRITTEN, _J.FAILED}),
    _J.WAITING_FOR_DISK: frozenset({_J.RUNNING, _J.FAILED}),
    _J.RESULTS_WRITTEN: frozenset({_J.DELIVERED, _J.DEAD}),
    _J.DELIVERED: frozenset({_J.RESULTS_WRITTEN}),
    _J.DEAD: frozenset({_J.RESULTS_WRITTEN, _J.DELIVERED}),
    _J.FAILED: frozenset({_J.GROUPED}),
}

#: Allowed delivery state changes (an update to the same state is always allowed).
DELIVERY_TRANSITIONS: dict[DeliveryState, frozenset[DeliveryState]] = {
    _D.PENDING: frozenset({_D.DELIVERED, _D.DEAD}),
    _D.DELIVERED: frozenset(),
    _D.DEAD: frozenset({_D.PENDING}),
}


def allowed(transitions: dict, old: str, new: str) -> bool:
    """True when a row may go from state ``old`` to ``new`` under ``transitions``."""
    return old == new or new in transitions.get(old, frozenset())


def transition_trigger(table: str, transitions: dict) -> str:
    """SQL of a trigger that refuses the state changes ``transitions`` does not allow.

    Parameters
    ----------
    table : str
        ``instances``, ``jobs`` or ``deliveries``.
    transitions : dict
        One of :data:`INSTANCE_TRANSITIONS`, :data:`JOB_TRANSITIONS`,
        :data:`DELIVERY_TRANSITIONS`.

    Returns
    -------
    str
        ``CREATE TRIGGER IF NOT EXISTS <table>_state_machine ...``; the refusal is an
        ``ABORT`` whose message names the table and both states.
    """
    pairs = sorted(f"'{old}>{new}'" for old, news in transitions.items() for new in news)
    return (
        f"CREATE TRIGGER IF NOT EXISTS {table}_state_machine BEFORE UPDATE OF state ON {table} "
        f"WHEN NEW.state IS NOT OLD.state AND OLD.state || '>' || NEW.state NOT IN "
        f"({', '.join(pairs)}) BEGIN SELECT RAISE(ABORT, 'state machine: {table} cannot go "
        f"from this state to that one'); END;"
    )
