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

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import orjson

from ..config import CANONICAL, Release
from ..consent import CONTEXT_TYPES
from ..errors import (
    Conflict,
    InputError,
    Issue,
    KapError,
    NotFound,
    PreconditionFailed,
)
from ..fhir.identifiers import business_identifier, new_id
from ..fhir.references import PARTY_TYPES, Resolver, identifiers_of, iter_references, parse_reference
from ..fhir.searchvalues import token_value
from ..records.ingest import Ingest
from ..storage.partners import Partner, Partners
from ..storage.store import MAX_COUNT, Store, StoredResource
from .authorship import Authorship, partner_source
from .consent_scope import ConsentScope, check_consent_identifier, identifier_held_elsewhere
from .inbound_rules import (
    MAX_DEPTH,
    REFERRAL_FLOW,
    REFERRAL_REASON_SYSTEM,
    REFERRAL_REASONS,
    REFERRAL_STATUS_SYSTEM,
    TASK_STATUS,
    UPDATE_TYPES,
    WITHDRAWN_REFERRAL,
    WRITE_TYPES,
    addressed_to,
    bundle_entries,
    bundle_entry,
    check_status_move,
    check_update_type,
    moved_task,
    parse_query,
    referral_task,
    remembering,
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
    "UPDATE_TYPES",
    "WITHDRAWN_REFERRAL",
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


class EventSink(Protocol):
    """Who hears of committed writes (topic-based Subscriptions): `record(tx, accepted)` runs
    inside the write's transaction, so what it queues is committed exactly when the write is;
    it returns how many notifications it queued (the notifier is woken after the commit)."""

    def record(self, tx: Any, accepted: Sequence[Accepted]) -> int: ...


@dataclass(frozen=True)
class Accepted:
    """One resource accepted: what was stored, whether it is new, its KAP record, the Task made,
    and the issues (warnings, information) the inbound path found, as `fhir-kap import` reports them."""

    stored: StoredResource
    created: bool
    record: dict[str, Any] | None = None
    task: StoredResource | None = None
    issues: tuple[Issue, ...] = ()
    updated: bool = False  # a new version of an existing resource (an update), not a create or a match


@dataclass(frozen=True)
class _Checked:
    """A partner's resource past the pre-commit checks (`Inbound._checked`): as filled by its
    authorship rule, with what the checks used and found."""

    resource: dict[str, Any]
    partner: Partner | None
    author: Authorship | None
    resolver: Resolver
    record: dict[str, Any] | None
    issues: tuple[Issue, ...]


class StoreLookup:
    """The bridge's context for resolving references: the sender's own stored resources (a
    partner's references never resolve to, or reveal, another partner's resources)."""

    resolves_literals = False  # see get()

    def __init__(self, store: Store, source: str | None) -> None:
        self.store = store
        self.source = source

    def get(self, rtype: str, rid: str) -> dict[str, Any] | None:
        """None: a literal `Type/id` already names a stored resource as it is, and looking it up
        would cost every write a read before its transaction (only identifiers are looked up)."""
        return None

    def by_identifier(self, rtype: str | None, system: str, value: str) -> list[dict[str, Any]]:
        types = (rtype,) if rtype else PARTY_TYPES
        out = []
        for t in types:
            if t not in WRITE_TYPES:
                continue
            out += [
                s.resource for s in self.store.with_identifier(t, system, value, source=self.source, limit=3)
            ]
        return out


@dataclass
class BundleResult:
    bundle: dict[str, Any]
    accepted: list[Accepted] = field(default_factory=list)


class Inbound:
    """Accepts resources from partners into the store. Build once per app; thread-safe."""

    def __init__(
        self,
        store: Store,
        ingest: Ingest,
        *,
        release: Release,
        context: ContextSink | None = None,
        partners: Partners | None = None,
        notifier: Notifier | None = None,
        clinic_org_identifier: str = f"{CANONICAL}/sid/org|kap-clinic",
        may_read: Callable[[Partner, StoredResource, Callable[[str, str], StoredResource | None]], bool]
        | None = None,
        events: EventSink | None = None,
    ) -> None:
        """`may_read(partner, stored)`: whether a recipient may read a new Communication (consent
        gate, audited); rest-hooks go only where it says yes (none without it). `events`: told of
        every committed write, inside its transaction (Subscriptions)."""
        self.store = store
        self.ingest = ingest
        self.release = release
        self.context = context
        self.partners = partners
        self.notifier = notifier
        self.may_read = may_read
        self.events = events
        system, _, value = clinic_org_identifier.partition("|")
        self.clinic_identifier = (system, value) if system and value else None
        self.clinic_owner = {"identifier": {"system": system, "value": value}, "display": "KAP clinic"}

    def check(
        self, resource: Any, *, pointer: str = "", resolver: Resolver | None = None
    ) -> dict[str, Any] | None:
        """Validate and map one resource; returns its KAP record (None for unmapped types)."""
        return self.inspect(resource, pointer=pointer, resolver=resolver)[0]

    def inspect(
        self, resource: Any, *, pointer: str = "", resolver: Resolver | None = None, detail: bool = True
    ) -> tuple[dict[str, Any] | None, tuple[Issue, ...]]:
        """Validate and map one resource through the one inbound path `fhir-kap import` uses
        (`records.ingest`): its KAP record (None for types that make none) and the issues.

        Raises InputError for a type partners cannot write, ProfileError for rule breaks,
        MappingError / InputError when the clinic cannot read it as a KAP record.
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
        got = self.ingest.resource(
            pointer or str(rtype), resource, resolver, release=self.release, keep=detail
        )
        for g in got:
            if g.error is not None:
                raise type(g.error)([i.prefixed(pointer_prefix=pointer) for i in g.error.issues]) from None
        return got[-1].result, tuple(i.prefixed(pointer_prefix=pointer) for g in got for i in g.issues)

    def accept(
        self,
        resource: dict[str, Any],
        *,
        source: str | None,
        if_none_exist: Mapping[str, Sequence[str]] | None = None,
        authority: bool | None = None,
        detail: bool = True,
    ) -> Accepted:
        """Check, then store with a Task for a new referral and the consent context in one commit; notify.

        `authority`: whether the sender is a consent authority (its context feeds the consent
        gate); None looks the `source` partner up (`is_authority`). `detail`: also work out what
        the record would keep of the resource (issue `import:kept`; the bridge stores the resource
        as sent, so it is only worth its cost when the issues are shown).
        """
        c = self._checked(resource, source, detail=detail)
        resource, partner, author, resolver, record = c.resource, c.partner, c.author, c.resolver, c.record
        issues = c.issues
        trusted = self._trusted(source, authority, [resource])
        cond: Mapping[str, Sequence[str]] | None
        if if_none_exist is not None:
            cond, op = if_none_exist, "create"
        else:
            cond, op = _same_identifier(resource), "resend"
        parties = _contained_parties(resource)
        trusted = trusted or bool(parties) and self._trusted(source, authority, parties)
        scope = self._scope(partner, author, trusted, [resource, *parties], resolver)

        def work(tx: Any) -> list[Accepted]:
            out = [self._store_one(tx, resource, source, cond, record, op=op)]
            # a referral for a new client creates that client: contained parties are stored as
            # the sender's own (once per business identifier and content)
            out += [self._store_one(tx, p, source, _same_identifier(p), None, op="resend") for p in parties]
            return out

        issues += self._consent_counts(partner, trusted, scope, resource)
        return replace(self._commit(work, trusted, scope)[0], issues=issues)

    def update(
        self,
        resource: dict[str, Any],
        *,
        source: str,
        rid: str | None = None,
        condition: Mapping[str, Sequence[str]] | None = None,
        if_match: int | None = None,
        authority: bool | None = None,
        detail: bool = True,
    ) -> Accepted:
        """Update the sender's own `resource` (a type of `UPDATE_TYPES`): by id (`rid`), or the one
        of its resources `condition` selects (a conditional update), as a new version in one commit.

        The same checks as a create (profile, KAP record, authorship, identifier ownership). Only
        the sender's own resources are looked at (inside the write's transaction): another's, a
        deleted one or none is NotFound for an update by id; a condition matching none creates (as
        FHIR says), several is PreconditionFailed. `if_match`: the version the sender last saw
        (412 when the resource has moved on). A Consent's new version (a revocation included)
        reaches the consent context in the same commit (from a consent authority); a referral
        updated into a `WITHDRAWN_REFERRAL` status cancels its Task (`_withdrawn`).
        """
        rtype = resource.get("resourceType")
        check_update_type(rtype)
        c = self._checked(resource, source, detail=detail)
        resource, partner, author, resolver, record = c.resource, c.partner, c.author, c.resolver, c.record
        issues = c.issues
        trusted = self._trusted(source, authority, [resource])
        scope = self._scope(partner, author, trusted, [resource], resolver)
        cond = condition if condition is not None else {"_id": [str(rid)]}

        def work(tx: Any) -> list[Accepted]:
            found = self.store.matching(str(rtype), cond, source=source, limit=2, tx=tx)
            if len(found) > 1:
                raise PreconditionFailed(
                    f"the conditional update matched several {rtype} resources; it must match at most one",
                    rule="http:conditional-update",
                    code="duplicate",
                )
            if not found and condition is None:
                # the same answer whether it never existed, was deleted or is another partner's
                raise NotFound(f"{rtype}/{rid} is not known", expression=str(rtype), rule="fhir:not-found")
            if not found:
                if if_match is not None:
                    raise PreconditionFailed(
                        "If-Match names a version, but the condition matched no resource",
                        rule="http:if-match",
                    )
                new = {k: v for k, v in resource.items() if k != "id"}
                return [self._store_one(tx, new, source, None, record, op="create")]
            cur = found[0]
            if resource.get("id") is not None and resource.get("id") != cur.id:
                raise InputError(
                    f"the resource's id does not match the {rtype} the condition selected",
                    pointer="/id",
                    expression=f"{rtype}.id",
                    rule="http:id-mismatch",
                )
            body = dict(_stamped(resource, source), id=cur.id)
            stored, _ = self.store.update(str(rtype), cur.id, body, if_match=if_match, source=source, tx=tx)
            task = self._withdrawn(tx, cur, stored)
            return _with_moved_tasks([Accepted(stored, False, record, task, updated=True)])

        issues += self._consent_counts(partner, trusted, scope, resource)
        return replace(self._commit(work, trusted, scope)[0], issues=issues)

    def _consent_counts(
        self, partner: Partner | None, trusted: bool, scope: ConsentScope | None, resource: dict[str, Any]
    ) -> tuple[Issue, ...]:
        """Whether a partner's Consent will decide disclosures, said in the answer's issues (shown
        with `Prefer: return=OperationOutcome`): never silently stored without effect."""
        if resource.get("resourceType") != "Consent" or partner is None or partner.is_clinic:
            return ()
        if not trusted:
            return (
                Issue(
                    "information",
                    "informational",
                    "This Consent is stored and readable by its sender, but it does not decide "
                    "disclosures: only the clinic's systems and consent authorities (scope "
                    "kap/consent-authority) feed the consent gate",
                    expression="Consent",
                    rule="consent:not-authority",
                ),
            )
        if scope is not None and not scope.admits(resource):
            return (
                Issue(
                    "warning",
                    "business-rule",
                    "This Consent does not decide disclosures yet: a consent authority's Consent "
                    "counts only for a client it referred. Send the referral for this client; the "
                    "Consent counts from then on",
                    expression="Consent.patient" if self.release.value.startswith("4") else "Consent.subject",
                    rule="consent:not-in-scope",
                ),
            )
        return ()

    def _withdrawn(self, tx: Any, before: StoredResource, after: StoredResource) -> StoredResource | None:
        """The referral's Task moved to `cancelled` when an update withdraws the referral (its
        status becomes one of `WITHDRAWN_REFERRAL`) and the flow still allows it; else None."""
        if after.type != "ServiceRequest" or after.resource.get("status") not in WITHDRAWN_REFERRAL:
            return None
        if before.resource.get("status") in WITHDRAWN_REFERRAL:
            return None
        found = self.store.search_in(tx, "Task", {"focus": [f"ServiceRequest/{after.id}"]}, count=1)
        if not found:
            return None
        try:
            task = moved_task(found[0].resource, "cancelled", None, self.release)
        except Conflict:  # already final (declined, completed, cancelled): it stays as it is
            return None
        moved, _ = self.store.update("Task", found[0].id, task, if_match=found[0].version, tx=tx)
        return moved

    def preview(self, resource: dict[str, Any], *, source: str | None) -> list[Issue]:
        """The issues a create of `resource` by `source` meets on the inbound path (profile, KAP
        record, authorship), its errors being what it would be refused for; nothing is stored
        (`$validate` in mode create / update). Identifier ownership is left to the write itself:
        answering it here would tell anyone whether another writer holds a Consent identifier."""
        try:
            return list(self._checked(resource, source, owner=False).issues)
        except KapError as exc:
            return list(exc.issues)

    def filled(self, resource: dict[str, Any], *, source: str | None) -> dict[str, Any]:
        """`resource` as a write by `source` would store it: its author elements filled from the
        partner's identity where missing (`Authorship.fill`), so `$validate` checks what a create
        checks (a note without `sender` is no cardinality error: the create fills it)."""
        author = self._authorship(self._partner(source))
        return author.fill(resource) if author is not None else resource

    def _checked(
        self, resource: dict[str, Any], source: str | None, *, detail: bool = True, owner: bool = True
    ) -> _Checked:
        """The checks every partner write meets before its transaction (create, update, and
        `preview`): no conditional reference outside a transaction, authorship filled and checked,
        profile and KAP record (`inspect`), identifier ownership (`owner`: not for `preview`).
        Raises the first refusal."""
        _no_conditional_reference(resource)
        partner = self._partner(source)
        author = self._authorship(partner)
        if author is not None:
            resource = author.fill(resource)
        resolver = Resolver((), StoreLookup(self.store, source))
        record, issues = self.inspect(resource, resolver=resolver, detail=detail)
        if author is not None:
            author.check(resource, resolver)
        if owner:
            self._check_identifiers(partner, [("", resource)])
        return _Checked(resource, partner, author, resolver, record, issues)

    def is_authority(self, source: str | None) -> bool:
        """Whether the partner named `source` is a consent authority (unknown or revoked: no)."""
        if self.partners is None or not source:
            return False
        partner = self.partners.get(source)
        return partner is not None and partner.is_consent_authority

    def _partner(self, source: str | None) -> Partner | None:
        """The registered partner named `source` (one with no identity when it is unknown); None
        when there are no partners to answer (a library caller: nothing is checked)."""
        if self.partners is None or not source:
            return None
        found = next((p for p in self.partners.list() if p.name == source), None)  # cached list
        return found if found is not None else Partner(name=source, scopes=())

    def _authorship(self, partner: Partner | None) -> Authorship | None:
        """The authorship rule for `partner`'s write (`authorship`: a clinic system's is filled, never checked)."""
        if partner is None or self.partners is None:
            return None
        return Authorship(
            partner,
            self.partners.list(),
            clinic_identifier=self.clinic_identifier,
            stored=self._stored_resource,
            clinic_reference={
                "type": "Organization",
                **{k: v for k, v in self.clinic_owner.items() if k in ("identifier", "display")},
            },
        )

    def _stored_resource(self, rtype: str, rid: str) -> dict[str, Any] | None:
        got = self.store.get(rtype, rid) if rtype in WRITE_TYPES else None
        return got.resource if got is not None and not got.deleted else None

    def _check_identifiers(self, partner: Partner | None, resources: Sequence[tuple[str, Any]]) -> None:
        """A Consent's business identifier belongs to the first writer whose Consents count (`consent_scope`)."""
        if partner is None:
            return
        check_consent_identifier(partner, resources, self.store, self._context_ids(), self._claimants())

    def _context_ids(self) -> Callable[[str], list[str]] | None:
        ctx = getattr(self.context, "context", self.context)
        return getattr(ctx, "consent_ids", None)

    def _claimants(self) -> list[Partner]:
        return self.partners.list() if self.partners is not None else []  # cached list

    def _scope(
        self,
        partner: Partner | None,
        author: Authorship | None,
        trusted: bool,
        written: Sequence[Any],
        resolver: Resolver | None,
    ) -> ConsentScope | None:
        """What of a (non-clinic) consent authority's context counts; None: all of it."""
        if not trusted or partner is None or author is None or partner.is_clinic:
            return None
        return ConsentScope(partner, author, self.store, written=written, resolver=resolver)

    def _trusted(self, source: str | None, authority: bool | None, resources: Sequence[Any]) -> bool:
        if not any(
            isinstance(r, dict)
            and (r.get("resourceType") in CONTEXT_TYPES or r.get("resourceType") == "ServiceRequest")
            for r in resources
        ):
            return False  # nothing to keep (a referral may admit the sender's Consents): no partner lookup
        return bool(authority) if authority is not None else self.is_authority(source)

    def _commit(
        self, work: Callable[[Any], list[Accepted]], trusted: bool, scope: ConsentScope | None = None
    ) -> list[Accepted]:
        """Run `work` and keep its context (from a consent authority only, as far as `scope`
        admits it) in one transaction, then notify."""
        joined = self._context_joins()
        queued = [0]  # rest-hook jobs this write queued (the unit may run on another request's thread)

        def unit(tx: Any) -> list[Accepted]:
            accepted = work(tx)
            if joined and trusted:
                self._keep_context(accepted, scope)
            queued[0] = self._queue_notifications(accepted)
            if self.events is not None:
                queued[0] += self.events.record(tx, accepted)
            return accepted

        accepted = self.store.write(unit)
        if not joined and trusted:
            self._keep_context(accepted, scope)
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
        cond: Mapping[str, Sequence[str]] | None,
        record: dict[str, Any] | None,
        *,
        op: str = "create",
        masked: frozenset[str] = frozenset(),
        planned: str | None | bool = False,
    ) -> Accepted:
        """Store one resource as `op` says, deciding inside the write's transaction what it stands
        for (`_decide`): a match is answered (create, resend) or updated (update), no match creates
        (with the resource's own id when `planned` is given: a Bundle's references were rewritten to
        it). `planned` (a Bundle's entries) is the match decided before the references were
        rewritten; a different answer now means the sender's data changed meanwhile: Conflict,
        the whole transaction is rolled back, nothing points at an id that was never stored."""
        match = self._decide(resource, cond, op, source, masked, tx)
        if planned is not False and (match.id if match else None) != planned:
            raise Conflict(
                "the sender's resources changed while this Bundle was being checked; send it again",
                rule="bridge:concurrent-change",
            )
        rtype = resource["resourceType"]
        if source:
            resource = _stamped(resource, source)
        if match is not None and op == "update":
            stored, _ = self.store.update(rtype, match.id, dict(resource, id=match.id), source=source, tx=tx)
            return Accepted(stored, False, record, self._withdrawn(tx, match, stored), updated=True)
        if match is not None:
            stored, created = match, False
        else:
            stored, created = self.store.create(resource, source=source, keep_id=planned is not False, tx=tx)
        task = None
        if created and stored.type == "ServiceRequest":
            task, _ = self.store.create(referral_task(stored, self.clinic_owner), source=source, tx=tx)
        return Accepted(stored, created, record, task)

    def _decide(
        self,
        resource: dict[str, Any],
        cond: Mapping[str, Sequence[str]] | None,
        op: str,
        source: str | None,
        masked: frozenset[str] = frozenset(),
        tx: Any = None,
    ) -> StoredResource | None:
        """The sender's stored resource this one stands for, or None (a new one).

        - "create" / "update" with a condition (`If-None-Exist`, a conditional `PUT Type?...`):
          the one match among the sender's own resources; several are 412.
        - "resend": the sender's NEWEST resource with the same business identifier, when its
          content equals this one (`masked`: references to entries of the same Bundle, whose ids
          may differ between sends). Only the newest: re-posting an older state of a Consent
          after a newer one is a new state the consent context must see, never a no-op.
        Another partner's resources are never looked at (in SQL, not after the fact).
        """
        rtype = resource.get("resourceType")
        if not cond or not isinstance(rtype, str) or source is None:
            return None
        if op == "resend":
            ident = business_identifier(resource)
            if ident is None:
                return None
            newest = self.store.with_identifier(rtype, *ident, source=source, limit=1, newest=True, tx=tx)
            if newest and _content(newest[0].resource, masked) == _content(resource, masked):
                return newest[0]
            return None
        found = self.store.matching(rtype, cond, source=source, limit=2, tx=tx)
        if len(found) > 1:
            what = "conditional update" if op == "update" else "If-None-Exist"
            raise PreconditionFailed(
                f"the {what} matched several {rtype} resources; it must match at most one",
                rule="http:conditional-update" if op == "update" else "http:if-none-exist",
                code="duplicate",
            )
        return found[0] if found else None

    def _keep_context(self, accepted: Sequence[Accepted], scope: ConsentScope | None = None) -> None:
        """Hand created context resources to the gate's context (the caller checked the sender's
        authority; a non-clinic authority's only as far as `scope` admits them)."""
        if self.context is None:
            return
        for acc in accepted:
            if (acc.created or acc.updated) and acc.stored.type in CONTEXT_TYPES:
                if scope is None or scope.admits(acc.stored.resource):
                    self.context.put_context(acc.stored.resource)
            elif acc.created and acc.stored.type == "ServiceRequest" and scope is not None:
                self._admit_earlier_consents(acc.stored, scope)

    def _admit_earlier_consents(self, referral: StoredResource, scope: ConsentScope) -> None:
        """A consent authority's Consents for a client, stored before it referred that client,
        count from the referral on (the scope now admits them): the current version of each of
        the sender's Consents naming the referral's subject by the same literal reference.
        Revocation stays monotonic (`put_context`): an older state never reactivates."""
        subject = referral.resource.get("subject")
        ref = subject.get("reference") if isinstance(subject, dict) else None
        if self.context is None or not isinstance(ref, str) or "/" not in ref:
            return
        # Only the authority's own Consents are read, in SQL (`audience` with no references: what
        # it wrote), page after page: however many Consents other senders stored for this client,
        # none crowds the authority's out, and the work is bounded by what the authority wrote.
        own = (scope.partner.name, ())
        offset, total = 0, 1
        while offset < total:
            found = self.store.search(
                "Consent", {"patient": [ref]}, count=MAX_COUNT, offset=offset, audience=own
            )
            for consent in found.items:
                if (
                    consent.source == scope.partner.name
                    and not consent.deleted
                    and scope.admits(consent.resource)
                    # one stored before the partner's Consents counted may carry another's identifier
                    and not identifier_held_elsewhere(
                        scope.partner, consent.resource, self.store, self._context_ids(), self._claimants()
                    )
                ):
                    self.context.put_context(consent.resource)
            offset, total = offset + MAX_COUNT, found.total

    def _queue_notifications(self, accepted: Sequence[Accepted]) -> int:
        """Queue a rest-hook job for each partner a new Communication addresses and may read
        (inside the write's transaction: the job is committed exactly when the note is); how many."""
        if self.partners is None or self.notifier is None or self.notifier.db is None:
            return 0
        hooked = [p for p in self.partners.list() if p.webhook_url and not p.revoked]  # cached list
        if not hooked:
            return 0
        n = 0
        get = remembering(self.store.get)  # each party a note names read once for this write
        for acc in accepted:
            stored = acc.stored
            if not acc.created or stored.type != "Communication":
                continue
            for partner in hooked:
                if partner.name == stored.source or addressed_to(stored.resource, partner, get) is None:
                    continue
                # Only a recipient allowed to read it hears of it (consent-gated, audited like a read).
                if self.may_read is None or self.may_read(partner, stored, get):
                    n += self.notifier.enqueue(
                        partner.name, EVENT_COMMUNICATION, f"Communication/{stored.id}", str(stored.version)
                    )
        return n

    def accept_bundle(
        self, bundle: Any, *, source: str | None, authority: bool | None = None
    ) -> BundleResult:
        """A transaction (all or nothing) or a batch Bundle; a collection, document or searchset
        is taken as a transaction of conditional creates. References between entries (urn:uuid,
        fullUrl, `Type/id`, conditional `Type?identifier=`) are rewritten to the ids stored.

        `authority` as for `accept`: whether the context resources in it feed the consent gate.
        """
        kind, entries = bundle_entries(bundle)
        trusted = self._trusted(source, authority, [e.get("resource") for e in entries])
        partner = self._partner(source)
        author = self._authorship(partner)
        if kind == "batch":
            return self._batch(entries, source, trusted, partner, author)
        return self._transaction(kind, entries, source, trusted, partner, author)

    def _transaction(
        self,
        kind: str,
        entries: list[dict[str, Any]],
        source: str | None,
        trusted: bool,
        partner: Partner | None = None,
        author: Authorship | None = None,
    ) -> BundleResult:
        parsed = []
        issues: list[Issue] = []
        refs: dict[str, str] = {}
        skipped: dict[int, dict[str, Any]] = {}
        # what entries may call each other: a reference to one of these is Bundle-internal, and
        # its target's id may differ between two sends of the same Bundle
        internal = {
            k
            for e in entries
            if isinstance(e.get("resource"), dict)
            for k in _entry_keys(e.get("fullUrl"), e["resource"])
        }
        masks: dict[int, frozenset[str]] = {}
        planned: dict[int, str | None] = {}
        for i, entry in enumerate(entries):
            try:
                resource, cond, op = bundle_entry(entry, i, kind)
            except KapError as exc:
                issues += exc.issues
                continue
            rtype = resource.get("resourceType")
            if kind != "transaction" and rtype not in WRITE_TYPES:
                skipped[i] = _skipped_response(str(rtype)[:40])
                continue
            if author is not None:
                resource = author.fill(resource)
            full = entry.get("fullUrl")
            if kind != "transaction" and cond is None:
                cond, op = _same_identifier(resource), "resend"
            masks[i] = _internal_paths(resource, internal)
            # a conditional entry that matches the sender's resource stands for it: references to it
            # must name that resource, not a new id (checked again inside the write: `planned`)
            try:
                match = self._decide(resource, cond, op, source, masks[i])
            except KapError as exc:
                issues += [x.prefixed(pointer_prefix=f"/entry/{i}") for x in exc.issues]
                continue
            planned[i] = match.id if match else None
            new = match.id if match else new_id()
            if isinstance(rtype, str):
                if isinstance(full, str) and full in refs:
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
                for key in _entry_keys(full, resource):
                    refs.setdefault(key, f"{rtype}/{new}")  # the first entry an id names wins
            parsed.append((i, new, resource, cond, op))
        if issues:
            raise InputError(issues)
        prepared = []
        conditions = _Conditions(parsed, StoreLookup(self.store, source))  # one index, one cache per Bundle
        for i, new, resource, cond, op in parsed:
            resource = rewrite_references(resource, refs)
            unresolved = _conditional_references(resource, conditions, i)
            if not unresolved and _CONDITIONAL.search(orjson.dumps(resource)):
                # one the reader does not take as a reference (over 4,096 characters): never
                # stored as it is, as a single create would not store it
                unresolved = [
                    Issue(
                        "error",
                        "not-supported",
                        "a conditional reference that cannot be resolved (too long to read) is never stored",
                        f"Bundle.entry[{i}].resource",
                        f"/entry/{i}/resource",
                        "bridge:conditional-reference",
                    )
                ]
            issues += unresolved
            resource["id"] = new
            prepared.append((i, new, resource, cond, op))
        if issues:
            # too many to look up or unreadable is the request's fault (400), none or several a
            # precondition (412)
            bad = any(x.code in ("too-costly", "not-supported") for x in issues)
            raise (InputError if bad else PreconditionFailed)(issues)
        resolver = Resolver(
            ((f"{r['resourceType']}/{new}", r) for _, new, r, _, _ in prepared),
            StoreLookup(self.store, source),
        )
        records = []
        worst: type[KapError] = InputError
        for i, _, resource, cond, op in prepared:
            try:
                record, found = self.inspect(resource, pointer=f"/entry/{i}/resource", resolver=resolver)
                if author is not None:
                    author.check(resource, resolver, pointer=f"/entry/{i}/resource")
                self._check_identifiers(partner, [(f"/entry/{i}/resource", resource)])
                records.append((i, resource, cond, op, record, found))
            except KapError as exc:
                issues += exc.issues
                worst = type(exc) if exc.http_status > worst.http_status else worst
        if issues:
            raise worst(issues)
        accepted = self._commit(
            lambda tx: _with_moved_tasks(
                [
                    replace(
                        self._store_one(
                            tx, resource, source, cond, record, op=op, masked=masks[i], planned=planned[i]
                        ),
                        issues=found,
                    )
                    for i, resource, cond, op, record, found in records
                ]
            ),
            trusted,
            self._scope(partner, author, trusted, [r for _, r, *_ in records], resolver),
        )
        responses: dict[int, dict[str, Any]] = dict(skipped)
        for (i, *_), acc in zip(records, accepted):
            responses[i] = _entry_response(acc)
        return BundleResult(
            _response_bundle("transaction-response", [responses[i] for i in sorted(responses)]), accepted
        )

    def _batch(
        self,
        entries: list[dict[str, Any]],
        source: str | None,
        trusted: bool,
        partner: Partner | None = None,
        author: Authorship | None = None,
    ) -> BundleResult:
        """Each entry stands alone (its own SAVEPOINT), and all of them share one commit."""
        out: list[dict[str, Any] | None] = [None] * len(entries)
        checked: list[tuple[int, dict[str, Any], Any, str, dict[str, Any] | None, tuple[Issue, ...]]] = []
        lookup = Resolver((), StoreLookup(self.store, source))
        for i, entry in enumerate(entries):
            try:
                resource, cond, op = bundle_entry(entry, i, "batch")
                _no_conditional_reference(resource)  # each entry stands alone, as a single create
                if author is not None:
                    resource = author.fill(resource)
                if cond is None:  # a plain POST: a resend is recognised as for a single create
                    cond, op = _same_identifier(resource), "resend"
                record, found = self.inspect(resource, resolver=lookup)
                if author is not None:
                    author.check(resource, lookup)
                self._check_identifiers(partner, [("", resource)])
                checked.append((i, resource, cond, op, record, found))
            except KapError as exc:
                out[i] = _error_response(exc)

        def work(tx: Any) -> list[Accepted]:
            accepted = []
            for i, resource, cond, op, record, found in checked:
                try:
                    with self.store.db.transaction() as sp:  # a SAVEPOINT: this entry alone on failure
                        acc = self._store_one(sp, resource, source, cond, record, op=op)
                except KapError as exc:
                    out[i] = _error_response(exc)
                    continue
                out[i] = _entry_response(acc)
                accepted.append(replace(acc, issues=found))
            return _with_moved_tasks(accepted)

        scope = self._scope(partner, author, trusted, [c[1] for c in checked], lookup)
        accepted = self._commit(work, trusted, scope) if checked else []
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
            if self.events is not None:
                queued[0] = bool(self.events.record(tx, [Accepted(task, False)])) or queued[0]
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


