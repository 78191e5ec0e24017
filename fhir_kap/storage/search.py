r"""FHIR search on the store (storage/, layer 2: IO adapter; imports base only): the search
parameters, how a resource's index rows are drawn from it, and how a query becomes SQL.

Search values are normalised on write into (code, system) pairs, so a search is a few
equality lookups:
- references: `Type/id` is stored as code `id`, system `Type` (an absolute URL splits at its
  last `/` the same way); a query `Type/id` matches both columns, a bare `id` the code only;
- tokens (identifier, status, category, _tag, _security): code and system of each coding
  (system '' when it has none); `system|code`, `code`, `system|` and `|code` queries
  compare one or both columns;
- `_lastUpdated` and `_id` are columns (instants, compared as text: `instant` writes them
  so that they sort).

A value is read as FHIR R4 search escapes it (search.html, "Escaping Search Parameters"): `,`
separates alternatives (OR), `|` a token's system from its code, and a `\` before one of
`\ , $ |` makes that character literal: `identifier=s|a\,b` is the one value `a,b`, never `a\`
or `b`. `split_value` cuts at the separators no `\` escapes, `unescape` then reads a part's
literal text; `escape_value` writes a literal for a query built from data. A `\` before any other
character (which the spec calls illegal) is kept as a literal `\`, so a value that carries one
means what it says. Conditional create and update (storage/store.py `_one_identifier`) read
their conditions with the same functions, so a condition selects what the same search finds.

The SQL conditions here are on `fhir_current c` and probe `fhir_index i` (see storage/store.py
for the tables); paging is `_count` (at most MAX_COUNT) and `_offset`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any

from ..errors import InputError
from ..fhir.searchvalues import escape_value, split_token, split_value, unescape

if TYPE_CHECKING:
    from .db import Tx

__all__ = [
    "DEFAULT_COUNT",
    "MAX_ALTERNATIVES",
    "MAX_COUNT",
    "REFERENCE_PARAMS",
    "SEARCH_PARAMS",
    "audience_sql",
    "check_condition",
    "escape_value",
    "index_values",
    "instant",
    "instant_now",
    "page",
    "ref_key",
    "search_sql",
    "split_token",
    "since_clause",
    "split_value",
    "unescape",
    "write_index",
]


def _refs(*paths: str) -> Callable[[dict[str, Any]], list[tuple[str, str]]]:
    split = [tuple(p.split(".")) for p in paths]  # once, not per resource

    def extract(res: dict[str, Any]) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        for parts in split:
            for ref in _walk(res, parts):
                if isinstance(ref, dict) and isinstance(ref.get("reference"), str):
                    out.append(ref_key(ref["reference"]))
        return out

    return extract


def ref_key(ref: str) -> tuple[str, str]:
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
    "Communication": {
        **_COMMON,
        "patient": _refs("subject"),
        "subject": _refs("subject"),
        "status": _tokens("status"),
        "recipient": _refs("recipient"),
        "sender": _refs("sender"),
        "category": _tokens("category"),
        "based-on": _refs("basedOn"),
        "about": _refs("about"),
    },
    "ServiceRequest": {
        **_COMMON,
        "patient": _refs("subject"),
        "subject": _refs("subject"),
        "status": _tokens("status"),
        "requester": _refs("requester"),
        "performer": _refs("performer"),
        "category": _tokens("category"),
        "based-on": _refs("basedOn"),
    },
    "Procedure": {
        **_COMMON,
        "patient": _refs("subject"),
        "subject": _refs("subject"),
        "status": _tokens("status"),
        "category": _tokens("category"),
        "based-on": _refs("basedOn"),
        "performer": _refs("performer.actor"),
    },
    "Consent": {
        **_COMMON,
        "patient": _refs("patient", "subject"),
        "status": _tokens("status"),
        "category": _tokens("category"),
        "actor": _refs("provision.actor.reference", "grantee"),
    },
    "Task": {
        **_COMMON,
        "patient": _refs("for"),
        "subject": _refs("for"),
        "status": _tokens("status"),
        "business-status": _tokens("businessStatus"),
        "focus": _refs("focus"),
        "based-on": _refs("basedOn"),
        "owner": _refs("owner"),
        "requester": _refs("requester"),
    },
    "Patient": {**_COMMON},
    "Practitioner": {**_COMMON},
    "PractitionerRole": {
        **_COMMON,
        "practitioner": _refs("practitioner"),
        "organization": _refs("organization"),
    },
    "Organization": {**_COMMON},
    "Provenance": {"target": _refs("target"), "patient": _refs("patient")},
}

#: Search parameters whose query values are references, with the type a bare id defaults to.
REFERENCE_PARAMS = {
    "patient": "Patient",
    "subject": None,
    "recipient": None,
    "sender": None,
    "based-on": None,
    "about": None,
    "requester": None,
    "performer": None,
    "actor": None,
    "focus": None,
    "owner": None,
    "practitioner": "Practitioner",
    "organization": "Organization",
    "target": None,
}
MAX_COUNT = 200
DEFAULT_COUNT = 20
#: Most comma-separated alternatives one search parameter, and a whole search, may carry
#: (each becomes an SQL term; SQLite refuses expression trees past ~1,000 terms).
MAX_ALTERNATIVES = 100
#: Result parameters a search accepts and ignores in its WHERE (they select nothing).
_IGNORED = ("_count", "_offset", "_format", "_total", "_sort", "_summary")
#: Search result parameters: they select no resources, so a condition (If-None-Exist) may not use them.
_RESULT_PARAMS = frozenset(
    {*_IGNORED, "_include", "_revinclude", "_elements", "_contained", "_containedType", "_pretty"}
)


def check_condition(params: Mapping[str, Sequence[str]]) -> None:
    """Raise InputError unless `params` is a usable If-None-Exist condition: some search
    criteria, and no result parameters (which select nothing)."""
    result = sorted(name for name in params if name in _RESULT_PARAMS)
    if result:
        raise InputError(
            f"If-None-Exist may not use the result parameter '{result[0][:40]}': a condition "
            "only selects (e.g. identifier=SYSTEM|VALUE)",
            expression="If-None-Exist",
            rule="http:if-none-exist",
        )
    if not params:
        raise InputError(
            "If-None-Exist has no search criteria: it would match any resource; give one "
            "such as identifier=SYSTEM|VALUE",
            expression="If-None-Exist",
            rule="http:if-none-exist",
        )
    empty = sorted(name for name, values in params.items() if not any(v.strip() for v in values))
    if empty:
        raise InputError(
            f"The condition's parameter '{empty[0][:40]}' has no value: it would select nothing, and "
            "the resource would be created again; give one such as identifier=SYSTEM|VALUE",
            expression="If-None-Exist",
            rule="http:if-none-exist",
        )


def instant_now() -> str:
    """Now as a FHIR instant with microseconds, UTC (sorts lexicographically)."""
    return instant(datetime.now(UTC))


def index_values(resource: dict[str, Any]) -> Iterable[tuple[str, tuple[str, str]]]:
    """(param, (code, system)) pairs for a resource's search index."""
    for name, extract in SEARCH_PARAMS.get(str(resource.get("resourceType")), {}).items():
        for value in extract(resource):
            yield name, value


