"""The rules a partner's write follows (exchange/, layer 3: orchestration; imports base and
storage's types only, and writes nothing: `inbound.Inbound` applies these in its transaction).

What may be written (`WRITE_TYPES`), how a posted Bundle and each of its entries must look
(`bundle_entries`, `bundle_entry`: POST only, bounded nesting, an `If-None-Exist` condition
that selects something, `parse_query`), how urn:uuid references of a transaction are rewritten,
who a resource is addressed to (`addressed_to`, used for rest-hooks and by the bridge's read
check), and how a referral's Task is made and moved.

A referral (ServiceRequest) gets a BSeR-style Task when it first arrives: `focus` and
`basedOn` the referral, `for` its subject, `requester` the referring practitioner, `owner`
the clinic, `businessStatus` `received`. The clinic moves it along `REFERRAL_FLOW`; FHIR
`Task.status` follows in step (`TASK_STATUS`). The Task keeps the referral's source
partner, so the practice that sent the referral can read its progress. Because that read
needs no consent, the Task carries status only: never free text. A reason for a status is
one code of `REFERRAL_REASONS` (Task.statusReason as a coding).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from ..config import CANONICAL, CS, Release
from ..errors import Conflict, InputError, KapError, NotFound
from ..fhir.references import PARTY_TYPES
from ..jsonio import MAX_DEPTH, too_deep
from ..records.ingest import CLINICAL_CONTEXT_TYPES
from ..storage.partners import Partner
from ..storage.store import ID_PATTERN, StoredResource, check_condition, instant_now

__all__ = [
    "BUNDLE_TYPES",
    "MAX_DEPTH",
    "REFERRAL_FLOW",
    "REFERRAL_REASONS",
    "REFERRAL_REASON_SYSTEM",
    "REFERRAL_STATUS_SYSTEM",
    "Resolve",
    "TASK_STATUS",
    "UPDATE_TYPES",
    "URN_UUID",
    "WITHDRAWN_REFERRAL",
    "WRITE_TYPES",
    "addressed_to",
    "bundle_entries",
    "bundle_entry",
    "check_status_move",
    "check_update_type",
    "moved_task",
    "parse_query",
    "referral_task",
    "remembering",
    "rewrite_references",
]

#: Resource types partners may create: the four KAP resources, the parties they reference, and
#: the clinical context a referral carries (readable by its sender and the clinic only).
WRITE_TYPES = (
    "ServiceRequest",
    "Consent",
    "Communication",
    "Procedure",
    "Patient",
    "Practitioner",
    "PractitionerRole",
    "Organization",
    *CLINICAL_CONTEXT_TYPES,
)
#: Resource types a partner may update (its own only: `PUT Type/id`, `PUT Type?identifier=`):
#: the four KAP types (a referral it amends or withdraws, a session record it corrects, a consent
#: it changes or revokes, a note it corrects or marks entered-in-error) and the parties it wrote
#: (a client's new address, a therapist's new role). Each update is a new version (`_history`)
#: and passes every check a create does; readers see the current version, consent-checked as
#: ever, and a consent authority's updated Consent or party reaches the gate in the same commit
#: (as far as its scope admits it). The referral's context (Condition, ...) is kept as sent.
UPDATE_TYPES = ("ServiceRequest", "Procedure", "Consent", "Communication", *PARTY_TYPES)
#: ServiceRequest statuses that withdraw a referral: an update into one cancels its Task
#: (when the flow still allows `cancelled`; a final Task stays as it is).
WITHDRAWN_REFERRAL = frozenset({"revoked", "entered-in-error"})
#: The code system of a referral Task's businessStatus.
REFERRAL_STATUS_SYSTEM = f"{CANONICAL}/CodeSystem/kap-referral-status"
#: businessStatus -> the business statuses it may move to.
REFERRAL_FLOW: dict[str, tuple[str, ...]] = {
    "received": ("accepted", "declined", "cancelled"),
    "accepted": ("scheduled", "in-progress", "cancelled"),
    "scheduled": ("scheduled", "in-progress", "cancelled"),
    "in-progress": ("completed", "cancelled"),
    "declined": (),
    "completed": (),
    "cancelled": (),
}
#: businessStatus -> FHIR Task.status.
TASK_STATUS = {
    "received": "received",
    "accepted": "accepted",
    "declined": "rejected",
    "scheduled": "accepted",
    "in-progress": "in-progress",
    "completed": "completed",
    "cancelled": "cancelled",
}
_DISPLAY = {
    "received": "Referral received",
    "accepted": "Referral accepted",
    "declined": "Referral declined",
    "scheduled": "Intake scheduled",
    "in-progress": "Care in progress",
    "completed": "Care completed",
    "cancelled": "Referral cancelled",
}
#: Reason codes a status move may carry (the only reason a referring practice sees; no free text).
REFERRAL_REASON_SYSTEM = f"{CANONICAL}/CodeSystem/kap-referral-status-reason"
REFERRAL_REASONS = {
    "not-eligible": "Not eligible for KAP",
    "client-declined": "Client declined",
    "client-unreachable": "Client could not be reached",
    "capacity": "No capacity",
    "duplicate": "Duplicate referral",
    "other": "Other reason",
}
#: A transaction entry's fullUrl that other entries may reference (rewritten to the id assigned).
URN_UUID = re.compile(r"^urn:uuid:[0-9a-fA-F-]{36}$")


#: Bundle types a partner may post: transaction / batch as FHIR defines them; collection,
#: document and searchset (what an EHR exports or answers) are taken as a transaction of
#: conditional creates (each resource once per business identifier), all or nothing.
BUNDLE_TYPES = ("transaction", "batch", "collection", "document", "searchset")


def bundle_entries(bundle: Any) -> tuple[str, list[dict[str, Any]]]:
    """The kind (one of `BUNDLE_TYPES`) and the entries of a Bundle a partner posts.

    InputError for anything else, for entries that are not objects, and past 500 entries.
    """
    if not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle":
        raise InputError(
            "POST /fhir takes a Bundle (transaction, batch, collection, document or searchset)",
            pointer="/resourceType",
            rule="bridge:bundle",
        )
    kind = bundle.get("type")
    if kind not in BUNDLE_TYPES:
        raise InputError(
            f"Bundle.type must be one of {', '.join(BUNDLE_TYPES)}, not '{str(kind)[:30]}'",
            pointer="/type",
            expression="Bundle.type",
            rule="bridge:bundle-type",
        )
    entries = bundle.get("entry", [])
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise InputError(
            "Bundle.entry must be a list of objects",
            pointer="/entry",
            expression="Bundle.entry",
            rule="bridge:bundle-entry",
        )
    if len(entries) > 500:
        raise InputError(
            "a Bundle may carry at most 500 entries",
            pointer="/entry",
            rule="bridge:bundle-size",
            code="too-costly",
        )
    return kind, entries


def bundle_entry(
    entry: dict[str, Any], i: int, kind: str = "transaction"
) -> tuple[dict[str, Any], dict[str, list[str]] | None, str]:
    """The resource of Bundle entry `i`, its condition (parsed, or None) and the operation:
    "create" (POST, `ifNoneExist` the condition) or "update" (PUT to a conditional URL
    `Type?identifier=...`: the one match is updated, none creates, several is 412).

    Entries of a collection, document or searchset have no request: they are creates. Nested
    at most `MAX_DEPTH` levels; every InputError points into the entry.
    """
    ptr = f"/entry/{i}"
    resource = entry.get("resource")
    if not isinstance(resource, dict):
        raise InputError(
            "entry.resource must be a FHIR resource",
            pointer=f"{ptr}/resource",
            expression=f"Bundle.entry[{i}].resource",
            rule="bridge:bundle-entry",
        )
    full = entry.get("fullUrl")
    if full is not None and not isinstance(full, str):
        raise InputError(
            f"Bundle.entry[{i}].fullUrl must be a string (a URI)",
            pointer=f"{ptr}/fullUrl",
            expression=f"Bundle.entry[{i}].fullUrl",
            rule="bridge:bundle-fullurl",
        )
    if too_deep(resource, MAX_DEPTH):
        raise InputError(
            f"Bundle.entry[{i}].resource is nested deeper than {MAX_DEPTH} levels",
            pointer=f"{ptr}/resource",
            expression=f"Bundle.entry[{i}].resource",
            rule="bridge:nesting",
            code="too-costly",
        )
    if kind not in ("transaction", "batch"):
        return resource, None, "create"
    req = entry.get("request")
    method = req.get("method") if isinstance(req, dict) else None
    if not isinstance(req, dict) or method not in ("POST", "PUT"):
        raise InputError(
            "only entries with request.method POST (create) or PUT to a conditional URL are supported",
            pointer=f"{ptr}/request/method",
            expression=f"Bundle.entry[{i}].request.method",
            rule="bridge:bundle-method",
            code="not-supported",
        )
    url = req.get("url")
    rtype = resource.get("resourceType")
    if method == "PUT":
        if not isinstance(url, str) or not url.startswith(f"{rtype}?"):
            raise InputError(
                f"a PUT entry's request.url must be a conditional URL '{str(rtype)[:40]}?identifier=SYSTEM|VALUE'",
                pointer=f"{ptr}/request/url",
                expression=f"Bundle.entry[{i}].request.url",
                rule="bridge:bundle-url",
                code="not-supported",
            )
        check_update_type(
            rtype, pointer=f"{ptr}/request/method", expression=f"Bundle.entry[{i}].request.method"
        )
        try:
            return resource, parse_query(url), "update"
        except KapError as exc:
            raise type(exc)([x.prefixed(pointer_prefix=f"{ptr}/request/url") for x in exc.issues]) from None
    if url != rtype:
        raise InputError(
            f"request.url must be the resource type '{str(rtype)[:40]}'",
            pointer=f"{ptr}/request/url",
            expression=f"Bundle.entry[{i}].request.url",
            rule="bridge:bundle-url",
        )
    cond = req.get("ifNoneExist")
    if cond is not None and not isinstance(cond, str):
        raise InputError(
            "request.ifNoneExist must be a string",
            pointer=f"{ptr}/request/ifNoneExist",
            rule="bridge:bundle-entry",
        )
    if cond is None:
        return resource, None, "create"
    try:
        return resource, parse_query(cond), "create"
    except KapError as exc:
        raise type(exc)(
            [x.prefixed(pointer_prefix=f"{ptr}/request/ifNoneExist") for x in exc.issues]
        ) from None


def check_update_type(rtype: Any, *, pointer: str = "/resourceType", expression: str | None = None) -> None:
    """400 `bridge:update-type` unless partners may update `rtype` (a plain PUT, a conditional
    PUT, a transaction's PUT entry alike: the referral's context is kept as sent)."""
    if rtype not in UPDATE_TYPES:
        raise InputError(
            f"resourceType '{str(rtype)[:40]}' cannot be updated here; updatable: {', '.join(UPDATE_TYPES)}",
            pointer=pointer,
            expression=expression,
            rule="bridge:update-type",
            code="not-supported",
        )


def check_status_move(referral_id: str, business_status: str, reason: str | None) -> None:
    """Refuse a status move the flow cannot contain: a status not in `REFERRAL_FLOW` or a reason
    not in `REFERRAL_REASONS` (InputError), an id no referral can have (NotFound)."""
    if business_status not in REFERRAL_FLOW:
        raise InputError(
            f"status '{business_status[:40]}' is not one of {', '.join(REFERRAL_FLOW)}",
            pointer="/status",
            rule="referral:status",
            code="value",
        )
    if reason is not None and (not isinstance(reason, str) or reason not in REFERRAL_REASONS):
        raise InputError(
            "reason must be one of the codes " + ", ".join(REFERRAL_REASONS) + " (no free text: "
            "the referring practice sees it without a consent check)",
            pointer="/reason",
            rule="referral:reason",
            code="value",
        )
    if not ID_PATTERN.match(referral_id):
        raise NotFound("no such referral", rule="referral:unknown")


def moved_task(
    task: Mapping[str, Any], business_status: str, reason: str | None, release: Release
) -> dict[str, Any]:
    """A copy of the referral's Task moved to `business_status` (Conflict if `REFERRAL_FLOW` does
    not allow it from where it is), with `reason` as its statusReason coding (R5: a
    CodeableReference's `concept`) or none."""
    now_status = _business_status(task)
    if business_status not in REFERRAL_FLOW.get(now_status, ()):
        raise Conflict(
            f"a referral that is '{now_status}' cannot become '{business_status}'; allowed: "
            f"{', '.join(REFERRAL_FLOW.get(now_status, ())) or 'none (final)'}",
            pointer="/status",
            rule="referral:transition",
        )
    task = dict(task)
    task["status"] = TASK_STATUS[business_status]
    task["businessStatus"] = _business_concept(business_status)
    task["lastModified"] = instant_now()
    if reason:
        concept = {
            "coding": [
                {"system": REFERRAL_REASON_SYSTEM, "code": reason, "display": REFERRAL_REASONS[reason]}
            ]
        }
        task["statusReason"] = {"concept": concept} if release is Release.R5 else concept
    else:
        task.pop("statusReason", None)
    return task


def referral_task(referral: StoredResource, owner: dict[str, Any]) -> dict[str, Any]:
    """The BSeR-style Task that tracks a new referral (businessStatus `received`)."""
    sr = referral.resource
    now = instant_now()
    task: dict[str, Any] = {
        "resourceType": "Task",
        "meta": {
            "tag": [{"system": CS.INFO_CATEGORY, "code": "care-coordination"}],
            "security": [{"system": CS.V3_CONFIDENTIALITY, "code": "R"}],
        },
        "basedOn": [{"reference": f"ServiceRequest/{referral.id}"}],
        "status": TASK_STATUS["received"],
        "businessStatus": _business_concept("received"),
        "intent": "order",
        "code": {"coding": [{"system": "http://hl7.org/fhir/CodeSystem/task-code", "code": "fulfill"}]},
        "focus": {"reference": f"ServiceRequest/{referral.id}"},
        "authoredOn": now,
        "lastModified": now,
        "owner": owner,
    }
    if isinstance(sr.get("subject"), dict):
        task["for"] = sr["subject"]
    if isinstance(sr.get("requester"), dict):
        task["requester"] = sr["requester"]
    return task


def _business_concept(code: str) -> dict[str, Any]:
    return {
        "coding": [{"system": REFERRAL_STATUS_SYSTEM, "code": code, "display": _DISPLAY[code]}],
        "text": _DISPLAY[code],
    }


def _business_status(task: Mapping[str, Any]) -> str:
    for c in (task.get("businessStatus") or {}).get("coding") or []:
        if c.get("system") == REFERRAL_STATUS_SYSTEM:
            return str(c.get("code"))
    return "received"


def addressed_to(
    resource: dict[str, Any], partner: Partner, resolve: Callable[[str, str], StoredResource | None]
) -> str | None:
    """The key naming `partner` among the resource's recipients, or None.

    Recipients: Communication.recipient, Task.requester and Task.restriction.recipient. A
    recipient matches by literal reference (the partner's `references`), by a logical
    identifier, or by the identifiers (NPI, organisation id) of the resource it references,
    looked up with `resolve(type, id)`; a PractitionerRole also matches through its
    practitioner and organization.
    """
    keys = set(partner.recipient_keys)
    for ref in _recipients(resource):
        hit = _match(ref, keys, resolve, depth=0)
        if hit:
            return hit
    return None


#: How `addressed_to` reads a party a recipient references: (type, id) -> the current version.
Resolve = Callable[[str, str], StoredResource | None]


def remembering(
    resolve: Resolve, seen: dict[tuple[str, str], StoredResource | None] | None = None
) -> Resolve:
    """`resolve` reading each (type, id) once, the answers kept in `seen`: for the decisions of
    one request or one write (a search over 100 notes naming the same 20 parties reads each party
    once), never longer (a party changed since then would not be seen)."""
    memo: dict[tuple[str, str], StoredResource | None] = {} if seen is None else seen

    def get(rtype: str, rid: str) -> StoredResource | None:
        key = (rtype, rid)
        if key not in memo:
            memo[key] = resolve(rtype, rid)
        return memo[key]

    return get


def _recipients(resource: dict[str, Any]) -> Iterator[dict[str, Any]]:
    rt = resource.get("resourceType")
    candidates: list[Any] = []
    if rt == "Communication":
        candidates = list(resource.get("recipient") or [])
    elif rt == "Task":
        candidates = [resource.get("requester")]
        candidates += list((resource.get("restriction") or {}).get("recipient") or [])
    for c in candidates:
        if isinstance(c, dict):
            yield c


def _match(
    ref: dict[str, Any], keys: set[str], resolve: Callable[[str, str], StoredResource | None], depth: int
) -> str | None:
    literal = ref.get("reference")
    if isinstance(literal, str) and literal in keys:
        return literal
    ident = ref.get("identifier")
    if isinstance(ident, dict) and f"{ident.get('system')}|{ident.get('value')}" in keys:
        return f"{ident.get('system')}|{ident.get('value')}"
    if not isinstance(literal, str) or literal.count("/") != 1 or depth > 1:
        return None
    rtype, rid = literal.split("/")
    target = resolve(rtype, rid) if ID_PATTERN.match(rid) else None
    if target is None or target.deleted:
        return None
    for i in target.resource.get("identifier") or []:
        if isinstance(i, dict) and f"{i.get('system')}|{i.get('value')}" in keys:
            return f"{i.get('system')}|{i.get('value')}"
    if rtype == "PractitionerRole" and target.resource.get("active", True):
        for sub in (target.resource.get("practitioner"), target.resource.get("organization")):
            if isinstance(sub, dict):
                hit = _match(sub, keys, resolve, depth + 1)
                if hit:
                    return hit
    return None


def parse_query(query: str) -> dict[str, list[str]]:
    """`a=1&b=2` (an If-None-Exist value) -> {"a": ["1"], "b": ["2"]}.

    A condition must select something: at least one search criterion, and no result
    parameters (`_sort`, `_count`, `_include`, ...), which select nothing and would otherwise
    make it match every resource of the sender (InputError, rule `http:if-none-exist`).
    """
    from urllib.parse import parse_qs

    query = query.split("?", 1)[1] if "?" in query else query
    try:
        parsed = parse_qs(query, keep_blank_values=True, strict_parsing=True, max_num_fields=20)
    except ValueError:
        raise InputError(
            "If-None-Exist must be a search query such as identifier=SYSTEM|VALUE",
            expression="If-None-Exist",
            rule="http:if-none-exist",
        ) from None
    check_condition(parsed)
    return parsed


def rewrite_references(node: Any, refs: Mapping[str, str], depth: int = 0) -> Any:
    """A copy of `node` with `reference`s found in `refs` replaced, with or without a `_history`
    suffix (callers bound the depth: `jsonio.too_deep`)."""
    if depth > MAX_DEPTH:
        raise InputError(
            f"a resource is nested deeper than {MAX_DEPTH} levels", rule="bridge:nesting", code="too-costly"
        )
    if isinstance(node, dict):
        out = {k: rewrite_references(v, refs, depth + 1) for k, v in node.items()}
        ref = out.get("reference")
        if isinstance(ref, str):
            key = ref if ref in refs else ref.split("/_history/", 1)[0]
            if key in refs:
                out["reference"] = refs[key]
        return out
    if isinstance(node, list):
        return [rewrite_references(v, refs, depth + 1) for v in node]
    return node
