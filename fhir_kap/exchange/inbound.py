"""Inbound FHIR: what the bridge does with a resource a partner sends, and referral status Tasks.

    request body ─▶ shape checks ─▶ profile check (Validator) ─▶ map to a KAP record (Mapper)
      ─▶ ONE group-committed transaction: store, the referral's Task, consent context,
         rest-hook jobs
      ─▶ (after the commit, on the notifier's thread) post the rest-hooks

Checking and mapping run on the request's thread; the writes run as one unit of work
through `Store.write` (group commit: several requests share one fsync, each still answered
only once its writes are durable, a failing one rolled back alone). Webhooks never run
inside the request: their jobs are committed with the write they announce, and the
notifier's sender thread posts them (with retries) after the commit.

A referral (ServiceRequest) gets a BSeR-style Task when it first arrives: `focus` and
`basedOn` the referral, `for` its subject, `requester` the referring practitioner, `owner`
the clinic, `businessStatus` `received`. The clinic moves it along `REFERRAL_FLOW`; FHIR
`Task.status` follows in step (`TASK_STATUS`). The Task keeps the referral's source
partner, so the practice that sent the referral can read its progress. Because that read
needs no consent, the Task carries status only: never free text. A reason for a status is
one code of `REFERRAL_REASONS` (Task.statusReason as a coding).

Consent context: a created Consent / Practitioner / PractitionerRole / Organization / Patient
becomes consent context (what the gate decides on) only when its sender is a consent
authority (`Partner.is_consent_authority`: a clinic system, or a partner with the scope
`kap/consent-authority`). Anyone else's is stored and readable by its sender, nothing more:
otherwise a practice could grant itself access with a Consent of its own making, block
another practice with a deny, or link its practitioner to a granted organisation.

Rest-hooks for a new Communication go only to recipients the read check (`may_read`, the
bridge's consent-gated and audited `Access.can_read`) lets see it, so a hook never tells a
partner about a note it would get 404 for.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..config import CANONICAL, CS, Release
from ..consent import CONTEXT_TYPES
from ..errors import Conflict, InputError, Issue, KapError, MappingError, NotFound, ProfileError
from ..fhir.identifiers import new_id
from .webhooks import EVENT_COMMUNICATION, EVENT_TASK, Notifier
from ..storage.partners import Partner, Partners
from ..storage.store import ID_PATTERN, Store, StoredResource, check_condition, instant_now

__all__ = [
    "CONTEXT_TYPES",
    "MAX_DEPTH",
    "REFERRAL_FLOW",
    "REFERRAL_REASONS",
    "REFERRAL_REASON_SYSTEM",
    "REFERRAL_STATUS_SYSTEM",
    "TASK_STATUS",
    "WRITE_TYPES",
    "Accepted",
    "BundleResult",
    "Inbound",
    "addressed_to",
    "parse_query",
    "referral_task",
]

#: Resource types partners may create: the four KAP resources and the context they reference.
WRITE_TYPES = ("ServiceRequest", "Consent", "Communication", "Procedure",
               "Patient", "Practitioner", "PractitionerRole", "Organization")
#: Types kept as consent context (the gate reads them to match recipients and grants).
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
TASK_STATUS = {"received": "received", "accepted": "accepted", "declined": "rejected",
               "scheduled": "accepted", "in-progress": "in-progress", "completed": "completed",
               "cancelled": "cancelled"}
_DISPLAY = {"received": "Referral received", "accepted": "Referral accepted", "declined": "Referral declined",
            "scheduled": "Intake scheduled", "in-progress": "Care in progress", "completed": "Care completed",
            "cancelled": "Referral cancelled"}
#: Reason codes a status move may carry (the only reason a referring practice sees; no free text).
REFERRAL_REASON_SYSTEM = f"{CANONICAL}/CodeSystem/kap-referral-status-reason"
REFERRAL_REASONS = {"not-eligible": "Not eligible for KAP", "client-declined": "Client declined",
                    "client-unreachable": "Client could not be reached", "capacity": "No capacity",
                    "duplicate": "Duplicate referral", "other": "Other reason"}
#: Deepest JSON nesting accepted in a Bundle entry (FHIR resources need far less).
MAX_DEPTH = 64
_URN = re.compile(r"^urn:uuid:[0-9a-fA-F-]{36}$")


class ContextSink(Protocol):
    """Where consent context goes (the outbox's `put_context`)."""

    def put_context(self, resource: dict[str, Any]) -> Any: ...


class ResourceValidator(Protocol):
    def validate(self, resource: dict[str, Any], *, profile: bool = True, models: bool = False) -> list[Issue]: ...


class RecordMapper(Protocol):
    def from_fhir(self, resource: dict[str, Any], release: Release | None = None) -> dict[str, Any]: ...


@dataclass(frozen=True)
class Accepted:
    """One resource accepted: what was stored, whether it is new, its KAP record, the Task made."""

    stored: StoredResource
    created: bool
    record: dict[str, Any] | None = None
    task: StoredResource | None = None


@dataclass
class BundleResult:
    bundle: dict[str, Any]
    accepted: list[Accepted] = field(default_factory=list)


class Inbound:
    """Accepts resources from partners into the store. Build once per app; thread-safe."""

    def __init__(self, store: Store, validator: ResourceValidator, *, release: Release,
                 mapper: RecordMapper | None = None, context: ContextSink | None = None,
                 partners: Partners | None = None, notifier: Notifier | None = None,
                 clinic_org_identifier: str = f"{CANONICAL}/sid/org|kap-clinic",
                 may_read: Callable[[Partner, StoredResource], bool] | None = None) -> None:
        """`may_read(partner, stored)`: whether a recipient may read a new Communication (consent
        gate, audited); rest-hooks go only where it says yes (none without it)."""
        self.store = store
        self.validator = validator
        self.release = release
        self.mapper = mapper
        self.context = context
        self.partners = partners
        self.notifier = notifier
        self.may_read = may_read
        system, _, value = clinic_org_identifier.partition("|")
        self.clinic_owner = {"identifier": {"system": system, "value": value}, "display": "KAP clinic"}

    def check(self, resource: Any, *, pointer: str = "") -> dict[str, Any] | None:
        """Validate and map one resource; returns its KAP record (None for unmapped types).

        Raises InputError for a wrong resource type, ProfileError for rule breaks,
        MappingError when the clinic could not read it as a KAP record.
        """
        if not isinstance(resource, dict):
            raise InputError("the body must be a FHIR resource (a JSON object)", pointer=pointer or "",
                             rule="fhir:resource")
        rtype = resource.get("resourceType")
        if rtype not in WRITE_TYPES:
            shown = rtype[:40] if isinstance(rtype, str) else type(rtype).__name__
            raise InputError(f"resourceType '{shown}' cannot be created here; accepted: {', '.join(WRITE_TYPES)}",
                             pointer=f"{pointer}/resourceType", expression="resourceType",
                             rule="bridge:resource-type", code="not-supported")
        errors = [i for i in self.validator.validate(resource) if i.is_error]
        if errors:
            raise ProfileError([i.prefixed(pointer_prefix=pointer) for i in errors])
        if self.mapper is None:
            return None
        try:
            return self.mapper.from_fhir(resource, self.release)
        except MappingError as exc:
            if exc.issues and exc.issues[0].rule == "mapping:resource-type":
                return None
            raise MappingError([i.prefixed(pointer_prefix=pointer) for i in exc.issues]) from None

    def accept(self, resource: dict[str, Any], *, source: str | None,
               if_none_exist: Mapping[str, Sequence[str]] | None = None,
               authority: bool | None = None) -> Accepted:
        """Check, then store with a Task for a new referral and the consent context in one commit; notify.

        `authority`: whether the sender is a consent authority (its context feeds the consent
        gate); None looks the `source` partner up (`is_authority`).
        """
        record = self.check(resource)
        trusted = self._trusted(source, authority, [resource])
        return self._commit(lambda tx: [self._store_one(tx, resource, source, if_none_exist, record)], trusted)[0]

    def is_authority(self, source: str | None) -> bool:
        """Whether the partner named `source` is a consent authority (unknown or revoked: no)."""
        if self.partners is None or not source:
            return False
        partner = self.partners.get(source)
        return partner is not None and partner.is_consent_authority

    def _trusted(self, source: str | None, authority: bool | None, resources: Sequence[Any]) -> bool:
        if not any(isinstance(r, dict) and r.get("resourceType") in CONTEXT_TYPES for r in resources):
            return False  # nothing to keep: no partner lookup
        return bool(authority) if authority is not None else self.is_authority(source)

    def _commit(self, work: Callable[[Any], list[Accepted]], trusted: bool) -> list[Accepted]:
        """Run `work` and keep its context (from a consent authority only) in one transaction, then notify."""
        joined = self._context_joins()
        queued = [0]  # rest-hook jobs this write queued (the unit may run on another request's thread)

        def unit(tx: Any) -> list[Accepted]:
            accepted = work(tx)
            if joined and trusted:
                self._keep_context(accepted)
            queued[0] = self._queue_notifications(accepted)
            return accepted

        accepted = self.store.write(unit)
        if not joined and trusted:
            self._keep_context(accepted)
        if queued[0] and self.notifier is not None:
            self.notifier.wake()  # only then: an idle sender costs no query per write
        return accepted

    def _context_joins(self) -> bool:
        # The context sink's writes join the store's transaction when both use the same Database
        # (its transaction() nests as a SAVEPOINT); otherwise it keeps its own commit, after ours.
        return self.context is not None and getattr(self.context, "db", None) is self.store.db

    def _store_one(self, tx: Any, resource: dict[str, Any], source: str | None,
                   if_none_exist: Mapping[str, Sequence[str]] | None, record: dict[str, Any] | None,
                   keep_id: bool = False) -> Accepted:
        stored, created = self.store.create(resource, source=source, if_none_exist=if_none_exist,
                                            keep_id=keep_id, tx=tx)
        task = None
        if created and stored.type == "ServiceRequest":
            task, _ = self.store.create(referral_task(stored, self.clinic_owner), source=source, tx=tx)
        return Accepted(stored, created, record, task)

    def _keep_context(self, accepted: Sequence[Accepted]) -> None:
        """Hand created context resources to the gate's context (the caller checked the sender's authority)."""
        if self.context is None:
            return
        for acc in accepted:
            if acc.created and acc.stored.type in CONTEXT_TYPES:
                self.context.put_context(acc.stored.resource)

    def _queue_notifications(self, accepted: Sequence[Accepted]) -> int:
        """Queue a rest-hook job for each partner a new Communication addresses and may read
        (inside the write's transaction: the job is committed exactly when the note is); how many."""
        if self.partners is None or self.notifier is None or self.notifier.db is None:
            return 0
        hooked = [p for p in self.partners.list() if p.webhook_url and not p.revoked]  # cached list
        if not hooked:
            return 0
        n = 0
        for acc in accepted:
            stored = acc.stored
            if not acc.created or stored.type != "Communication":
                continue
            for partner in hooked:
                if partner.name == stored.source or addressed_to(stored.resource, partner, self.store.get) is None:
                    continue
                # Only a recipient allowed to read it hears of it (consent-gated, audited like a read).
                if self.may_read is None or self.may_read(partner, stored):
                    n += self.notifier.enqueue(partner.name, EVENT_COMMUNICATION, f"Communication/{stored.id}",
                                               str(stored.version))
        return n

    def accept_bundle(self, bundle: Any, *, source: str | None, authority: bool | None = None) -> BundleResult:
        """A transaction (all or nothing, urn:uuid references resolved) or a batch Bundle.

        `authority` as for `accept`: whether the context resources in it feed the consent gate.
        """
        if not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle":
            raise InputError("POST /fhir takes a Bundle of type transaction or batch", pointer="/resourceType",
                             rule="bridge:bundle")
        kind = bundle.get("type")
        if kind not in ("transaction", "batch"):
            raise InputError(f"Bundle.type must be transaction or batch, not '{str(kind)[:30]}'",
                             pointer="/type", expression="Bundle.type", rule="bridge:bundle-type")
        entries = bundle.get("entry", [])
        if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
            raise InputError("Bundle.entry must be a list of objects", pointer="/entry",
                             expression="Bundle.entry", rule="bridge:bundle-entry")
        if len(entries) > 500:
            raise InputError("a Bundle may carry at most 500 entries", pointer="/entry",
                             rule="bridge:bundle-size", code="too-costly")
        trusted = self._trusted(source, authority, [e.get("resource") for e in entries])
        if kind == "transaction":
            return self._transaction(entries, source, trusted)
        return self._batch(entries, source, trusted)

    def _entry(self, entry: dict[str, Any], i: int) -> tuple[dict[str, Any], dict[str, list[str]] | None]:
        ptr = f"/entry/{i}"
        req = entry.get("request")
        if not isinstance(req, dict) or req.get("method") != "POST":
            raise InputError("only entries with request.method POST are supported", pointer=f"{ptr}/request/method",
                             expression=f"Bundle.entry[{i}].request.method", rule="bridge:bundle-method",
                             code="not-supported")
        resource = entry.get("resource")
        if not isinstance(resource, dict):
            raise InputError("entry.resource must be a FHIR resource", pointer=f"{ptr}/resource",
                             expression=f"Bundle.entry[{i}].resource", rule="bridge:bundle-entry")
        full = entry.get("fullUrl")
        if full is not None and not isinstance(full, str):
            raise InputError(f"Bundle.entry[{i}].fullUrl must be a string (a URI)", pointer=f"{ptr}/fullUrl",
                             expression=f"Bundle.entry[{i}].fullUrl", rule="bridge:bundle-fullurl")
        if _too_deep(resource, MAX_DEPTH):
            raise InputError(f"Bundle.entry[{i}].resource is nested deeper than {MAX_DEPTH} levels",
                             pointer=f"{ptr}/resource", expression=f"Bundle.entry[{i}].resource",
                             rule="bridge:nesting", code="too-costly")
        url = req.get("url")
        if url != resource.get("resourceType"):
            raise InputError(f"request.url must be the resource type '{str(resource.get('resourceType'))[:40]}'",
                             pointer=f"{ptr}/request/url", expression=f"Bundle.entry[{i}].request.url",
                             rule="bridge:bundle-url")
        cond = req.get("ifNoneExist")
        if cond is not None and not isinstance(cond, str):
            raise InputError("request.ifNoneExist must be a string", pointer=f"{ptr}/request/ifNoneExist",
                             rule="bridge:bundle-entry")
        if cond is None:
            return resource, None
        try:
            return resource, parse_query(cond)
        except KapError as exc:
            raise type(exc)([i.prefixed(pointer_prefix=f"{ptr}/request/ifNoneExist") for i in exc.issues]) from None

    def _transaction(self, entries: list[dict[str, Any]], source: str | None, trusted: bool) -> BundleResult:
        parsed = []
        issues: list[Issue] = []
        ids: dict[str, str] = {}
        for i, entry in enumerate(entries):
            try:
                resource, cond = self._entry(entry, i)
            except KapError as exc:
                issues += exc.issues
                continue
            full = entry.get("fullUrl")
            if isinstance(full, str) and _URN.match(full):
                if full in ids:
                    issues.append(Issue("error", "duplicate", "fullUrl is used twice", f"Bundle.entry[{i}].fullUrl",
                                        f"/entry/{i}/fullUrl", "bridge:bundle-fullurl"))
                ids[full] = new_id()
            parsed.append((i, full, resource, cond))
        if issues:
            raise InputError(issues)
        refs = {urn: f"{r['resourceType']}/{ids[urn]}" for _, urn, r, _ in parsed if urn in ids}
        records = []
        worst: type[KapError] = InputError
        for i, full, resource, cond in parsed:
            resource = _rewrite(resource, refs)
            if full in ids:
                resource["id"] = ids[full]
            try:
                records.append((i, full, resource, cond, self.check(resource, pointer=f"/entry/{i}/resource")))
            except KapError as exc:
                issues += exc.issues
                worst = type(exc) if exc.http_status > worst.http_status else worst
        if issues:
            raise worst(issues)
        accepted = self._commit(lambda tx: [self._store_one(tx, resource, source, cond, record, keep_id=full in ids)
                                            for i, full, resource, cond, record in records], trusted)
        return BundleResult(_response_bundle("transaction-response", [_entry_response(a) for a in accepted]),
                            accepted)

    def _batch(self, entries: list[dict[str, Any]], source: str | None, trusted: bool) -> BundleResult:
        """Each entry stands alone (its own SAVEPOINT), and all of them share one commit."""
        out: list[dict[str, Any] | None] = [None] * len(entries)
        checked: list[tuple[int, dict[str, Any], dict[str, list[str]] | None, dict[str, Any] | None]] = []
        for i, entry in enumerate(entries):
            try:
                resource, cond = self._entry(entry, i)
                checked.append((i, resource, cond, self.check(resource)))
            except KapError as exc:
                out[i] = _error_response(exc)

        def work(tx: Any) -> list[Accepted]:
            accepted = []
            for i, resource, cond, record in checked:
                try:
                    with self.store.db.transaction() as sp:  # a SAVEPOINT: this entry alone on failure
                        acc = self._store_one(sp, resource, source, cond, record)
                except KapError as exc:
                    out[i] = _error_response(exc)
                    continue
                out[i] = _entry_response(acc)
                accepted.append(acc)
            return accepted

        accepted = self._commit(work, trusted) if checked else []
        return BundleResult(_response_bundle("batch-response", [o for o in out if o is not None]), accepted)

    def referral_status(self, referral_id: str, business_status: str, *, reason: str | None = None) -> StoredResource:
        """Move the referral's Task to `business_status` (Conflict if the flow does not allow it).

        The referring practice reads this Task without a consent check (it sent the referral),
        so it carries no free text: `reason`, when given, must be one of the codes in
        `REFERRAL_REASONS` (not-eligible, client-declined, client-unreachable, capacity,
        duplicate, other) and becomes `Task.statusReason` as a coding (R5: a CodeableReference's
        `concept`); anything else is refused (InputError, rule `referral:reason`). Clinical
        detail behind a decision goes to the practice as a consent-gated Communication instead.
        """
        if business_status not in REFERRAL_FLOW:
            raise InputError(f"status '{business_status[:40]}' is not one of {', '.join(REFERRAL_FLOW)}",
                             pointer="/status", rule="referral:status", code="value")
        if reason is not None and (not isinstance(reason, str) or reason not in REFERRAL_REASONS):
            raise InputError("reason must be one of the codes " + ", ".join(REFERRAL_REASONS) + " (no free text: "
                             "the referring practice sees it without a consent check)", pointer="/reason",
                             rule="referral:reason", code="value")
        if not ID_PATTERN.match(referral_id):
            raise NotFound("no such referral", rule="referral:unknown")
        queued = [False]

        def unit(tx: Any) -> StoredResource:
            task = self._move(tx, referral_id, business_status, reason)
            queued[0] = self._queue_task_event(task)
            return task

        updated = self.store.write(unit)
        if queued[0] and self.notifier is not None:
            self.notifier.wake()
        return updated

    def _move(self, tx: Any, referral_id: str, business_status: str, reason: str | None) -> StoredResource:
        found = self.store.search_in(tx, "Task", {"focus": [f"ServiceRequest/{referral_id}"]}, count=1)
        if not found:
            raise NotFound("no such referral", rule="referral:unknown")
        cur = found[0]
        now_status = _business_status(cur.resource)
        if business_status not in REFERRAL_FLOW.get(now_status, ()):
            raise Conflict(f"a referral that is '{now_status}' cannot become '{business_status}'; allowed: "
                           f"{', '.join(REFERRAL_FLOW.get(now_status, ())) or 'none (final)'}",
                           pointer="/status", rule="referral:transition")
        task = dict(cur.resource)
        task["status"] = TASK_STATUS[business_status]
        task["businessStatus"] = _business_concept(business_status)
        task["lastModified"] = instant_now()
        if reason:
            concept = {"coding": [{"system": REFERRAL_REASON_SYSTEM, "code": reason,
                                   "display": REFERRAL_REASONS[reason]}]}
            task["statusReason"] = {"concept": concept} if self.release is Release.R5 else concept
        else:
            task.pop("statusReason", None)
        # Read and update in one transaction; if_match keeps the guard should that ever change.
        updated, _ = self.store.update("Task", cur.id, task, if_match=cur.version, tx=tx)
        return updated

    def _queue_task_event(self, task: StoredResource) -> bool:
        """Queue a rest-hook job telling the referring practice that its referral's Task moved."""
        if self.partners is None or self.notifier is None or self.notifier.db is None or not task.source:
            return False
        partner = self.partners.get(task.source)
        if partner and partner.webhook_url and not partner.revoked:
            return self.notifier.enqueue(partner.name, EVENT_TASK, f"Task/{task.id}", str(task.version))
        return False


def referral_task(referral: StoredResource, owner: dict[str, Any]) -> dict[str, Any]:
    """The BSeR-style Task that tracks a new referral (businessStatus `received`)."""
    sr = referral.resource
    now = instant_now()
    task: dict[str, Any] = {
        "resourceType": "Task",
        "meta": {"tag": [{"system": CS.INFO_CATEGORY, "code": "care-coordination"}],
                 "security": [{"system": CS.V3_CONFIDENTIALITY, "code": "R"}]},
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
    return {"coding": [{"system": REFERRAL_STATUS_SYSTEM, "code": code, "display": _DISPLAY[code]}],
            "text": _DISPLAY[code]}


def _business_status(task: dict[str, Any]) -> str:
    for c in (task.get("businessStatus") or {}).get("coding") or []:
        if c.get("system") == REFERRAL_STATUS_SYSTEM:
            return str(c.get("code"))
    return "received"


def addressed_to(resource: dict[str, Any], partner: Partner,
                 resolve: Callable[[str, str], StoredResource | None]) -> str | None:
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


def _match(ref: dict[str, Any], keys: set[str], resolve: Callable[[str, str], StoredResource | None],
           depth: int) -> str | None:
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
        raise InputError("If-None-Exist must be a search query such as identifier=SYSTEM|VALUE",
                         expression="If-None-Exist", rule="http:if-none-exist") from None
    check_condition(parsed)
    return parsed


def _too_deep(node: Any, limit: int) -> bool:
    """Whether JSON `node` nests objects/arrays more than `limit` levels (iterative: no recursion)."""
    stack: list[tuple[Any, int]] = [(node, 1)]
    while stack:
        cur, depth = stack.pop()
        if depth > limit:
            return True
        if isinstance(cur, dict):
            stack.extend((v, depth + 1) for v in cur.values() if isinstance(v, (dict, list)))
        elif isinstance(cur, list):
            stack.extend((v, depth + 1) for v in cur if isinstance(v, (dict, list)))
    return False


def _rewrite(node: Any, refs: Mapping[str, str], depth: int = 0) -> Any:
    """A copy of `node` with `reference`s found in `refs` replaced (callers bound the depth: `_too_deep`)."""
    if depth > MAX_DEPTH:
        raise InputError(f"a resource is nested deeper than {MAX_DEPTH} levels", rule="bridge:nesting",
                         code="too-costly")
    if isinstance(node, dict):
        out = {k: _rewrite(v, refs, depth + 1) for k, v in node.items()}
        if isinstance(out.get("reference"), str) and out["reference"] in refs:
            out["reference"] = refs[out["reference"]]
        return out
    if isinstance(node, list):
        return [_rewrite(v, refs, depth + 1) for v in node]
    return node


_REASON = {200: "OK", 201: "Created", 400: "Bad Request", 404: "Not Found", 409: "Conflict",
           412: "Precondition Failed", 422: "Unprocessable Entity"}


def _error_response(exc: KapError) -> dict[str, Any]:
    return {"response": {"status": f"{exc.http_status} {_REASON.get(exc.http_status, 'Error')}",
                         "outcome": exc.operation_outcome()}}


def _entry_response(acc: Accepted) -> dict[str, Any]:
    s = acc.stored
    return {"fullUrl": f"{s.type}/{s.id}",
            "response": {"status": "201 Created" if acc.created else "200 OK",
                         "location": f"{s.type}/{s.id}/_history/{s.version}", "etag": s.etag,
                         "lastModified": s.last_updated}}


def _response_bundle(kind: str, entries: list[dict[str, Any]]) -> dict[str, Any]:
    return {"resourceType": "Bundle", "type": kind, "entry": entries}
