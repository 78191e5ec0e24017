"""Consents as EHRs write them: the client and the parties named by identifier (logical
references) or by contained resources decide exactly as the same Consent with literal references.

The decision cases (tests/data/consent/cases.json and the audit cases) are rewritten mechanically;
the context holds the Patients, Practitioners, Organizations and PractitionerRoles that carry the
identifiers used. Fixtures written the way EHRs send them are in tests/data/consent/ehr/.
"""

from __future__ import annotations

import copy
import functools
import json
import random
import re
from datetime import date, datetime
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fhir_kap.consent import ConsentGate, Decision, Recipient
from fhir_kap.consent.parties import named_client
from testkit.audit_cases import REQUESTS

DATA = Path(__file__).resolve().parents[1] / "data" / "consent"
EHR = DATA / "ehr"
EPIC_MRN = "urn:oid:1.2.840.114350.1.13.0.1.7.5.737384.14"
NPI = "http://hl7.org/fhir/sid/us-npi"
ON = date(2024, 5, 1)
TH = Recipient.parse("Practitioner/th-001")

CASES: list[dict[str, Any]] = json.loads((DATA / "cases.json").read_text())["cases"] + [
    {"id": f"audit-{i}", "context": [c], "resource": r, "recipient": rec, "purpose": p, "date": "2024-05-01"}
    for i, (c, r, rec, p) in enumerate(REQUESTS)
]
DIRECTORY = sorted(p.stem for p in DATA.glob("Practitioner*.json")) + ["Organization-practice-a"]
PARTY_TYPES = ("Patient", "Practitioner", "Organization", "PractitionerRole")
_RELATIVE = re.compile(r"^(Patient|Practitioner|Organization|PractitionerRole)/([A-Za-z0-9\-.]{1,64})$")
CONSENT_PARTY_LISTS = ("performer", "organization", "grantor", "grantee", "controller", "manager")


@functools.cache
def _text(path: Path) -> str:
    return path.read_text()


def load(name: str) -> dict[str, Any]:
    path = EHR / f"{name.removeprefix('ehr/')}.json" if name.startswith("ehr/") else DATA / f"{name}.json"
    return json.loads(_text(path))


def when(text: str) -> date | datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00")) if "T" in text else date.fromisoformat(text)


# -- the mechanical rewrite ---------------------------------------------------------------------


def _party_refs(consent: dict[str, Any]) -> list[dict[str, Any]]:
    """Every party Reference dict of a Consent: client, party lists, provision actors (nested)."""
    out = [consent[f] for f in ("patient", "subject") if isinstance(consent.get(f), dict)]
    for f in CONSENT_PARTY_LISTS:
        out += [r for r in consent.get(f) or [] if isinstance(r, dict)]
    raw = consent.get("provision")
    stack = [raw] if isinstance(raw, dict) else list(raw or [])
    while stack:
        prov = stack.pop()
        if not isinstance(prov, dict):
            continue
        out += [a["reference"] for a in prov.get("actor") or [] if isinstance(a.get("reference"), dict)]
        stack += [p for p in prov.get("provision") or [] if isinstance(p, dict)]
    return out


def _literal(ref: dict[str, Any]) -> tuple[str, str] | None:
    m = _RELATIVE.match(ref.get("reference") or "")
    return (m.group(1), m.group(2)) if m else None


