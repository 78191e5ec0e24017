"""The KAP API and the referral loop: a referral arrives, the clinic moves its Task, the practice sees it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from testkit.bridge import load, make_bridge


def _referral(bridge) -> str:
    resp = bridge.post("a", "/fhir/ServiceRequest", load("Example-ServiceRequest-referral-1.json"))
    assert resp.status_code == 201
    return resp.get_json(force=True)["id"]


def _task(bridge, who: str, sr: str) -> dict:
    bundle = bridge.get(who, f"/fhir/Task?focus=ServiceRequest/{sr}").get_json(force=True)
    assert bundle["total"] == 1
    return bundle["entry"][0]["resource"]


def _move(bridge, sr: str, status: str, reason: str | None = None):
    body = {"status": status} | ({"reason": reason} if reason else {})
    return bridge.client.post(
        f"/kap/referrals/{sr}/status",
        data=json.dumps(body),
        headers=bridge.h("clinic", **{"Content-Type": "application/json"}),
    )


def test_a_new_referral_gets_a_received_task_readable_by_the_referring_practice(bridge):
    sr = _referral(bridge)
    task = _task(bridge, "a", sr)
    assert task["status"] == "received" and task["businessStatus"]["coding"][0]["code"] == "received"
    assert task["focus"] == {"reference": f"ServiceRequest/{sr}"}
    assert task["requester"] == {"reference": "PractitionerRole/ref-therapist-role"}
    assert task["owner"]["identifier"]["value"] == "kap-clinic"
    assert bridge.get("b", f"/fhir/Task?focus=ServiceRequest/{sr}").get_json(force=True)["total"] == 0


def test_full_referral_loop_moves_task_status_in_step(bridge):
    sr = _referral(bridge)
    steps = [
        ("accepted", "accepted"),
        ("scheduled", "accepted"),
        ("in-progress", "in-progress"),
        ("completed", "completed"),
    ]
    for business, fhir_status in steps:
        resp = _move(bridge, sr, business)
        assert resp.status_code == 200, resp.get_data(as_text=True)
        task = _task(bridge, "a", sr)
        assert (task["businessStatus"]["coding"][0]["code"], task["status"]) == (business, fhir_status)
    history = bridge.get("a", f"/fhir/Task/{task['id']}/_history").get_json(force=True)
    assert history["total"] == 5


def test_a_declined_referral_carries_the_reason_code_and_is_final(bridge):
    sr = _referral(bridge)
    assert _move(bridge, sr, "declined", "not-eligible").status_code == 200
    task = _task(bridge, "a", sr)
    assert task["status"] == "rejected" and task["statusReason"]["coding"][0]["code"] == "not-eligible"
    assert "text" not in task["statusReason"]
    again = _move(bridge, sr, "accepted")
    assert again.status_code == 409 and "referral:transition" in again.get_data(as_text=True)


@pytest.mark.parametrize(
    "body,status,rule",
    [
        ({"status": "teleported"}, 400, "referral:status"),
        ({"state": "accepted"}, 400, "referral:body"),
        ({"status": "accepted", "extra": 1}, 400, "referral:body"),
        ({"status": "accepted", "reason": 7}, 400, "referral:reason"),
        ({"status": "declined", "reason": "outside the clinic's criteria"}, 400, "referral:reason"),
    ],
)
def test_bad_status_moves_are_4xx(bridge, body, status, rule):
    sr = _referral(bridge)
    resp = bridge.client.post(
        f"/kap/referrals/{sr}/status",
        data=json.dumps(body),
        headers=bridge.h("clinic", **{"Content-Type": "application/json"}),
    )
    assert resp.status_code == status and rule in resp.get_data(as_text=True)


def test_moving_an_unknown_referral_is_404(bridge):
    assert _move(bridge, "0" * 32, "accepted").status_code == 404


def test_practices_cannot_move_referrals(bridge):
    sr = _referral(bridge)
    resp = bridge.client.post(
        f"/kap/referrals/{sr}/status",
        data=json.dumps({"status": "accepted"}),
        headers=bridge.h("a", **{"Content-Type": "application/json"}),
    )
    assert resp.status_code == 403


def _note_record() -> dict:
    return {
        "record": "note",
        "id": "note-9",
        "referral": "referral-1",
        "status": "completed",
        "category": "session-dates",
        "client": "client-1",
        "sent": "2025-02-02T09:00:00Z",
        "recipients": [{"practitioner": "ref-therapist"}],
        "sender": {"organization": "kap-clinic"},
        "text": "Dosing session completed on 2025-02-01.",
    }


def _post_records(bridge, body: bytes, ctype: str = "application/json"):
    return bridge.client.post(
        "/kap/records", data=body, headers=bridge.h("clinic", **{"Content-Type": ctype})
    )


def test_kap_note_with_consent_is_stored_for_a_practice_without_a_server(bridge):
    bridge.post("clinic", "/fhir/Consent", load("Consent-open-ended.json"))
    resp = _post_records(bridge, json.dumps(_note_record()).encode())
    out = resp.get_json()
    assert resp.status_code == 200, out
    assert out["results"][0]["outcome"] == "stored"
    ref = out["results"][0]["deliveries"][0]["resource"]
    assert bridge.get("a", f"/fhir/{ref}").status_code == 200


def test_kap_note_for_a_practice_with_a_server_is_queued_in_the_outbox(bridge):
    svc = bridge.app.extensions["fhir_kap"]
    svc.partners.revoke("practice-a")
    svc.partners.add(
        "practice-a2",
        references=["Practitioner/ref-therapist"],
        endpoint_url="https://ehr.example/fhir",
        endpoint_auth="bearer:PRACTICE_A_TOKEN",
    )
    bridge.post("clinic", "/fhir/Consent", load("Consent-open-ended.json"))
    out = _post_records(bridge, json.dumps(_note_record()).encode()).get_json()
    assert out["results"][0]["outcome"] == "queued"
    assert svc.outbox.counts().get("pending") == 1


def test_kap_note_without_consent_is_refused_with_reasons(bridge):
    out = _post_records(bridge, json.dumps(_note_record()).encode()).get_json()
    result = out["results"][0]
    assert result["outcome"] == "refused" and result["deliveries"][0]["reasons"]


def test_kap_ndjson_lists_each_record_with_its_outcome(bridge):
    bad = dict(_note_record(), status=5)
    lines = "\n".join(json.dumps(r) for r in (_note_record(), bad)).encode()
    out = _post_records(bridge, lines, "application/x-ndjson").get_json()
    assert [r["item"] for r in out["results"]] == ["line:1", "line:2"]
    assert (
        out["results"][1]["outcome"] == "refused" and out["results"][1]["reasons"][0]["pointer"] == "/status"
    )


@pytest.mark.parametrize(
    "body,ctype,status",
    [(b"{", "application/json", 400), (b"{}", "text/csv", 415), (b"", "application/json", 400)],
)
def test_kap_records_bad_bodies_are_4xx(bridge, body, ctype, status):
    assert _post_records(bridge, body, ctype).status_code == status


def test_kap_records__consents_from_a_partner_that_is_no_consent_authority_are_refused(tmp_path):
    """/kap/records.write alone does not make a partner a source of consent context."""
    from fhir_kap.config import load_settings
    from fhir_kap.storage.db import Database
    from fhir_kap.storage.partners import Partners

    bridge = make_bridge(tmp_path)
    s = load_settings(env={}, data_dir=tmp_path / "data")
    token = Partners(Database(s.db_url)).add("records-only", scopes="kap/records.write")[1]
    result = _post_consent_record(bridge, token)
    assert result["outcome"] == "refused" and result["reasons"][0]["rule"] == "kap:consent-authority"


def _post_consent_record(bridge, token: str) -> dict:
    """POST the example consent record to /kap/records; its one result."""
    consent = json.loads(
        (
            Path(__file__).resolve().parents[2]
            / "profiles"
            / "examples"
            / "records"
            / "consent-consent-0001.json"
        ).read_text()
    )
    resp = bridge.client.post(
        "/kap/records",
        data=json.dumps(consent),
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    return resp.get_json()["results"][0]


def test_kap_records__a_token_without_consent_authority_feeds_no_context(bridge):
    """A SMART access token narrowed to kap/records.write cannot feed the consent gate, even for
    a partner registered as a consent authority: the request's scopes decide, not the registration."""
    import time

    svc = bridge.app.extensions["fhir_kap"]
    partners = svc.partners
    holder, _ = partners.add("authority", scopes="kap/records.write kap/consent-authority")
    narrowed = partners.grant(
        holder, ["kap/records.write"], jti="narrow-1", assertion_expires=time.time() + 60
    )
    result = _post_consent_record(bridge, narrowed)
    assert result["outcome"] == "refused" and result["reasons"][0]["rule"] == "kap:consent-authority"
    assert svc.outbox.context_for("Patient/client-0001") == []  # nothing reached the gate's context


