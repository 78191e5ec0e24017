"""What a KAP record keeps of a FHIR resource that its mapping does not carry, and how it comes
back out on the way to FHIR.

Room: records/ (layer 1, pure core: no IO).

`kept(original, mapped)` compares the resource as it came with what the record maps back to,
and lists, as JSON-pointer operations, everything the record would lose:

    {"at": "/priority", "op": "set", "value": "routine"}                 an element the mapping lacks
    {"at": "/extension", "op": "append", "value": {...vendor...}}        an extra list item
    {"at": "/code/text", "op": "replaced", "value": "KAP ref"}           the mapping writes its own value

Lists are paired item by item on `url` (extensions), on `system` (identifiers, codings) or
else by position, so an unknown extension, a foreign coding or an extension on a primitive
(`_authoredOn`) is kept exactly where it was. `apply_kept(resource, ops)` puts the `set` and
`append` items back into a freshly mapped resource (never over a value the mapping wrote);
`replaced` items are reported only; an item that finds no place is returned to the caller. The record stores the operations under `fhir.kept`, and
`not_carried(ops)` names them as FHIRPath-like paths for the issues the import reports.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from .. import jsonio
from ..fhir.digits import ascii_digits

__all__ = ["apply_kept", "kept", "not_carried"]

# Server-managed or re-derived elements: never kept (the record id comes from the business identifier).
_SKIP = frozenset({"/id", "/meta/versionId", "/meta/lastUpdated", "/meta/source", "/contained"})


def _esc(key: str) -> str:
    return key.replace("~", "~0").replace("/", "~1")


def _unesc(part: str) -> str:
    return part.replace("~1", "/").replace("~0", "~")


def _pair_key(item: Any) -> tuple[str, Any] | None:
    if isinstance(item, Mapping):
        if isinstance(item.get("url"), str):
            return ("url", item["url"])
        if isinstance(item.get("system"), str):
            return ("system", (item["system"], item.get("value", item.get("code"))))
    return None


def kept(original: Any, mapped: Any, *, skip: Iterable[str] = ()) -> list[dict[str, Any]]:
    """The operations that restore what `mapped` lacks of `original` (both FHIR JSON objects)."""
    ops: list[dict[str, Any]] = []
    _diff(original, mapped, "", ops, _SKIP | frozenset(skip))
    return jsonio.copy(ops) if ops else ops


def _diff(orig: Any, mapped: Any, at: str, ops: list[dict[str, Any]], skip: frozenset[str]) -> None:
    if at in skip or orig == mapped:  # equal subtrees (most of a KAP resource): one C-level compare
        return
    if isinstance(orig, Mapping) and isinstance(mapped, Mapping):
        for k, v in orig.items():
            here = f"{at}/{_esc(k)}"
            if here in skip:
                continue
            if k not in mapped:
                ops.append({"at": here, "op": "set", "value": v})
            else:
                _diff(v, mapped[k], here, ops, skip)
        return
    if isinstance(orig, list) and isinstance(mapped, list):
        used: set[int] = set()
        for i, item in enumerate(orig):
            j = _partner(item, i, mapped, used)
            if j is None:
                ops.append({"at": at, "op": "append", "value": item})
            else:
                used.add(j)
                _diff(item, mapped[j], f"{at}/{j}", ops, skip)
        return
    if orig != mapped:
        ops.append({"at": at, "op": "replaced", "value": orig})


def _partner(item: Any, i: int, mapped: list[Any], used: set[int]) -> int | None:
    key = _pair_key(item)
    if key is not None:
        for j, m in enumerate(mapped):
            if j not in used and _pair_key(m) == key:
                return j
        if key[0] == "url" or isinstance(item, Mapping) and "code" in item:
            return None  # another extension or another coding: an item of its own
    for j, m in enumerate(mapped):
        if j not in used and m == item:
            return j
    if i < len(mapped) and i not in used and type(mapped[i]) is type(item) and _pair_key(mapped[i]) is None:
        return i
    return None


def apply_kept(resource: dict[str, Any], ops: Any) -> list[tuple[int, Mapping[str, Any]]]:
    """Put the kept `set` / `append` items back into `resource` (in place); returns the
    (index, op) pairs that found no place (their parent is gone, or is not an object or a list
    where one is needed), for the caller to report: nothing is dropped silently.

    A `set` never overwrites what the mapping wrote; an `append` adds an item not already there;
    missing objects on the way are created, missing list items never are.

    >>> r = {"resourceType": "ServiceRequest", "extension": [{"url": "a"}]}
    >>> apply_kept(r, [{"at": "/priority", "op": "set", "value": "routine"},
    ...                {"at": "/extension", "op": "append", "value": {"url": "b"}},
    ...                {"at": "/reasonCode/0/coding", "op": "set", "value": []}])
    [(2, {'at': '/reasonCode/0/coding', 'op': 'set', 'value': []})]
    >>> r
    {'resourceType': 'ServiceRequest', 'extension': [{'url': 'a'}, {'url': 'b'}], 'priority': 'routine'}
    """
    left: list[tuple[int, Mapping[str, Any]]] = []
    if not isinstance(ops, list):
        return left
    for i, op in enumerate(ops):
        if not isinstance(op, Mapping) or op.get("op") == "replaced":
            continue
        parts = [_unesc(p) for p in str(op.get("at", "")).split("/")[1:]]
        parent = _walk(resource, parts[:-1]) if parts and op.get("op") in ("set", "append") else None
        if not isinstance(parent, dict):
            left.append((i, op))
            continue
        value = jsonio.copy(op.get("value"))
        if op["op"] == "set":
            parent.setdefault(parts[-1], value)
            continue
        lst = parent.setdefault(parts[-1], [])
        if not isinstance(lst, list):
            left.append((i, op))
        elif value not in lst:
            lst.append(value)
    return left


def _walk(node: Any, parts: list[str]) -> Any:
    """The object at `parts`, creating missing objects on the way (never missing list items)."""
    for i, p in enumerate(parts):
        if isinstance(node, list):
            if not ascii_digits(p, most=9) or int(p) >= len(node):
                return None
            node = node[int(p)]
        elif isinstance(node, dict):
            if p not in node:
                if any(ascii_digits(q) for q in parts[i:]):
                    return None  # a list item the mapped resource lacks: no place for it (nothing made)
                node[p] = {}
            node = node[p]
        else:
            return None
    return node


def not_carried(resource_type: str, ops: Iterable[Mapping[str, Any]]) -> list[str]:
    """The elements `ops` keep or report, as `Type.path` (list positions and `_` kept), sorted.

    >>> not_carried("ServiceRequest", [{"at": "/reasonCode/0/coding", "op": "set"},
    ...                                {"at": "/_authoredOn", "op": "set"}])
    ['ServiceRequest._authoredOn', 'ServiceRequest.reasonCode.coding']
    """
    out = set()
    for op in ops:
        parts = [_unesc(p) for p in str(op.get("at", "")).split("/")[1:] if not ascii_digits(p)]
        out.add(".".join([resource_type, *parts]))
    return sorted(out)
