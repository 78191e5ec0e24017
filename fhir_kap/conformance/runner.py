"""Conformance checks: can this FHIR server take part in KAP exchange, and if not, why.

A small test framework run against a live server. Each check has an id (`cap-01`), a group,
a title, the spec rule it checks, whether it is *required* (a failed required check makes the
run fail), and an outcome (pass / fail / skip) with a reason. A failure keeps the HTTP
exchanges that proved it, with secrets and patient data masked (`mask_body`, `mask_headers`).

Test data is created under a run-specific identifier system
(`http://fhir-kap.example/sid/check-run/<uuid>`) and deleted afterwards unless `keep_data`.
Everything goes through `FhirClient.raw` so the checks see exact status codes and bodies.
"""
from __future__ import annotations

import copy
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlencode, urlsplit

from .. import jsonio
from ..client import BearerAuth, FhirClient, NoAuth
from ..config import CANONICAL, Release, data_path
from ..errors import ConfigError, InputError, KapError, ServerError

__all__ = [
    "GROUPS",
    "KAP_TYPES",
    "Check",
    "CheckConfig",
    "CheckResult",
    "Context",
    "Exchange",
    "Failed",
    "RunReport",
    "ServerUnreachable",
    "Skipped",
    "all_checks",
    "compare_resources",
    "load_examples",
    "load_invalid_examples",
    "mask_body",
    "mask_headers",
    "run_checks",
]

GROUPS = ("capability", "round-trip", "idempotency", "search", "errors", "validation", "security")
KAP_TYPES = ("ServiceRequest", "Procedure", "Consent", "Communication",
             "Patient", "Practitioner", "PractitionerRole", "Organization")
NEEDED_INTERACTIONS = ("create", "read", "update", "search-type")
# Creation order so that every reference points at something already created.
CREATE_ORDER = ("Organization", "Practitioner", "PractitionerRole", "Patient", "Consent",
                "ServiceRequest", "Procedure", "Communication")
RUN_SYSTEM_BASE = f"{CANONICAL}/sid/check-run/"
BODY_LIMIT = 2048
FHIR_JSON = "application/fhir+json"

# Keys whose values are patient data (or free text that may be) and are masked in reports.
_PATIENT_KEYS = frozenset({"name", "given", "family", "birthDate", "telecom", "address", "text",
                           "contentString", "valueString", "data", "div", "photo", "contact",
                           "description", "note", "summary"})
_SECRET_KEYS = frozenset({"access_token", "refresh_token", "id_token", "token", "client_secret",
                          "client_assertion", "password", "assertion"})
_SECRET_HEADERS = frozenset({"authorization", "proxy-authorization", "cookie", "set-cookie"})
_KEPT_HEADERS = ("content-type", "location", "etag", "last-modified", "www-authenticate",
                 "if-match", "if-none-exist", "prefer", "authorization")
MASK = "***"


class Failed(Exception):
    """Raised by a check: the server does not conform. The message is the reason."""


class Skipped(Exception):
    """Raised by a check: it does not apply (the reason says why)."""


@dataclass(frozen=True)
class Exchange:
    """One HTTP request and its response, masked, bodies cut to 2 KB."""

    method: str
    url: str
    request_headers: Mapping[str, str]
    request_body: str | None
    status: int | None
    response_headers: Mapping[str, str]
    response_body: str | None

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "url": self.url,
                "request": {"headers": dict(self.request_headers), "body": self.request_body},
                "response": {"status": self.status, "headers": dict(self.response_headers),
                             "body": self.response_body}}


@dataclass(frozen=True)
class CheckResult:
    id: str
    group: str
    title: str
    rule: str
    required: bool
    outcome: str  # pass | fail | skip
    reason: str
    exchanges: tuple[Exchange, ...] = ()
    duration_ms: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "group": self.group, "title": self.title, "rule": self.rule,
                "required": self.required, "outcome": self.outcome, "reason": self.reason,
                "duration_ms": self.duration_ms,
                "exchanges": [e.to_dict() for e in self.exchanges]}


@dataclass(frozen=True)
class RunReport:
    """The result of one run. `to_dict()` is the JSON report (schema in reports.py)."""

    server: str
    fhir_version: str | None
    auth: str
    run_system: str
    started: str
    finished: str
    results: tuple[CheckResult, ...]
    data_kept: bool = False
    cleanup_problems: tuple[str, ...] = ()

    @property
    def passed(self) -> bool:
        """True when every required check passed (skips do not count against it)."""
        return all(r.outcome != "fail" for r in self.results if r.required)

    def summary(self) -> dict[str, int]:
        out = {"total": len(self.results), "pass": 0, "fail": 0, "skip": 0, "required_failed": 0}
        for r in self.results:
            out[r.outcome] += 1
            if r.outcome == "fail" and r.required:
                out["required_failed"] += 1
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"report": "fhir-kap-check", "version": 1, "server": self.server,
                "fhir_version": self.fhir_version, "auth": self.auth,
                "run_system": self.run_system, "started": self.started, "finished": self.finished,
                "passed": self.passed, "summary": self.summary(), "data_kept": self.data_kept,
                "cleanup_problems": list(self.cleanup_problems),
                "groups": list(GROUPS), "results": [r.to_dict() for r in self.results]}


@dataclass(frozen=True)
class CheckConfig:
    """What to check and how. `auth` is a client auth object (NoAuth, BearerAuth, SmartBackendAuth)."""

    server: str
    auth: Any = None
    auth_kind: str = "none"  # none | bearer | smart
    fhir_version: str = "auto"
    only: tuple[str, ...] = ()
    keep_data: bool = False
    examples_dir: Path | None = None  # default: profiles/examples/<r4|r5>
    invalid_dir: Path | None = None  # default: profiles/examples/invalid
    secrets: tuple[str, ...] = ()  # extra values to mask and to look for in responses
    timeout: tuple[float, float] = (5.0, 30.0)
    session: Any = None


@dataclass(frozen=True)
class Check:
    id: str
    group: str
    title: str
    rule: str
    required: bool
    run: Callable[[Context], str]  # returns the pass reason; raises Failed / Skipped


class ServerUnreachable(ServerError):
    """The server could not be reached at all (the CLI exits 2)."""

    exit_code = 2


# --------------------------------------------------------------------------- masking


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
            out[key] = _mask_text(str(value), secrets)
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


def _mask_text(text: str, secrets: Iterable[str]) -> str:
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
            text = "&".join(f"{p.split('=', 1)[0]}={MASK}" if p.split("=", 1)[0] in _SECRET_KEYS else p
                            for p in text.split("&"))
    text = _mask_text(text, secrets)
    if len(text) > limit:
        text = text[:limit] + f"... ({len(text) - limit} more characters)"
    return text


