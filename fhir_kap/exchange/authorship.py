"""Authorship: what a partner writes names the partner as its author (exchange/, layer 3:
orchestration; imports base and storage's types only, and writes nothing: `inbound.Inbound`
applies it to every resource a partner writes, single POST, transaction, batch and collection).

`AUTHORSHIP` is the one table: per resource type, the elements that say who wrote, sent,
requested, performed or recorded it. For a partner that is not a clinic system
(`Partner.is_clinic`), each Reference in those elements must name the partner itself:

- a literal reference among its `references` (`Practitioner/ref-therapist`), or one that
  resolves (contained, the same Bundle, or a resource stored here) to a party carrying one of its
  NPIs or its organisation identifier; a PractitionerRole names the partner when its practitioner
  or organization does and neither names anybody else;
- a logical reference (`identifier`) carrying one of those identifiers (also beside a literal
  reference to another server's id that resolves to nothing here);
- where the table says `client`, the resource's own client (a Patient it is about, or a
  RelatedPerson) instead: a questionnaire the client answered, a symptom the client reported.

Anything else is refused with 403, rule `bridge:authorship`, naming the element: another
practice, the clinic (its organisation identifier, or a clinic partner's references or NPIs),
a party nobody can tell (display only, a reference that resolves to nothing and carries no
identifier). An element the table marks `fill` that is absent is filled with the partner's
own identity (its first reference, else its first NPI, else its organisation identifier).
Clinic systems write on behalf of others (a referral received by fax, a practice's note
imported by the clinic's EHR): their author elements are not checked; an absent one is filled
with their own identity, else the clinic organisation.

Whoever wrote it, the stored resource says so: `meta.source` is `urn:fhir-kap:partner:<name>`
(`partner_source`), replacing whatever the sender put there. Partners read it back with the resource.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from ..errors import Forbidden, Issue
from ..fhir.references import Ref, Resolver, identifiers_of, parse_reference
from ..storage.partners import NPI_SYSTEM, Partner

__all__ = [
    "AUTHORSHIP",
    "SOURCE_PREFIX",
    "Author",
    "Authorship",
    "identity_of",
    "partner_source",
]

#: meta.source of what a partner wrote: this prefix and the partner's name.
SOURCE_PREFIX = "urn:fhir-kap:partner:"


@dataclass(frozen=True)
class Author:
    """One author element: its path (dotted; a list at any step is walked item by item), whether
    an absent one is filled from the partner (`fill`; `many`: as a one-item list), and whether it
    may name the resource's client instead (`client`)."""

    path: str
    fill: bool = False
    many: bool = False
    client: bool = False


#: Resource type -> its author elements (R4 and R5 names both: an element a release lacks is
#: simply absent). Types not listed (Patient, Practitioner, PractitionerRole, Organization) are
#: parties themselves: what they may do to the consent context is `consent_scope`'s business.
AUTHORSHIP: dict[str, tuple[Author, ...]] = {
    "Communication": (Author("sender", fill=True),),
    "ServiceRequest": (Author("requester", fill=True),),
    "Procedure": (
        Author("performer.actor"),
        Author("recorder", fill=True),
        Author("asserter", client=True),  # R4
        Author("reportedReference", client=True),  # R5 reported[x]
    ),
    # The KAP Consent's organization (R4) / controller (R5) is the clinic that discloses, not
    # its author: what a Consent from a partner counts for is `consent_scope`'s business.
    "Consent": (
        Author("performer", client=True),  # R4: who signs (the client)
        Author("grantor", client=True),  # R5
    ),
    "DocumentReference": (Author("author", fill=True, many=True), Author("authenticator")),
    "QuestionnaireResponse": (Author("author", fill=True, client=True), Author("source", client=True)),
    "Observation": (Author("performer", client=True),),
    "Condition": (Author("recorder", fill=True), Author("asserter", client=True)),
    "AllergyIntolerance": (Author("recorder", fill=True), Author("asserter", client=True)),
    "MedicationStatement": (Author("informationSource", client=True),),
    "MedicationRequest": (
        Author("requester", fill=True),
        Author("recorder"),
        Author("reportedReference", client=True),  # R4 reported[x]
        Author("informationSource", client=True),  # R5
    ),
}

_CLIENT_TYPES = ("Patient", "RelatedPerson")
_CLIENT_ELEMENTS = ("subject", "patient", "for")


def partner_source(name: str) -> str:
    """The `meta.source` of a resource the partner `name` wrote."""
    return f"{SOURCE_PREFIX}{name}"


@dataclass(frozen=True)
class Identity:
    """What names a partner: literal references and (system, value) identifiers."""

    references: frozenset[str]
    identifiers: frozenset[tuple[str, str]]


def identity_of(partner: Partner) -> Identity:
    idents = {(NPI_SYSTEM, n) for n in partner.npis}
    if partner.org_identifier and "|" in partner.org_identifier:
        system, _, value = partner.org_identifier.partition("|")
        idents.add((system, value))
    return Identity(frozenset(partner.references), frozenset(idents))


