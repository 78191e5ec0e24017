"""What a check works with: its configuration, the run's `Context` and the recorded HTTP exchanges
(conformance/, layer 3: orchestration; imports base only: the FhirClient comes in as `Context.client`).

A check is a function of the `Context` that returns its pass reason or raises `Failed` /
`Skipped`. The context sends every request through `FhirClient.raw`, so the checks see exact
status codes and bodies, and records each exchange masked (masking.py), noting any credential a
response echoes. Test data is created under a run-specific identifier system
(`http://fhir-kap.example/sid/check-run/<uuid>`), carries the run's tag in `meta.tag`
(system `http://fhir-kap.example/CodeSystem/kap-check-run`, code = the run id; `Context.mark`)
and is remembered for clean-up. `Context.exercise` notes each interaction a check meant to
succeed with, so a capability the CapabilityStatement claims but the server does not honour is
reported (cap-08).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlencode, urlsplit

from .. import jsonio
from ..config import CANONICAL, Release, data_path
from ..errors import InputError
from .examples import load_examples
from .masking import mask_body, mask_headers, mask_text

RUN_SYSTEM_BASE = f"{CANONICAL}/sid/check-run/"
RUN_TAG_SYSTEM = f"{CANONICAL}/CodeSystem/kap-check-run"
FHIR_JSON = "application/fhir+json"
SPEC_R4 = "FHIR R4 "  # how the rule of a check cites the R4 specification


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
        return {
            "method": self.method,
            "url": self.url,
            "request": {"headers": dict(self.request_headers), "body": self.request_body},
            "response": {
                "status": self.status,
                "headers": dict(self.response_headers),
                "body": self.response_body,
            },
        }


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
    role: str = "full"  # a key of registry.ROLES: which checks run, what the capability checks need
    read_only: bool = False  # run only the checks that write nothing


@dataclass(frozen=True)
class Check:
    """One conformance check: `run` returns the pass reason or raises Failed / Skipped."""

    id: str
    group: str
    title: str
    rule: str
    required: bool
    run: Callable[[Context], str]  # returns the pass reason; raises Failed / Skipped


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
    # What the role needs of the CapabilityStatement: type -> interactions, conditional-create
    # types, and whether transactions are needed (set by the runner from registry.ROLES).
    needs: dict[str, tuple[str, ...]] = field(default_factory=dict)
    conditional_types: tuple[str, ...] = ()
    needs_transaction: bool = True
    # (type or "" for system, interaction, status, "METHOD path") of each request meant to succeed.
    exercised: list[tuple[str, str, int, str]] = field(default_factory=list)
    _examples: list[dict[str, Any]] | None = None

    @property
    def run_system(self) -> str:
        return RUN_SYSTEM_BASE + self.run_id

    @property
    def run_tag(self) -> dict[str, str]:
        """The run's tag (`meta.tag`) on every resource the run writes."""
        return {"system": RUN_TAG_SYSTEM, "code": self.run_id, "display": "fhir-kap check test data"}

    def mark(self, resource: dict[str, Any]) -> dict[str, Any]:
        """Add the run's tag to `resource.meta.tag` (once); return the resource."""
        meta = resource.setdefault("meta", {})
        tags = meta.setdefault("tag", [])
        if not any(t.get("system") == RUN_TAG_SYSTEM and t.get("code") == self.run_id for t in tags):
            tags.append(self.run_tag)
        return resource

    def exercise(self, rtype: str, interaction: str, resp: Response, what: str) -> None:
        """Note an interaction a check meant to succeed with (read by cap-08 after the run)."""
        self.exercised.append((rtype, interaction, resp.status, what))

    def request(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        raw_body: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        params: Mapping[str, str] | None = None,
        client: Any = None,
    ) -> Response:
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
            if secret and (
                secret.encode() in content or any(secret in str(v) for v in resp.headers.values())
            ):
                self.echoed.append(f"{method} {path}")
        self.exchanges.append(
            Exchange(
                method=method,
                url=mask_text(str(getattr(resp, "url", path)), self.secrets),
                request_headers=mask_headers(sent_headers, self.secrets),
                request_body=mask_body(data, self.secrets),
                status=resp.status_code,
                response_headers=mask_headers(resp.headers, self.secrets),
                response_body=mask_body(content, self.secrets),
            )
        )
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

    def create(
        self, resource: dict[str, Any], headers: Mapping[str, str] | None = None, *, probe: bool = False
    ) -> tuple[Response, dict[str, Any] | None]:
        """POST a resource with the run's tag; remember it for clean-up; return (response, stored or None).

        `probe`: the resource is meant to be refused (an error check), so the attempt is not
        counted as exercising the create interaction."""
        rtype = resource["resourceType"]
        self.mark(resource)
        resp = self.request("POST", rtype, body=resource, headers=headers)
        if not probe:
            conditional = bool(headers and any(k.lower() == "if-none-exist" for k in headers))
            self.exercise(rtype, "conditional-create" if conditional else "create", resp, f"POST {rtype}")
        stored = resp.json() if resp.status in (200, 201) else None
        rid = stored.get("id") if isinstance(stored, dict) else None
        if not rid and resp.status in (200, 201):
            rid = _id_from_location(resp.headers.get("Location") or resp.headers.get("location"), rtype)
        if rid and (rtype, rid) not in self.created:
            self.created.append((rtype, rid))
        if isinstance(stored, dict) and not stored.get("id") and rid:
            stored["id"] = rid
        return resp, stored if isinstance(stored, dict) and stored.get("resourceType") == rtype else (
            {**resource, "id": rid} if rid else None
        )

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
                raise Failed(
                    f"creating {example['resourceType']} (example {example.get('id')}) "
                    f"answered {resp.status}{outcome_hint(resp)}"
                )
            idmap[key] = f"{stored['resourceType']}/{stored['id']}"
            out[key] = {"sent": res, "stored": stored}
        self.state.setdefault("idmaps", {})[label] = idmap
        return out

    def search_all(
        self, rtype: str, params: Mapping[str, str], max_pages: int = 50
    ) -> tuple[list[dict[str, Any]], list[int]]:
        """Search and follow `next` links; return (matching resources, entries per page)."""
        resp = self.request("GET", rtype, params=params)
        self.exercise(rtype, "search-type", resp, f"GET {rtype}?{query_text(params)}")
        items: list[dict[str, Any]] = []
        pages: list[int] = []
        for _ in range(max_pages):
            bundle = resp.json()
            if resp.status != 200 or not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle":
                raise Failed(
                    f"search {rtype}?{query_text(params)} answered {resp.status}{outcome_hint(resp)}"
                )
            found = [
                e.get("resource")
                for e in bundle.get("entry") or []
                if isinstance(e, dict) and (e.get("search") or {}).get("mode", "match") == "match"
            ]
            pages.append(len(found))
            items += [r for r in found if isinstance(r, dict)]
            nxt = next(
                (link.get("url") for link in bundle.get("link") or [] if link.get("relation") == "next"), None
            )
            if not nxt:
                return items, pages
            if urlsplit(nxt)[:2] != urlsplit(ctx_base := self.client.base_url)[:2] and "://" in nxt:
                raise Failed(f"the next link points to another host than {ctx_base}; not followed")
            resp = self.request("GET", nxt)
        raise Failed(f"search {rtype} had more than {max_pages} pages; stopped following next links")


def query_text(params: Mapping[str, str]) -> str:
    """Search parameters as a reason shows them: `identifier=sys|v&_count=2`, unescaped."""
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


def outcome_hint(resp: Response) -> str:
    """' (first issue of the OperationOutcome)' to append to a reason, or '' when there is none."""
    doc = resp.json()
    if isinstance(doc, dict) and doc.get("resourceType") == "OperationOutcome":
        issue = (doc.get("issue") or [{}])[0]
        text = issue.get("diagnostics") or (issue.get("details") or {}).get("text") or issue.get("code")
        return f" ({str(text)[:160]})" if text else ""
    return ""


def identifier_param(system: str, value: str) -> dict[str, str]:
    """The search parameter for one identifier: {"identifier": "system|value"}."""
    return {"identifier": f"{system}|{value}"}
