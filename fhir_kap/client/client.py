"""FHIR REST client over an injected `requests.Session` (the only module that imports `requests`).

What it adds to plain HTTP:
  * capability preflight from `GET /metadata` (R4 or R5, types, interactions, conditional
    create/update, transaction/batch), refusing early with a message naming what is missing;
  * auth: none, static bearer, SMART Backend Services (client secret or `private_key_jwt`),
    tokens cached and renewed before expiry, renewed once on a 401;
  * conditional create with the `If-None-Exist` *header*, update with `If-Match`, read/vread/
    delete, search that follows `next` links, transaction and batch Bundles;
  * a timeout on every call; retries with exponential backoff and jitter for connection errors,
    timeouts, 429 (honouring `Retry-After`) and 502/503/504 -- never for other statuses;
  * every server failure is one `ServerError` carrying the server's OperationOutcome.

Messages and logs name the method, resource type, status and ids -- never bodies, query
strings (they hold business identifiers), tokens or secrets.
"""
from __future__ import annotations

import base64
import logging
import random
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import quote, urlsplit, urlunsplit

import requests

from ..config import Release
from ..fhir.retry import RETRY_STATUSES, RETRY_STATUSES_UNSAFE, retry_after_seconds
from ..errors import ConfigError, InputError, ServerError
from ..fhir.identifiers import business_identifier
from ..jsonio import dumps, loads

__all__ = [
    "Auth",
    "BearerAuth",
    "Capabilities",
    "FhirClient",
    "NoAuth",
    "RetryPolicy",
    "SmartBackendAuth",
    "WriteResult",
    "entry_results",
    "identifier_query",
    "parse_capabilities",
    "transaction_bundle",
]

log = logging.getLogger("fhir_kap.client")

FHIR_JSON = "application/fhir+json"
JWT_BEARER = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
TOKEN_EXPIRY_MARGIN = 60.0  # seconds: renew this early (or 10% of the lifetime, if shorter)

try:  # the installed distribution's version; a bare checkout falls back to the source version
    from importlib.metadata import version as _dist_version

    _VERSION = _dist_version("fhir-kap")
except ImportError:  # pragma: no cover - not installed (PackageNotFoundError is one)
    _VERSION = "0.1.0"


# --------------------------------------------------------------------------- capabilities

@dataclass(frozen=True)
class Capabilities:
    """What a server says it can do (from its CapabilityStatement)."""

    fhir_version: Release
    software: str | None
    resources: Mapping[str, frozenset[str]]
    conditional_create: frozenset[str]
    conditional_update: frozenset[str]
    transaction: bool
    batch: bool
    formats: frozenset[str]
    raw: dict[str, Any] = field(repr=False, compare=False)

    def supports(self, resource_type: str, interaction: str) -> bool:
        """True when `resource_type` lists `interaction` ("create", "read", "search-type", ...)."""
        return interaction in self.resources.get(resource_type, frozenset())


def _release_of(version: str | None) -> Release:
    v = (version or "").strip()
    if v == "4.0" or v.startswith("4.0."):
        return Release.R4
    if v == "5.0" or v.startswith("5.0."):
        return Release.R5
    raise ServerError(f"Server speaks an unsupported FHIR version '{v[:20] or 'none given'}' "
                      "(fhir-kap speaks 4.0.x = R4 and 5.0.x = R5)", retryable=False)


def _mime_fhir_version(content_type: str | None) -> str | None:
    """The `fhirVersion` MIME parameter (`application/fhir+json; fhirVersion=5.0`), if any."""
    for part in (content_type or "").split(";")[1:]:
        key, _, value = part.strip().partition("=")
        if key.strip().lower() == "fhirversion":
            return value.strip().strip('"')
    return None