def _merge(ids: Iterable[Identity]) -> Identity:
    refs: set[str] = set()
    idents: set[tuple[str, str]] = set()
    for i in ids:
        refs |= i.references
        idents |= i.identifiers
    return Identity(frozenset(refs), frozenset(idents))


class Authorship:
    """The authorship rule for one partner's write. `others`: every other partner (the clinic's
    systems among them); `clinic_identifier`: the clinic organisation's (system, value);
    `stored(type, id)`: a resource stored here, or None (any sender's: identity is read from
    its identifiers, never from who stored it)."""

    def __init__(
        self,
        partner: Partner,
        others: Iterable[Partner],
        *,
        clinic_identifier: tuple[str, str] | None,
        stored: Callable[[str, str], dict[str, Any] | None],
        clinic_reference: dict[str, Any] | None = None,
    ) -> None:
        """`clinic_reference`: what a clinic system with no identity of its own fills in (the
        clinic organisation)."""
        self.partner = partner
        self.clinic_reference = clinic_reference
        self.own = identity_of(partner)
        foreign = _merge(identity_of(p) for p in others if p.name != partner.name)
        extra = {clinic_identifier} if clinic_identifier else set()
        self.foreign = Identity(
            foreign.references - self.own.references, (foreign.identifiers | extra) - self.own.identifiers
        )
        self.stored = stored

    @property
    def checked(self) -> bool:
        """Clinic systems write on behalf of others: their author elements are not checked."""
        return not self.partner.is_clinic

    def fill(self, resource: dict[str, Any]) -> dict[str, Any]:
        """`resource` with absent `fill` author elements set to the partner's identity (a clinic
        system with none: the clinic organisation); a copy when anything changes, as it is for a
        partner with no identity."""
        me = self._reference()
        if me is None and self.partner.is_clinic:
            me = self.clinic_reference
        if me is None:
            return resource
        out = resource
        for author in AUTHORSHIP.get(str(resource.get("resourceType")), ()):
            if not author.fill or "." in author.path or author.path in resource:
                continue
            if out is resource:
                out = dict(resource)
            out[author.path] = [dict(me)] if author.many else dict(me)
        return out

    def check(self, resource: dict[str, Any], resolver: Resolver | None, pointer: str = "") -> None:
        """Raise Forbidden (rule `bridge:authorship`) naming every author element of `resource`
        that does not name the partner (see the module docstring)."""
        if not self.checked:
            return
        rtype = str(resource.get("resourceType"))
        problems: list[Issue] = []
        for author in AUTHORSHIP.get(rtype, ()):
            for at, expr, value in _walk(resource, author.path):
                why = self._names_partner(value, resource, resolver, author.client)
                if why is None:
                    continue
                problems.append(
                    Issue(
                        "error",
                        "forbidden",
                        f"{rtype}.{author.path} must name the partner that writes it "
                        f"({self.partner.name}: one of its references, NPIs or its organisation "
                        f"identifier){' or the client' if author.client else ''}; {why}",
                        f"{rtype}.{expr}",
                        f"{pointer}{at}",
                        "bridge:authorship",
                    )
                )
        if problems:
            raise Forbidden(problems)

    def names_partner(self, value: Any, container: dict[str, Any], resolver: Resolver | None) -> bool:
        """Whether the Reference `value` (found in `container`) names the partner itself."""
        return self._verdict(value, container, resolver, False, 0)[0] == "self"

    def names_foreign(self, value: Any, container: dict[str, Any], resolver: Resolver | None) -> bool:
        """Whether the Reference `value` names somebody known to be another party."""
        return self._verdict(value, container, resolver, False, 1)[0] == "foreign"

    def carries_own(self, resource: dict[str, Any]) -> bool:
        """Whether a party resource carries one of the partner's identifiers and none of anybody else's."""
        idents = identifiers_of(resource)
        return bool(idents & self.own.identifiers) and not idents & self.foreign.identifiers

    # -- matching ---------------------------------------------------------------------------------

    def _reference(self) -> dict[str, Any] | None:
        p = self.partner
        if p.references:
            return {"reference": p.references[0]}
        if p.npis:
            return {"type": "Practitioner", "identifier": {"system": NPI_SYSTEM, "value": p.npis[0]}}
        if p.org_identifier and "|" in p.org_identifier:
            system, _, value = p.org_identifier.partition("|")
            return {"type": "Organization", "identifier": {"system": system, "value": value}}
        return None

    def _names_partner(
        self, value: Any, container: dict[str, Any], resolver: Resolver | None, client: bool, depth: int = 0
    ) -> str | None:
        """None when `value` names the partner (or, with `client`, the resource's client); else why not."""
        verdict, why = self._verdict(value, container, resolver, client, depth)
        return None if verdict == "self" else why

    def _verdict(
        self, value: Any, container: dict[str, Any], resolver: Resolver | None, client: bool, depth: int
    ) -> tuple[str, str]:
        """("self" | "foreign" | "unknown", why): the partner, somebody known to be somebody else
        (another partner, the clinic, a client where a client may not be named), or nobody known."""
        ref = parse_reference(value)
        if ref is None:
            return "unknown", "it names nobody (a display alone names no party)"
        if ref.identifier is not None and ref.identifier in self.foreign.identifiers:
            return "foreign", "its identifier names another party (another partner or the clinic)"
        local = f"{ref.type}/{ref.id}" if ref.kind == "relative" else None
        if local is not None and local in self.foreign.references:
            return "foreign", "it names another partner"
        if client and ref.type in _CLIENT_TYPES and _is_client(ref, value, container):
            return "self", ""
        if local is not None and local in self.own.references:
            if ref.identifier is None or ref.identifier in self.own.identifiers:
                return "self", ""
            return "unknown", _OTHER
        found: dict[str, Any] | None = None
        if resolver is not None and ref.kind != "logical":
            got = resolver.resolve(value, container)
            found = got.resource if got is not None else None
        if found is None and local is not None:
            found = self.stored(str(ref.type), str(ref.id))
        if found is not None:
            return self._party(found, resolver, client, container, depth)
        if ref.identifier is not None and ref.identifier in self.own.identifiers:
            return "self", ""  # another server's id beside the partner's own identifier
        if ref.kind in ("logical", "absolute") or ref.identifier is not None:
            return "unknown", _OTHER
        return "unknown", "it resolves to no party here and carries no identifier of the partner"

    def _party(
        self,
        found: dict[str, Any],
        resolver: Resolver | None,
        client: bool,
        container: dict[str, Any],
        depth: int,
    ) -> tuple[str, str]:
        """Whether the party resource a reference resolved to is the partner, or why not."""
        ftype = found.get("resourceType")
        if ftype in _CLIENT_TYPES:
            if client and (ftype == "RelatedPerson" or _same_client(found, container)):
                return "self", ""
            return "foreign", "it names a client (or another client), and this element names who wrote it"
        idents = identifiers_of(found)
        if idents & self.foreign.identifiers:
            return (
                "foreign",
                "the party it names carries another party's identifier (another partner or the clinic)",
            )
        if idents & self.own.identifiers:
            return "self", ""
        if ftype == "PractitionerRole" and depth == 0:
            verdicts = [
                self._verdict(sub, found, resolver, False, depth + 1)[0]
                for sub in (found.get("practitioner"), found.get("organization"))
                if isinstance(sub, dict)
            ]
            if "self" in verdicts and "foreign" not in verdicts:
                return "self", ""
            return (
                "foreign" if "foreign" in verdicts else "unknown",
                "it names a PractitionerRole whose practitioner or organization is not the partner",
            )
        return "unknown", _OTHER


