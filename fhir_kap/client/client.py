"""FHIR REST client over an injected `requests.Session` (client/, layer 2: IO adapter; imports
base only; client/ is the only room that imports `requests`).

What it adds to plain HTTP (with `capabilities`, `auth`, `bundles` and `answers` beside it):
  * capability preflight from `GET /metadata` (R4 or R5, types, interactions, conditional
    create/update, transaction/batch), refusing early with a message naming what is missing;
  * auth: none, static bearer, SMART Backend Services (client secret or `private_key_jwt`),
    tokens cached and renewed before expiry, renewed once on a 401;
  * conditional create with the `If-None-Exist` *header*, update with `If-Match`, read/vread/
    delete, search that follows `next` links, transaction and batch Bundles;
  * a timeout on every call; retries with exponential backoff and jitter for connection errors,
    timeouts, 429 (honouring `Retry-After`) and 502/503/504 -- never for other statuses;
  * every server failure is one `ServerError` carrying the server's OperationOutcome;
  * redirects are never followed, by any call (`raw` included): a 307/308 would re-send the
    body, patient data, and the credentials to wherever `Location` points. A 3xx is a
    `RedirectRefused` (not retryable) naming the status and the Location's host only, and saying
    so when an https request was pointed at plain http; `raw` returns the 3xx unfollowed.

Messages and logs name the method, resource type, status and ids -- never bodies, query
strings (they hold business identifiers), tokens or secrets.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlsplit

import requests

from ..config import Release
from ..errors import ConfigError, InputError, ServerError
from ..fhir.retry import RETRY_STATUSES, RETRY_STATUSES_UNSAFE, retry_after_seconds
from ..jsonio import dumps
from .answers import json_body, redirect_error, status_error, strip_query
from .auth import Auth, NoAuth
from .bundles import WriteResult, _bundle_idempotent, _require_resource, _write_result
from .capabilities import Capabilities, parse_capabilities

__all__ = ["FhirClient", "RetryPolicy"]

log = logging.getLogger("fhir_kap.client")

FHIR_JSON = "application/fhir+json"

try:  # the installed distribution's version; a bare checkout falls back to the source version
    from importlib.metadata import version as _dist_version

    _VERSION = _dist_version("fhir-kap")
except ImportError:  # pragma: no cover - not installed (PackageNotFoundError is one)
    _VERSION = "0.1.0"


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with jitter.

    Attempt k (1-based) that failed waits `min(cap, base * 2**(k-1))`, reduced by a random
    fraction of at most `jitter` (0 = no jitter, 1 = "full jitter"), so waits lie in
    `[d * (1 - jitter), d]`. A `Retry-After` (seconds or HTTP-date) replaces the computed wait;
    one longer than `max_retry_after` is not slept through: the error is raised (retryable)
    so that a durable queue can schedule the next try instead of holding a worker.
    """

    attempts: int = 4
    base: float = 0.5
    cap: float = 30.0
    jitter: float = 0.5
    max_retry_after: float = 120.0

    def __post_init__(self) -> None:
        if self.attempts < 1 or self.base < 0 or self.cap < 0 or not 0 <= self.jitter <= 1:
            raise ConfigError(
                "RetryPolicy needs attempts >= 1, base/cap >= 0 and 0 <= jitter <= 1", rule="settings"
            )

    def backoff(self, attempt: int, rand: Callable[[], float] = random.random) -> float:
        """Seconds to wait after failed attempt number `attempt` (1-based)."""
        d = min(self.cap, self.base * (2 ** (attempt - 1)))
        return d * (1.0 - self.jitter * rand())

    @staticmethod
    def retry_after(value: str | None, now: float | None = None) -> float | None:
        """Seconds from a Retry-After header (delta-seconds or HTTP-date); None if unreadable."""
        return retry_after_seconds(value, now)


