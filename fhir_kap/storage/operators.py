"""Operator accounts of the console, their sessions and the operator log (storage/, layer 2: IO
adapter; imports base only; tables: storage/sql/schema/operators-1*.sql).

Operators are people who run the bridge (bridge/console), distinct from partners (systems
with bearer tokens): an account is made on the command line (`fhir-kap operators add NAME`)
and holds only an argon2id hash of its password (argon2-cffi's defaults, RFC 9106's second
recommended parameters: a slow, memory-hard hash, because passwords, unlike partner tokens, can be
guessed). `verify` costs one hash whether or not the name exists (a dummy hash for unknown
names), so timing does not tell names apart; after `MAX_FAILURES` wrong passwords in a row an
account is locked for `LOCK_SECONDS` (even the right password is refused meanwhile).

Sessions are server-side: the cookie carries a random 256-bit token, the table only its SHA-256
with the session's CSRF token; a session ends at logout, after `IDLE_SECONDS` without use, or
`MAX_SECONDS` after login, and every session of an operator ends when its password changes or
the account is disabled.

The operator log (`operator_log`) records every login (ok or refused), logout and action with
the operator's name, the target (an outbox item id, a partner name...) and the outcome; it is
append-only (database triggers refuse UPDATE and DELETE, as for the audit log) and holds no
patient data: ids, codes and states only.
"""

from __future__ import annotations

import builtins
import hashlib
import hmac
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from ..errors import Conflict, InputError, NotFound
from .db import Database
from .sql import migrations

__all__ = [
    "IDLE_SECONDS",
    "LOCK_SECONDS",
    "MAX_FAILURES",
    "MAX_SECONDS",
    "MIN_PASSWORD",
    "Operator",
    "OperatorLogEntry",
    "Operators",
    "Session",
]

MIN_PASSWORD = 12
MAX_PASSWORD = 1024
MAX_FAILURES = 5
LOCK_SECONDS = 300.0
IDLE_SECONDS = 30 * 60.0
MAX_SECONDS = 12 * 3600.0
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@\-]{0,63}$")


@dataclass(frozen=True)
class Operator:
    """An operator account (never carries its hash)."""

    name: str
    created: str
    disabled: bool
    failed_logins: int
    locked_until: float | None


@dataclass(frozen=True)
class Session:
    """A live console session: who, and the CSRF token its forms must carry."""

    operator: str
    csrf: str
    expires_at: float


@dataclass(frozen=True)
class OperatorLogEntry:
    seq: int
    at: float
    operator: str | None
    action: str
    target: str | None
    outcome: str
    detail: str | None


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def _hasher() -> Any:
    from argon2 import PasswordHasher  # argon2-cffi: only where passwords are handled

    return PasswordHasher()


