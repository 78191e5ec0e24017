"""AuditEvent / Provenance builders: valid FHIR (R4 via R4B models, R5); SEKMET accepting them is a system test."""

from __future__ import annotations

import json
from datetime import date, datetime

import pytest

from fhir_kap.config import Release
from fhir_kap.consent import (
    ConsentGate,
    Recipient,
    apply_security_labels,
    audit_event,
    envelope_reveals_sensitivity,
    label_envelope,
    provenance,
)
from fhir_kap.errors import InputError
from fhir_kap.fhir.release import parse_model
from testkit.audit_cases import DATA, DIRECTORY, RECORDED, REQUESTS, load


def _decide(consent: str, res: str, rec: str):
    gate = ConsentGate([load(consent)] + DIRECTORY)
    return gate.decide(load(res), Recipient.parse(rec), "TREAT", date(2024, 5, 1))


@pytest.mark.parametrize("release", list(Release), ids=lambda r: r.short)
@pytest.mark.parametrize("consent,res,rec,purpose", REQUESTS)
def test_audit_event_validates_for_each_release(release, consent, res, rec, purpose):
    resource = load(res)
    decision = ConsentGate([load(consent)] + DIRECTORY).decide(
        resource, Recipient.parse(rec), purpose, date(2024, 5, 1)
    )
    event = audit_event(decision, resource, Recipient.parse(rec), purpose, release=release, recorded=RECORDED)
    parse_model(event, release)
    outcome = event["outcome"] if release is Release.R4 else event["outcome"]["code"]["code"]
    expected = "0" if decision.permit else ("8" if decision.reasons[0].code == "malformed-consent" else "4")
    assert outcome == expected
    pou = event["agent"][0]["purposeOfUse"] if release is Release.R4 else event["authorization"]
    assert pou[0]["coding"][0]["code"] == purpose
    whats = [e["what"]["reference"] for e in event["entity"]]
    assert f"{resource['resourceType']}/{resource['id']}" in whats and "Patient/client-001" in whats
    if decision.consent:
        assert decision.consent in whats


def test_audit_golden_r4():
    decision = _decide("r4-consent-main", "Procedure-session-dates", "Practitioner/th-001")
    event = audit_event(
        decision,
        load("Procedure-session-dates"),
        Recipient.parse("Practitioner/th-001"),
        "TREAT",
        release=Release.R4,
        recorded=RECORDED,
    )
    assert event == json.loads((DATA / "golden" / "AuditEvent-permit-r4.json").read_text())


@pytest.mark.parametrize("release", list(Release), ids=lambda r: r.short)
def test_provenance_cites_the_exact_consent_version(release):
    decision = _decide("r4-consent-main", "Procedure-session-dates", "Practitioner/th-001")
    prov = provenance("Procedure/ses-001", decision, release=release, recorded=RECORDED)
    parse_model(prov, release)
    assert prov["policy"] == ["Consent/con-r4/_history/1"]
    assert prov["entity"][0] == {"role": "source", "what": {"reference": "Consent/con-r4/_history/1"}}


def test_provenance_refuses_a_denied_disclosure():
    decision = _decide("r4-consent-main", "Communication-note-themes", "Practitioner/th-001")
    with pytest.raises(InputError):
        provenance("Communication/note-themes", decision, release=Release.R4, recorded=RECORDED)


def test_audit_needs_an_aware_time():
    decision = _decide("r4-consent-main", "Procedure-session-dates", "Practitioner/th-001")
    with pytest.raises(InputError):
        audit_event(
            decision,
            load("Procedure-session-dates"),
            Recipient.parse("Practitioner/th-001"),
            "TREAT",
            release=Release.R4,
            recorded=datetime(2024, 5, 1),
        )


@pytest.mark.parametrize(
    "start,expected",
    [
        ([], ["R", "PSY"]),
        ([{"system": "http://terminology.hl7.org/CodeSystem/v3-Confidentiality", "code": "N"}], ["R", "PSY"]),
        (
            [
                {"system": "http://terminology.hl7.org/CodeSystem/v3-Confidentiality", "code": "V"},
                {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "PSY"},
            ],
            ["V", "PSY"],
        ),
    ],
)
def test_apply_security_labels_returns_a_labelled_copy(start, expected):
    res = {"resourceType": "Procedure", "id": "p", "meta": {"security": start}}
    out = apply_security_labels(res)
    assert [c["code"] for c in out["meta"]["security"]] == expected
    assert res["meta"]["security"] == start  # the input is untouched


@pytest.mark.parametrize(
    "obj,reveals",
    [
        (
            {
                "resourceType": "Bundle",
                "meta": {
                    "security": [
                        {"system": "http://terminology.hl7.org/CodeSystem/v3-Confidentiality", "code": "R"}
                    ]
                },
            },
            False,
        ),
        (
            {
                "resourceType": "Bundle",
                "meta": {
                    "security": [
                        {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "PSY"}
                    ]
                },
            },
            True,
        ),
        (
            {
                "resourceType": "Bundle",
                "entry": [{"request": {"method": "POST", "url": "Communication?_security=PSYTHPN"}}],
            },
            True,
        ),
        (
            {
                "resourceType": "Bundle",
                "entry": [
                    {
                        "fullUrl": "urn:uuid:1",
                        "resource": {
                            "resourceType": "Procedure",
                            "meta": {
                                "security": [
                                    {
                                        "system": "http://terminology.hl7.org/CodeSystem/v3-ActCode",
                                        "code": "PSY",
                                    }
                                ]
                            },
                        },
                    }
                ],
            },
            False,
        ),
        ("POST /fhir/Communication 201", False),
        ("POST /fhir/Communication?_tag=psychotherapy-note", True),
    ],
)
def test_envelope_reveals_sensitivity(obj, reveals):
    assert envelope_reveals_sensitivity(obj) is reveals


def test_label_envelope_keeps_only_confidentiality_r():
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "meta": {"security": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "PSY"}]},
    }
    out = label_envelope(bundle)
    assert not envelope_reveals_sensitivity(out)
    assert out["meta"]["security"][0]["code"] == "R"
