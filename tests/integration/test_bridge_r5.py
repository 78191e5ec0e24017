"""A bridge deployed for FHIR R5: R5 resources in, R5 Tasks out, R4 shapes refused, the same isolation."""

from __future__ import annotations

import pytest

from fhir_kap.config import Release
from fhir_kap.records.mapping import Mapper
from fhir_kap.validation import Validator
from testkit.bridge import is_outcome, load


def _as_r5(name: str) -> dict:
    """An R4 fixture as R5, through its KAP record (the mappings run both ways for both releases)."""
    mapper = Mapper.load()
    return mapper.to_fhir(mapper.from_fhir(load(name), Release.R4), Release.R5)


pytestmark = pytest.mark.bridge(fhir_version="R5", consent=_as_r5("Consent-open-ended.json"))


def test_an_r5_note_is_stored_and_readable_by_its_consented_recipient_only(bridge):
    note = _as_r5("Example-Communication-note-1.json")
    assert "contentAttachment" in note["payload"][0]  # really the R5 shape
    resp = bridge.post("clinic", "/fhir/Communication", note)
    assert resp.status_code == 201, resp.get_data(as_text=True)
    rid = resp.get_json(force=True)["id"]
    read = bridge.get("a", f"/fhir/Communication/{rid}")
    assert read.status_code == 200 and Validator.load(Release.R5).validate(read.get_json(force=True)) == []
    assert bridge.get("a", "/fhir/Communication?patient=client-1").get_json(force=True)["total"] == 1
    other = bridge.get("b", f"/fhir/Communication/{rid}")
    assert other.status_code == 404 and is_outcome(other)


def test_an_r4_shaped_note_is_refused_naming_the_r4_element(bridge):
    resp = bridge.post("clinic", "/fhir/Communication", load("Example-Communication-note-1.json"))
    assert resp.status_code == 422 and is_outcome(resp)
    issue = resp.get_json(force=True)["issue"][0]
    assert "contentString" in issue["details"]["text"] and "R5" in issue["details"]["text"]
    assert bridge.get("clinic", "/fhir/Communication").get_json(force=True)["total"] == 0  # nothing stored


def test_the_referral_loop_writes_r5_tasks(bridge):
    referral = bridge.post("a", "/fhir/ServiceRequest", _as_r5("Example-ServiceRequest-referral-1.json"))
    assert referral.status_code == 201, referral.get_data(as_text=True)
    sid = referral.get_json(force=True)["id"]
    moved = bridge.client.post(
        f"/kap/referrals/{sid}/status",
        json={"status": "declined", "reason": "capacity"},
        headers={"Authorization": f"Bearer {bridge.tokens['clinic']}"},
    )
    assert moved.status_code == 200 and moved.get_json()["businessStatus"] == "declined"
    found = bridge.get("a", f"/fhir/Task?based-on=ServiceRequest/{sid}").get_json(force=True)
    task = found["entry"][0]["resource"]
    assert task["statusReason"]["concept"]["coding"][0]["code"] == "capacity"  # R5: a CodeableReference
    assert Validator.load(Release.R5).validate(task) == []
