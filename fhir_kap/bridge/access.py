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

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from ..config import Release
from ..exchange.inbound import addressed_to
from ..fhir.identifiers import patient_reference
from ..storage.partners import Partner
from ..storage.store import MAX_ALTERNATIVES, Store, StoredResource

__all__ = ["Access", "SearchVisibility"]


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
    ) -> None:
        """`context_source(patient_ref)`: a client's consent context (the outbox's, which only the
        clinic and consent authorities fill)."""
        self.store = store
        self.release = release
        self.purpose = purpose
        self.audit = audit
        self.context_source = context_source

    def partner_refs(self, partner: Partner) -> list[str]:
        """Literal references that name `partner` (its own, and stored resources carrying its identifiers)."""
        refs = set(partner.references)
        for key in partner.recipient_keys:
            if "|" not in key:
                continue
            for rtype in ("Practitioner", "Organization"):
                for s in self.store.search(rtype, {"identifier": [key]}, count=200).items:
                    refs.add(f"{rtype}/{s.id}")
        if refs:
            for param in ("practitioner", "organization"):
                prefix = "Practitioner/" if param == "practitioner" else "Organization/"
                wanted = sorted(r for r in refs if r.startswith(prefix))
                for start in range(0, len(wanted), MAX_ALTERNATIVES):  # a search takes 100 values at most
                    chunk = wanted[start : start + MAX_ALTERNATIVES]
                    for s in self.store.search(
                        "PractitionerRole", {param: [",".join(chunk)]}, count=200
                    ).items:
                        if s.resource.get("active", True):
                            refs.add(f"PractitionerRole/{s.id}")
        return sorted(refs)

    def can_read(self, partner: Partner, stored: StoredResource) -> bool:
        """Whether `partner` may see this version; consent-checked and audited when addressed to it."""
        allowed, event = self.check(partner, stored)
        if event is not None and self.audit is not None:
            self.audit.append(event)
        return allowed

    def searcher(self, partner: Partner) -> SearchVisibility:
        """Visibility for the rows of one search: one consent gate per client for the whole
        search, and audit records only for what is disclosed (the page returned) and for denials."""
        return SearchVisibility(self, partner)

    def check(
        self, partner: Partner, stored: StoredResource, gates: dict[str | None, Any] | None = None
    ) -> tuple[bool, dict[str, Any] | None]:
        """(visible, the AuditEvent of the gate's decision or None when no consent decision was
        needed), without writing anything. `gates` caches one gate per client across calls."""
        if partner.is_clinic:
            return True, None
        if stored.deleted:
            return False, None
        if stored.source is not None and stored.source == partner.name:
            return True, None
        key = addressed_to(stored.resource, partner, self.store.get)
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
    """`where` for one partner's search: decides each row (one gate per client), keeps the
    AuditEvents of permitted rows until `disclosed` names the page actually returned, and
    audits denials at once."""

    def __init__(self, access: Access, partner: Partner) -> None:
        self.access = access
        self.partner = partner
        self._gates: dict[str | None, Any] = {}
        self._permits: dict[tuple[str, str], dict[str, Any]] = {}

    def __call__(self, stored: StoredResource) -> bool:
        allowed, event = self.access.check(self.partner, stored, self._gates)
        if event is not None:
            if allowed:
                self._permits[(stored.type, stored.id)] = event
            elif self.access.audit is not None:
                self.access.audit.append(event)
        return allowed

    def disclosed(self, items: list[StoredResource]) -> None:
        """Audit the permits of the rows returned (the others were never sent)."""
        if self.access.audit is None:
            return
        events = [self._permits[key] for key in ((s.type, s.id) for s in items) if key in self._permits]
        self.access.audit.append_many(events)  # one commit for the page