# --------------------------------------------------------------------------- examples


def load_examples(directory: Path) -> list[dict[str, Any]]:
    """The KAP example instances in `directory`, in creation order (referenced ones first)."""
    if not directory.is_dir():
        raise ConfigError(f"KAP examples folder '{directory}' not found", rule="check:examples")
    docs = []
    for path in sorted(directory.glob("*.json")):
        doc = jsonio.loads(path.read_bytes(), source=path.name)
        if isinstance(doc, dict) and doc.get("resourceType") in CREATE_ORDER:
            docs.append(doc)
    if not docs:
        raise ConfigError(f"No KAP example instances in '{directory}'", rule="check:examples")
    return sorted(docs, key=lambda d: CREATE_ORDER.index(d["resourceType"]))


def load_invalid_examples(directory: Path) -> list[dict[str, Any]]:
    """The manifest of invalid instances (`manifest.json`), each item with its `resource` loaded."""
    manifest = directory / "manifest.json"
    if not manifest.is_file():
        raise ConfigError(f"Invalid-examples manifest '{manifest}' not found", rule="check:examples")
    items = jsonio.loads(manifest.read_bytes(), source=manifest.name)
    out = []
    for item in items:
        item = dict(item)
        item["resource"] = jsonio.loads((directory / item["file"]).read_bytes(), source=item["file"])
        out.append(item)
    return out


# --------------------------------------------------------------------------- context


@dataclass
class Response:
    """What a check sees of an HTTP answer."""

    status: int
    headers: Mapping[str, str]
    body: bytes

    def json(self) -> Any:
        try:
            return jsonio.loads(self.body, source="response")
        except InputError:
            return None

    @property
    def is_outcome(self) -> bool:
        doc = self.json()
        return isinstance(doc, dict) and doc.get("resourceType") == "OperationOutcome"


@dataclass
class Context:
    """State shared by the checks of one run: clients, capabilities, created data, exchanges."""

    config: CheckConfig
    client: Any
    run_id: str
    release: Release = Release.R4
    metadata: dict[str, Any] | None = None
    exchanges: list[Exchange] = field(default_factory=list)
    created: list[tuple[str, str]] = field(default_factory=list)
    echoed: list[str] = field(default_factory=list)
    responses_seen: int = 0
    secrets: set[str] = field(default_factory=set)
    state: dict[str, Any] = field(default_factory=dict)
    _examples: list[dict[str, Any]] | None = None

    @property
    def run_system(self) -> str:
        return RUN_SYSTEM_BASE + self.run_id

    def request(self, method: str, path: str, *, body: Any = None, raw_body: bytes | None = None,
                headers: Mapping[str, str] | None = None, params: Mapping[str, str] | None = None,
                client: Any = None) -> Response:
        """Send one request through `FhirClient.raw`, record the masked exchange, return it."""
        hdrs = {"Accept": FHIR_JSON}
        if body is not None or raw_body is not None:
            hdrs["Content-Type"] = FHIR_JSON
        hdrs.update(headers or {})
        data = raw_body if raw_body is not None else (jsonio.dumps(body) if body is not None else None)
        if params:
            path = f"{path}?{urlencode(params)}"
        resp = (client or self.client).raw(method, path, data=data, headers=hdrs)
        sent = getattr(resp, "request", None)
        sent_headers = dict(getattr(sent, "headers", None) or hdrs)
        auth_header = sent_headers.get("Authorization") or sent_headers.get("authorization")
        if auth_header and " " in auth_header:
            token = auth_header.split(" ", 1)[1]
            if (client or self.client) is self.client:
                self.secrets.add(token)
        content = resp.content or b""
        self.responses_seen += 1
        for secret in self.secrets:
            if secret and (secret.encode() in content or any(secret in str(v) for v in resp.headers.values())):
                self.echoed.append(f"{method} {path}")
        self.exchanges.append(Exchange(
            method=method, url=_mask_text(str(getattr(resp, "url", path)), self.secrets),
            request_headers=mask_headers(sent_headers, self.secrets),
            request_body=mask_body(data, self.secrets),
            status=resp.status_code, response_headers=mask_headers(resp.headers, self.secrets),
            response_body=mask_body(content, self.secrets)))
        return Response(resp.status_code, resp.headers, content)

    def examples(self) -> list[dict[str, Any]]:
        if self._examples is None:
            folder = self.config.examples_dir or data_path("profiles") / "examples" / self.release.short
            self._examples = load_examples(Path(folder))
        return copy.deepcopy(self._examples)

    def tag(self, resource: dict[str, Any], value: str) -> dict[str, Any]:
        """Add the run identifier (system = run system) to a resource; return it."""
        resource.pop("id", None)
        for managed in ("versionId", "lastUpdated", "source"):
            (resource.get("meta") or {}).pop(managed, None)
        ids = resource.setdefault("identifier", [])
        ids.append({"system": self.run_system, "value": value})
        return resource

    def create(self, resource: dict[str, Any], headers: Mapping[str, str] | None = None) -> tuple[Response, dict[str, Any] | None]:
        """POST a resource; remember it for clean-up; return (response, stored resource or None)."""
        rtype = resource["resourceType"]
        resp = self.request("POST", rtype, body=resource, headers=headers)
        stored = resp.json() if resp.status in (200, 201) else None
        rid = stored.get("id") if isinstance(stored, dict) else None
        if not rid and resp.status in (200, 201):
            rid = _id_from_location(resp.headers.get("Location") or resp.headers.get("location"), rtype)
        if rid and (rtype, rid) not in self.created:
            self.created.append((rtype, rid))
        if isinstance(stored, dict) and not stored.get("id") and rid:
            stored["id"] = rid
        return resp, stored if isinstance(stored, dict) and stored.get("resourceType") == rtype else (
            {**resource, "id": rid} if rid else None)

    def create_journey(self, label: str) -> dict[str, dict[str, Any]]:
        """Create the KAP examples (references rewritten to the new ids); key 'Type/exampleId'."""
        idmap: dict[str, str] = {}
        out: dict[str, dict[str, Any]] = {}
        for n, example in enumerate(self.examples()):
            key = f"{example['resourceType']}/{example.get('id')}"
            res = _rewrite_refs(example, idmap)
            self.tag(res, f"{label}-{n}")
            resp, stored = self.create(res)
            if resp.status not in (200, 201) or not stored or not stored.get("id"):
                raise Failed(f"creating {example['resourceType']} (example {example.get('id')}) "
                             f"answered {resp.status}{_outcome_hint(resp)}")
            idmap[key] = f"{stored['resourceType']}/{stored['id']}"
            out[key] = {"sent": res, "stored": stored}
        self.state.setdefault("idmaps", {})[label] = idmap
        return out

    def search_all(self, rtype: str, params: Mapping[str, str], max_pages: int = 50) -> tuple[list[dict[str, Any]], list[int]]:
        """Search and follow `next` links; return (matching resources, entries per page)."""
        resp = self.request("GET", rtype, params=params)
        items: list[dict[str, Any]] = []
        pages: list[int] = []
        for _ in range(max_pages):
            bundle = resp.json()
            if resp.status != 200 or not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle":
                raise Failed(f"search {rtype}?{_q(params)} answered {resp.status}{_outcome_hint(resp)}")
            found = [e.get("resource") for e in bundle.get("entry") or []
                     if isinstance(e, dict) and (e.get("search") or {}).get("mode", "match") == "match"]
            pages.append(len(found))
            items += [r for r in found if isinstance(r, dict)]
            nxt = next((link.get("url") for link in bundle.get("link") or [] if link.get("relation") == "next"), None)
            if not nxt:
                return items, pages
            if urlsplit(nxt)[:2] != urlsplit(ctx_base := self.client.base_url)[:2] and "://" in nxt:
                raise Failed(f"the next link points to another host than {ctx_base}; not followed")
            resp = self.request("GET", nxt)
        raise Failed(f"search {rtype} had more than {max_pages} pages; stopped following next links")