def write_index(tx: Tx, rtype: str, rid: str, body: dict[str, Any]) -> None:
    """Insert the search index rows of the current version `body` of `rtype/rid`."""
    rows = {(rtype, rid, p, code, system) for p, (code, system) in index_values(body)}
    if rows:
        tx.executemany(
            "INSERT INTO fhir_index (type, id, param, code, system) VALUES (?, ?, ?, ?, ?)", sorted(rows)
        )


def page(count: int, offset: int) -> tuple[int, int]:
    """`_count` and `_offset` as used: count within 0..MAX_COUNT, offset at least 0."""
    return max(0, min(int(count), MAX_COUNT)), max(0, int(offset))


def audience_sql(source: str, refs: Sequence[str]) -> tuple[str, list[Any]]:
    """The condition (on `fhir_current c`) keeping what `source` wrote or what names one of
    `refs` as recipient or requester, and its arguments."""
    clause = "c.source = ?"
    args: list[Any] = [source]
    if refs:
        keys = sorted({ref_key(r) for r in refs})
        # A row-value IN list, not an OR chain: no expression-depth limit however many refs.
        clause += (
            " OR EXISTS (SELECT 1 FROM fhir_index a WHERE a.type = c.type AND a.id = c.id "
            "AND a.param IN ('recipient', 'requester') AND (a.code, a.system) IN (VALUES "
            + ", ".join("(?, ?)" for _ in keys)
            + "))"
        )
        args += [v for k in keys for v in k]
    return clause, args


def search_sql(rtype: str, params: Mapping[str, Sequence[str]]) -> tuple[str, list[Any]]:
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
            alternatives = split_value(value)
            per_param += len(alternatives)
            total += len(alternatives)
            if per_param > MAX_ALTERNATIVES or total > MAX_ALTERNATIVES:
                shown = name[:40] if name in known or name in ("_id", "_lastUpdated") else "a parameter"
                raise InputError(
                    f"Too many search values: at most {MAX_ALTERNATIVES} in all (the limit was "
                    f"passed at '{shown}')",
                    expression=shown,
                    rule="search:too-many-values",
                    code="too-costly",
                )
            if name == "_id":
                clauses.append(f"c.id IN ({', '.join('?' * len(alternatives))})")
                args += [unescape(alt) for alt in alternatives]
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
                clauses.append(
                    "EXISTS (SELECT 1 FROM fhir_index i WHERE i.type = c.type AND i.id = c.id "
                    f"AND i.param = ? AND ({' OR '.join(tests)}))"
                )
            else:
                raise InputError(
                    f"Search parameter '{name[:40]}' is not supported for {rtype}",
                    rule="search:unknown-parameter",
                    code="not-supported",
                )
    return " AND ".join(clauses), args


