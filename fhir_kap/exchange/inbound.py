"""Inbound FHIR: what the bridge does with a resource a partner sends, and referral status Tasks
(exchange/, layer 3: orchestration; imports base, pure core and storage/, and `webhooks` and
`inbound_rules` of its own room).

    request body ─▶ shape checks ─▶ profile check (Validator) ─▶ map to a KAP record (Mapper)
      ─▶ ONE group-committed transaction: store, the referral's Task, consent context,
         rest-hook jobs
      ─▶ (after the commit, on the notifier's thread) post the rest-hooks

Checking and mapping run on the request's thread; the writes run as one unit of work
through `Store.write` (group commit: several requests share one fsync, each still answered
only once its writes are durable, a failing one rolled back alone). Webhooks never run
inside the request: their jobs are committed with the write they announce, and the
notifier's sender thread posts them (with retries) after the commit. The rules themselves
(write types, Bundle entries, conditions, recipients, the referral flow) are pure functions in
`inbound_rules`; this module applies them.

A referral (ServiceRequest) gets a BSeR-style Task when it first arrives, in the same
commit; the clinic moves it along `REFERRAL_FLOW` (`referral_status`). The Task carries
status only, never free text (why: `inbound_rules`, where the Task is made and moved).

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

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..config import CANONICAL, Release
from ..consent import CONTEXT_TYPES
from ..errors import InputError, Issue, KapError, MappingError, NotFound, ProfileError
from ..fhir.identifiers import new_id
from ..storage.partners import Partner, Partners
from ..storage.store import Store, StoredResource
from .inbound_rules import (
    MAX_DEPTH,
    REFERRAL_FLOW,
    REFERRAL_REASON_SYSTEM,
    REFERRAL_REASONS,
    REFERRAL_STATUS_SYSTEM,
    TASK_STATUS,
    URN_UUID,
    WRITE_TYPES,
    addressed_to,
    bundle_entries,
    bundle_entry,
    check_status_move,
    moved_task,
    parse_query,
    referral_task,
    rewrite_references,
)
from .webhooks import EVENT_COMMUNICATION, EVENT_TASK, Notifier

# The rules and constants of `inbound_rules` stay importable from here, where the bridge and
# the tests have always found them.
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


class ContextSink(Protocol):
    """Where consent context goes (the outbox's `put_context`)."""

    def put_context(self, resource: dict[str, Any]) -> Any: ...


class ResourceValidator(Protocol):
    def validate(
        self, resource: dict[str, Any], *, profile: bool = True, models: bool = False
    ) -> list[Issue]: ...


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

    def __init__(
        self,
        store: Store,
        validator: ResourceValidator,
        *,
        release: Release,
        mapper: RecordMapper | None = None,
        context: ContextSink | None = None,
        partners: Partners | None = None,
        notifier: Notifier | None = None,
        clinic_org_identifier: str = f"{CANONICAL}/sid/org|kap-clinic",
        may_read: Callable[[Partner, StoredResource], bool] | None = None,
    ) -> None:
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
            raise InputError(
                "the body must be a FHIR resource (a JSON object)",
                pointer=pointer or "",
                rule="fhir:resource",
            )
        rtype = resource.get("resourceType")
        if rtype not in WRITE_TYPES:
            shown = rtype[:40] if isinstance(rtype, str) else type(rtype).__name__
            raise InputError(
                f"resourceType '{shown}' cannot be created here; accepted: {', '.join(WRITE_TYPES)}",
                pointer=f"{pointer}/resourceType",
                expression="resourceType",
                rule="bridge:resource-type",
                code="not-supported",
            )
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

    def accept(
        self,
        resource: dict[str, Any],
        *,
        source: str | None,
        if_none_exist: Mapping[str, Sequence[str]] | None = None,
        authority: bool | None = None,
    ) -> Accepted:
        """Check, then store with a Task for a new referral and the consent context in one commit; notify.

        `authority`: whether the sender is a consent authority (its context feeds the consent
        gate); None looks the `source` partner up (`is_authority`).
        """
        record = self.check(resource)
        trusted = self._trusted(source, authority, [resource])
        return self._commit(
            lambda tx: [self._store_one(tx, resource, source, if_none_exist, record)], trusted
        )[0]

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

    def _store_one(
        self,
        tx: Any,
        resource: dict[str, Any],
        source: str | None,
        if_none_exist: Mapping[str, Sequence[str]] | None,
        record: dict[str, Any] | None,
        keep_id: bool = False,
    ) -> Accepted:
        stored, created = self.store.create(
            resource, source=source, if_none_exist=if_none_exist, keep_id=keep_id, tx=tx
        )
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
                if (
                    partner.name == stored.source
                    or addressed_to(stored.resource, partner, self.store.get) is None
                ):
                    continue
                # Only a recipient allowed to read it hears of it (consent-gated, audited like a read).
                if self.may_read is None or self.may_read(partner, stored):
                    n += self.notifier.enqueue(
                        partner.name, EVENT_COMMUNICATION, f"Communication/{stored.id}", str(stored.version)
                    )
        return n

    def accept_bundle(
        self, bundle: Any, *, source: str | None, authority: bool | None = None
    ) -> BundleResult:
        """A transaction (all or nothing, urn:uuid references resolved) or a batch Bundle.

        `authority` as for `accept`: whether the context resources in it feed the consent gate.
        """
        kind, entries = bundle_entries(bundle)
        trusted = self._trusted(source, authority, [e.get("resource") for e in entries])
        if kind == "transaction":
            return self._transaction(entries, source, trusted)
        return self._batch(entries, source, trusted)

    def _transaction(self, entries: list[dict[str, Any]], source: str | None, trusted: bool) -> BundleResult:
        parsed = []
        issues: list[Issue] = []
        ids: dict[str, str] = {}
        for i, entry in enumerate(entries):
            try:
                resource, cond = bundle_entry(entry, i)
            except KapError as exc:
                issues += exc.issues
                continue
            full = entry.get("fullUrl")
            if isinstance(full, str) and URN_UUID.match(full):
                if full in ids:
                    issues.append(
                        Issue(
                            "error",
                            "duplicate",
                            "fullUrl is used twice",
                            f"Bundle.entry[{i}].fullUrl",
                            f"/entry/{i}/fullUrl",
                            "bridge:bundle-fullurl",
                        )
                    )
                ids[full] = new_id()
            parsed.append((i, full, resource, cond))
        if issues:
            raise InputError(issues)
        refs = {urn: f"{r['resourceType']}/{ids[urn]}" for _, urn, r, _ in parsed if urn in ids}
        records = []
        worst: type[KapError] = InputError
        for i, full, resource, cond in parsed:
            resource = rewrite_references(resource, refs)
            if full in ids:
                resource["id"] = ids[full]
            try:
                records.append(
                    (i, full, resource, cond, self.check(resource, pointer=f"/entry/{i}/resource"))
                )
            except KapError as exc:
                issues += exc.issues
                worst = type(exc) if exc.http_status > worst.http_status else worst
        if issues:
            raise worst(issues)
        accepted = self._commit(
            lambda tx: [
                self._store_one(tx, resource, source, cond, record, keep_id=full in ids)
                for i, full, resource, cond, record in records
            ],
            trusted,
        )
        return BundleResult(
            _response_bundle("transaction-response", [_entry_response(a) for a in accepted]), accepted
        )

    def _batch(self, entries: list[dict[str, Any]], source: str | None, trusted: bool) -> BundleResult:
        """Each entry stands alone (its own SAVEPOINT), and all of them share one commit."""
        out: list[dict[str, Any] | None] = [None] * len(entries)
        checked: list[tuple[int, dict[str, Any], dict[str, list[str]] | None, dict[str, Any] | None]] = []
        for i, entry in enumerate(entries):
            try:
                resource, cond = bundle_entry(entry, i)
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

    def referral_status(
        self, referral_id: str, business_status: str, *, reason: str | None = None
    ) -> StoredResource:
        """Move the referral's Task to `business_status` (Conflict if the flow does not allow it).

        The referring practice reads this Task without a consent check (it sent the referral),
        so it carries no free text: `reason`, when given, must be one of the codes in
        `REFERRAL_REASONS` (not-eligible, client-declined, client-unreachable, capacity,
        duplicate, other) and becomes `Task.statusReason` as a coding (R5: a CodeableReference's
        `concept`); anything else is refused (InputError, rule `referral:reason`). Clinical
        detail behind a decision goes to the practice as a consent-gated Communication instead.
        """
        check_status_move(referral_id, business_status, reason)
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
        task = moved_task(cur.resource, business_status, reason, self.release)
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


_REASON = {
    200: "OK",
    201: "Created",
    400: "Bad Request",
    404: "Not Found",
    409: "Conflict",
    412: "Precondition Failed",
    422: "Unprocessable Entity",
}


def _error_response(exc: KapError) -> dict[str, Any]:
    return {
        "response": {
            "status": f"{exc.http_status} {_REASON.get(exc.http_status, 'Error')}",
            "outcome": exc.operation_outcome(),
        }
    }


def _entry_response(acc: Accepted) -> dict[str, Any]:
    s = acc.stored
    return {
        "fullUrl": f"{s.type}/{s.id}",
        "response": {
            "status": "201 Created" if acc.created else "200 OK",
            "location": f"{s.type}/{s.id}/_history/{s.version}",
            "etag": s.etag,
            "lastModified": s.last_updated,
        },
    }


def _response_bundle(kind: str, entries: list[dict[str, Any]]) -> dict[str, Any]:
    return {"resourceType": "Bundle", "type": kind, "entry": entries}