def _q(params: Mapping[str, str]) -> str:
    return unquote(urlencode(params))


def _id_from_location(location: str | None, rtype: str) -> str | None:
    if not location:
        return None
    parts = location.rstrip("/").split("/")
    if "_history" in parts:
        parts = parts[: parts.index("_history")]
    if len(parts) >= 2 and parts[-2] == rtype:
        return parts[-1]
    return None


def _rewrite_refs(node: Any, idmap: Mapping[str, str]) -> Any:
    if isinstance(node, dict):
        out = {}
        for k, v in node.items():
            if k == "reference" and isinstance(v, str) and v in idmap:
                out[k] = idmap[v]
            else:
                out[k] = _rewrite_refs(v, idmap)
        return out
    if isinstance(node, list):
        return [_rewrite_refs(v, idmap) for v in node]
    return node


def _outcome_hint(resp: Response) -> str:
    doc = resp.json()
    if isinstance(doc, dict) and doc.get("resourceType") == "OperationOutcome":
        issue = (doc.get("issue") or [{}])[0]
        text = issue.get("diagnostics") or (issue.get("details") or {}).get("text") or issue.get("code")
        return f" ({str(text)[:160]})" if text else ""
    return ""


def _identifier_param(system: str, value: str) -> dict[str, str]:
    return {"identifier": f"{system}|{value}"}


def _is_4xx_with_outcome(resp: Response, what: str) -> str:
    if not 400 <= resp.status < 500:
        raise Failed(f"{what}: expected a 4xx answer, got {resp.status}")
    if not resp.is_outcome:
        raise Failed(f"{what}: answered {resp.status} but the body is not an OperationOutcome")
    return f"{what}: {resp.status} with an OperationOutcome{_outcome_hint(resp)}"


# --------------------------------------------------------------------------- comparison


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
        return datetime.fromisoformat(a.replace("Z", "+00:00")) == datetime.fromisoformat(b.replace("Z", "+00:00"))
    except ValueError:
        return False


def compare_resources(sent: Mapping[str, Any], returned: Mapping[str, Any]) -> tuple[list[str], list[str], list[str]]:
    """(lost, changed, added) JSON pointers between what was sent and what came back.

    Server-managed elements (id, meta.versionId, meta.lastUpdated, meta.source, text) are ignored;
    the same instant written differently counts as unchanged.

    >>> compare_resources({"a": 1, "b": [1]}, {"b": [2], "c": 3})
    (['/a'], ['/b/0'], ['/c'])
    """
    mine = {p: v for p, v in _leaves(sent) if not any(p.startswith(x) for x in _VOLATILE)}
    theirs = {p: v for p, v in _leaves(returned) if not any(p.startswith(x) for x in _VOLATILE)}
    lost = [p for p in mine if p not in theirs]
    changed = [p for p in mine if p in theirs and theirs[p] != mine[p] and not _same_instant(mine[p], theirs[p])]
    added = [p for p in theirs if p not in mine]
    return lost, changed, added


# --------------------------------------------------------------------------- capability checks


def _cap_metadata(ctx: Context) -> str:
    resp = ctx.request("GET", "metadata")
    doc = resp.json()
    if resp.status != 200 or not isinstance(doc, dict) or doc.get("resourceType") != "CapabilityStatement":
        raise Failed(f"GET /metadata answered {resp.status}, not a CapabilityStatement")
    ctx.metadata = doc
    ctx.state["metadata_exchange"] = ctx.exchanges[-1]
    return f"CapabilityStatement (kind {doc.get('kind', '?')}, {len(_rest(ctx).get('resource') or [])} resource types)"


def _rest(ctx: Context) -> dict[str, Any]:
    if ctx.metadata is None:
        raise Skipped("no CapabilityStatement (cap-01 failed)")
    for rest in ctx.metadata.get("rest") or []:
        if rest.get("mode", "server") == "server":
            return rest
    return {}


def _cap_version(ctx: Context) -> str:
    if ctx.metadata is None:
        raise Skipped("no CapabilityStatement (cap-01 failed)")
    declared = str(ctx.metadata.get("fhirVersion") or "")
    wanted = ctx.config.fhir_version
    if wanted != "auto":
        if Release.parse(wanted).value != declared:
            raise Failed(f"server declares fhirVersion '{declared}', the check was asked for {wanted}")
        return f"fhirVersion {declared} as requested"
    if declared not in (Release.R4.value, Release.R5.value):
        raise Failed(f"server declares fhirVersion '{declared}'; KAP exchange needs 4.0.1 (R4) or 5.0.0 (R5)"
                     f" — the remaining checks assume {ctx.release.value}")
    return f"fhirVersion {declared}"


def _cap_json(ctx: Context) -> str:
    if ctx.metadata is None:
        raise Skipped("no CapabilityStatement (cap-01 failed)")
    formats = [str(f) for f in ctx.metadata.get("format") or []]
    if not any(f in ("json", FHIR_JSON, "application/json") or f.startswith(FHIR_JSON) for f in formats):
        raise Failed(f"format lists {formats or 'nothing'}; JSON (application/fhir+json) is needed")
    return f"formats: {', '.join(formats)}"


def _resources(ctx: Context) -> dict[str, dict[str, Any]]:
    return {str(r.get("type")): r for r in _rest(ctx).get("resource") or [] if isinstance(r, dict)}


