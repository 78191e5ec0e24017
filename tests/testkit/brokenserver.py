"""A small in-memory FHIR server for the conformance-check tests, with switchable defects.

Without defects it behaves well enough that every check of `fhir-kap check` passes; each
defect breaks one behaviour the way real servers do:

  wrong_version          CapabilityStatement says fhirVersion 3.0.2
  no_conditional_create  conditionalCreate not declared and If-None-Exist ignored
  non_atomic_transaction a failing transaction keeps the entries stored before the bad one
  error_500              malformed request bodies get a 500 with an HTML page
  open_access            requests without (or with a wrong) token are served anyway
  ignore_count           search returns everything in one page whatever `_count` says
  delete_404             DELETE answers 404 with an OperationOutcome and keeps the resource
                         (as the fhir-kap bridge does), while the CapabilityStatement claims delete
  subscription_no_topics the CapabilityStatement claims Subscription but names no SubscriptionTopic

Run it in a thread: `with BrokenServer(defects={"ignore_count"}, token="t") as s: s.base_url`.

`FaultFront` is a plain HTTP front for the delivery tests, over real sockets: it records every
request it gets and, per `mode`, answers `307 Location: <redirect_to>` (`redirect`), answers
201 itself (`record`: a sink that must stay empty), forwards to `upstream` (a real server such
as SEKMET) and garbles the body of a 2xx answer to a POST after the upstream stored it
(`garble`), answers a garbled 200 without forwarding the POST (`garble_unsent`), or just
forwards (`pass`). The mode can be changed while it runs.
"""

from __future__ import annotations

import http.client
import logging
import threading
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlencode, urlsplit

import orjson
from flask import Flask, Response, request
from werkzeug.serving import make_server

DEFECTS = frozenset(
    {
        "wrong_version",
        "no_conditional_create",
        "non_atomic_transaction",
        "error_500",
        "open_access",
        "ignore_count",
        "delete_404",
        "subscription_no_topics",
    }
)
TYPES = (
    "Patient",
    "Practitioner",
    "PractitionerRole",
    "Organization",
    "ServiceRequest",
    "Procedure",
    "Consent",
    "Communication",
)
REQUIRED = {
    "ServiceRequest": ("status", "intent", "subject"),
    "Procedure": ("status", "subject"),
    "Consent": ("status",),
    "Communication": ("status",),
}
STATUS_CODES = {
    "ServiceRequest": {"draft", "active", "on-hold", "revoked", "completed", "entered-in-error", "unknown"},
    "Procedure": {
        "preparation",
        "in-progress",
        "not-done",
        "on-hold",
        "stopped",
        "completed",
        "entered-in-error",
        "unknown",
    },
    "Consent": {"draft", "proposed", "active", "rejected", "inactive", "entered-in-error", "not-done"},
    "Communication": {
        "preparation",
        "in-progress",
        "not-done",
        "on-hold",
        "stopped",
        "completed",
        "entered-in-error",
        "unknown",
    },
}
DATE_FIELDS = ("authoredOn", "sent", "dateTime", "date", "birthDate")
SEARCH_REFS = {
    "patient": ("subject", "patient"),
    "subject": ("subject",),
    "based-on": ("basedOn",),
    "recipient": ("recipient",),
}


