"""Issue 15, REST: a partner updates its own resources (the KAP types and parties) over HTTP (`PUT Type/id`
with If-Match, conditional `PUT Type?identifier=`), a Consent's update (a revocation included)
takes effect for reads and the outbox at once, a withdrawn referral cancels its Task, and every
other update or delete is 405 with Allow."""

from __future__ import annotations

import copy
import json
from datetime import UTC, datetime

import pytest

from testkit.bridge import FHIR, is_outcome, load

REFERRAL_ID = "http://fhir-kap.example/sid/referral|referral-1"


def _put(bridge, who: str, path: str, body, **headers: str):
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return bridge.client.put(path, data=data, headers=bridge.h(who, **{"Content-Type": FHIR, **headers}))


def _rule(resp) -> str:
    return resp.get_data(as_text=True)


def _referral(bridge, who: str = "a", **changes) -> dict:
    resp = bridge.post(
        who, "/fhir/ServiceRequest", {**load("Example-ServiceRequest-referral-1.json"), **changes}
    )
    assert resp.status_code == 201, resp.get_data(as_text=True)
    return resp.get_json(force=True)


def _note(bridge) -> str:
    resp = bridge.post("clinic", "/fhir/Communication", load("Example-Communication-note-1.json"))
    assert resp.status_code == 201, resp.get_data(as_text=True)
    return resp.get_json(force=True)["id"]


def test_update_with_if_match__answers_the_new_version_and_history_shows_it(bridge):
    sr = _referral(bridge)
    amended = dict(sr, note=[{"text": "Please call before the intake"}])
    resp = _put(bridge, "a", f"/fhir/ServiceRequest/{sr['id']}", amended, **{"If-Match": 'W/"1"'})
    assert resp.status_code == 200, resp.get_data(as_text=True)
    body = resp.get_json(force=True)
    assert body["meta"]["versionId"] == "2" and resp.headers["ETag"] == 'W/"2"'
    assert body["note"] == [{"text": "Please call before the intake"}]
    assert bridge.get("a", f"/fhir/ServiceRequest/{sr['id']}").get_json(force=True)["note"] == body["note"]
    history = bridge.get("a", f"/fhir/ServiceRequest/{sr['id']}/_history").get_json(force=True)
    assert [(e["request"]["method"], e["resource"]["meta"]["versionId"]) for e in history["entry"]] == [
        ("PUT", "2"),
        ("POST", "1"),
    ]
    assert "note" not in bridge.get("a", f"/fhir/ServiceRequest/{sr['id']}/_history/1").get_json(force=True)


@pytest.mark.parametrize(
    ("if_match", "status", "rule"),
    [
        ('W/"1"', 412, "http:if-match"),  # stale: the resource is at version 2
        (None, 412, "http:if-match-required"),
        ("yesterday", 400, "http:if-match"),
    ],
)
def test_update_needs_the_current_version_in_if_match(bridge, if_match, status, rule):
    sr = _referral(bridge)
    assert (
        _put(bridge, "a", f"/fhir/ServiceRequest/{sr['id']}", sr, **{"If-Match": 'W/"1"'}).status_code == 200
    )
    headers = {"If-Match": if_match} if if_match else {}
    resp = _put(bridge, "a", f"/fhir/ServiceRequest/{sr['id']}", dict(sr, status="on-hold"), **headers)
    assert resp.status_code == status and is_outcome(resp) and rule in _rule(resp)
    assert bridge.get("a", f"/fhir/ServiceRequest/{sr['id']}").get_json(force=True)["status"] == "active"


@pytest.mark.parametrize("body_id", ["some-other-id", None])
def test_update_whose_body_id_is_not_the_url_id_is_400(bridge, body_id):
    sr = _referral(bridge)
    body = {k: v for k, v in sr.items() if k != "id"} | ({"id": body_id} if body_id else {})
    resp = _put(bridge, "a", f"/fhir/ServiceRequest/{sr['id']}", body, **{"If-Match": 'W/"1"'})
    assert resp.status_code == 400 and "http:id-mismatch" in _rule(resp)


