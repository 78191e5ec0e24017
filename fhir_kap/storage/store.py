"""A versioned FHIR resource store on the shared `Database` (SQLite or PostgreSQL).

Three tables: `fhir_history` (every version with its body, append-only), `fhir_current`
(which version of each resource is the latest: its `seq` in the history, no body) and
`fhir_index` (search values of the current versions, filled on write from `SEARCH_PARAMS`).
Every write runs in one transaction: the version, the current row and the index rows land
together or not at all.

A create writes its body once. On SQLite `fhir_current` is WITHOUT ROWID (its key is its only
B-tree) and `fhir_history.seq` is a plain rowid (AUTOINCREMENT would rewrite `sqlite_sequence`
on every insert; the history is never deleted from, so rowids only grow). With time-ordered
ids (`identifiers.new_id`) a 3 KB create writes about 7 WAL pages where the store-2 layout
wrote 10 (measured), and every page written costs a copy into the WAL and later into the
database file.

Search values are normalised on write into (code, system) pairs, so a search is a few
equality lookups:
- references: `Type/id` is stored as code `id`, system `Type` (an absolute URL splits at its
  last `/` the same way); a query `Type/id` matches both columns, a bare `id` the code only;
- tokens (identifier, status, category, _tag, _security): code and system of each coding
  (system '' when it has none); `system|code`, `code`, `system|` and `|code` queries
  compare one or both columns;
- `_lastUpdated` and `_id` are columns.

`fhir_index` is keyed by its owner (type, id, param, code, system), WITHOUT ROWID on SQLite:
one B-tree, and a resource's rows share one leaf page, so a write dirties one or two index
pages instead of one per distinct value (measured: ~36 -> ~10 WAL pages per 3 KB create).
Searches walk `fhir_current` in `seq` order and probe that key per resource, which is the
plan SQLite chose with the old value-keyed index too.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from typing import Any, TypeVar

from .. import jsonio
from .db import Database, Tx
from ..errors import ConfigError, Conflict, InputError, PreconditionFailed, quote
from ..fhir.identifiers import new_id

__all__ = ["ID_PATTERN", "MAX_ALTERNATIVES", "SEARCH_PARAMS", "SearchResult", "Store", "StoredResource", "check_condition",
           "instant_now"]

T = TypeVar("T")
ID_PATTERN = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")

_MIGRATION = [
    """CREATE TABLE fhir_history (
        seq {pk}, type TEXT NOT NULL, id TEXT NOT NULL, version {bigint} NOT NULL,
        last_updated TEXT NOT NULL, deleted {bigint} NOT NULL DEFAULT 0, source TEXT,
        body TEXT NOT NULL, UNIQUE (type, id, version))""",
    """CREATE TABLE fhir_current (
        type TEXT NOT NULL, id TEXT NOT NULL, version {bigint} NOT NULL, seq {bigint} NOT NULL,
        last_updated TEXT NOT NULL, deleted {bigint} NOT NULL DEFAULT 0, source TEXT,
        body TEXT NOT NULL, PRIMARY KEY (type, id))""",
    "CREATE INDEX fhir_current_seq ON fhir_current (type, seq)",
    """CREATE TABLE fhir_index (
        type TEXT NOT NULL, id TEXT NOT NULL, param TEXT NOT NULL, value TEXT NOT NULL)""",
    "CREATE INDEX fhir_index_lookup ON fhir_index (type, param, value, id)",
    "CREATE INDEX fhir_index_owner ON fhir_index (type, id)",
]
#: One row per (param, code, system) keyed by its owner; see the module docstring.
_MIGRATION_2 = [
    "DROP TABLE fhir_index",
    """CREATE TABLE fhir_index (
        type TEXT NOT NULL, id TEXT NOT NULL, param TEXT NOT NULL, code TEXT NOT NULL,
        system TEXT NOT NULL, PRIMARY KEY (type, id, param, code, system)){without_rowid}""",
]
#: The body once (in the history) and fewer B-trees per create; see the module docstring.
_MIGRATION_3 = {
    "sqlite": [
        """CREATE TABLE fhir_history_3 (
            seq INTEGER PRIMARY KEY, type TEXT NOT NULL, id TEXT NOT NULL, version INTEGER NOT NULL,
            last_updated TEXT NOT NULL, deleted INTEGER NOT NULL DEFAULT 0, source TEXT,
            body TEXT NOT NULL, UNIQUE (type, id, version))""",
        "INSERT INTO fhir_history_3 (seq, type, id, version, last_updated, deleted, source, body) "
        "SELECT seq, type, id, version, last_updated, deleted, source, body FROM fhir_history",
        "DROP TABLE fhir_history",
        "ALTER TABLE fhir_history_3 RENAME TO fhir_history",
        """CREATE TABLE fhir_current_3 (
            type TEXT NOT NULL, id TEXT NOT NULL, version INTEGER NOT NULL, seq INTEGER NOT NULL,
            last_updated TEXT NOT NULL, deleted INTEGER NOT NULL DEFAULT 0, source TEXT,
            PRIMARY KEY (type, id)) WITHOUT ROWID""",
        "INSERT INTO fhir_current_3 (type, id, version, seq, last_updated, deleted, source) "
        "SELECT type, id, version, seq, last_updated, deleted, source FROM fhir_current",
        "DROP TABLE fhir_current",
        "ALTER TABLE fhir_current_3 RENAME TO fhir_current",
        "CREATE INDEX fhir_current_seq ON fhir_current (type, seq)",
    ],
    "postgresql": ["ALTER TABLE fhir_current DROP COLUMN body"],
}
def _check_store_3(tx: Tx) -> None:
    """Refuse the store-3 migration (it rolls back whole) when a current row has no matching
    history row: its body would be gone, and counts would disagree with the rows returned."""
    rows = tx.execute("SELECT COUNT(*) AS n FROM fhir_current c LEFT JOIN fhir_history h ON h.seq = c.seq "
                      "WHERE h.seq IS NULL OR h.type <> c.type OR h.id <> c.id OR h.version <> c.version")
    if rows[0]["n"]:
        raise ConfigError(f"store-3: {rows[0]['n']} current resource row(s) have no matching history row; the "
                          "database was left on its old layout (repair it, or restore a backup)",
                          rule="store:migration")


#: A current version with its body (`c` and `h` in every read).
_CURRENT = ("SELECT c.type, c.id, c.version, c.last_updated, c.deleted, c.source, h.body, c.seq "
            "FROM fhir_current c JOIN fhir_history h ON h.seq = c.seq")


def _refs(*paths: str) -> Callable[[dict[str, Any]], list[tuple[str, str]]]:
    split = [tuple(p.split(".")) for p in paths]  # once, not per resource

    def extract(res: dict[str, Any]) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        for parts in split:
            for ref in _walk(res, parts):
                if isinstance(ref, dict) and isinstance(ref.get("reference"), str):
                    out.append(_ref_key(ref["reference"]))
        return out
    return extract


def _ref_key(ref: str) -> tuple[str, str]:
    """A reference as (code, system): `Type/id` -> (id, Type); without a `/` -> (ref, '')."""
    head, slash, tail = ref.rpartition("/")
    return (tail, head) if slash else (ref, "")


def _tokens(*paths: str) -> Callable[[dict[str, Any]], list[tuple[str, str]]]:
    split = [tuple(p.split(".")) for p in paths]

    def extract(res: dict[str, Any]) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        for parts in split:
            for node in _walk(res, parts):
                if isinstance(node, str):
                    out.append((node, ""))
                    continue
                if not isinstance(node, dict):
                    continue
                codings = node.get("coding") if "coding" in node else [node]
                for c in codings if isinstance(codings, list) else []:
                    if not isinstance(c, dict):
                        continue
                    code = c.get("code", c.get("value"))
                    system = c.get("system")
                    if isinstance(code, str):
                        out.append((code, system if isinstance(system, str) else ""))
        return out
    return extract


def _walk(node: Any, parts: tuple[str, ...]) -> list[Any]:
    """The values at a dotted path (lists flattened at every step), as a list."""
    nodes = node if isinstance(node, list) else [node]
    for part in parts:
        found: list[Any] = []
        for n in nodes:
            if isinstance(n, dict) and part in n:
                value = n[part]
                if isinstance(value, list):
                    found.extend(value)
                else:
                    found.append(value)
        if not found:
            return found
        nodes = found
    return nodes


_COMMON: dict[str, Callable[[dict[str, Any]], list[tuple[str, str]]]] = {
    "identifier": _tokens("identifier"),
    "_tag": _tokens("meta.tag"),
    "_security": _tokens("meta.security"),
}

#: Search parameters per resource type: name -> extractor of normalised index values.
SEARCH_PARAMS: dict[str, dict[str, Callable[[dict[str, Any]], list[tuple[str, str]]]]] = {
    "Communication": {**_COMMON, "patient": _refs("subject"), "subject": _refs("subject"),
                      "status": _tokens("status"), "recipient": _refs("recipient"),
                      "sender": _refs("sender"), "category": _tokens("category"),
                      "based-on": _refs("basedOn"), "about": _refs("about")},
    "ServiceRequest": {**_COMMON, "patient": _refs("subject"), "subject": _refs("subject"),
                       "status": _tokens("status"), "requester": _refs("requester"),
                       "performer": _refs("performer"), "category": _tokens("category"),
                       "based-on": _refs("basedOn")},
    "Procedure": {**_COMMON, "patient": _refs("subject"), "subject": _refs("subject"),
                  "status": _tokens("status"), "category": _tokens("category"),
                  "based-on": _refs("basedOn"), "performer": _refs("performer.actor")},
    "Consent": {**_COMMON, "patient": _refs("patient", "subject"), "status": _tokens("status"),
                "category": _tokens("category"),
                "actor": _refs("provision.actor.reference", "grantee")},
    "Task": {**_COMMON, "patient": _refs("for"), "subject": _refs("for"), "status": _tokens("status"),
             "business-status": _tokens("businessStatus"), "focus": _refs("focus"),
             "based-on": _refs("basedOn"), "owner": _refs("owner"), "requester": _refs("requester")},
    "Patient": {**_COMMON},
    "Practitioner": {**_COMMON},
    "PractitionerRole": {**_COMMON, "practitioner": _refs("practitioner"),
                         "organization": _refs("organization")},
    "Organization": {**_COMMON},
    "Provenance": {"target": _refs("target"), "patient": _refs("patient")},
}

#: Search parameters whose query values are references, with the type a bare id defaults to.
REFERENCE_PARAMS = {"patient": "Patient", "subject": None, "recipient": None, "sender": None,
                    "based-on": None, "about": None, "requester": None, "performer": None,
                    "actor": None, "focus": None, "owner": None, "practitioner": "Practitioner",
                    "organization": "Organization", "target": None}
MAX_COUNT = 200
DEFAULT_COUNT = 20
#: Most comma-separated alternatives one search parameter, and a whole search, may carry
#: (each becomes an SQL term; SQLite refuses expression trees past ~1,000 terms).
MAX_ALTERNATIVES = 100
#: Result parameters a search accepts and ignores in its WHERE (they select nothing).
_IGNORED = ("_count", "_offset", "_format", "_total", "_sort", "_summary")
#: Search result parameters: they select no resources, so a condition (If-None-Exist) may not use them.
_RESULT_PARAMS = frozenset({*_IGNORED, "_include", "_revinclude", "_elements", "_contained", "_containedType",
                            "_pretty"})


def check_condition(params: Mapping[str, Sequence[str]]) -> None:
    """Raise InputError unless `params` is a usable If-None-Exist condition: some search
    criteria, and no result parameters (which select nothing)."""
    result = sorted(name for name in params if name in _RESULT_PARAMS)
    if result:
        raise InputError(f"If-None-Exist may not use the result parameter '{result[0][:40]}': a condition "
                         "only selects (e.g. identifier=SYSTEM|VALUE)", expression="If-None-Exist",
                         rule="http:if-none-exist")
    if not params:
        raise InputError("If-None-Exist has no search criteria: it would match any resource; give one "
                         "such as identifier=SYSTEM|VALUE", expression="If-None-Exist", rule="http:if-none-exist")


def instant_now() -> str:
    """Now as a FHIR instant with microseconds, UTC (sorts lexicographically)."""
    return _instant(datetime.now(UTC))


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


class Store:
    """Versioned FHIR resources with search; see the module docstring."""

    def __init__(self, db: Database) -> None:
        self.db = db
        db.migrate("store-1", _MIGRATION)
        db.migrate("store-2", _MIGRATION_2, after=self._reindex)
        db.migrate("store-3", _MIGRATION_3[db.dialect], after=_check_store_3)

    def _reindex(self, tx: Tx) -> None:
        """Fill `fhir_index` from the current versions (after a change of its layout)."""
        for r in tx.execute("SELECT c.type, c.id, h.body FROM fhir_current c "
                            "JOIN fhir_history h ON h.seq = c.seq WHERE c.deleted = 0"):
            self._index(tx, r["type"], r["id"], jsonio.loads(r["body"]))

    def _index(self, t: Tx, rtype: str, rid: str, body: dict[str, Any]) -> None:
        rows = {(rtype, rid, p, code, system) for p, (code, system) in index_values(body)}
        if rows:
            t.executemany("INSERT INTO fhir_index (type, id, param, code, system) VALUES (?, ?, ?, ?, ?)",
                          sorted(rows))

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

    def create(self, resource: dict[str, Any], *, source: str | None = None,
               if_none_exist: Mapping[str, Sequence[str]] | None = None, keep_id: bool = False,
               tx: Tx | None = None) -> tuple[StoredResource, bool]:
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
            return self.write(lambda t: self.create(resource, source=source, if_none_exist=if_none_exist,
                                                    keep_id=keep_id, tx=t))
        with self._tx(tx) as t:
            if if_none_exist:
                ids = self._search_ids(t, rtype, if_none_exist, limit=2, source=source)
                if len(ids) > 1:
                    raise PreconditionFailed(
                        f"If-None-Exist matched {len(ids)} {rtype} resources; it must match at most one",
                        rule="http:if-none-exist", code="duplicate")
                if ids:
                    got = self._current(t, rtype, ids[0])
                    assert got is not None
                    return got, False
            rid = resource.get("id") if keep_id else None
            if rid is None:
                rid = new_id()
            elif not isinstance(rid, str) or not ID_PATTERN.match(rid):
                raise InputError("id must match [A-Za-z0-9-.]{1,64}", expression=f"{rtype}.id",
                                 pointer="/id", rule="fhir:id")
            elif self._current(t, rtype, rid) is not None:
                raise Conflict(f"{rtype}/{rid} already exists", rule="store:exists", code="duplicate")
            return self._write(t, rtype, rid, resource, 1, source=source), True

    def update(self, rtype: str, rid: str, resource: dict[str, Any], *, if_match: int | None = None,
               source: str | None = None, tx: Tx | None = None) -> tuple[StoredResource, bool]:
        """Create or update `rtype/rid` (a new version). Returns (stored, created)."""
        if _type_of(resource) != rtype:
            raise InputError(f"resourceType {quote(resource.get('resourceType'))} does not match {rtype}",
                             pointer="/resourceType", rule="http:type-mismatch")
        if tx is None:
            return self.write(lambda t: self.update(rtype, rid, resource, if_match=if_match, source=source, tx=t))
        with self._tx(tx) as t:
            cur = self._current(t, rtype, rid)
            if if_match is not None and (cur is None or cur.version != if_match):
                raise PreconditionFailed(f"{rtype}/{rid} is not at version {if_match}",
                                         rule="http:if-match")
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

    def _write(self, t: Tx, rtype: str, rid: str, resource: dict[str, Any], version: int, *,
               source: str | None, deleted: bool = False) -> StoredResource:
        now = instant_now()
        body = dict(resource)
        body["id"] = rid
        meta = dict(body.get("meta") or {}) if isinstance(body.get("meta"), dict) else {}
        meta["versionId"] = str(version)
        meta["lastUpdated"] = now
        body = {"resourceType": rtype, "id": rid, "meta": meta,
                **{k: v for k, v in body.items() if k not in ("resourceType", "id", "meta")}}
        text = jsonio.dumps(body).decode()
        seq_rows = t.execute(
            "INSERT INTO fhir_history (type, id, version, last_updated, deleted, source, body) "
            "VALUES (?, ?, ?, ?, ?, ?, ?) RETURNING seq",
            (rtype, rid, version, now, int(deleted), source, text))
        seq = seq_rows[0]["seq"]
        if version > 1:
            t.execute("DELETE FROM fhir_current WHERE type = ? AND id = ?", (rtype, rid))
            t.execute("DELETE FROM fhir_index WHERE type = ? AND id = ?", (rtype, rid))
        t.execute("INSERT INTO fhir_current (type, id, version, seq, last_updated, deleted, source) "
                  "VALUES (?, ?, ?, ?, ?, ?, ?)", (rtype, rid, version, seq, now, int(deleted), source))
        if not deleted:
            self._index(t, rtype, rid, body)
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
        rows = self._read("SELECT type, id, version, last_updated, deleted, source, body "
                          "FROM fhir_history WHERE type = ? AND id = ? AND version = ?", (rtype, rid, version))
        return _row(rows[0]) if rows else None

    def history(self, rtype: str, rid: str) -> list[StoredResource]:
        """All versions, newest first."""
        rows = self._read("SELECT type, id, version, last_updated, deleted, source, body "
                          "FROM fhir_history WHERE type = ? AND id = ? ORDER BY version DESC", (rtype, rid))
        return [_row(r) for r in rows]

    def search(self, rtype: str, params: Mapping[str, Sequence[str]], *, count: int = DEFAULT_COUNT,
               offset: int = 0, where: Callable[[StoredResource], bool] | None = None,
               audience: tuple[str, Sequence[str]] | None = None) -> SearchResult:
        """Current, non-deleted resources matching every parameter (values in one parameter OR'ed).

        `audience` (source, references) keeps only resources that source wrote or whose
        recipient/requester is one of the references; `where` filters further in Python
        (access rules), and totals then count what it lets through.
        """
        count = max(0, min(int(count), MAX_COUNT))
        offset = max(0, int(offset))
        cond, args = self._search_sql(rtype, params)
        if audience is not None:
            source, refs = audience
            clause = "c.source = ?"
            args = [*args, source]
            if refs:
                keys = sorted({_ref_key(r) for r in refs})
                # A row-value IN list, not an OR chain: no expression-depth limit however many refs.
                clause += (" OR EXISTS (SELECT 1 FROM fhir_index a WHERE a.type = c.type AND a.id = c.id "
                           "AND a.param IN ('recipient', 'requester') AND (a.code, a.system) IN (VALUES "
                           + ", ".join("(?, ?)" for _ in keys) + "))")
                args += [v for k in keys for v in k]
            cond += f" AND ({clause})"
        with self.db.transaction(immediate=False) as t:
            if where is None:
                total = t.execute(f"SELECT COUNT(*) AS n FROM fhir_current c WHERE {cond}", args)[0]["n"]
                rows = t.execute(f"{_CURRENT} WHERE {cond} ORDER BY c.seq LIMIT ? OFFSET ?", [*args, count, offset])
                return SearchResult(int(total), offset, count, [_row(r) for r in rows])
            rows = t.execute(f"{_CURRENT} WHERE {cond} ORDER BY c.seq", args)
        visible = [s for s in (_row(r) for r in rows) if where(s)]
        return SearchResult(len(visible), offset, count, visible[offset:offset + count])

    def search_in(self, tx: Tx, rtype: str, params: Mapping[str, Sequence[str]], *,
                  count: int = DEFAULT_COUNT) -> list[StoredResource]:
        """The first `count` current resources matching `params`, read inside the transaction `tx`."""
        where, args = self._search_sql(rtype, params)
        return [_row(r) for r in tx.execute(f"{_CURRENT} WHERE {where} ORDER BY c.seq LIMIT ?",
                                            [*args, max(0, int(count))])]

    def _search_ids(self, t: Tx, rtype: str, params: Mapping[str, Sequence[str]], limit: int,
                    source: str | None = None) -> list[str]:
        where, args = self._search_sql(rtype, params)
        if source is not None:
            where += " AND c.source = ?"
            args.append(source)
        return [r["id"] for r in t.execute(f"SELECT c.id FROM fhir_current c WHERE {where} ORDER BY c.seq LIMIT ?",
                                           [*args, limit])]

    def _search_sql(self, rtype: str, params: Mapping[str, Sequence[str]]) -> tuple[str, list[Any]]:
        """The WHERE condition (on `fhir_current c`) and its arguments for a search."""
        known = SEARCH_PARAMS.get(rtype, {})
        clauses = ["c.type = ?", "c.deleted = 0"]
        args: list[Any] = [rtype]
        total = 0
        for name, values in params.items():
            if name in _IGNORED:
                continue
            per_param = 0
            for value in values:
                alternatives = [v for v in value.split(",")] if value else [""]
                per_param += len(alternatives)
                total += len(alternatives)
                if per_param > MAX_ALTERNATIVES or total > MAX_ALTERNATIVES:
                    shown = name[:40] if name in known or name in ("_id", "_lastUpdated") else "a parameter"
                    raise InputError(f"Too many search values: at most {MAX_ALTERNATIVES} in all (the limit was "
                                     f"passed at '{shown}')", expression=shown, rule="search:too-many-values",
                                     code="too-costly")
                if name == "_id":
                    clauses.append(f"c.id IN ({', '.join('?' * len(alternatives))})")
                    args += alternatives
                elif name == "_lastUpdated":
                    sql, more = _date_clause("c.last_updated", value)
                    clauses.append(sql)
                    args += more
                elif name in known:
                    tests: list[str] = []
                    args.append(name)
                    for alt in alternatives:
                        test, more = _match_sql(name, alt)
                        tests.append(test)
                        args += more
                    clauses.append("EXISTS (SELECT 1 FROM fhir_index i WHERE i.type = c.type AND i.id = c.id "
                                   f"AND i.param = ? AND ({' OR '.join(tests)}))")
                else:
                    raise InputError(f"Search parameter '{name[:40]}' is not supported for {rtype}",
                                     rule="search:unknown-parameter", code="not-supported")
        return " AND ".join(clauses), args

    def counts(self) -> dict[str, int]:
        """Number of current resources per type (deleted ones excluded)."""
        rows = self._read("SELECT type, COUNT(*) AS n FROM fhir_current WHERE deleted = 0 GROUP BY type")
        return {r["type"]: int(r["n"]) for r in rows}


class _Reuse:
    def __init__(self, tx: Tx) -> None:
        self.tx = tx

    def __enter__(self) -> Tx:
        return self.tx

    def __exit__(self, *exc: object) -> None:
        return None


def index_values(resource: dict[str, Any]) -> Iterable[tuple[str, tuple[str, str]]]:
    """(param, (code, system)) pairs for a resource's search index."""
    for name, extract in SEARCH_PARAMS.get(str(resource.get("resourceType")), {}).items():
        for value in extract(resource):
            yield name, value


def _match_sql(name: str, value: str) -> tuple[str, list[str]]:
    """SQL (on index alias `i`) and arguments matching one search value of parameter `name`."""
    if name in REFERENCE_PARAMS:
        default_type = REFERENCE_PARAMS[name]
        if "/" not in value:
            if default_type is None:
                return "i.code = ?", [value]
            value = f"{default_type}/{value}"
        code, system = _ref_key(value)
        return "(i.code = ? AND i.system = ?)", [code, system]
    system, bar, code = value.partition("|")
    if not bar:
        return "i.code = ?", [value]
    if not code:
        return "i.system = ?", [system]
    return "(i.code = ? AND i.system = ?)", [code, system]


def _type_of(resource: Any) -> str:
    rtype = resource.get("resourceType") if isinstance(resource, dict) else None
    if not isinstance(rtype, str):
        raise InputError("resourceType is missing", pointer="/resourceType", rule="fhir:resourceType")
    return rtype


def _row(r: Mapping[str, Any]) -> StoredResource:
    return StoredResource(r["type"], r["id"], int(r["version"]), r["last_updated"], bool(r["deleted"]),
                          jsonio.loads(r["body"]), r.get("source"))


_DATE = re.compile(r"^(eq|ne|gt|ge|lt|le|sa|eb)?(\d{4})(?:-(\d{2})(?:-(\d{2})"
                   r"(?:T(\d{2}):(\d{2})(?::(\d{2})(?:\.(\d{1,9}))?)?(Z|[+-]\d{2}:\d{2})?)?)?)?$")


def _date_clause(column: str, value: str) -> tuple[str, list[str]]:
    """SQL for a FHIR date search on an instant column: the value is a range at its precision."""
    m = _DATE.match(value)
    if not m:
        raise InputError(f"_lastUpdated value '{value[:40]}' is not a FHIR date/dateTime with an optional "
                         "prefix (eq, gt, ge, lt, le)", expression="_lastUpdated", rule="search:date",
                         code="value")
    prefix, y, mo, d, hh, mi, ss, frac, tz = m.groups()
    try:
        lo, hi = _range(y, mo, d, hh, mi, ss, frac, tz)
    except (ValueError, OverflowError):  # no such date, or its range leaves years 1-9999
        raise InputError(f"_lastUpdated value '{value[:40]}' is not a valid date, or its range leaves the "
                         "years 0001-9999",
                         expression="_lastUpdated", rule="search:date", code="value") from None
    lo_s, hi_s = _instant(lo), _instant(hi)
    prefix = prefix or "eq"
    if prefix in ("ge",):
        return f"{column} >= ?", [lo_s]
    if prefix in ("gt", "sa"):
        return f"{column} >= ?", [hi_s]
    if prefix in ("lt", "eb"):
        return f"{column} < ?", [lo_s]
    if prefix == "le":
        return f"{column} < ?", [hi_s]
    if prefix == "ne":
        return f"({column} < ? OR {column} >= ?)", [lo_s, hi_s]
    return f"({column} >= ? AND {column} < ?)", [lo_s, hi_s]


def _range(y: str, mo: str | None, d: str | None, hh: str | None, mi: str | None, ss: str | None,
           frac: str | None, tz: str | None) -> tuple[datetime, datetime]:
    zone = UTC
    if tz and tz != "Z":
        sign = 1 if tz[0] == "+" else -1
        zone = timezone(sign * timedelta(hours=int(tz[1:3]), minutes=int(tz[4:6])))
    if mo is None:
        lo = datetime(int(y), 1, 1, tzinfo=zone)
        return _utc(lo), _utc(lo.replace(year=lo.year + 1))
    if d is None:
        lo = datetime(int(y), int(mo), 1, tzinfo=zone)
        return _utc(lo), _utc(lo.replace(year=lo.year + 1, month=1) if lo.month == 12
                              else lo.replace(month=lo.month + 1))
    if hh is None:
        lo = datetime(int(y), int(mo), int(d), tzinfo=zone)
        return lo.astimezone(UTC), (lo + timedelta(days=1)).astimezone(UTC)
    micro = int((frac or "0").ljust(6, "0")[:6])
    lo = datetime(int(y), int(mo), int(d), int(hh), int(mi or 0), int(ss or 0), micro, tzinfo=zone)
    step = timedelta(microseconds=1) if frac else timedelta(seconds=1) if ss else timedelta(minutes=1)
    return lo.astimezone(UTC), (lo + step).astimezone(UTC)


def _utc(value: datetime) -> datetime:
    return value.astimezone(UTC)


def _instant(value: datetime) -> str:
    """A UTC datetime as a FHIR instant with microseconds (four-digit year even before 1000;
    formatted by hand: strftime costs ~4x as much)."""
    t = value
    return f"{t.year:04d}-{t.month:02d}-{t.day:02d}T{t.hour:02d}:{t.minute:02d}:{t.second:02d}.{t.microsecond:06d}Z"