class Operators:
    """Operator accounts, sessions and the operator log on the shared database."""

    def __init__(self, db: Database, *, clock: Callable[[], float] = time.time) -> None:
        self.db = db
        self.clock = clock
        migrations.ensure(db, "operators")
        self._ph = _hasher()
        self._dummy: str | None = None

    # ---- accounts

    def _check_password(self, password: str) -> None:
        if not isinstance(password, str) or not MIN_PASSWORD <= len(password) <= MAX_PASSWORD:
            raise InputError(
                f"an operator password needs {MIN_PASSWORD}-{MAX_PASSWORD} characters",
                rule="operator:password",
            )

    def add(self, name: str, password: str) -> Operator:
        """Make an account; Conflict if the name is taken."""
        if not _NAME.match(name or ""):
            raise InputError(
                "operator name must be 1-64 letters, digits, '.', '_', '@' or '-'", rule="operator:name"
            )
        self._check_password(password)
        hashed = self._ph.hash(password)
        created = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        with self.db.transaction() as tx:
            if not tx.execute(
                "INSERT INTO operators (name, password_hash, created) VALUES (?, ?, ?) "
                "ON CONFLICT (name) DO NOTHING RETURNING name",
                (name, hashed, created),
            ):
                raise Conflict(f"operator '{name}' already exists", rule="operator:exists", code="duplicate")
        self.log(name, "account-add", name, "ok")
        found = self.get(name)
        assert found is not None
        return found

    def set_password(self, name: str, password: str) -> None:
        """Change a password (unlocks the account); every session of the operator ends."""
        self._check_password(password)
        hashed = self._ph.hash(password)
        with self.db.transaction() as tx:
            if not tx.execute(
                "UPDATE operators SET password_hash = ?, failed_logins = 0, locked_until = NULL "
                "WHERE name = ? RETURNING name",
                (hashed, name),
            ):
                raise NotFound(f"no operator named '{name[:64]}'", rule="operator:unknown")
            tx.execute("DELETE FROM operator_sessions WHERE operator = ?", (name,))
        self.log(name, "account-password", name, "ok")

    def set_disabled(self, name: str, disabled: bool) -> None:
        """Disable (every session ends) or enable an account."""
        with self.db.transaction() as tx:
            if not tx.execute(
                "UPDATE operators SET disabled = ? WHERE name = ? RETURNING name", (int(disabled), name)
            ):
                raise NotFound(f"no operator named '{name[:64]}'", rule="operator:unknown")
            if disabled:
                tx.execute("DELETE FROM operator_sessions WHERE operator = ?", (name,))
        self.log(name, "account-disable" if disabled else "account-enable", name, "ok")

    def get(self, name: str) -> Operator | None:
        rows = self.db.query("SELECT * FROM operators WHERE name = ?", (name,))
        return _operator(rows[0]) if rows else None

    def list(self) -> builtins.list[Operator]:
        return [_operator(r) for r in self.db.query("SELECT * FROM operators ORDER BY name")]

    def verify(self, name: str, password: str) -> tuple[bool, str]:
        """Check a login: (ok, why) with why one of ok, unknown, wrong-password, locked, disabled.

        One argon2 verification whatever the outcome (a dummy hash for an unknown name), so the
        time taken does not tell which it was; wrong passwords count towards the lock."""
        from argon2.exceptions import InvalidHashError, VerificationError

        now = self.clock()
        rows = self.db.query("SELECT * FROM operators WHERE name = ?", (name,)) if _NAME.match(name) else []
        if self._dummy is None:
            self._dummy = self._ph.hash(secrets.token_urlsafe(16))
        stored = rows[0]["password_hash"] if rows else self._dummy
        try:
            ok = bool(password) and len(password) <= MAX_PASSWORD and self._ph.verify(stored, password)
        except (VerificationError, InvalidHashError):
            ok = False
        if not rows:
            return False, "unknown"
        row = rows[0]
        if row["disabled"]:
            return False, "disabled"
        if row["locked_until"] is not None and float(row["locked_until"]) > now:
            return False, "locked"
        with self.db.transaction() as tx:
            if ok:
                tx.execute(
                    "UPDATE operators SET failed_logins = 0, locked_until = NULL WHERE name = ?", (name,)
                )
                if self._ph.check_needs_rehash(stored):
                    tx.execute(
                        "UPDATE operators SET password_hash = ? WHERE name = ?",
                        (self._ph.hash(password), name),
                    )
                return True, "ok"
            failed = int(row["failed_logins"]) + 1
            lock = now + LOCK_SECONDS if failed >= MAX_FAILURES else None
            tx.execute(
                "UPDATE operators SET failed_logins = ?, locked_until = ? WHERE name = ?",
                (0 if lock else failed, lock, name),
            )
        return False, "wrong-password"

    # ---- sessions

    def open_session(self, name: str) -> tuple[str, Session]:
        """A new session for `name`: (cookie token, session). The token is stored only as its SHA-256."""
        token = secrets.token_urlsafe(32)
        csrf = secrets.token_urlsafe(32)
        now = self.clock()
        until = now + MAX_SECONDS
        with self.db.transaction() as tx:
            tx.execute(
                "DELETE FROM operator_sessions WHERE expires_at < ? OR seen_at < ?", (now, now - IDLE_SECONDS)
            )
            tx.execute(
                "INSERT INTO operator_sessions (token_sha256, operator, csrf, created_at, seen_at, expires_at) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (_digest(token), name, csrf, now, now, until),
            )
        return token, Session(name, csrf, until)

    def session(self, token: str | None) -> Session | None:
        """The live session holding `token` (its idle clock restarted), or None."""
        if not token or len(token) > 128:
            return None
        digest = _digest(token)
        now = self.clock()
        rows = self.db.query(
            "SELECT s.*, o.disabled FROM operator_sessions s JOIN operators o ON o.name = s.operator "
            "WHERE s.token_sha256 = ?",
            (digest,),
        )
        if not rows or not hmac.compare_digest(rows[0]["token_sha256"], digest):
            return None
        row = rows[0]
        if row["disabled"] or float(row["expires_at"]) <= now or float(row["seen_at"]) < now - IDLE_SECONDS:
            return None
        if now - float(row["seen_at"]) > 30:  # one write a half-minute at most, not one per page
            with self.db.transaction() as tx:
                tx.execute("UPDATE operator_sessions SET seen_at = ? WHERE token_sha256 = ?", (now, digest))
        return Session(row["operator"], row["csrf"], float(row["expires_at"]))

    def close_session(self, token: str | None) -> None:
        if token:
            with self.db.transaction() as tx:
                tx.execute("DELETE FROM operator_sessions WHERE token_sha256 = ?", (_digest(token),))

    # ---- the operator log

    def log(
        self, operator: str | None, action: str, target: str | None, outcome: str, detail: str | None = None
    ) -> int:
        """Append one entry (ids, codes and states only); its sequence number."""
        with self.db.transaction() as tx:
            rows = tx.execute(
                "INSERT INTO operator_log (at, operator, action, target, outcome, detail) "
                "VALUES (?, ?, ?, ?, ?, ?) RETURNING seq",
                (
                    self.clock(),
                    operator[:64] if operator else None,
                    action,
                    target[:200] if target else None,
                    outcome,
                    detail[:500] if detail else None,
                ),
            )
        return int(rows[0]["seq"])

    def entries(
        self,
        *,
        operator: str | None = None,
        action: str | None = None,
        before: int | None = None,
        limit: int = 100,
    ) -> builtins.list[OperatorLogEntry]:
        """Log entries, newest first (of one operator / action; `before`: older than that seq)."""
        where: builtins.list[str] = []
        params: builtins.list[Any] = []
        for column, value in (("operator", operator), ("action", action)):
            if value:
                where.append(f"{column} = ?")
                params.append(value)
        if before is not None:
            where.append("seq < ?")
            params.append(int(before))
        clause = f"WHERE {' AND '.join(where)} " if where else ""
        rows = self.db.query(
            f"SELECT * FROM operator_log {clause}ORDER BY seq DESC LIMIT ?", (*params, int(limit))
        )
        return [
            OperatorLogEntry(
                int(r["seq"]),
                float(r["at"]),
                r["operator"],
                r["action"],
                r["target"],
                r["outcome"],
                r["detail"],
            )
            for r in rows
        ]


def _operator(row: dict[str, Any]) -> Operator:
    return Operator(
        row["name"],
        row["created"],
        bool(row["disabled"]),
        int(row["failed_logins"]),
        None if row["locked_until"] is None else float(row["locked_until"]),
    )
