"""The leased job queue under the outbox and the webhook jobs (storage/, layer 2: IO adapter;
imports base only, through the database seam).

A queue is a table with at least `id`, `state`, `attempts`, `next_attempt_at`, `lease_owner`,
`lease_until` and `updated_at`. A claim is a lease: it moves due rows to `sending` for one
worker until `lease_until`, attempts + 1, and `sending` rows whose lease ran out (the worker
died) are due again, so a crash never strands a job. SQLite claims inside one `BEGIN
IMMEDIATE` transaction; PostgreSQL claims a batch with `FOR UPDATE SKIP LOCKED`, so several
adapter instances share one queue without taking the same row. Only the holder may renew a
lease or finish a job (`finish` is the holder-only update every state change goes through),
and a worker restarted under the same id gives its old leases back with `recover`.
What a job is, and what its states after `sending` mean, belongs to the queue's owner.
"""

from __future__ import annotations

from typing import Any

from .db import Database

__all__ = ["LeasedQueue"]

#: Due: pending and due, or being sent under a lease that ran out.
_DUE = "(state = 'pending' AND next_attempt_at <= ?) OR (state = 'sending' AND lease_until < ?)"


class LeasedQueue:
    """Claim, renew, finish and recover leased rows of `table` on a shared `Database`.

    `returning` is the column list claims give back (`*`, or the columns the owner reads).
    """

    def __init__(self, db: Database, table: str, *, returning: str = "*") -> None:
        self.db = db
        self.table = table
        self.returning = returning

    def has_due(self, now: float) -> bool:
        """Whether any row is due at `now`: a read, taking no write lock (for idle polling)."""
        return bool(self.db.query(f"SELECT id FROM {self.table} WHERE {_DUE} LIMIT 1", (now, now)))

    def claim(self, worker: str, limit: int, now: float, lease_seconds: float) -> list[dict[str, Any]]:
        """Lease up to `limit` due rows to `worker` until now + lease_seconds (state `sending`,
        attempts + 1), the longest due first; the rows as claimed, in no set order (the owner
        sorts them as its jobs are sent)."""
        lock = " FOR UPDATE SKIP LOCKED" if self.db.dialect == "postgresql" else ""
        with self.db.transaction() as tx:
            rows = tx.execute(
                f"UPDATE {self.table} SET state = 'sending', lease_owner = ?, lease_until = ?, "
                f"attempts = attempts + 1, updated_at = ? WHERE id IN (SELECT id FROM {self.table} WHERE {_DUE} "
                f"ORDER BY next_attempt_at, id LIMIT ?{lock}) RETURNING {self.returning}",
                (worker, now + lease_seconds, now, now, now, int(limit)),
            )
        return rows

    def finish(self, job_id: int, worker: str | None, sets: str, params: tuple[Any, ...]) -> bool:
        """`UPDATE ... SET {sets}` of a row being sent, only while `worker` holds its lease (any
        holder when `worker` is None: an operator's or a caller's that knows only the id).
        False when the row is no longer `sending` under that lease."""
        owner = "" if worker is None else " AND lease_owner = ?"
        with self.db.transaction() as tx:
            rows = tx.execute(
                f"UPDATE {self.table} SET {sets} WHERE id = ? AND state = 'sending'{owner} RETURNING id",
                params + (job_id,) + (() if worker is None else (worker,)),
            )
        return bool(rows)

    def renew(
        self, job_id: int, worker: str | None, until: float, *, touched_at: float | None = None
    ) -> bool:
        """Extend the holder's lease to `until` (and set updated_at when `touched_at` is given);
        False when the lease has passed to another worker, which then owns the job."""
        if touched_at is None:
            return self.finish(job_id, worker, "lease_until = ?", (until,))
        return self.finish(job_id, worker, "lease_until = ?, updated_at = ?", (until, touched_at))

    def recover(self, worker: str, now: float) -> int:
        """Give back every lease `worker` holds, due at `now` (a restarted worker with the same
        id does not wait for its old leases to expire); how many rows became pending."""
        with self.db.transaction() as tx:
            rows = tx.execute(
                f"UPDATE {self.table} SET state = 'pending', lease_owner = NULL, "
                "lease_until = NULL, next_attempt_at = ?, updated_at = ? "
                "WHERE state = 'sending' AND lease_owner = ? RETURNING id",
                (now, now, worker),
            )
        return len(rows)
