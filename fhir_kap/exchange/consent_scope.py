"""What a consent authority's writes may do to the consent context (exchange/, layer 3:
orchestration; imports base, pure core and storage/, and `authorship` of its own room;
`inbound.Inbound` applies it, the consent gate itself is unchanged).

Clinic systems (`kap/clinic`) feed the consent context with everything they write. A partner
holding `kap/consent-authority` (a referring practice that collects its clients' signed
releases) is scoped to its own clients and its own organisation:

- **Consents**: one counts only for a client the authority referred: it sent a referral
  (ServiceRequest, not withdrawn: `revoked` and `entered-in-error` do not count) whose subject
  names the Consent's client (the same literal reference, or a
  subject, contained, logical or one of its stored Patients, carrying an identifier the Consent
  names the client by). Any other is stored and readable by its sender, and decides nothing.
- **Patients**: likewise, only a client it referred (a Patient in the context can make an
  identifier ambiguous, and an ambiguous client denies).
- **Practitioners and Organizations**: only the authority itself (the party carries one of its
  NPIs or its organisation identifier, and nobody else's).
- **PractitionerRoles**: only the organisation itself: the role's organization names the
  authority, and its practitioner names no other partner nor the clinic. So an authority cannot
  affiliate its practitioner with an Organization a clinic consent grants.

Two more rules: a Consent's business identifier belongs to the first writer whose Consents count
(the clinic's systems, a consent authority: `check_consent_identifier`); another consent authority
reusing it is refused (403 `bridge:identifier-owner`, at write time only: `$validate` does not
tell), the clinic's systems may write any, and a partner whose Consents count for nothing neither
claims an identifier nor is refused one. Revocation is monotonic for every writer, the clinic
included; that rule lives with the context (`storage.context`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

from ..consent.parties import named_client
from ..errors import Forbidden
from ..fhir.identifiers import business_identifier
from ..fhir.references import Resolver, identifiers_of, parse_reference
from ..storage.partners import Partner
from ..storage.store import Store
from .authorship import Authorship
from .inbound_rules import WITHDRAWN_REFERRAL

__all__ = ["ConsentScope", "check_consent_identifier", "claims_identifiers", "identifier_held_elsewhere"]


class ConsentScope:
    """Which context resources of one write count: `admits(resource)`. Built before the write's
    commit from the authority's stored referrals and the referrals in the write itself."""

    def __init__(
        self,
        partner: Partner,
        authorship: Authorship,
        store: Store,
        *,
        written: Iterable[Any] = (),
        resolver: Resolver | None = None,
    ) -> None:
        self.partner = partner
        self.authorship = authorship
        self.store = store
        self.resolver = resolver
        self._written = [r for r in written if isinstance(r, dict)]
        self._subjects: tuple[set[str], set[tuple[str, str]]] | None = None

    def admits(self, resource: dict[str, Any]) -> bool:
        if self.partner.is_clinic:
            return True
        rtype = resource.get("resourceType")
        if rtype == "Consent":
            client = named_client(resource)
            if client is None:
                return False
            return self._referred({client.reference} if client.reference else set(), set(client.identifiers))
        if rtype == "Patient":
            rid = resource.get("id")
            return self._referred({f"Patient/{rid}"} if rid else set(), set(identifiers_of(resource)))
        if rtype in ("Practitioner", "Organization"):
            return self.authorship.carries_own(resource)
        if rtype == "PractitionerRole":
            org, who = resource.get("organization"), resource.get("practitioner")
            return (
                isinstance(org, dict)
                and self.authorship.names_partner(org, resource, self.resolver)
                and not (
                    isinstance(who, dict) and self.authorship.names_foreign(who, resource, self.resolver)
                )
            )
        return False

    # -- the authority's clients --------------------------------------------------------------------

    def _referred(self, refs: set[str], idents: set[tuple[str, str]]) -> bool:
        literal, carried = self._referral_subjects()
        for ref in list(refs):
            got = self._stored(ref)
            if got is not None and got.get("resourceType") == "Patient":
                idents |= identifiers_of(got)
        return bool(refs & literal) or bool(idents & carried)

    def _referral_subjects(self) -> tuple[set[str], set[tuple[str, str]]]:
        """The literal subject references of the authority's referrals, and every identifier
        those subjects carry (contained, logical, or the stored Patient a literal one names)."""
        if self._subjects is not None:
            return self._subjects
        referrals = [r for r in self._written if r.get("resourceType") == "ServiceRequest"]
        offset, total = 0, 1
        while offset < total:  # every referral the authority sent (a consent write is rare)
            page = self.store.search(
                "ServiceRequest", {}, count=200, offset=offset, audience=(self.partner.name, ())
            )
            referrals += [s.resource for s in page.items]
            offset, total = offset + 200, page.total
        literal: set[str] = set()
        carried: set[tuple[str, str]] = set()
        for sr in referrals:
            if (
                sr.get("status") in WITHDRAWN_REFERRAL
            ):  # withdrawn (revoked, entered-in-error): no client of its
                continue
            subject = sr.get("subject")
            ref = parse_reference(subject)
            if ref is None:
                continue
            if ref.identifier is not None:
                carried.add(ref.identifier)
            if ref.local is not None and ref.kind == "relative":
                literal.add(ref.local)
            found = self.resolver.resolve(subject, sr) if self.resolver is not None else None
            if found is not None and found.resource is not None:
                carried |= identifiers_of(found.resource)
            elif ref.kind == "relative" and ref.local:
                got = self._stored(ref.local)
                if got is not None:
                    carried |= identifiers_of(got)
        self._subjects = (literal, carried)
        return self._subjects

    def _stored(self, ref: str) -> dict[str, Any] | None:
        rtype, _, rid = ref.partition("/")
        if not rtype or not rid or "/" in rid:
            return None
        for r in self._written:
            if r.get("resourceType") == rtype and r.get("id") == rid:
                return r
        got = self.store.get(rtype, rid)
        return got.resource if got is not None and not got.deleted else None


