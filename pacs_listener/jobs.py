"""The durable job store shared by the SCP, workers and senders: SQLite (WAL,
``synchronous=FULL``) on one machine, or PostgreSQL shared by several nodes
(:mod:`pacs_listener.store`).

Nothing is acknowledged to the PACS before it is in this store, and nothing leaves a state
before the next state is committed, so a crash or restart resumes where it stopped.

Instances (one row per SOP Instance UID ever received)::

    received ──► grouped ──► inferred ──► results_written ──► delivered
        │                        │                 │
        └► skipped (reason)      └► failed (reason)  └► dead (delivery dead-lettered)

Jobs (one per study and quiet period)::

    grouped ──► running ──► results_written ──► delivered
                 ▲  │ │             └──────────► dead   (``dicom-covid retry`` → results_written)
                 │  │ └► failed (no image of the job gave results)
                 │  ▼
      waiting_for_disk  (results cannot be written for lack of disk space: claimed again after an
                         exponential backoff, by itself, never failed for it)

Results (one SR and one SC per analysed image, enforced by a unique key) each have one delivery
row per target (``AE@host:port`` or ``dir:<path>``), ``pending`` → ``delivered`` or ``dead``.
A delivery is marked delivered right after the destination confirmed it, so a restart sends
again at most the result that was in flight — at least once, with the same SOP Instance UID.

A worker's claim on a job carries a lease it renews (:meth:`JobStore.renew_leases`); a job
whose lease expired is claimed again by any worker, and the old owner can no longer record
results for it (:class:`LeaseLost`).

Each thread gets its own connection; each worker process opens its own store. The SQLite file
is created with mode 0600 (SQLite gives its ``-wal``/``-shm`` files the same mode).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from .states import DeliveryState, InstanceState, JobState
from .store import LeaseLost, StoreError, open_backend
from .store.delivery import DeliveryQueries
from .store.records import (
    INSTANCE_STATES,
    JOB_STATES,
    RESULTS_TO_WRITE,
    STAGES,
    Delivery,
    Instance,
    Job,
    Node,
    ResultFile,
)
from .store.reports import ReportQueries

__all__ = [
    "INSTANCE_STATES",
    "JOB_STATES",
    "STAGES",
    "Delivery",
    "DeliveryState",
    "Instance",
    "InstanceState",
    "Job",
    "JobState",
    "JobStore",
    "LeaseLost",
    "Node",
    "ResultFile",
    "StoreError",
]

logger = logging.getLogger(__name__)


class JobStore(DeliveryQueries, ReportQueries):
    """The job store: every query and state change of the pipeline, on either backend.

    Parameters
    ----------
    location : pathlib.Path or str
        The SQLite file (created with mode 0600, its folder with 0700, when missing), or a
        ``postgresql://`` URL of a database shared by several nodes (see
        :mod:`pacs_listener.store`).
    create : bool
        Create the schema when missing and migrate an older one (default True); False raises
        ``FileNotFoundError`` for a missing store (used by ``status``/``retry``).
    root : pathlib.Path, optional
        Folder the spool and result paths are stored relative to. Default: the SQLite file's
        folder (the state folder); a PostgreSQL store needs it (the storage root every node
        mounts, so each node may mount it elsewhere).
    lease : float
        Seconds a claim on a job holds without being renewed (:meth:`renew_leases`); after
        that any worker may take the job over (default 60).

    Raises
    ------
    StoreError
        When the store was written by a newer version of dicom-covid (a higher schema
        version: it is never opened, so an older program cannot corrupt it), or a
        PostgreSQL store cannot be reached.
    """

    def __init__(
        self,
        location: Path | str,
        create: bool = True,
        root: Path | None = None,
        lease: float = 60.0,
    ) -> None:
        self.backend = open_backend(location, create=create)
        if root is None:
            if self.backend.root is None:
                self.backend.close()
                raise ValueError("a PostgreSQL job store needs the storage root (root=...)")
            root = self.backend.root
        self.root = Path(root)
        self.location = location
        self.lease = float(lease)

    @property
    def path(self) -> Path:
        """The SQLite database file (a PostgreSQL store has none: ``AttributeError``)."""
        return self.backend.path

    @property
    def shared(self) -> bool:
        """True when several machines may share this store (PostgreSQL)."""
        return self.backend.shared

    def describe(self) -> str:
        """Where the store is, for messages (a URL without its password)."""
        return self.backend.describe()

    # -- connections -------------------------------------------------------------------------

    def _con(self) -> Any:
        return self.backend.connection()

    @contextlib.contextmanager
    def _tx(self, con: Any = None) -> Iterator[Any]:
        con = con or self._con()
        with self.backend.transaction(con):
            yield con

    def release_wal(self) -> None:
        """Give back disk space the database holds beyond its data (SQLite: checkpoint and
        truncate the write-ahead log; best effort, nothing is lost when it cannot)."""
        self.backend.release_space()

    def close(self) -> None:
        """Close every connection this object opened."""
        self.backend.close()

    def __enter__(self) -> JobStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def pragma(self, name: str) -> object:
        """A database setting (SQLite: a PRAGMA; tests check WAL and synchronous=FULL)."""
        return self.backend.pragma(name)

    def _set_meta(self, key: str, value: str) -> None:
        with self._tx() as con:
            con.execute(
                "INSERT INTO meta (key, value) VALUES (?, ?) "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (key, value),
            )

    def _rel(self, path: Path | None) -> str | None:
        if path is None:
            return None
        p = Path(path)
        try:
            return str(p.resolve().relative_to(self.root.resolve()))
        except ValueError:
            return str(p)

    def _abs(self, text: str | None) -> Path | None:
        if text is None:
            return None
        p = Path(text)
        return p if p.is_absolute() else self.root / p

    # -- receiving ---------------------------------------------------------------------------

    def seen(self, sop_instance_uid: str) -> str | None:
        """Whether a SOP Instance UID is already known, counting a re-sent duplicate.

        Returns
        -------
        str or None
            ``"duplicate"`` when it was received before (its duplicate count goes up),
            ``"own_result"`` when it is one of our own result objects, else None.
        """
        with self._tx() as con:
            cur = con.execute(
                "UPDATE instances SET duplicates = duplicates + 1 WHERE sop_instance_uid = ?",
                (sop_instance_uid,),
            )
            if cur.rowcount:
                return "duplicate"
            row = con.execute(
                "SELECT 1 FROM results WHERE sop_instance_uid = ?", (sop_instance_uid,)
            ).fetchone()
        return "own_result" if row else None

    def add_instance(
        self,
        sop_instance_uid: str,
        study_instance_uid: str,
        *,
        series_instance_uid: str = "",
        sop_class_uid: str = "",
        calling_ae: str = "",
        state: str = "received",
        path: Path | None = None,
        reason: str | None = None,
        reserve_bytes: int = 0,
        now: float | None = None,
    ) -> bool:
        """Record a received instance; False when the SOP Instance UID was already known.

        ``reserve_bytes`` is the disk space its results will need (see
        :meth:`pending_result_bytes`).
        """
        if state not in ("received", "skipped", "failed"):
            raise ValueError(f"an instance cannot be added in state {state!r}")
        now = time.time() if now is None else now
        with self._tx() as con:
            cur = con.execute(
                "INSERT INTO instances (sop_instance_uid, study_instance_uid, "
                "series_instance_uid, sop_class_uid, calling_ae, path, state, reason, "
                "reserve_bytes, received_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT DO NOTHING",
                (
                    sop_instance_uid,
                    study_instance_uid,
                    series_instance_uid,
                    sop_class_uid,
                    calling_ae,
                    self._rel(path),
                    state,
                    reason,
                    int(reserve_bytes),
                    now,
                    now,
                ),
            )
        return cur.rowcount == 1

    def pending_result_bytes(self) -> int:
        """Disk space still needed by the results of acknowledged images not yet written."""
        row = (
            self._con()
            .execute(
                "SELECT COALESCE(SUM(reserve_bytes), 0) FROM instances WHERE state IN "
                f"({','.join('?' * len(RESULTS_TO_WRITE))})",
                RESULTS_TO_WRITE,
            )
            .fetchone()
        )
        return int(row[0])

    def instance(self, sop_instance_uid: str) -> Instance | None:
        """The stored record of one instance."""
        row = (
            self._con()
            .execute("SELECT * FROM instances WHERE sop_instance_uid = ?", (sop_instance_uid,))
            .fetchone()
        )
        return self._instance(row) if row else None

    def _instance(self, row: Any) -> Instance:
        return Instance(
            sop_instance_uid=row["sop_instance_uid"],
            study_instance_uid=row["study_instance_uid"],
            series_instance_uid=row["series_instance_uid"],
            sop_class_uid=row["sop_class_uid"],
            state=InstanceState(row["state"]),
            path=self._abs(row["path"]),
            reason=row["reason"],
            job_id=row["job_id"],
            reserve_bytes=int(row["reserve_bytes"] or 0),
        )

    # -- grouping ----------------------------------------------------------------------------

    def group_stable_studies(self, quiet_period: float, now: float | None = None) -> list[Job]:
        """Turn every study quiet for ``quiet_period`` seconds into a job.

        A study is quiet when none of its instances (candidates or not) arrived in the last
        ``quiet_period`` seconds. Only instances in state ``received`` join the new job, so
        instances arriving after a study was grouped form a further job.

        Returns
        -------
        list of Job
            The jobs created.
        """
        now = time.time() if now is None else now
        cutoff = now - quiet_period
        jobs: list[Job] = []
        sizes: list[int] = []
        query = (
            "SELECT p.study_instance_uid FROM (SELECT DISTINCT study_instance_uid "
            "FROM instances WHERE state = 'received' AND job_id IS NULL) p "
            "WHERE (SELECT MAX(received_at) FROM instances i "
            "WHERE i.study_instance_uid = p.study_instance_uid) <= ?"
        )
        if not self._con().execute(query + " LIMIT 1", (cutoff,)).fetchone():
            return jobs  # the common case: nothing to do, no write lock taken
        with self._tx() as con:
            self.backend.lock_grouping(con)  # several listeners: one groups at a time
            studies = [r[0] for r in con.execute(query, (cutoff,))]
            for study in studies:
                job_id = int(
                    con.execute(
                        "INSERT INTO jobs (study_instance_uid, state, created_at, updated_at) "
                        "VALUES (?, 'grouped', ?, ?) RETURNING id",
                        (study, now, now),
                    ).fetchone()[0]
                )
                n = con.execute(
                    "UPDATE instances SET state = 'grouped', job_id = ?, updated_at = ? "
                    "WHERE study_instance_uid = ? AND state = 'received' AND job_id IS NULL",
                    (job_id, now, study),
                ).rowcount
                jobs.append(Job(job_id, study, JobState.GROUPED))
                sizes.append(n)
        for job, n in zip(jobs, sizes, strict=True):  # logged once committed
            logger.info(
                "job %d: study %s grouped with %d image(s)", job.id, job.study_instance_uid, n
            )
        return jobs

    # -- worker ------------------------------------------------------------------------------

    def claim_job(self, worker: str, max_attempts: int = 3, now: float | None = None) -> Job | None:
        """Claim the oldest grouped job for ``worker`` (state ``running``), or None.

        A job waiting for disk space is claimed again once its ``not_before`` time has come. A
        job already claimed ``max_attempts`` times (the worker died on it each time) is failed
        instead of being handed out again.
        """
        jobs = self.claim_jobs(worker, 1, max_attempts, now)
        return jobs[0] if jobs else None

    def claim_jobs(
        self, worker: str, max_images: int, max_attempts: int = 3, now: float | None = None
    ) -> list[Job]:
        """Claim the oldest ready jobs for ``worker`` until they hold ``max_images`` images.

        The claims are made in one transaction, so two workers never claim the same job. At
        least one job is claimed when any is ready, however many images it holds; further jobs
        are added while the images to analyse stay within ``max_images``. Ready means
        ``grouped``, or ``waiting_for_disk`` whose ``not_before`` time has come; a job already
        claimed ``max_attempts`` times is failed instead (see :meth:`claim_job`).

        Parameters
        ----------
        worker : str
            Name of the claiming worker, recorded in ``claimed_by`` (what
            :meth:`release_running` releases when that worker dies).
        max_images : int
            Batch size in images (at least 1).
        max_attempts : int
            Claims after which a job is failed as ``worker_crashed``.
        now : float, optional
            Clock (tests).

        Returns
        -------
        list of Job
            Oldest first; empty when nothing is ready.
        """
        now = time.time() if now is None else now
        claimed: list[Job] = []
        images = 0
        with self._tx() as con:
            rows = con.execute(
                "SELECT j.*, (SELECT COUNT(*) FROM instances i WHERE i.job_id = j.id AND "
                "i.state IN ('grouped', 'inferred')) AS todo FROM jobs j "
                "WHERE j.state = 'grouped' OR (j.state = 'waiting_for_disk' "
                "AND COALESCE(j.not_before, 0) <= ?) OR (j.state = 'running' "
                "AND j.lease_until IS NOT NULL AND j.lease_until < ?) ORDER BY j.id LIMIT ?"
                + self.backend.lock_rows,
                (now, now, max(1, max_images) + 16),
            ).fetchall()
            for row in rows:
                if row["state"] == JobState.RUNNING:
                    logger.warning(
                        "job %d: the lease of %s expired %.0f s ago (it stopped renewing it: "
                        "the process or its node died); the job is taken over",
                        row["id"],
                        row["claimed_by"],
                        now - row["lease_until"],
                    )
                if row["attempts"] >= max_attempts:
                    reason = (
                        f"worker_crashed: the worker stopped while processing this job "
                        f"{row['attempts']} time(s)"
                    )
                    self._fail_job(con, row["id"], reason, now)
                    logger.error("job %d: failed, %s", row["id"], reason)
                    continue
                if claimed and images + row["todo"] > max_images:
                    break
                con.execute(
                    "UPDATE jobs SET state = 'running', attempts = attempts + 1, claimed_by = ?, "
                    "started_at = ?, updated_at = ?, lease_until = ? WHERE id = ?",
                    (worker, now, now, now + self.lease, row["id"]),
                )
                claimed.append(
                    Job(
                        row["id"],
                        row["study_instance_uid"],
                        JobState.RUNNING,
                        row["attempts"] + 1,
                        images=row["todo"],
                    )
                )
                images += row["todo"]
                if images >= max_images:
                    break
        return claimed

    def renew_leases(self, worker: str, now: float | None = None) -> int:
        """Extend the lease of every job ``worker`` holds by :attr:`lease` seconds.

        A worker calls this well within the lease (every third of it) while it works, so its
        jobs are taken over only when it stops (dies, freezes or loses the database).

        Returns
        -------
        int
            Jobs whose lease was renewed.
        """
        now = time.time() if now is None else now
        with self._tx() as con:
            return con.execute(
                "UPDATE jobs SET lease_until = ? WHERE state = 'running' AND claimed_by = ?",
                (now + self.lease, worker),
            ).rowcount

    def _check_owner(self, con: Any, job_id: int, worker: str | None, now: float) -> None:
        """Raise :class:`LeaseLost` unless ``worker`` still holds ``job_id`` (locks its row)."""
        if worker is None:
            return
        n = con.execute(
            "UPDATE jobs SET lease_until = ? WHERE id = ? AND state = 'running' AND claimed_by = ?",
            (now + self.lease, job_id, worker),
        ).rowcount
        if not n:
            raise LeaseLost(f"job {job_id}: {worker} no longer holds it (its lease expired)")

    def wait_for_disk(
        self,
        job_id: int,
        reason: str,
        base_delay: float,
        max_delay: float,
        now: float | None = None,
    ) -> float:
        """Put a running job aside until disk space may be back; return the delay in seconds.

        The job goes to ``waiting_for_disk`` with ``not_before = now + delay``, where the delay
        doubles with each wait (``min(max_delay, base_delay * 2 ** waits)``); images it had not
        finished go back to ``grouped``. The claim is not counted as an attempt: running out of
        disk says nothing about the job, so it is never failed for it.
        """
        now = time.time() if now is None else now
        with self._tx() as con:
            row = con.execute("SELECT disk_waits FROM jobs WHERE id = ?", (job_id,)).fetchone()
            waits = int(row["disk_waits"] or 0) if row else 0
            delay = min(max_delay, base_delay * 2.0**waits)
            con.execute(
                "UPDATE jobs SET state = 'waiting_for_disk', reason = ?, not_before = ?, "
                "disk_waits = disk_waits + 1, attempts = CASE WHEN attempts > 0 THEN attempts - 1 "
                "ELSE 0 END, claimed_by = NULL, lease_until = NULL, "
                "updated_at = ? WHERE id = ?",
                (reason[:500], now + delay, now, job_id),
            )
            con.execute(
                "UPDATE instances SET state = 'grouped', updated_at = ? "
                "WHERE job_id = ? AND state = 'inferred'",
                (now, job_id),
            )
        return delay

    def _fail_job(self, con: Any, job_id: int, reason: str, now: float) -> None:
        con.execute(
            "UPDATE jobs SET state = 'failed', reason = ?, finished_at = ?, updated_at = ?, "
            "lease_until = NULL WHERE id = ?",
            (reason, now, now, job_id),
        )
        con.execute(
            "UPDATE instances SET state = 'failed', reason = ?, updated_at = ? "
            "WHERE job_id = ? AND state IN ('grouped', 'inferred')",
            (reason, now, job_id),
        )

    def job(self, job_id: int) -> Job | None:
        """One job."""
        row = self._con().execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            return None
        return Job(
            row["id"],
            row["study_instance_uid"],
            JobState(row["state"]),
            row["attempts"],
            row["reason"],
        )

    def jobs(self, states: Sequence[str] | None = None, limit: int = 100) -> list[Job]:
        """Most recent jobs, optionally only in some states."""
        sql, args = "SELECT * FROM jobs", []
        if states:
            sql += f" WHERE state IN ({','.join('?' * len(states))})"
            args = list(states)
        sql += " ORDER BY id DESC LIMIT ?"
        rows = self._con().execute(sql, [*args, limit]).fetchall()
        return [
            Job(r["id"], r["study_instance_uid"], JobState(r["state"]), r["attempts"], r["reason"])
            for r in rows
        ]

    def job_instances(self, job_id: int, states: Sequence[str] | None = None) -> list[Instance]:
        """Instances of a job (optionally only in some states), in arrival order."""
        sql, args = "SELECT * FROM instances WHERE job_id = ?", [job_id]
        if states:
            sql += f" AND state IN ({','.join('?' * len(states))})"
            args += list(states)
        rows = self._con().execute(sql + " ORDER BY received_at, sop_instance_uid", args)
        return [self._instance(r) for r in rows]

    def set_instance_state(
        self, sop_instance_uid: str, state: str, reason: str | None = None
    ) -> None:
        """Move one instance to ``state`` (with a reason for failed/skipped)."""
        if state not in INSTANCE_STATES:
            raise ValueError(f"unknown instance state {state!r}")
        with self._tx() as con:
            con.execute(
                "UPDATE instances SET state = ?, reason = ?, updated_at = ? "
                "WHERE sop_instance_uid = ?",
                (state, reason, time.time(), sop_instance_uid),
            )

    def record_results(
        self,
        job_id: int,
        source_sop_instance_uid: str,
        results: Sequence[ResultFile],
        targets: Sequence[str],
        now: float | None = None,
        outcome: str | None = None,
        worker: str | None = None,
    ) -> None:
        """Commit the result files of one source image and queue their deliveries.

        In one transaction: a results row per file, a pending delivery per (result, target), and
        the source instance moves to ``results_written``. ``outcome`` is the prediction's
        outcome (``suspected``, ``not_suspected`` or ``indeterminate``; counted by the metrics).
        With ``worker``, the job must still be claimed by that worker (its lease is renewed).

        Raises
        ------
        LeaseLost
            When ``worker`` is given and no longer holds the job (nothing is recorded).
        sqlite3.IntegrityError or psycopg.IntegrityError
            When this source image already has results of the same kind (both are in
            :data:`pacs_listener.store.INTEGRITY_ERRORS`).
        """
        now = time.time() if now is None else now
        with self._tx() as con:
            self._check_owner(con, job_id, worker, now)
            for r in results:
                result_id = con.execute(
                    "INSERT INTO results (job_id, source_sop_instance_uid, kind, "
                    "sop_instance_uid, study_instance_uid, path, created_at, outcome) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
                    (
                        job_id,
                        source_sop_instance_uid,
                        r.kind,
                        r.sop_instance_uid,
                        r.study_instance_uid,
                        self._rel(r.path),
                        now,
                        outcome,
                    ),
                ).fetchone()[0]
                for target in targets:
                    con.execute(
                        "INSERT INTO deliveries (result_id, target, state, next_attempt_at) "
                        "VALUES (?, ?, 'pending', ?)",
                        (result_id, target, now),
                    )
            con.execute(
                "UPDATE instances SET state = 'results_written', reason = NULL, updated_at = ? "
                "WHERE sop_instance_uid = ?",
                (now, source_sop_instance_uid),
            )

    def results(self, job_id: int | None = None) -> list[ResultFile]:
        """Result files, of one job or all."""
        sql, args = "SELECT * FROM results", []
        if job_id is not None:
            sql, args = sql + " WHERE job_id = ?", [job_id]
        rows = self._con().execute(sql + " ORDER BY id", args)
        return [
            ResultFile(
                r["kind"], r["sop_instance_uid"], r["study_instance_uid"], self._abs(r["path"])
            )
            for r in rows
        ]

    def finish_job(self, job_id: int, now: float | None = None, worker: str | None = None) -> str:
        """Close a job after the worker went through all its images; return the new state.

        A job with at least one result goes to ``results_written`` (or straight on, see
        :meth:`refresh_job`); a job without any is ``failed`` with the images' reasons.

        Raises
        ------
        LeaseLost
            When ``worker`` is given and no longer holds the job (it is left to its new owner).
        """
        now = time.time() if now is None else now
        with self._tx() as con:
            self._check_owner(con, job_id, worker, now)
            n_results = con.execute(
                "SELECT COUNT(*) FROM results WHERE job_id = ?", (job_id,)
            ).fetchone()[0]
            if n_results == 0:
                reasons = [
                    r[0] or "unknown"
                    for r in con.execute(
                        "SELECT reason FROM instances WHERE job_id = ? AND state = 'failed'",
                        (job_id,),
                    )
                ]
                codes = sorted({r.split(":", 1)[0] for r in reasons}) or ["no_images"]
                reason = (
                    f"{len(reasons)} image(s) failed: {', '.join(codes)}"
                    if reasons
                    else "no_images: the job had no image left to analyse"
                )
                self._fail_job(con, job_id, reason, now)
                return "failed"
            con.execute(
                "UPDATE jobs SET state = 'results_written', finished_at = ?, updated_at = ?, "
                "reason = NULL, not_before = NULL, lease_until = NULL WHERE id = ?",
                (now, now, job_id),
            )
            return self._refresh_job(con, job_id, now)

    def release_running(
        self,
        count_attempt: bool = True,
        claimed_by: str | None = None,
        node: str | None = None,
    ) -> int:
        """Put jobs left ``running`` (worker stopped or crashed) back to ``grouped``.

        Parameters
        ----------
        count_attempt : bool
            Keep the claim counted towards ``max_attempts`` (default True: the worker died on
            the job while the service ran). False when a new service run finds jobs its
            predecessor left running: the whole service stopped (kill -9, power cut, container
            restart), which says nothing about the job, so repeated restarts never fail it.
        claimed_by : str, optional
            Release only the jobs this worker claimed (one of several workers died; the others'
            jobs stay theirs).
        node : str, optional
            Release only the jobs claimed by the workers of this node (``claimed_by`` starts
            with ``<node>/``): a node restarting on a shared store frees its own claims at once
            and leaves the other nodes' alone. Default (neither): every running job.

        Returns
        -------
        int
            Number of jobs released.
        """
        where, args = "state = 'running'", [time.time()]
        if claimed_by is not None:
            where += " AND claimed_by = ?"
            args.append(claimed_by)
        if node is not None:
            where += " AND substr(claimed_by, 1, ?) = ?"
            args += [len(node) + 1, node + "/"]
        attempts = (
            "attempts" if count_attempt else "CASE WHEN attempts > 0 THEN attempts - 1 ELSE 0 END"
        )
        with self._tx() as con:
            released = [
                r[0]
                for r in con.execute(
                    "UPDATE jobs SET state = 'grouped', claimed_by = NULL, lease_until = NULL, "
                    f"updated_at = ?, attempts = {attempts} WHERE {where} RETURNING id",
                    args,
                ).fetchall()
            ]
            for job_id in released:
                con.execute(
                    "UPDATE instances SET state = 'grouped' WHERE state = 'inferred' "
                    "AND job_id = ?",
                    (job_id,),
                )
        if released:
            logger.info("%d unfinished job(s) will resume", len(released))
        return len(released)

    # -- operations --------------------------------------------------------------------------

    def requeue(
        self, job_id: int | None = None, all_dead: bool = False, all_failed: bool = False
    ) -> int:
        """Re-queue dead deliveries and failed jobs; return how many jobs were re-queued.

        Parameters
        ----------
        job_id : int, optional
            One job: its dead deliveries are retried from scratch, or, if the job failed, its
            failed images are analysed again.
        all_dead : bool
            Every job whose delivery was dead-lettered.
        all_failed : bool
            Every failed job.
        """
        now = time.time()
        with self._tx() as con:
            ids: list[int] = []
            if job_id is not None:
                ids.append(job_id)
            if all_dead:
                ids += [r[0] for r in con.execute("SELECT id FROM jobs WHERE state = 'dead'")]
            if all_failed:
                ids += [r[0] for r in con.execute("SELECT id FROM jobs WHERE state = 'failed'")]
            n = 0
            for jid in dict.fromkeys(ids):
                row = con.execute("SELECT state FROM jobs WHERE id = ?", (jid,)).fetchone()
                if row is None:
                    continue
                if row["state"] in ("dead", "results_written", "delivered"):
                    moved = con.execute(
                        "UPDATE deliveries SET state = 'pending', tries = 0, next_attempt_at = ?, "
                        "last_error = NULL WHERE state = 'dead' AND result_id IN "
                        "(SELECT id FROM results WHERE job_id = ?)",
                        (now, jid),
                    ).rowcount
                    if moved:
                        con.execute(
                            "UPDATE jobs SET state = 'results_written' WHERE id = ?", (jid,)
                        )
                        self._refresh_job(con, jid, now)
                        n += 1
                elif row["state"] == "failed":
                    con.execute(
                        "UPDATE instances SET state = 'grouped', reason = NULL, updated_at = ? "
                        "WHERE job_id = ? AND state = 'failed' AND path IS NOT NULL",
                        (now, jid),
                    )
                    con.execute(
                        "UPDATE jobs SET state = 'grouped', attempts = 0, reason = NULL, "
                        "updated_at = ? WHERE id = ?",
                        (now, jid),
                    )
                    n += 1
        if n:
            logger.info("re-queued %d job(s)", n)
        return n

    def check_writable(self) -> None:
        """Commit a small write (the time of this check in ``meta``), as ``/readyz`` does.

        Raises
        ------
        sqlite3.Error or psycopg.Error
            When the store cannot be written (disk full, read-only, locked for 30 s).
        """
        self._set_meta("writable_checked_at", repr(time.time()))

    def files_of_job(self, job_id: int) -> list[Path]:
        """Spool and result files of a job (for clean-up after delivery)."""
        con = self._con()
        paths = [
            r[0]
            for r in con.execute(
                "SELECT path FROM instances WHERE job_id = ? AND path IS NOT NULL", (job_id,)
            )
        ]
        paths += [r[0] for r in con.execute("SELECT path FROM results WHERE job_id = ?", (job_id,))]
        return [self._abs(p) for p in paths]
