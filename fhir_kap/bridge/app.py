"""The app factory: services on `app.extensions["fhir_kap"]`, hooks, errors, JSON logs.

Nothing lives in module globals: `create_app(settings, options)` builds the database, store,
partners, validator, mapper, inbound pipeline and access rules, and the route modules reach
them through `services()`. Every error leaves as an OperationOutcome: a `KapError` with its
own HTTP status, a werkzeug HTTP error with its status, anything else as a 500 that names
only the request id (the details go to the log, without patient data).

Room: bridge/ (layer 4, entry point; the only Flask user): may import any room; nothing imports it but cli/.
"""

from __future__ import annotations

import logging
import re
import time
import traceback
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, date, datetime
from email.utils import format_datetime
from functools import lru_cache
from typing import Any

from flask import Flask, Response, g, request
from werkzeug.exceptions import HTTPException, NotAcceptable, UnsupportedMediaType
from werkzeug.sansio.utils import get_current_url

from .. import jsonio
from ..config import Release, Settings
from ..errors import Forbidden, Issue, KapError, Unauthorized, operation_outcome
from ..exchange.inbound import Inbound
from ..exchange.webhooks import Notifier
from ..storage.db import Database
from ..storage.partners import Partner, Partners
from ..storage.store import Store
from .access import Access

__all__ = [
    "BridgeOptions",
    "JsonLines",
    "Services",
    "create_app",
    "fhir_response",
    "outcome_response",
    "services",
]

log = logging.getLogger("fhir_kap.bridge")
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{8,64}$")
_HTTP_CODES = {
    400: "invalid",
    401: "login",
    403: "forbidden",
    404: "not-found",
    405: "not-supported",
    406: "not-supported",
    409: "conflict",
    410: "deleted",
    411: "required",
    412: "conflict",
    413: "too-long",
    414: "too-long",
    415: "not-supported",
    422: "processing",
    429: "throttled",
    431: "too-long",
}


@dataclass(frozen=True)
class BridgeOptions:
    """Bridge-only options (beside Settings).

    base_url: the public base of the FHIR facade (default: from the request, + "/fhir");
    read_purpose: the purpose of use partner reads are checked for (v3-ActReason);
    webhook_timeout: seconds per rest-hook call (on the notifier's background thread);
    auth_cache_seconds: how long a process keeps a token lookup and the partner list, which
    bounds how late a revocation made elsewhere (`fhir-kap partners revoke`) takes effect;
    bench_echo: add `/bench/echo` (parses JSON only);
    proxy_hops: how many fronts (TLS proxies) stand before the bridge, each appending to
    `X-Forwarded-For` and setting `X-Forwarded-Proto`: that many hops of those headers are
    believed (werkzeug's ProxyFix), so the console sees the client's address (its login throttle
    counts per address) and https (its same-origin check, Secure cookies). 0 (the default):
    the headers are ignored, since a client could write them itself.
    """

    base_url: str | None = None
    read_purpose: str = "TREAT"
    webhook_timeout: float = 5.0
    auth_cache_seconds: float = 5.0
    bench_echo: bool = False
    notify: bool = True
    proxy_hops: int = 0


@dataclass
class Services:
    settings: Settings
    options: BridgeOptions
    release: Release
    db: Database
    store: Store
    partners: Partners
    inbound: Inbound
    access: Access
    validator: Any
    mapper: Any
    inputs: Any
    outbox: Any
    audit: Any
    events: Any = None  # the Subscriptions event sink (bridge/subscriptions.py), when notifying


#: Issues an error answer lists at most (then one more saying how many were left out): a
#: 0.8 MB transaction whose every reference failed was answered with a 5.2 MB OperationOutcome.
MAX_ERROR_ISSUES = 100


def _bounded(exc: KapError) -> dict[str, Any]:
    """The error's OperationOutcome, its issues cut to the first `MAX_ERROR_ISSUES` (fatal and
    too-costly issues, which say why the whole request was refused, listed first)."""
    issues = list(exc.issues)
    if len(issues) <= MAX_ERROR_ISSUES:
        return exc.operation_outcome()
    issues.sort(key=lambda i: 0 if i.severity == "fatal" or i.code == "too-costly" else 1)  # stable
    left = len(issues) - MAX_ERROR_ISSUES
    note = Issue(
        "information",
        "informational",
        f"{left} more issue(s) not listed: the first {MAX_ERROR_ISSUES} are; fix those and send again",
        rule="http:issues-bounded",
    )
    return operation_outcome([*issues[:MAX_ERROR_ISSUES], note])


def services() -> Services:
    from flask import current_app

    return current_app.extensions["fhir_kap"]


