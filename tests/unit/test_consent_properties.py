"""Property-based checks of the consent gate's fail-closed promises (hypothesis)."""

from __future__ import annotations

import copy
import json
from datetime import date, timedelta
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from fhir_kap.config import CS
from fhir_kap.consent import ConsentGate, Recipient

DATA = Path(__file__).resolve().parents[1] / "data" / "consent"


def load(name: str) -> dict:
    return json.loads((DATA / f"{name}.json").read_text())


DIRECTORY = [load(p.stem) for p in sorted(DATA.glob("Practitioner*.json"))] + [
    load("Organization-practice-a")
]
CONSENTS = [
    "r4-consent-main",
    "r4-consent-org",
    "r4-consent-npi",
    "r4-consent-deny-with-permit",
    "r4-consent-datetime-period",
    "r5-consent-main",
    "r5-consent-deny-exception",
    "r5-consent-org",
    "r5-consent-grantee-only",
    "r5-consent-permit-base-exception",
    "r5-consent-blanket-deny-other-grantee",
    "r4-consent-absolute-actor",
]
RESOURCES = [
    "Procedure-session-dates",
    "Communication-note-safety",
    "Communication-note-themes",
    "Communication-note-coordination",
    "ServiceRequest-referral",
    "Communication-note-safety-coordination",
]
CATEGORIES = ["session-dates", "response-themes", "safety", "care-coordination"]

recipients = st.sampled_from(
    [
        "Practitioner/th-001",
        "Practitioner/th-002",
        "Practitioner/th-003",
        "Organization/practice-a",
        "http://hl7.org/fhir/sid/us-npi|1234567893",
    ]
)
purposes = st.sampled_from(["TREAT", "COC", "HPAYMT"])
days = st.integers(min_value=0, max_value=500).map(lambda n: date(2024, 2, 1) + timedelta(days=n))
consent_sets = st.lists(st.sampled_from(CONSENTS), min_size=1, max_size=4, unique=True)


@st.composite
def deny_provisions(draw, release: str) -> dict:
    prov: dict = {}
    if draw(st.booleans()):
        prov["code"] = [
            {"coding": [{"system": CS.INFO_CATEGORY, "code": c}]}
            for c in draw(st.lists(st.sampled_from(CATEGORIES), min_size=1, max_size=2, unique=True))
        ]
    if draw(st.booleans()):
        prov["purpose"] = [{"system": CS.V3_ACTREASON, "code": draw(st.sampled_from(["TREAT", "COC"]))}]
    if draw(st.booleans()):
        prov["actor"] = [
            {
                "role": {"coding": [{"system": CS.V3_PARTICIPATION, "code": "IRCP"}]},
                "reference": {
                    "reference": draw(st.sampled_from(["Practitioner/th-001", "Organization/practice-a"]))
                },
            }
        ]
    if release == "r4":
        prov["type"] = "deny"
    return prov


def _with_extra_deny(consent: dict, deny: dict, as_separate: bool) -> list[dict]:
    if as_separate:
        extra = load("r4-consent-separate-deny")
        extra["id"] = "con-extra-deny"
        body = dict(deny.items())
        body["type"] = "deny"
        extra["provision"] = body
        return [consent, extra]
    c = copy.deepcopy(consent)
    if isinstance(c.get("provision"), dict):  # R4: a deny child of the root
        c["provision"].setdefault("provision", []).append({**deny, "type": "deny"})
    else:  # R5: top-level provisions negate `decision`, a child negates its parent: under decision
        # deny a top-level provision permits and its child denies; under decision permit use a separate deny
        if c.get("decision") != "deny" or not c.get("provision"):
            return [c, _r4_deny(deny)]
        c["provision"][0].setdefault("provision", []).append({k: v for k, v in deny.items() if k != "type"})
    return [c]


def _r4_deny(deny: dict) -> dict:
    extra = load("r4-consent-separate-deny")
    extra["id"] = "con-extra-deny"
    extra["provision"] = {**deny, "type": "deny"}
    return extra


