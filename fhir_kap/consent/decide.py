"""The disclosure decision: deny by default, permit only when every rule holds.

A disclosure (resource, recipient, purpose, date) is permitted only if, for every
information category of the resource, an active current Consent version for the client,
within its period, names the recipient and permits that category and purpose, and no
applicable deny provision (nested, or in any other consent) excludes it — and the content
is not a psychotherapy note. Policies are compiled once, when the gate is built.

Room: consent/ (layer 1, pure core: no IO, no clock): may import the base rooms only.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any

from ..errors import InputError
from ..fhir.digits import ascii_digits
from .categories import categories_of
from .parties import Client, Parties
from .policy import ACTIVE, DISCLOSE, DISCLOSE_KEY, Policy, Rule, compile_consent, normalise_purpose
from .recipients import Directory, Identity, Recipient

#: What the gate decides on (the consent context), as opposed to the clinical resources it
#: decides about: one list for the gate, the outbox's context store and the bridge.
CONTEXT_TYPES = ("Consent", "Practitioner", "PractitionerRole", "Organization", "Patient")

__all__ = ["Reason", "Decision", "ConsentGate", "OBLIGATIONS", "DISCLOSE"]

# What the sender must do with a permitted resource (see labels.py and audit.py).
OBLIGATIONS = ("label-confidentiality-R", "label-sensitivity-PSY", "record-provenance", "no-redisclosure")
_MAX_BUNDLE_DEPTH = 8
_REVOKED = frozenset({"inactive", "rejected", "not-done"})


@dataclass(frozen=True)
class Reason:
    """Why a decision came out as it did: a code, a sentence with ids and codes only, and where."""

    code: str
    message: str
    consent: str | None = None
    provision: str | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.consent:
            out["consent"] = self.consent
        if self.provision:
            out["provision"] = self.provision
        return out


@dataclass(frozen=True)
class Decision:
    """Permit or deny, with reasons, the deciding Consent version and the sender's obligations."""

    permit: bool
    reasons: tuple[Reason, ...]
    consent: str | None
    obligations: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "decision": "permit" if self.permit else "deny",
            "reasons": [r.to_json() for r in self.reasons],
            "consent": self.consent,
            "obligations": list(self.obligations),
        }

    @property
    def codes(self) -> tuple[str, ...]:
        return tuple(r.code for r in self.reasons)


def _deny(*reasons: Reason, consent: str | None = None) -> Decision:
    return Decision(False, tuple(dict.fromkeys(reasons)), consent, ())


def _flatten(context: Iterable[Any]) -> Iterator[dict[str, Any]]:
    stack: list[tuple[Any, int]] = [(r, 0) for r in reversed(list(context))]
    while stack:
        res, depth = stack.pop()
        if not isinstance(res, dict):
            raise InputError("context items must be FHIR resources (JSON objects)", rule="consent:context")
        if res.get("resourceType") == "Bundle":
            if depth >= _MAX_BUNDLE_DEPTH:
                raise InputError("Bundles nested too deeply in the context", rule="consent:context")
            entries = res.get("entry") or []
            if not isinstance(entries, list):
                raise InputError(
                    "Bundle.entry must be a list",
                    rule="consent:context",
                    expression="Bundle.entry",
                    pointer="/entry",
                )
            stack += [
                (e.get("resource"), depth + 1)
                for e in reversed(entries)
                if isinstance(e, dict) and e.get("resource") is not None
            ]
        else:
            yield res


@dataclass(frozen=True)
class _Verdict:
    kind: str  # "permit" | "deny" | "n/a"
    reason: Reason