def since_clause(column: str, since: str) -> tuple[str, list[str]]:
    """SQL keeping rows whose instant `column` is at or after `since` (`_history?_since=`, a
    FHIR instant or a date at any precision: its start); a 400 naming `_since` otherwise."""
    if since[:2] in ("eq", "ne", "gt", "ge", "lt", "le", "sa", "eb"):
        raise InputError(
            "_since is an instant (no prefix)", expression="_since", rule="search:date", code="value"
        )
    return _date_clause(column, "ge" + since, "_since")


def _match_sql(name: str, value: str) -> tuple[str, list[str]]:
    """SQL (on index alias `i`) and arguments matching one search value (one alternative, its
    escapes still in it) of parameter `name`."""
    if name in REFERENCE_PARAMS:
        value = unescape(value)
        default_type = REFERENCE_PARAMS[name]
        if "/" not in value:
            if default_type is None:
                return "i.code = ?", [value]
            value = f"{default_type}/{value}"
        code, system = ref_key(value)
        return "(i.code = ? AND i.system = ?)", [code, system]
    token_system, token_code = split_token(value)
    if token_system is None:
        return "i.code = ?", [token_code]
    if not token_code:
        return "i.system = ?", [token_system]
    return "(i.code = ? AND i.system = ?)", [token_code, token_system]


_DATE = re.compile(
    r"^(eq|ne|gt|ge|lt|le|sa|eb)?(\d{4})(?:-(\d{2})(?:-(\d{2})"
    r"(?:T(\d{2}):(\d{2})(?::(\d{2})(?:\.(\d{1,9}))?)?(Z|[+-]\d{2}:\d{2})?)?)?)?$",
    re.ASCII,  # ASCII digits only: int() would read other scripts' digits (`٢٠٢٤` as 2024)
)


def _date_clause(column: str, value: str, name: str = "_lastUpdated") -> tuple[str, list[str]]:
    """SQL for a FHIR date search on an instant column: the value is a range at its precision
    (`name`: the parameter errors name)."""
    m = _DATE.match(value)
    if not m:
        raise InputError(
            f"{name} value '{value[:40]}' is not a FHIR date/dateTime with an optional "
            "prefix (eq, gt, ge, lt, le)",
            expression=name,
            rule="search:date",
            code="value",
        )
    prefix, y, mo, d, hh, mi, ss, frac, tz = m.groups()
    try:
        lo, hi = _range(y, mo, d, hh, mi, ss, frac, tz)
    except (ValueError, OverflowError):  # no such date, or its range leaves years 1-9999
        raise InputError(
            f"{name} value '{value[:40]}' is not a valid date, or its range leaves the years 0001-9999",
            expression=name,
            rule="search:date",
            code="value",
        ) from None
    lo_s, hi_s = instant(lo), instant(hi)
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


def _range(
    y: str,
    mo: str | None,
    d: str | None,
    hh: str | None,
    mi: str | None,
    ss: str | None,
    frac: str | None,
    tz: str | None,
) -> tuple[datetime, datetime]:
    zone = UTC
    if tz and tz != "Z":
        sign = 1 if tz[0] == "+" else -1
        zone = timezone(sign * timedelta(hours=int(tz[1:3]), minutes=int(tz[4:6])))
    if mo is None:
        lo = datetime(int(y), 1, 1, tzinfo=zone)
        return _utc(lo), _utc(lo.replace(year=lo.year + 1))
    if d is None:
        lo = datetime(int(y), int(mo), 1, tzinfo=zone)
        return _utc(lo), _utc(
            lo.replace(year=lo.year + 1, month=1) if lo.month == 12 else lo.replace(month=lo.month + 1)
        )
    if hh is None:
        lo = datetime(int(y), int(mo), int(d), tzinfo=zone)
        return lo.astimezone(UTC), (lo + timedelta(days=1)).astimezone(UTC)
    micro = int((frac or "0").ljust(6, "0")[:6])
    lo = datetime(int(y), int(mo), int(d), int(hh), int(mi or 0), int(ss or 0), micro, tzinfo=zone)
    step = timedelta(microseconds=1) if frac else timedelta(seconds=1) if ss else timedelta(minutes=1)
    return lo.astimezone(UTC), (lo + step).astimezone(UTC)


def _utc(value: datetime) -> datetime:
    return value.astimezone(UTC)


def instant(value: datetime) -> str:
    """A UTC datetime as a FHIR instant with microseconds (four-digit year even before 1000;
    formatted by hand: strftime costs ~4x as much)."""
    t = value
    return f"{t.year:04d}-{t.month:02d}-{t.day:02d}T{t.hour:02d}:{t.minute:02d}:{t.second:02d}.{t.microsecond:06d}Z"
