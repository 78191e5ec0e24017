"""What a report may show of an HTTP exchange, and how a stored resource differs from the one sent
(conformance/, layer 3: orchestration; pure functions, imports base only).

A failed check keeps the exchanges that proved it. Before they reach a report, secrets and
patient data are masked (`mask_body`, `mask_headers`, `mask_text`): headers worth showing are
kept with credentials replaced by '***' (the auth scheme stays), JSON patient data and secret
keys are masked, bodies are cut to 2 KB. `compare_resources` tells what a server lost, changed
or added on a round trip, ignoring server-managed elements.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from datetime import datetime
from typing import Any

from .. import jsonio
from ..errors import InputError

BODY_LIMIT = 2048

# Keys whose values are patient data (or free text that may be) and are masked in reports.
_PATIENT_KEYS = frozenset(
    {
        "name",
        "given",
        "family",
        "birthDate",
        "telecom",
        "address",
        "text",
        "contentString",
        "valueString",
        "data",
        "div",
        "photo",
        "contact",
        "description",
        "note",
        "summary",
    }
)
_SECRET_KEYS = frozenset(
    {
        "access_token",
        "refresh_token",
        "id_token",
        "token",
        "client_secret",
        "client_assertion",
        "password",
        "assertion",
    }
)
_SECRET_HEADERS = frozenset({"authorization", "proxy-authorization", "cookie", "set-cookie"})
_KEPT_HEADERS = (
    "content-type",
    "location",
    "etag",
    "last-modified",
    "www-authenticate",
    "if-match",
    "if-none-exist",
    "prefer",
    "authorization",
)
MASK = "***"


def mask_headers(headers: Mapping[str, str], secrets: Iterable[str] = ()) -> dict[str, str]:
    """Keep the headers worth showing; secrets become '***' (the auth scheme is kept)."""
    out: dict[str, str] = {}
    for key, value in headers.items():
        low = key.lower()
        if low not in _KEPT_HEADERS:
            continue
        if low in _SECRET_HEADERS:
            scheme = str(value).split(" ", 1)[0] if " " in str(value) else ""
            out[key] = f"{scheme} {MASK}".strip()
        else:
            out[key] = mask_text(str(value), secrets)
    return out


def _mask_value(node: Any, key: str | None = None) -> Any:
    if key in _SECRET_KEYS:
        return MASK
    if isinstance(node, dict):
        is_outcome = node.get("resourceType") == "OperationOutcome"
        out = {}
        for k, v in node.items():
            if is_outcome and k == "issue":
                out[k] = v  # the server's own words on what went wrong: worth keeping
            elif k in _PATIENT_KEYS:
                out[k] = MASK
            else:
                out[k] = _mask_value(v, k)
        return out
    if isinstance(node, list):
        return [_mask_value(v, key) for v in node]
    return node


def mask_text(text: str, secrets: Iterable[str]) -> str:
    """`text` with every known secret (4 characters or more) replaced by '***'."""
    for secret in secrets:
        if secret and len(secret) >= 4:
            text = text.replace(secret, MASK)
    return text


def mask_body(body: bytes | str | None, secrets: Iterable[str] = (), limit: int = BODY_LIMIT) -> str | None:
    """A body excerpt safe to show: JSON patient data and secrets masked, cut to `limit` chars.

    >>> mask_body(b'{"resourceType":"Patient","id":"p1","name":[{"family":"Doe"}]}')
    '{"resourceType":"Patient","id":"p1","name":"***"}'
    """
    if body is None or body == b"" or body == "":
        return None
    raw = body if isinstance(body, bytes) else body.encode("utf-8", "replace")
    try:
        text = jsonio.dumps(_mask_value(jsonio.loads(raw))).decode()
    except InputError:
        text = raw.decode("utf-8", "replace")
        if "=" in text and "&" in text or text.startswith("grant_type"):
            text = "&".join(
                f"{p.split('=', 1)[0]}={MASK}" if p.split("=", 1)[0] in _SECRET_KEYS else p
                for p in text.split("&")
            )
    text = mask_text(text, secrets)
    if len(text) > limit:
        text = text[:limit] + f"... ({len(text) - limit} more characters)"
    return text


_VOLATILE = frozenset({"/meta/versionId", "/meta/lastUpdated", "/id", "/text", "/meta/source"})


def _leaves(node: Any, pointer: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _leaves(v, f"{pointer}/{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _leaves(v, f"{pointer}/{i}")
    else:
        yield pointer, node


def _same_instant(a: Any, b: Any) -> bool:
    if not (isinstance(a, str) and isinstance(b, str)) or "T" not in a or "T" not in b:
        return False
    try:
        return datetime.fromisoformat(a.replace("Z", "+00:00")) == datetime.fromisoformat(
            b.replace("Z", "+00:00")
        )
    except ValueError:
        return False


def compare_resources(
    sent: Mapping[str, Any], returned: Mapping[str, Any]
) -> tuple[list[str], list[str], list[str]]:
    """(lost, changed, added) JSON pointers between what was sent and what came back.

    Server-managed elements (id, meta.versionId, meta.lastUpdated, meta.source, text) are ignored;
    the same instant written differently counts as unchanged.

    >>> compare_resources({"a": 1, "b": [1]}, {"b": [2], "c": 3})
    (['/a'], ['/b/0'], ['/c'])
    """
    mine = {p: v for p, v in _leaves(sent) if not any(p.startswith(x) for x in _VOLATILE)}
    theirs = {p: v for p, v in _leaves(returned) if not any(p.startswith(x) for x in _VOLATILE)}
    lost = [p for p in mine if p not in theirs]
    changed = [
        p for p in mine if p in theirs and theirs[p] != mine[p] and not _same_instant(mine[p], theirs[p])
    ]
    added = [p for p in theirs if p not in mine]
    return lost, changed, added
