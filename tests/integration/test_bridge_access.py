"""Partner isolation: a practice reads what it sent, and what is addressed to it and permitted by consent."""

from __future__ import annotations

import itertools
import json

import pytest

from testkit.bridge import is_outcome, load, make_bridge

pytestmark = pytest.mark.bridge(consent="Consent-open-ended.json")


_SERIAL = itertools.count()


def _clinic_note(bridge, recipient: str, category: str = "session-dates") -> str:
    note = load("Example-Communication-note-1.json")
    note["identifier"][0]["value"] = f"note-{next(_SERIAL)}"  # a note of its own, not a resend
    note["recipient"] = [{"reference": recipient}]
    note["category"][0]["coding"][0]["code"] = category
    resp = bridge.post("clinic", "/fhir/Communication", note)
    assert resp.status_code == 201, resp.get_data(as_text=True)
    return resp.get_json(force=True)["id"]


def _audit(bridge) -> list[dict]:
    return bridge.app.extensions["fhir_kap"].audit.query("AuditEvent", limit=1000)


def test_addressed_and_consented_note_is_readable_and_the_read_audited(bridge):
    rid = _clinic_note(bridge, "Practitioner/ref-therapist")
    resp = bridge.get("a", f"/fhir/Communication/{rid}")
    assert resp.status_code == 200
    assert len(_audit(bridge)) == 1
    found = bridge.get("a", "/fhir/Communication?patient=client-1").get_json(force=True)
    assert [e["resource"]["id"] for e in found["entry"]] == [rid]


def test_note_addressed_by_npi_of_a_stored_practitioner_is_readable(bridge):
    prac = bridge.post("clinic", "/fhir/Practitioner", load("Example-Practitioner-ref-therapist.json"))
    pid = prac.get_json(force=True)["id"]
    consent = load("Consent-open-ended.json")
    consent["provision"]["actor"][0]["reference"]["reference"] = f"Practitioner/{pid}"
    bridge.post("clinic", "/fhir/Consent", consent)
    _, token = bridge.app.extensions["fhir_kap"].partners.add("npi-only", npis=["1234567893"])
    rid = _clinic_note(bridge, f"Practitioner/{pid}")
    resp = bridge.client.get(f"/fhir/Communication/{rid}", headers={"Authorization": f"Bearer {token}"})
    assert resp.status_code == 200


@pytest.mark.parametrize("how", ["id", "search", "search-by-id", "history", "vread", "guess"])
def test_practice_b_can_never_read_practice_as_note_and_gets_the_nonexistent_answer(bridge, how):
    rid = _clinic_note(bridge, "Practitioner/ref-therapist")
    ghost = "0" * 32
    if how == "search":
        body = bridge.get("b", "/fhir/Communication?patient=client-1").get_json(force=True)
        assert body["total"] == 0 and not body.get("entry")
        return
    if how == "search-by-id":
        body = bridge.get("b", f"/fhir/Communication?_id={rid}").get_json(force=True)
        assert body["total"] == 0
        return
    suffix = {"id": "", "history": "/_history", "vread": "/_history/1", "guess": ""}[how]
    target = ghost if how == "guess" else rid
    real = bridge.get("b", f"/fhir/Communication/{target}{suffix}")
    missing = bridge.get("b", f"/fhir/Communication/{ghost}{suffix}")
    assert real.status_code == missing.status_code == 404 and is_outcome(real)
    assert real.get_data(as_text=True).replace(target, "ID") == missing.get_data(as_text=True).replace(
        ghost, "ID"
    )


def test_an_expired_consent_hides_the_note_and_the_denial_is_audited(tmp_path):
    bridge = make_bridge(tmp_path)
    bridge.post("clinic", "/fhir/Consent", load("Consent-expired.json"))
    rid = _clinic_note(bridge, "Practitioner/ref-therapist")
    resp = bridge.get("a", f"/fhir/Communication/{rid}")
    assert resp.status_code == 404
    events = _audit(bridge)
    assert len(events) == 1 and events[0]["outcome"] != "0"


def test_a_category_the_consent_does_not_permit_stays_hidden(bridge):
    consent = load("Consent-open-ended.json")
    allowed = {c["code"] for c in consent["provision"]["code"][0]["coding"]} | {
        c["coding"][0]["code"] for c in consent["provision"]["code"]
    }
    assert "safety" not in allowed
    rid = _clinic_note(bridge, "Practitioner/ref-therapist", category="safety")
    assert bridge.get("a", f"/fhir/Communication/{rid}").status_code == 404


def test_what_a_practice_sent_itself_stays_readable_to_it_only(bridge):
    created = bridge.post("a", "/fhir/ServiceRequest", load("Example-ServiceRequest-referral-1.json"))
    rid = created.get_json(force=True)["id"]
    assert bridge.get("a", f"/fhir/ServiceRequest/{rid}").status_code == 200
    assert bridge.get("b", f"/fhir/ServiceRequest/{rid}").status_code == 404
    assert bridge.get("clinic", f"/fhir/ServiceRequest/{rid}").status_code == 200


def test_search_totals_count_only_visible_resources(bridge):
    _clinic_note(bridge, "Practitioner/ref-therapist")
    _clinic_note(bridge, "Practitioner/other-therapist")
    a = bridge.get("a", "/fhir/Communication").get_json(force=True)
    b = bridge.get("b", "/fhir/Communication").get_json(force=True)
    clinic = bridge.get("clinic", "/fhir/Communication").get_json(force=True)
    assert (a["total"], b["total"], clinic["total"]) == (1, 0, 2)
    assert json.dumps(a).count("other-therapist") == 0


def test_a_search_audits_the_page_it_discloses_not_every_match(bridge):
    for _ in range(3):
        _clinic_note(bridge, "Practitioner/ref-therapist")
    page = bridge.get("a", "/fhir/Communication?patient=client-1&_count=1").get_json(force=True)
    assert page["total"] == 3 and len(page["entry"]) == 1
    events = _audit(bridge)
    assert len(events) == 1 and events[0]["outcome"] == "0"  # one permit: the one note sent