def augmented_context(names: list[str], resource: dict[str, Any]) -> tuple[list[dict], dict]:
    """The case's context plus a resource for every party named literally, each with an identifier
    that it alone carries; returns (context, {(type, id): (system, value)})."""
    context = [load(n) for n in names]
    consents = [r for r in context if r.get("resourceType") == "Consent"]
    wanted = {lit for c in consents for ref in _party_refs(c) if (lit := _literal(ref))}
    for field in ("subject", "patient"):
        if isinstance(resource.get(field), dict) and (lit := _literal(resource[field])):
            wanted.add(lit)
    parties = {
        (r["resourceType"], r["id"]): r
        for r in context
        if r.get("resourceType") in PARTY_TYPES and isinstance(r.get("id"), str)
    }
    for rtype, rid in sorted(wanted):
        if (rtype, rid) not in parties:
            new = load("ehr/Patient-client-001") if (rtype, rid) == ("Patient", "client-001") else None
            new = new or {"resourceType": rtype, "id": rid}
            parties[(rtype, rid)] = new
            context.append(new)
    carriers: dict[tuple[str, str], int] = {}
    for r in parties.values():
        for i in r.get("identifier") or []:
            key = (i.get("system"), i.get("value"))
            carriers[key] = carriers.get(key, 0) + 1
    naming = {}
    for rtype, rid in sorted(wanted):
        party = parties[(rtype, rid)]
        own = [
            (i["system"], i["value"]) for i in party.get("identifier") or [] if "system" in i and "value" in i
        ]
        unique = [i for i in own if carriers[i] == 1]
        if not unique:  # none it alone carries: give it one (both contexts hold the same resources)
            unique = [(f"urn:test:sid:{rtype.lower()}", rid)]
            party["identifier"] = [*party.get("identifier", []), {"system": unique[0][0], "value": rid}]
        naming[(rtype, rid)] = unique[0]
    return context, naming


def rewrite(consent: dict, naming: dict, client: str, actors: str, rng: random.Random | None = None) -> dict:
    """A copy of `consent` whose client (and, separately, every other party) is named literally,
    by identifier ("logical") or by a contained resource ("contained"); `rng`: choose per reference."""
    out = copy.deepcopy(consent)
    client_refs = [out[f] for f in ("patient", "subject") if isinstance(out.get(f), dict)]
    contained: dict[tuple[str, str], str] = {}
    for ref in _party_refs(out):
        lit = _literal(ref)
        if lit is None or lit not in naming:
            continue
        how = client if any(ref is c for c in client_refs) else actors
        if rng is not None:
            how = rng.choice(["literal", "logical", "contained"])
        system, value = naming[lit]
        if how == "logical":
            ref.clear()
            ref.update({"type": lit[0], "identifier": {"system": system, "value": value}})
        elif how == "contained":
            if lit not in contained:
                contained[lit] = cid = f"party-{len(contained)}"
                ident = [{"system": system, "value": value}]
                out.setdefault("contained", []).append(
                    {"resourceType": lit[0], "id": cid, "identifier": ident}
                )
            ref.clear()
            ref["reference"] = f"#{contained[lit]}"
    return out


def name_subject(resource: dict, naming: dict) -> dict:
    """A copy of the disclosed resource whose relative Patient subject is named by identifier."""
    out = copy.deepcopy(resource)
    lit = _literal(out.get("subject") or {})
    if lit and lit[0] == "Patient" and lit in naming:
        system, value = naming[lit]
        out["subject"] = {"type": "Patient", "identifier": {"system": system, "value": value}}
    return out


def decide(context: list[dict], resource: dict, case: dict) -> Decision:
    return ConsentGate(context).decide(
        resource, Recipient.parse(case["recipient"]), case["purpose"], when(case["date"])
    )


def outcome(d: Decision) -> tuple:
    return d.permit, d.codes, d.consent


def _case_context(case: dict) -> list[str]:
    return case["context"] + (DIRECTORY if case.get("directory", True) else [])


MODES = [  # (client, other parties, disclosed subject)
    ("logical", "literal", "literal"),
    ("contained", "literal", "literal"),
    ("literal", "logical", "literal"),
    ("literal", "contained", "literal"),
    ("logical", "logical", "logical"),
    ("contained", "contained", "logical"),
    ("literal", "literal", "logical"),
]


@pytest.mark.parametrize("mode", MODES, ids=["-".join(m) for m in MODES])
def test_every_decision_case_decides_the_same_with_parties_named_as_an_ehr_names_them(mode):
    client, actors, subject = mode
    checked = 0
    for case in CASES:
        resource = load(case["resource"])
        context, naming = augmented_context(_case_context(case), resource)
        expected = outcome(decide(context, resource, case))
        consents = [
            rewrite(r, naming, client, actors) if r.get("resourceType") == "Consent" else r for r in context
        ]
        shown = name_subject(resource, naming) if subject == "logical" else resource
        assert outcome(decide(consents, shown, case)) == expected, case["id"]
        checked += 1
    assert checked == len(CASES) >= 140


