"""The consent context store finds Consents as EHRs write them: the client named by identifier
(logical reference) or by a contained Patient, on SQLite and PostgreSQL."""

from __future__ import annotations

import copy
import json
from datetime import date
from pathlib import Path

import pytest

from fhir_kap.consent import ConsentGate, Recipient
from fhir_kap.errors import InputError
from fhir_kap.storage.context import ConsentContext

DATA = Path(__file__).resolve().parents[1] / "data" / "consent"
MRN = "urn:oid:1.2.840.114350.1.13.0.1.7.5.737384.14"
TH = Recipient.parse("Practitioner/th-001")
ON = date(2024, 5, 1)


def load(name: str) -> dict:
    return json.loads((DATA / f"{name}.json").read_text())


@pytest.fixture
def context(db):
    from fhir_kap.storage.outbox import Outbox

    Outbox(db, clock=lambda: 0.0)  # applies the outbox migrations that create outbox_context
    ctx = ConsentContext(db, clock=lambda: 0.0)
    for name in (
        "Practitioner-th-001",
        "Organization-practice-a",
        "ehr/Patient-client-001",
        "ehr/Patient-client-002",
    ):
        ctx.put(load(name))
    return ctx


def _ids(resources: list[dict]) -> list[tuple[str, str]]:
    return [(r["resourceType"], r["id"]) for r in resources]


@pytest.mark.parametrize(
    "consent", ["ehr/r4-consent-ehr-logical", "ehr/r4-consent-ehr-contained", "ehr/r5-consent-ehr-contained"]
)
def test_a_consent_naming_the_client_by_identifier_is_found_for_that_client_only(context, consent):
    context.put(load(consent))
    mine = context.for_patient("Patient/client-001")
    assert ("Consent", load(consent)["id"]) in _ids(mine)
    assert "Consent" not in {r["resourceType"] for r in context.for_patient("Patient/client-002")}
    assert "Consent" not in {r["resourceType"] for r in context.for_patient("Patient/unknown")}
    gate = ConsentGate(mine)
    assert gate.decide(load("Procedure-session-dates"), TH, "COC", ON).permit


def test_a_literal_consent_is_found_as_before_and_a_versioned_reference_finds_it(context):
    context.put(load("r4-consent-main"))
    assert ("Consent", "con-r4") in _ids(context.for_patient("Patient/client-001"))
    assert ("Consent", "con-r4") in _ids(context.for_patient("Patient/client-001/_history/2"))


def test_every_patient_carrying_a_named_identifier_comes_along_so_the_gate_sees_the_ambiguity(context):
    context.put(load("ehr/Patient-client-009-same-mrn"))
    context.put(load("ehr/r4-consent-ehr-logical"))
    for client in ("Patient/client-001", "Patient/client-009"):
        got = context.for_patient(client)
        assert {("Patient", "client-001"), ("Patient", "client-009")} <= set(_ids(got))
        subject = dict(load("Procedure-session-dates"), subject={"reference": client})
        assert not ConsentGate(got).decide(subject, TH, "TREAT", ON).permit


def test_a_patient_stored_before_identifiers_were_indexed_is_still_seen(context, db):
    context.put(load("ehr/Patient-client-009-same-mrn"))
    with db.transaction() as tx:  # as the code before this change stored it
        tx.execute("UPDATE outbox_context SET ident = NULL WHERE type = 'Patient'")
    context.put(load("ehr/r4-consent-ehr-logical"))
    got = context.for_patient("Patient/client-001")
    assert {("Patient", "client-001"), ("Patient", "client-009")} <= set(_ids(got))


def test_a_consent_reposted_with_the_client_named_another_way_replaces_the_old_copy(context):
    """A revocation must not sit beside the active copy because the EHR named the client differently."""
    first = dict(
        load("ehr/r4-consent-ehr-logical"), id="srv-1", identifier=[{"system": "urn:c", "value": "1"}]
    )
    context.put(first)
    revoked = copy.deepcopy(load("ehr/r4-consent-ehr-contained"))
    revoked.update(id="srv-2", status="inactive", identifier=[{"system": "urn:c", "value": "1"}])
    context.put(revoked)
    consents = [r for r in context.for_patient("Patient/client-001") if r["resourceType"] == "Consent"]
    assert [(c["id"], c["status"]) for c in consents] == [("srv-2", "inactive")]
    literal = dict(load("r4-consent-main"), id="srv-3", identifier=[{"system": "urn:c", "value": "1"}])
    literal["dateTime"] = "2099-01-01"  # signed after the revocation: revocation is monotonic
    context.put(literal)
    consents = [r for r in context.for_patient("Patient/client-001") if r["resourceType"] == "Consent"]
    assert [c["id"] for c in consents] == ["srv-3"]


def test_same_business_identifier_for_another_client_replaces_nothing(context):
    mine = dict(
        load("ehr/r4-consent-ehr-logical"), id="srv-1", identifier=[{"system": "urn:c", "value": "1"}]
    )
    theirs = copy.deepcopy(mine)
    theirs.update(id="srv-2", patient={"type": "Patient", "identifier": {"system": MRN, "value": "E4000456"}})
    context.put(mine)
    context.put(theirs)
    assert ("Consent", "srv-1") in _ids(context.for_patient("Patient/client-001"))
    assert ("Consent", "srv-2") in _ids(context.for_patient("Patient/client-002"))


@pytest.mark.parametrize(
    "patient",
    [
        {"display": "Alex Doe"},
        {"reference": "#pt"},  # a contained Patient without identifier
        {"type": "Organization", "identifier": {"system": MRN, "value": "E4000123"}},
    ],
)
def test_a_consent_whose_client_nothing_names_is_refused(context, patient):
    consent = load("ehr/r4-consent-ehr-contained-no-identifier")
    consent["patient"] = patient
    with pytest.raises(InputError) as exc:
        context.put(consent)
    assert exc.value.issues[0].rule == "outbox:context-patient"


def test_identifier_values_with_like_wildcards_match_only_themselves(context):
    odd = {"resourceType": "Patient", "id": "odd", "identifier": [{"system": "urn:x", "value": "A_%,|!"}]}
    near = {"resourceType": "Patient", "id": "near", "identifier": [{"system": "urn:x", "value": "AB%,|!"}]}
    context.put(odd)
    context.put(near)
    consent = dict(load("r4-consent-main"), id="odd-consent")
    consent["patient"] = {"identifier": {"system": "urn:x", "value": "A_%,|!"}}
    context.put(consent)
    assert ("Consent", "odd-consent") in _ids(context.for_patient("Patient/odd"))
    assert ("Consent", "odd-consent") not in _ids(context.for_patient("Patient/near"))