def _cap_interactions(ctx: Context) -> str:
    resources = _resources(ctx)
    missing = []
    for rtype in KAP_TYPES:
        have = {i.get("code") for i in (resources.get(rtype) or {}).get("interaction") or []}
        lacking = [i for i in NEEDED_INTERACTIONS if i not in have]
        if lacking:
            missing.append(f"{rtype} lacks {'/'.join(lacking)}" if rtype in resources else f"{rtype} absent")
    if missing:
        raise Failed("; ".join(missing))
    return f"{len(KAP_TYPES)} types with {', '.join(NEEDED_INTERACTIONS)}"


def _cap_conditional(ctx: Context) -> str:
    resources = _resources(ctx)
    lacking = [t for t in KAP_TYPES if not (resources.get(t) or {}).get("conditionalCreate")]
    if lacking:
        raise Failed(f"conditionalCreate not declared for {', '.join(lacking)}")
    return "conditionalCreate declared for every KAP type"


def _cap_transaction(ctx: Context) -> str:
    codes = {i.get("code") for i in _rest(ctx).get("interaction") or []}
    if "transaction" not in codes:
        raise Failed(f"system interactions {sorted(c for c in codes if c) or 'none'} lack 'transaction'")
    return "transaction declared"


def _cap_smart(ctx: Context) -> str:
    if ctx.config.auth_kind != "smart":
        raise Skipped("auth is not smart")
    resp = ctx.request("GET", ".well-known/smart-configuration")
    doc = resp.json()
    if resp.status != 200 or not isinstance(doc, dict) or not doc.get("token_endpoint"):
        raise Failed(f"GET .well-known/smart-configuration answered {resp.status} without a token_endpoint")
    caps = doc.get("capabilities") or []
    return f"token_endpoint advertised; capabilities: {', '.join(caps) or 'none listed'}"


# --------------------------------------------------------------------------- round-trip checks


def _rt_create(ctx: Context) -> str:
    journey = ctx.create_journey("rt")
    ctx.state["rt"] = journey
    return f"{len(journey)} KAP examples ({ctx.release.short}) created: {', '.join(journey)}"


def _need_rt(ctx: Context) -> dict[str, dict[str, Any]]:
    journey = ctx.state.get("rt")
    if not journey:
        raise Skipped("the examples were not created (rt-01 failed)")
    return journey


def _rt_read(ctx: Context) -> str:
    journey = _need_rt(ctx)
    lost_all, notes = [], []
    for key, item in journey.items():
        stored = item["stored"]
        resp = ctx.request("GET", f"{stored['resourceType']}/{stored['id']}")
        back = resp.json()
        if resp.status != 200 or not isinstance(back, dict):
            raise Failed(f"read {key} answered {resp.status}")
        item["read"] = back
        lost, changed, added = compare_resources(item["sent"], back)
        if lost:
            lost_all.append(f"{key} lost {', '.join(lost[:6])}")
        if changed or added:
            notes.append(f"{key}: changed {', '.join(changed[:4]) or '-'}; added {', '.join(added[:4]) or '-'}")
    if lost_all:
        raise Failed("the server dropped data: " + "; ".join(lost_all))
    return "all read back without loss" + (" (server changes: " + "; ".join(notes) + ")" if notes else "")


def _rt_identifier(ctx: Context) -> str:
    journey = _need_rt(ctx)
    for key, item in journey.items():
        value = item["sent"]["identifier"][-1]["value"]
        found, _ = ctx.search_all(item["stored"]["resourceType"], _identifier_param(ctx.run_system, value))
        ids = [r.get("id") for r in found]
        if ids != [item["stored"]["id"]]:
            raise Failed(f"search by identifier for {key} found {ids}, expected [{item['stored']['id']}]")
    return f"each of {len(journey)} found exactly once by identifier"


def _version(resource: Mapping[str, Any] | None, resp: Response | None = None) -> str | None:
    v = ((resource or {}).get("meta") or {}).get("versionId")
    if not v and resp is not None:
        etag = resp.headers.get("ETag") or resp.headers.get("etag") or ""
        v = etag.replace("W/", "").strip('"') or None
    return v


def _rt_update(ctx: Context) -> str:
    journey = _need_rt(ctx)
    key = next((k for k in journey if k.startswith("ServiceRequest/")), next(iter(journey)))
    item = journey[key]
    current = item.get("read") or item["stored"]
    rtype, rid = current["resourceType"], current["id"]
    version = _version(current)
    if not version:
        raise Failed(f"{key} carries no meta.versionId, so If-Match cannot be used")
    changed = copy.deepcopy(current)
    changed.setdefault("extension", []).append(
        {"url": f"{CANONICAL}/StructureDefinition/kap-goal", "valueString": "check update"})
    resp = ctx.request("PUT", f"{rtype}/{rid}", body=changed, headers={"If-Match": f'W/"{version}"'})
    if resp.status != 200:
        raise Failed(f"update with the current version (If-Match W/\"{version}\") answered {resp.status}"
                     f"{_outcome_hint(resp)}")
    new_version = _version(resp.json(), resp)
    if new_version == version:
        raise Failed(f"update answered 200 but the version stayed {version}")
    stale = ctx.request("PUT", f"{rtype}/{rid}", body=changed, headers={"If-Match": f'W/"{version}"'})
    if stale.status != 412:
        raise Failed(f"update with the stale version {version} answered {stale.status}, expected 412")
    return f"If-Match current → 200 (version {version} → {new_version}); stale → 412"


def _rt_delete(ctx: Context) -> str:
    journey = _need_rt(ctx)
    done = []
    for key in reversed(list(journey)):
        stored = journey[key]["stored"]
        path = f"{stored['resourceType']}/{stored['id']}"
        resp = ctx.request("DELETE", path)
        if resp.status not in (200, 202, 204):
            raise Failed(f"delete {key} answered {resp.status}{_outcome_hint(resp)}")
        after = ctx.request("GET", path)
        if after.status not in (404, 410):
            raise Failed(f"read after delete of {key} answered {after.status}, expected 404 or 410")
        done.append(after.status)
        if (stored["resourceType"], stored["id"]) in ctx.created:
            ctx.created.remove((stored["resourceType"], stored["id"]))
    return f"{len(done)} deleted; reads then answered {sorted(set(done))}"


# --------------------------------------------------------------------------- idempotency checks


def _patient(ctx: Context, value: str) -> dict[str, Any]:
    return {"resourceType": "Patient", "identifier": [{"system": ctx.run_system, "value": value}],
            "active": True}


