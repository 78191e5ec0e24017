"""Who may read what: a partner reads what it sent, and what is addressed to it AND permitted by consent.

Clinic operators (`kap/clinic`) read everything. For every other partner a resource is
visible when the partner submitted it (its own data, nothing is disclosed; a referral's Task
inherits the referral's submitter), or when the resource is addressed to the partner
(`inbound.addressed_to`) and the consent gate permits the disclosure on the day of the read.
Every gate decision, permit or deny, is written to the audit log; in a search, a permit is
written for the rows returned (those disclosed), not for matching rows beyond the page. Anything not visible is
answered exactly like a resource that does not exist.

The gate decides on consent context from consent authorities only (clinic systems and
partners with `kap/consent-authority`): the outbox context, which `Inbound` fills with what
those send. A Consent or PractitionerRole any other partner posts is in the store, readable
by its sender, and ignored here.

Room: bridge/ (layer 4, entry point; the only Flask user): may import any room; nothing imports it but cli/.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from ..config import Release
from ..exchange.inbound import addressed_to
from ..exchange.inbound_rules import remembering
from ..exchange.telemetry import consent_decision
from ..fhir.identifiers import patient_reference
from ..fhir.searchvalues import token_value
from ..storage.partners import Partner, Partners
from ..storage.search import page
from ..storage.store import MAX_ALTERNATIVES, MAX_COUNT, ScanRow, Store, StoredResource

__all__ = [
    "MAX_SCAN",
    "OTHER_SOURCE_PARTIES",
    "SCAN_FACTOR",
    "SCAN_FLOOR",
    "Access",
    "PartnerPage",
    "SearchVisibility",
    "scan_budget",
    "search_page",
]

#: A page of a partner's search looks at most at max(SCAN_FLOOR, SCAN_FACTOR x _count) candidates,
#: and never more than MAX_SCAN: the bound on consent decisions, decoded rows and AuditEvents per
#: request (docs/operations/search-and-audit.md).
SCAN_FACTOR = 4
SCAN_FLOOR = 20
MAX_SCAN = SCAN_FACTOR * MAX_COUNT
#: At most this many Practitioners, Organizations and PractitionerRoles per type that a partner
#: other than the searching one, the clinic's systems and consent authorities wrote name the
#: searching partner in `Access.partner_refs` (one partner's posts never crowd out or inflate
#: another's searches).
OTHER_SOURCE_PARTIES = 20


class Access:
    """Visibility checks for partner reads, consent-gated and audited."""

    def __init__(
        self,
        store: Store,
        *,
        release: Release,
        purpose: str,
        audit: Any | None,
        context_source: Callable[[str], list[dict[str, Any]]],
        partners: Partners,
    ) -> None:
        """`context_source(patient_ref)`: a client's consent context (the outbox's, which only the
        clinic and consent authorities fill); `partners`: the registry with its cached list
        (whose writes count how much in `partner_refs`)."""
        self.store = store
        self.release = release
        self.purpose = purpose
        self.audit = audit
        self.context_source = context_source
        self.partners = partners

    def partner_refs(self, partner: Partner) -> list[str]:
        """Literal references that name `partner`: its own `references`, the Practitioners and
        Organizations carrying its identifiers, and the active PractitionerRoles naming those.

        Looked up source by source (`party_sources`), so one source's parties never crowd out
        another's: what the partner itself, the clinic's systems and consent authorities wrote
        counts up to `MAX_COUNT` per source and type, what any other partner wrote up to
        `OTHER_SOURCE_PARTIES`, oldest first (a partner posting more only hides its own
        addressing). Practitioners and Organizations are found by the identifier index with their
        bodies left undecoded; a PractitionerRole is decoded (is it `active`?) only within
        those bounds."""
        refs = set(partner.references)
        sources = self.party_sources(partner)
        for key in partner.recipient_keys:
            if "|" not in key:
                continue
            system, _, value = key.partition("|")
            query = {"identifier": [token_value(system, value)]}  # a literal
            for rtype in ("Practitioner", "Organization"):
                for source, limit in sources:
                    for row in self._rows(rtype, query, source, limit):
                        refs.add(f"{rtype}/{row.raw['id']}")
        if refs:
            for param in ("practitioner", "organization"):
                prefix = "Practitioner/" if param == "practitioner" else "Organization/"
                wanted = sorted(r for r in refs if r.startswith(prefix))
                for start in range(0, len(wanted), MAX_ALTERNATIVES):  # a search takes 100 values at most
                    chunk = wanted[start : start + MAX_ALTERNATIVES]
                    for source, limit in sources:
                        for row in self._rows("PractitionerRole", {param: [",".join(chunk)]}, source, limit):
                            if self.store.decode(row).resource.get("active", True):
                                refs.add(f"PractitionerRole/{row.raw['id']}")
        return sorted(refs)

    def party_sources(self, partner: Partner) -> list[tuple[str, int]]:
        """(source, how many parties of one type it may contribute) for `partner_refs`: the
        partner itself, the clinic's systems and consent authorities `MAX_COUNT`; every other
        registered partner `OTHER_SOURCE_PARTIES`."""
        out = {partner.name: MAX_COUNT}
        for other in self.partners.list():
            if other.name not in out:
                out[other.name] = MAX_COUNT if other.is_consent_authority else OTHER_SOURCE_PARTIES
        return list(out.items())

    def _rows(
        self, rtype: str, params: Mapping[str, Sequence[str]], source: str, limit: int
    ) -> list[ScanRow]:
        """The first `limit` current `rtype` rows `source` wrote matching `params`, undecoded."""
        # the window only, never counted: a count would cost every row that writer holds
        return self.store.scan(rtype, params, audience=(source, ()), offset=0, limit=limit, count=False).rows

    def can_read(
        self,
        partner: Partner,
        stored: StoredResource,
        resolve: Callable[[str, str], StoredResource | None] | None = None,
    ) -> bool:
        """Whether `partner` may see this version; consent-checked and audited when addressed to
        it (`resolve`: as in `check`)."""
        allowed, event = self.check(partner, stored, resolve=resolve)
        if event is not None and self.audit is not None:
            self.audit.append(event)
        return allowed

    def searcher(self, partner: Partner) -> SearchVisibility:
        """Visibility for the rows of one search: one consent gate per client for the whole
        search, and audit records only for what is disclosed (the page returned) and for denials."""
        return SearchVisibility(self, partner)

    def check(
        self,
        partner: Partner,
        stored: StoredResource,
        gates: dict[str | None, Any] | None = None,
        resolve: Callable[[str, str], StoredResource | None] | None = None,
    ) -> tuple[bool, dict[str, Any] | None]:
        """(visible, the AuditEvent of the gate's decision or None when no consent decision was
        needed), without writing anything. `gates` caches one gate per client across calls;
        `resolve` reads the parties a recipient references (default `store.get`; a search passes
        one that reads each party once, `inbound_rules.remembering`)."""
        if partner.is_clinic:
            return True, None
        if stored.deleted:
            return False, None
        if stored.source is not None and stored.source == partner.name:
            return True, None
        key = addressed_to(stored.resource, partner, resolve or self.store.get)
        if key is None:
            return False, None
        return self._gate(partner, stored, key, gates)

    def _gate(
        self, partner: Partner, stored: StoredResource, key: str, gates: dict[str | None, Any] | None
    ) -> tuple[bool, dict[str, Any]]:
        from ..consent import ConsentGate, Recipient, audit_event

        resource = stored.resource
        recipient = Recipient.parse(key)
        now = datetime.now(UTC)
        patient = patient_reference(resource)
        gate = gates.get(patient) if gates is not None else None
        if gate is None:
            gate = ConsentGate(self.context(patient))
            if gates is not None:
                gates[patient] = gate
        decision = gate.decide(resource, recipient, self.purpose, on=now.date())
        consent_decision("read", decision.permit, decision.codes)
        return bool(decision.permit), audit_event(
            decision,
            resource,
            recipient,
            self.purpose,
            release=self.release,
            recorded=now,
            actor=f"partner:{partner.name}",
        )

    def context(self, patient_ref: str | None) -> list[dict[str, Any]]:
        """Consents for the client, and the people and organisations they name."""
        return self.context_source(patient_ref) if patient_ref else []


class SearchVisibility:
    """Decides the rows of one partner's search (one consent gate per client for the whole
    search) and keeps its AuditEvents until `disclosed` names the page actually returned: then the
    permits of that page and every denial decided are written together, in one commit. Nothing
    is written per row."""

    def __init__(self, access: Access, partner: Partner) -> None:
        self.access = access
        self.partner = partner
        self.decisions = 0  # consent decisions made (each leaves at most one AuditEvent)
        self._gates: dict[str | None, Any] = {}
        self._resolve = remembering(access.store.get)  # each recipient party read once per search
        self._permits: dict[tuple[str, str, int], dict[str, Any]] = {}  # by version (_history)
        self._denials: list[dict[str, Any]] = []

    def __call__(self, stored: StoredResource) -> bool:
        allowed, event = self.access.check(self.partner, stored, self._gates, self._resolve)
        if event is not None:
            self.decisions += 1
            if allowed:
                self._permits[(stored.type, stored.id, stored.version)] = event
            else:
                self._denials.append(event)
        return allowed

    def disclosed(self, items: list[StoredResource]) -> int:
        """Audit the permits of the rows returned (the others were never sent) and the denials,
        in one commit; how many AuditEvents were written."""
        if self.access.audit is None:
            return 0
        keys = ((s.type, s.id, s.version) for s in items)
        events = [self._permits[key] for key in keys if key in self._permits]
        batch = self.access.audit.batch(self.decisions)
        for event in [*events, *self._denials]:
            batch.add(event)
        self._permits.clear()
        self._denials = []
        return len(batch.commit())


@dataclass(frozen=True)
class PartnerPage:
    """One page of a partner's search: the resources returned, the total (None when this page
    did not decide every candidate, so the count of visible ones is not known), the `_offset`
    (a candidate position) where the next page starts (None: nothing after), and the work done."""

    items: list[StoredResource]
    total: int | None
    next_offset: int | None
    scanned: int
    audited: int


def scan_budget(count: int) -> int:
    """The most candidates one page of a partner's search looks at (each may need a consent
    decision and an AuditEvent): `SCAN_FACTOR` x `_count`, at least `SCAN_FLOOR`, at most
    `MAX_SCAN`."""
    return min(MAX_SCAN, max(SCAN_FLOOR, SCAN_FACTOR * max(0, int(count))))


def search_page(
    access: Access,
    partner: Partner,
    rtype: str,
    params: Mapping[str, Sequence[str]],
    *,
    count: int,
    offset: int,
) -> PartnerPage:
    """One page of a (non-clinic) partner's search, at bounded cost.

    SQL selects the candidates (what the partner wrote, or what names one of its references as
    recipient or requester); nothing else is read, decided or audited. From candidate position
    `offset` at most `scan_budget(count)` candidates are looked at: its own rows are visible
    as they are, the others go through `check` (addressed? consent?). The page holds the first
    `count` visible ones (possibly fewer, even none: follow `next`). When every candidate that
    needs a consent decision lies in this window, all of them are decided and the total is
    exact; otherwise it is left out (None). All AuditEvents of the request, the permits of the
    page returned and every denial, are written in one commit, at most `scan_budget(count)`.
    """
    count, offset = page(count, offset)
    store = access.store
    window = store.scan(
        rtype,
        params,
        audience=(partner.name, access.partner_refs(partner)),
        offset=offset,
        limit=scan_budget(count),
    )
    rows = window.rows
    gated_here = sum(1 for r in rows if not r.own)
    exact = gated_here == window.total - window.own  # every consent decision of the search is here
    visible = access.searcher(partner)
    items: list[StoredResource] = []
    visible_here = 0
    own_here = 0
    next_at: int | None = None  # window index where the next page starts
    for i, row in enumerate(rows):
        own_here += row.own
        full = len(items) >= count
        if full and not exact:
            next_at = i  # the page is full and the total is not known anyway: stop here
            break
        if full and row.own:  # counted for the total, never decoded
            visible_here += 1
            next_at = i if next_at is None else next_at
            continue
        stored = store.decode(row)
        if not visible(stored):
            continue
        visible_here += 1
        if not full:
            items.append(stored)
        elif next_at is None:
            next_at = i  # the first visible row past the page
    scanned = next_at if next_at is not None and not exact else len(rows)
    if next_at is None and offset + len(rows) < window.total:
        next_at = len(rows)
    total = (window.own - own_here) + visible_here if exact else None
    audited = visible.disclosed(items)
    return PartnerPage(
        items,
        total,
        offset + next_at if next_at is not None and count > 0 else None,
        scanned,
        audited,
    )