class ConsentGate:
    """Consent decisions over one context (Consents, PractitionerRoles, Organizations, ...).

    >>> gate = ConsentGate([])
    >>> gate.decide({"resourceType": "Procedure", "subject": {"reference": "Patient/p"},
    ...     "meta": {"tag": [{"system": "http://fhir-kap.example/CodeSystem/kap-information-category",
    ...     "code": "session-dates"}]}}, Recipient.parse("Practitioner/t"), "TREAT",
    ...     date(2024, 3, 1)).to_json()["reasons"][0]["code"]
    'no-consent'
    """

    def __init__(self, context: Iterable[dict[str, Any]]) -> None:
        resources = list(_flatten(context))
        self._directory = Directory(resources)
        self._parties = Parties(resources)
        compiled = [
            compile_consent(r, self._parties) for r in resources if r.get("resourceType") == "Consent"
        ]
        self.policies: tuple[Policy, ...] = tuple(self._current(compiled))
        self.clinical: tuple[dict[str, Any], ...] = tuple(
            r for r in resources if r.get("resourceType") not in CONTEXT_TYPES
        )
        # Which policies may cover a client: by the literal reference and by each identifier a
        # consent names its client by; a malformed consent naming nobody readable covers everyone.
        self._everyone: list[int] = []
        self._by_reference: dict[str, list[int]] = {}
        self._by_identifier: dict[tuple[str, str], list[int]] = {}
        for i, p in enumerate(self.policies):
            client = p.client
            if client is None:
                if p.problem:
                    self._everyone.append(i)
                continue
            if client.reference is not None:
                self._by_reference.setdefault(client.reference, []).append(i)
            for ident in client.identifiers:
                self._by_identifier.setdefault(ident, []).append(i)

    @staticmethod
    def _current(compiled: list[Policy]) -> Iterator[Policy]:
        """One policy per consent id: the highest meta.versionId (conflicting copies → malformed).

        Fail closed: when copies of one consent cannot be strictly ordered (a missing or
        non-numeric meta.versionId) and any copy is a revocation (inactive / rejected /
        not-done), nobody can tell whether the revocation is current, so the consent denies.
        """
        groups: dict[str, list[Policy]] = {}
        for i, p in enumerate(compiled):
            groups.setdefault(p.id or f"\x00anonymous-{i}", []).append(p)
        for versions in groups.values():

            def key(p: Policy) -> tuple[int, int, str]:
                v = p.version or ""
                return (1, int(v), "") if ascii_digits(v) else (0, 0, v)

            unordered = len(versions) > 1 and any(not ascii_digits(p.version or "") for p in versions)
            if unordered and any(p.status in _REVOKED for p in versions):
                first = versions[0]
                yield Policy(
                    first.id,
                    None,
                    first.release,
                    first.status,
                    first.patient,
                    patient_identifiers=first.patient_identifiers,
                    problem=(
                        "copies of this Consent without a numeric meta.versionId include a "
                        "revocation, so which copy is current cannot be told",
                        "Consent.meta.versionId",
                    ),
                )
                continue
            best = max(versions, key=key)
            same = [p for p in versions if key(p) == key(best)]
            if len(same) > 1 and any(p != best for p in same):
                yield Policy(
                    best.id,
                    best.version,
                    best.release,
                    best.status,
                    best.patient,
                    patient_identifiers=best.patient_identifiers,
                    problem=(
                        "several different copies of the same Consent version",
                        "Consent.meta.versionId",
                    ),
                )
            else:
                yield best

    def _patient_of(self, resource: dict[str, Any]) -> Client | None:
        """The disclosed resource's client (literal, logical or contained, resolved in the context)."""
        return self._parties.client_of(resource)

    def _covering(self, client: Client | None) -> list[Policy]:
        """The policies that may decide for `client`, in context order: those naming the same
        client (same literal reference, or an identifier the client carries) and the malformed
        consents that name nobody readable."""
        found: set[int] = set()
        if client is not None:
            if client.reference is not None:
                found.update(self._by_reference.get(client.reference, ()))
            for ident in client.identifiers:
                found.update(self._by_identifier.get(ident, ()))
        return [self.policies[i] for i in self._everyone] + [self.policies[i] for i in sorted(found)]

    def purposes(self) -> tuple[str, ...]:
        """Every purpose some compiled consent mentions (normalised system|code), sorted."""
        return tuple(sorted({p for pol in self.policies for p in pol.purposes_seen}))

    def decide(
        self, resource: dict[str, Any], recipient: Recipient, purpose: str, on: date | datetime
    ) -> Decision:
        """Permit or deny disclosing `resource` to `recipient` for `purpose` on `on` (deny by default)."""
        if not isinstance(resource, dict) or not isinstance(resource.get("resourceType"), str):
            raise InputError(
                "the resource to disclose must be a FHIR resource with a resourceType",
                rule="consent:resource",
                pointer="/resourceType",
                expression="resourceType",
            )
        if not isinstance(recipient, Recipient) or not (recipient.reference or recipient.identifiers):
            raise InputError("a recipient is required", rule="consent:recipient")
        if not isinstance(purpose, str) or not purpose.strip() or purpose.strip().endswith("|"):
            raise InputError("a purpose of use (v3-ActReason code) is required", rule="consent:purpose")
        if isinstance(on, datetime) and on.tzinfo is None:
            raise InputError("the disclosure time needs a timezone", rule="consent:date")
        if not isinstance(on, date):
            raise InputError("the disclosure date must be a date or datetime", rule="consent:date")
        target = _target(resource)
        cats = categories_of(resource)
        if cats.psychotherapy:
            return _deny(
                Reason(
                    "psychotherapy-note",
                    f"{target} is or contains a psychotherapy note (code psychotherapy-note or label "
                    "PSYTHPN, in any system); it is never disclosed, whatever any consent says",
                )
            )
        if cats.contained:
            return _deny(
                Reason(
                    "contained-resource",
                    f"{target} carries contained resources; a KAP disclosure never does, and what they "
                    "hold is not covered by the resource's own categories",
                )
            )
        if not cats.mapped:
            return _deny(
                Reason(
                    "unknown-category",
                    f"{target}: resource type {resource['resourceType']} has no information-category mapping",
                )
            )
        if cats.unknown:
            return _deny(
                Reason(
                    "unknown-category",
                    f"{target} carries an information category code this gate does not know",
                )
            )
        if not cats.codes:
            return _deny(Reason("unknown-category", f"{target} carries no information category"))
        candidates = self._covering(self._patient_of(resource))
        if not candidates:
            return _deny(Reason("no-consent", f"no Consent covers the client of {target}"))
        ident = self._directory.identity(recipient, on)
        purpose_key = normalise_purpose(purpose)
        permits: list[Reason] = []
        for cat in sorted(cats.codes):
            verdicts = [_evaluate(p, ident, purpose_key, cat, on) for p in candidates]
            denies = [v.reason for v in verdicts if v.kind == "deny"]
            if denies:
                return _deny(*denies, consent=denies[0].consent)
            granted = [v.reason for v in verdicts if v.kind == "permit"]
            if not granted:
                return _deny(*(v.reason for v in verdicts))
            permits.append(granted[0])
        return Decision(True, tuple(dict.fromkeys(permits)), permits[0].consent, OBLIGATIONS)


