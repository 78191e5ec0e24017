"""Every check, in run order, and the data beside each: the groups and the explicit list of
their modules, the roles (which checks each partner needs, and what it needs of the
CapabilityStatement), which checks write nothing, what to change when a check fails, and the
spec reference as a link
(conformance/, layer 3: orchestration; imports base and the conformance checks only).

The order of `GROUPS` is the order of the report; `_checks` names each group module of
`checks/` in that order, so a new check is added to its group module's `CHECKS` and a new group
both here and in `GROUPS`. A new check also gets a line in `FIXES`, its place in the `ROLES`
that need it and, when it writes nothing, in `READ_ONLY`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import data_path
from ..errors import ConfigError
from .checks import capability, errors, idempotency, partner, round_trip, search, security, validation
from .checks.capability import CLAIMS_CHECK, CLINIC_INTERACTIONS, KAP_TYPES, NEEDED_INTERACTIONS
from .context import Check
from .examples import load_invalid_examples

GROUPS = (
    "capability",
    "partner",
    "round-trip",
    "idempotency",
    "search",
    "errors",
    "validation",
    "security",
)


@dataclass(frozen=True)
class Role:
    """A partner's server: the checks it must pass and what its CapabilityStatement must declare.

    `checks`: check ids, or a group name for all of a group (`val-*` and `validation` alike);
    `needs`: resource type → interactions; `conditional`: types that need conditionalCreate.
    """

    name: str
    summary: str
    writes: str  # what a run of this role creates on the server (docs, --help)
    checks: tuple[str, ...]
    needs: Mapping[str, tuple[str, ...]]
    conditional: tuple[str, ...]
    transaction: bool


_COMM = {"Communication": ("create", "read", "search-type")}
_SECURITY = ("sec-01", "sec-02", "sec-03")
_CAP = ("cap-01", "cap-02", "cap-03", "cap-04", "cap-05", "cap-07", "cap-08")

ROLES: dict[str, Role] = {
    "practice-receiver": Role(
        "practice-receiver",
        "a referring practice's EHR that receives the clinic's notes as Communications",
        "2 Communications (one kept by the conditional create)",
        (*_CAP, "rcv-01", "rcv-02", "rcv-03", "err-01", *_SECURITY),
        _COMM,
        ("Communication",),
        False,
    ),
    "referral-sender": Role(
        "referral-sender",
        "a referring practice's EHR that holds referrals the clinic reads, and receives its notes",
        "2 Communications, 1 Patient, 1 ServiceRequest",
        (*_CAP, "rcv-01", "rcv-02", "rcv-03", "ref-01", "err-01", "err-03", *_SECURITY),
        {
            **_COMM,
            "Patient": ("create", "read", "search-type"),
            "ServiceRequest": ("create", "read", "search-type"),
        },
        ("Communication",),
        False,
    ),
    "clinic": Role(
        "clinic",
        "the KAP clinic's server: referrals, consents, sessions, notes, transactions and search",
        "the KAP example journey twice (round-trip and search data), 4 more Procedures, 3 Patients, 2 ServiceRequests",
        ("capability", "round-trip", "idempotency", "search", "errors", "validation", "security"),
        CLINIC_INTERACTIONS,  # update only where partners amend (referral, consent); never delete
        KAP_TYPES,
        True,
    ),
    "full": Role(
        "full",
        "every check (the default)",
        "everything the clinic role writes, plus 2 Communications, 1 Patient, 1 ServiceRequest",
        GROUPS,
        {**dict.fromkeys(KAP_TYPES, NEEDED_INTERACTIONS)},
        KAP_TYPES,
        True,
    ),
}

# Checks that write nothing: only GET and $validate (which stores nothing). `--read-only`.
READ_ONLY = frozenset(
    {"cap-01", "cap-02", "cap-03", "cap-04", "cap-05", "cap-06", "cap-07", "cap-08", "cap-09"}
) | {
    "validation",
    "security",
}

# What to change on the server when a check fails (shown under each failing check).
FIXES: dict[str, str] = {
    "cap-01": "serve a CapabilityStatement at GET [base]/metadata (Accept: application/fhir+json)",
    "cap-02": "run the server in FHIR R4 (4.0.1) or R5 (5.0.0) and declare it in CapabilityStatement.fhirVersion, "
    "or pass --fhir-version",
    "cap-03": "list application/fhir+json (or json) in CapabilityStatement.format",
    "cap-04": "enable the listed interactions for the listed resource types and declare them in "
    "rest.resource.interaction",
    "cap-05": "support If-None-Exist on create for these types and set rest.resource.conditionalCreate: true",
    "cap-06": "support transaction Bundles (POST [base]) and declare rest.interaction 'transaction'",
    "cap-07": "publish [base]/.well-known/smart-configuration with token_endpoint, or check with "
    "--auth bearer",
    "cap-08": "make the server do what its CapabilityStatement declares, or remove the claim from "
    "the CapabilityStatement",
    "cap-09": "name the SubscriptionTopics of the Subscriptions you claim; a KAP clinic's server publishes the KAP SubscriptionTopics (continuity-note-available, referral-status-changed): R4 "
    "with the backport IG's capabilitystatement-subscriptiontopic-canonical extension on the Subscription "
    "entry, R5 as SubscriptionTopic resources searchable by url",
    "rcv-01": "accept POST [base]/Communication of the KAP Communication (see the OperationOutcome in the "
    "exchange); if it insists on resolving references, allow references to resources it does not hold",
    "rcv-02": "honour If-None-Exist on Communication: when the identifier matches, answer 200 with the "
    "existing resource instead of storing a second one",
    "rcv-03": "store the Communication as sent (the elements named as lost) and serve GET "
    "[base]/Communication/[id]",
    "ref-01": "store Patient and ServiceRequest as sent and index ServiceRequest by identifier and patient",
    "rt-01": "accept POST of each KAP resource type (see the OperationOutcome in the exchange)",
    "rt-02": "keep every element of the resource as sent (the elements named as lost), including "
    "extensions and meta.tag",
    "rt-03": "index the identifier search parameter (system|value) for the KAP types",
    "rt-04": 'support versioned update: PUT with If-Match W/"n" → 200 with a new meta.versionId, a stale '
    "version → 412",
    "rt-05": "make DELETE of the types the CapabilityStatement claims it for answer 200/204 and a read "
    "afterwards 404 or 410 (or stop claiming delete)",
    "rt-06": "support PUT [type]?identifier=SYSTEM|VALUE: update the one match (200), or stop claiming "
    "conditionalUpdate",
    "idem-01": "honour If-None-Exist: a match answers 200 with the existing resource, no second copy",
    "idem-02": "in a transaction, replace urn:uuid fullUrls in references with the new resource ids",
    "idem-03": "process a transaction all-or-nothing: roll back every entry when one fails",
    "srch-01": "index the patient search parameter (Procedure.subject)",
    "srch-02": "index the identifier search parameter on ServiceRequest",
    "srch-03": "index the status search parameter on Procedure",
    "srch-04": "index the category search parameter on Procedure (system|code)",
    "srch-05": "index the based-on search parameter on Procedure",
    "srch-06": "index the recipient search parameter on Communication",
    "srch-07": "index _lastUpdated with the ge/lt prefixes",
    "srch-08": "set the server's base URL so that paging links use the URL clients call, e.g. "
    "http://HOST:PORT/fhir (SEKMET: base_url in its settings; `fhir-kap testserver` sets it), "
    "and honour _count on every page",
    "err-01": "answer malformed JSON with 400 and an OperationOutcome",
    "err-02": "answer an unknown resource type with 400/404 and an OperationOutcome",
    "err-03": "validate required elements on create and answer 400/422 with an OperationOutcome",
    "err-04": "refuse a resource whose resourceType does not match the URL (400 with an OperationOutcome)",
    "err-05": "check codes of required bindings (status) and answer 400/422 with an OperationOutcome",
    "err-06": "answer a body that is not UTF-8 with 400 and an OperationOutcome instead of a 5xx",
    "val-01": "make $validate accept the KAP example (load the KAP package, profiles/package.json)",
    "val": "make $validate report an error issue for this instance (load the KAP package, profiles/)",
    "sec-01": "refuse requests without a token with 401 (WWW-Authenticate: Bearer)",
    "sec-02": "refuse requests with an unknown or expired token with 401",
    "sec-03": "never copy the Authorization header or token into a response (body or headers)",
}

_SPEC = {
    "R4": "https://hl7.org/fhir/R4/",
    "R5": "https://hl7.org/fhir/R5/",
}


def rule_url(rule: str, fhir_version: str | None = None) -> str | None:
    """The spec page a check's rule cites, as a link (R5 pages for a 5.x server), or None."""
    m = re.match(r"FHIR R4 ([\w./-]+\.html(?:#[\w.-]+)?)", rule)
    if m:
        base = _SPEC["R5"] if str(fhir_version or "").startswith("5.") else _SPEC["R4"]
        return base + m.group(1)
    m = re.match(r"RFC (\d+)(?: §([\d.]+))?", rule)
    if m:
        return f"https://www.rfc-editor.org/rfc/rfc{m.group(1)}" + (
            f"#section-{m.group(2)}" if m.group(2) else ""
        )
    if rule.startswith("SMART App Launch"):
        return "https://hl7.org/fhir/smart-app-launch/conformance.html"
    if rule.startswith("Subscriptions R5 Backport IG"):
        return "https://hl7.org/fhir/uv/subscriptions-backport/components.html"
    return None


