"""R4 and R5 Consents compiled into one internal policy tree (frozen dataclasses).

R4: one `provision` with its own `type`; nested provisions carry theirs. R5 (as the spec
reads): `decision` is the base rule, each top-level `provision` is an exception to it (so it
takes the opposite rule) and each nested level negates its parent; `Consent.period` bounds the
whole consent and `grantee` names the recipients. A KAP grant in R5 is therefore
`decision: deny` + a provision listing what is permitted + nested provisions for exclusions.

A consent without any provision that says "deny" — R5 `decision: deny`, or an R4 `policyRule`
OPTOUT / OPTOUTE — is a blanket deny of everything it covers (`Policy.blanket_deny`). Codes
only count with their system: an actor is a recipient only with role v3-ParticipationType
`IRCP`, and an action is `disclose` only in the consentaction system. Anything that cannot be
read with certainty compiles to a *malformed* policy, which can only deny.

Room: consent/ (layer 1, pure core: no IO, no clock): may import the base rooms only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..config import CS, Release
from ..fhir.release import release_signals
from .categories import KNOWN_CATEGORIES
from .parties import Client, Parties, Unreadable
from .periods import Period, PeriodError, parse_period
from .recipients import ActorRef

__all__ = [
    "Rule",
    "Policy",
    "compile_consent",
    "detect_release",
    "normalise_purpose",
    "MAX_DEPTH",
    "ACTIVE",
    "KNOWN_STATUS",
    "DISCLOSE_KEY",
    "OPT_OUT",
]

MAX_DEPTH = 32
MAX_NODES = 2000
RECIPIENT_ROLE = "IRCP"
DISCLOSE = "disclose"
DISCLOSE_KEY = f"{CS.CONSENT_ACTION}|{DISCLOSE}"  # how `Rule.actions` holds the disclose action
OPT_OUT = frozenset({"OPTOUT", "OPTOUTE"})
KNOWN_STATUS = {
    Release.R4: frozenset({"draft", "proposed", "active", "rejected", "inactive", "entered-in-error"}),
    Release.R5: frozenset({"draft", "active", "inactive", "not-done", "entered-in-error"}),
}
ACTIVE = "active"


def normalise_purpose(value: str) -> str:
    """'TREAT' → '<v3-ActReason>|TREAT'; 'system|code' kept."""
    value = value.strip()
    return value if "|" in value else f"{CS.V3_ACTREASON}|{value}"


@dataclass(frozen=True)
class Rule:
    """One provision: its rule and the criteria it is restricted to (None = unrestricted)."""

    kind: str  # "permit" | "deny"
    path: str  # FHIRPath of the provision, e.g. "Consent.provision.provision[0]"
    period: Period | None = None
    recipients: tuple[ActorRef, ...] | None = None  # IRCP actors; None = names no recipient
    actions: frozenset[str] | None = None  # "system|code" (system empty when the coding has none)
    purposes: frozenset[str] | None = None
    categories: frozenset[str] | None = None
    children: tuple[Rule, ...] = ()
    depth: int = 0


@dataclass(frozen=True)
class Policy:
    """A compiled Consent version. `problem` set ⇒ malformed (denies everything it might cover)."""

    id: str | None
    version: str | None
    release: Release | None
    status: str | None
    patient: str | None  # the client's literal reference (normalised), when the consent names one
    period: Period | None = None
    grantees: tuple[ActorRef, ...] | None = None
    rules: tuple[Rule, ...] = ()
    problem: tuple[str, str] | None = None  # (message, FHIRPath)
    blanket_deny: str | None = None  # FHIRPath of what makes a provision-less consent deny everything
    purposes_seen: frozenset[str] = field(default=frozenset())
    #: the identifiers the consent names its client by (logical or contained Patient)
    patient_identifiers: frozenset[tuple[str, str]] = field(default=frozenset())

    @property
    def client(self) -> Client | None:
        """Who this consent is about; None when nothing readable names the client."""
        if self.patient is None and not self.patient_identifiers:
            return None
        return Client(self.patient, self.patient_identifiers)

    @property
    def ref(self) -> str | None:
        """'Consent/id/_history/v' (or 'Consent/id' when unversioned)."""
        if not self.id:
            return None
        return f"Consent/{self.id}/_history/{self.version}" if self.version else f"Consent/{self.id}"


class _Bad(Exception):
    def __init__(self, message: str, path: str) -> None:
        super().__init__(message)
        self.message, self.path = message, path


def detect_release(consent: dict[str, Any]) -> Release | None:
    """R4 or R5 from the elements present (`fhirmodel.release_signals`; R4 when none tells);
    None when it mixes both."""
    r4, r5 = release_signals(consent)
    if r4 and r5:
        return None
    return Release.R5 if r5 else Release.R4


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


#: The party elements the gate does not decide on, by release (checked: see `Parties.check`).
_OTHER_PARTIES = {
    Release.R4: ("performer", "organization"),
    Release.R5: ("grantor", "controller", "manager"),
}


def compile_consent(consent: dict[str, Any], parties: Parties | None = None) -> Policy:
    """Compile one Consent dict. Never raises for content problems: returns a malformed Policy.

    `parties`: the consent context's parties, which logical references are resolved against
    (none given: an empty context)."""
    parties = parties if parties is not None else Parties()
    cid = _str(consent.get("id"))
    raw_meta = consent.get("meta")
    meta: dict[str, Any] = raw_meta if isinstance(raw_meta, dict) else {}
    version = _str(meta.get("versionId"))
    release = detect_release(consent)
    patient_field = "subject" if release is Release.R5 else "patient"
    client: Client | None = None
    unreadable_client: Unreadable | None = None
    try:
        client = parties.consent_client(consent, patient_field)
    except Unreadable as exc:
        unreadable_client = exc
    status = _str(consent.get("status"))
    base: dict[str, Any] = {
        "id": cid,
        "version": version,
        "release": release,
        "status": status,
        "patient": client.reference if client else None,
        "patient_identifiers": client.identifiers if client else frozenset(),
    }
    try:
        if release is None:
            raise _Bad("Consent mixes R4 and R5 elements", "Consent")
        if cid is None:
            raise _Bad("Consent has no id, so a disclosure could not cite it", "Consent.id")
        if status not in KNOWN_STATUS[release]:
            raise _Bad(
                f"Consent status is not a {release.short.upper()} consent-state code", "Consent.status"
            )
        if unreadable_client is not None:
            raise _Bad(unreadable_client.message, unreadable_client.path)
        for name in _OTHER_PARTIES[release]:
            raw_parties = consent.get(name)
            for i, value in enumerate(raw_parties if isinstance(raw_parties, list) else []):
                parties.check(value, consent, f"Consent.{name}[{i}]")
        purposes: set[str] = set()
        if release is Release.R4:
            raw = consent.get("provision")
            rules: tuple[Rule, ...] = (
                ()
                if raw is None
                else (_rule(raw, None, "Consent.provision", 0, purposes, [0], _Reader(consent, parties)),)
            )
            blanket = "Consent.policyRule" if not rules and _opt_out(consent.get("policyRule")) else None
            return Policy(
                **base,
                rules=rules,
                blanket_deny=blanket,  # type: ignore[arg-type]
                purposes_seen=frozenset(purposes),
            )
        decision = consent.get("decision")
        if decision not in ("permit", "deny"):
            raise _Bad("R5 Consent.decision must be permit or deny (it is the base rule)", "Consent.decision")
        period = _period(consent.get("period"), "Consent.period")
        grantees = None
        if "grantee" in consent:
            raw_g = consent.get("grantee")
            if not isinstance(raw_g, list):
                raise _Bad("Consent.grantee must be a list of references", "Consent.grantee")
            grantees = tuple(
                parties.recipient(x, consent, f"Consent.grantee[{i}]") for i, x in enumerate(raw_g)
            )
        raw = consent.get("provision")
        if raw is None:
            raw = []
        if not isinstance(raw, list):
            raise _Bad("R5 Consent.provision must be a list", "Consent.provision")
        counter = [0]
        exception = "deny" if decision == "permit" else "permit"  # top-level provisions negate the base rule
        reader = _Reader(consent, parties)
        rules = tuple(
            _rule(p, exception, f"Consent.provision[{i}]", 0, purposes, counter, reader)
            for i, p in enumerate(raw)
        )
        blanket = "Consent.decision" if not rules and decision == "deny" else None
        return Policy(
            **base,
            period=period,
            grantees=grantees,
            rules=rules,  # type: ignore[arg-type]
            blanket_deny=blanket,
            purposes_seen=frozenset(purposes),
        )
    except (_Bad, Unreadable) as bad:
        return Policy(**base, problem=(bad.message, bad.path))  # type: ignore[arg-type]


def _opt_out(policy_rule: Any) -> bool:
    """An R4 policyRule coded OPTOUT / OPTOUTE (any system: reading it as a deny is the safe side)."""
    codings = policy_rule.get("coding") if isinstance(policy_rule, dict) else None
    return isinstance(codings, list) and any(
        isinstance(c, dict) and isinstance(c.get("code"), str) and c["code"].strip().upper() in OPT_OUT
        for c in codings
    )


def _period(value: Any, path: str) -> Period | None:
    try:
        return parse_period(value)
    except PeriodError as exc:
        raise _Bad(f"{path} is not a valid period ({exc})", path) from None


def _codes(value: Any, path: str) -> list[tuple[str | None, str]]:
    if not isinstance(value, list):
        raise _Bad(f"{path} must be a list", path)
    out = []
    for i, cc in enumerate(value):
        codings = cc.get("coding") if isinstance(cc, dict) else None
        if not isinstance(codings, list) or not codings:
            raise _Bad(f"{path}[{i}] has no coding", f"{path}[{i}]")
        for c in codings:
            if not isinstance(c, dict) or not _str(c.get("code")):
                raise _Bad(f"{path}[{i}] has a coding without a code", f"{path}[{i}]")
            out.append((c.get("system") if isinstance(c.get("system"), str) else None, c["code"]))
    return out


@dataclass(frozen=True)
class _Reader:
    """The Consent being compiled and the parties its references resolve against."""

    consent: dict[str, Any]
    parties: Parties


def _rule(
    raw: Any,
    r5_kind: str | None,
    path: str,
    depth: int,
    purposes: set[str],
    counter: list[int],
    reader: _Reader,
) -> Rule:
    if depth >= MAX_DEPTH:
        raise _Bad(f"provisions nested deeper than {MAX_DEPTH} levels", path)
    counter[0] += 1
    if counter[0] > MAX_NODES:
        raise _Bad(f"more than {MAX_NODES} provisions", path)
    if not isinstance(raw, dict):
        raise _Bad(f"{path} is not an object", path)
    if r5_kind is None:
        kind = raw.get("type")
        if kind not in ("permit", "deny"):
            raise _Bad(f"{path}.type must be permit or deny", f"{path}.type")
    else:
        if "type" in raw:
            raise _Bad(f"{path}.type is an R4 element in an R5 Consent", f"{path}.type")
        kind = r5_kind
    period = _period(raw.get("period"), f"{path}.period")
    recipients = None
    if "actor" in raw:
        actors = raw["actor"]
        if not isinstance(actors, list):
            raise _Bad(f"{path}.actor must be a list", f"{path}.actor")
        named = []
        for i, a in enumerate(actors):
            if not isinstance(a, dict):
                raise _Bad(f"{path}.actor[{i}] is not an object", f"{path}.actor[{i}]")
            roles = _codes([a["role"]], f"{path}.actor[{i}].role") if isinstance(a.get("role"), dict) else []
            where = f"{path}.actor[{i}].reference"
            if (CS.V3_PARTICIPATION, RECIPIENT_ROLE) in roles:
                named.append(reader.parties.recipient(a.get("reference"), reader.consent, where))
            else:
                reader.parties.check(a.get("reference"), reader.consent, where)
        recipients = tuple(named) if named else None
    actions = (
        frozenset(f"{s or ''}|{c}" for s, c in _codes(raw["action"], f"{path}.action"))
        if "action" in raw
        else None
    )
    purpose_set = None
    if "purpose" in raw:
        if not isinstance(raw["purpose"], list):
            raise _Bad(f"{path}.purpose must be a list of Codings", f"{path}.purpose")
        ps = set()
        for i, c in enumerate(raw["purpose"]):
            if not isinstance(c, dict) or not _str(c.get("code")):
                raise _Bad(f"{path}.purpose[{i}] has no code", f"{path}.purpose[{i}]")
            ps.add(f"{c.get('system') or CS.V3_ACTREASON}|{c['code']}")
        purpose_set = frozenset(ps)
        purposes.update(ps)
    categories = None
    if "code" in raw:
        cats = set()
        for system, code in _codes(raw["code"], f"{path}.code"):
            if system != CS.INFO_CATEGORY or code not in KNOWN_CATEGORIES:
                raise _Bad(f"{path}.code holds a code outside the KAP information categories", f"{path}.code")
            cats.add(code)
        categories = frozenset(cats)
    children_raw = raw.get("provision")
    children: tuple[Rule, ...] = ()
    if children_raw is not None:
        if not isinstance(children_raw, list):
            raise _Bad(f"{path}.provision must be a list", f"{path}.provision")
        child_kind = None if r5_kind is None else ("deny" if kind == "permit" else "permit")
        children = tuple(
            _rule(c, child_kind, f"{path}.provision[{i}]", depth + 1, purposes, counter, reader)
            for i, c in enumerate(children_raw)
        )
    return Rule(kind, path, period, recipients, actions, purpose_set, categories, children, depth)
