"""The durable outbox (storage/, layer 2: IO adapter; imports base and pure core): every
outbound resource is stored here before anything is sent.

One row per (recipient endpoint, idempotency key). The key is the resource's business
identifier `SYSTEM|VALUE`; enqueuing the same key twice for the same endpoint returns the row
already there, never a second one. A row moves through these states:

    pending --claim--> sending --mark_delivered--> delivered --purge_delivered--> (gone)
       ^                  |  \\--mark_retry (attempts left)--> pending (next_attempt_at later)
       |                  |   \\--mark_dead (4xx, or no attempts left)--> dead
       |                  \\--hold (consent re-check failed)--> held
       +---- release (held) / retry (dead or held, attempts reset) ----+

A claim is a lease on the one leased queue (storage/queue.py): `sending` rows whose lease ran
out (the worker died) are claimable again, so a crash never strands an item, and only the
lease holder moves an item on. Time is seconds since the epoch, from the injected `clock` (or
passed in as `now`); nothing here reads a global. Tables: storage/sql/schema/outbox-*.sql.

The consent context the send-time re-check reads (`put_context`, `context_for`) lives in
storage/context.py; the outbox only hands it on.
"""

from __future__ import annotations

import builtins
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from .. import jsonio
from ..errors import Conflict, InputError, NotFound
from ..fhir.identifiers import business_identifier, patient_reference
from .context import CONTEXT_TYPES, ConsentContext
from .db import Database
from .queue import LeasedQueue
from .sql import migrations

__all__ = ["CONTEXT_TYPES", "STATES", "Outbox", "OutboxItem", "idempotency_key_of"]


STATES = ("pending", "sending", "delivered", "held", "dead")
MAX_ERROR_CHARS = 500


@dataclass(frozen=True)
class OutboxItem:
    """One queued resource and its delivery state (a row of `outbox_items`)."""

    id: int
    endpoint: str
    base_url: str
    resource_type: str
    resource: dict[str, Any] = field(repr=False)
    idempotency_key: str
    patient_ref: str | None
    recipient_ref: str | None
    purpose: str | None
    consent_ref: str | None
    state: str
    attempts: int
    next_attempt_at: float
    lease_owner: str | None
    lease_until: float | None
    last_error: str | None
    hold_reason: str | None
    server_id: str | None
    server_version: str | None
    server_location: str | None
    delivered_by: str | None
    delivered_at: float | None
    created_at: float
    updated_at: float

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> OutboxItem:
        body = row["resource"]
        values = dict(row)
        values["resource"] = jsonio.loads(
            body if isinstance(body, (bytes, str)) else bytes(body), source=f"outbox item {row['id']}"
        )
        values["id"] = int(row["id"])
        values["attempts"] = int(row["attempts"])
        return cls(**values)

    def summary(self) -> dict[str, Any]:
        """The item without its resource body (safe to print: ids, states and times only)."""
        out = {
            k: getattr(self, k)
            for k in (
                "id",
                "endpoint",
                "base_url",
                "resource_type",
                "idempotency_key",
                "patient_ref",
                "recipient_ref",
                "purpose",
                "consent_ref",
                "state",
                "attempts",
                "last_error",
                "hold_reason",
                "server_id",
                "server_version",
                "server_location",
                "delivered_by",
                "lease_owner",
            )
        }
        for k in ("next_attempt_at", "lease_until", "delivered_at", "created_at", "updated_at"):
            out[k] = iso(getattr(self, k))
        return out


def iso(ts: float | None) -> str | None:
    """Epoch seconds as an ISO 8601 UTC instant (None stays None)."""
    if ts is None:
        return None
    return datetime.fromtimestamp(float(ts), tz=UTC).isoformat(timespec="seconds")


def idempotency_key_of(resource: dict[str, Any]) -> str:
    """`SYSTEM|VALUE` of the resource's first business identifier (skipping `use: old`).

    >>> idempotency_key_of({"identifier": [{"system": "http://x/sid", "value": "N1"}]})
    'http://x/sid|N1'
    """
    found = business_identifier(resource)
    if found is not None:
        return "|".join(found)
    rtype = resource.get("resourceType", "Resource")
    raise InputError(
        f"{rtype} has no business identifier (system and value) to deliver it idempotently",
        pointer="/identifier",
        expression=f"{rtype}.identifier",
        rule="outbox:idempotency-key",
        code="required",
    )


def _holder(item: OutboxItem | int, worker_id: str | None) -> tuple[int, str | None]:
    """The item's id and whose lease a leased update must find: `worker_id`, else the claimed
    item's lease owner; None (whoever holds it) for a bare id without a worker id."""
    if isinstance(item, int):
        return item, worker_id
    return item.id, worker_id if worker_id is not None else item.lease_owner