_OTHER = "it names a party that is not the partner"


def _walk(resource: dict[str, Any], path: str) -> Iterator[tuple[str, str, Any]]:
    """(JSON pointer, FHIRPath-ish expression, value) of each Reference at `path`; a list at any
    step is walked item by item."""
    nodes: list[tuple[str, str, Any]] = [("", "", resource)]
    for step in path.split("."):
        nxt: list[tuple[str, str, Any]] = []
        for at, expr, node in nodes:
            if not isinstance(node, dict) or step not in node:
                continue
            value = node[step]
            name = f"{expr}.{step}" if expr else step
            if isinstance(value, list):
                nxt += [(f"{at}/{step}/{i}", f"{name}[{i}]", v) for i, v in enumerate(value)]
            else:
                nxt.append((f"{at}/{step}", name, value))
        nodes = nxt
    return iter(nodes)


def _client_refs(container: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for name in _CLIENT_ELEMENTS:
        v = container.get(name)
        out += [x for x in (v if isinstance(v, list) else [v]) if isinstance(x, dict)]
    return out


def _is_client(ref: Ref, value: Any, container: dict[str, Any]) -> bool:
    """Whether a Patient / RelatedPerson reference names the resource's own client, as written:
    the same reference string, or a shared identifier (RelatedPerson: any)."""
    if ref.type == "RelatedPerson":
        return True
    written = value.get("reference") if isinstance(value, dict) else None
    for c in _client_refs(container):
        if written and written == c.get("reference"):
            return True
        other = parse_reference(c)
        if ref.identifier is not None and other is not None and other.identifier == ref.identifier:
            return True
    return False


def _same_client(found: dict[str, Any], container: dict[str, Any]) -> bool:
    """Whether a Patient the reference resolved to is the resource's client: it carries an
    identifier the client is named by, or the client reference resolves to it as a contained one."""
    idents = identifiers_of(found)
    for c in _client_refs(container):
        ref = parse_reference(c)
        if ref is None:
            continue
        if ref.identifier is not None and ref.identifier in idents:
            return True
        if ref.kind == "contained" and found.get("id") == ref.id:
            return True
        if ref.kind == "relative" and found.get("id") == ref.id:
            return True
    return False