def _never_sent(exc: Exception) -> bool:
    """True when the request surely did not reach the server (connecting failed)."""
    if isinstance(exc, requests.ConnectTimeout):
        return True
    text = repr(exc)
    return isinstance(exc, requests.ConnectionError) and any(
        marker in text for marker in ("NewConnectionError", "ConnectionRefusedError", "NameResolutionError")
    )


class FhirClient:
    """A FHIR REST client for one server base URL. Thread-safe if the session is."""

    def __init__(
        self,
        base_url: str,
        *,
        session: requests.Session | None = None,
        auth: Auth | None = None,
        timeout: float | tuple[float, float] = (5, 30),
        retry: RetryPolicy | None = None,
        sleep: Callable[[float], None] = time.sleep,
        user_agent: str = f"fhir-kap/{_VERSION}",
        rand: Callable[[], float] = random.random,
    ) -> None:
        if not isinstance(base_url, str) or not base_url.startswith(("http://", "https://")):
            raise ConfigError("FHIR base URL must start with http:// or https://", rule="settings")
        self.base_url = base_url.rstrip("/")
        self.session = session or requests.Session()
        self.auth: Auth = auth or NoAuth()
        self.timeout = timeout
        self.retry = retry or RetryPolicy()
        self._sleep = sleep
        self._rand = rand
        self.user_agent = user_agent
        self._caps: Capabilities | None = None
        self._origin = urlsplit(self.base_url)[:2]
        # Proxy / CA settings from the environment, read once: requests would rescan os.environ
        # on every call, which costs more CPU than the rest of a request together.
        self._send_kw = self.session.merge_environment_settings(self.base_url, {}, None, None, None)

    def __repr__(self) -> str:
        return f"FhirClient({self.base_url!r}, auth={self.auth!r})"

    # ---- plumbing

    def _url(self, path: str) -> str:
        if path.startswith(("http://", "https://")):
            return path
        return f"{self.base_url}/{path.lstrip('/')}" if path else self.base_url

    def _headers(
        self, extra: Mapping[str, str | None] | None = None, *, body: bool = False
    ) -> dict[str, str]:
        h = {"Accept": FHIR_JSON, "User-Agent": self.user_agent}
        if body:
            h["Content-Type"] = f"{FHIR_JSON}; charset=utf-8"
        if extra:
            h.update({k: v for k, v in extra.items() if v is not None})
        return h

    def _request(
        self,
        method: str,
        path: str,
        what: str,
        *,
        params: Any = None,
        body: Any = None,
        headers: Mapping[str, str | None] | None = None,
        idempotent: bool = True,
    ) -> requests.Response:
        """Send with auth, timeout and retries; return a 2xx response or raise ServerError."""
        url = self._url(path)
        if urlsplit(url)[:2] != self._origin:
            # never send credentials to another host (a hostile `next` link, say)
            raise ServerError(
                f"{method} {what}: refusing to follow a URL on another host",
                retryable=False,
                url=strip_query(url),
            )
        data = dumps(body) if body is not None else None
        retry_on = RETRY_STATUSES if idempotent else RETRY_STATUSES_UNSAFE
        renewed = False
        attempt = 0
        while True:
            attempt += 1
            hdrs = self._headers(headers, body=data is not None)
            self.auth.apply(self.session, hdrs, base_url=self.base_url, timeout=self.timeout)
            try:
                prepared = self.session.prepare_request(
                    requests.Request(method, url, params=params, data=data, headers=hdrs)
                )
                resp = self.session.send(
                    prepared, timeout=self.timeout, allow_redirects=False, **self._send_kw
                )
                if resp.status_code < 300:
                    _ = resp.content  # read the body now so a reset mid-body is retried here
                    log.debug("%s %s -> %s (attempt %d)", method, what, resp.status_code, attempt)
                    return resp
            except requests.exceptions.SSLError as exc:
                # a certificate problem does not heal by itself: fail now, name the cause
                raise ServerError(
                    f"{method} {what}: TLS failure ({type(exc).__name__})",
                    retryable=False,
                    url=strip_query(url),
                ) from None
            except (
                requests.ConnectionError,
                requests.Timeout,
                requests.exceptions.ChunkedEncodingError,
            ) as exc:
                retry_ok = idempotent or _never_sent(exc)
                if retry_ok and attempt < self.retry.attempts:
                    wait = self.retry.backoff(attempt, self._rand)
                    log.warning(
                        "%s %s: %s, retrying in %.2f s (attempt %d/%d)",
                        method,
                        what,
                        type(exc).__name__,
                        wait,
                        attempt,
                        self.retry.attempts,
                    )
                    self._sleep(wait)
                    continue
                raise ServerError(
                    f"{method} {what}: could not complete the request "
                    f"({type(exc).__name__}) after {attempt} attempt(s)",
                    retryable=True,
                    url=strip_query(url),
                ) from None
            status = resp.status_code
            if 300 <= status < 400:
                # never followed: it would re-send the body and credentials elsewhere
                resp.close()
                raise redirect_error(method, what, resp, url)
            if status == 401 and not renewed and self.auth.invalidate():
                renewed = True
                log.info("%s %s: 401, renewing credentials once", method, what)
                attempt -= 1
                continue
            if status in retry_on:
                wait = self.retry.backoff(attempt, self._rand)
                after = RetryPolicy.retry_after(resp.headers.get("Retry-After"))
                if after is not None:
                    if after > self.retry.max_retry_after:
                        raise status_error(
                            method, what, resp, retryable=True, note=f" (Retry-After {after:.0f} s)"
                        )
                    wait = after
                if attempt < self.retry.attempts:
                    log.warning(
                        "%s %s: %s, retrying in %.2f s (attempt %d/%d)",
                        method,
                        what,
                        status,
                        wait,
                        attempt,
                        self.retry.attempts,
                    )
                    self._sleep(wait)
                    continue
            raise status_error(
                method,
                what,
                resp,
                retryable=status in RETRY_STATUSES,
                note=f" after {attempt} attempts" if status in retry_on and attempt > 1 else "",
            )

    def _json(self, resp: requests.Response, method: str, what: str) -> Any:
        return json_body(resp, method, what)

    # ---- capabilities

    def capabilities(self, *, refresh: bool = False) -> Capabilities:
        """The server's Capabilities from `GET [base]/metadata` (cached after the first call)."""
        if self._caps is None or refresh:
            resp = self._request("GET", "metadata", "metadata")
            self._caps = parse_capabilities(
                self._json(resp, "GET", "metadata") or {}, content_type=resp.headers.get("Content-Type")
            )
            log.info(
                "server %s: FHIR %s, %d resource types",
                self.base_url,
                self._caps.fhir_version.value,
                len(self._caps.resources),
            )
        return self._caps

    def preflight(
        self,
        resource_types: Iterable[str],
        *,
        interactions: Sequence[str] = ("create",),
        conditional_create: bool = True,
        transaction: bool = False,
        release: Release | None = None,
    ) -> Capabilities:
        """Check that the server can do what is needed; raise ServerError naming every gap."""
        caps = self.capabilities()
        missing: list[str] = []
        if release is not None and caps.fhir_version is not release:
            missing.append(f"FHIR {release.value} needed but the server speaks {caps.fhir_version.value}")
        for rtype in resource_types:
            if rtype not in caps.resources:
                missing.append(f"resource type {rtype} not supported")
                continue
            lacking = [i for i in interactions if not caps.supports(rtype, i)]
            if lacking:
                missing.append(f"{rtype} lacks interaction(s) {', '.join(lacking)}")
            if conditional_create and rtype not in caps.conditional_create:
                missing.append(f"{rtype} lacks conditional create (If-None-Exist)")
        if transaction and not caps.transaction:
            missing.append("transaction Bundles not supported")
        if missing:
            raise ServerError(
                f"Server {self.base_url} cannot be used: " + "; ".join(missing),
                retryable=False,
                url=f"{self.base_url}/metadata",
            )
        return caps

    # ---- instance and type interactions

    def create(
        self,
        resource: dict[str, Any],
        *,
        if_none_exist: str | None = None,
        prefer: str = "return=representation",
    ) -> WriteResult:
        """POST a resource. With `if_none_exist` (e.g. `identifier_query(resource)`) the server
        creates it only if nothing matches: 201 created, 200 = the existing match (created=False);
        several matches is a 412 ServerError. Only conditional creates are retried after a
        failure that may have reached the server."""
        rtype = _require_resource(resource, "create")
        resp = self._request(
            "POST",
            rtype,
            rtype,
            body=resource,
            headers={"If-None-Exist": if_none_exist, "Prefer": prefer},
            idempotent=bool(if_none_exist),
        )
        return _write_result(
            resp.status_code,
            self._json(resp, "POST", rtype),
            resp.headers.get("Location"),
            resp.headers.get("ETag"),
        )

    def update(
        self, resource: dict[str, Any], *, if_match: str | None = None, prefer: str = "return=representation"
    ) -> WriteResult:
        """PUT a resource at its id. `if_match` is a version ("3") or an ETag ('W/"3"'); a stale
        one gives a ServerError with status 412."""
        rtype = _require_resource(resource, "update")
        rid = resource.get("id")
        if not isinstance(rid, str) or not rid:
            raise InputError(
                "update needs the resource's id",
                pointer="/id",
                expression=f"{rtype}.id",
                rule="fhir:update-id",
            )
        if if_match is not None and not if_match.startswith(("W/", '"')):
            if_match = f'W/"{if_match}"'
        what = f"{rtype}/{rid}"
        resp = self._request(
            "PUT",
            f"{rtype}/{quote(rid, safe='')}",
            what,
            body=resource,
            headers={"If-Match": if_match, "Prefer": prefer},
        )
        return _write_result(
            resp.status_code,
            self._json(resp, "PUT", what),
            resp.headers.get("Location"),
            resp.headers.get("ETag"),
        )

    def read(self, resource_type: str, id: str) -> dict[str, Any]:
        """GET [base]/Type/id."""
        what = f"{resource_type}/{id}"
        resp = self._request("GET", f"{resource_type}/{quote(id, safe='')}", what)
        return self._json(resp, "GET", what)

    def vread(self, resource_type: str, id: str, version: str) -> dict[str, Any]:
        """GET [base]/Type/id/_history/version."""
        what = f"{resource_type}/{id}/_history/{version}"
        resp = self._request(
            "GET", f"{resource_type}/{quote(id, safe='')}/_history/{quote(str(version), safe='')}", what
        )
        return self._json(resp, "GET", what)

    def delete(self, resource_type: str, id: str) -> int:
        """DELETE [base]/Type/id; returns the status (200/202/204)."""
        what = f"{resource_type}/{id}"
        return self._request("DELETE", f"{resource_type}/{quote(id, safe='')}", what).status_code

    def conditional_read(self, resource_type: str, query: str) -> list[dict[str, Any]]:
        """The resources matching `GET [base]/Type?query` on the first page (search mode `match`),
        with `query` already URL-encoded, e.g. `identifier_query(resource)`: the same condition an
        `If-None-Exist` header carries. Delivery uses it to find what a create it could not read
        the answer of has stored."""
        what = f"{resource_type} search"
        resp = self._request("GET", f"{resource_type}?{query}", what)
        page = self._json(resp, "GET", what) or {}
        if not isinstance(page, dict) or page.get("resourceType") != "Bundle":
            raise ServerError(
                f"GET {what}: the server did not answer with a Bundle",
                status=resp.status_code,
                retryable=False,
                url=f"{self.base_url}/{resource_type}",
            )
        return [
            entry["resource"]
            for entry in page.get("entry") or []
            if isinstance(entry, dict)
            and (entry.get("search") or {}).get("mode", "match") == "match"
            and isinstance(entry.get("resource"), dict)
        ]

    def search_bundle(
        self, resource_type: str, params: Mapping[str, str] | Sequence[tuple[str, str]]
    ) -> dict[str, Any]:
        """The first searchset Bundle of GET [base]/Type?params."""
        what = f"{resource_type} search"
        resp = self._request("GET", resource_type, what, params=params)
        return self._json(resp, "GET", what)

    def search(
        self,
        resource_type: str,
        params: Mapping[str, str] | Sequence[tuple[str, str]],
        *,
        max_pages: int = 10_000,
    ) -> Iterator[dict[str, Any]]:
        """Every matching resource (search mode `match`), following `next` links to the end.

        A `next` link seen before (a loop) or on another host raises ServerError."""
        what = f"{resource_type} search"
        page = self.search_bundle(resource_type, params)
        seen: set[str] = set()
        for _ in range(max_pages):
            for entry in page.get("entry") or []:
                mode = (entry.get("search") or {}).get("mode", "match")
                if mode == "match" and isinstance(entry.get("resource"), dict):
                    yield entry["resource"]
            nxt = next(
                (
                    link.get("url")
                    for link in page.get("link") or []
                    if link.get("relation") == "next" and link.get("url")
                ),
                None,
            )
            if not nxt:
                return
            if nxt in seen:
                raise ServerError(
                    f"GET {what}: the server's next links loop (page {len(seen) + 1} "
                    "points back to an earlier page)",
                    retryable=False,
                    url=strip_query(self._url(nxt)),
                )
            seen.add(nxt)
            resp = self._request("GET", nxt, what)
            page = self._json(resp, "GET", what) or {}
        raise ServerError(
            f"GET {what}: more than {max_pages} pages",
            retryable=False,
            url=f"{self.base_url}/{resource_type}",
        )

    # ---- bundles

    def _post_bundle(self, bundle: dict[str, Any], kind: str, prefer: str | None) -> dict[str, Any]:
        if (
            not isinstance(bundle, dict)
            or bundle.get("resourceType") != "Bundle"
            or bundle.get("type") != kind
        ):
            raise InputError(
                f"{kind} needs a Bundle of type '{kind}'",
                pointer="/type",
                expression="Bundle.type",
                rule="fhir:bundle-type",
            )
        resp = self._request(
            "POST", "", kind, body=bundle, headers={"Prefer": prefer}, idempotent=_bundle_idempotent(bundle)
        )
        out = self._json(resp, "POST", kind)
        if not isinstance(out, dict) or out.get("type") != f"{kind}-response":
            raise ServerError(
                f"POST {kind}: the server did not answer with a {kind}-response Bundle",
                status=resp.status_code,
                retryable=False,
                url=self.base_url,
            )
        return out

    def transaction(self, bundle: dict[str, Any], *, prefer: str | None = None) -> dict[str, Any]:
        """POST a transaction Bundle to [base] (all or nothing); returns the transaction-response.

        `prefer="return=minimal"` asks for entries without resources (ids and versions still
        come in each entry's location/etag; see entry_results)."""
        return self._post_bundle(bundle, "transaction", prefer)

    def batch(self, bundle: dict[str, Any], *, prefer: str | None = None) -> dict[str, Any]:
        """POST a batch Bundle to [base]; entries succeed or fail one by one (see entry_results)."""
        return self._post_bundle(bundle, "batch", prefer)

    def raw(self, method: str, path: str, **kw: Any) -> requests.Response:
        """Escape hatch for conformance checks: auth and timeout applied, no retries, no error
        mapping, and no redirect followed (a 3xx comes back as it is, for the check to see).
        `headers` in kw override the defaults."""
        hdrs = self._headers(kw.pop("headers", None))
        self.auth.apply(self.session, hdrs, base_url=self.base_url, timeout=self.timeout)
        kw.setdefault("timeout", self.timeout)
        kw["allow_redirects"] = False
        return self.session.request(method, self._url(path), headers=hdrs, **kw)