@dataclass
class BrokenServer:
    defects: frozenset[str] | set[str] = frozenset()
    token: str | None = None
    fhir_version: str = "4.0.1"
    port: int = 0
    store: dict[tuple[str, str], list[dict[str, Any]]] = field(default_factory=dict)
    deleted: set[tuple[str, str]] = field(default_factory=set)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        unknown = set(self.defects) - DEFECTS
        if unknown:
            raise ValueError(f"unknown defects {unknown}")
        logging.getLogger("werkzeug").setLevel(logging.ERROR)
        self.app = self._build()
        self._server = make_server("127.0.0.1", self.port, self.app, threaded=True)
        self.port = self._server.server_port
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/fhir"

    def __enter__(self) -> BrokenServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._thread.join(timeout=5)

    # ---- helpers

    def _has(self, defect: str) -> bool:
        return defect in self.defects

    @staticmethod
    def _json(doc: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
        return Response(
            orjson.dumps(doc), status=status, headers=headers or {}, content_type="application/fhir+json"
        )

    def _outcome(self, status: int, code: str, text: str) -> Response:
        return self._json(
            {
                "resourceType": "OperationOutcome",
                "issue": [{"severity": "error", "code": code, "diagnostics": text}],
            },
            status,
        )

    def _problems(self, rtype: str, res: Any) -> list[str]:
        if not isinstance(res, dict) or res.get("resourceType") != rtype:
            return [f"resourceType must be {rtype}"]
        out = [f"{rtype}.{f} is required" for f in REQUIRED.get(rtype, ()) if f not in res]
        if "status" in res and res["status"] not in STATUS_CODES.get(rtype, {res["status"]}):
            out.append(f"{rtype}.status has an unknown code")
        out += [
            f"{rtype}.{f} must be a string" for f in DATE_FIELDS if f in res and not isinstance(res[f], str)
        ]
        return out

    def _now(self) -> str:
        """Strictly increasing instants (1 ms apart at least) so _lastUpdated searches are exact."""
        now_ms = int(datetime.now(UTC).timestamp() * 1000)
        self._last_ms = max(now_ms, getattr(self, "_last_ms", 0) + 1)
        return (
            datetime.fromtimestamp(self._last_ms / 1000, UTC)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z")
        )

    def _save(self, rtype: str, res: dict[str, Any], rid: str | None = None) -> dict[str, Any]:
        rid = rid or uuid.uuid4().hex[:16]
        history = self.store.setdefault((rtype, rid), [])
        res = dict(res, id=rid)
        res["meta"] = dict(res.get("meta") or {}, versionId=str(len(history) + 1), lastUpdated=self._now())
        history.append(res)
        self.deleted.discard((rtype, rid))
        return res

    def _current(self, rtype: str, rid: str) -> dict[str, Any] | None:
        if (rtype, rid) in self.deleted:
            return None
        history = self.store.get((rtype, rid))
        return history[-1] if history else None

    def _all(self, rtype: str) -> list[dict[str, Any]]:
        return [h[-1] for (t, i), h in self.store.items() if t == rtype and (t, i) not in self.deleted]

    def _body(self) -> tuple[Any, Response | None]:
        raw = request.get_data()
        try:
            return orjson.loads(raw), None
        except orjson.JSONDecodeError:
            if self._has("error_500"):
                return None, Response(
                    "<html><body>Internal Server Error</body></html>", 500, content_type="text/html"
                )
            return None, self._outcome(400, "structure", "body is not valid JSON")

    @staticmethod
    def _matches(res: dict[str, Any], params: dict[str, str]) -> bool:
        for name, value in params.items():
            if name.startswith("_") and name != "_lastUpdated":
                continue
            if name == "identifier":
                system, _, code = value.partition("|")
                if not any(
                    i.get("system") == system and (not code or i.get("value") == code)
                    for i in res.get("identifier") or []
                ):
                    return False
            elif name == "status":
                if res.get("status") != value:
                    return False
            elif name == "category":
                system, _, code = value.rpartition("|")
                cats = res.get("category")
                cats = cats if isinstance(cats, list) else [cats] if cats else []
                if not any(
                    c.get("code") == code and (not system or c.get("system") == system)
                    for cat in cats
                    for c in (cat or {}).get("coding") or []
                ):
                    return False
            elif name in SEARCH_REFS:
                refs = []
                for f in SEARCH_REFS[name]:
                    v = res.get(f)
                    refs += v if isinstance(v, list) else [v] if v else []
                if not any((r or {}).get("reference") == value for r in refs):
                    return False
            elif name == "_lastUpdated":
                prefix, stamp = value[:2], value[2:]
                mine = res["meta"]["lastUpdated"]
                ok = {"ge": mine >= stamp, "gt": mine > stamp, "le": mine <= stamp, "lt": mine < stamp}
                if not ok.get(prefix, mine.startswith(value)):
                    return False
            else:
                return False
        return True

    # ---- the app

    def _build(self) -> Flask:
        app = Flask("brokenserver")

        @app.before_request
        def auth() -> Response | None:
            if not self.token or self._has("open_access"):
                return None
            if request.path.endswith("/metadata"):
                return None
            if request.headers.get("Authorization") != f"Bearer {self.token}":
                return Response(
                    orjson.dumps(
                        {
                            "resourceType": "OperationOutcome",
                            "issue": [
                                {
                                    "severity": "error",
                                    "code": "login",
                                    "diagnostics": "a valid bearer token is required",
                                }
                            ],
                        }
                    ),
                    401,
                    headers={"WWW-Authenticate": 'Bearer error="invalid_token"'},
                    content_type="application/fhir+json",
                )
            return None

        @app.get("/fhir/metadata")
        def metadata() -> Response:
            resources = [
                {
                    "type": t,
                    "interaction": [
                        {"code": c} for c in ("read", "vread", "update", "delete", "create", "search-type")
                    ],
                    "conditionalCreate": not self._has("no_conditional_create"),
                }
                for t in TYPES
            ]
            if self._has("subscription_no_topics"):
                resources.append(
                    {"type": "Subscription", "interaction": [{"code": "create"}, {"code": "read"}]}
                )
            rest: dict[str, Any] = {
                "mode": "server",
                "resource": resources,
                "interaction": [{"code": "transaction"}],
                "operation": [
                    {
                        "name": "validate",
                        "definition": "http://hl7.org/fhir/OperationDefinition/Resource-validate",
                    }
                ],
            }
            return self._json(
                {
                    "resourceType": "CapabilityStatement",
                    "status": "active",
                    "kind": "instance",
                    "date": "2025-01-01",
                    "fhirVersion": "3.0.2" if self._has("wrong_version") else self.fhir_version,
                    "format": ["application/fhir+json"],
                    "rest": [rest],
                }
            )

        @app.post("/fhir")
        @app.post("/fhir/")
        def transaction() -> Response:
            bundle, err = self._body()
            if err:
                return err
            if not isinstance(bundle, dict) or bundle.get("type") != "transaction":
                return self._outcome(400, "invalid", "expected a transaction Bundle")
            entries = bundle.get("entry") or []
            with self._lock:
                if not self._has("non_atomic_transaction"):
                    for n, e in enumerate(entries):
                        res = e.get("resource") or {}
                        problems = self._problems(str(res.get("resourceType")), res)
                        if problems:
                            return self._outcome(400, "invalid", f"entry {n}: {'; '.join(problems)}")
                urls: dict[str, str] = {}
                out = []
                for n, e in enumerate(entries):
                    res = e.get("resource") or {}
                    rtype = str(res.get("resourceType"))
                    problems = self._problems(rtype, res)
                    if problems:
                        return self._outcome(400, "invalid", f"entry {n}: {'; '.join(problems)}")
                    rid = uuid.uuid4().hex[:16]
                    if e.get("fullUrl"):
                        urls[e["fullUrl"]] = f"{rtype}/{rid}"
                    res = _resolve(res, urls)
                    saved = self._save(rtype, res, rid)
                    out.append(
                        {
                            "response": {"status": "201 Created", "location": f"{rtype}/{rid}/_history/1"},
                            "resource": saved,
                        }
                    )
            return self._json({"resourceType": "Bundle", "type": "transaction-response", "entry": out})

        @app.post("/fhir/<rtype>/$validate")
        def validate(rtype: str) -> Response:
            res, err = self._body()
            if err:
                return err
            problems = self._problems(rtype, res)
            issues = [{"severity": "error", "code": "invalid", "diagnostics": p} for p in problems] or [
                {"severity": "information", "code": "informational", "diagnostics": "valid"}
            ]
            return self._json({"resourceType": "OperationOutcome", "issue": issues})

        @app.post("/fhir/<rtype>")
        def create(rtype: str) -> Response:
            if rtype not in TYPES:
                return self._outcome(404, "not-supported", f"unknown resource type {rtype}")
            res, err = self._body()
            if err:
                return err
            problems = self._problems(rtype, res)
            if problems:
                return self._outcome(400, "invalid", "; ".join(problems))
            with self._lock:
                cond = request.headers.get("If-None-Exist")
                if cond and not self._has("no_conditional_create"):
                    params = dict(p.split("=", 1) for p in cond.split("&") if "=" in p)
                    hits = [r for r in self._all(rtype) if self._matches(r, params)]
                    if len(hits) == 1:
                        return self._json(hits[0], 200)
                    if len(hits) > 1:
                        return self._outcome(412, "duplicate", "several matches")
                saved = self._save(rtype, res)
            return self._json(
                saved,
                201,
                {
                    "Location": f"{self.base_url}/{rtype}/{saved['id']}/_history/1",
                    "ETag": f'W/"{saved["meta"]["versionId"]}"',
                },
            )

        @app.get("/fhir/<rtype>/<rid>")
        def read(rtype: str, rid: str) -> Response:
            cur = self._current(rtype, rid)
            if cur is None:
                return self._outcome(410 if (rtype, rid) in self.deleted else 404, "not-found", "not found")
            return self._json(cur)

        @app.put("/fhir/<rtype>/<rid>")
        def update(rtype: str, rid: str) -> Response:
            res, err = self._body()
            if err:
                return err
            problems = self._problems(rtype, res)
            if problems:
                return self._outcome(400, "invalid", "; ".join(problems))
            with self._lock:
                cur = self._current(rtype, rid)
                match = request.headers.get("If-Match")
                if match and cur and match.replace("W/", "").strip('"') != cur["meta"]["versionId"]:
                    return self._outcome(412, "conflict", "version mismatch")
                saved = self._save(rtype, res, rid)
            return self._json(saved, 200 if cur else 201)

        @app.delete("/fhir/<rtype>/<rid>")
        def delete(rtype: str, rid: str) -> Response:
            if self._has("delete_404"):
                return self._outcome(404, "not-found", f"no route for DELETE {rtype}/{rid}")
            with self._lock:
                if (rtype, rid) in self.store:
                    self.deleted.add((rtype, rid))
            return Response(status=204)

        @app.get("/fhir/<rtype>")
        def search(rtype: str) -> Response:
            if rtype not in TYPES:
                return self._outcome(404, "not-supported", f"unknown resource type {rtype}")
            params = dict(request.args.items())
            hits = sorted(
                (r for r in self._all(rtype) if self._matches(r, params)),
                key=lambda r: r["meta"]["lastUpdated"],
            )
            count = int(params.get("_count", 50))
            offset = int(params.get("_offset", 0))
            page = hits if self._has("ignore_count") else hits[offset : offset + count]
            links = [{"relation": "self", "url": request.url}]
            if not self._has("ignore_count") and offset + count < len(hits):
                nxt = {k: v for k, v in params.items() if k != "_offset"}
                query = urlencode(nxt)
                links.append(
                    {"relation": "next", "url": f"{self.base_url}/{rtype}?{query}&_offset={offset + count}"}
                )
            return self._json(
                {
                    "resourceType": "Bundle",
                    "type": "searchset",
                    "total": len(hits),
                    "link": links,
                    "entry": [
                        {
                            "fullUrl": f"{self.base_url}/{rtype}/{r['id']}",
                            "resource": r,
                            "search": {"mode": "match"},
                        }
                        for r in page
                    ],
                }
            )

        return app


def _resolve(node: Any, urls: dict[str, str]) -> Any:
    if isinstance(node, dict):
        return {
            k: (urls.get(v, v) if k == "reference" and isinstance(v, str) else _resolve(v, urls))
            for k, v in node.items()
        }
    if isinstance(node, list):
        return [_resolve(v, urls) for v in node]
    return node


FRONT_MODES = frozenset({"redirect", "record", "garble", "garble_unsent", "pass"})
GARBLED = b'{"resourceType": "Communication", "id": "\xff\xfe<html>502 upstream'


@dataclass
class FrontRequest:
    method: str
    path: str
    body: bytes


class FaultFront:
    """A plain HTTP front with one fault at a time (see the module docstring)."""

    def __init__(self, mode: str, *, upstream: str | None = None, redirect_to: str | None = None) -> None:
        self.mode = mode
        self.upstream = upstream  # base URL of the real server, e.g. SEKMET's .../fhir
        self.redirect_to = redirect_to
        self.received: list[FrontRequest] = []
        front = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:  # quiet
                pass

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                front.received.append(FrontRequest(self.command, self.path, body))
                status, headers, payload = front._answer(self.command, self.path, dict(self.headers), body)
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_POST = do_PUT = do_DELETE = _handle

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/fhir"

    def __enter__(self) -> FaultFront:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def _answer(
        self, method: str, path: str, headers: dict[str, str], body: bytes
    ) -> tuple[int, dict[str, str], bytes]:
        if self.mode not in FRONT_MODES:
            raise ValueError(f"unknown mode {self.mode}")
        if self.mode == "redirect":
            return 307, {"Location": f"{self.redirect_to}{path.removeprefix('/fhir')}"}, b""
        if self.mode == "record":
            return 201, {"Content-Type": "application/fhir+json"}, b'{"resourceType": "Communication"}'
        if self.mode == "garble_unsent" and method == "POST":
            return 200, {"Content-Type": "application/fhir+json"}, GARBLED
        status, out_headers, payload = self._forward(method, path, headers, body)
        if self.mode == "garble" and method == "POST" and 200 <= status < 300:
            return status, {"Content-Type": "application/fhir+json"}, GARBLED
        return status, out_headers, payload

    def _forward(
        self, method: str, path: str, headers: dict[str, str], body: bytes
    ) -> tuple[int, dict[str, str], bytes]:
        assert self.upstream is not None, "this mode forwards: give an upstream"
        up = urlsplit(self.upstream)
        prefix = up.path.rstrip("/")
        conn = http.client.HTTPConnection(up.hostname or "127.0.0.1", up.port, timeout=30)
        try:
            keep = {
                k: v
                for k, v in headers.items()
                if k.lower() in ("accept", "content-type", "if-none-exist", "prefer", "authorization")
            }
            conn.request(method, prefix + path.removeprefix("/fhir"), body=body or None, headers=keep)
            resp = conn.getresponse()
            payload = resp.read()
            out = {k: v for k, v in resp.getheaders() if k.lower() in ("content-type", "location", "etag")}
            return resp.status, out, payload
        finally:
            conn.close()