def claims_identifiers(partner: Partner) -> bool:
    """Whether `partner`'s Consents claim their business identifiers: those of the writers whose
    Consents count (the clinic's systems and consent authorities; by scope, so a revoked
    authority's identifiers stay its own). Anyone else's Consents decide nothing, so they neither
    claim an identifier nor are refused one."""
    return partner.is_clinic or "kap/consent-authority" in partner.scopes


def identifier_held_elsewhere(
    partner: Partner,
    resource: Any,
    store: Store,
    context_ids: Callable[[str], list[str]] | None,
    claimants: Iterable[Partner],
) -> bool:
    """Whether the business identifier of the Consent `resource` is held by a writer other than
    `partner` whose Consents claim identifiers (`claims_identifiers`): a stored Consent of one of
    `claimants` or without a sender (one index lookup each, so no other partner's Consents can
    crowd the answer), or a Consent in the consent context (the clinic's, fed by `/kap/records`)
    under an id that is not one of `partner`'s stored Consents."""
    if not isinstance(resource, dict) or resource.get("resourceType") != "Consent":
        return False
    ident = business_identifier(resource)
    if ident is None:
        return False
    others: list[str | None] = [None]
    others += sorted({p.name for p in claimants if p.name != partner.name and claims_identifiers(p)})
    if any(store.with_identifier("Consent", *ident, source=o, limit=1) for o in others):
        return True
    for cid in context_ids("|".join(ident)) if context_ids is not None else ():
        got = store.get("Consent", cid)
        if got is None or got.source != partner.name:
            return True
    return False


def check_consent_identifier(
    partner: Partner,
    resources: Sequence[tuple[str, Any]],
    store: Store,
    context_ids: Callable[[str], list[str]] | None,
    claimants: Iterable[Partner] = (),
) -> None:
    """Refuse (403, `bridge:identifier-owner`) a consent authority's Consent whose business
    identifier another writer whose Consents count holds (`identifier_held_elsewhere`; `claimants`:
    the registered partners). `resources`: (JSON pointer, resource) of the write. Clinic systems
    may write any; a partner whose Consents do not count is not checked (nor does it claim)."""
    if partner.is_clinic or not claims_identifiers(partner):
        return
    claimants = list(claimants)
    for pointer, resource in resources:
        if identifier_held_elsewhere(partner, resource, store, context_ids, claimants):
            raise Forbidden(
                "this Consent's business identifier was first written by another partner (or the "
                "clinic): a consent belongs to whoever first wrote it; use an identifier of your own",
                pointer=f"{pointer}/identifier",
                expression="Consent.identifier",
                rule="bridge:identifier-owner",
                code="forbidden",
            )
