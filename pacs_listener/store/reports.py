"""Reports of the job store: counts for ``status``, metrics for Prometheus, node heartbeats.

:class:`ReportQueries` is part of :class:`~pacs_listener.jobs.JobStore` (a mixin): read-only
queries over the whole store, plus the nodes table every ``serve`` process beats into.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from .records import INSTANCE_STATES, JOB_STATES, RESULTS_TO_WRITE, STAGES, Node

__all__ = ["ReportQueries"]


class ReportQueries:
    """What ``status``, ``/metrics`` and the node list read (mixed into
    :class:`~pacs_listener.jobs.JobStore`)."""

    def job_timings(self, job_id: int) -> dict[str, float | None]:
        """Seconds spent waiting, analysing and delivering (None when not reached)."""
        r = self._con().execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if r is None:
            return {}

        def span(a: str, b: str) -> float | None:
            return round(r[b] - r[a], 3) if r[a] is not None and r[b] is not None else None

        return {
            "queued_s": span("created_at", "started_at"),
            "analysis_s": span("started_at", "finished_at"),
            "delivery_s": span("finished_at", "delivered_at"),
        }

    def counts(self, now: float | None = None) -> dict:
        """Counts per state and the backlog, for ``dicom-covid status``."""
        now = time.time() if now is None else now
        con = self._con()

        def by_state(sql: str, states: Sequence[str]) -> dict[str, int]:
            found = dict(con.execute(sql).fetchall())
            return {s: int(found.get(s, 0)) for s in (*states, *sorted(set(found) - set(states)))}

        instances = by_state(
            "SELECT state, COUNT(*) FROM instances GROUP BY state", INSTANCE_STATES
        )
        jobs = by_state("SELECT state, COUNT(*) FROM jobs GROUP BY state", JOB_STATES)
        deliveries = by_state(
            "SELECT state, COUNT(*) FROM deliveries GROUP BY state",
            ("pending", "delivered", "dead"),
        )
        per_target = {
            r[0]: {"pending": int(r[1]), "dead": int(r[2]), "delivered": int(r[3])}
            for r in con.execute(
                "SELECT target, "
                + ", ".join(
                    f"SUM(CASE WHEN state = '{s}' THEN 1 ELSE 0 END)"
                    for s in ("pending", "dead", "delivered")
                )
                + " FROM deliveries GROUP BY target ORDER BY target"
            )
        }
        oldest = con.execute(
            "SELECT MIN(r.created_at) FROM deliveries d JOIN results r ON r.id = d.result_id "
            "WHERE d.state = 'pending'"
        ).fetchone()[0]
        duplicates = con.execute("SELECT COALESCE(SUM(duplicates), 0) FROM instances").fetchone()[0]
        disk = con.execute(
            "SELECT COUNT(*), MIN(not_before), MAX(disk_waits) FROM jobs "
            "WHERE state = 'waiting_for_disk'"
        ).fetchone()
        skipped = dict(
            con.execute(
                "SELECT reason, COUNT(*) FROM instances WHERE state = 'skipped' GROUP BY reason"
            ).fetchall()
        )
        return {
            "instances": instances,
            "jobs": jobs,
            "deliveries": deliveries,
            "targets": per_target,
            "skipped_reasons": skipped,
            "duplicates": int(duplicates),
            "backlog": {
                "instances_waiting_for_quiet_period": instances["received"],
                "jobs_waiting_for_worker": jobs["grouped"] + jobs["running"],
                "jobs_waiting_for_disk": int(disk[0]),
                "next_disk_retry_in_s": round(max(0.0, disk[1] - now), 1) if disk[0] else None,
                "disk_waits": int(disk[2] or 0),
                "result_bytes_reserved": self.pending_result_bytes(),
                "deliveries_pending": deliveries["pending"],
                "oldest_pending_delivery_age_s": round(now - oldest, 1) if oldest else None,
            },
        }

    def metrics(self, buckets: Sequence[float], now: float | None = None) -> dict:
        """Everything ``serve --metrics-port`` exports, read in one transaction.

        The counts come from the store, which the listener, the worker process and the sender
        all write, so they are right whichever process did the work and survive restarts.

        Parameters
        ----------
        buckets : sequence of float
            Upper bounds (seconds, increasing) of the stage-duration histograms.
        now : float, optional
            Current time (default: now).

        Returns
        -------
        dict
            ``instances`` (per state), ``skipped_reasons``, ``jobs`` (per state), ``deliveries``
            (per target, per state), ``analysed`` (images with results), ``outcomes`` (per
            outcome; ``unknown`` for results recorded before outcomes were), ``duplicates``,
            ``result_bytes_reserved``, ``oldest_pending_delivery_age_s`` and ``stages``
            (per stage of :data:`STAGES`: cumulative bucket counts, count, sum).
        """
        now = time.time() if now is None else now
        bounds = [float(b) for b in buckets]
        con = self._con()
        with self.backend.snapshot(con):  # one consistent state for every query
            instances = {s: 0 for s in INSTANCE_STATES}
            instances.update(con.execute("SELECT state, COUNT(*) FROM instances GROUP BY state"))
            jobs = {s: 0 for s in JOB_STATES}
            jobs.update(con.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state"))
            skipped = dict(
                con.execute(
                    "SELECT COALESCE(reason, 'unknown'), COUNT(*) FROM instances "
                    "WHERE state = 'skipped' GROUP BY 1"
                ).fetchall()
            )
            deliveries: dict[str, dict[str, int]] = {}
            for target, state, n in con.execute(
                "SELECT target, state, COUNT(*) FROM deliveries GROUP BY target, state"
            ):
                per = deliveries.setdefault(target, {"pending": 0, "delivered": 0, "dead": 0})
                per[state] = int(n)
            analysed = con.execute(
                "SELECT COUNT(DISTINCT source_sop_instance_uid) FROM results"
            ).fetchone()[0]
            outcomes = dict(
                con.execute(
                    "SELECT COALESCE(outcome, 'unknown'), COUNT(*) FROM results "
                    "WHERE kind = 'sr' GROUP BY 1"
                ).fetchall()
            )
            duplicates = con.execute(
                "SELECT COALESCE(SUM(duplicates), 0) FROM instances"
            ).fetchone()[0]
            reserved = con.execute(
                "SELECT COALESCE(SUM(reserve_bytes), 0) FROM instances WHERE state IN "
                f"({','.join('?' * len(RESULTS_TO_WRITE))})",
                RESULTS_TO_WRITE,
            ).fetchone()[0]
            oldest = con.execute(
                "SELECT MIN(r.created_at) FROM deliveries d JOIN results r "
                "ON r.id = d.result_id WHERE d.state = 'pending'"
            ).fetchone()[0]
            stages = {}
            for stage, expr in STAGES.items():
                row = con.execute(
                    "SELECT COUNT(x), COALESCE(SUM(x), 0)"
                    + "".join(
                        ", COALESCE(SUM(CASE WHEN x <= ? THEN 1 ELSE 0 END), 0)" for _ in bounds
                    )
                    + f" FROM (SELECT CASE WHEN {expr} < 0 THEN 0 ELSE {expr} END AS x "
                    "FROM jobs j) s WHERE x IS NOT NULL",
                    bounds,
                ).fetchone()
                stages[stage] = {
                    "count": int(row[0]),
                    "sum": float(row[1]),
                    "buckets": [int(v) for v in row[2:]],
                }
        return {
            "instances": {k: int(v) for k, v in instances.items()},
            "skipped_reasons": {str(k): int(v) for k, v in skipped.items()},
            "jobs": {k: int(v) for k, v in jobs.items()},
            "deliveries": deliveries,
            "analysed": int(analysed),
            "outcomes": {str(k): int(v) for k, v in outcomes.items()},
            "duplicates": int(duplicates),
            "result_bytes_reserved": int(reserved),
            "oldest_pending_delivery_age_s": max(0.0, now - oldest) if oldest else None,
            "stages": stages,
        }

    # -- nodes -------------------------------------------------------------------------------

    def heartbeat(
        self,
        node_id: str,
        *,
        host: str,
        pid: int,
        roles: str,
        version: str,
        started_at: float,
        now: float | None = None,
    ) -> None:
        """Record that a node is alive (``status`` shows it; a service beats every few
        seconds)."""
        now = time.time() if now is None else now
        with self._tx() as con:
            con.execute(
                "INSERT INTO nodes (node_id, host, pid, roles, version, started_at, heartbeat_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (node_id) DO UPDATE SET "
                "host = excluded.host, pid = excluded.pid, roles = excluded.roles, "
                "version = excluded.version, started_at = excluded.started_at, "
                "heartbeat_at = excluded.heartbeat_at",
                (node_id, host, int(pid), roles, version, started_at, now),
            )

    def nodes(self) -> list[Node]:
        """Every node that ever used the store, most recent heartbeat first, with the jobs
        its workers hold now."""
        rows = self._con().execute(
            "SELECT n.*, (SELECT COUNT(*) FROM jobs j WHERE j.state = 'running' AND "
            "substr(j.claimed_by, 1, length(n.node_id) + 1) = n.node_id || '/') AS leases "
            "FROM nodes n ORDER BY n.heartbeat_at DESC, n.node_id"
        )
        return [
            Node(
                r["node_id"],
                r["host"],
                int(r["pid"]),
                r["roles"],
                r["version"],
                float(r["started_at"]),
                float(r["heartbeat_at"]),
                int(r["leases"]),
            )
            for r in rows
        ]
