"""Who a disclosure goes to, and which consent actors name that party.

A recipient matches an actor by literal reference, NPI or organisation identifier. A grant
to an Organization covers a Practitioner only through an *active* PractitionerRole linking
them (and within the role's period when it has one); a grant to a Practitioner never
covers her Organization.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any, Iterable

from ..errors import InputError
from .periods import Period, PeriodError, parse_period

__all__ = ["Recipient", "ActorRef", "Identity", "Directory", "normalise_reference", "actor_ref"]

_REF = re.compile(r"(?:^|/)([A-Z][A-Za-z]{1,63})/([A-Za-z0-9\-.]{1,64})(?:/_history/[^/]+)?$")


def normalise_reference(value: Any) -> str | None:
    """'Type/id' from a relative or absolute literal reference (a version suffix dropped).

    >>> normalise_reference("https://ehr.example/fhir/Practitioner/abc/_history/2")
    'Practitioner/abc'
    """
    if not isinstance(value, str) or len(value) > 2048:
        return None
    m = _REF.search(value.strip())
    return f"{m.group(1)}/{m.group(2)}" if m else None


@dataclass(frozen=True)
class Recipient:
    """The party a disclosure goes to: a literal reference and/or identifiers (system, value)."""

    reference: str | None = None
    identifiers: tuple[tuple[str, str], ...] = ()

    @classmethod
    def parse(cls, text: str) -> "Recipient":
        """`Practitioner/abc` (or an absolute URL) or an identifier `system|value`.

        >>> Recipient.parse("http://hl7.org/fhir/sid/us-npi|1234567893").identifiers
        (('http://hl7.org/fhir/sid/us-npi', '1234567893'),)
        """
        text = (text or "").strip() if isinstance(text, str) else ""
        if "|" in text:
            system, _, value = text.partition("|")
            if system and value and "|" not in value:
                return cls(identifiers=((system, value),))
        else:
            ref = normalise_reference(text)
            if ref:
                return cls(reference=ref)
        raise InputError("recipient must be a reference 'Type/id' or an identifier 'system|value'",
                         rule="consent:recipient", code="value")

    def __str__(self) -> str:
        if self.reference:
            return self.reference
        return ",".join(f"{s}|{v}" for s, v in self.identifiers)


@dataclass(frozen=True)
class ActorRef:
    """A party named in a consent: reference and/or one identifier."""

    reference: str | None = None
    identifier: tuple[str, str] | None = None


def actor_ref(ref: Any) -> ActorRef | None:
    """ActorRef from a FHIR Reference dict; None when it names nobody usable."""
    if not isinstance(ref, dict):
        return None
    literal = normalise_reference(ref.get("reference"))
    ident = _identifier(ref.get("identifier"))
    if literal is None and ident is None:
        return None
    return ActorRef(literal, ident)


def _identifier(value: Any) -> tuple[str, str] | None:
    if isinstance(value, dict) and isinstance(value.get("system"), str) and isinstance(value.get("value"), str):
        return (value["system"], value["value"])
    return None


def _identifiers(resource: dict[str, Any]) -> set[tuple[str, str]]:
    raw = resource.get("identifier")
    return {i for i in (_identifier(x) for x in raw) if i} if isinstance(raw, list) else set()


@dataclass(frozen=True)
class Identity:
    """Everything that names the recipient: its own references/identifiers, and those of
    organisations and roles it acts for through an active PractitionerRole."""

    references: frozenset[str]
    identifiers: frozenset[tuple[str, str]]

    def matches(self, actor: ActorRef) -> bool:
        return (actor.reference is not None and actor.reference in self.references) or (
            actor.identifier is not None and actor.identifier in self.identifiers)


@dataclass(frozen=True)
class _Role:
    ref: str | None
    active: bool
    period: Period | None
    practitioner: ActorRef | None
    organization: ActorRef | None


class Directory:
    """Practitioners, Organizations and PractitionerRoles from the decision context."""

    def __init__(self, resources: Iterable[dict[str, Any]]) -> None:
        self._ids: dict[str, set[tuple[str, str]]] = {}
        self._by_ident: dict[tuple[str, str], set[str]] = {}
        self._roles: list[_Role] = []
        for res in resources:
            rtype, rid = res.get("resourceType"), res.get("id")
            ref = f"{rtype}/{rid}" if isinstance(rid, str) and rid else None
            if rtype in ("Practitioner", "Organization", "PractitionerRole") and ref:
                idents = _identifiers(res)
                self._ids.setdefault(ref, set()).update(idents)
                for ident in idents:
                    self._by_ident.setdefault(ident, set()).add(ref)
            if rtype == "PractitionerRole":
                try:
                    period = parse_period(res.get("period"))
                except PeriodError:
                    period = None
                    active = False  # an unreadable period never widens a grant
                else:
                    active = res.get("active") is True
                self._roles.append(_Role(ref, active, period,
                                         actor_ref(res.get("practitioner")), actor_ref(res.get("organization"))))

    def _expand(self, refs: set[str], idents: set[tuple[str, str]]) -> None:
        for ident in list(idents):
            refs.update(self._by_ident.get(ident, ()))
        for ref in list(refs):
            idents.update(self._ids.get(ref, ()))

    def identity(self, recipient: Recipient, on: date | datetime) -> Identity:
        """The recipient's identity on a date, including organisations reached via active roles."""
        refs: set[str] = {recipient.reference} if recipient.reference else set()
        idents: set[tuple[str, str]] = set(recipient.identifiers)
        self._expand(refs, idents)
        own = Identity(frozenset(refs), frozenset(idents))
        for role in self._roles:
            if not role.active or (role.period is not None and not role.period.contains(on)):
                continue
            if (role.ref and role.ref in own.references) or (role.practitioner and own.matches(role.practitioner)):
                for party in (role.organization, role.practitioner):
                    if party:
                        refs.update([party.reference] if party.reference else [])
                        idents.update([party.identifier] if party.identifier else [])
                if role.ref:
                    refs.add(role.ref)
        self._expand(refs, idents)
        return Identity(frozenset(refs), frozenset(idents))