class Outbox:
    """The durable queue on a shared `Database` (SQLite or PostgreSQL).

    `clock` gives "now" in epoch seconds for every operation that is not handed `now`.
    """

    def __init__(self, db: Database, *, clock: Callable[[], float] = time.time) -> None:
        self.db = db
        self.clock = clock
        migrations.ensure(db, "outbox")
        self.queue = LeasedQueue(db, "outbox_items")
        self.context = ConsentContext(db, clock=clock)

    def _now(self, now: float | None) -> float:
        return float(self.clock() if now is None else now)

    # ---- writing

    def enqueue(
        self,
        resource: dict[str, Any],
        *,
        endpoint: str,
        base_url: str,
        idempotency_key: str | None = None,
        patient_ref: str | None = None,
        recipient_ref: str | None = None,
        purpose: str | None = None,
        consent_ref: str | None = None,
        now: float | None = None,
    ) -> tuple[OutboxItem, bool]:
        """Store a resource for delivery; durable (committed) before this returns.

        Returns (item, created): when the endpoint already has an item with this idempotency
        key (default: the resource's first business identifier), that item and False.
        """
        if not isinstance(resource, dict) or not isinstance(resource.get("resourceType"), str):
            raise InputError(
                "Only a FHIR resource (a JSON object with resourceType) can be queued",
                pointer="/resourceType",
                expression="resourceType",
                rule="fhir:resourceType",
            )
        if not endpoint or not base_url:
            raise InputError(
                "An outbox item needs a recipient endpoint name and base URL",
                rule="outbox:endpoint",
                code="required",
            )
        key = idempotency_key or idempotency_key_of(resource)
        if "|" not in key:
            raise InputError(
                "Idempotency key must be SYSTEM|VALUE (got one without '|')", rule="outbox:idempotency-key"
            )
        ts = self._now(now)
        body = jsonio.dumps(resource).decode()
        with self.db.transaction() as tx:
            inserted = tx.execute(
                "INSERT INTO outbox_items (endpoint, base_url, resource_type, resource, "
                "idempotency_key, patient_ref, recipient_ref, purpose, consent_ref, state, "
                "attempts, next_attempt_at, created_at, updated_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 'pending', 0, ?, ?, ?) "
                "ON CONFLICT (endpoint, idempotency_key) DO NOTHING RETURNING id",
                (
                    endpoint,
                    base_url,
                    resource["resourceType"],
                    body,
                    key,
                    patient_ref or patient_reference(resource),
                    recipient_ref,
                    purpose,
                    consent_ref,
                    ts,
                    ts,
                    ts,
                ),
            )
            rows = tx.execute(
                "SELECT * FROM outbox_items WHERE endpoint = ? AND idempotency_key = ?", (endpoint, key)
            )
        return OutboxItem.from_row(rows[0]), bool(inserted)

    def claim(
        self, worker_id: str, limit: int = 50, now: float | None = None, lease_seconds: float = 300.0
    ) -> list[OutboxItem]:
        """Take up to `limit` due items for `worker_id`: state `sending`, leased until
        now + lease_seconds, attempts + 1. Due means pending with next_attempt_at <= now, or
        sending with an expired lease (its worker died). Oldest due first."""
        rows = self.queue.claim(worker_id, limit, self._now(now), lease_seconds)
        return sorted((OutboxItem.from_row(r) for r in rows), key=lambda i: (i.next_attempt_at, i.id))

    def _leased_update(
        self, item: OutboxItem | int, sets: str, params: tuple[Any, ...], worker_id: str | None
    ) -> bool:
        return self.queue.finish(*_holder(item, worker_id), sets, params)

    def mark_delivered(
        self,
        item: OutboxItem | int,
        *,
        server_id: str | None,
        server_version: str | None = None,
        location: str | None = None,
        worker_id: str | None = None,
        now: float | None = None,
        note: str | None = None,
    ) -> bool:
        """Record a delivery. Only the lease holder may (False: the lease was lost). `note` is
        kept in `last_error` (e.g. how a delivery whose answer was unreadable was reconciled)."""
        ts = self._now(now)
        return self._leased_update(
            item,
            "state = 'delivered', server_id = ?, server_version = ?, server_location = ?, "
            "delivered_by = lease_owner, delivered_at = ?, lease_owner = NULL, lease_until = NULL, "
            "last_error = ?, updated_at = ?",
            (server_id, server_version, location, ts, note[:MAX_ERROR_CHARS] if note else None, ts),
            worker_id,
        )

    def renew_lease(
        self,
        item: OutboxItem | int,
        lease_seconds: float,
        *,
        worker_id: str | None = None,
        now: float | None = None,
    ) -> bool:
        """Extend the holder's lease just before a send; False when the lease has passed to
        another worker (then this worker must not send the item)."""
        ts = self._now(now)
        return self.queue.renew(*_holder(item, worker_id), ts + float(lease_seconds), touched_at=ts)

    def mark_retry(
        self,
        item: OutboxItem | int,
        error: str,
        next_at: float,
        *,
        worker_id: str | None = None,
        now: float | None = None,
    ) -> bool:
        """Back to pending, due again at `next_at`, with a one-line error summary."""
        ts = self._now(now)
        return self._leased_update(
            item,
            "state = 'pending', next_attempt_at = ?, last_error = ?, lease_owner = NULL, "
            "lease_until = NULL, updated_at = ?",
            (float(next_at), error[:MAX_ERROR_CHARS], ts),
            worker_id,
        )

    def mark_dead(
        self, item: OutboxItem | int, error: str, *, worker_id: str | None = None, now: float | None = None
    ) -> bool:
        """Dead-letter: no further attempts until an operator retries it."""
        ts = self._now(now)
        return self._leased_update(
            item,
            "state = 'dead', last_error = ?, lease_owner = NULL, lease_until = NULL, updated_at = ?",
            (error[:MAX_ERROR_CHARS], ts),
            worker_id,
        )

    def hold(
        self, item: OutboxItem | int, reason: str, *, worker_id: str | None = None, now: float | None = None
    ) -> bool:
        """Hold one item with a reason. A worker holds the item it leased (pass the claimed
        item); an operator holds a pending item by id. False if it is in another state."""
        ts = self._now(now)
        sets = "state = 'held', hold_reason = ?, lease_owner = NULL, lease_until = NULL, updated_at = ?"
        if isinstance(item, OutboxItem) and item.state == "sending":
            # nothing was sent: the claim's attempt is given back, so holds never dead-letter
            return self._leased_update(
                item,
                sets + ", attempts = CASE WHEN attempts > 0 THEN attempts - 1 ELSE 0 END",
                (reason[:MAX_ERROR_CHARS], ts),
                worker_id,
            )
        item_id = item if isinstance(item, int) else item.id
        with self.db.transaction() as tx:
            rows = tx.execute(
                f"UPDATE outbox_items SET {sets} WHERE id = ? AND state = 'pending' RETURNING id",
                (reason[:MAX_ERROR_CHARS], ts, item_id),
            )
        return bool(rows)

    def hold_recipient(self, recipient_ref: str, reason: str, *, now: float | None = None) -> int:
        """Hold every pending item for a recipient (e.g. its consent was revoked); returns how
        many. Items being sent right now are caught by the worker's send-time re-check."""
        ts = self._now(now)
        with self.db.transaction() as tx:
            rows = tx.execute(
                "UPDATE outbox_items SET state = 'held', hold_reason = ?, "
                "updated_at = ? WHERE recipient_ref = ? AND state = 'pending' "
                "RETURNING id",
                (reason[:MAX_ERROR_CHARS], ts, recipient_ref),
            )
        return len(rows)

    def release(self, item_id: int, *, now: float | None = None) -> OutboxItem:
        """A held item goes back to pending, due now (attempts kept)."""
        return self._operator_move(item_id, ("held",), "hold_reason = NULL", now)

    def retry(self, item_id: int, *, now: float | None = None) -> OutboxItem:
        """A dead or held item goes back to pending, due now, with attempts reset to 0."""
        return self._operator_move(item_id, ("dead", "held"), "attempts = 0, hold_reason = NULL", now)

    def retry_all(self, state: str, *, endpoint: str | None = None, now: float | None = None) -> list[int]:
        """Every `state` (dead or held) item, of `endpoint` if given, back to pending at once
        (one UPDATE, so an item a worker moves meanwhile is either in it or not); their ids."""
        if state not in ("dead", "held"):
            raise Conflict(f"Only dead or held items can be retried, not {state}", rule="outbox:state")
        ts = self._now(now)
        where = "state = ?" + (" AND endpoint = ?" if endpoint is not None else "")
        params: tuple[Any, ...] = (ts, ts, state) + ((endpoint,) if endpoint is not None else ())
        with self.db.transaction() as tx:
            rows = tx.execute(
                "UPDATE outbox_items SET state = 'pending', next_attempt_at = ?, updated_at = ?, "
                f"attempts = 0, hold_reason = NULL WHERE {where} RETURNING id",
                params,
            )
        return sorted(int(r["id"]) for r in rows)

    def _operator_move(
        self, item_id: int, from_states: tuple[str, ...], extra: str, now: float | None
    ) -> OutboxItem:
        ts = self._now(now)
        marks = ", ".join("?" for _ in from_states)
        with self.db.transaction() as tx:
            rows = tx.execute(
                f"UPDATE outbox_items SET state = 'pending', next_attempt_at = ?, "
                f"updated_at = ?, {extra} WHERE id = ? AND state IN ({marks}) "
                "RETURNING *",
                (ts, ts, int(item_id)) + from_states,
            )
            if not rows:
                current = tx.execute("SELECT state FROM outbox_items WHERE id = ?", (int(item_id),))
        if rows:
            return OutboxItem.from_row(rows[0])
        if not current:
            raise NotFound(f"Outbox item {item_id} does not exist", rule="outbox:item")
        raise Conflict(
            f"Outbox item {item_id} is {current[0]['state']}; only "
            f"{' or '.join(from_states)} items can be moved back to pending",
            rule="outbox:state",
        )

    def recover(self, worker_id: str, *, now: float | None = None) -> int:
        """Give back every lease `worker_id` holds (a restarted worker with the same id does
        not wait for its old leases to expire); returns how many items became pending."""
        return self.queue.recover(worker_id, self._now(now))

    def purge_delivered(self, older_than: float) -> int:
        """Delete delivered items delivered before `older_than` (epoch seconds); returns how many.
        The server's conditional create still prevents duplicates if one is queued again."""
        with self.db.transaction() as tx:
            rows = tx.execute(
                "DELETE FROM outbox_items WHERE state = 'delivered' AND delivered_at < ? RETURNING id",
                (float(older_than),),
            )
        return len(rows)

    # ---- reading

    def get(self, item_id: int) -> OutboxItem | None:
        """One item by id, or None."""
        rows = self.db.query("SELECT * FROM outbox_items WHERE id = ?", (int(item_id),))
        return OutboxItem.from_row(rows[0]) if rows else None

    def list(
        self,
        state: str | None = None,
        *,
        endpoint: str | None = None,
        limit: int = 100,
        after: int | None = None,
        before: int | None = None,
    ) -> list[OutboxItem]:
        """Items in id order, optionally of one state and/or endpoint; `after`/`before` an id:
        only items with a greater/smaller id (keyset paging; with `before` the page nearest it,
        still in id order)."""
        if state is not None and state not in STATES:
            raise InputError(
                f"Unknown outbox state '{state}': use one of {', '.join(STATES)}",
                rule="outbox:state",
                code="value",
            )
        where: builtins.list[str] = []
        params: builtins.list[Any] = []
        if state:
            where.append("state = ?")
            params.append(state)
        if endpoint:
            where.append("endpoint = ?")
            params.append(endpoint)
        if after is not None:
            where.append("id > ?")
            params.append(int(after))
        if before is not None:
            where.append("id < ?")
            params.append(int(before))
        clause = f"WHERE {' AND '.join(where)} " if where else ""
        order = "DESC" if before is not None and after is None else "ASC"
        rows = self.db.query(
            f"SELECT * FROM outbox_items {clause}ORDER BY id {order} LIMIT ?", (*params, int(limit))
        )
        items = [OutboxItem.from_row(r) for r in rows]
        return items[::-1] if order == "DESC" else items

    def endpoints(self) -> builtins.list[str]:
        """The endpoint names items are queued for, in order: one index probe per name (a loose
        index scan), not a scan of the table."""
        rows = self.db.query(
            "WITH RECURSIVE e(name) AS (SELECT MIN(endpoint) FROM outbox_items UNION ALL "
            "SELECT (SELECT MIN(endpoint) FROM outbox_items WHERE endpoint > e.name) FROM e "
            "WHERE e.name IS NOT NULL) SELECT name FROM e WHERE name IS NOT NULL"
        )
        return [r["name"] for r in rows]

    def counts_by_endpoint(self) -> dict[str, dict[str, int]]:
        """How many items each endpoint has in each state (every state present, zero included)."""
        out: dict[str, dict[str, int]] = {}
        for row in self.db.query(
            "SELECT endpoint, state, COUNT(*) AS n FROM outbox_items GROUP BY endpoint, state ORDER BY endpoint"
        ):
            out.setdefault(row["endpoint"], dict.fromkeys(STATES, 0))[row["state"]] = int(row["n"])
        return out

    def counts(self) -> dict[str, int]:
        """How many items are in each state (every state present, zero included)."""
        out = dict.fromkeys(STATES, 0)
        for row in self.db.query("SELECT state, COUNT(*) AS n FROM outbox_items GROUP BY state"):
            out[row["state"]] = int(row["n"])
        return out

    # ---- consent context for the send-time re-check (kept in storage/context.py)

    def put_context(self, resource: dict[str, Any], *, now: float | None = None) -> bool:
        """Keep the latest version of a consent-context resource (`ConsentContext.put`)."""
        return self.context.put(resource, now=now)

    def context_for(self, patient_ref: str) -> builtins.list[dict[str, Any]]:  # `list` names a method here
        """The consent context for one patient (`ConsentContext.for_patient`)."""
        return self.context.for_patient(patient_ref)