def test_another_partners_resource_is_the_same_404_as_one_that_does_not_exist(bridge):
    sr = _referral(bridge)
    as_b = dict(sr, requester={"reference": "Practitioner/other-therapist"})  # what b may write
    theirs = _put(bridge, "b", f"/fhir/ServiceRequest/{sr['id']}", as_b, **{"If-Match": 'W/"1"'})
    absent = _put(
        bridge, "b", "/fhir/ServiceRequest/no-such-id", dict(as_b, id="no-such-id"), **{"If-Match": 'W/"1"'}
    )
    assert theirs.status_code == absent.status_code == 404
    assert theirs.get_json(force=True)["issue"][0]["details"]["text"].replace(
        sr["id"], "X"
    ) == absent.get_json(force=True)["issue"][0]["details"]["text"].replace("no-such-id", "X")
    # the clinic reads every referral, so it is told why it may not change this one
    clinic = _put(bridge, "clinic", f"/fhir/ServiceRequest/{sr['id']}", sr, **{"If-Match": 'W/"1"'})
    assert clinic.status_code == 403 and "bridge:update-owner" in _rule(clinic)
    assert (
        bridge.get("a", f"/fhir/ServiceRequest/{sr['id']}").get_json(force=True)["meta"]["versionId"] == "1"
    )


def test_update_goes_through_the_same_inbound_checks_as_a_create(bridge):
    sr = _referral(bridge)
    bad = _put(
        bridge, "a", f"/fhir/ServiceRequest/{sr['id']}", dict(sr, status="bogus"), **{"If-Match": 'W/"1"'}
    )
    assert bad.status_code in (400, 422) and "binding:required" in _rule(bad)
    # authorship: a practice cannot make another practitioner the referral's requester
    forged = dict(sr, requester={"reference": "Practitioner/other-therapist"})
    resp = _put(bridge, "a", f"/fhir/ServiceRequest/{sr['id']}", forged, **{"If-Match": 'W/"1"'})
    assert resp.status_code == 403 and is_outcome(resp)
    # a reader scope does not write
    assert (
        _put(bridge, "reader", f"/fhir/ServiceRequest/{sr['id']}", sr, **{"If-Match": 'W/"1"'}).status_code
        == 403
    )


def test_conditional_update__updates_the_one_match_creates_on_none_and_412_on_several(bridge):
    sr = _referral(bridge)
    by_identifier = f"/fhir/ServiceRequest?identifier={REFERRAL_ID}"
    resp = _put(
        bridge,
        "a",
        by_identifier,
        {k: v for k, v in sr.items() if k not in ("id", "meta")} | {"priority": "urgent"},
    )
    assert resp.status_code == 200 and resp.get_json(force=True)["id"] == sr["id"]
    assert resp.get_json(force=True)["meta"]["versionId"] == "2"
    # If-Match is honoured when given
    stale = _put(bridge, "a", by_identifier, dict(sr, priority="asap"), **{"If-Match": 'W/"1"'})
    assert stale.status_code == 412
    # another partner's condition never matches practice-a's referral: it creates its own
    new = load("Example-ServiceRequest-referral-1.json")
    new["identifier"] = [{"system": "http://fhir-kap.example/sid/referral", "value": "referral-new"}]
    created = _put(
        bridge, "a", "/fhir/ServiceRequest?identifier=http://fhir-kap.example/sid/referral|referral-new", new
    )
    assert created.status_code == 201 and created.headers["Location"].endswith("/_history/1")
    task = bridge.get("a", f"/fhir/Task?focus=ServiceRequest/{created.get_json(force=True)['id']}")
    assert task.get_json(force=True)["total"] == 1  # a referral created by PUT gets its Task too
    # two of the sender's referrals carry the identifier: the condition is ambiguous
    _referral(bridge, note=[{"text": "a second copy, different content"}])
    several = _put(bridge, "a", by_identifier, dict(sr, priority="stat"))
    assert several.status_code == 412 and "http:conditional-update" in _rule(several)