#: How many distinct conditional references one Bundle may resolve against the sender's stored
#: resources (one index lookup each, ~12 µs): four per entry of the largest Bundle (a note naming
#: its client, sender, recipient and referral by identifier); beyond, the Bundle is refused.
MAX_STORED_CONDITIONS = 2000


class _Conditions:
    """What the conditional references (`Type?identifier=...`) of one Bundle select: its entries,
    indexed once by type and identifier, else the sender's own stored resources (`lookup`). Each
    distinct condition is answered once (cached), so resolving costs O(entries + references),
    with at most `MAX_STORED_CONDITIONS` store lookups."""

    def __init__(
        self, parsed: Sequence[tuple[int, str, dict[str, Any], Any, str]], lookup: StoreLookup
    ) -> None:
        self.lookup = lookup
        self.lookups = 0
        self._idents: list[frozenset[tuple[str, str]]] = []
        self._ids: list[str] = []
        self._index: dict[tuple[Any, str, str], list[int]] = {}
        for _, new, resource, _, _ in parsed:
            n, rtype, idents = len(self._ids), resource.get("resourceType"), identifiers_of(resource)
            self._idents.append(idents)
            self._ids.append(f"{rtype}/{new}")
            for system, value in idents:
                self._index.setdefault((rtype, system, value), []).append(n)
        self._cache: dict[tuple[str, frozenset[tuple[str, str]]], list[str] | None] = {}

    def hits(self, rtype: str, wanted: Sequence[tuple[str, str]]) -> list[str] | None:
        """The references (`Type/id`) the condition selects, at most two (enough to tell one from
        several): the Bundle's entries carrying every identifier wanted, else the sender's stored
        resources; None when the Bundle names more conditions than may be looked up."""
        key = (rtype, frozenset(wanted))
        if key not in self._cache:
            self._cache[key] = self._select(rtype, key[1])
        return self._cache[key]

    def _select(self, rtype: str, wanted: frozenset[tuple[str, str]]) -> list[str] | None:
        if not wanted:
            return []
        postings = [self._index.get((rtype, *w), []) for w in wanted]
        hits: list[str] = []
        for n in min(postings, key=len):  # the rarest identifier's entries, in Bundle order
            if wanted <= self._idents[n]:
                hits.append(self._ids[n])
                if len(hits) == 2:
                    break
        if hits:
            return hits
        if self.lookups >= MAX_STORED_CONDITIONS:
            return None
        self.lookups += 1
        first = self.lookup.by_identifier(rtype, *next(iter(sorted(wanted))))
        return [f"{rtype}/{r['id']}" for r in first if wanted <= identifiers_of(r)][:2]