def _idem_conditional(ctx: Context) -> str:
    value = "idem-conditional"
    header = {"If-None-Exist": f"identifier={ctx.run_system}|{value}"}
    first, _ = ctx.create(_patient(ctx, value), headers=header)
    if first.status not in (200, 201):
        raise Failed(f"first conditional create answered {first.status}{_outcome_hint(first)}")
    second, _ = ctx.create(_patient(ctx, value), headers=header)
    if second.status not in (200, 201):
        raise Failed(f"second conditional create answered {second.status}{_outcome_hint(second)}")
    found, _ = ctx.search_all("Patient", _identifier_param(ctx.run_system, value))
    if len(found) != 1:
        raise Failed(f"two conditional creates with the same If-None-Exist left {len(found)} resources")
    if second.status != 200:
        return f"one resource kept, but the second create answered {second.status} (200 expected)"
    return f"first {first.status}, second {second.status}; exactly one resource"


def _bundle(entries: list[dict[str, Any]]) -> dict[str, Any]:
    return {"resourceType": "Bundle", "type": "transaction", "entry": entries}


def _entry(full_url: str, resource: dict[str, Any]) -> dict[str, Any]:
    return {"fullUrl": full_url, "resource": resource,
            "request": {"method": "POST", "url": resource["resourceType"]}}


def _service_request(ctx: Context, value: str, subject: str) -> dict[str, Any]:
    return {"resourceType": "ServiceRequest", "identifier": [{"system": ctx.run_system, "value": value}],
            "status": "active", "intent": "order", "subject": {"reference": subject}}


def _remember_bundle(ctx: Context, bundle: Any) -> list[str]:
    locations = []
    for e in (bundle or {}).get("entry") or [] if isinstance(bundle, dict) else []:
        loc = ((e or {}).get("response") or {}).get("location") or ""
        parts = loc.split("/_history")[0].split("/")
        if len(parts) >= 2 and (parts[-2], parts[-1]) not in ctx.created:
            ctx.created.append((parts[-2], parts[-1]))
        locations.append("/".join(parts[-2:]))
    return locations


def _idem_transaction(ctx: Context) -> str:
    pid = f"urn:uuid:{uuid.uuid4()}"
    bundle = _bundle([_entry(pid, _patient(ctx, "idem-tx-patient")),
                      _entry(f"urn:uuid:{uuid.uuid4()}", _service_request(ctx, "idem-tx-sr", pid))])
    resp = ctx.request("POST", "", body=bundle)
    doc = resp.json()
    if resp.status != 200 or not isinstance(doc, dict) or doc.get("type") != "transaction-response":
        raise Failed(f"transaction answered {resp.status}{_outcome_hint(resp)}, not a transaction-response")
    locations = _remember_bundle(ctx, doc)
    found, _ = ctx.search_all("ServiceRequest", _identifier_param(ctx.run_system, "idem-tx-sr"))
    patients, _ = ctx.search_all("Patient", _identifier_param(ctx.run_system, "idem-tx-patient"))
    if len(found) != 1 or len(patients) != 1:
        raise Failed(f"after the transaction: {len(patients)} patients, {len(found)} requests (1 and 1 expected)")
    ref = (found[0].get("subject") or {}).get("reference", "")
    want = f"Patient/{patients[0].get('id')}"
    if not (ref == want or ref.endswith("/" + want)):
        raise Failed(f"the urn:uuid reference was stored as '{ref}', not resolved to {want}")
    return f"urn:uuid resolved to {want}; entries at {', '.join(locations)}"


def _idem_atomic(ctx: Context) -> str:
    pid = f"urn:uuid:{uuid.uuid4()}"
    invalid = {"resourceType": "ServiceRequest",
               "identifier": [{"system": ctx.run_system, "value": "idem-atomic-bad"}]}  # no status/intent/subject
    bundle = _bundle([_entry(pid, _patient(ctx, "idem-atomic-patient")),
                      _entry(f"urn:uuid:{uuid.uuid4()}", invalid)])
    resp = ctx.request("POST", "", body=bundle)
    _remember_bundle(ctx, resp.json())
    patients, _ = ctx.search_all("Patient", _identifier_param(ctx.run_system, "idem-atomic-patient"))
    for p in patients:
        if ("Patient", p.get("id")) not in ctx.created:
            ctx.created.append(("Patient", p["id"]))
    if resp.status < 400:
        raise Failed(f"a transaction with an invalid entry (ServiceRequest without status, intent, subject)"
                     f" answered {resp.status}; it must fail as a whole")
    if patients:
        raise Failed(f"the transaction failed ({resp.status}) but its valid Patient entry was kept: "
                     "not rolled back")
    return f"answered {resp.status}; nothing of the transaction remains"


# --------------------------------------------------------------------------- search checks


def _search_set(ctx: Context) -> dict[str, Any]:
    """Create (once) the search data: the journey plus 5 Procedures of varied status/category."""
    if "search" in ctx.state:
        if ctx.state["search"] is None:
            raise Skipped("the search data could not be created")
        return ctx.state["search"]
    ctx.state["search"] = None
    journey = ctx.create_journey("search")
    idmap = ctx.state["idmaps"]["search"]
    proc_key = next(k for k in journey if k.startswith("Procedure/"))
    template = journey[proc_key]["sent"]
    kinds = [("completed", "dosing"), ("completed", "preparation"), ("completed", "integration"),
             ("in-progress", "dosing")]
    procs = [v["stored"] for k, v in journey.items() if k.startswith("Procedure/")]
    system = f"{CANONICAL}/CodeSystem/kap-session-kind"
    for n, (status, kind) in enumerate(kinds):
        res = copy.deepcopy(template)
        res["identifier"] = [i for i in res.get("identifier", []) if i.get("system") != ctx.run_system]
        res["identifier"] = [{**i, "value": f"{i.get('value')}-{n}"} for i in res["identifier"]]
        ctx.tag(res, f"search-proc-{n}")
        res["status"] = status
        concept = {"coding": [{"system": system, "code": kind}]}
        res["category"] = [concept] if isinstance(res.get("category"), list) else concept
        resp, stored = ctx.create(res)
        if resp.status not in (200, 201) or not stored:
            raise Failed(f"creating search Procedure {n} answered {resp.status}{_outcome_hint(resp)}")
        procs.append(stored)
    patient = next(v for k, v in idmap.items() if k.startswith("Patient/"))
    data = {"journey": journey, "idmap": idmap, "patient": patient,
            "procedures": [p for p in procs if _refs(p, "subject") == [patient]],
            "all_procedures": procs,
            "communications": [v["stored"] for k, v in journey.items() if k.startswith("Communication/")],
            "referral": next(v for k, v in idmap.items() if k.startswith("ServiceRequest/"))}
    ctx.state["search"] = data
    return data


def _refs(resource: Mapping[str, Any], element: str) -> list[str]:
    value = resource.get(element)
    items = value if isinstance(value, list) else [value] if value else []
    return [str(i.get("reference")) for i in items if isinstance(i, dict) and i.get("reference")]