@settings(max_examples=120, deadline=None)
@given(st.sampled_from(CASES), st.randoms(use_true_random=False), st.booleans())
def test_naming_each_party_any_way_never_changes_a_decision(case, rng, logical_subject):
    resource = load(case["resource"])
    context, naming = augmented_context(_case_context(case), resource)
    expected = outcome(decide(context, resource, case))
    consents = [rewrite(r, naming, "", "", rng) if r.get("resourceType") == "Consent" else r for r in context]
    shown = name_subject(resource, naming) if logical_subject else resource
    assert outcome(decide(consents, shown, case)) == expected


def test_the_baseline_cases_still_decide_as_the_table_says_with_the_identified_parties_added():
    """Adding the identified Patients and parties to the context changes no table decision."""
    for case in CASES:
        if "expect" not in case:
            continue
        resource = load(case["resource"])
        context, _ = augmented_context(_case_context(case), resource)
        d = decide(context, resource, case)
        assert ("permit" if d.permit else "deny", d.codes[0]) == (case["expect"], case["reason"]), case["id"]


# -- fixtures written the way EHRs write them -----------------------------------------------------

PATIENT = "ehr/Patient-client-001"
SESSION = "Procedure-session-dates"


def _gate(*names: str) -> ConsentGate:
    return ConsentGate([load(n) for n in names])


@pytest.mark.parametrize("consent", ["ehr/r4-consent-ehr-logical", "ehr/r4-consent-ehr-contained"])
@pytest.mark.parametrize("resource", [SESSION, "ehr/Procedure-session-dates-logical-subject"])
def test_an_ehr_consent_naming_client_and_recipient_by_identifier_permits(consent, resource):
    d = _gate(consent, PATIENT, *DIRECTORY).decide(load(resource), TH, "TREAT", ON)
    assert d.permit, d.to_json()
    assert d.consent == f"Consent/{load(consent)['id']}/_history/1"
    npi = Recipient.parse(f"{NPI}|1234567893")
    assert _gate(consent, PATIENT, *DIRECTORY).decide(load(resource), npi, "TREAT", ON).permit


def test_an_r5_consent_with_contained_subject_and_grantee_permits_and_keeps_its_nested_deny():
    gate = _gate("ehr/r5-consent-ehr-contained", PATIENT, *DIRECTORY)
    assert gate.decide(load(SESSION), TH, "COC", ON).permit
    themes = gate.decide(load("Communication-note-themes"), TH, "TREAT", ON)
    assert not themes.permit and themes.codes[0] == "nested-deny"
    other = gate.decide(load(SESSION), Recipient.parse("Practitioner/th-002"), "COC", ON)
    assert not other.permit and other.codes[0] == "recipient-not-named"


def test_a_logical_subject_matches_a_literal_consent_through_the_patient_in_context():
    gate = _gate("r4-consent-main", PATIENT, *DIRECTORY)
    assert gate.decide(load("ehr/Procedure-session-dates-logical-subject"), TH, "TREAT", ON).permit


def test_a_consent_naming_the_client_by_identifier_needs_no_patient_in_context_for_a_literal_subject_carrying_it():
    """Without the Patient in the context nobody can tell that Patient/client-001 carries the MRN."""
    d = _gate("ehr/r4-consent-ehr-logical", *DIRECTORY).decide(load(SESSION), TH, "TREAT", ON)
    assert not d.permit and d.codes == ("no-consent",)
    logical = load("ehr/Procedure-session-dates-logical-subject")
    assert _gate("ehr/r4-consent-ehr-logical", *DIRECTORY).decide(logical, TH, "TREAT", ON).permit


def _logical(consent: dict, system: str, value: str, rtype: str | None = "Patient") -> dict:
    out = copy.deepcopy(consent)
    out["patient"] = {"identifier": {"system": system, "value": value}} | ({"type": rtype} if rtype else {})
    return out