def create_app(settings: Settings, options: BridgeOptions | None = None) -> Flask:
    """A Flask app serving the FHIR facade (/fhir), the KAP API (/kap), /healthz and /readyz."""
    from ..records.ingest import Ingest
    from ..records.inputs import load_input_schemas
    from ..records.mapping import Mapper
    from ..storage.auditlog import AuditLog
    from ..storage.outbox import Outbox
    from ..validation import Validator

    options = options or BridgeOptions()
    release = Release.parse(settings.fhir_version)
    db = Database(settings.db_url)
    store = Store(db)
    partners = Partners(db, cache_seconds=options.auth_cache_seconds)
    validator = Validator.load(release)
    mapper = Mapper.load()
    inputs = load_input_schemas()
    outbox = Outbox(db)
    audit = AuditLog(db)
    notifier = (
        Notifier(timeout=options.webhook_timeout, db=db, resolve=_webhook_of(partners))
        if options.notify
        else None
    )
    access = Access(
        store,
        release=release,
        purpose=options.read_purpose,
        audit=audit,
        context_source=outbox.context_for,
        partners=partners,  # the registry with its cached list (partner_refs reads it per search)
    )
    from .subscriptions import event_sink

    events = event_sink(
        db=db, store=store, partners=partners, access=access, release=release, notifier=notifier
    )
    # Rest-hooks only for recipients the consent gate lets read the note (audited like a read).
    inbound = Inbound(
        store,
        Ingest(inputs, mapper),
        release=release,
        context=outbox,
        partners=partners,
        notifier=notifier,
        clinic_org_identifier=settings.clinic_org_identifier,
        may_read=access.can_read,
        events=events,
    )
    if notifier is not None:
        notifier.allowed = _still_readable(partners, store, access)

    app = Flask("fhir_kap.bridge")
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    if options.proxy_hops > 0:
        from werkzeug.middleware.proxy_fix import ProxyFix

        n = options.proxy_hops
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=n, x_proto=n)  # type: ignore[method-assign]
    app.json.sort_keys = False  # type: ignore[attr-defined]
    app.extensions["fhir_kap"] = Services(
        settings,
        options,
        release,
        db,
        store,
        partners,
        inbound,
        access,
        validator,
        mapper,
        inputs,
        outbox,
        audit,
        events,
    )
    _hooks(app)
    from . import console, fhir, kap, metrics, smart, subscriptions

    for module in (fhir, kap, smart, subscriptions, console, metrics):
        module.register(app)
    _base_with_slash(app)

    @app.get("/healthz")
    def healthz() -> Response:
        return json_response({"status": "ok"})

    @app.get("/readyz")
    def readyz() -> Response:
        try:
            db.query("SELECT 1 AS ok")  # a read: no write lock, no fsync
        except Exception:  # noqa: BLE001 - any failure means not ready
            log.warning(_line(event="readyz-failed"))
            return json_response({"status": "unavailable", "database": "unreachable"}, 503)
        if not db.writable:  # a WAL sync failed: restart the process (it then recovers from disk)
            return json_response({"status": "unavailable", "database": "write-failed"}, 503)
        return json_response({"status": "ready", "database": db.dialect})

    if options.bench_echo:

        @app.post("/bench/echo")
        def bench_echo() -> Response:
            body = jsonio.loads(request.get_data(cache=False), source="body")
            return json_response({"ok": isinstance(body, dict)}, 201)

    return app


def _base_with_slash(app: Flask) -> None:
    """`POST /fhir/` (the base with a trailing slash, as many clients send a transaction) is
    `POST /fhir`: the same view, not a redirect (a 308 would make clients resend the Bundle)."""
    for rule in list(app.url_map.iter_rules()):
        if rule.rule == "/fhir" and "POST" in (rule.methods or ()):
            app.add_url_rule("/fhir/", endpoint=rule.endpoint, methods=["POST"])


def _webhook_of(partners: Partners) -> Callable[[str], tuple[str, str | None] | None]:
    def resolve(name: str) -> tuple[str, str | None] | None:
        partner = partners.get(name)
        if partner is None or partner.revoked or not partner.webhook_url:
            return None
        return partner.webhook_url, partner.webhook_secret

    return resolve


def _still_readable(partners: Partners, store: Store, access: Access) -> Callable[[str, str], bool]:
    """At send time: may the partner still read the note a rest-hook announces (consent-checked,
    audited like a read)? A Task event needs no consent (the Task carries status only)."""

    def allowed(name: str, ref: str) -> bool:
        rtype, _, rid = ref.partition("/")
        if rtype != "Communication":
            return True
        partner = partners.get(name)
        stored = store.get(rtype, rid)
        return partner is not None and stored is not None and access.can_read(partner, stored)

    return allowed