def _ids(resources: Iterable[Mapping[str, Any]]) -> list[str]:
    return sorted(str(r.get("id")) for r in resources)


def _expect(ctx: Context, rtype: str, params: dict[str, str], expected: Iterable[Mapping[str, Any]]) -> str:
    found, _ = ctx.search_all(rtype, params)
    want = _ids(expected)
    got = _ids(found)
    if got != want:
        missing = sorted(set(want) - set(got))
        extra = sorted(set(got) - set(want))
        raise Failed(f"{rtype}?{_q(params)} found {len(got)} (expected {len(want)}); "
                     f"missing {missing or '-'}, unexpected {extra or '-'}")
    return f"{rtype}?{_q(params)} → {len(got)} as expected"


def _status_of(p: Mapping[str, Any]) -> str:
    return str(p.get("status"))


def _has_category(p: Mapping[str, Any], system: str, code: str) -> bool:
    cat = p.get("category")
    concepts = cat if isinstance(cat, list) else [cat] if isinstance(cat, dict) else []
    return any(c.get("system") == system and c.get("code") == code
               for concept in concepts if isinstance(concept, dict) for c in concept.get("coding") or [])


def _s_patient(ctx: Context) -> str:
    data = _search_set(ctx)
    return _expect(ctx, "Procedure", {"patient": data["patient"]}, data["procedures"])


def _s_identifier(ctx: Context) -> str:
    data = _search_set(ctx)
    sr = next(v for k, v in data["journey"].items() if k.startswith("ServiceRequest/"))
    value = sr["sent"]["identifier"][-1]["value"]
    return _expect(ctx, "ServiceRequest", _identifier_param(ctx.run_system, value), [sr["stored"]])


def _s_status(ctx: Context) -> str:
    data = _search_set(ctx)
    want = [p for p in data["procedures"] if _status_of(p) == "in-progress"]
    return _expect(ctx, "Procedure", {"patient": data["patient"], "status": "in-progress"}, want)


def _s_category(ctx: Context) -> str:
    data = _search_set(ctx)
    system = f"{CANONICAL}/CodeSystem/kap-session-kind"
    want = [p for p in data["procedures"] if _has_category(p, system, "dosing")]
    return _expect(ctx, "Procedure", {"patient": data["patient"], "category": f"{system}|dosing"}, want)


def _s_based_on(ctx: Context) -> str:
    data = _search_set(ctx)
    want = [p for p in data["all_procedures"] if data["referral"] in _refs(p, "basedOn")]
    return _expect(ctx, "Procedure", {"based-on": data["referral"]}, want)


def _s_recipient(ctx: Context) -> str:
    data = _search_set(ctx)
    recipients = [r for c in data["communications"] for r in _refs(c, "recipient")]
    if not recipients:
        raise Skipped("the Communication examples have no recipient reference")
    want = [c for c in data["communications"]
            if recipients[0] in _refs(c, "recipient") and _refs(c, "subject") == [data["patient"]]]
    return _expect(ctx, "Communication", {"recipient": recipients[0], "patient": data["patient"]}, want)


def _s_last_updated(ctx: Context) -> str:
    data = _search_set(ctx)
    stamps = [str((p.get("meta") or {}).get("lastUpdated") or "") for p in data["procedures"]]
    if not all(stamps):
        raise Failed("created Procedures carry no meta.lastUpdated")
    first = min(stamps, key=lambda s: datetime.fromisoformat(s.replace("Z", "+00:00")))
    a = _expect(ctx, "Procedure", {"patient": data["patient"], "_lastUpdated": f"ge{first}"}, data["procedures"])
    _expect(ctx, "Procedure", {"patient": data["patient"], "_lastUpdated": f"lt{first}"}, [])
    return f"{a}; lt{first} → 0"


def _s_paging(ctx: Context) -> str:
    data = _search_set(ctx)
    count = 2
    found, pages = ctx.search_all("Procedure", {"patient": data["patient"], "_count": str(count)})
    if any(n > count for n in pages):
        raise Failed(f"_count={count} ignored: page sizes {pages}")
    got = [str(r.get("id")) for r in found]
    dupes = sorted({i for i in got if got.count(i) > 1})
    want = _ids(data["procedures"])
    if dupes or sorted(got) != want:
        raise Failed(f"paging returned {len(got)} items over {len(pages)} pages; duplicates {dupes or '-'}, "
                     f"missing {sorted(set(want) - set(got)) or '-'}")
    return f"{len(want)} items over {len(pages)} pages of ≤{count} ({pages}), each exactly once"


# --------------------------------------------------------------------------- error checks


def _e_malformed(ctx: Context) -> str:
    resp = ctx.request("POST", "Patient", raw_body=b'{"resourceType": "Patient", "active": tru')
    return _is_4xx_with_outcome(resp, "malformed JSON")


def _e_unknown_type(ctx: Context) -> str:
    resp = ctx.request("POST", "KapNoSuchType", body={"resourceType": "KapNoSuchType"})
    return _is_4xx_with_outcome(resp, "unknown resource type")


def _e_invalid_structure(ctx: Context) -> str:
    bad = {"resourceType": "ServiceRequest", "identifier": [{"system": ctx.run_system, "value": "err-structure"}]}
    resp, _ = ctx.create(bad)
    return _is_4xx_with_outcome(resp, "ServiceRequest without status, intent and subject")


def _e_invalid_code(ctx: Context) -> str:
    bad = _service_request(ctx, "err-code", "Patient/kap-check-none")
    bad["status"] = "bogus"
    resp, _ = ctx.create(bad)
    return _is_4xx_with_outcome(resp, "ServiceRequest.status 'bogus' (required binding request-status)")


def _e_type_mismatch(ctx: Context) -> str:
    resp = ctx.request("POST", "Patient", body={"resourceType": "Practitioner", "active": True})
    if 200 <= resp.status < 300:
        doc = resp.json()
        if isinstance(doc, dict) and doc.get("id"):
            ctx.created.append((str(doc.get("resourceType")), str(doc["id"])))
    return _is_4xx_with_outcome(resp, "a Practitioner posted to /Patient")


def _e_bad_utf8(ctx: Context) -> str:
    resp = ctx.request("POST", "Patient", raw_body=b'{"resourceType": "Patient", "gender": "\xff\xfe"}')
    return _is_4xx_with_outcome(resp, "a body that is not UTF-8")


# --------------------------------------------------------------------------- validation checks


def _validate_offered(ctx: Context) -> bool:
    rest = _rest(ctx)
    ops = [o for o in rest.get("operation") or []]
    for r in rest.get("resource") or []:
        ops += r.get("operation") or []
    return any(str(o.get("name", "")).lstrip("$") == "validate"
               or str(o.get("definition", "")).endswith("/validate") for o in ops)


