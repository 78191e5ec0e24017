"""The `$validate` operation: what the validator (and, for a create or update, the bridge's own
inbound rules) says about a resource, as an OperationOutcome; nothing is ever stored
(exchange/, layer 3: orchestration; imports base, pure core, storage/ and `inbound` of its own room).

    POST [base]/Type/$validate        body: the resource, or Parameters(resource, mode, profile)
    POST [base]/Type/id/$validate     the same, for an instance (mode update / delete)

What is wrong with the resource comes back as issues of a 200 OperationOutcome (FHIR: the
operation succeeded, its answer is the list of issues); only a request the operation cannot
read (no resource, a Parameters naming an unknown mode, a resource of another type than the
URL) is an InputError (400). `profile`: the base StructureDefinition of the type or one of the
KAP profiles (`KAP_PROFILES`); any other is an error issue `validate:profile`, never a guess.
`mode`: absent (FHIR rules and the profiles the resource claims), `create` (also the bridge's
inbound rules: the KAP record and authorship, as a POST would apply them; not a Consent
identifier's ownership, checked by the write alone: `$validate` answers the same whether another
writer holds the identifier or nobody does, so it cannot be asked who holds which),
`update` (the same, for the caller's own resource of an updatable type), `delete` (the bridge
deletes nothing: one error issue).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

from ..errors import InputError, Issue, operation_outcome
from ..validation import KAP_PROFILES, Validator
from .inbound import Inbound
from .inbound_rules import UPDATE_TYPES

__all__ = ["MODES", "validate_operation"]

MODES = ("create", "update", "delete")
BASE_PROFILE = "http://hl7.org/fhir/StructureDefinition/"


def validate_operation(
    body: Any,
    rtype: str,
    rid: str | None,
    *,
    query: Mapping[str, Sequence[str]],
    inbound: Inbound,
    source: str,
    may_write: bool = True,
) -> dict[str, Any]:
    """The OperationOutcome of `$validate` on `rtype` (an instance when `rid` is given) for the
    request `body` and its `query` parameters, asked by partner `source` (InputError when the
    request itself cannot be read). `may_write`: whether `source` may write `rtype`; the bridge's
    own create/update rules (authorship, its own resources) are checked
    only then, so a partner that cannot write learns nothing from them about others' data."""
    resource, mode, profile = _read_request(body, query)
    if mode in ("update", "delete") and rid is None:
        raise InputError(
            f"mode '{mode}' validates an instance: POST [base]/{rtype}/[id]/$validate",
            rule="validate:mode",
            code="value",
        )
    if resource is None and mode != "delete":
        raise InputError(
            "$validate needs the resource: the body, or a Parameters with a 'resource' parameter",
            pointer="",
            rule="validate:resource",
            code="required",
        )
    if resource is not None and resource.get("resourceType") != rtype:
        given = resource.get("resourceType")
        raise InputError(
            f"resourceType '{str(given)[:40]}' does not match the URL ({rtype})",
            pointer="/resourceType",
            expression="resourceType",
            rule="http:type-mismatch",
        )
    if mode == "delete":
        return operation_outcome(
            [
                Issue(
                    "error",
                    "not-supported",
                    "this server deletes nothing (DELETE answers 405); withdraw a referral or revoke a "
                    "consent with an update of its status",
                    rule="validate:delete",
                )
            ]
        )
    assert resource is not None
    issues: list[Issue] = []
    checked = copy.deepcopy(resource)
    if mode in ("create", "update") and may_write:
        checked = inbound.filled(checked, source=source)  # as the write would fill it
    if profile is not None:
        issues += _profile(checked, rtype, profile)
    issues += Validator.load(inbound.release).validate(checked)
    if mode in ("create", "update") and not may_write:
        issues.append(
            Issue(
                "information",
                "informational",
                f"this partner may not write {rtype}: only the FHIR and profile rules were checked, "
                f"not the bridge's own {mode} rules",
                rule="validate:no-write-scope",
            )
        )
    elif mode in ("create", "update"):
        issues += _not_yet_said(issues, _inbound_issues(checked, rtype, rid, mode, inbound, source))
    if not any(i.severity != "information" for i in issues):
        issues = [Issue("information", "informational", "No issues found", rule="validate:ok"), *issues]
    return operation_outcome(issues)