@settings(max_examples=150, deadline=None)
@given(
    consent_sets, st.sampled_from(RESOURCES), recipients, purposes, days, deny_provisions("r4"), st.booleans()
)
def test_adding_a_deny_provision_never_turns_deny_into_permit(names, res, rec, purpose, on, deny, separate):
    resource, recipient = load(res), Recipient.parse(rec)
    consents = [load(n) for n in names]
    before = ConsentGate(consents + DIRECTORY).decide(resource, recipient, purpose, on)
    after_ctx = _with_extra_deny(consents[0], deny, separate) + consents[1:]
    after = ConsentGate(after_ctx + DIRECTORY).decide(resource, recipient, purpose, on)
    if not before.permit:
        assert not after.permit, (before.to_json(), after.to_json())


@settings(max_examples=100, deadline=None)
@given(st.sampled_from(CONSENTS), st.sampled_from(RESOURCES), recipients, purposes, days)
def test_removing_the_consent_always_yields_deny(name, res, rec, purpose, on):
    gate = ConsentGate(DIRECTORY)  # the same request, the consent removed
    decision = gate.decide(load(res), Recipient.parse(rec), purpose, on)
    assert not decision.permit
    assert decision.reasons[0].code == "no-consent"


@settings(max_examples=150, deadline=None)
@given(
    consent_sets,
    st.sampled_from(RESOURCES),
    recipients,
    purposes,
    days,
    st.sampled_from([CS.V3_ACTCODE, "urn:other", None]),
    st.sampled_from(["PSYTHPN", "psythpn", "PsyThpn"]),
    st.sampled_from(["security", "tag"]),
)
def test_a_psythpn_label_always_yields_deny(names, res, rec, purpose, on, system, code, where):
    resource = load(res)
    label = {"code": code} if system is None else {"system": system, "code": code}
    resource.setdefault("meta", {}).setdefault(where, []).append(label)
    gate = ConsentGate([load(n) for n in names] + DIRECTORY)
    decision = gate.decide(resource, Recipient.parse(rec), purpose, on)
    assert not decision.permit
    assert decision.reasons[0].code == "psychotherapy-note"


@settings(max_examples=100, deadline=None)
@given(
    consent_sets,
    st.sampled_from(RESOURCES),
    recipients,
    purposes,
    days,
    st.sampled_from([CS.INFO_CATEGORY, CS.INFO_CATEGORY + "/", "urn:other", None]),
    st.booleans(),
)
def test_a_psychotherapy_note_code_in_any_system_or_contained_always_yields_deny(
    names, res, rec, purpose, on, system, contained
):
    resource = load(res)
    coding = (
        {"code": "psychotherapy-note"} if system is None else {"system": system, "code": "psychotherapy-note"}
    )
    if contained:
        resource["contained"] = [
            {
                "resourceType": "Communication",
                "id": "inner",
                "status": "completed",
                "category": [{"coding": [coding]}],
            }
        ]
    elif resource["resourceType"] == "Communication":
        resource["category"].append({"coding": [coding]})
    else:
        resource["meta"]["tag"].append(coding)
    gate = ConsentGate([load(n) for n in names] + DIRECTORY)
    decision = gate.decide(resource, Recipient.parse(rec), purpose, on)
    assert not decision.permit
    assert decision.reasons[0].code == "psychotherapy-note"


def test_an_r4_consent_with_an_r5_top_level_period_is_malformed_and_denies():
    """Mixed R4/R5 shapes fail closed: the R5 `period` of an R4 consent must not be dropped (an
    expired grant would otherwise still permit)."""
    resource, recipient, on = (
        load("Communication-note-coordination"),
        Recipient.parse("Practitioner/th-001"),
        date(2024, 6, 1),
    )
    consent = load("r4-consent-main")
    assert ConsentGate([consent] + DIRECTORY).decide(resource, recipient, "TREAT", on).permit  # the baseline
    mixed = dict(copy.deepcopy(consent), period={"start": "2020-01-01", "end": "2020-12-31"})
    assert not ConsentGate([mixed] + DIRECTORY).decide(resource, recipient, "TREAT", on).permit