def parse_capabilities(cs: Mapping[str, Any], *, content_type: str | None = None) -> Capabilities:
    """Read a CapabilityStatement into `Capabilities`.

    The release comes from `fhirVersion`; when absent, from the `fhirVersion` MIME parameter
    of the response. Anything but 4.0.x / 5.0.x raises ServerError (not retryable).
    """
    if not isinstance(cs, Mapping) or cs.get("resourceType") != "CapabilityStatement":
        raise ServerError("GET metadata: the server did not answer with a CapabilityStatement",
                          retryable=False)
    release = _release_of(cs.get("fhirVersion") or _mime_fhir_version(content_type))
    resources: dict[str, frozenset[str]] = {}
    cond_create: set[str] = set()
    cond_update: set[str] = set()
    system: set[str] = set()
    for rest in cs.get("rest") or []:
        if not isinstance(rest, Mapping) or rest.get("mode", "server") != "server":
            continue
        system |= {str(i.get("code")) for i in rest.get("interaction") or [] if isinstance(i, Mapping)}
        for res in rest.get("resource") or []:
            if not isinstance(res, Mapping) or not isinstance(res.get("type"), str):
                continue
            rtype = res["type"]
            codes = frozenset(str(i.get("code")) for i in res.get("interaction") or []
                              if isinstance(i, Mapping) and i.get("code"))
            resources[rtype] = resources.get(rtype, frozenset()) | codes
            if res.get("conditionalCreate") is True:
                cond_create.add(rtype)
            if res.get("conditionalUpdate") is True:
                cond_update.add(rtype)
    sw: Mapping[str, Any] = cs["software"] if isinstance(cs.get("software"), Mapping) else {}
    software = " ".join(str(x) for x in (sw.get("name"), sw.get("version")) if x) or None
    return Capabilities(
        fhir_version=release, software=software, resources=resources,
        conditional_create=frozenset(cond_create), conditional_update=frozenset(cond_update),
        transaction="transaction" in system, batch="batch" in system,
        formats=frozenset(str(f) for f in cs.get("format") or []), raw=dict(cs))


# --------------------------------------------------------------------------- results

@dataclass(frozen=True)
class WriteResult:
    """Outcome of a create/update (or of one transaction entry)."""

    status: int
    id: str | None
    version_id: str | None
    location: str | None
    created: bool
    # kept out of repr: a logged WriteResult must not carry patient data
    resource: dict[str, Any] | None = field(repr=False)
    outcome: dict[str, Any] | None = field(repr=False)


def _parse_location(location: str | None) -> tuple[str | None, str | None]:
    """(id, version) from `.../Type/id/_history/v` or `.../Type/id`."""
    if not location:
        return None, None
    parts = [p for p in urlsplit(location).path.split("/") if p]
    if len(parts) >= 4 and parts[-2] == "_history":
        return parts[-3], parts[-1]
    if len(parts) >= 2:
        return parts[-1], None
    return None, None


def _etag_version(etag: str | None) -> str | None:
    if not etag:
        return None
    e = etag.strip()
    e = e.removeprefix("W/")
    return e.strip('"') or None


def _write_result(status: int, body: Any, location: str | None, etag: str | None) -> WriteResult:
    resource = outcome = None
    if isinstance(body, dict):
        if body.get("resourceType") == "OperationOutcome":
            outcome = body
        else:
            resource = body
    rid, vid = _parse_location(location)
    if resource is not None:
        rid = resource.get("id") or rid
        vid = (resource.get("meta") or {}).get("versionId") or vid
    vid = vid or _etag_version(etag)
    return WriteResult(status=status, id=rid, version_id=vid, location=location,
                       created=status == 201, resource=resource, outcome=outcome)


def entry_results(response_bundle: Mapping[str, Any]) -> list[WriteResult]:
    """One WriteResult per entry of a transaction-/batch-response Bundle, in request order.

    `status` is the entry's HTTP status (a batch entry may fail alone: status >= 400, with the
    server's OperationOutcome in `outcome`).
    """
    out = []
    for entry in response_bundle.get("entry") or []:
        resp = entry.get("response") or {}
        try:
            status = int(str(resp.get("status", "0")).split()[0])
        except ValueError:
            status = 0
        body = entry.get("resource")
        res = _write_result(status, body, resp.get("location"), resp.get("etag"))
        if resp.get("outcome") and res.outcome is None:
            res = WriteResult(res.status, res.id, res.version_id, res.location, res.created,
                              res.resource, resp["outcome"])
        out.append(res)
    return out