_XML_FORMATS = frozenset({"xml", "text/xml", "application/xml", "application/fhir+xml"})
_JSON_RANGES = frozenset({"application/fhir+json", "application/json", "application/*", "*/*", "json", ""})


def _negotiate(release: Release) -> None:
    """FHIR content negotiation: JSON only (an XML `_format` or an Accept header without JSON is
    406), and a media type's `fhirVersion` parameter must name the deployment's release (406 for
    Accept, 415 for Content-Type)."""
    fmt = request.args.get("_format", "").strip().lower()
    if fmt in _XML_FORMATS or fmt.endswith("+xml"):
        raise NotAcceptable("this server speaks FHIR JSON only (_format=json)")
    accept = request.headers.get("Accept")
    if accept and not any(
        r.split(";", 1)[0].strip().lower() in _JSON_RANGES and "q=0" not in r.replace(" ", "").split(";")[1:]
        for r in accept.split(",")
    ):
        raise NotAcceptable("this server answers application/fhir+json only")
    major_minor = ".".join(release.value.split(".")[:2])
    for header, error in (("Accept", NotAcceptable), ("Content-Type", UnsupportedMediaType)):
        for version in _FHIR_VERSION.findall(request.headers.get(header, "")):
            if ".".join(version.split(".")[:2]) != major_minor:
                raise error(f"{header} asks for FHIR {version[:10]}; this server speaks FHIR {release.value}")


_FHIR_VERSION = re.compile(r"fhirVersion\s*=\s*\"?([0-9][0-9.]{0,15})", re.I)


def _hooks(app: Flask) -> None:
    @app.before_request
    def start() -> None:
        notifier = services().inbound.notifier
        if notifier is not None:
            notifier.ensure_started()  # picks up rest-hook jobs a crashed worker left behind
        given = request.headers.get("X-Request-ID", "")
        g.request_id = given if _REQUEST_ID.match(given) else uuid.uuid4().hex
        g.started = time.perf_counter()
        g.partner = None
        if request.path.startswith("/fhir"):
            _negotiate(services().release)

    @app.after_request
    def finish(resp: Response) -> Response:
        resp.headers["X-Request-ID"] = g.get("request_id", "")
        if not log.isEnabledFor(logging.INFO):  # the line costs ~20 µs to build: only when it is kept
            return resp
        partner = g.get("partner")
        log.info(
            _line(
                event="request",
                request_id=g.get("request_id"),
                method=request.method,
                route=request.url_rule.rule if request.url_rule else "(unmatched)",
                status=resp.status_code,
                partner=partner.name if partner else None,
                duration_ms=round((time.perf_counter() - g.get("started", time.perf_counter())) * 1000, 2),
            )
        )
        return resp

    @app.errorhandler(KapError)
    def kap_error(exc: KapError) -> Response:
        resp = outcome_response(_bounded(exc), exc.http_status)
        if exc.http_status == 401:
            resp.headers["WWW-Authenticate"] = 'Bearer realm="fhir-kap"'
        return resp

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> Response:
        status = exc.code or 500
        allow = ", ".join(getattr(exc, "valid_methods", None) or ())  # a 405's Allow
        if status == 404:
            text = "No such endpoint"
        elif status == 405:
            text = f"{request.method} is not supported on this path (allowed: {allow or '-'})"
        elif status in (406, 415):
            text = str(exc.description) if exc.description else str(exc.name)
        elif status == 413:
            text = f"Request body larger than {app.config['MAX_CONTENT_LENGTH']} bytes"
        else:
            text = exc.name
        resp = outcome_response(
            operation_outcome(
                [Issue("error", _HTTP_CODES.get(status, "exception"), text, rule=f"http:{status}")]
            ),
            status,
        )
        if status == 405 and allow:
            resp.headers["Allow"] = allow
        return resp

    @app.errorhandler(Exception)
    def internal_error(exc: Exception) -> Response:
        rid = g.get("request_id", "-")
        # Type and frames only: an exception's message may quote data.
        frames = [
            f"{f.filename.rsplit('/', 1)[-1]}:{f.lineno}:{f.name}"
            for f in traceback.extract_tb(exc.__traceback__)
        ]
        log.error(_line(event="internal-error", request_id=rid, error=type(exc).__name__, frames=frames[-8:]))
        return outcome_response(
            operation_outcome(
                [Issue("fatal", "exception", f"Internal error; request id {rid}", rule="internal")]
            ),
            500,
        )


