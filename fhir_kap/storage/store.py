"""A versioned FHIR resource store on the shared `Database` (storage/, layer 2: IO adapter;
imports base only). Its search parameters and query building: storage/search.py.

Three tables: `fhir_history` (every version with its body, append-only), `fhir_current`
(which version of each resource is the latest: its `seq` in the history, no body) and
`fhir_index` (search values of the current versions, filled on write from `SEARCH_PARAMS`).
Every write runs in one transaction: the version, the current row and the index rows land
together or not at all. Tables and migrations: storage/sql/schema/store-*.sql.

A create writes its body once. On SQLite `fhir_current` is WITHOUT ROWID (its key is its only
B-tree) and `fhir_history.seq` is a plain rowid (AUTOINCREMENT would rewrite `sqlite_sequence`
on every insert; the history is never deleted from, so rowids only grow). With time-ordered
ids (`identifiers.new_id`) a 3 KB create writes about 7 WAL pages where the store-2 layout
wrote 10 (measured), and every page written costs a copy into the WAL and later into the
database file.

`fhir_index` is keyed by its owner (type, id, param, code, system), WITHOUT ROWID on SQLite:
one B-tree, and a resource's rows share one leaf page, so a write dirties one or two index
pages instead of one per distinct value (measured: ~36 -> ~10 WAL pages per 3 KB create).
Searches walk `fhir_current` in `seq` order and probe that key per resource, which is the
plan SQLite chose with the old value-keyed index too.

Two ways to search: `search` (SQL does everything: the clinic, lookups) and `scan` (a partner's
search, whose rows the consent gate decides one by one): a window of at most `limit` candidates
from a position, with the counts of all candidates and of the searcher's own done in SQL, and the
bodies parsed only when `decode` asks. No search reads every matching row to filter it in
Python (docs/operations/search-and-audit.md).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

from .. import jsonio
from ..errors import Conflict, InputError, PreconditionFailed, quote
from ..fhir.identifiers import new_id
from .db import Database, Tx
from .search import (
    DEFAULT_COUNT,
    MAX_ALTERNATIVES,
    MAX_COUNT,
    REFERENCE_PARAMS,
    SEARCH_PARAMS,
    audience_sql,
    check_condition,
    escape_value,
    index_values,
    instant_now,
    page,
    search_sql,
    since_clause,
    split_token,
    split_value,
    write_index,
)
from .sql import migrations

# The search names are re-exported: the bridge and other rooms import them from here.
__all__ = [
    "DEFAULT_COUNT",
    "ID_PATTERN",
    "MAX_ALTERNATIVES",
    "MAX_COUNT",
    "REFERENCE_PARAMS",
    "SEARCH_PARAMS",
    "ScanRow",
    "ScanWindow",
    "SearchResult",
    "Store",
    "StoredResource",
    "check_condition",
    "escape_value",
    "index_values",
    "instant_now",
]

T = TypeVar("T")
ID_PATTERN = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")

#: A current version with its body (`c` and `h` in every read).
#: A lookup by business identifier, driven from the identifier index rows (a handful), never from
#: the type's current rows (all of them); `+c.seq` keeps the planner from walking the type by seq.
IDENTIFIER_LOOKUP = (
    "SELECT c.type, c.id, c.version, c.last_updated, c.deleted, c.source, h.body, c.seq "
    "FROM fhir_index i JOIN fhir_current c ON c.type = i.type AND c.id = i.id "
    "JOIN fhir_history h ON h.seq = c.seq "
    "WHERE i.type = ? AND i.param = 'identifier' AND i.code = ? AND i.system = ? "
    "AND c.deleted = 0 AND {owner} ORDER BY +c.seq {order} LIMIT ?"
)
_CURRENT = (
    "SELECT c.type, c.id, c.version, c.last_updated, c.deleted, c.source, h.body, c.seq "
    "FROM fhir_current c JOIN fhir_history h ON h.seq = c.seq"
)


@dataclass(frozen=True)
class StoredResource:
    """One version of a resource as stored; `resource` carries meta.versionId/lastUpdated."""

    type: str
    id: str
    version: int
    last_updated: str
    deleted: bool
    resource: dict[str, Any]
    source: str | None = None

    @property
    def etag(self) -> str:
        return f'W/"{self.version}"'


@dataclass(frozen=True)
class SearchResult:
    total: int
    offset: int
    count: int
    items: list[StoredResource]


@dataclass(frozen=True)
class ScanRow:
    """One candidate of a `Store.scan` window: the row as read (body not yet parsed) and whether
    the searching source wrote it."""

    raw: Mapping[str, Any]
    own: bool


@dataclass(frozen=True)
class ScanWindow:
    """A bounded window of candidates (`Store.scan`): `total` candidates match in all, `own` of
    them written by the searching source; `rows` from position `offset`."""

    total: int
    own: int
    offset: int
    rows: list[ScanRow]


class Store:
    """Versioned FHIR resources with search; see the module docstring."""

    def __init__(self, db: Database) -> None:
        self.db = db
        migrations.ensure(db, "store")

    @contextmanager
    def transaction(self) -> Iterator[Tx]:
        """One transaction for several writes, committed on its own (CLI tools, tests).

        Request handlers use `write`, which shares the commit with concurrent requests.
        """
        with self.db.transaction() as tx:
            self._lock(tx)
            yield tx

    def write(self, work: Callable[[Tx], T]) -> T:
        """Run `work(tx)` in a group-committed transaction (`Database.write`); durable on return.

        Everything `work` writes lands in one commit or not at all; what it raises is re-raised
        here after its writes are rolled back (the rest of the batch is unaffected).
        """

        def unit(tx: Tx) -> T:
            self._lock(tx)
            return work(tx)

        return self.db.write(unit)

    def _lock(self, tx: Tx) -> None:
        if self.db.dialect == "postgresql":
            # Serialise writers on the store so conditional creates cannot race.
            tx.execute("SELECT pg_advisory_xact_lock(4242)")

    def _tx(self, tx: Tx | None) -> Any:
        return _Reuse(tx) if tx is not None else self.transaction()

    def create(
        self,
        resource: dict[str, Any],
        *,
        source: str | None = None,
        if_none_exist: Mapping[str, Sequence[str]] | None = None,
        keep_id: bool = False,
        tx: Tx | None = None,
    ) -> tuple[StoredResource, bool]:
        """Create a resource (server-assigned id unless `keep_id`). Returns (stored, created).

        With `if_none_exist` (search parameters), an existing single match is returned
        instead (created=False); several matches raise PreconditionFailed (412); a condition
        that is not one (`check_condition`: empty, or with result parameters) is an InputError. Matches are
        looked for among resources of the same `source` only, so one partner cannot probe
        another's identifiers.
        """
        rtype = _type_of(resource)
        if if_none_exist is not None:
            check_condition(if_none_exist)
        if tx is None:
            return self.write(
                lambda t: self.create(
                    resource, source=source, if_none_exist=if_none_exist, keep_id=keep_id, tx=t
                )
            )
        with self._tx(tx) as t:
            if if_none_exist:
                ident = _one_identifier(if_none_exist)
                if ident is not None and source is not None:  # the common case: an index lookup
                    ids = [s.id for s in self.with_identifier(rtype, *ident, source=source, limit=2, tx=t)]
                else:
                    ids = self._search_ids(t, rtype, if_none_exist, limit=2, source=source)
                if len(ids) > 1:
                    raise PreconditionFailed(
                        f"If-None-Exist matched {len(ids)} {rtype} resources; it must match at most one",
                        rule="http:if-none-exist",
                        code="duplicate",
                    )
                if ids:
                    got = self._current(t, rtype, ids[0])
                    assert got is not None
                    return got, False
            rid = resource.get("id") if keep_id else None
            if rid is None:
                rid = new_id()
            elif not isinstance(rid, str) or not ID_PATTERN.match(rid):
                raise InputError(
                    "id must match [A-Za-z0-9-.]{1,64}",
                    expression=f"{rtype}.id",
                    pointer="/id",
                    rule="fhir:id",
                )
            elif self._current(t, rtype, rid) is not None:
                raise Conflict(f"{rtype}/{rid} already exists", rule="store:exists", code="duplicate")
            return self._write(t, rtype, rid, resource, 1, source=source), True

    def update(
        self,
        rtype: str,
        rid: str,
        resource: dict[str, Any],
        *,
        if_match: int | None = None,
        source: str | None = None,
        tx: Tx | None = None,
    ) -> tuple[StoredResource, bool]:
        """Create or update `rtype/rid` (a new version). Returns (stored, created)."""
        if _type_of(resource) != rtype:
            raise InputError(
                f"resourceType {quote(resource.get('resourceType'))} does not match {rtype}",
                pointer="/resourceType",
                rule="http:type-mismatch",
            )
        if tx is None:
            return self.write(
                lambda t: self.update(rtype, rid, resource, if_match=if_match, source=source, tx=t)
            )
        with self._tx(tx) as t:
            cur = self._current(t, rtype, rid)
            if if_match is not None and (cur is None or cur.version != if_match):
                raise PreconditionFailed(f"{rtype}/{rid} is not at version {if_match}", rule="http:if-match")
            version = 1 if cur is None else cur.version + 1
            keep_source = source if source is not None else (cur.source if cur else None)
            return self._write(t, rtype, rid, resource, version, source=keep_source), cur is None

    def delete(self, rtype: str, rid: str, *, tx: Tx | None = None) -> StoredResource | None:
        """Mark a resource deleted (a new, empty version). None when it did not exist."""
        if tx is None:
            return self.write(lambda t: self.delete(rtype, rid, tx=t))
        with self._tx(tx) as t:
            cur = self._current(t, rtype, rid)
            if cur is None or cur.deleted:
                return None
            stub = {"resourceType": rtype, "id": rid}
            return self._write(t, rtype, rid, stub, cur.version + 1, source=cur.source, deleted=True)

    def _write(
        self,
        t: Tx,
        rtype: str,
        rid: str,
        resource: dict[str, Any],
        version: int,
        *,
        source: str | None,
        deleted: bool = False,
    ) -> StoredResource:
        now = instant_now()
        body = dict(resource)
        body["id"] = rid
        meta = dict(body.get("meta") or {}) if isinstance(body.get("meta"), dict) else {}
        meta["versionId"] = str(version)
        meta["lastUpdated"] = now
        body = {
            "resourceType": rtype,
            "id": rid,
            "meta": meta,
            **{k: v for k, v in body.items() if k not in ("resourceType", "id", "meta")},
        }
        text = jsonio.dumps(body).decode()
        seq_rows = t.execute(
            "INSERT INTO fhir_history (type, id, version, last_updated, deleted, source, body) "
            "VALUES (?, ?, ?, ?, ?, ?, ?) RETURNING seq",
            (rtype, rid, version, now, int(deleted), source, text),
        )
        seq = seq_rows[0]["seq"]
        if version > 1:
            t.execute("DELETE FROM fhir_current WHERE type = ? AND id = ?", (rtype, rid))
            t.execute("DELETE FROM fhir_index WHERE type = ? AND id = ?", (rtype, rid))
        t.execute(
            "INSERT INTO fhir_current (type, id, version, seq, last_updated, deleted, source) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            (rtype, rid, version, seq, now, int(deleted), source),
        )
        if not deleted:
            write_index(t, rtype, rid, body)
        return StoredResource(rtype, rid, version, now, deleted, body, source)

    def _read(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        return self.db.query(sql, params)

    def get(self, rtype: str, rid: str) -> StoredResource | None:
        """The current version (None when absent; a deleted resource has deleted=True)."""
        with self.db.transaction(immediate=False) as t:
            return self._current(t, rtype, rid)

    def _current(self, t: Tx, rtype: str, rid: str) -> StoredResource | None:
        rows = t.execute(f"{_CURRENT} WHERE c.type = ? AND c.id = ?", (rtype, rid))
        return _row(rows[0]) if rows else None

    def vread(self, rtype: str, rid: str, version: int) -> StoredResource | None:
        rows = self._read(
            "SELECT type, id, version, last_updated, deleted, source, body "
            "FROM fhir_history WHERE type = ? AND id = ? AND version = ?",
            (rtype, rid, version),
        )
        return _row(rows[0]) if rows else None

    def history(
        self, rtype: str, rid: str, *, count: int | None = None, offset: int = 0, since: str | None = None
    ) -> list[StoredResource]:
        """Versions, newest first: every one, or at most `count` from position `offset`; with
        `since` (a FHIR instant or date: `_history?_since=`) only those written at or after it."""
        where = "type = ? AND id = ?"
        args: list[Any] = [rtype, rid]
        if since is not None:
            clause, more = since_clause("last_updated", since)
            where, args = f"{where} AND {clause}", [*args, *more]
        sql = (
            "SELECT type, id, version, last_updated, deleted, source, body "
            f"FROM fhir_history WHERE {where} ORDER BY version DESC"
        )
        if count is not None:
            sql += " LIMIT ? OFFSET ?"
            args = [*args, max(0, count), max(0, offset)]
        return [_row(r) for r in self._read(sql, tuple(args))]

    def search(
        self,
        rtype: str,
        params: Mapping[str, Sequence[str]],
        *,
        count: int = DEFAULT_COUNT,
        offset: int = 0,
        audience: tuple[str, Sequence[str]] | None = None,
    ) -> SearchResult:
        """Current, non-deleted resources matching every parameter (values in one parameter OR'ed),
        the total counted in SQL.

        `audience` (source, references) keeps only resources that source wrote or whose
        recipient/requester is one of the references. Rows that need a per-row decision (the
        consent gate) are read with `scan`, a bounded window, never all at once.
        """
        count, offset = page(count, offset)
        cond, args = self._condition(rtype, params, audience)
        with self.db.transaction(immediate=False) as t:
            total = t.execute(f"SELECT COUNT(*) AS n FROM fhir_current c WHERE {cond}", args)[0]["n"]
            rows = t.execute(
                f"{_CURRENT} WHERE {cond} ORDER BY c.seq LIMIT ? OFFSET ?", [*args, count, offset]
            )
            return SearchResult(int(total), offset, count, [_row(r) for r in rows])

    def scan(
        self,
        rtype: str,
        params: Mapping[str, Sequence[str]],
        *,
        audience: tuple[str, Sequence[str]],
        offset: int,
        limit: int,
        count: bool = True,
    ) -> ScanWindow:
        """A bounded window of a partner's search: the candidates (what `audience` selects: what its
        source wrote, or what names one of its references as recipient or requester) matching
        `params`, in store order, from position `offset`, at most `limit` of them, with their
        bodies left undecoded (`decode` reads one); and, counted in SQL, how many candidates
        match in all and how many of those the source wrote (`count=False`: not counted, both 0,
        for a caller that needs the window only: a count costs every matching row). Nothing
        outside the audience is read.
        """
        offset = max(0, int(offset))
        limit = max(0, int(limit))
        source = audience[0]
        cond, args = self._condition(rtype, params, audience)
        with self.db.transaction(immediate=False) as t:
            counted = (
                t.execute(
                    "SELECT COUNT(*) AS n, COALESCE(SUM(CASE WHEN c.source = ? THEN 1 ELSE 0 END), 0) AS own "
                    f"FROM fhir_current c WHERE {cond}",
                    [source, *args],
                )[0]
                if count
                else {"n": 0, "own": 0}
            )
            rows = (
                t.execute(f"{_CURRENT} WHERE {cond} ORDER BY c.seq LIMIT ? OFFSET ?", [*args, limit, offset])
                if limit
                else []
            )
        return ScanWindow(
            int(counted["n"]),
            int(counted["own"]),
            offset,
            [ScanRow(r, r.get("source") == source) for r in rows],
        )

    @staticmethod
    def decode(row: ScanRow) -> StoredResource:
        """The resource of one row of a `scan` window (its JSON body parsed now)."""
        return _row(row.raw)

    @staticmethod
    def _condition(
        rtype: str, params: Mapping[str, Sequence[str]], audience: tuple[str, Sequence[str]] | None
    ) -> tuple[str, list[Any]]:
        cond, args = search_sql(rtype, params)
        if audience is not None:
            clause, more = audience_sql(*audience)
            args = [*args, *more]
            cond += f" AND ({clause})"
        return cond, args

    def search_in(
        self, tx: Tx, rtype: str, params: Mapping[str, Sequence[str]], *, count: int = DEFAULT_COUNT
    ) -> list[StoredResource]:
        """The first `count` current resources matching `params`, read inside the transaction `tx`."""
        where, args = search_sql(rtype, params)
        return [
            _row(r)
            for r in tx.execute(
                f"{_CURRENT} WHERE {where} ORDER BY c.seq LIMIT ?", [*args, max(0, int(count))]
            )
        ]

    def _search_ids(
        self, t: Tx, rtype: str, params: Mapping[str, Sequence[str]], limit: int, source: str | None = None
    ) -> list[str]:
        where, args = search_sql(rtype, params)
        if source is not None:
            where += " AND c.source = ?"
            args.append(source)
        return [
            r["id"]
            for r in t.execute(
                f"SELECT c.id FROM fhir_current c WHERE {where} ORDER BY c.seq LIMIT ?", [*args, limit]
            )
        ]

    def with_identifier(
        self,
        rtype: str,
        system: str,
        value: str,
        *,
        source: str | None,
        limit: int = 20,
        newest: bool = False,
        tx: Tx | None = None,
    ) -> list[StoredResource]:
        """The current resources of `rtype` that `source` wrote carrying identifier `system|value`
        (an index lookup, `fhir_index_identifier`: never a scan of the type), oldest first (newest
        first with `newest`); read inside `tx` when given."""
        sql = IDENTIFIER_LOOKUP.format(
            owner="c.source IS NULL" if source is None else "c.source = ?", order="DESC" if newest else "ASC"
        )
        args = [rtype, value, system, *([] if source is None else [source]), limit]
        if tx is not None:
            return [_row(r) for r in tx.execute(sql, args)]
        with self.db.transaction(immediate=False) as t:
            return [_row(r) for r in t.execute(sql, args)]

    def matching(
        self,
        rtype: str,
        params: Mapping[str, Sequence[str]],
        *,
        source: str,
        limit: int = 2,
        tx: Tx | None = None,
    ) -> list[StoredResource]:
        """The current resources of `rtype` that `source` wrote and `params` select (a condition:
        `check_condition` first), oldest first: what a conditional create or update matches. Only
        the sender's own resources are ever looked at, in SQL, so another partner's cannot crowd the
        answer or be counted through it."""
        check_condition(params)
        ident = _one_identifier(params)
        if ident is not None:
            return self.with_identifier(rtype, *ident, source=source, limit=limit, tx=tx)

        def run(t: Tx) -> list[StoredResource]:
            return [
                got
                for rid in self._search_ids(t, rtype, params, limit, source=source)
                if (got := self._current(t, rtype, rid))
            ]

        if tx is not None:
            return run(tx)
        with self.db.transaction(immediate=False) as t:
            return run(t)

    def counts(self) -> dict[str, int]:
        """Number of current resources per type (deleted ones excluded)."""
        rows = self._read("SELECT type, COUNT(*) AS n FROM fhir_current WHERE deleted = 0 GROUP BY type")
        return {r["type"]: int(r["n"]) for r in rows}


def _one_identifier(params: Mapping[str, Sequence[str]]) -> tuple[str, str] | None:
    r"""(system, value), unescaped, when a condition is exactly one `identifier=SYSTEM|VALUE` (no
    alternatives): read with the search's own `split_value` and `split_token`, so `s|a\,b` is the
    value `a,b` here exactly as in a search. None for any other condition, which the caller then
    runs as that search (`search_sql`), never as a guess at one identifier."""
    if list(params) != ["identifier"] or len(params["identifier"]) != 1:
        return None
    alternatives = split_value(params["identifier"][0])
    if len(alternatives) != 1:
        return None
    system, value = split_token(alternatives[0])
    if not system or not value:
        return None
    return system, value


class _Reuse:
    def __init__(self, tx: Tx) -> None:
        self.tx = tx

    def __enter__(self) -> Tx:
        return self.tx

    def __exit__(self, *exc: object) -> None:
        return None


def _type_of(resource: Any) -> str:
    rtype = resource.get("resourceType") if isinstance(resource, dict) else None
    if not isinstance(rtype, str):
        raise InputError("resourceType is missing", pointer="/resourceType", rule="fhir:resourceType")
    return rtype


def _row(r: Mapping[str, Any]) -> StoredResource:
    return StoredResource(
        r["type"],
        r["id"],
        int(r["version"]),
        r["last_updated"],
        bool(r["deleted"]),
        jsonio.loads(r["body"]),
        r.get("source"),
    )