# --------------------------------------------------------------------------- retry policy

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
            raise ConfigError("RetryPolicy needs attempts >= 1, base/cap >= 0 and 0 <= jitter <= 1",
                              rule="settings")

    def backoff(self, attempt: int, rand: Callable[[], float] = random.random) -> float:
        """Seconds to wait after failed attempt number `attempt` (1-based)."""
        d = min(self.cap, self.base * (2 ** (attempt - 1)))
        return d * (1.0 - self.jitter * rand())

    @staticmethod
    def retry_after(value: str | None, now: float | None = None) -> float | None:
        """Seconds from a Retry-After header (delta-seconds or HTTP-date); None if unreadable."""
        return retry_after_seconds(value, now)


# --------------------------------------------------------------------------- auth

class Auth(Protocol):
    """Adds credentials to a request. `invalidate()` drops cached credentials after a 401 and
    says whether trying again with fresh ones makes sense."""

    def apply(self, session: requests.Session, headers: MutableMapping[str, str], *,
              base_url: str, timeout: float | tuple[float, float]) -> None: ...

    def invalidate(self) -> bool: ...


class NoAuth:
    """No credentials."""

    def apply(self, session: requests.Session, headers: MutableMapping[str, str], *,
              base_url: str, timeout: float | tuple[float, float]) -> None:
        return None

    def invalidate(self) -> bool:
        return False


class BearerAuth:
    """A static bearer token (its value never appears in repr, messages or logs)."""

    def __init__(self, token: str) -> None:
        if not token or not isinstance(token, str):
            raise ConfigError("Bearer auth needs a non-empty token", rule="auth")
        self._token = token

    def __repr__(self) -> str:
        return "BearerAuth(token=***)"

    def apply(self, session: requests.Session, headers: MutableMapping[str, str], *,
              base_url: str, timeout: float | tuple[float, float]) -> None:
        headers["Authorization"] = f"Bearer {self._token}"

    def invalidate(self) -> bool:
        return False  # a static token does not get better by asking again