def _conditional_references(resource: dict[str, Any], conditions: _Conditions, i: int) -> list[Issue]:
    """Rewrite the `Type?identifier=...` references of entry `i` in place: to the one entry of the
    Bundle, or else the one resource of the sender's, carrying every identifier named (FHIR: none
    or several fail the transaction, 412)."""
    problems: list[Issue] = []
    for _, _, node in iter_references(resource):
        ref = parse_reference(node)
        if ref is None or ref.kind != "conditional":
            continue
        wanted = ref.query_identifiers or ()
        hits = conditions.hits(str(ref.type), wanted)
        if hits is not None and len(hits) == 1:
            node["reference"] = hits[0]
            continue
        problems.append(
            Issue(
                "error",
                "too-costly" if hits is None else "not-found" if not hits else "multiple-matches",
                f"this Bundle names more than {MAX_STORED_CONDITIONS} distinct conditional references "
                "to stored resources; send it in parts"
                if hits is None
                else f"conditional reference to {ref.type} matched {'no' if not hits else 'several'} "
                "resources (identifier=SYSTEM|VALUE only; it must match exactly one)",
                f"Bundle.entry[{i}].resource",
                f"/entry/{i}/resource",
                "bridge:conditional-reference",
            )
        )
    return problems


def _with_moved_tasks(accepted: list[Accepted]) -> list[Accepted]:
    """`accepted`, followed by the referral Tasks its updates moved (a withdrawn referral's Task,
    `Accepted.task` of an update) as writes of their own, so that subscribers (`events`) hear of
    them as of a status move by the clinic. Callers pair answers with the first entries only."""
    return accepted + [Accepted(a.task, False) for a in accepted if a.updated and a.task is not None]


