"""The topic-based Subscription tables (storage/, layer 2: IO adapter; imports base only):
one row per Subscription (its partner, topic, status, the resource as accepted, its event
counter and heartbeat clock) and one row per numbered event of it (what `$events` replays).

An event is `(subscription, number, at, focus, focus_version)`: numbers start at 1 and grow by
one per event of that Subscription (`events-since-subscription-start`), taken inside the
transaction of the write that caused the event, so a number exists exactly when its write is
committed. Only ids are kept (never a body): what a subscriber may see of a focus is decided
again whenever it is sent or replayed. Tables: storage/sql/schema/subscriptions-1.sql.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .. import jsonio
from .db import Database
from .sql import migrations

__all__ = ["Listener", "SubscriptionEvent", "SubscriptionRow", "Subscriptions"]

_COLUMNS = "id, partner, topic, status, base, body, version, events, heartbeat_period, next_heartbeat_at, end_at, error"
#: The states a Subscription is in (R5 SubscriptionStatusCodes, the backport's too).
STATES = ("requested", "active", "error", "off")
#: PostgreSQL advisory lock key serialising Subscription creates (`Subscriptions.create(at_most=)`).
_CREATE_LOCK = 4244


@dataclass(frozen=True)
class SubscriptionRow:
    """One Subscription as stored: `body` is the resource in the deployment's release, without
    its status and meta (the row's `status` and `version` are filled in when it is shown)."""

    id: str
    partner: str
    topic: str
    status: str
    base: str
    body: dict[str, Any]
    version: int
    events: int
    heartbeat_period: float | None
    next_heartbeat_at: float | None
    end_at: float | None
    error: str | None


@dataclass(frozen=True)
class SubscriptionEvent:
    """One numbered event of a Subscription: when, and the "Type/id" and version it is about."""

    number: int
    at: str
    focus: str | None
    focus_version: str | None


@dataclass(frozen=True)
class Listener:
    """A Subscription that takes events, as a write's fan-out first reads it: no body."""

    id: str
    partner: str
    version: int


class Subscriptions:
    """The `subscriptions` and `subscription_events` tables on a shared `Database`."""

    def __init__(self, db: Database) -> None:
        self.db = db
        migrations.ensure(db, "subscriptions")

    def create(
        self,
        sid: str,
        partner: str,
        topic: str,
        status: str,
        body: dict[str, Any],
        *,
        base: str,
        heartbeat_period: float | None,
        end_at: float | None,
        now: float,
        at_most: int | None = None,
    ) -> SubscriptionRow | None:
        """Store a new Subscription (its heartbeat clock starts now). `base`: the FHIR base its
        notifications name resources by (the one it was created through). With `at_most`: None,
        and nothing stored, when `partner` already holds that many; counted under the write lock
        of the inserting transaction, so concurrent creates never pass the limit together."""
        next_hb = now + heartbeat_period if heartbeat_period else None
        with self.db.transaction() as tx:
            if at_most is not None:
                if self.db.dialect == "postgresql":  # serialise creates: the count stays true
                    tx.execute("SELECT pg_advisory_xact_lock(?)", (_CREATE_LOCK,))
                held = tx.execute("SELECT COUNT(*) AS n FROM subscriptions WHERE partner = ?", (partner,))
                if int(held[0]["n"]) >= at_most:
                    return None
            tx.execute(
                "INSERT INTO subscriptions (id, partner, topic, status, base, body, version, events, "
                "heartbeat_period, next_heartbeat_at, end_at, error, created_at, updated_at) "
                "VALUES (?, ?, ?, ?, ?, ?, 1, 0, ?, ?, ?, NULL, ?, ?)",
                (
                    sid,
                    partner,
                    topic,
                    status,
                    base,
                    jsonio.dumps(body).decode(),
                    heartbeat_period,
                    next_hb,
                    end_at,
                    now,
                    now,
                ),
            )
        row = self.get(sid)
        assert row is not None
        return row

    def replace(
        self,
        row: SubscriptionRow,
        topic: str,
        status: str,
        body: dict[str, Any],
        *,
        heartbeat_period: float | None,
        end_at: float | None,
        now: float,
    ) -> SubscriptionRow | None:
        """An update of the partner's own Subscription (version + 1); None when it changed meanwhile."""
        next_hb = now + heartbeat_period if heartbeat_period else None
        with self.db.transaction() as tx:
            done = tx.execute(
                "UPDATE subscriptions SET topic = ?, status = ?, body = ?, version = version + 1, "
                "heartbeat_period = ?, next_heartbeat_at = ?, end_at = ?, error = NULL, updated_at = ? "
                "WHERE id = ? AND version = ? RETURNING id",
                (
                    topic,
                    status,
                    jsonio.dumps(body).decode(),
                    heartbeat_period,
                    next_hb,
                    end_at,
                    now,
                    row.id,
                    row.version,
                ),
            )
        return self.get(row.id) if done else None

    def get(self, sid: str, *, partner: str | None = None) -> SubscriptionRow | None:
        """The Subscription `sid` (only if `partner` owns it, when given)."""
        sql = f"SELECT {_COLUMNS} FROM subscriptions WHERE id = ?"
        params: tuple[Any, ...] = (sid,)
        if partner is not None:
            sql += " AND partner = ?"
            params += (partner,)
        rows = self.db.query(sql, params)
        return _row(rows[0]) if rows else None

    def of_partner(
        self, partner: str, *, status: str | None = None, topic: str | None = None, limit: int = 200
    ) -> list[SubscriptionRow]:
        """A partner's Subscriptions (never another's), in id order."""
        sql = f"SELECT {_COLUMNS} FROM subscriptions WHERE partner = ?"
        params: list[Any] = [partner]
        for column, value in (("status", status), ("topic", topic)):
            if value is not None:
                sql += f" AND {column} = ?"
                params.append(value)
        rows = self.db.query(sql + " ORDER BY id LIMIT ?", (*params, int(limit)))
        return [_row(r) for r in rows]

    def delete(self, sid: str, partner: str) -> bool:
        """Remove the partner's Subscription and its events; False when it has none of that id."""
        with self.db.transaction() as tx:
            gone = tx.execute(
                "DELETE FROM subscriptions WHERE id = ? AND partner = ? RETURNING id", (sid, partner)
            )
            if gone:
                tx.execute("DELETE FROM subscription_events WHERE subscription = ?", (sid,))
        return bool(gone)

    def listening(self, tx: Any, topic: str) -> list[SubscriptionRow]:
        """Inside a write's transaction: the Subscriptions of `topic` that take events now
        (requested, active or error: a Subscription in error keeps counting, so `$events`
        can replay what it missed; an `off` one does not)."""
        rows = tx.execute(
            f"SELECT {_COLUMNS} FROM subscriptions WHERE topic = ? AND status IN ('requested', 'active', 'error')",
            (topic,),
        )
        return [_row(r) for r in rows]

    def listeners(self, tx: Any, topic: str) -> list[Listener]:
        """Inside a write's transaction: the Subscriptions `listening` returns, without their
        bodies (what a fan-out reads on every write; it decodes a body only for a version it
        has not parsed yet, `rows_in`)."""
        rows = tx.execute(
            "SELECT id, partner, version FROM subscriptions "
            "WHERE topic = ? AND status IN ('requested', 'active', 'error') ORDER BY id",
            (topic,),
        )
        return [Listener(r["id"], r["partner"], int(r["version"])) for r in rows]

    def rows_in(self, tx: Any, ids: list[str]) -> list[SubscriptionRow]:
        """Inside a transaction: the Subscriptions with these ids (bodies decoded)."""
        out: list[SubscriptionRow] = []
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            marks = ", ".join("?" for _ in chunk)
            out += [
                _row(r)
                for r in tx.execute(f"SELECT {_COLUMNS} FROM subscriptions WHERE id IN ({marks})", chunk)
            ]
        return out

    def add_event(self, tx: Any, sid: str, at: str, focus: str | None, focus_version: str | None) -> int:
        """Inside a write's transaction: the next event number of `sid`, recorded with its focus."""
        rows = tx.execute(
            "UPDATE subscriptions SET events = events + 1 WHERE id = ? RETURNING events", (sid,)
        )
        number = int(rows[0]["events"])
        tx.execute(
            "INSERT INTO subscription_events (subscription, number, at, focus, focus_version) VALUES (?, ?, ?, ?, ?)",
            (sid, number, at, focus, focus_version),
        )
        return number

    def events(self, sid: str, since: int, until: int, limit: int = 100) -> list[SubscriptionEvent]:
        """The events numbered `since`..`until` (inclusive), at most `limit`, in order."""
        rows = self.db.query(
            "SELECT number, at, focus, focus_version FROM subscription_events "
            "WHERE subscription = ? AND number >= ? AND number <= ? ORDER BY number LIMIT ?",
            (sid, int(since), int(until), int(limit)),
        )
        return [SubscriptionEvent(int(r["number"]), r["at"], r["focus"], r["focus_version"]) for r in rows]

    def set_status(
        self,
        sid: str,
        status: str,
        *,
        error: str | None = None,
        only_from: tuple[str, ...] = STATES,
        now: float,
    ) -> bool:
        """Move `sid` to `status` (from one of `only_from`); True when it moved."""
        marks = ", ".join("?" for _ in only_from)
        with self.db.transaction() as tx:
            rows = tx.execute(
                f"UPDATE subscriptions SET status = ?, error = ?, updated_at = ? "
                f"WHERE id = ? AND status IN ({marks}) AND status <> ? RETURNING id",
                (status, error, now, sid, *only_from, status),
            )
        return bool(rows)

    def sent(self, sid: str, now: float) -> None:
        """Something was delivered to `sid` at `now`: its next heartbeat is a period later."""
        with self.db.transaction() as tx:
            tx.execute(
                "UPDATE subscriptions SET next_heartbeat_at = ? + heartbeat_period "
                "WHERE id = ? AND heartbeat_period IS NOT NULL",
                (now, sid),
            )

    def due_heartbeats(self, now: float) -> list[tuple[SubscriptionRow, int]]:
        """Claim the heartbeats due at `now` (active Subscriptions whose period passed with
        nothing sent): each row with the heartbeat's sequence number, its clock moved a period on
        in the same transaction, so two processes never claim the same heartbeat."""
        if not self.heartbeat_due(now):
            return []
        with self.db.transaction() as tx:
            rows = tx.execute(
                "UPDATE subscriptions SET next_heartbeat_at = ? + heartbeat_period "
                f"WHERE status = 'active' AND next_heartbeat_at <= ? RETURNING {_COLUMNS}",
                (now, now),
            )
        return [(_row(r), int(now * 1000)) for r in rows]

    def heartbeat_due(self, now: float) -> bool:
        """Whether an active Subscription's heartbeat is due at `now` (a read: no write lock)."""
        return bool(
            self.db.query(
                "SELECT id FROM subscriptions WHERE status = 'active' AND next_heartbeat_at <= ? LIMIT 1",
                (now,),
            )
        )

    def next_heartbeat(self) -> float | None:
        """When the earliest active Subscription's heartbeat falls due (None: none has one)."""
        rows = self.db.query("SELECT MIN(next_heartbeat_at) AS t FROM subscriptions WHERE status = 'active'")
        return None if not rows or rows[0]["t"] is None else float(rows[0]["t"])

    def expire(self, now: float) -> list[str]:
        """Turn `off` every Subscription whose `end` has passed; their ids. A read first: the
        sender asks every round, and most rounds nothing has ended (no write lock taken then)."""
        if not self.db.query(
            "SELECT id FROM subscriptions WHERE end_at IS NOT NULL AND end_at <= ? AND status <> 'off' LIMIT 1",
            (now,),
        ):
            return []
        with self.db.transaction() as tx:
            rows = tx.execute(
                "UPDATE subscriptions SET status = 'off', error = 'ended', updated_at = ? "
                "WHERE end_at IS NOT NULL AND end_at <= ? AND status <> 'off' RETURNING id",
                (now, now),
            )
        return [r["id"] for r in rows]


def _row(r: dict[str, Any]) -> SubscriptionRow:
    return SubscriptionRow(
        r["id"],
        r["partner"],
        r["topic"],
        r["status"],
        r["base"],
        jsonio.loads(r["body"], source="subscription"),
        int(r["version"]),
        int(r["events"]),
        None if r["heartbeat_period"] is None else float(r["heartbeat_period"]),
        None if r["next_heartbeat_at"] is None else float(r["next_heartbeat_at"]),
        None if r["end_at"] is None else float(r["end_at"]),
        r["error"],
    )