def test_re_posting_the_same_records_changes_nothing(bridge):
    """Records are independent, like a batch Bundle's entries: each is committed with its own
    outcome, so a client whose answer was lost simply posts them again."""
    svc = bridge.app.extensions["fhir_kap"]
    svc.partners.revoke("practice-a")  # the therapist's practice now has a FHIR server of its own
    svc.partners.add(
        "practice-a2",
        references=["Practitioner/ref-therapist"],
        endpoint_url="https://ehr.example/fhir",
        endpoint_auth="bearer:PRACTICE_A_TOKEN",
    )
    bridge.post("clinic", "/fhir/Consent", load("Consent-open-ended.json"))
    session = {
        "record": "session",
        "id": "ses-9",
        "kind": "integration",
        "status": "completed",
        "client": "client-1",
        "referral": "referral-1",
        "start": "2025-02-03T15:00:00Z",
        "end": "2025-02-03T15:50:00Z",
        "performers": ["ref-therapist"],
    }
    body = "\n".join(json.dumps(r) for r in (_note_record(), session)).encode()
    first = _post_records(bridge, body, "application/x-ndjson").get_json()["results"]
    again = _post_records(bridge, body, "application/x-ndjson").get_json()["results"]
    assert [d["outcome"] for d in first[0]["deliveries"]] == ["queued"]
    assert [d["outcome"] for d in again[0]["deliveries"]] == ["already-queued"]
    assert first[1]["outcome"] == again[1]["outcome"] == "stored", first[1]
    assert (
        first[1]["new"] is True and again[1]["new"] is False and first[1]["resource"] == again[1]["resource"]
    )
    assert svc.outbox.counts().get("pending") == 1