def _stamped(resource: dict[str, Any], source: str) -> dict[str, Any]:
    """A copy of `resource` whose `meta.source` names the partner that wrote it (`authorship`)."""
    meta = resource.get("meta")
    meta = dict(meta) if isinstance(meta, dict) else {}
    meta["source"] = partner_source(source)
    return {**resource, "meta": meta}


def _contained_parties(resource: dict[str, Any]) -> list[dict[str, Any]]:
    """The contained Patients, Practitioners, PractitionerRoles and Organizations of a resource
    that carry a business identifier and reference no other contained resource, as resources of
    their own (no id: the store gives one). Only a single create stores them; in a Bundle, an EHR
    sends its parties as entries."""
    raw = resource.get("contained")
    out = []
    for c in raw if isinstance(raw, list) else []:
        if (
            isinstance(c, dict)
            and c.get("resourceType") in PARTY_TYPES
            and business_identifier(c)
            and b'"reference":"#' not in orjson.dumps(c)  # it would point at what it does not hold
        ):
            out.append({k: v for k, v in c.items() if k != "id"})
    return out


#: A conditional reference (`Type?...`) anywhere in a resource's JSON.
_CONDITIONAL = re.compile(rb'"reference":"[A-Z][A-Za-z]{1,63}\?')


def _no_conditional_reference(resource: dict[str, Any]) -> None:
    """Refuse a conditional reference outside a transaction (a single create or update, a batch
    entry): only a transaction resolves one (`_Conditions`)."""
    if _CONDITIONAL.search(orjson.dumps(resource)):
        raise InputError(
            "a conditional reference (Type?identifier=...) is resolved only inside a transaction "
            "Bundle (POST /fhir); name the resource by its id or by identifier",
            rule="bridge:conditional-reference",
            code="not-supported",
        )