def test_conditional_update_without_a_condition_is_400(bridge):
    sr = _referral(bridge)
    resp = _put(bridge, "a", "/fhir/ServiceRequest", sr)
    assert resp.status_code == 400 and "http:conditional-update" in _rule(resp)
    assert _put(bridge, "a", "/fhir/ServiceRequest?_count=1", sr).status_code == 400


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [
        ("PUT", "/fhir/Condition/x", "GET, HEAD"),
        ("PUT", "/fhir/Condition", "GET, HEAD, POST"),
        ("PUT", "/fhir/Task/x", "GET, HEAD"),
        ("DELETE", "/fhir/ServiceRequest/x", "GET, HEAD, PUT"),
        ("DELETE", "/fhir/Consent/x", "GET, HEAD, PUT"),
        ("DELETE", "/fhir/Communication/x", "GET, HEAD, PUT"),
        ("PATCH", "/fhir/ServiceRequest/x", "GET, HEAD, PUT"),
    ],
)
def test_updates_of_other_types_and_deletes_are_405_with_allow(bridge, method, path, allow):
    resp = bridge.client.open(path, method=method, data="{}", headers=bridge.h("a", **{"Content-Type": FHIR}))
    assert resp.status_code == 405 and is_outcome(resp)
    assert resp.headers["Allow"] == allow


def test_withdrawing_a_referral_cancels_its_task_and_a_final_task_stays(bridge):
    sr = _referral(bridge)
    resp = _put(
        bridge, "a", f"/fhir/ServiceRequest/{sr['id']}", dict(sr, status="revoked"), **{"If-Match": 'W/"1"'}
    )
    assert resp.status_code == 200, resp.get_data(as_text=True)
    [entry] = bridge.get("a", f"/fhir/Task?focus=ServiceRequest/{sr['id']}").get_json(force=True)["entry"]
    task = entry["resource"]
    assert task["status"] == "cancelled" and task["businessStatus"]["coding"][0]["code"] == "cancelled"
    # a declined referral's Task is final: withdrawing it afterwards leaves the Task alone
    other = _referral(bridge, identifier=[{"system": "http://fhir-kap.example/sid/referral", "value": "r-2"}])
    bridge.app.extensions["fhir_kap"].inbound.referral_status(other["id"], "declined", reason="capacity")
    ok = _put(
        bridge,
        "a",
        f"/fhir/ServiceRequest/{other['id']}",
        dict(other, status="entered-in-error"),
        **{"If-Match": 'W/"1"'},
    )
    assert ok.status_code == 200
    [entry] = bridge.get("a", f"/fhir/Task?focus=ServiceRequest/{other['id']}").get_json(force=True)["entry"]
    assert entry["resource"]["businessStatus"]["coding"][0]["code"] == "declined"


def _queued_note(bridge) -> int:
    svc = bridge.app.extensions["fhir_kap"]
    note = load("Example-Communication-note-1.json")
    item, _ = svc.outbox.enqueue(
        note,
        endpoint="practice-a",
        base_url="http://practice-a.test/fhir",
        recipient_ref="Practitioner/ref-therapist",
        purpose="TREAT",
    )
    return item.id


class _NoClient:
    def __getattr__(self, name):  # pragma: no cover - reached only if the worker tried to send
        raise AssertionError("a held item must not be sent")