@pytest.mark.parametrize(
    "system,value,rtype",
    [
        (EPIC_MRN, "E4000456", "Patient"),  # another client's MRN
        (EPIC_MRN, "E4000124", None),  # nobody's MRN
        ("urn:oid:1.2.840.114350.1.13.0.1.7.5.737384.15", "E4000123", "Patient"),  # same value, other system
        ("http://fhir-kap.example/sid/org", "practice-a", "Patient"),  # an Organization's identifier
        (EPIC_MRN, "E4000123", "Organization"),  # the MRN, said to name an Organization
        (EPIC_MRN, "e4000123", "Patient"),  # identifiers are case-sensitive
    ],
)
@pytest.mark.parametrize("resource", [SESSION, "ehr/Procedure-session-dates-logical-subject"])
def test_a_consent_naming_another_identifier_never_permits(system, value, rtype, resource):
    consent = _logical(load("r4-consent-main"), system, value, rtype)
    context = [consent, load(PATIENT), load("ehr/Patient-client-002"), *(load(n) for n in DIRECTORY)]
    d = ConsentGate(context).decide(load(resource), TH, "TREAT", ON)
    assert not d.permit, d.to_json()


def test_an_organization_identifier_carried_by_the_client_too_never_names_the_client():
    """Types must agree: an identifier an Organization carries does not name a Patient, even when
    the client carries the same identifier."""
    patient = load(PATIENT)
    patient["identifier"].append({"system": "http://fhir-kap.example/sid/org", "value": "practice-a"})
    consent = _logical(load("r4-consent-main"), "http://fhir-kap.example/sid/org", "practice-a")
    d = ConsentGate([consent, patient, *(load(n) for n in DIRECTORY)]).decide(load(SESSION), TH, "TREAT", ON)
    assert not d.permit and d.codes[0] == "malformed-consent"


@pytest.mark.parametrize("consent", ["ehr/r4-consent-ehr-logical", "ehr/r4-consent-ehr-contained"])
@pytest.mark.parametrize("resource", [SESSION, "ehr/Procedure-session-dates-logical-subject"])
def test_an_identifier_two_patients_carry_never_permits(consent, resource):
    gate = _gate(consent, PATIENT, "ehr/Patient-client-009-same-mrn", *DIRECTORY)
    d = gate.decide(load(resource), TH, "TREAT", ON)
    assert not d.permit, d.to_json()
    if resource == SESSION:
        assert d.codes[0] == "malformed-consent" and "ambiguous" in d.reasons[0].message


def test_a_literal_consent_is_not_reached_through_an_ambiguous_logical_subject():
    gate = _gate("r4-consent-main", PATIENT, "ehr/Patient-client-009-same-mrn", *DIRECTORY)
    d = gate.decide(load("ehr/Procedure-session-dates-logical-subject"), TH, "TREAT", ON)
    assert not d.permit and d.codes == ("no-consent",)


def test_a_contained_patient_without_identifier_never_permits_and_says_why():
    gate = _gate("ehr/r4-consent-ehr-contained-no-identifier", PATIENT, *DIRECTORY)
    for resource in (SESSION, "ehr/Procedure-session-dates-logical-subject"):
        d = gate.decide(load(resource), TH, "TREAT", ON)
        assert not d.permit and d.codes[0] == "malformed-consent"
        assert "carries no identifier" in d.reasons[0].message and d.reasons[0].provision == "Consent.patient"