class SmartBackendAuth:
    """SMART Backend Services (client_credentials): client secret or private_key_jwt.

    The token endpoint is `token_url`, or discovered from `{base}/.well-known/smart-configuration`
    on first use. With `client_secret` the client authenticates with HTTP Basic
    (client_secret_basic); with `private_key_pem` it signs a fresh assertion each time
    (iss = sub = client_id, aud = token endpoint, exp <= 5 min, new jti, `kid` header).
    The access token is cached and renewed 60 s (or 10% of its lifetime, if shorter) before it
    expires, and renewed once when the server answers 401. `clock` (seconds) drives only that
    cache, so tests can move it; assertion claims always use the system time.
    """

    ASSERTION_LIFETIME = 240  # seconds; SMART allows at most 300, leave room for clock skew

    def __init__(self, client_id: str, *, token_url: str | None = None, client_secret: str | None = None,
                 private_key_pem: bytes | None = None, key_id: str | None = None, alg: str = "RS384",
                 scope: str = "system/*.read system/*.write",
                 clock: Callable[[], float] = time.time) -> None:
        if not client_id:
            raise ConfigError("SMART auth needs a client_id", rule="auth")
        if (client_secret is None) == (private_key_pem is None):
            raise ConfigError(f"SMART client '{client_id}': give exactly one of client_secret or "
                              "private_key_pem", rule="auth")
        if alg not in ("RS384", "ES384"):
            raise ConfigError(f"SMART client '{client_id}': alg must be RS384 or ES384, not '{alg}'",
                              rule="auth")
        self.client_id = client_id
        self.token_url = token_url
        self.scope = scope
        self.alg = alg
        self.key_id = key_id
        self._secret = client_secret
        self._key: Any = None
        if private_key_pem is not None:
            if not key_id:
                raise ConfigError(f"SMART client '{client_id}': private_key_jwt needs key_id (the "
                                  "'kid' of the registered public key)", rule="auth")
            self._key = _load_private_key(private_key_pem, alg, client_id)
        self._clock = clock
        self._lock = threading.Lock()
        self._token: str | None = None
        self._renew_at = 0.0
        self.token_requests = 0  # how many tokens were fetched (observability, tests)

    def __repr__(self) -> str:
        kind = "private_key_jwt" if self._key is not None else "client_secret"
        return f"SmartBackendAuth(client_id={self.client_id!r}, method={kind})"

    def apply(self, session: requests.Session, headers: MutableMapping[str, str], *,
              base_url: str, timeout: float | tuple[float, float]) -> None:
        with self._lock:
            if self._token is None or self._clock() >= self._renew_at:
                self._fetch(session, base_url, timeout)
            headers["Authorization"] = f"Bearer {self._token}"

    def invalidate(self) -> bool:
        with self._lock:
            self._token = None
        return True

    def _discover(self, session: requests.Session, base_url: str, timeout: Any) -> str:
        url = f"{base_url}/.well-known/smart-configuration"
        try:
            resp = session.get(url, headers={"Accept": "application/json"}, timeout=timeout)
        except requests.RequestException as exc:
            raise ServerError(f"GET .well-known/smart-configuration: could not reach server "
                              f"({type(exc).__name__})", retryable=True, url=url) from None
        if resp.status_code != 200:
            raise _status_error("GET", ".well-known/smart-configuration", resp)
        doc = _json_body(resp, "GET", ".well-known/smart-configuration")
        endpoint = doc.get("token_endpoint") if isinstance(doc, dict) else None
        if not isinstance(endpoint, str) or not endpoint.startswith(("https://", "http://")):
            raise ServerError("GET .well-known/smart-configuration: no token_endpoint in the answer",
                              retryable=False, url=url)
        return endpoint

    def _fetch(self, session: requests.Session, base_url: str, timeout: Any) -> None:
        if self.token_url is None:
            self.token_url = self._discover(session, base_url, timeout)
        form = {"grant_type": "client_credentials", "scope": self.scope}
        headers = {"Accept": "application/json"}
        if self._key is not None:
            form["client_assertion_type"] = JWT_BEARER
            form["client_assertion"] = self._assertion()
        else:
            # RFC 6749 2.3.1: form-urlencode both parts before Basic encoding
            raw = f"{quote(self.client_id, safe='')}:{quote(self._secret or '', safe='')}"
            headers["Authorization"] = "Basic " + base64.b64encode(raw.encode()).decode()
        started = self._clock()
        try:
            resp = session.post(self.token_url, data=form, headers=headers, timeout=timeout)
        except requests.RequestException as exc:
            raise ServerError(f"POST token endpoint: could not reach server ({type(exc).__name__})",
                              retryable=True, url=_strip_query(self.token_url)) from None
        self.token_requests += 1
        if resp.status_code != 200:
            raise _token_error(resp, self.client_id)
        doc = _json_body(resp, "POST", "token endpoint")
        token = doc.get("access_token") if isinstance(doc, dict) else None
        if not isinstance(token, str) or not token:
            raise ServerError("POST token endpoint: answer has no access_token", status=resp.status_code,
                              retryable=False, url=_strip_query(self.token_url))
        try:
            lifetime = float(doc.get("expires_in", 300))
        except (TypeError, ValueError):
            lifetime = 300.0
        self._token = token
        self._renew_at = started + lifetime - min(TOKEN_EXPIRY_MARGIN, lifetime * 0.1)
        log.info("SMART token obtained for client %s (expires in %.0f s)", self.client_id, lifetime)

    def _assertion(self) -> str:
        import jwt  # PyJWT; only needed for private_key_jwt

        now = int(time.time())  # the token server checks these against real time, not self._clock
        claims = {"iss": self.client_id, "sub": self.client_id, "aud": self.token_url,
                  "iat": now, "exp": now + self.ASSERTION_LIFETIME, "jti": uuid.uuid4().hex}
        return jwt.encode(claims, self._key, algorithm=self.alg,
                          headers={"kid": self.key_id, "typ": "JWT"})