def _target(resource: dict[str, Any]) -> str:
    rid = resource.get("id")
    rid = rid if isinstance(rid, str) and len(rid) <= 64 else "?"
    return f"{resource.get('resourceType')}/{rid}"


def _short(code: str) -> str:
    return code.rpartition("|")[2]


def _failure(rule: Rule, ident: Identity, purpose: str, cat: str, on: date | datetime) -> str | None:
    """The first of this provision's own criteria that the request fails, or None if it matches."""
    if rule.period is not None and not rule.period.contains(on):
        return "outside-period"
    if rule.actions is not None and DISCLOSE_KEY not in rule.actions:
        return "action-not-permitted"
    if rule.recipients is not None and not any(ident.matches(a) for a in rule.recipients):
        return "recipient-not-named"
    if rule.purposes is not None and purpose not in rule.purposes:
        return "purpose-not-permitted"
    if rule.categories is not None and cat not in rule.categories:
        return "category-not-permitted"
    return None


_FAIL_TEXT = {
    "outside-period": "the disclosure date is outside the period of {prov}",
    "action-not-permitted": "{prov} does not cover the action 'disclose'",
    "recipient-not-named": "{prov} does not name this recipient (as an IRCP actor, directly or via an active PractitionerRole)",
    "purpose-not-permitted": "{prov} does not permit purpose {purpose}",
    "category-not-permitted": "{prov} does not permit information category {cat}",
}


@dataclass(frozen=True)
class _Match:
    rule: Rule
    named: bool
    has_purpose: bool
    has_category: bool


