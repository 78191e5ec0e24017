"""The rest-hook job table (storage/, layer 2: IO adapter; imports base only): one row per
notification to send, on the leased queue (storage/queue.py). The sender that claims and posts
them is `Notifier` in exchange/webhooks.py.

A job is (partner, event, resource, version), queued once; `pending` until claimed, then
`sending` under a lease, then `delivered`, `pending` again (a later retry) or `dead` (given
up; an operator's `retry` puts it back). Table: storage/sql/schema/webhooks-1.sql.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .db import Database
from .queue import LeasedQueue
from .sql import migrations

__all__ = ["WebhookJob", "WebhookJobs"]

_COLUMNS = "id, partner, event, resource, version, state, attempts, next_attempt_at, last_status, last_error"


@dataclass(frozen=True)
class WebhookJob:
    """One queued notification (a row of `webhook_jobs`): ids, states and times only."""

    id: int
    partner: str
    event: str
    resource: str
    version: str
    state: str
    attempts: int
    next_attempt_at: float
    last_status: int | None
    last_error: str | None


class WebhookJobs:
    """The `webhook_jobs` table on a shared `Database`; every call is handed its `now`."""

    def __init__(self, db: Database) -> None:
        self.db = db
        migrations.ensure(db, "webhooks")
        self.queue = LeasedQueue(db, "webhook_jobs", returning=_COLUMNS)

    def enqueue(self, partner: str, event: str, resource_ref: str, version: str, *, now: float) -> bool:
        """Queue one notification; True if new (the same partner, event, resource and version is
        queued once). Inside a transaction of this thread it joins it (a SAVEPOINT)."""
        with self.db.transaction() as tx:
            rows = tx.execute(
                "INSERT INTO webhook_jobs (partner, event, resource, version, state, attempts, next_attempt_at, "
                "created_at, updated_at) VALUES (?, ?, ?, ?, 'pending', 0, ?, ?, ?) "
                "ON CONFLICT (partner, event, resource, version) DO NOTHING RETURNING id",
                (partner, event, resource_ref, version, now, now, now),
            )
        return bool(rows)

    def jobs(
        self, state: str | None = None, limit: int = 100, *, partner: str | None = None
    ) -> list[WebhookJob]:
        """Queued notifications, oldest first (all states or one; all partners or one)."""
        conds: list[str] = []
        params: list[Any] = []
        for column, value in (("state", state), ("partner", partner)):
            if value is not None:
                conds.append(f"{column} = ?")
                params.append(value)
        where = f"WHERE {' AND '.join(conds)}" if conds else ""
        rows = self.db.query(
            f"SELECT {_COLUMNS} FROM webhook_jobs {where} ORDER BY id LIMIT ?", (*params, int(limit))
        )
        return [_job(r) for r in rows]

    def counts(self) -> dict[str, dict[str, int]]:
        """How many jobs each partner has in each state (one grouped query; states without jobs
        are absent)."""
        out: dict[str, dict[str, int]] = {}
        for r in self.db.query(
            "SELECT partner, state, COUNT(*) AS n FROM webhook_jobs GROUP BY partner, state"
        ):
            out.setdefault(r["partner"], {})[r["state"]] = int(r["n"])
        return out

    def retry(self, job_id: int | None = None, *, partner: str | None = None, now: float) -> list[WebhookJob]:
        """Put dead jobs back in the queue, due `now`, attempts from zero, last status and error
        cleared: one by id, or every dead one (of `partner`, if given). The jobs moved."""
        where = "state = 'dead'"
        params: list[Any] = [now, now]
        if job_id is not None:
            where += " AND id = ?"
            params.append(int(job_id))
        if partner is not None:
            where += " AND partner = ?"
            params.append(partner)
        with self.db.transaction() as tx:
            rows = tx.execute(
                "UPDATE webhook_jobs SET state = 'pending', attempts = 0, next_attempt_at = ?, "
                f"last_status = NULL, last_error = NULL, updated_at = ? WHERE {where} "
                f"RETURNING {_COLUMNS}",
                tuple(params),
            )
        return sorted((_job(r) for r in rows), key=lambda j: j.id)

    def busy(self, now: float) -> int:
        """How many jobs are due at `now` or being sent (jobs waiting for a later retry are not)."""
        return int(
            self.db.query(
                "SELECT COUNT(*) AS n FROM webhook_jobs WHERE (state = 'pending' AND next_attempt_at <= ?) "
                "OR state = 'sending'",
                (now,),
            )[0]["n"]
        )

    def claim(self, worker: str, limit: int, now: float, lease_seconds: float) -> list[WebhookJob]:
        """Lease up to `limit` due jobs to `worker`, in id order. A read comes first: an idle
        sender takes no write lock."""
        if not self.queue.has_due(now):
            return []
        return sorted(
            (_job(r) for r in self.queue.claim(worker, limit, now, lease_seconds)), key=lambda j: j.id
        )

    def renew(self, job: WebhookJob, worker: str, until: float) -> bool:
        """Extend `worker`'s lease on `job` to `until`; False when another worker has it now."""
        return self.queue.renew(job.id, worker, until)

    def defer(self, job: WebhookJob, worker: str, *, next_at: float, now: float) -> bool:
        """Put a claimed job back, due at `next_at`, its attempt not counted (it was never
        posted: its channel was not ready for it), only while `worker` holds the lease."""
        return self.queue.finish(
            job.id,
            worker,
            "state = 'pending', lease_owner = NULL, lease_until = NULL, attempts = attempts - 1, "
            "next_attempt_at = ?, updated_at = ?",
            (next_at, now),
        )

    def finish(
        self,
        job: WebhookJob,
        worker: str,
        state: str,
        status: int | None,
        error: str | None,
        *,
        next_at: float,
        now: float,
    ) -> bool:
        """Record an attempt's outcome, only while `worker` still holds the lease."""
        return self.queue.finish(
            job.id,
            worker,
            "state = ?, lease_owner = NULL, lease_until = NULL, "
            "last_status = ?, last_error = ?, next_attempt_at = ?, updated_at = ?",
            (state, status, error, next_at, now),
        )


def _job(row: dict[str, Any]) -> WebhookJob:
    return WebhookJob(
        int(row["id"]),
        row["partner"],
        row["event"],
        row["resource"],
        row["version"],
        row["state"],
        int(row["attempts"]),
        float(row["next_attempt_at"]),
        None if row["last_status"] is None else int(row["last_status"]),
        row["last_error"],
    )