def _read_request(
    body: Any, query: Mapping[str, Sequence[str]]
) -> tuple[dict[str, Any] | None, str | None, str | None]:
    """(resource, mode, profile) from a resource body or a Parameters body; query parameters
    `mode` and `profile` apply to a resource body."""
    if not isinstance(body, dict):
        raise InputError("the body must be a FHIR resource or a Parameters", pointer="", rule="fhir:resource")
    mode = _last(query.get("mode"))
    profile = _last(query.get("profile"))
    resource: dict[str, Any] | None = body
    if body.get("resourceType") == "Parameters":
        resource = None
        params = body.get("parameter")
        for i, p in enumerate(params if isinstance(params, list) else []):
            name = p.get("name") if isinstance(p, dict) else None
            if name == "resource":
                if not isinstance(p.get("resource"), dict):
                    raise InputError(
                        "parameter 'resource' must carry a resource",
                        pointer=f"/parameter/{i}/resource",
                        rule="validate:resource",
                    )
                resource = p["resource"]
            elif name == "mode":
                mode = _value(p, i, ("valueCode", "valueString"))
            elif name == "profile":
                profile = _value(p, i, ("valueUri", "valueCanonical", "valueString"))
    if mode is not None and mode not in MODES:
        raise InputError(
            f"mode must be one of {', '.join(MODES)}, not '{mode[:30]}'", rule="validate:mode", code="value"
        )
    return resource, mode, profile


def _last(values: Sequence[str] | None) -> str | None:
    return values[-1] if values else None


def _value(p: dict[str, Any], i: int, keys: tuple[str, ...]) -> str:
    for k in keys:
        if isinstance(p.get(k), str):
            return str(p[k])
    raise InputError(
        f"parameter '{p.get('name')}' needs a {' or '.join(keys)}",
        pointer=f"/parameter/{i}",
        rule="validate:parameter",
    )


def _profile(resource: dict[str, Any], rtype: str, profile: str) -> list[Issue]:
    """Make the validator check `profile` too (it checks the profiles a resource claims); an
    issue when the server does not know it or it is for another type."""
    url = profile.split("|", 1)[0]
    if url == BASE_PROFILE + rtype:
        return []
    if url not in KAP_PROFILES:
        return [
            Issue(
                "error",
                "not-supported",
                f"profile '{url[:120]}' is not known to this server; it validates against the base "
                f"FHIR {rtype} and the KAP profiles: {', '.join(KAP_PROFILES)}",
                rule="validate:profile",
            )
        ]
    if KAP_PROFILES[url] != rtype:
        return [
            Issue(
                "error",
                "invalid",
                f"profile '{url}' constrains {KAP_PROFILES[url]}, not {rtype}",
                rule="validate:profile",
            )
        ]
    meta = resource.get("meta")
    meta = dict(meta) if isinstance(meta, dict) else {}
    given = meta.get("profile")
    claimed = [p for p in (given if isinstance(given, list) else []) if isinstance(p, str)]
    meta["profile"] = claimed if url in claimed else [*claimed, url]
    resource["meta"] = meta
    return []


def _inbound_issues(
    resource: dict[str, Any], rtype: str, rid: str | None, mode: str, inbound: Inbound, source: str
) -> list[Issue]:
    """What a create (or update) of `resource` by `source` would be refused for, without storing it."""
    issues: list[Issue] = []
    if mode == "update":
        if rtype not in UPDATE_TYPES:
            return [
                Issue(
                    "error",
                    "not-supported",
                    f"{rtype} is not updated here; updatable: {', '.join(UPDATE_TYPES)}",
                    rule="validate:update-type",
                )
            ]
        if resource.get("id") != rid:
            issues.append(
                Issue(
                    "error",
                    "invalid",
                    "the resource's id must match the id in the URL",
                    f"{rtype}.id",
                    "/id",
                    "http:id-mismatch",
                )
            )
        if not inbound.store.matching(rtype, {"_id": [str(rid)]}, source=source, limit=1):
            issues.append(Issue("error", "not-found", f"{rtype}/{rid} is not known", rule="fhir:not-found"))
    return issues + [i for i in inbound.preview(resource, source=source) if i.severity != "information"]


def _not_yet_said(said: Sequence[Issue], more: Sequence[Issue]) -> list[Issue]:
    seen = {(i.rule, i.pointer, i.message) for i in said}
    return [i for i in more if (i.rule, i.pointer, i.message) not in seen]
