"""JSON paths and element lookups the validation checks share (validation/, layer 1: pure core;
imports base only).

An issue names where it is twice: as a JSON pointer (`/provision/0/actor`) and as a FHIR-style
expression (`Consent.provision[0].actor`). `_at` and `_count` find the values at an element path,
matching a choice stem (`performed`) to its variants (`performedPeriod`); `_codes`, `_in_vs` and
`_matches_pattern` read codings.

Every helper here takes any JSON: the profile rules and invariants also run on resources that
failed the structure check, so a value of the wrong JSON type (a number for a list, a list for a
code) reads as absent, never raises.
"""

from __future__ import annotations

from typing import Any


def _pointer(parts: tuple[Any, ...]) -> str:
    return "".join("/" + str(p).replace("~", "~0").replace("/", "~1") for p in parts)


def _expr(root: str, parts: tuple[Any, ...]) -> str:
    out = root
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else f".{p}"
    return out


def _items(value: Any) -> list[Any]:
    """The entries of a repeating element: a list as it is, anything else (wrong type) none."""
    return value if isinstance(value, list) else []


def _text(value: Any) -> str | None:
    """A string value, or None where the value has another JSON type."""
    return value if isinstance(value, str) else None


def _codes(cc: Any) -> list[tuple[str | None, str | None]]:
    """(system, code) of each coding of a CodeableConcept (or Coding-shaped dict); values of the
    wrong JSON type read as None."""
    if not isinstance(cc, dict):
        return []
    return [
        (_text(c.get("system")), _text(c.get("code")))
        for c in _items(cc.get("coding"))
        if isinstance(c, dict)
    ]


def _at(node: Any, parts: list[str], path: tuple[Any, ...]) -> list[tuple[Any, tuple[Any, ...]]]:
    """Values at an element path (lists flattened), with their JSON paths, in document order.
    A stem matches choices (`performed`: `performedPeriod`). A list, built without generators:
    it runs for every profile rule of every resource checked."""
    out: list[tuple[Any, tuple[Any, ...]]] = []
    _collect(node, parts, 0, path, out)
    return out


def _collect(node: Any, parts: list[str], i: int, path: tuple[Any, ...], out: list[Any]) -> None:
    if i == len(parts):
        out.append((node, path))
        return
    if isinstance(node, list):
        for j, item in enumerate(node):
            _collect(item, parts, i, path + (j,), out)
        return
    if not isinstance(node, dict):
        return
    head = parts[i]
    if head in node:
        keys: Any = (head,)
    else:
        n = len(head)
        keys = [k for k in node if k.startswith(head) and k[n:][:1].isupper()]
    for k in keys:
        v = node[k]
        if isinstance(v, list):
            for j, item in enumerate(v):
                _collect(item, parts, i + 1, path + (k, j), out)
        else:
            _collect(v, parts, i + 1, path + (k,), out)


def _count(node: Any, name: str) -> int:
    if not isinstance(node, dict):
        return 0
    keys = (
        [name] if name in node else [k for k in node if k.startswith(name) and k[len(name) :][:1].isupper()]
    )
    n = 0
    for k in keys:
        v = node[k]
        n += len(v) if isinstance(v, list) else 1
    return n


def _matches_pattern(value: Any, pattern: dict[str, Any]) -> bool:
    have = set(_codes(value))
    return all((c.get("system"), c.get("code")) in have for c in pattern.get("coding", []))


def _in_vs(value: Any, vs: tuple[str, frozenset[str]]) -> bool:
    system, codes = vs
    if isinstance(value, str):
        return value in codes
    if isinstance(value, dict) and "code" in value and "coding" not in value:
        return value.get("system") == system and _text(value.get("code")) in codes
    return any(s == system and c in codes for s, c in _codes(value))