def _need_validate(ctx: Context) -> None:
    if not _validate_offered(ctx):
        raise Skipped("the CapabilityStatement does not offer $validate")


def _validate(ctx: Context, resource: dict[str, Any]) -> tuple[Response, list[dict[str, Any]]]:
    resp = ctx.request("POST", f"{resource['resourceType']}/$validate", body=resource)
    doc = resp.json()
    if isinstance(doc, dict) and doc.get("resourceType") == "Parameters":
        doc = next((p.get("resource") for p in doc.get("parameter") or [] if p.get("name") == "return"), None)
    if not isinstance(doc, dict) or doc.get("resourceType") != "OperationOutcome":
        raise Failed(f"$validate answered {resp.status} without an OperationOutcome")
    errors = [i for i in doc.get("issue") or [] if i.get("severity") in ("error", "fatal")]
    return resp, errors


def _v_valid(ctx: Context) -> str:
    _need_validate(ctx)
    example = next(e for e in ctx.examples() if e["resourceType"] == "ServiceRequest")
    resp, errors = _validate(ctx, example)
    if errors or resp.status >= 400:
        raise Failed(f"$validate rejected the valid KAP referral example ({resp.status}): "
                     f"{_outcome_hint(resp)}")
    return f"valid KAP referral accepted ({resp.status})"


def _v_invalid(item: Mapping[str, Any]) -> Callable[[Context], str]:
    def run(ctx: Context) -> str:
        _need_validate(ctx)
        resp, errors = _validate(ctx, copy.deepcopy(item["resource"]))
        if not errors:
            raise Failed(f"$validate accepted {item['file']} ({item['why']}) with {resp.status} and no error issue")
        return f"rejected with {len(errors)} error issue(s){_outcome_hint(resp)}"
    return run


# --------------------------------------------------------------------------- security checks


def _need_auth(ctx: Context) -> None:
    if ctx.config.auth_kind == "none":
        raise Skipped("no auth configured (--auth none): the server is used without credentials")


def _sec_no_token(ctx: Context) -> str:
    _need_auth(ctx)
    unauth = FhirClient(ctx.config.server, auth=NoAuth(), timeout=ctx.config.timeout)
    resp = ctx.request("GET", "Patient", params={"_count": "1"}, client=unauth)
    if resp.status not in (401, 403):
        raise Failed(f"a search without a token answered {resp.status}, expected 401 or 403")
    return f"no token → {resp.status}"


def _sec_wrong_token(ctx: Context) -> str:
    _need_auth(ctx)
    wrong = FhirClient(ctx.config.server, auth=BearerAuth(f"kap-check-wrong-{uuid.uuid4().hex}"),
                       timeout=ctx.config.timeout)
    resp = ctx.request("GET", "Patient", params={"_count": "1"}, client=wrong)
    if resp.status not in (401, 403):
        raise Failed(f"a search with a wrong token answered {resp.status}, expected 401 or 403")
    return f"wrong token → {resp.status}"


def _sec_no_echo(ctx: Context) -> str:
    _need_auth(ctx)
    if not ctx.secrets:
        raise Skipped("no credential was sent during this run")
    if ctx.echoed:
        raise Failed(f"the credential appeared in {len(ctx.echoed)} response(s): {', '.join(ctx.echoed[:5])}")
    return f"credential absent from all {ctx.responses_seen} responses of the run"


# --------------------------------------------------------------------------- registry


def _checks(invalid: Sequence[Mapping[str, Any]]) -> list[Check]:
    R4 = "FHIR R4 "
    out = [
        Check("cap-01", "capability", "/metadata returns a CapabilityStatement", R4 + "http.html#capabilities", True, _cap_metadata),
        Check("cap-02", "capability", "fhirVersion is 4.0.1 or 5.0.0 (as requested)", R4 + "capabilitystatement.html (fhirVersion)", True, _cap_version),
        Check("cap-03", "capability", "JSON format supported", R4 + "http.html#mime-type", True, _cap_json),
        Check("cap-04", "capability", "KAP resource types support create/read/update/search-type", R4 + "capabilitystatement.html (rest.resource.interaction)", True, _cap_interactions),
        Check("cap-05", "capability", "conditional create declared", R4 + "http.html#ccreate", True, _cap_conditional),
        Check("cap-06", "capability", "transaction declared", R4 + "http.html#transaction", True, _cap_transaction),
        Check("cap-07", "capability", "SMART discovery document", "SMART App Launch 2.0 conformance.html (.well-known/smart-configuration)", True, _cap_smart),
        Check("rt-01", "round-trip", "each KAP example is created", R4 + "http.html#create", True, _rt_create),
        Check("rt-02", "round-trip", "read back without losing data", R4 + "http.html#read", True, _rt_read),
        Check("rt-03", "round-trip", "found by identifier", R4 + "search.html#token (identifier)", True, _rt_identifier),
        Check("rt-04", "round-trip", "update with If-Match; stale version → 412", R4 + "http.html#concurrency", True, _rt_update),
        Check("rt-05", "round-trip", "delete, then read → 404/410", R4 + "http.html#delete", True, _rt_delete),
        Check("idem-01", "idempotency", "conditional create twice → one resource", R4 + "http.html#ccreate", True, _idem_conditional),
        Check("idem-02", "idempotency", "transaction resolves urn:uuid references", R4 + "http.html#trules", True, _idem_transaction),
        Check("idem-03", "idempotency", "transaction with an invalid entry is rolled back whole", R4 + "http.html#transaction", True, _idem_atomic),
        Check("srch-01", "search", "search by patient", R4 + "procedure.html#search (patient)", True, _s_patient),
        Check("srch-02", "search", "search by identifier", R4 + "search.html#token", True, _s_identifier),
        Check("srch-03", "search", "search by status", R4 + "procedure.html#search (status)", True, _s_status),
        Check("srch-04", "search", "search by category (system|code)", R4 + "search.html#token", True, _s_category),
        Check("srch-05", "search", "search by based-on", R4 + "procedure.html#search (based-on)", True, _s_based_on),
        Check("srch-06", "search", "search by recipient", R4 + "communication.html#search (recipient)", True, _s_recipient),
        Check("srch-07", "search", "search by _lastUpdated", R4 + "search.html#lastUpdated", True, _s_last_updated),
        Check("srch-08", "search", "_count paging to the end", R4 + "http.html#paging", True, _s_paging),
        Check("err-01", "errors", "malformed JSON → 4xx with OperationOutcome", R4 + "http.html#create (400)", True, _e_malformed),
        Check("err-02", "errors", "unknown resource type → 4xx with OperationOutcome", R4 + "http.html#general (404 unknown type)", True, _e_unknown_type),
        Check("err-03", "errors", "missing required elements → 4xx with OperationOutcome", R4 + "http.html#create (400/422)", True, _e_invalid_structure),
        Check("err-04", "errors", "resourceType not matching the URL → 4xx", R4 + "http.html#create", True, _e_type_mismatch),
        # Not required: the adapter validates every resource it sends itself, so a server that
        # skips code checks can still exchange KAP data; it is a risk for data from other clients.
        Check("err-05", "errors", "invalid code (status 'bogus') → 4xx with OperationOutcome", R4 + "terminologies.html#required", False, _e_invalid_code),
        # Not required: the adapter only sends UTF-8 (orjson); a 500 here is robustness, not exchange.
        Check("err-06", "errors", "body not UTF-8 → 4xx with OperationOutcome", "RFC 8259 §8.1; " + R4 + "json.html", False, _e_bad_utf8),
        Check("val-01", "validation", "$validate accepts a valid KAP example", R4 + "resource-operation-validate.html", True, _v_valid),
    ]
    for n, item in enumerate(invalid, start=2):
        out.append(Check(f"val-{n:02d}", "validation", f"$validate rejects {item['title']}", item["rule"],
                         bool(item.get("required", True)), _v_invalid(item)))
    out += [
        Check("sec-01", "security", "no token → 401/403", "RFC 6750 §3.1; SMART Backend Services", True, _sec_no_token),
        Check("sec-02", "security", "wrong token → 401/403", "RFC 6750 §3.1 (invalid_token)", True, _sec_wrong_token),
        Check("sec-03", "security", "the server does not echo the credential", "RFC 6750 §5.3; OWASP ASVS 8.3", True, _sec_no_echo),
    ]
    return out


