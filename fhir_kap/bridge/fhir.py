"""The FHIR facade under /fhir: metadata, create, update, transaction/batch, read, vread, history,
search and $validate.

Updates (`PUT Type/id` with `If-Match`, conditional `PUT Type?identifier=...`) are for a partner's
own resources of the four KAP types and the parties (`UPDATE_TYPES`); any other interaction on a served type is 405
with Allow, DELETE included (the bridge keeps what partners wrote; a referral is withdrawn and a
consent revoked by an update of its status).

Room: bridge/ (layer 4, entry point; the only Flask user): may import any room; nothing imports it but cli/.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import urlencode

from flask import Flask, Response, request
from werkzeug.exceptions import MethodNotAllowed

from .. import jsonio
from ..errors import (
    Forbidden,
    Gone,
    InputError,
    Issue,
    NotFound,
    PreconditionFailed,
    UnsupportedMediaType,
)
from ..exchange.inbound import UPDATE_TYPES, WRITE_TYPES, parse_query
from ..exchange.validate import validate_operation
from ..fhir.digits import ascii_digits
from ..storage.partners import Partner
from ..storage.store import (
    DEFAULT_COUNT,
    ID_PATTERN,
    MAX_COUNT,
    REFERENCE_PARAMS,
    SEARCH_PARAMS,
    StoredResource,
    check_condition,
)
from ..validation import KAP_PROFILES, resource_types
from .access import search_page
from .app import FHIR_JSON, current_partner, fhir_response, host_base, http_date, services

__all__ = ["READ_TYPES", "capability_statement", "if_match_version", "read_json_body", "register"]

READ_TYPES = WRITE_TYPES + ("Task",)
KAP_PROFILE = {rtype: url for url, rtype in KAP_PROFILES.items()}  # resource type -> its KAP profile
_TYPE_NAME = re.compile(r"^[A-Z][A-Za-z]{1,63}$")
_VERSION = re.compile(r"^[1-9][0-9]{0,8}\Z")
_ACCEPTED_TYPES = ("application/fhir+json", "application/json", "application/json+fhir")
_ETAG = re.compile(r'^\s*(?:W/)?"([1-9][0-9]{0,8})"\s*\Z')
#: Query parameters of a conditional update that are not part of its condition.
_NOT_CONDITION = ("_format", "_pretty")
#: What `_history` reads (`_count`, `_offset`, `_since`) and, as a search does, accepts and
#: ignores (`_summary`, `_total`: the answer is whole resources, the total when known).
_HISTORY_PARAMS = frozenset({"_count", "_offset", "_since", "_summary", "_total", *_NOT_CONDITION})


def read_json_body(accepted: tuple[str, ...] = _ACCEPTED_TYPES) -> Any:
    """The request body parsed as JSON (415 for another media type, 400 for malformed JSON)."""
    mimetype = request.mimetype
    if mimetype not in accepted:
        shown = mimetype[:60] if mimetype else "none"
        raise UnsupportedMediaType(
            f"Content-Type '{shown}' is not supported; send {accepted[0]}", rule="http:content-type"
        )
    charset = request.mimetype_params.get("charset")
    if charset and charset.lower().replace("-", "") != "utf8":
        raise UnsupportedMediaType("Only the UTF-8 charset is supported", rule="http:charset")
    data = request.get_data(cache=False)
    if not data.strip():
        raise InputError("The request body is empty", pointer="", rule="json:empty")
    return jsonio.loads(data, source="body")


def _visible(rtype: str, rid: str) -> tuple[Partner, Any, StoredResource]:
    """The caller, the services and the current resource, when the caller may read it; else
    the same 404 a resource that does not exist gets."""
    partner = current_partner()
    _check_type(rtype)
    _scope(partner, rtype, "read")
    _check_id(rtype, rid)
    svc = services()
    current = svc.store.get(rtype, rid)
    if current is None or not svc.access.can_read(partner, current):
        raise _not_found(rtype, rid)
    return partner, svc, current


def _check_type(rtype: str, types: tuple[str, ...] = READ_TYPES) -> None:
    if rtype not in types:
        shown = f"'{rtype}'" if _TYPE_NAME.match(rtype) else "given"
        raise NotFound(
            f"Resource type {shown} is not supported here; supported: {', '.join(types)}",
            rule="fhir:resource-type",
            code="not-supported",
        )


def _check_id(rtype: str, rid: str) -> None:
    if not ID_PATTERN.match(rid):
        raise InputError(
            "A resource id is 1-64 characters of A-Z, a-z, 0-9, '-' and '.'",
            expression=f"{rtype}.id",
            rule="fhir:id",
            code="value",
        )


def _scope(partner: Partner, rtype: str, interaction: str) -> None:
    if not partner.allows(rtype, interaction):
        raise Forbidden(f"This partner's scopes do not allow {interaction} on {rtype}", rule="auth:scope")


def _not_found(rtype: str, rid: str) -> NotFound:
    # The same text whether the resource is absent, deleted, or only not visible to this partner.
    return NotFound(f"{rtype}/{rid} is not known", expression=rtype, rule="fhir:not-found")


def _base() -> str:
    given = services().options.base_url
    return given.rstrip("/") if given else host_base(request.scheme, request.host) + "/fhir"


def _headers(s: StoredResource, *, location: bool = False) -> dict[str, str]:
    out = {"ETag": s.etag, "Last-Modified": http_date(s.last_updated)}
    if location:
        out["Location"] = f"{_base()}/{s.type}/{s.id}/_history/{s.version}"
    return out


def _prefer() -> str:
    for part in request.environ.get("HTTP_PREFER", "").split(";"):
        key, _, value = part.strip().partition("=")
        if key.strip() == "return":
            return value.strip().strip('"')
    return "representation"


def _created(
    s: StoredResource, created: bool, issues: tuple[Issue, ...] = (), *, updated: bool = False
) -> Response:
    """The answer to a create or update: the resource, nothing (return=minimal), or an
    OperationOutcome with every issue the inbound path found (return=OperationOutcome; the same
    issues `fhir-kap import` reports for that resource)."""
    prefer = _prefer()
    status = 201 if created else 200
    if prefer == "minimal":
        return fhir_response(None, status, _headers(s, location=True))
    if prefer == "OperationOutcome":
        oo = {
            "resourceType": "OperationOutcome",
            "issue": [
                {
                    "severity": "information",
                    "code": "informational",
                    "details": {
                        "text": f"{s.type}/{s.id} "
                        + (
                            "created"
                            if created
                            else f"updated to version {s.version}"
                            if updated
                            else "already exists (same identifier)"
                        )
                    },
                },
                *(i.to_fhir() for i in issues),
            ],
        }
        return fhir_response(oo, status, _headers(s, location=True))
    return fhir_response(s.resource, status, _headers(s, location=True))


def register(app: Flask) -> None:
    @app.get("/fhir/metadata", endpoint="fhir_metadata")
    def metadata() -> Response:
        return fhir_response(capability_statement(_base()))

    @app.post("/fhir", endpoint="fhir_bundle")
    def bundle() -> Response:
        partner = current_partner()
        body = read_json_body()
        if not isinstance(body, dict) or body.get("resourceType") != "Bundle":
            raise InputError(
                "POST /fhir takes a Bundle of type transaction or batch",
                pointer="/resourceType",
                rule="bridge:bundle",
            )
        raw_entries = body.get("entry")
        entries: list[Any] = raw_entries if isinstance(raw_entries, list) else []
        for e in entries:
            res = e.get("resource") if isinstance(e, dict) else None
            rt = res.get("resourceType") if isinstance(res, dict) else None
            if isinstance(rt, str) and rt in WRITE_TYPES:
                _scope(partner, rt, "write")
        result = services().inbound.accept_bundle(
            body, source=partner.name, authority=partner.is_consent_authority
        )
        for entry in result.bundle["entry"]:
            if "fullUrl" in entry:
                entry["fullUrl"] = f"{_base()}/{entry['fullUrl']}"
        return fhir_response(result.bundle, 200)

    @app.post("/fhir/<rtype>", endpoint="fhir_create")
    def create(rtype: str) -> Response:
        partner = current_partner()
        if rtype in READ_TYPES and rtype not in WRITE_TYPES:  # served, read-only (Task): FHIR says 405
            raise MethodNotAllowed(valid_methods=_allowed_methods(rtype))
        _check_type(rtype, WRITE_TYPES)
        _scope(partner, rtype, "write")
        body = _resource_body(rtype)
        cond_header = request.headers.get("If-None-Exist")
        cond = parse_query(cond_header) if cond_header else None
        # Only a consent authority's Consents, people and organisations feed the consent gate.
        acc = services().inbound.accept(
            body,
            source=partner.name,
            if_none_exist=cond,
            authority=partner.is_consent_authority,
            detail=_prefer() == "OperationOutcome",  # what is kept of it: only when it is shown
        )
        return _created(acc.stored, acc.created, acc.issues)

    @app.put("/fhir/<rtype>/<rid>", endpoint="fhir_update")
    def update(rtype: str, rid: str) -> Response:
        partner = _updater(rtype, f"{rtype}/{rid}")
        _check_id(rtype, rid)
        body = _resource_body(rtype)
        if body.get("id") != rid:
            raise InputError(
                f"the resource's id must be the id in the URL ({rid})",
                pointer="/id",
                expression=f"{rtype}.id",
                rule="http:id-mismatch",
            )
        if_match = if_match_version()
        if if_match is None:
            raise PreconditionFailed(
                f'an update needs If-Match: W/"n" with the version last read (the ETag of GET {rtype}/{rid}); '
                f"or update by identifier: PUT {rtype}?identifier=SYSTEM|VALUE",
                rule="http:if-match-required",
                code="required",
            )
        svc = services()
        if partner.is_clinic:  # it reads every resource: a plain 404 would contradict its read
            cur = svc.store.get(rtype, rid)
            if cur is not None and not cur.deleted and cur.source != partner.name:
                raise Forbidden(
                    f"only the partner that wrote {rtype}/{rid} may update it", rule="bridge:update-owner"
                )
        acc = svc.inbound.update(
            body,
            source=partner.name,
            rid=rid,
            if_match=if_match,
            authority=partner.is_consent_authority,
            detail=_prefer() == "OperationOutcome",
        )
        return _created(acc.stored, acc.created, acc.issues, updated=acc.updated)

    @app.put("/fhir/<rtype>", endpoint="fhir_conditional_update")
    def conditional_update(rtype: str) -> Response:
        partner = _updater(rtype, rtype)
        condition = {k: v for k, v in request.args.to_dict(flat=False).items() if k not in _NOT_CONDITION}
        if not condition:
            raise InputError(
                f"PUT {rtype} needs a condition: PUT {rtype}?identifier=SYSTEM|VALUE (or PUT {rtype}/[id])",
                rule="http:conditional-update",
            )
        check_condition(condition)
        body = _resource_body(rtype)
        acc = services().inbound.update(
            body,
            source=partner.name,
            condition=condition,
            if_match=if_match_version(),
            authority=partner.is_consent_authority,
            detail=_prefer() == "OperationOutcome",
        )
        return _created(acc.stored, acc.created, acc.issues, updated=acc.updated)

    @app.post("/fhir/<rtype>/$validate", endpoint="fhir_validate_type")
    def validate_type(rtype: str) -> Response:
        return _validate(rtype, None)

    @app.post("/fhir/<rtype>/<rid>/$validate", endpoint="fhir_validate_instance")
    def validate_instance(rtype: str, rid: str) -> Response:
        _check_id(rtype, rid)
        return _validate(rtype, rid)

    @app.get("/fhir/<rtype>/<rid>", endpoint="fhir_read")
    def read(rtype: str, rid: str) -> Response:
        _, _, stored = _visible(rtype, rid)
        if stored.deleted:
            raise Gone(f"{rtype}/{rid} was deleted", rule="fhir:deleted")
        return fhir_response(stored.resource, 200, _headers(stored))

    @app.get("/fhir/<rtype>/<rid>/_history/<vid>", endpoint="fhir_vread")
    def vread(rtype: str, rid: str, vid: str) -> Response:
        partner, svc, _ = _visible(rtype, rid)
        if not _VERSION.match(vid):
            raise InputError("A version id is a positive integer", rule="fhir:version-id", code="value")
        stored = svc.store.vread(rtype, rid, int(vid))
        if stored is None or not (
            stored.deleted and partner.is_clinic or svc.access.can_read(partner, stored)
        ):
            raise NotFound(f"{rtype}/{rid} has no version {vid}", rule="fhir:not-found")
        return fhir_response(stored.resource, 200, _headers(stored))

    @app.get("/fhir/<rtype>/<rid>/_history", endpoint="fhir_history")
    def history(rtype: str, rid: str) -> Response:
        """A page of versions, newest first (`_count`, `_offset`): at most `_count` versions read,
        decided and audited per request, the AuditEvents in one commit (as a search's)."""
        partner, svc, _ = _visible(rtype, rid)
        args = request.args.to_dict(flat=False)
        unknown = sorted(set(args) - _HISTORY_PARAMS)
        if unknown:  # as a search: a parameter not understood is said, never ignored
            raise InputError(
                f"_history parameter '{unknown[0][:40]}' is not supported; supported: _count, _offset, _since",
                expression=unknown[0][:40],
                rule="search:unknown-parameter",
                code="not-supported",
            )
        count = _int_param(args.get("_count"), "_count", DEFAULT_COUNT, MAX_COUNT)
        offset = _int_param(args.get("_offset"), "_offset", 0, 10_000_000)
        since = args["_since"][-1] if args.get("_since") else None
        versions = svc.store.history(rtype, rid, count=count + 1, offset=offset, since=since)
        more = len(versions) > count
        versions = versions[:count]
        seen = None if partner.is_clinic else svc.access.searcher(partner)
        shown = [
            s
            for s in versions
            if (s.deleted and partner.is_clinic) or (not s.deleted and (seen is None or seen(s)))
        ]
        if seen is not None:
            seen.disclosed(shown)
        base = _base()
        entries = []
        for s in shown:
            entry: dict[str, Any] = {"fullUrl": f"{base}/{rtype}/{rid}"}
            if not s.deleted:
                entry["resource"] = s.resource
            entry["request"] = {
                "method": "DELETE" if s.deleted else ("POST" if s.version == 1 else "PUT"),
                "url": rtype if s.version == 1 else f"{rtype}/{rid}",
            }
            entry["response"] = {
                "status": "200" if not s.deleted else "204",
                "etag": s.etag,
                "lastModified": s.last_updated,
            }
            entries.append(entry)

        def link(relation: str, off: int) -> dict[str, str]:
            kept = [("_since", since)] if since is not None else []
            query = urlencode([*kept, ("_count", str(count)), ("_offset", str(off))])
            return {"relation": relation, "url": f"{base}/{rtype}/{rid}/_history?{query}"}

        links = [link("self", offset)]
        if more and count > 0:
            links.append(link("next", offset + count))
        if offset > 0:
            links.append(link("previous", max(0, offset - count)))
        bundle: dict[str, Any] = {"resourceType": "Bundle", "type": "history"}
        if offset == 0 and not more:  # the whole history is this page
            bundle["total"] = len(entries)
        bundle["link"] = links
        bundle["entry"] = entries
        return fhir_response(bundle)

    @app.get("/fhir/<rtype>", endpoint="fhir_search")
    def search(rtype: str) -> Response:
        partner = current_partner()
        _check_type(rtype)
        _scope(partner, rtype, "search")
        params = request.args.to_dict(flat=False)
        count = _int_param(params.pop("_count", None), "_count", DEFAULT_COUNT, MAX_COUNT)
        offset = _int_param(params.pop("_offset", None), "_offset", 0, 10_000_000)
        svc = services()
        total: int | None
        if partner.is_clinic:
            result = svc.store.search(rtype, params, count=count, offset=offset)
            items, total = result.items, result.total
            following = offset + count if offset + count < result.total and count > 0 else None
        else:
            # Bounded: at most scan_budget(_count) candidates decided and audited per page; the
            # total is left out when this page could not decide every candidate.
            found = search_page(svc.access, partner, rtype, params, count=count, offset=offset)
            items, total, following = found.items, found.total, found.next_offset
        base = _base()

        def link(relation: str, off: int) -> dict[str, str]:
            query = [(k, v) for k, vs in params.items() for v in vs] + [
                ("_count", str(count)),
                ("_offset", str(off)),
            ]
            return {"relation": relation, "url": f"{base}/{rtype}?{urlencode(query)}"}

        links = [link("self", offset)]
        if following is not None:
            links.append(link("next", following))
        if offset > 0:
            links.append(link("previous", max(0, offset - count)))
        bundle: dict[str, Any] = {"resourceType": "Bundle", "type": "searchset"}
        if total is not None:
            bundle["total"] = total
        bundle["link"] = links
        bundle["entry"] = [
            {
                "fullUrl": f"{base}/{s.type}/{s.id}",
                "resource": s.resource,
                "search": {"mode": "match"},
            }
            for s in items
        ]
        return fhir_response(bundle)

    @app.route(
        "/fhir/<path:rest>", methods=["GET", "POST", "PUT", "PATCH", "DELETE"], endpoint="fhir_unsupported"
    )
    def unsupported(rest: str) -> Response:
        allowed = _allowed_methods(rest)
        if allowed:  # a known type or instance: the interaction is what is missing (FHIR: 405)
            raise MethodNotAllowed(valid_methods=allowed)
        raise NotFound(
            f"{request.method} on this path is not supported by this server",
            rule="fhir:interaction",
            code="not-supported",
        )


_TYPE_PATH = re.compile(
    r"^([A-Z][A-Za-z]{1,63})(/[A-Za-z0-9\-.]{1,64}(/_history(/[A-Za-z0-9\-.]{1,64})?)?)?/?$"
)


def _allowed_methods(rest: str) -> list[str]:
    """The methods the bridge answers on `/fhir/<rest>` when it names a type it serves (the
    type: search, create where partners may write, conditional update where they may update; an
    instance: read, and update where they may; its history: read)."""
    m = _TYPE_PATH.match(rest)
    if not m or m.group(1) not in READ_TYPES:
        return []
    updatable = m.group(1) in UPDATE_TYPES
    if m.group(3):
        return ["GET", "HEAD"]
    if m.group(2):
        return ["GET", "HEAD", "PUT"] if updatable else ["GET", "HEAD"]
    methods = ["GET", "HEAD"] + (["POST"] if m.group(1) in WRITE_TYPES else [])
    return methods + (["PUT"] if updatable else [])


def _updater(rtype: str, path: str) -> Partner:
    """The caller of an update of `rtype`, when partners may update that type and its scopes allow
    writing it (405 with Allow on another served type, 404 on a type not served)."""
    partner = current_partner()
    if rtype not in UPDATE_TYPES:
        allowed = _allowed_methods(path)
        if allowed:
            raise MethodNotAllowed(valid_methods=allowed)
        _check_type(rtype, UPDATE_TYPES)
    _scope(partner, rtype, "write")
    return partner


def _resource_body(rtype: str) -> dict[str, Any]:
    """The request body: a resource of type `rtype` (400 otherwise)."""
    body = read_json_body()
    if not isinstance(body, dict):
        raise InputError("The body must be a FHIR resource (a JSON object)", pointer="", rule="fhir:resource")
    if body.get("resourceType") != rtype:
        given = body.get("resourceType")
        shown = f"'{given}'" if isinstance(given, str) and _TYPE_NAME.match(given) else "missing or invalid"
        raise InputError(
            f"resourceType {shown} does not match the URL ({rtype})",
            pointer="/resourceType",
            expression="resourceType",
            rule="http:type-mismatch",
        )
    return body


def if_match_version() -> int | None:
    """The version an `If-Match: W/"n"` header names (None without one; 400 when unreadable)."""
    given = request.headers.get("If-Match")
    if given is None:
        return None
    m = _ETAG.match(given)
    if not m:
        raise InputError(
            'If-Match must be a version ETag such as W/"3" (the ETag of the last read)',
            expression="If-Match",
            rule="http:if-match",
            code="value",
        )
    return int(m.group(1))


def _validate(rtype: str, rid: str | None) -> Response:
    """$validate: any authenticated partner (no write scope: it stores nothing), any resource type
    of the deployment's release."""
    partner = current_partner()
    svc = services()
    if rtype not in resource_types(svc.release):
        shown = f"'{rtype}'" if _TYPE_NAME.match(rtype) else "given"
        raise NotFound(
            f"Resource type {shown} is not a FHIR {svc.release.value} resource type",
            rule="fhir:resource-type",
            code="not-supported",
        )
    outcome = validate_operation(
        read_json_body(),
        rtype,
        rid,
        query=request.args.to_dict(flat=False),
        inbound=svc.inbound,
        source=partner.name,
        may_write=partner.allows(rtype, "write") and rtype in WRITE_TYPES,
    )
    return fhir_response(outcome, 200)


def _int_param(values: list[str] | None, name: str, default: int, maximum: int) -> int:
    """The last value of `name`: ASCII digits only, 0 to `maximum`; anything else a 400 naming it.

    Not `str.isdigit()`: it also takes `²` or `①`, which `int()` refuses (a 500), while `int()` reads
    other scripts' digits (`٣`) and cannot read more than 4300 digits at all."""
    if not values:
        return default
    value = values[-1]
    if not ascii_digits(value) or int(value) > maximum:
        raise InputError(
            f"{name} must be an integer from 0 to {maximum} (ASCII digits)",
            expression=name,
            rule=f"search:{name}",
            code="value",
        )
    return int(value)


#: $validate, type and instance level, on every type the bridge serves (and any other FHIR type).
VALIDATE_OPERATION = {
    "name": "validate",
    "definition": "http://hl7.org/fhir/OperationDefinition/Resource-validate",
    "documentation": "POST [type]/$validate or [type]/[id]/$validate with the resource or a Parameters "
    "(resource, mode create|update|delete, profile: the base or a KAP profile); answers 200 with "
    "an OperationOutcome, stores nothing, needs no write scope.",
}


def capability_statement(base: str) -> dict[str, Any]:
    """What this server does, exactly: the types, interactions and search parameters it supports."""
    from .. import __version__

    release = services().release
    resources = []
    for rtype in READ_TYPES:
        interactions = ["read", "vread", "history-instance", "search-type"]
        if rtype in UPDATE_TYPES:
            interactions.insert(1, "update")
        if rtype in WRITE_TYPES:
            interactions.insert(0, "create")
        entry: dict[str, Any] = {"type": rtype}
        if rtype in KAP_PROFILE:
            entry["supportedProfile"] = [KAP_PROFILE[rtype]]
        if rtype in UPDATE_TYPES:
            entry["documentation"] = (
                "A partner updates only what it wrote: PUT [type]/[id] needs If-Match (412 without "
                "it or on a stale version); PUT [type]?identifier=SYSTEM|VALUE updates the one match "
                "among the partner's own, creates when none matches, 412 for several. A Consent's "
                "update (status inactive/rejected revokes) applies to every read and delivery at once; "
                "a ServiceRequest updated to revoked or entered-in-error cancels its Task."
            )
        entry["interaction"] = [{"code": c} for c in interactions]
        # versioned-update: an update by id must name the version it replaces (If-Match)
        entry["versioning"] = "versioned-update" if rtype in UPDATE_TYPES else "versioned"
        entry["readHistory"] = True
        entry["updateCreate"] = False
        entry["conditionalCreate"] = rtype in WRITE_TYPES
        entry["conditionalUpdate"] = rtype in UPDATE_TYPES
        entry["conditionalDelete"] = "not-supported"
        params = [{"name": "_id", "type": "token"}, {"name": "_lastUpdated", "type": "date"}]
        for name in SEARCH_PARAMS.get(rtype, {}):
            params.append({"name": name, "type": "reference" if name in REFERENCE_PARAMS else "token"})
        entry["searchParam"] = params
        entry["operation"] = [VALIDATE_OPERATION]
        resources.append(entry)
    from .subscriptions import capability

    extra_resources, extensions = capability(release)
    resources.extend(extra_resources)
    statement: dict[str, Any] = {
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": "2025-01-01",
        "publisher": "fhir-kap",
        "kind": "instance",
        "software": {"name": "fhir-kap bridge", "version": __version__},
        "implementation": {"description": "fhir-kap bridge for KAP collaborative care", "url": base},
        "fhirVersion": release.value,
        "format": [FHIR_JSON, "json"],
        "rest": [
            {
                "mode": "server",
                "documentation": "Partners authenticate with a bearer token; each reads only what it sent and what "
                "is addressed to it and permitted by consent. _count (max 200) and _offset page "
                "searches; a partner's page looks at a bounded number of candidates, so it may hold "
                "fewer than _count entries (follow the next link) and its total may be absent.",
                "security": {
                    "cors": False,
                    "service": [
                        {
                            "coding": [
                                {
                                    "system": "http://terminology.hl7.org/CodeSystem/restful-security-service",
                                    "code": "SMART-on-FHIR",
                                }
                            ]
                        }
                    ],
                    "description": "Bearer tokens: one issued per partner (fhir-kap partners add), or short-lived "
                    "SMART Backend Services tokens (private_key_jwt; see "
                    ".well-known/smart-configuration)",
                },
                "resource": resources,
                "interaction": [{"code": "transaction"}, {"code": "batch"}],
            }
        ],
    }
    if extensions:
        statement["extension"] = extensions
    return statement
