"""The schema's one registry and its runner (storage/sql/, layer 2: IO adapter; imports base and
the storage modules whose data migrations run here).

Every table of storage/ is created and changed by a named migration, applied once per database
and recorded by name in `schema_migrations`. The SQL of migration `NAME` is in `schema/`:
`NAME.sql` (both dialects) followed by `NAME.sqlite.sql` or `NAME.postgresql.sql` (one
dialect), at least one of them present. Statements end with `;` at the end of a line (a `;`
inside a trigger body does not end one); `--` lines before a statement are comments; the DDL
macros `{pk}`, `{bigint}`, `{real}`, `{without_rowid}`... are filled by `Database.ddl`. A
migration's name and SQL never change once released (a database that has it recorded would
not see the change): a schema change is a new migration, added at the end of `MIGRATIONS`.

Some migrations also change data (`after`, in the same transaction); those steps are the
functions below, beside the registry, so that nothing in a constructor hides a schema step.
Each owner applies its own migrations (`ensure(db, "outbox")`) when it is constructed.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ... import jsonio
from ...errors import ConfigError
from ..context import consent_key
from ..search import write_index

if TYPE_CHECKING:
    from .database import Database, Tx

__all__ = ["MIGRATIONS", "SCHEMA_DIR", "Migration", "apply", "ensure", "names_on_disk", "run", "statements"]

SCHEMA_DIR = Path(__file__).with_name("schema")
_DIALECTS = ("sqlite", "postgresql")
_END = re.compile(r";[ \t]*(?:\n|$)")
_MIGRATION_LOCK = 0x6B61706D  # "kapm"


def _rekey_consents(tx: Tx) -> None:
    """outbox-3: key stored Consents by `consent_key` (earlier keys also took a `use: old`
    identifier, so a re-posted consent would not replace its earlier copy)."""
    for row in tx.execute("SELECT id, body FROM outbox_context WHERE type = 'Consent'"):
        key = consent_key(jsonio.loads(row["body"], source="outbox context"))
        tx.execute("UPDATE outbox_context SET ident = ? WHERE type = 'Consent' AND id = ?", (key, row["id"]))


def _reindex(tx: Tx) -> None:
    """store-2: fill `fhir_index` from the current versions (after a change of its layout)."""
    for r in tx.execute(
        "SELECT c.type, c.id, h.body FROM fhir_current c "
        "JOIN fhir_history h ON h.seq = c.seq WHERE c.deleted = 0"
    ):
        write_index(tx, r["type"], r["id"], jsonio.loads(r["body"]))


def _check_store_3(tx: Tx) -> None:
    """Refuse the store-3 migration (it rolls back whole) when a current row has no matching
    history row: its body would be gone, and counts would disagree with the rows returned."""
    rows = tx.execute(
        "SELECT COUNT(*) AS n FROM fhir_current c LEFT JOIN fhir_history h ON h.seq = c.seq "
        "WHERE h.seq IS NULL OR h.type <> c.type OR h.id <> c.id OR h.version <> c.version"
    )
    if rows[0]["n"]:
        raise ConfigError(
            f"store-3: {rows[0]['n']} current resource row(s) have no matching history row; the "
            "database was left on its old layout (repair it, or restore a backup)",
            rule="store:migration",
        )


@dataclass(frozen=True)
class Migration:
    """One named schema step: its SQL files in `schema/`, and an optional data step after them."""

    name: str
    after: Callable[[Tx], None] | None = None

    @property
    def owner(self) -> str:
        """The table group it belongs to: `outbox` for `outbox-3`."""
        return self.name.rpartition("-")[0]


#: Every migration, in the order each owner applies its own.
MIGRATIONS: tuple[Migration, ...] = (
    Migration("outbox-1"),
    Migration("outbox-2"),
    Migration("outbox-3", after=_rekey_consents),
    Migration("outbox-4"),
    Migration("store-1"),
    Migration("store-2", after=_reindex),
    Migration("store-3", after=_check_store_3),
    Migration("store-4"),
    Migration("auditlog-1"),
    Migration("auditlog-2"),
    Migration("partners-1"),
    Migration("partners-2"),
    Migration("webhooks-1"),
    Migration("operators-1"),
    Migration("partners-3"),
    Migration("subscriptions-1"),
)
_BY_NAME = {m.name: m for m in MIGRATIONS}


def names_on_disk() -> set[str]:
    """The migration names that have SQL files in `schema/`."""
    out = set()
    for path in SCHEMA_DIR.glob("*.sql"):
        stem = path.name[: -len(".sql")]
        for dialect in _DIALECTS:
            stem = stem.removesuffix(f".{dialect}")
        out.add(stem)
    return out


@functools.cache
def statements(name: str, dialect: str) -> tuple[str, ...]:
    """The statements of migration `name` for `dialect`, as written (DDL macros unfilled)."""
    found = [p for p in (SCHEMA_DIR / f"{name}.sql", SCHEMA_DIR / f"{name}.{dialect}.sql") if p.is_file()]
    if name not in _BY_NAME or dialect not in _DIALECTS or not found:
        raise ConfigError(f"No migration '{name}' for {dialect} in {SCHEMA_DIR}", rule="store:migration")
    return tuple(stmt for path in found for stmt in _split(path.read_text(encoding="utf-8")))


def _split(text: str) -> list[str]:
    out = []
    for chunk in _END.split(text):
        lines = chunk.split("\n")
        while lines and (not lines[0].strip() or lines[0].startswith("--")):
            lines.pop(0)
        if lines:
            out.append("\n".join(lines))
    return out


def apply(db: Database, name: str) -> bool:
    """Apply one registered migration unless `db` has it recorded; True if applied now."""
    return run(db, name, statements(name, db.dialect), _BY_NAME[name].after)


def ensure(db: Database, owner: str) -> list[str]:
    """Apply, in registry order, every migration of `owner` the database lacks; the names applied now."""
    return [m.name for m in MIGRATIONS if m.owner == owner and apply(db, m.name)]


def run(db: Database, name: str, stmts: Sequence[str], after: Callable[[Tx], None] | None = None) -> bool:
    """Apply DDL statements once, recorded under `name` in `schema_migrations`; True if applied now.

    `after(tx)` (e.g. filling a rebuilt table) runs in the same transaction when it applies.

    On PostgreSQL a transaction-level advisory lock serialises processes starting together
    (they would otherwise race on CREATE TABLE); SQLite's BEGIN IMMEDIATE already does.
    """
    with db.transaction() as tx:
        if db.dialect == "postgresql":
            tx.execute("SELECT pg_advisory_xact_lock(?)", (_MIGRATION_LOCK,))
        tx.execute("CREATE TABLE IF NOT EXISTS schema_migrations (name TEXT PRIMARY KEY)")
        if tx.execute("SELECT name FROM schema_migrations WHERE name = ?", (name,)):
            return False
        for stmt in stmts:
            tx.execute(db.ddl(stmt))
        if after is not None:
            after(tx)
        tx.execute("INSERT INTO schema_migrations (name) VALUES (?)", (name,))
        return True