def _content(resource: dict[str, Any], masked: frozenset[str] = frozenset()) -> Any:
    """What makes two copies of a resource the same: everything but id and meta, and but the
    references at the JSON pointers `masked` (references to other entries of one Bundle)."""
    body = {k: v for k, v in resource.items() if k not in ("id", "meta")}
    return _masked(body, masked) if masked else body


def _masked(body: Any, masked: frozenset[str], at: str = "") -> Any:
    if isinstance(body, dict):
        if at in masked and "reference" in body:
            return {**body, "reference": "*"}
        return {k: _masked(v, masked, f"{at}/{k}") for k, v in body.items()}
    if isinstance(body, list):
        return [_masked(v, masked, f"{at}/{i}") for i, v in enumerate(body)]
    return body


def _internal_paths(resource: dict[str, Any], internal: set[str]) -> frozenset[str]:
    """JSON pointers of the references in `resource` that name another entry of its Bundle (or
    select one by a condition): rewritten to ids that may differ between two sends."""
    out = set()
    for at, _, node in iter_references(resource):
        ref = node.get("reference")
        if isinstance(ref, str) and (
            ref in internal
            or ref.split("/_history/", 1)[0] in internal
            or getattr(parse_reference(ref), "kind", None) == "conditional"
        ):
            out.add(at)
    return frozenset(out)