def _load_private_key(pem: bytes, alg: str, client_id: str) -> Any:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"SMART client '{client_id}': private key is not an unencrypted PEM key "
                          f"({type(exc).__name__})", rule="auth") from None
    wanted = rsa.RSAPrivateKey if alg == "RS384" else ec.EllipticCurvePrivateKey
    if not isinstance(key, wanted):
        raise ConfigError(f"SMART client '{client_id}': alg {alg} needs an "
                          f"{'RSA' if alg == 'RS384' else 'EC P-384'} private key", rule="auth")
    return key


def _token_error(resp: requests.Response, client_id: str) -> ServerError:
    error = desc = ""
    try:
        doc = resp.json()
        if isinstance(doc, dict):
            error = str(doc.get("error") or "")[:60]
            desc = str(doc.get("error_description") or "")[:200]
    except ValueError:
        pass
    detail = f" — {error}: {desc}" if error or desc else ""
    return ServerError(f"POST token endpoint for client {client_id}: {resp.status_code} "
                       f"{resp.reason or ''}".rstrip() + detail,
                       status=resp.status_code, retryable=resp.status_code in RETRY_STATUSES,
                       url=_strip_query(resp.url or ""))


# --------------------------------------------------------------------------- errors

def _strip_query(url: str) -> str:
    s = urlsplit(url)
    return urlunsplit((s.scheme, s.netloc, s.path, "", ""))


def _never_sent(exc: Exception) -> bool:
    """True when the request surely did not reach the server (connecting failed)."""
    if isinstance(exc, requests.ConnectTimeout):
        return True
    text = repr(exc)
    return isinstance(exc, requests.ConnectionError) and any(
        marker in text for marker in ("NewConnectionError", "ConnectionRefusedError", "NameResolutionError"))


def _json_body(resp: requests.Response, method: str, what: str) -> Any:
    if not resp.content:
        return None
    try:
        return loads(resp.content, source="response")
    except InputError:
        ctype = (resp.headers.get("Content-Type") or "unknown").split(";")[0]
        raise ServerError(f"{method} {what}: {resp.status_code} answer is not JSON ({ctype})",
                          status=resp.status_code, retryable=False,
                          url=_strip_query(resp.url or "")) from None


def _status_error(method: str, what: str, resp: requests.Response, *,
                  retryable: bool | None = None, note: str = "") -> ServerError:
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
    return ServerError(summary, status=status, remote_outcome=outcome, retryable=retryable,
                       url=_strip_query(resp.url or ""),
                       retry_after=RetryPolicy.retry_after(resp.headers.get("Retry-After")))


# --------------------------------------------------------------------------- client

def _require_resource(resource: Any, what: str) -> str:
    if not isinstance(resource, dict) or not isinstance(resource.get("resourceType"), str) \
            or not resource["resourceType"].isalpha():
        raise InputError(f"{what} needs a FHIR resource (a JSON object with resourceType)",
                         pointer="/resourceType", expression="resourceType", rule="fhir:resourceType")
    return resource["resourceType"]


def _bundle_idempotent(bundle: Mapping[str, Any]) -> bool:
    """A Bundle may be re-sent safely when no entry is a plain (unconditional) POST."""
    for entry in bundle.get("entry") or []:
        req = entry.get("request") or {}
        if str(req.get("method", "")).upper() == "POST" and not req.get("ifNoneExist"):
            return False
    return True