@pytest.mark.parametrize(
    "change,why",
    [
        (lambda c: c.update(patient={"reference": "#nobody"}), "does not hold"),
        (
            lambda c: c["contained"].__setitem__(0, dict(c["contained"][0], resourceType="Group")),
            "not a Patient",
        ),
        (lambda c: c.update(patient={"reference": "#", "type": "Patient"}), "Consent itself"),
        (
            lambda c: c.update(patient={"display": "Alex Doe"}),
            "neither a literal reference nor an identifier",
        ),
        (lambda c: c.update(patient={"reference": "Patient?identifier=x", "type": "Patient"}), "conditional"),
        (
            lambda c: c["provision"]["actor"][0].update(reference={"reference": "#nobody"}),
            "does not hold",
        ),
        (lambda c: c.update(organization=[{"reference": "#gone"}]), "does not hold"),
        (
            lambda c: c["contained"].__setitem__(1, dict(c["contained"][1], identifier=[])),
            "carries no identifier",
        ),
    ],
)
def test_a_party_that_cannot_be_read_fails_closed_with_a_clear_reason(change, why):
    consent = load("ehr/r4-consent-ehr-contained")
    change(consent)
    d = ConsentGate([consent, load(PATIENT), *(load(n) for n in DIRECTORY)]).decide(
        load(SESSION), TH, "TREAT", ON
    )
    assert not d.permit and d.codes[0] == "malformed-consent", d.to_json()
    assert why in d.reasons[0].message


def test_an_actor_identifier_two_practitioners_carry_makes_the_consent_unreadable():
    twin = dict(load("Practitioner-th-002"), identifier=[{"system": NPI, "value": "1234567893"}])
    gate = ConsentGate(
        [load("ehr/r4-consent-ehr-logical"), load(PATIENT), twin, *(load(n) for n in DIRECTORY)]
    )
    d = gate.decide(load(SESSION), TH, "TREAT", ON)
    assert not d.permit and d.codes[0] == "malformed-consent" and "ambiguous" in d.reasons[0].message


def test_a_contained_blanket_deny_grantee_still_denies():
    """A grantee the gate used to drop (a contained one) made a blanket deny apply to nobody."""
    deny = load("r5-consent-blanket-deny")
    deny["contained"] = [load("ehr/r5-consent-ehr-contained")["contained"][1]]
    deny["grantee"] = [{"reference": "#th"}]
    gate = ConsentGate([load("r5-consent-main"), deny, *(load(n) for n in DIRECTORY)])
    d = gate.decide(load(SESSION), TH, "TREAT", ON)
    assert not d.permit and d.codes[0] == "blanket-deny"


@settings(max_examples=60, deadline=None)
@given(
    st.sampled_from(
        [EPIC_MRN, "urn:oid:1.2.840.114350.1.13.0.1.7.5.737384.15", "http://fhir-kap.example/sid/org"]
    ),
    st.text(alphabet="E0123456789e", min_size=1, max_size=9).filter(lambda v: v != "E4000123"),
    st.sampled_from(["logical", "contained"]),
    st.sampled_from([SESSION, "ehr/Procedure-session-dates-logical-subject"]),
)
def test_a_consent_naming_any_identifier_the_client_does_not_carry_never_permits(
    system, value, how, resource
):
    consent = load("ehr/r4-consent-ehr-contained" if how == "contained" else "ehr/r4-consent-ehr-logical")
    if how == "contained":
        consent["contained"][0]["identifier"] = [{"system": system, "value": value}]
    else:
        consent["patient"]["identifier"] = {"system": system, "value": value}
    d = ConsentGate([consent, load(PATIENT), *(load(n) for n in DIRECTORY)]).decide(
        load(resource), TH, "TREAT", ON
    )
    assert not d.permit


def test_named_client_reads_the_client_without_context():
    assert named_client(load("r4-consent-main")).reference == "Patient/client-001"
    assert named_client(load("r5-consent-main")).reference == "Patient/client-001"
    assert named_client(load("ehr/r4-consent-ehr-logical")).identifiers == {(EPIC_MRN, "E4000123")}
    assert named_client(load("ehr/r5-consent-ehr-contained")).identifiers == {(EPIC_MRN, "E4000123")}
    assert named_client(load("ehr/r4-consent-ehr-contained-no-identifier")) is None
    conditional = dict(load("r4-consent-main"), patient={"reference": f"Patient?identifier={EPIC_MRN}|E1"})
    assert named_client(conditional).identifiers == {(EPIC_MRN, "E1")}
    assert named_client(dict(load("r4-consent-main"), patient={"reference": "Organization/x"})) is None
