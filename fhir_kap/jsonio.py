"""JSON in and out: one document or NDJSON, streamed, with errors that say where.

Pure helpers over byte streams (no file opening here: the CLI and the bridge do that).
orjson does the parsing and writing: it is ~60x faster than building models.

Room: jsonio (layer 0, base): imports only errors.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import IO, Any

import orjson

from .errors import InputError

__all__ = [
    "loads",
    "dumps",
    "copy",
    "iter_documents",
    "too_deep",
    "check_depth",
    "MAX_DEPTH",
    "MAX_DOCUMENT_BYTES",
]

MAX_DOCUMENT_BYTES = 64 * 1024 * 1024
#: Deepest JSON nesting accepted in a resource, on every way in (FHIR resources need far less;
#: the Bundles and the encoder around a stored resource need headroom).
MAX_DEPTH = 64
_BOM = b"\xef\xbb\xbf"  # a UTF-8 byte order mark some Windows tools write first; skipped


def loads(data: bytes | str, *, source: str = "input") -> Any:
    """Parse JSON, raising InputError (rule `json:syntax`) with the position on failure.
    A leading UTF-8 byte order mark is skipped.

    >>> loads(b"\xef\xbb\xbf{}")
    {}
    """
    if isinstance(data, (bytes, bytearray)) and data[:3] == _BOM:
        data = data[3:]
    elif isinstance(data, str) and data[:1] == "\ufeff":
        data = data[1:]
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise InputError(
            f"{source}: malformed JSON ({_short(exc)})", pointer="", rule="json:syntax"
        ) from None


def dumps(obj: Any, *, pretty: bool = False) -> bytes:
    """Serialize to UTF-8 JSON bytes (keys in insertion order; 2-space indent when pretty)."""
    return orjson.dumps(obj, option=orjson.OPT_INDENT_2 if pretty else 0)


def copy(value: Any) -> Any:
    """A deep copy of JSON data (an orjson round trip: several times faster than copy.deepcopy).

    >>> a = {"x": [1, {"y": 2}]}; b = copy(a); b["x"][1]["y"] = 3; a
    {'x': [1, {'y': 2}]}
    """
    return orjson.loads(orjson.dumps(value))


def too_deep(node: Any, limit: int = MAX_DEPTH) -> bool:
    """Whether JSON `node` nests objects/arrays more than `limit` levels (iterative: no recursion).

    >>> too_deep({"a": [{"b": 1}]}, 3), too_deep({"a": [{"b": 1}]}, 2)
    (False, True)
    """
    if isinstance(node, (dict, list)):
        # fast path: nesting needs a container per level, and a count of the brackets in the
        # serialised JSON (strings included, so never too low) is a C-speed upper bound
        try:
            raw = orjson.dumps(node)
        except (TypeError, orjson.JSONEncodeError):  # past orjson's own depth limit, or not JSON
            raw = None
        if raw is not None and raw.count(b"{") + raw.count(b"[") <= limit:
            return False
    stack: list[tuple[Any, int]] = [(node, 1)]
    while stack:
        cur, depth = stack.pop()
        if depth > limit:
            return True
        if isinstance(cur, dict):
            stack.extend((v, depth + 1) for v in cur.values() if isinstance(v, (dict, list)))
        elif isinstance(cur, list):
            stack.extend((v, depth + 1) for v in cur if isinstance(v, (dict, list)))
    return False


def check_depth(resource: Any) -> None:
    """400 (`fhir:nesting`) when a resource nests deeper than `MAX_DEPTH` levels: the one rule of
    every path that stores a resource, which leaves the Bundles wrapped around a stored resource
    (search, `_history`, notifications) far inside the encoder's own limit."""
    if too_deep(resource):
        raise InputError(
            f"the resource nests deeper than {MAX_DEPTH} levels",
            pointer="",
            rule="fhir:nesting",
            code="too-costly",
        )


def _short(exc: Exception) -> str:
    return str(exc).split("\n")[0][:200]


def iter_documents(
    stream: IO[bytes], *, source: str = "input", max_bytes: int = MAX_DOCUMENT_BYTES
) -> Iterator[tuple[str, Any]]:
    """Yield (label, document) from a stream holding one JSON document or NDJSON.

    NDJSON is read line by line (constant memory); a single document may span lines.
    Labels are `source` for a single document and `source:LINE` for NDJSON lines.
    Blank lines are skipped. Raises InputError naming the line on malformed JSON.
    """
    first = b""
    first_no = 0
    for raw in stream:
        first_no += 1
        if first_no == 1 and raw[:3] == _BOM:
            raw = raw[3:]
        if raw.strip():
            first = raw
            break
    if not first:
        raise InputError(f"{source}: no JSON document found (empty input)", pointer="", rule="json:empty")
    try:
        doc = orjson.loads(first)
    except orjson.JSONDecodeError:
        rest = stream.read(max_bytes + 1)
        whole = first + rest
        if len(whole) > max_bytes:
            raise InputError(
                f"{source}: document larger than {max_bytes} bytes",
                pointer="",
                rule="json:size",
                code="too-long",
            ) from None
        yield source, loads(whole, source=source)
        return
    nxt, nxt_no = _next_nonblank(stream, first_no)
    if nxt is None:
        yield source, doc
        return
    yield f"{source}:{first_no}", doc
    line_no = nxt_no
    line: bytes | None = nxt
    while line is not None:
        yield f"{source}:{line_no}", loads(line, source=f"{source}:{line_no}")
        line, line_no = _next_nonblank(stream, line_no)


def _next_nonblank(stream: IO[bytes], line_no: int) -> tuple[bytes | None, int]:
    for raw in stream:
        line_no += 1
        if raw.strip():
            return raw, line_no
    return None, line_no