_RECORD_ATTRS = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


class JsonLines(logging.Formatter):
    """Every log record as one JSON line: the request lines as they are built, anything else as
    `{"ts", "level", "logger", "event", ...}` with the record's `extra` fields (ids and codes only;
    callers never pass patient data)."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if message.startswith("{"):
            return message  # already a JSON line (_line)
        fields: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created).astimezone().isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": message,
        }
        for key, value in vars(record).items():
            if key not in _RECORD_ATTRS and isinstance(value, (str, int, float, bool, type(None))):
                fields[key] = value
        if record.exc_info and record.exc_info[0] is not None:
            fields["error"] = record.exc_info[0].__name__  # the type only: a message may quote data
        return jsonio.dumps(fields).decode()


def _line(**fields: Any) -> str:
    return jsonio.dumps(
        {"ts": datetime.now().astimezone().isoformat(timespec="milliseconds"), **fields}
    ).decode()


FHIR_JSON = "application/fhir+json"


class FhirResponse(Response):
    """werkzeug's Response, minus the IRI-to-URI pass over a `Location` that is already a URI.

    werkzeug re-quotes `Location` on every response (~15 µs, a tenth of the framework's share
    of a create); the bridge builds it from its base URL and a type, id and version that are
    restricted to URI-safe characters, so a value made only of those characters is passed as is.
    Such a value is not normalised further either (werkzeug would lowercase a host written in
    capitals, for one), and `Location` comes last among the headers.
    """

    def get_wsgi_headers(self, environ: Any) -> Any:
        location = self.headers.get("Location")
        if location is None or not _URI_SAFE.match(location):
            return super().get_wsgi_headers(environ)
        del self.headers["Location"]
        try:
            headers = super().get_wsgi_headers(environ)
        finally:
            self.headers["Location"] = location
        headers["Location"] = location
        return headers


#: RFC 3986 characters only (no '%', which would need checking, no spaces, no non-ASCII).
_URI_SAFE = re.compile(r"[A-Za-z0-9\-._~:/?#\[\]@!$&'()*+,;=]+\Z")


def fhir_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return FhirResponse(
        b"" if body is None else jsonio.dumps(body),
        status=status,
        headers=headers,
        content_type=f"{FHIR_JSON}; charset=utf-8",
    )


def json_response(body: Any, status: int = 200) -> Response:
    return Response(jsonio.dumps(body), status=status, content_type="application/json")


def outcome_response(outcome: dict[str, Any], status: int) -> Response:
    return fhir_response(outcome, status)


_DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
_UTC_INSTANT = re.compile(r"(\d{4})-(\d{2})-(\d{2})T(\d{2}:\d{2}:\d{2})(?:\.\d+)?Z\Z", re.ASCII)


def http_date(instant: str) -> str:
    """A FHIR instant as an HTTP date (Last-Modified).

    >>> http_date("2026-11-24T01:02:03.456789Z")
    'Tue, 24 Nov 2026 01:02:03 GMT'
    >>> http_date("2026-11-24T02:02:03+01:00")
    'Tue, 24 Nov 2026 01:02:03 GMT'
    """
    m = _UTC_INSTANT.match(instant)  # the store's own spelling: no datetime round trip
    if m is None:
        moment = datetime.fromisoformat(instant)
        moment = moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)
        return format_datetime(moment, usegmt=True)
    y, mo, d, hms = m.groups()
    weekday = date(int(y), int(mo), int(d)).weekday()
    return f"{_DAYS[weekday]}, {d} {_MONTHS[int(mo) - 1]} {y} {hms} GMT"


@lru_cache(maxsize=64)
def host_base(scheme: str, host: str) -> str:
    """`scheme://host` as werkzeug's `request.host_url` spells it (without the trailing /), memoised.

    Building it per request went through werkzeug's IRI quoting (~20 µs a POST); the inputs are
    the (already trusted-host-checked) scheme and Host, so a small bounded cache is exact.
    """
    return get_current_url(scheme, host).rstrip("/")


def current_partner(scopes: Iterable[str] = ()) -> Partner:
    """The authenticated partner (401 without a valid bearer token)."""
    header = request.headers.get("Authorization", "")
    token = header[7:].strip() if header[:7].lower() == "bearer " else None
    partner = services().partners.authenticate(token)
    if partner is None:
        raise Unauthorized("A valid bearer token is required", rule="auth:bearer", code="login")
    g.partner = partner
    for scope in scopes:
        if scope not in partner.scopes:
            raise Forbidden(
                f"This partner's scopes do not include {scope}", rule="auth:scope", code="forbidden"
            )
    return partner