def fix_for(check_id: str) -> str:
    """What to change on the server when `check_id` fails ('' when nothing is written down)."""
    return FIXES.get(check_id) or FIXES.get(check_id.split("-")[0], "")


def _checks(invalid: Sequence[Mapping[str, Any]]) -> list[Check]:
    return [
        *capability.CHECKS,
        *partner.CHECKS,
        *round_trip.CHECKS,
        *idempotency.CHECKS,
        *search.CHECKS,
        *errors.CHECKS,
        *validation.checks(invalid),
        *security.CHECKS,
    ]


def all_checks(invalid_dir: Path | None = None) -> list[Check]:
    """Every check, in run order (the validation checks depend on the invalid-examples manifest).

    cap-08 is not among them: the runner runs it last (`CLAIMS_CHECK`), after the clean-up."""
    folder = invalid_dir or data_path("profiles") / "examples" / "invalid"
    return _checks(load_invalid_examples(Path(folder)))


def _selected(check: Check, names: tuple[str, ...] | frozenset[str]) -> bool:
    return check.id in names or check.group in names


def role(name: str) -> Role:
    """The role called `name`; ConfigError naming the choices otherwise."""
    if name not in ROLES:
        raise ConfigError(f"unknown role '{name}'; choose from {', '.join(ROLES)}", rule="check:role")
    return ROLES[name]


def checks_for(
    role_name: str, checks: Sequence[Check], *, read_only: bool = False, only: Sequence[str] = ()
) -> list[Check]:
    """The checks a run of `role_name` runs, in run order (with --read-only / --only applied)."""
    r = role(role_name)
    out = [c for c in checks if _selected(c, r.checks)]
    if read_only:
        out = [c for c in out if _selected(c, READ_ONLY)]
    if only:
        out = [c for c in out if c.group in only or c.id == "cap-01"]  # the others read its metadata
    return out


def claims_check(role_name: str, *, read_only: bool = False) -> Check | None:
    """cap-08, when the role runs it (read-only runs exercise nothing, so it is left out there)."""
    r = role(role_name)
    return CLAIMS_CHECK if _selected(CLAIMS_CHECK, r.checks) and not read_only else None
