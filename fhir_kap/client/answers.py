"""Reading a FHIR server's answers (client/, layer 2: IO adapter; imports base only).

Shared by the client and the SMART token exchange: a JSON body (or a ServerError saying it is
not JSON: `UnreadableAnswer`), a failure status as one `ServerError` carrying the server's
OperationOutcome and its `Retry-After`, a redirect as a `RedirectRefused` naming only the host it
pointed at, and URLs shown without their query strings (they hold business identifiers).
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urljoin, urlsplit, urlunsplit

import requests

from ..errors import InputError, ServerError
from ..fhir.retry import RETRY_STATUSES, retry_after_seconds
from ..jsonio import loads

__all__ = [
    "RedirectRefused",
    "UnreadableAnswer",
    "json_body",
    "redirect_error",
    "status_error",
    "strip_query",
]


class UnreadableAnswer(ServerError):
    """The server answered, but its body is not JSON. On a 2xx the request may well have been
    carried out (a create stored, say): the caller cannot tell from the answer, only by asking
    again (delivery reconciles a conditional create with a read by its identifier)."""


class RedirectRefused(ServerError):
    """The server answered 3xx. Redirects are never followed: a 307/308 would re-send the body
    (patient data) and the credentials to wherever `Location` points. `location_host` is the
    host it pointed at (no path or query: they may carry ids); `downgrade` is true when an https
    request was pointed at plain http."""

    def __init__(
        self, summary: str, *, status: int, url: str | None, location_host: str | None, downgrade: bool
    ) -> None:
        super().__init__(summary, status=status, retryable=False, url=url)
        self.location_host = location_host
        self.downgrade = downgrade


def strip_query(url: str) -> str:
    s = urlsplit(url)
    return urlunsplit((s.scheme, s.netloc, s.path, "", ""))


def _host(url: str) -> str | None:
    """`host[:port]` of a URL, without credentials, path or query; None if it names no host."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return None
    if not parts.hostname:
        return None
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return f"{host}:{port}" if port else host


def redirect_error(method: str, what: str, resp: requests.Response, request_url: str) -> RedirectRefused:
    """A 3xx answer as a non-retryable error naming the status and the Location's host only.

    >>> r = requests.Response(); r.status_code, r.reason = 307, "Temporary Redirect"
    >>> r.headers["Location"] = "http://elsewhere.example:8080/fhir/Communication?identifier=x|1"
    >>> redirect_error("POST", "Communication", r, "https://ehr.example/fhir/Communication").summary
    'POST Communication: 307 Temporary Redirect to elsewhere.example:8080, refused (https to plain http; redirects are never followed)'
    """
    location = resp.headers.get("Location")
    target = urljoin(request_url, location) if location else None
    host = _host(target) if target else None
    downgrade = bool(
        target and urlsplit(request_url).scheme == "https" and urlsplit(target).scheme != "https"
    )
    where = (
        f" to {host}" if host else (" without a Location" if not location else " to an unreadable Location")
    )
    why = "https to plain http; " if downgrade else ""
    return RedirectRefused(
        f"{method} {what}: {resp.status_code} {resp.reason or ''}".rstrip()
        + f"{where}, refused ({why}redirects are never followed)",
        status=resp.status_code,
        url=strip_query(request_url),
        location_host=host,
        downgrade=downgrade,
    )


def json_body(resp: requests.Response, method: str, what: str) -> Any:
    if not resp.content:
        return None
    try:
        return loads(resp.content, source="response")
    except InputError:
        ctype = (resp.headers.get("Content-Type") or "unknown").split(";")[0]
        raise UnreadableAnswer(
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