class FhirClient:
    """A FHIR REST client for one server base URL. Thread-safe if the session is."""

    def __init__(self, base_url: str, *, session: requests.Session | None = None,
                 auth: Auth | None = None, timeout: float | tuple[float, float] = (5, 30),
                 retry: RetryPolicy | None = None, sleep: Callable[[float], None] = time.sleep,
                 user_agent: str = f"fhir-kap/{_VERSION}",
                 rand: Callable[[], float] = random.random) -> None:
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

    def _headers(self, extra: Mapping[str, str | None] | None = None, *, body: bool = False) -> dict[str, str]:
        h = {"Accept": FHIR_JSON, "User-Agent": self.user_agent}
        if body:
            h["Content-Type"] = f"{FHIR_JSON}; charset=utf-8"
        if extra:
            h.update({k: v for k, v in extra.items() if v is not None})
        return h

    def _request(self, method: str, path: str, what: str, *, params: Any = None,
                 body: Any = None, headers: Mapping[str, str | None] | None = None,
                 idempotent: bool = True) -> requests.Response:
        """Send with auth, timeout and retries; return a 2xx response or raise ServerError."""
        url = self._url(path)
        if urlsplit(url)[:2] != self._origin:
            # never send credentials to another host (a hostile `next` link, say)
            raise ServerError(f"{method} {what}: refusing to follow a URL on another host",
                              retryable=False, url=_strip_query(url))
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
                    requests.Request(method, url, params=params, data=data, headers=hdrs))
                resp = self.session.send(prepared, timeout=self.timeout, allow_redirects=True,
                                         **self._send_kw)
                if resp.status_code < 300:
                    _ = resp.content  # read the body now so a reset mid-body is retried here
                    log.debug("%s %s -> %s (attempt %d)", method, what, resp.status_code, attempt)
                    return resp
            except requests.exceptions.SSLError as exc:
                # a certificate problem does not heal by itself: fail now, name the cause
                raise ServerError(f"{method} {what}: TLS failure ({type(exc).__name__})",
                                  retryable=False, url=_strip_query(url)) from None
            except (requests.ConnectionError, requests.Timeout,
                    requests.exceptions.ChunkedEncodingError) as exc:
                retry_ok = idempotent or _never_sent(exc)
                if retry_ok and attempt < self.retry.attempts:
                    wait = self.retry.backoff(attempt, self._rand)
                    log.warning("%s %s: %s, retrying in %.2f s (attempt %d/%d)", method, what,
                                type(exc).__name__, wait, attempt, self.retry.attempts)
                    self._sleep(wait)
                    continue
                raise ServerError(f"{method} {what}: could not complete the request "
                                  f"({type(exc).__name__}) after {attempt} attempt(s)",
                                  retryable=True, url=_strip_query(url)) from None
            status = resp.status_code
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
                        raise _status_error(method, what, resp, retryable=True,
                                            note=f" (Retry-After {after:.0f} s)")
                    wait = after
                if attempt < self.retry.attempts:
                    log.warning("%s %s: %s, retrying in %.2f s (attempt %d/%d)", method, what,
                                status, wait, attempt, self.retry.attempts)
                    self._sleep(wait)
                    continue
            raise _status_error(method, what, resp,
                                retryable=status in RETRY_STATUSES,
                                note=f" after {attempt} attempts" if status in retry_on and attempt > 1 else "")

    def _json(self, resp: requests.Response, method: str, what: str) -> Any:
        return _json_body(resp, method, what)

    # ---- capabilities

    def capabilities(self, *, refresh: bool = False) -> Capabilities:
        """The server's Capabilities from `GET [base]/metadata` (cached after the first call)."""
        if self._caps is None or refresh:
            resp = self._request("GET", "metadata", "metadata")
            self._caps = parse_capabilities(self._json(resp, "GET", "metadata") or {},
                                            content_type=resp.headers.get("Content-Type"))
            log.info("server %s: FHIR %s, %d resource types", self.base_url,
                     self._caps.fhir_version.value, len(self._caps.resources))
        return self._caps

    def preflight(self, resource_types: Iterable[str], *, interactions: Sequence[str] = ("create",),
                  conditional_create: bool = True, transaction: bool = False,
                  release: Release | None = None) -> Capabilities:
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
            raise ServerError(f"Server {self.base_url} cannot be used: " + "; ".join(missing),
                              retryable=False, url=f"{self.base_url}/metadata")
        return caps

    # ---- instance and type interactions

    def create(self, resource: dict[str, Any], *, if_none_exist: str | None = None,
               prefer: str = "return=representation") -> WriteResult:
        """POST a resource. With `if_none_exist` (e.g. `identifier_query(resource)`) the server
        creates it only if nothing matches: 201 created, 200 = the existing match (created=False);
        several matches is a 412 ServerError. Only conditional creates are retried after a
        failure that may have reached the server."""
        rtype = _require_resource(resource, "create")
        resp = self._request("POST", rtype, rtype, body=resource,
                             headers={"If-None-Exist": if_none_exist, "Prefer": prefer},
                             idempotent=bool(if_none_exist))
        return _write_result(resp.status_code, self._json(resp, "POST", rtype),
                             resp.headers.get("Location"), resp.headers.get("ETag"))

    def update(self, resource: dict[str, Any], *, if_match: str | None = None,
               prefer: str = "return=representation") -> WriteResult:
        """PUT a resource at its id. `if_match` is a version ("3") or an ETag ('W/"3"'); a stale
        one gives a ServerError with status 412."""
        rtype = _require_resource(resource, "update")
        rid = resource.get("id")
        if not isinstance(rid, str) or not rid:
            raise InputError("update needs the resource's id", pointer="/id", expression=f"{rtype}.id",
                             rule="fhir:update-id")
        if if_match is not None and not if_match.startswith(("W/", '"')):
            if_match = f'W/"{if_match}"'
        what = f"{rtype}/{rid}"
        resp = self._request("PUT", f"{rtype}/{quote(rid, safe='')}", what, body=resource,
                             headers={"If-Match": if_match, "Prefer": prefer})
        return _write_result(resp.status_code, self._json(resp, "PUT", what),
                             resp.headers.get("Location"), resp.headers.get("ETag"))

    def read(self, resource_type: str, id: str) -> dict[str, Any]:
        """GET [base]/Type/id."""
        what = f"{resource_type}/{id}"
        resp = self._request("GET", f"{resource_type}/{quote(id, safe='')}", what)
        return self._json(resp, "GET", what)

    def vread(self, resource_type: str, id: str, version: str) -> dict[str, Any]:
        """GET [base]/Type/id/_history/version."""
        what = f"{resource_type}/{id}/_history/{version}"
        resp = self._request("GET", f"{resource_type}/{quote(id, safe='')}/_history/"
                             f"{quote(str(version), safe='')}", what)
        return self._json(resp, "GET", what)

    def delete(self, resource_type: str, id: str) -> int:
        """DELETE [base]/Type/id; returns the status (200/202/204)."""
        what = f"{resource_type}/{id}"
        return self._request("DELETE", f"{resource_type}/{quote(id, safe='')}", what).status_code

    def search_bundle(self, resource_type: str,
                      params: Mapping[str, str] | Sequence[tuple[str, str]]) -> dict[str, Any]:
        """The first searchset Bundle of GET [base]/Type?params."""
        what = f"{resource_type} search"
        resp = self._request("GET", resource_type, what, params=params)
        return self._json(resp, "GET", what)

    def search(self, resource_type: str, params: Mapping[str, str] | Sequence[tuple[str, str]],
               *, max_pages: int = 10_000) -> Iterator[dict[str, Any]]:
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
            nxt = next((link.get("url") for link in page.get("link") or []
                        if link.get("relation") == "next" and link.get("url")), None)
            if not nxt:
                return
            if nxt in seen:
                raise ServerError(f"GET {what}: the server's next links loop (page {len(seen) + 1} "
                                  "points back to an earlier page)", retryable=False,
                                  url=_strip_query(self._url(nxt)))
            seen.add(nxt)
            resp = self._request("GET", nxt, what)
            page = self._json(resp, "GET", what) or {}
        raise ServerError(f"GET {what}: more than {max_pages} pages", retryable=False,
                          url=f"{self.base_url}/{resource_type}")

    # ---- bundles

    def _post_bundle(self, bundle: dict[str, Any], kind: str, prefer: str | None) -> dict[str, Any]:
        if not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle" \
                or bundle.get("type") != kind:
            raise InputError(f"{kind} needs a Bundle of type '{kind}'", pointer="/type",
                             expression="Bundle.type", rule="fhir:bundle-type")
        resp = self._request("POST", "", kind, body=bundle, headers={"Prefer": prefer},
                             idempotent=_bundle_idempotent(bundle))
        out = self._json(resp, "POST", kind)
        if not isinstance(out, dict) or out.get("type") != f"{kind}-response":
            raise ServerError(f"POST {kind}: the server did not answer with a {kind}-response Bundle",
                              status=resp.status_code, retryable=False, url=self.base_url)
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
        mapping. `headers` in kw override the defaults."""
        hdrs = self._headers(kw.pop("headers", None))
        self.auth.apply(self.session, hdrs, base_url=self.base_url, timeout=self.timeout)
        kw.setdefault("timeout", self.timeout)
        return self.session.request(method, self._url(path), headers=hdrs, **kw)


# --------------------------------------------------------------------------- helpers

def _search_escape(text: str) -> str:
    # FHIR search escaping: \ | , $ are special inside a token value
    for ch in ("\\", "|", ",", "$"):
        text = text.replace(ch, "\\" + ch)
    return text


def token_query(system: str, value: str, param: str = "identifier") -> str:
    """`identifier=SYSTEM|VALUE` with FHIR token escaping, URL-encoded (If-None-Exist or a query).

    >>> token_query("http://x/sid", "N 1")
    'identifier=http://x/sid|N%201'
    """
    return f"{param}=" + quote(_search_escape(system), safe=":/@") + "|" + quote(_search_escape(value), safe="")


def identifier_query(resource: Mapping[str, Any]) -> str | None:
    """`identifier=SYSTEM|VALUE` for the first business identifier with a system and a value
    (skipping `use: old`), URL-encoded for an If-None-Exist header or a query string.

    >>> identifier_query({"identifier": [{"system": "http://x.org/sid", "value": "A&B 1"}]})
    'identifier=http://x.org/sid|A%26B%201'
    """
    found = business_identifier(resource)
    return token_query(*found) if found else None


def _rewrite_references(node: Any, mapping: Mapping[str, str]) -> None:
    if isinstance(node, dict):
        ref = node.get("reference")
        if isinstance(ref, str) and ref in mapping:
            node["reference"] = mapping[ref]
        for value in node.values():
            if isinstance(value, (dict, list)):
                _rewrite_references(value, mapping)
    elif isinstance(node, list):
        for item in node:
            _rewrite_references(item, mapping)


def transaction_bundle(resources: Sequence[Mapping[str, Any]], *, conditional: bool = True,
                       new_uuid: Callable[[], str] = lambda: str(uuid.uuid4())) -> dict[str, Any]:
    """A transaction Bundle POSTing `resources` (copied, never changed in place).

    Each entry gets `fullUrl: urn:uuid:...`; literal references between the resources
    ("Patient/p1" where a resource is Patient with id p1) are rewritten to that urn so the server
    resolves them to the ids it assigns. With `conditional`, each entry whose resource has a
    business identifier gets `ifNoneExist` (see identifier_query): re-sending the Bundle does
    not duplicate anything.
    """
    copies = []
    mapping: dict[str, str] = {}
    for i, resource in enumerate(resources):
        rtype = _require_resource(resource, f"transaction_bundle entry {i}")
        copy = loads(dumps(resource))
        urn = f"urn:uuid:{new_uuid()}"
        if isinstance(copy.get("id"), str):
            mapping[f"{rtype}/{copy['id']}"] = urn
        copies.append((rtype, urn, copy))
    entries = []
    for rtype, urn, copy in copies:
        _rewrite_references(copy, mapping)
        copy.pop("id", None)  # the server assigns ids on POST
        request: dict[str, Any] = {"method": "POST", "url": rtype}
        query = identifier_query(copy) if conditional else None
        if query:
            request["ifNoneExist"] = query
        entries.append({"fullUrl": urn, "resource": copy, "request": request})
    return {"resourceType": "Bundle", "type": "transaction", "entry": entries}