@pytest.mark.parametrize("how", ["by-id", "by-identifier"])
def test_revoking_a_consent_by_put__reads_refused_at_once_and_queued_items_held(bridge, how):
    from fhir_kap.exchange.delivery import DeliveryWorker
    from fhir_kap.exchange.outbound import send_time_check

    svc = bridge.app.extensions["fhir_kap"]
    posted = bridge.post("clinic", "/fhir/Consent", load("Consent-open-ended.json"))
    assert posted.status_code == 201
    consent = posted.get_json(force=True)
    rid = _note(bridge)
    check = send_time_check(svc.outbox, svc.audit, svc.release, lambda: datetime.now(UTC))
    item_id = _queued_note(bridge)
    assert bridge.get("a", f"/fhir/Communication/{rid}").status_code == 200
    assert check(svc.outbox.get(item_id))[0] is True

    revoked = dict(copy.deepcopy(consent), status="inactive")
    if how == "by-id":
        resp = _put(bridge, "clinic", f"/fhir/Consent/{consent['id']}", revoked, **{"If-Match": 'W/"1"'})
    else:
        ident = consent["identifier"][0]
        revoked.pop("id")
        resp = _put(bridge, "clinic", f"/fhir/Consent?identifier={ident['system']}|{ident['value']}", revoked)
    assert resp.status_code == 200, resp.get_data(as_text=True)
    assert resp.get_json(force=True)["id"] == consent["id"]  # the same consent, a new version

    assert bridge.get("a", f"/fhir/Communication/{rid}").status_code == 404
    worker = DeliveryWorker(svc.outbox, lambda name: _NoClient(), check, worker_id="w-test")
    stats = worker.run_once()
    item = svc.outbox.get(item_id)
    assert stats.held == 1 and item.state == "held" and item.hold_reason


def test_a_consent_update_that_is_not_a_revocation_applies_at_once_too(bridge):
    posted = bridge.post("clinic", "/fhir/Consent", load("Consent-open-ended.json")).get_json(force=True)
    rid = _note(bridge)
    assert bridge.get("a", f"/fhir/Communication/{rid}").status_code == 200
    narrowed = copy.deepcopy(posted)
    narrowed["provision"]["actor"][0]["reference"] = {"reference": "Practitioner/other-therapist"}
    resp = _put(bridge, "clinic", f"/fhir/Consent/{posted['id']}", narrowed, **{"If-Match": 'W/"1"'})
    assert resp.status_code == 200, resp.get_data(as_text=True)
    assert bridge.get("a", f"/fhir/Communication/{rid}").status_code == 404


def test_a_consent_revoked_by_put_is_not_reactivated_by_an_older_state(bridge):
    posted = bridge.post("clinic", "/fhir/Consent", load("Consent-open-ended.json")).get_json(force=True)
    rid = _note(bridge)
    path = f"/fhir/Consent/{posted['id']}"
    assert (
        _put(bridge, "clinic", path, dict(posted, status="inactive"), **{"If-Match": 'W/"1"'}).status_code
        == 200
    )
    again = _put(bridge, "clinic", path, posted, **{"If-Match": 'W/"2"'})  # the old active copy
    assert again.status_code == 200
    assert bridge.get("a", f"/fhir/Communication/{rid}").status_code == 404
    signed_later = dict(posted, dateTime="2026-06-01")  # a new signature reactivates
    assert _put(bridge, "clinic", path, signed_later, **{"If-Match": 'W/"3"'}).status_code == 200
    assert bridge.get("a", f"/fhir/Communication/{rid}").status_code == 200


def test_a_consent_changed_inside_a_transaction_reaches_the_gate_too(bridge):
    posted = bridge.post("clinic", "/fhir/Consent", load("Consent-open-ended.json")).get_json(force=True)
    rid = _note(bridge)
    ident = posted["identifier"][0]
    revoked = {k: v for k, v in posted.items() if k not in ("id", "meta")} | {"status": "inactive"}
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "resource": revoked,
                "request": {"method": "PUT", "url": f"Consent?identifier={ident['system']}|{ident['value']}"},
            }
        ],
    }
    resp = bridge.post("clinic", "/fhir", bundle)
    assert resp.status_code == 200, resp.get_data(as_text=True)
    assert bridge.get("a", f"/fhir/Communication/{rid}").status_code == 404