def all_checks(invalid_dir: Path | None = None) -> list[Check]:
    """Every check, in run order (the validation checks depend on the invalid-examples manifest)."""
    folder = invalid_dir or data_path("profiles") / "examples" / "invalid"
    return _checks(load_invalid_examples(Path(folder)))


# --------------------------------------------------------------------------- runner


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def run_checks(config: CheckConfig, *, progress: Callable[[int, int, CheckResult | None, Check], None] | None = None,
               client: Any = None) -> RunReport:
    """Run the checks against `config.server`; raise ServerUnreachable when it cannot be reached."""
    unknown = [g for g in config.only if g not in GROUPS]
    if unknown:
        raise ConfigError(f"unknown check group(s) {', '.join(unknown)}; choose from {', '.join(GROUPS)}",
                          rule="check:only")
    checks = all_checks(config.invalid_dir)
    client = client or FhirClient(config.server, auth=config.auth or NoAuth(), timeout=config.timeout,
                                  session=config.session)
    ctx = Context(config=config, client=client, run_id=str(uuid.uuid4()))
    ctx.secrets.update(s for s in config.secrets if s)
    started = _now()
    try:
        probe = ctx.request("GET", "metadata")
    except OSError as exc:  # requests' ConnectionError/Timeout are OSErrors
        raise ServerUnreachable(f"cannot reach {config.server} ({type(exc).__name__})", retryable=True,
                                url=config.server) from None
    except ServerError as exc:
        if exc.status is None:
            raise ServerUnreachable(f"cannot reach {config.server} ({exc.summary})", retryable=True,
                                    url=config.server) from None
        raise
    ctx.exchanges.clear()
    doc = probe.json()
    declared = doc.get("fhirVersion") if isinstance(doc, dict) else None
    if config.fhir_version != "auto":
        ctx.release = Release.parse(config.fhir_version)
    else:
        try:
            ctx.release = Release.parse(declared)
        except ConfigError:
            ctx.release = Release.R4
    wanted = [c for c in checks if not config.only or c.group in config.only]
    if config.only and "capability" not in config.only:
        wanted = [c for c in checks if c.id == "cap-01"] + wanted  # the others read its metadata
    results: list[CheckResult] = []
    for n, check in enumerate(wanted):
        if progress:
            progress(n, len(wanted), None, check)
        result = _run_one(ctx, check)
        results.append(result)
        if progress:
            progress(n + 1, len(wanted), result, check)
    problems: list[str] = []
    if not config.keep_data:
        problems = _cleanup(ctx)
    return RunReport(server=config.server, fhir_version=declared, auth=config.auth_kind,
                     run_system=ctx.run_system, started=started, finished=_now(),
                     results=tuple(results), data_kept=config.keep_data, cleanup_problems=tuple(problems))


def _run_one(ctx: Context, check: Check) -> CheckResult:
    ctx.exchanges.clear()
    t0 = time.monotonic()
    try:
        reason = check.run(ctx)
        outcome = "pass"
    except Failed as exc:
        outcome, reason = "fail", str(exc)
    except Skipped as exc:
        outcome, reason = "skip", str(exc)
    except OSError as exc:
        outcome, reason = "fail", f"connection failed during the check ({type(exc).__name__})"
    except KapError as exc:
        outcome, reason = "fail", f"{type(exc).__name__}: {exc}"
    ms = int((time.monotonic() - t0) * 1000)
    kept = tuple(ctx.exchanges[-4:]) if outcome == "fail" else ()
    if outcome == "fail" and not kept and check.group == "capability" and "metadata_exchange" in ctx.state:
        kept = (ctx.state["metadata_exchange"],)  # the CapabilityStatement is the evidence
    return CheckResult(check.id, check.group, check.title, check.rule, check.required, outcome,
                       reason, kept, ms)


def _cleanup(ctx: Context) -> list[str]:
    """Delete what the run created (newest first); also anything found under the run system."""
    problems = []
    seen = set(ctx.created)
    for rtype in CREATE_ORDER:
        try:
            resp = ctx.request("GET", rtype, params={"identifier": f"{ctx.run_system}|", "_count": "100"})
            bundle = resp.json() if resp.status == 200 else None
        except (OSError, KapError):
            bundle = None
        for e in (bundle or {}).get("entry") or [] if isinstance(bundle, dict) else []:
            res = e.get("resource") or {}
            key = (str(res.get("resourceType") or ""), str(res.get("id") or ""))
            if key[0] and key[1] and key not in seen:
                ctx.created.append(key)
                seen.add(key)
    order = {t: i for i, t in enumerate(CREATE_ORDER)}
    for rtype, rid in sorted(ctx.created[::-1], key=lambda k: -order.get(k[0], -1)):
        try:
            resp = ctx.request("DELETE", f"{rtype}/{rid}")
            if resp.status not in (200, 202, 204, 404, 410):
                problems.append(f"{rtype}/{rid}: delete answered {resp.status}")
        except (OSError, KapError) as exc:
            problems.append(f"{rtype}/{rid}: {type(exc).__name__}")
    ctx.created.clear()
    return problems