def _same_identifier(resource: Any) -> dict[str, list[str]] | None:
    """The implicit condition of a create: the sender's resource with the same business
    identifier is the same resource (an EHR re-sending a referral gets the one it sent)."""
    ident = business_identifier(resource)
    return {"identifier": [token_value(*ident)]} if ident else None


def _entry_keys(full: Any, resource: dict[str, Any]) -> list[str]:
    """What other entries may call this one: its fullUrl, and `Type/id` of an absolute fullUrl
    or of the id it carries."""
    keys = []
    if isinstance(full, str) and full:
        keys.append(full)
        ref = parse_reference(full)
        if ref is not None and ref.local:
            keys.append(ref.local)
    rid = resource.get("id")
    if isinstance(rid, str) and rid and f"{resource.get('resourceType')}/{rid}" not in keys:
        keys.append(f"{resource.get('resourceType')}/{rid}")
    return keys


def _skipped_response(rtype: str) -> dict[str, Any]:
    return {
        "response": {
            "status": "200 OK",
            "outcome": {
                "resourceType": "OperationOutcome",
                "issue": [
                    {
                        "severity": "information",
                        "code": "informational",
                        "details": {
                            "text": f"{rtype} not stored: the bridge keeps only {', '.join(WRITE_TYPES)}"
                        },
                    }
                ],
            },
        }
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