def _deepest(
    rule: Rule,
    ident: Identity,
    purpose: str,
    cat: str,
    on: date | datetime,
    named: bool,
    has_purpose: bool,
    has_cat: bool,
) -> list[_Match]:
    named = named or rule.recipients is not None
    has_purpose = has_purpose or rule.purposes is not None
    has_cat = has_cat or rule.categories is not None
    found: list[_Match] = []
    for child in rule.children:
        if _failure(child, ident, purpose, cat, on) is None:
            found += _deepest(child, ident, purpose, cat, on, named, has_purpose, has_cat)
    return found or [_Match(rule, named, has_purpose, has_cat)]


def _evaluate(policy: Policy, ident: Identity, purpose: str, cat: str, on: date | datetime) -> _Verdict:
    ref = policy.ref
    if policy.problem:
        message, path = policy.problem
        return _Verdict(
            "deny",
            Reason(
                "malformed-consent",
                f"{ref or 'a Consent without id'} cannot be read ({message}); it denies every disclosure it might cover",
                ref,
                path,
            ),
        )
    if policy.status != ACTIVE:
        return _Verdict("n/a", Reason("not-active", f"{ref} has status {policy.status}", ref))
    if policy.period is not None and not policy.period.contains(on):
        return _Verdict(
            "n/a",
            Reason(
                "outside-period",
                f"the disclosure date is outside Consent.period of {ref}",
                ref,
                "Consent.period",
            ),
        )
    grantee_ok = policy.grantees is None or any(ident.matches(g) for g in policy.grantees)
    if policy.blanket_deny:
        if not grantee_ok:
            return _Verdict(
                "n/a",
                Reason(
                    "recipient-not-named",
                    f"{ref} denies only its grantees; this recipient is not one of them",
                    ref,
                    "Consent.grantee",
                ),
            )
        what = (
            "decision deny without any provision"
            if policy.blanket_deny == "Consent.decision"
            else "an opt-out policyRule without any provision"
        )
        return _Verdict(
            "deny",
            Reason(
                "blanket-deny",
                f"{ref} has {what}: it denies every disclosure it covers",
                ref,
                policy.blanket_deny,
            ),
        )
    if not policy.rules:
        return _Verdict(
            "n/a",
            Reason(
                "no-provision",
                f"{ref} has no provision; a policy rule without a provision grants nothing",
                ref,
            ),
        )
    matches: list[_Match] = []
    first_failure: tuple[str, Rule] | None = None
    for rule in policy.rules:
        why = _failure(rule, ident, purpose, cat, on)
        if why is None:
            matches += _deepest(rule, ident, purpose, cat, on, False, False, False)
        elif first_failure is None:
            first_failure = (why, rule)
    denies = [m for m in matches if m.rule.kind == "deny"]
    if denies:
        rule = denies[0].rule
        code = "nested-deny" if rule.depth > 0 else "deny-provision"
        return _Verdict(
            "deny",
            Reason(
                code,
                f"{rule.path} of {ref} denies category {cat} for purpose {_short(purpose)}",
                ref,
                rule.path,
            ),
        )
    fill = {"purpose": _short(purpose), "cat": cat}
    for m in matches:
        missing = (
            "recipient-not-named"
            if not (grantee_ok and (m.named or policy.grantees))
            else "purpose-not-permitted"
            if not m.has_purpose
            else "category-not-permitted"
            if not m.has_category
            else None
        )
        if missing is None:
            return _Verdict(
                "permit",
                Reason(
                    "permit",
                    f"{m.rule.path} of {ref} permits category {cat} for purpose {_short(purpose)}",
                    ref,
                    m.rule.path,
                ),
            )
        first_failure = first_failure or (missing, m.rule)
    if first_failure is None:  # pragma: no cover - every rule either matches or fails
        return _Verdict("n/a", Reason("recipient-not-named", f"{ref} grants nothing here", ref))
    why, rule = first_failure
    prov = f"{rule.path} of {ref}"
    text = _FAIL_TEXT[why].format(prov=prov, **fill)
    return _Verdict("n/a", Reason(why, text, ref, rule.path))
