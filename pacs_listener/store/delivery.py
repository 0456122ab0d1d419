"""Deliveries: which results are due where, and what each try did to its job.

:class:`DeliveryQueries` is part of :class:`~pacs_listener.jobs.JobStore` (a mixin): it uses
the store's connection, transactions and paths.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from ..config import RetryPolicy
from .records import Delivery

__all__ = ["DeliveryQueries"]


class DeliveryQueries:
    """The sender's side of the job store (mixed into :class:`~pacs_listener.jobs.JobStore`)."""

    def due_deliveries(
        self, targets: Sequence[str], now: float | None = None, limit: int = 100
    ) -> list[Delivery]:
        """Pending deliveries to the given targets whose next try is due.

        On a shared store the deliveries returned are also claimed: their next try moves
        :attr:`lease` seconds ahead, so another node's sender does not send them at the same
        time (and does, after the lease, if this one dies before it records the outcome).
        """
        if not targets:
            return []
        now = time.time() if now is None else now
        sql = (
            "SELECT d.result_id, d.target, d.tries, r.job_id, r.kind, r.sop_instance_uid, "
            "r.study_instance_uid, r.path "
            "FROM deliveries d JOIN results r ON r.id = d.result_id "
            "WHERE d.state = 'pending' AND d.next_attempt_at <= ? "
            f"AND d.target IN ({','.join('?' * len(targets))}) "
            "ORDER BY d.next_attempt_at, d.result_id LIMIT ?"
        )
        if not self.shared:
            rows = self._con().execute(sql, [now, *targets, limit]).fetchall()
        else:
            with self._tx() as con:
                rows = con.execute(
                    sql + " FOR UPDATE OF d SKIP LOCKED", [now, *targets, limit]
                ).fetchall()
                for r in rows:
                    con.execute(
                        "UPDATE deliveries SET next_attempt_at = ? "
                        "WHERE result_id = ? AND target = ?",
                        (now + self.lease, r["result_id"], r["target"]),
                    )
        return [
            Delivery(
                r["result_id"],
                r["target"],
                r["tries"],
                r["job_id"],
                r["kind"],
                r["sop_instance_uid"],
                r["study_instance_uid"],
                self._abs(r["path"]),
            )
            for r in rows
        ]

    def next_due(self, targets: Sequence[str]) -> float | None:
        """Time of the earliest pending delivery to these targets, or None."""
        if not targets:
            return None
        row = (
            self._con()
            .execute(
                "SELECT MIN(next_attempt_at) FROM deliveries WHERE state = 'pending' AND target IN "
                f"({','.join('?' * len(targets))})",
                list(targets),
            )
            .fetchone()
        )
        return row[0]

    def delivery_succeeded(self, result_id: int, target: str, now: float | None = None) -> str:
        """Mark one (result, target) delivered; return the job's new state."""
        now = time.time() if now is None else now
        with self._tx() as con:
            con.execute(
                "UPDATE deliveries SET state = 'delivered', delivered_at = ?, tries = tries + 1, "
                "last_error = NULL WHERE result_id = ? AND target = ?",
                (now, result_id, target),
            )
            job_id = con.execute(
                "SELECT job_id FROM results WHERE id = ?", (result_id,)
            ).fetchone()[0]
            return self._refresh_job(con, job_id, now)

    def delivery_failed(
        self, result_id: int, target: str, error: str, policy: RetryPolicy, now: float | None = None
    ) -> str:
        """Count a failed try; schedule the next one or dead-letter. Return the delivery state."""
        now = time.time() if now is None else now
        with self._tx() as con:
            row = con.execute(
                "SELECT d.tries, r.job_id FROM deliveries d JOIN results r ON r.id = d.result_id "
                "WHERE d.result_id = ? AND d.target = ?",
                (result_id, target),
            ).fetchone()
            tries = row["tries"] + 1
            state = "dead" if tries >= policy.max_tries else "pending"
            con.execute(
                "UPDATE deliveries SET state = ?, tries = ?, last_error = ?, next_attempt_at = ? "
                "WHERE result_id = ? AND target = ?",
                (state, tries, error[:500], now + policy.delay(tries), result_id, target),
            )
            self._refresh_job(con, row["job_id"], now)
        return state

    def delivery_postponed(
        self, result_id: int, target: str, error: str, delay: float, now: float | None = None
    ) -> None:
        """Try a delivery again after ``delay`` seconds without counting a try (the output
        folder's disk is full: that says nothing about the result, so it is never
        dead-lettered for it)."""
        now = time.time() if now is None else now
        with self._tx() as con:
            con.execute(
                "UPDATE deliveries SET last_error = ?, next_attempt_at = ? "
                "WHERE result_id = ? AND target = ? AND state = 'pending'",
                (error[:500], now + delay, result_id, target),
            )

    def _refresh_job(self, con: Any, job_id: int, now: float) -> str:
        """Derive a finished job's state from its deliveries."""
        job = con.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if job is None or job["state"] in ("grouped", "running", "waiting_for_disk", "failed"):
            return job["state"] if job else "unknown"
        counts = dict(
            con.execute(
                "SELECT d.state, COUNT(*) FROM deliveries d JOIN results r ON r.id = d.result_id "
                "WHERE r.job_id = ? GROUP BY d.state",
                (job_id,),
            ).fetchall()
        )
        if counts.get("pending"):
            state, reason = "results_written", None
        elif counts.get("dead"):
            errors = [
                r[0]
                for r in con.execute(
                    "SELECT DISTINCT d.target || ': ' || COALESCE(d.last_error, '') "
                    "FROM deliveries d JOIN results r ON r.id = d.result_id "
                    "WHERE r.job_id = ? AND d.state = 'dead'",
                    (job_id,),
                )
            ]
            state, reason = "dead", "delivery_failed: " + "; ".join(errors)
        else:
            state, reason = "delivered", None
        if state != job["state"]:
            con.execute(
                "UPDATE jobs SET state = ?, reason = ?, updated_at = ?, delivered_at = "
                "CASE WHEN ? = 'delivered' THEN ? ELSE delivered_at END WHERE id = ?",
                (state, reason, now, state, now, job_id),
            )
            inst_state = {
                "results_written": "results_written",
                "dead": "dead",
                "delivered": "delivered",
            }[state]
            con.execute(
                "UPDATE instances SET state = ?, updated_at = ? WHERE job_id = ? AND state IN "
                "('results_written', 'delivered', 'dead')",
                (inst_state, now, job_id),
            )
        return state
