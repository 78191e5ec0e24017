"""The append-only audit log of AuditEvent and Provenance, on SQLite and on PostgreSQL."""

from __future__ import annotations

import json
from datetime import date
from pathlib import Path

import pytest

from fhir_kap.errors import InputError
from fhir_kap.storage.auditlog import AuditLog, extract

DATA = Path(__file__).resolve().parents[1] / "data" / "delivery"


def load(name: str) -> dict:
    return json.loads((DATA / name).read_text())


@pytest.fixture
def log(db):
    audit = AuditLog(db)
    for name in (
        "AuditEvent-consent-permit.json",
        "AuditEvent-consent-deny.json",
        "AuditEvent-r5-consent-permit.json",
        "Provenance-disclosure.json",
    ):
        audit.append(load(name))
    return audit


@pytest.mark.parametrize(
    "name, expected",
    [
        (
            "AuditEvent-consent-permit.json",
            (
                "AuditEvent",
                "Patient/client-1",
                "Practitioner/ref-therapist",
                "0",
                "Consent/consent-1/_history/2",
            ),
        ),
        (
            "AuditEvent-consent-deny.json",
            ("AuditEvent", "Patient/client-2", "Practitioner/ref-therapist", "4", None),
        ),
        (
            "AuditEvent-r5-consent-permit.json",
            (
                "AuditEvent",
                "Patient/client-1",
                "http://hl7.org/fhir/sid/us-npi|1234567893",
                "0",
                "Consent/consent-1/_history/3",
            ),
        ),
        ("Provenance-disclosure.json", ("Provenance", None, None, None, "Consent/consent-1/_history/2")),
    ],
)
def test_extract__indexes_patient_recipient_outcome_and_consent(name, expected):
    rec = extract(load(name))
    assert (rec.resource_type, rec.patient, rec.recipient, rec.outcome, rec.consent_ref) == expected


@pytest.mark.parametrize(
    "resource, rule",
    [
        ({"resourceType": "Communication", "recorded": "2025-01-01T00:00:00Z"}, "audit:type"),
        ({"resourceType": "AuditEvent"}, "audit:recorded"),
        ({"resourceType": "Provenance", "recorded": "yesterday"}, "audit:recorded"),
    ],
)
def test_append__refuses_other_types_and_missing_or_bad_recorded(db, resource, rule):
    audit = AuditLog(db)
    with pytest.raises(InputError) as err:
        audit.append(resource)
    assert err.value.issues[0].rule == rule
    assert audit.count() == 0


def test_append_many__one_commit_for_all_and_none_when_one_is_bad(db, monkeypatch):
    audit = AuditLog(db)
    writes = []
    real = db.write
    monkeypatch.setattr(db, "write", lambda work: writes.append(1) or real(work))
    seqs = audit.append_many([load("AuditEvent-consent-permit.json"), load("Provenance-disclosure.json")])
    assert len(writes) == 1 and len(seqs) == 2 and seqs[0] < seqs[1]
    with pytest.raises(InputError):
        audit.append_many([load("AuditEvent-consent-deny.json"), {"resourceType": "AuditEvent"}])
    assert audit.count() == 2 and len(writes) == 1  # the bad one is refused before anything is written
    assert audit.append_many([]) == [] and len(writes) == 1


def test_query__filters_by_type_patient_outcome(log):
    assert [r["id"] for r in log.query(resource_type="Provenance")] == ["prov-1"]
    assert {r["id"] for r in log.query(patient="Patient/client-1")} == {"ae-permit-1", "ae-r5-1"}
    assert [r["id"] for r in log.query(outcome="4")] == ["ae-deny-1"]
    assert [
        r["id"]
        for r in log.query(resource_type="AuditEvent", patient="Patient/client-1", outcome="0", limit=1)
    ] == ["ae-r5-1"]


def test_query__newest_first_and_since_is_inclusive_across_time_zones(log):
    assert [r["id"] for r in log.query()] == ["ae-deny-1", "ae-r5-1", "prov-1", "ae-permit-1"]
    # 2025-03-01T12:30+01:00 is 11:30Z
    assert [r["id"] for r in log.query(since="2025-03-01T11:30:00Z")] == ["ae-deny-1"]
    assert [r["id"] for r in log.query(since=date(2025, 2, 3))] == ["ae-deny-1", "ae-r5-1"]


def test_query__by_recipient_and_by_consent_with_or_without_version(log):
    assert {r["id"] for r in log.query(recipient="Practitioner/ref-therapist")} == {
        "ae-permit-1",
        "ae-deny-1",
    }
    assert {r["id"] for r in log.query(consent="Consent/consent-1")} == {"ae-permit-1", "ae-r5-1", "prov-1"}
    assert {r["id"] for r in log.query(consent="Consent/consent-1/_history/2")} == {"ae-permit-1", "prov-1"}


def test_query__returns_the_resource_exactly_as_appended(log):
    [got] = log.query(resource_type="Provenance")
    assert got == load("Provenance-disclosure.json")


@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE audit_log SET outcome = '0'",
        "DELETE FROM audit_log",
        "UPDATE audit_log SET body = '{}' WHERE resource_type = 'Provenance'",
        "TRUNCATE audit_log",  # SQLite has none: its "truncate" is the DELETE without WHERE
    ],
)
def test_database_refuses_to_change_or_delete_audit_records(log, statement):
    if log.db.dialect == "sqlite" and statement.startswith("TRUNCATE"):
        statement = "DELETE FROM audit_log"
    with pytest.raises(Exception) as err:
        log.db.execute(statement)
    assert "append-only" in str(err.value)
    assert log.count() == 4
    assert [r["outcome"] for r in log.query(resource_type="AuditEvent", patient="Patient/client-2")] == ["4"]


def test_reason_codes_and_disclosed__what_the_console_and_the_cli_show():
    from fhir_kap.storage.auditlog import disclosed, reason_codes

    r4 = {
        "outcomeDesc": "denied: outside-period, Recipient Not Named",
        "entity": [{"what": {"reference": "Patient/p1"}}, {"what": {"reference": "Communication/n1"}}],
    }
    assert reason_codes(r4) == ["outside-period"]  # code-shaped words only, never free text
    assert disclosed(r4) == "Communication/n1"
    r5 = {"outcome": {"detail": [{"text": "permitted"}]}, "target": [{"reference": "Consent/c1"}]}
    assert reason_codes(r5) == ["permitted"] and disclosed(r5) is None
    assert reason_codes({}) == [] and reason_codes({"outcome": {"detail": "x"}}) == []
