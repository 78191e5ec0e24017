"""The parties a Consent names, read as EHRs write them, through the one reference resolver.

Room: consent/ (layer 1, pure core: no IO, no clock): may import the base rooms only.

Every party reference of a Consent (R4 `patient`, `performer`, `organization`, provision
`actor.reference`; R5 `subject`, `grantor`, `grantee`, `controller`, `manager`, provision
`actor.reference`; nested provisions too) and the client of a disclosed resource is read by
`fhir.references.parse_reference` and resolved by one `fhir.references.Resolver` over the
consent context's Patients, Practitioners, Organizations and PractitionerRoles:

- a literal reference (`Patient/p1`, an absolute URL; a version suffix dropped) names its party
  as written; an absolute URL never equals a relative `Type/id`;
- a contained reference (`#pt`) names the Consent's own contained resource: its business
  identifiers name the party (none → nothing names it → the consent is unreadable);
- a logical reference (identifier, with or without `type`) names whoever carries that
  identifier; resolved in the context on business identifiers only (never display), and the
  carrier must be unique;
- a conditional reference (`Patient?identifier=s|v`) must resolve to one resource in the context.

A party that cannot be read with certainty (contained resource missing or of another type,
several carriers of its identifiers, a Patient identifier carried by another type of resource)
raises `Unreadable`: the consent compiles to a malformed policy, which can only deny.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from ..fhir.references import PARTY_TYPES, Ref, Resolver, ResourceIndex, identifiers_of, parse_reference
from ..fhir.release import release_signals
from .recipients import ActorRef, actor_ref, normalise_reference

__all__ = ["PARTY_TYPES", "Client", "Parties", "Unreadable", "named_client"]

#: The resource types a consent's parties are looked up among (the consent context's parties).
_RECIPIENT_TYPES = ("Practitioner", "Organization", "PractitionerRole")

Ident = tuple[str, str]


class Unreadable(Exception):
    """A party reference that cannot be read with certainty: (message, FHIRPath)."""

    def __init__(self, message: str, path: str) -> None:
        super().__init__(message)
        self.message, self.path = message, path


@dataclass(frozen=True)
class Client:
    """Who a Consent (or a disclosed resource) is about: a literal reference and/or the business
    identifiers that name the client (a Consent: the ones it names; a disclosed resource: the
    ones its client carries). A Consent's client is a disclosed resource's client when the
    literal references are equal or they share an identifier (`ConsentGate` indexes both)."""

    reference: str | None = None
    identifiers: frozenset[Ident] = frozenset()


def _carriers(index: ResourceIndex, ids: Iterable[Ident], rtype: str | None) -> list[dict[str, Any]]:
    """The distinct context resources (of `rtype` when given) carrying any of `ids`."""
    found: dict[tuple[Any, Any], dict[str, Any]] = {}
    for system, value in ids:
        for r in index.by_identifier(rtype, system, value):
            rid = r.get("id")
            found.setdefault((r["resourceType"], rid) if isinstance(rid, str) and rid else ("", id(r)), r)
    return list(found.values())


def _literal(resource: dict[str, Any]) -> str | None:
    rid = resource.get("id")
    return f"{resource['resourceType']}/{rid}" if isinstance(rid, str) and rid else None


class Parties:
    """The consent context's parties, and the one way a Consent's party references are resolved."""

    def __init__(self, resources: Iterable[dict[str, Any]] = ()) -> None:
        self.index = ResourceIndex(r for r in resources if r.get("resourceType") in PARTY_TYPES)
        self.resolver = Resolver(context=self.index)

    # -- the client -------------------------------------------------------------------------

    def consent_client(self, consent: dict[str, Any], field: str) -> Client:
        """The client a Consent names in `field` (R4 `patient`, R5 `subject`); raises `Unreadable`."""
        path = f"Consent.{field}"
        value = consent.get(field)
        ref = parse_reference(value)
        if ref is None:
            raise Unreadable(
                f"{path} names the client by neither a literal reference nor an identifier", path
            )
        if ref.kind in ("relative", "absolute"):
            return Client(normalise_reference(ref.text))
        if ref.kind == "container":
            raise Unreadable(f"{path} is '#', which names the Consent itself, not the client", path)
        found = self.resolver.resolve(value, consent)
        if ref.kind == "conditional":
            if found is None or found.resource is None or found.resource.get("resourceType") != "Patient":
                raise Unreadable(f"{path} is a conditional reference that names no single Patient here", path)
            return Client(_literal(found.resource))
        if ref.kind == "contained":
            res = found.resource if found is not None else None
            if res is None:
                raise Unreadable(f"{path} references a contained resource this Consent does not hold", path)
            if res.get("resourceType") != "Patient":
                raise Unreadable(
                    f"{path}: the contained resource is a {res.get('resourceType')}, not a Patient", path
                )
            ids = identifiers_of(res)
            if not ids:
                raise Unreadable(
                    f"{path}: the contained Patient carries no identifier, so nothing names the client", path
                )
        else:  # logical (or a urn that only its identifier can name)
            if ref.identifier is None:
                raise Unreadable(f"{path} names no resource this Consent or the context holds", path)
            if ref.type not in (None, "Patient"):
                raise Unreadable(f"{path} names a {ref.type[:64]}, not a Patient", path)
            ids = frozenset({ref.identifier})
        return Client(self._unique_patient(ids, path), ids)

    def _unique_patient(self, ids: frozenset[Ident], path: str) -> str | None:
        """The one context Patient carrying `ids` (None when none does); `Unreadable` when another
        type of resource carries one of them or several Patients do."""
        carriers = _carriers(self.index, ids, None)
        if any(c["resourceType"] != "Patient" for c in carriers):
            raise Unreadable(
                f"an identifier {path} names is carried by a resource that is not a Patient", path
            )
        if len(carriers) > 1:
            raise Unreadable(f"{len(carriers)} Patients carry the identifiers {path} names (ambiguous)", path)
        return _literal(carriers[0]) if carriers else None

    def client_of(self, resource: dict[str, Any]) -> Client | None:
        """Who a disclosed resource is about (its `subject`, else `patient`; a Patient itself),
        with the identifiers that client carries; None when that cannot be told for certain."""
        for field in ("subject", "patient"):
            value = resource.get(field)
            ref = parse_reference(value)
            if ref is None:
                continue
            if ref.kind in ("relative", "absolute"):
                literal = normalise_reference(ref.text)
                known = (
                    self.index.get(ref.type, ref.id)
                    if ref.kind == "relative" and ref.type and ref.id
                    else None
                )
                return Client(literal, identifiers_of(known) if known is not None else frozenset())
            return self._named_client(value, ref, resource)
        if resource.get("resourceType") == "Patient" and isinstance(resource.get("id"), str):
            return Client(f"Patient/{resource['id']}", identifiers_of(resource))
        return None

    def _named_client(self, value: Any, ref: Ref, resource: dict[str, Any]) -> Client | None:
        if ref.type not in (None, "Patient"):
            return None
        found = self.resolver.resolve(value, resource)
        if ref.kind == "contained":
            res = found.resource if found is not None else None
            ids = (
                identifiers_of(res)
                if res is not None and res.get("resourceType") == "Patient"
                else frozenset()
            )
        elif ref.kind == "conditional":
            res = found.resource if found is not None else None
            if res is None or res.get("resourceType") != "Patient":
                return None
            return Client(_literal(res), identifiers_of(res))
        else:
            ids = frozenset({ref.identifier}) if ref.identifier else frozenset()
        if not ids:
            return None
        carriers = _carriers(self.index, ids, None)
        if len(carriers) > 1 or any(c["resourceType"] != "Patient" for c in carriers):
            return None  # ambiguous, or not a Patient's identifier: nobody can tell who this is
        if carriers:
            return Client(_literal(carriers[0]), ids | identifiers_of(carriers[0]))
        return Client(None, ids)

    # -- recipients and the other parties --------------------------------------------------

    def recipient(self, value: Any, consent: dict[str, Any], path: str) -> ActorRef:
        """A party the Consent grants to (an IRCP actor, an R5 grantee); raises `Unreadable`."""
        ref = parse_reference(value)
        if ref is None:
            raise Unreadable(f"{path} names nobody", path)
        if ref.kind in ("relative", "absolute"):
            literal = actor_ref(value)
            if literal is None:
                raise Unreadable(f"{path} names nobody", path)
            return literal
        if ref.kind == "container":
            raise Unreadable(f"{path} is '#', which names the Consent itself", path)
        found = self.resolver.resolve(value, consent)
        res = found.resource if found is not None else None
        if ref.kind == "conditional":
            if res is None or res.get("resourceType") not in _RECIPIENT_TYPES:
                raise Unreadable(f"{path} is a conditional reference that names no single party here", path)
            return ActorRef(_literal(res), None, res["resourceType"])
        if ref.kind == "contained":
            if res is None:
                raise Unreadable(f"{path} references a contained resource this Consent does not hold", path)
            rtype = res.get("resourceType")
            if rtype not in _RECIPIENT_TYPES:
                raise Unreadable(f"{path}: the contained {rtype} cannot be a recipient", path)
            ids = identifiers_of(res)
            if not ids:
                raise Unreadable(
                    f"{path}: the contained {rtype} carries no identifier, so nothing names it", path
                )
            self._unique_party(ids, rtype, path)
            return ActorRef(None, None, rtype, ids)
        if ref.identifier is None:  # a urn without an identifier
            raise Unreadable(f"{path} names no resource this Consent or the context holds", path)
        carrier = self._unique_party(frozenset({ref.identifier}), ref.type, path)
        return ActorRef(None, ref.identifier, ref.type or (carrier["resourceType"] if carrier else None))

    def _unique_party(self, ids: frozenset[Ident], rtype: str | None, path: str) -> dict[str, Any] | None:
        carriers = _carriers(self.index, ids, rtype)
        if len(carriers) > 1:
            raise Unreadable(
                f"{len(carriers)} resources carry the identifiers {path} names (ambiguous)", path
            )
        return carriers[0] if carriers else None

    def check(self, value: Any, consent: dict[str, Any], path: str) -> None:
        """A party the gate does not decide on (performer, organization, grantor, controller,
        manager, actors in other roles): a contained reference must name a contained resource."""
        ref = parse_reference(value)
        if ref is not None and ref.kind == "contained":
            found = self.resolver.resolve(value, consent)
            if found is None or found.resource is None:
                raise Unreadable(f"{path} references a contained resource this Consent does not hold", path)


def named_client(consent: Any) -> Client | None:
    """Who a Consent names as its client, read without any context (for indexing where the
    consent context is kept): its literal reference, or the identifiers it names (logical,
    contained Patient, conditional `identifier=` parameters). None when nothing names the client.
    The gate alone decides, with the context, whether that naming is certain enough.

    >>> named_client({"resourceType": "Consent", "patient": {"type": "Patient",
    ...     "identifier": {"system": "urn:oid:1.2", "value": "E1"}}}).identifiers
    frozenset({('urn:oid:1.2', 'E1')})
    """
    if not isinstance(consent, dict):
        return None
    r4, r5 = release_signals(consent)
    value = consent.get("subject" if r5 and not r4 else "patient")  # as the compiler reads it
    ref = parse_reference(value)
    if ref is None or ref.type not in (None, "Patient"):
        return None
    if ref.kind in ("relative", "absolute"):
        literal = normalise_reference(ref.text)
        return Client(literal) if literal else None
    ids: frozenset[Ident] = frozenset()
    if ref.kind == "contained":
        found = Resolver().resolve(value, consent)
        if (
            found is not None
            and found.resource is not None
            and found.resource.get("resourceType") == "Patient"
        ):
            ids = identifiers_of(found.resource)
    elif ref.kind == "conditional":
        ids = frozenset(ref.query_identifiers or ())
    elif ref.identifier is not None and ref.kind != "container":
        ids = frozenset({ref.identifier})
    return Client(None, ids) if ids else None
