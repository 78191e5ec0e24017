"""The FHIR path mini-language of the mappings: `a.b`, `a[0]`, `a[1:]`, `a[k=v]`, `a[k!=v]`.

Parsed once at load (`parse_path`), then used to read every match (`get_all`, `get_first`) and
to write with find-or-create (`set_at`, `append_at`); `get_field` / `set_field` do the same for
dotted KAP record fields. Plain dicts and lists in, plain dicts and lists out.

Room: records/ (layer 1, pure core: no IO): may import the base rooms and validation/.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..fhir.digits import ascii_digits

__all__ = [
    "Seg",
    "append_at",
    "get_all",
    "get_field",
    "get_first",
    "parse_path",
    "path_str",
    "set_at",
    "set_field",
    "split_path",
]

_SEG = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)((?:\[[^\[\]]+\])*)$")
_BRACKET = re.compile(r"\[([^\[\]]+)\]")


@dataclass(frozen=True)
class Seg:
    name: str
    index: int | None = None  # [N]
    start: int | None = None  # [N:]
    eq: tuple[tuple[str, str], ...] = ()  # [k=v]
    ne: tuple[tuple[str, str], ...] = ()  # [k!=v]
    is_list: bool = False

    def matches(self, elem: Any) -> bool:
        if not isinstance(elem, dict):
            return not self.eq and not self.ne
        for k, v in self.eq:
            if elem.get(k) != v:
                return False
        for k, v in self.ne:
            if elem.get(k) == v:
                return False
        return True


def split_path(path: str) -> list[str]:
    parts: list[str] = []
    cur: list[str] = []
    depth = 0
    for ch in path:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        if ch == "." and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    return parts


def parse_path(path: str) -> tuple[Seg, ...]:
    """'a.b[url=x].c[0]' -> segments; '.' -> () (the element itself)."""
    if path == ".":
        return ()
    segs = []
    for part in split_path(path):
        m = _SEG.match(part)
        if not m:
            raise ValueError(f"bad path segment '{part}'")
        index = start = None
        eq: list[tuple[str, str]] = []
        ne: list[tuple[str, str]] = []
        for sel in _BRACKET.findall(m.group(2)):
            if ascii_digits(sel, most=9):
                index = int(sel)
            elif sel.endswith(":") and ascii_digits(sel[:-1], most=9):
                start = int(sel[:-1])
            elif "!=" in sel:
                k, v = sel.split("!=", 1)
                ne.append((k, v))
            elif "=" in sel:
                k, v = sel.split("=", 1)
                eq.append((k, v))
            else:
                raise ValueError(f"bad selector '[{sel}]'")
        segs.append(
            Seg(
                m.group(1),
                index,
                start,
                tuple(eq),
                tuple(ne),
                index is not None or start is not None or bool(eq) or bool(ne),
            )
        )
    return tuple(segs)


def merge(node: dict[str, Any], key: str, value: Any) -> None:
    old = node.get(key)
    if isinstance(old, list) and isinstance(value, list):
        old.extend(v for v in value if v not in old)
    elif isinstance(old, dict) and isinstance(value, dict):
        old.update(value)
    else:
        node[key] = value


def walk_create(node: dict[str, Any], seg: Seg) -> dict[str, Any]:
    """The child object at `seg`, created if missing (find-or-create for list selectors)."""
    if not seg.is_list:
        child = node.get(seg.name)
        if not isinstance(child, dict):
            child = node[seg.name] = {}
        return child
    lst = node.setdefault(seg.name, [])
    if seg.index is not None:
        if seg.index < len(lst):
            return lst[seg.index]
        if seg.index == len(lst):
            lst.append({})
            return lst[-1]
        raise ValueError(f"mapping writes {seg.name}[{seg.index}] before {seg.name}[{len(lst)}]")
    for elem in lst[seg.start or 0 :]:
        if seg.matches(elem):
            return elem
    new = dict(seg.eq)
    lst.append(new)
    return new


def set_at(node: dict[str, Any], segs: tuple[Seg, ...], value: Any) -> None:
    if not segs:
        if isinstance(value, dict):
            node.update(value)
            return
        raise ValueError("path '.' needs an object value")
    for seg in segs[:-1]:
        node = walk_create(node, seg)
    last = segs[-1]
    if last.is_list:
        target = walk_create(node, last)
        if not isinstance(value, dict):
            raise ValueError(f"a list element at '{last.name}' needs an object value")
        target.update(value)
    else:
        merge(node, last.name, value)


def append_at(node: dict[str, Any], segs: tuple[Seg, ...], elem: dict[str, Any], unique: bool) -> None:
    for seg in segs[:-1]:
        node = walk_create(node, seg)
    last = segs[-1]
    lst = node.setdefault(last.name, [])
    new = {**dict(last.eq), **elem} if last.eq else elem
    if not (unique and new in lst):
        lst.append(new)


def get_all(node: Any, segs: tuple[Seg, ...]) -> list[Any]:
    """Every value at the path (list elements fan out)."""
    current = [node]
    for seg in segs:
        nxt: list[Any] = []
        for n in current:
            if not isinstance(n, dict) or seg.name not in n:
                continue
            v = n[seg.name]
            if isinstance(v, list):
                items = v
            elif seg.is_list:
                items = [v]  # a 0..1 element addressed as a list
            else:
                nxt.append(v)
                continue
            if seg.index is not None:
                items = items[seg.index : seg.index + 1]
            elif seg.start is not None:
                items = items[seg.start :]
            if seg.eq or seg.ne:
                nxt.extend(e for e in items if seg.matches(e))
            else:  # no filter: every element matches (`Seg.matches`)
                nxt.extend(items)
        current = nxt
    return current


def get_first(node: Any, segs: tuple[Seg, ...]) -> Any:
    """The first value at the path; a list of primitives at a plain last segment comes back whole."""
    if not segs:
        return node
    last = segs[-1]
    if last.is_list:
        vals = get_all(node, segs)
        return vals[0] if vals else None
    if len(segs) == 1:  # the common case: a plain element of `node` itself
        return node.get(last.name) if isinstance(node, dict) else None
    for parent in get_all(node, segs[:-1]):
        if isinstance(parent, dict) and last.name in parent:
            return parent[last.name]
    return None


def get_field(record: Mapping[str, Any], field: tuple[str, ...]) -> Any:
    v: Any = record
    for k in field:
        if not isinstance(v, dict) or k not in v:
            return None
        v = v[k]
    return v


def set_field(record: dict[str, Any], field: tuple[str, ...], value: Any) -> None:
    node = record
    for k in field[:-1]:
        node = node.setdefault(k, {})
    if field[-1] not in node:
        node[field[-1]] = value


def path_str(seg: Seg) -> str:
    return seg.name + (f"[{seg.index}]" if seg.index is not None else "")