class _Recorder:
    """An EventSink that keeps what it is told (the Subscriptions sink's seat)."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str, bool]] = []

    def record(self, tx, accepted) -> int:
        self.seen += [(a.stored.type, a.stored.resource.get("status"), a.updated) for a in accepted]
        return 0


@pytest.mark.parametrize("how", ["put", "transaction"])
def test_subscribers_hear_of_the_update_and_of_the_task_it_cancelled(bridge, monkeypatch, how):
    sr = _referral(bridge)
    recorder = _Recorder()
    monkeypatch.setattr(bridge.app.extensions["fhir_kap"].inbound, "events", recorder)
    withdrawn = {k: v for k, v in sr.items() if k != "meta"} | {"status": "revoked"}
    if how == "put":
        resp = _put(bridge, "a", f"/fhir/ServiceRequest/{sr['id']}", withdrawn, **{"If-Match": 'W/"1"'})
    else:
        entry = {
            "resource": withdrawn,
            "request": {"method": "PUT", "url": f"ServiceRequest?identifier={REFERRAL_ID}"},
        }
        resp = bridge.post("a", "/fhir", {"resourceType": "Bundle", "type": "transaction", "entry": [entry]})
        assert len(resp.get_json(force=True)["entry"]) == 1  # the Task is not an entry of the answer
    assert resp.status_code == 200, resp.get_data(as_text=True)
    assert recorder.seen == [("ServiceRequest", "revoked", True), ("Task", "cancelled", False)]


@pytest.mark.parametrize(
    ("fixture", "change"),
    [
        ("Example-Communication-note-1.json", {"status": "entered-in-error"}),
        ("Procedure-ses-004.json", {"note": [{"text": "Corrected time"}]}),
        ("Example-Patient-client-1.json", {"telecom": [{"system": "phone", "value": "555-0100"}]}),
    ],
)
def test_the_writer_corrects_its_own_note_session_or_party_and_nobody_else_can(bridge, fixture, change):
    from pathlib import Path

    rtype = fixture.split("-")[1] if fixture.startswith("Example-") else fixture.split("-")[0]
    body = (
        load(fixture)
        if fixture.startswith("Example-")
        else json.loads((Path(__file__).parents[1] / "data/fhir/valid/r4" / fixture).read_text())
    )
    posted = bridge.post("clinic", f"/fhir/{rtype}", body)
    assert posted.status_code == 201, posted.get_data(as_text=True)
    current = posted.get_json(force=True)
    path = f"/fhir/{rtype}/{current['id']}"
    for other in ("a", "b"):  # the note's recipient too: it reads the note, it does not own it
        refused = _put(bridge, other, path, dict(current, **change), **{"If-Match": 'W/"1"'})
        # 403 where its author elements name the clinic (authorship), else the same 404 as a
        # resource that does not exist
        assert refused.status_code in (403, 404) and is_outcome(refused)
        assert bridge.get("clinic", path).headers["ETag"] == 'W/"1"'

    resp = _put(bridge, "clinic", path, dict(current, **change), **{"If-Match": 'W/"1"'})
    assert resp.status_code == 200, resp.get_data(as_text=True)
    assert resp.headers["ETag"] == 'W/"2"'
    stored = bridge.get("clinic", path).get_json(force=True)
    assert all(stored[k] == v for k, v in change.items())
    history = bridge.get("clinic", f"{path}/_history").get_json(force=True)
    assert [e["request"]["method"] for e in history["entry"]] == ["PUT", "POST"]


@pytest.mark.parametrize("query", ["identifier=", "identifier=%20", "identifier=&status=active"])
def test_a_condition_with_an_empty_value_is_400_and_creates_nothing(bridge, query):
    before = bridge.get("a", "/fhir/ServiceRequest?_count=0").get_json(force=True)["total"]
    body = load("Example-ServiceRequest-referral-1.json")
    resp = _put(bridge, "a", f"/fhir/ServiceRequest?{query}", body)
    assert resp.status_code == 400 and is_outcome(resp) and "has no value" in _rule(resp)
    posted = bridge.post("a", "/fhir/ServiceRequest", body, **{"If-None-Exist": query})
    assert posted.status_code == 400 and is_outcome(posted)
    assert bridge.get("a", "/fhir/ServiceRequest?_count=0").get_json(force=True)["total"] == before
