"""Reading a FHIR server's answers (client/, layer 2: IO adapter; imports base only).

Shared by the client and the SMART token exchange: a JSON body (or a ServerError saying it is
not JSON), a failure status as one `ServerError` carrying the server's OperationOutcome and its
`Retry-After`, and URLs shown without their query strings (they hold business identifiers).
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit, urlunsplit

import requests

from ..errors import InputError, ServerError
from ..fhir.retry import RETRY_STATUSES, retry_after_seconds
from ..jsonio import loads

__all__ = ["json_body", "status_error", "strip_query"]


def strip_query(url: str) -> str:
    s = urlsplit(url)
    return urlunsplit((s.scheme, s.netloc, s.path, "", ""))


def json_body(resp: requests.Response, method: str, what: str) -> Any:
    if not resp.content:
        return None
    try:
        return loads(resp.content, source="response")
    except InputError:
        ctype = (resp.headers.get("Content-Type") or "unknown").split(";")[0]
        raise ServerError(
            f"{method} {what}: {resp.status_code} answer is not JSON ({ctype})",
            status=resp.status_code,
            retryable=False,
            url=strip_query(resp.url or ""),
        ) from None


def status_error(
    method: str, what: str, resp: requests.Response, *, retryable: bool | None = None, note: str = ""
) -> ServerError:
    outcome = None
    try:
        body = loads(resp.content, source="response") if resp.content else None
        if isinstance(body, dict) and body.get("resourceType") == "OperationOutcome":
            outcome = body
    except InputError:
        pass
    status = resp.status_code
    if retryable is None:
        retryable = status in RETRY_STATUSES
    summary = f"{method} {what}: {status} {resp.reason or ''}".rstrip() + note  # + the server's issue codes
    return ServerError(
        summary,
        status=status,
        remote_outcome=outcome,
        retryable=retryable,
        url=strip_query(resp.url or ""),
        retry_after=retry_after_seconds(resp.headers.get("Retry-After")),
    )
