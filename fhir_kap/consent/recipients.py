"""Who a disclosure goes to, and which consent actors name that party.

A recipient matches an actor by literal reference, NPI or organisation identifier. A grant
to an Organization covers a Practitioner only through an *active* PractitionerRole linking
them (and within the role's period when it has one); a grant to a Practitioner never
covers her Organization. A party's identity is its own resource's identifiers only (never
joined across resources); an identifier names a party only when the types agree, and an
absolute reference matches only the same absolute reference (never a relative `Type/id`).
An actor named by a contained resource is named by that resource's identifiers (`parties.py`
reads the Consent's references).

Room: consent/ (layer 1, pure core: no IO, no clock): may import the base rooms only.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any

from ..errors import InputError
from .periods import Period, PeriodError, parse_period

__all__ = [
    "Recipient",
    "ActorRef",
    "Party",
    "Identity",
    "Directory",
    "normalise_reference",
    "reference_type",
    "actor_ref",
]

_REF = re.compile(
    r"^(?:(?P<base>[a-zA-Z][a-zA-Z0-9+.\-]*://[^\s]+?)/)?(?P<type>[A-Z][A-Za-z]{1,63})/"
    r"(?P<id>[A-Za-z0-9\-.]{1,64})(?:/_history/[^/]+)?$"
)


def normalise_reference(value: Any) -> str | None:
    """A literal reference without its version suffix: relative `Type/id` stays relative, an
    absolute URL keeps its base (an absolute reference never equals a relative one — the
    adapter has no base URL of its own configured, so another server's `Practitioner/x` is
    another party).

    >>> normalise_reference("Practitioner/abc/_history/2")
    'Practitioner/abc'
    >>> normalise_reference("https://ehr.example/fhir/Practitioner/abc/_history/2")
    'https://ehr.example/fhir/Practitioner/abc'
    """
    if not isinstance(value, str) or len(value) > 2048:
        return None
    m = _REF.match(value.strip())
    if not m:
        return None
    local = f"{m.group('type')}/{m.group('id')}"
    return f"{m.group('base')}/{local}" if m.group("base") else local


def reference_type(reference: str | None) -> str | None:
    """The resource type of a normalised literal reference ('Practitioner/x' -> 'Practitioner')."""
    if not reference:
        return None
    parts = reference.rsplit("/", 2)
    return parts[-2] if len(parts) >= 2 else None


@dataclass(frozen=True)
class Recipient:
    """The party a disclosure goes to: a literal reference and/or identifiers (system, value)."""

    reference: str | None = None
    identifiers: tuple[tuple[str, str], ...] = ()

    @classmethod
    def parse(cls, text: str) -> Recipient:
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
        raise InputError(
            "recipient must be a reference 'Type/id' or an identifier 'system|value'",
            rule="consent:recipient",
            code="value",
        )

    def __str__(self) -> str:
        if self.reference:
            return self.reference
        return ",".join(f"{s}|{v}" for s, v in self.identifiers)


@dataclass(frozen=True)
class ActorRef:
    """A party named in a consent: reference and/or one identifier, and its type when known.
    `identifiers`: every identifier of a contained party (the Consent's own contained resource)."""

    reference: str | None = None
    identifier: tuple[str, str] | None = None
    type: str | None = None
    identifiers: frozenset[tuple[str, str]] = frozenset()

    @property
    def named_by(self) -> frozenset[tuple[str, str]]:
        """Every identifier that names this party."""
        return (self.identifiers | {self.identifier}) if self.identifier else self.identifiers


def actor_ref(ref: Any) -> ActorRef | None:
    """ActorRef from a FHIR Reference dict; None when it names nobody usable."""
    if not isinstance(ref, dict):
        return None
    literal = normalise_reference(ref.get("reference"))
    ident = _identifier(ref.get("identifier"))
    if literal is None and ident is None:
        return None
    rtype = reference_type(literal) or (ref["type"] if isinstance(ref.get("type"), str) else None)
    return ActorRef(literal, ident, rtype)


def _identifier(value: Any) -> tuple[str, str] | None:
    if (
        isinstance(value, dict)
        and isinstance(value.get("system"), str)
        and isinstance(value.get("value"), str)
    ):
        return (value["system"], value["value"])
    return None


def _identifiers(resource: dict[str, Any]) -> frozenset[tuple[str, str]]:
    raw = resource.get("identifier")
    return frozenset(i for i in (_identifier(x) for x in raw) if i) if isinstance(raw, list) else frozenset()


@dataclass(frozen=True)
class Party:
    """One party the recipient is or acts for: its literal reference, type and identifiers."""

    reference: str | None
    type: str | None
    identifiers: frozenset[tuple[str, str]]

    def matches(self, actor: ActorRef) -> bool:
        """Same literal reference; or a shared identifier when the types and references do not disagree."""
        if actor.reference is not None and actor.reference == self.reference:
            return True
        if not actor.named_by & self.identifiers:
            return False
        if actor.type and self.type and actor.type != self.type:
            return False  # an Organization's identifier never names a Practitioner, and vice versa
        return not (
            actor.reference and self.reference
        )  # two literal references that differ: not the same party


@dataclass(frozen=True)
class Identity:
    """Everything that names the recipient: the recipient itself and the organisations and roles
    it acts for through an active PractitionerRole."""

    parties: tuple[Party, ...]

    def matches(self, actor: ActorRef) -> bool:
        return any(p.matches(actor) for p in self.parties)


@dataclass(frozen=True)
class _Role:
    ref: str | None
    active: bool
    period: Period | None
    practitioner: ActorRef | None
    organization: ActorRef | None


_PARTY_TYPES = ("Practitioner", "Organization", "PractitionerRole")


class Directory:
    """Practitioners, Organizations and PractitionerRoles from the decision context.

    A party's identity comes only from its own resource; identifiers are never joined across
    resources (no reverse index), except to resolve a recipient given *only* by identifier to
    the single resource carrying it.
    """

    def __init__(self, resources: Iterable[dict[str, Any]]) -> None:
        self._ids: dict[str, frozenset[tuple[str, str]]] = {}
        self._roles: list[_Role] = []
        for res in resources:
            rtype, rid = res.get("resourceType"), res.get("id")
            ref = f"{rtype}/{rid}" if isinstance(rid, str) and rid else None
            if rtype in _PARTY_TYPES and ref:
                self._ids[ref] = self._ids.get(ref, frozenset()) | _identifiers(res)
            if rtype == "PractitionerRole":
                try:
                    period = parse_period(res.get("period"))
                except PeriodError:
                    period = None
                    active = False  # an unreadable period never widens a grant
                else:
                    active = res.get("active") is True
                self._roles.append(
                    _Role(
                        ref,
                        active,
                        period,
                        _typed(actor_ref(res.get("practitioner")), "Practitioner"),
                        _typed(actor_ref(res.get("organization")), "Organization"),
                    )
                )

    def _holder(self, idents: frozenset[tuple[str, str]], rtype: str | None) -> str | None:
        """The one known party (of `rtype`, when given) carrying one of `idents`; None if none or several."""
        holders = [
            ref
            for ref, ids in self._ids.items()
            if idents & ids and (rtype is None or reference_type(ref) == rtype)
        ]
        return holders[0] if len(holders) == 1 else None

    def _party(
        self, reference: str | None, rtype: str | None, idents: Iterable[tuple[str, str]] = ()
    ) -> Party:
        wanted = frozenset(idents)
        if (
            reference is None and wanted
        ):  # named by identifier only: resolve to the single resource carrying it
            reference = self._holder(wanted, rtype)
        own = self._ids.get(reference, frozenset()) if reference else frozenset()
        return Party(reference, rtype or reference_type(reference), own | wanted)

    def _resolve(self, recipient: Recipient) -> Party:
        return self._party(recipient.reference, None, recipient.identifiers)

    def identity(self, recipient: Recipient, on: date | datetime) -> Identity:
        """The recipient's identity on a date, including organisations reached via active roles."""
        me = self._resolve(recipient)
        parties: list[Party] = [me]
        for role in self._roles:
            if not role.active or (role.period is not None and not role.period.contains(on)):
                continue
            is_role = role.ref is not None and role.ref == me.reference
            is_practitioner = (
                role.practitioner is not None
                and me.type in (None, "Practitioner")
                and me.matches(role.practitioner)
            )
            if not (is_role or is_practitioner):
                continue
            if role.organization:
                parties.append(
                    self._party(
                        role.organization.reference,
                        "Organization",
                        [role.organization.identifier] if role.organization.identifier else [],
                    )
                )
            if is_role and role.practitioner:
                parties.append(
                    self._party(
                        role.practitioner.reference,
                        "Practitioner",
                        [role.practitioner.identifier] if role.practitioner.identifier else [],
                    )
                )
            if role.ref and not is_role:
                parties.append(self._party(role.ref, "PractitionerRole"))
        return Identity(tuple(dict.fromkeys(parties)))


def _typed(ref: ActorRef | None, rtype: str) -> ActorRef | None:
    return None if ref is None else ActorRef(ref.reference, ref.identifier, ref.type or rtype)