def test_a_record_without_a_type_is_refused_without_inventing_one(bridge):
    out = _post_records(bridge, json.dumps({"id": "x-1", "text": "hello"}).encode()).get_json()
    result = out["results"][0]
    assert result["outcome"] == "refused" and result["id"] == "x-1" and "record" not in result


def test_kap_records__a_consent_authority_cannot_put_context_past_its_scope(bridge):
    """A consent authority's Consent posted as a KAP record went straight into the gate's context
    with the record's id, replacing the clinic's `Consent/consent-0001` there (no identifier-owner
    or client-scope check on this path): it could remove a deny or widen a grant for any client.
    Only the clinic's systems feed the context through /kap/records; an authority is pointed to
    the FHIR path, where both checks are made."""
    svc = bridge.app.extensions["fhir_kap"]
    clinic = _post_consent_record(bridge, bridge.tokens["clinic"])
    assert clinic["outcome"] == "context", clinic
    before = svc.outbox.context_for("Patient/client-0001")
    _, token = svc.partners.add("hub", scopes="kap/records.write kap/consent-authority")
    result = _post_consent_record(bridge, token)
    assert result["outcome"] == "refused" and result["reasons"][0]["rule"] == "kap:context-from-clinic"
    assert svc.outbox.context_for("Patient/client-0001") == before  # the clinic's copy, untouched
