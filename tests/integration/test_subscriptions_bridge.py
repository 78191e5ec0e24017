"""Topic-based Subscriptions over the bridge app (R4 backport and R5): CRUD of a partner's own,
isolation (by id, search, guessing), validation errors naming the field, endpoint rules (only at
an origin the operator registered for the partner), events numbered in the write's transaction
and replayed by $events with the consent gate asked again."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest

from testkit.bridge import FHIR, is_outcome, make_bridge
from testkit.subscriptions import FIXTURE_ORIGIN, fixture, register_origin, status_of, sub

NOTE_TOPIC = "http://fhir-kap.example/SubscriptionTopic/continuity-note-available"
REFERRAL_TOPIC = "http://fhir-kap.example/SubscriptionTopic/referral-status-changed"
BACKPORT = "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/"


@pytest.fixture(params=["R4", "R5"])
def release(request: pytest.FixtureRequest) -> str:
    return request.param


def _registered(bridge):
    """The operator registered the fixtures' receiver for both practices."""
    for name in ("practice-a", "practice-b"):
        register_origin(bridge.app, name, FIXTURE_ORIGIN)
    return bridge


@pytest.fixture
def b(tmp_path, release):
    return _registered(make_bridge(tmp_path, fhir_version=release))


def _create(bridge, who: str, body: dict[str, Any]) -> dict[str, Any]:
    resp = bridge.post(who, "/fhir/Subscription", body)
    assert resp.status_code == 201, resp.get_data(as_text=True)
    return resp.get_json()


def _events(bridge, who: str, sid: str, query: str = "") -> dict[str, Any]:
    resp = bridge.get(who, f"/fhir/Subscription/{sid}/$events{query}")
    assert resp.status_code == 200, resp.get_data(as_text=True)
    return resp.get_json()


# ---- CRUD and isolation


def test_a_partner_creates_reads_searches_and_deletes_its_own_subscription(b, release):
    created = _create(b, "a", sub(release, "note"))
    sid = created["id"]
    assert created["status"] == "requested"  # no handshake sent: this app does not notify
    assert (created.get("criteria") or created.get("topic")) == NOTE_TOPIC
    read = b.get("a", f"/fhir/Subscription/{sid}")
    assert read.status_code == 200 and read.get_json() == created and read.headers["ETag"] == 'W/"1"'
    found = b.get("a", "/fhir/Subscription").get_json()
    assert [e["resource"]["id"] for e in found["entry"]] == [sid] and found["type"] == "searchset"
    assert b.get("a", "/fhir/Subscription?status=active").get_json()["entry"] == []
    assert b.client.delete(f"/fhir/Subscription/{sid}", headers=b.h("a")).status_code == 204
    assert b.get("a", f"/fhir/Subscription/{sid}").status_code == 404


def test_update_replaces_the_subscription_and_asks_for_a_new_handshake(b, release):
    created = _create(b, "a", sub(release, "note"))
    changed = dict(sub(release, "note"), id=created["id"], reason="changed")
    resp = b.client.put(
        f"/fhir/Subscription/{created['id']}",
        data=json.dumps(changed),
        headers=b.h("a", **{"Content-Type": FHIR, "If-Match": 'W/"1"'}),
    )
    assert resp.status_code == 200, resp.get_data(as_text=True)
    assert resp.get_json()["reason"] == "changed" and resp.get_json()["meta"]["versionId"] == "2"
    stale = b.client.put(
        f"/fhir/Subscription/{created['id']}",
        data=json.dumps(changed),
        headers=b.h("a", **{"Content-Type": FHIR, "If-Match": 'W/"1"'}),
    )
    assert stale.status_code == 412 and is_outcome(stale)


def test_another_partners_subscription_is_answered_like_one_that_does_not_exist(b, release):
    sid = _create(b, "a", sub(release, "note"))["id"]
    missing = b.get("b", "/fhir/Subscription/no-such-subscription")
    for method, path in [
        ("GET", f"/fhir/Subscription/{sid}"),
        ("DELETE", f"/fhir/Subscription/{sid}"),
        ("GET", f"/fhir/Subscription/{sid}/$status"),
        ("GET", f"/fhir/Subscription/{sid}/$events"),
        ("POST", f"/fhir/Subscription/{sid}/$events"),
    ]:
        resp = b.client.open(path, method=method, headers=b.h("b"))
        assert resp.status_code == 404, (method, path)
        assert resp.get_json()["issue"][0]["details"]["text"].replace(sid, "X") == missing.get_json()[
            "issue"
        ][0]["details"]["text"].replace("no-such-subscription", "X")
    put = b.client.put(
        f"/fhir/Subscription/{sid}",
        data=json.dumps(dict(sub(release, "note"), id=sid)),
        headers=b.h("b", **{"Content-Type": FHIR}),
    )
    assert put.status_code == 404
    assert b.get("b", "/fhir/Subscription").get_json()["entry"] == []
    assert b.get("b", f"/fhir/Subscription?_id={sid}").get_json()["entry"] == []
    assert b.get("b", f"/fhir/Subscription/$status?id={sid}").get_json()["entry"] == []
    assert b.get("a", f"/fhir/Subscription/{sid}").status_code == 200  # still there for its owner


@pytest.mark.parametrize("guess", ["1", "0001", "subscription-1", "a" * 64, "..", "x" * 65])
def test_guessing_subscription_ids_finds_nothing(b, release, guess):
    _create(b, "a", sub(release, "note"))
    resp = b.get("b", f"/fhir/Subscription/{guess}")
    assert resp.status_code in (400, 404) and is_outcome(resp)


def test_subscription_routes_win_over_the_generic_fhir_routes(b, release):
    assert b.get("a", "/fhir/Subscription").status_code == 200  # not the catch-all's 404
    patch = b.client.patch("/fhir/Subscription/x", headers=b.h("a"))
    assert patch.status_code == 405 and "PUT" in patch.headers["Allow"] and is_outcome(patch)


def test_without_a_token_nothing_is_answered(b, release):
    assert b.client.get("/fhir/Subscription").status_code == 401
    assert b.client.post("/fhir/Subscription", data=json.dumps(sub(release, "note"))).status_code == 401


# ---- validation


def _field(resp) -> tuple[int, str, str]:
    issue = resp.get_json()["issue"][0]
    rule = next(e["valueString"] for e in issue.get("extension", []) if e["url"].endswith("rule"))
    return resp.status_code, (issue.get("expression") or [""])[0], rule


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda s, r: s.update(status="active"), (400, "Subscription.status", "subscription:status")),
        (
            lambda s, r: s.update(
                {"criteria" if r == "R4" else "topic": "http://example.org/SubscriptionTopic/x"}
            ),
            (400, "Subscription.criteria|Subscription.topic", "subscription:topic"),
        ),
        (
            lambda s, r: (
                s["channel"].update(endpoint="http://practice-a.example/hook")
                if r == "R4"
                else s.update(endpoint="http://practice-a.example/hook")
            ),
            (400, "Subscription.channel.endpoint|Subscription.endpoint", "subscription:endpoint-https"),
        ),
        (
            lambda s, r: (
                s["channel"].update(endpoint="https://user:pw@practice-a.example/hook")
                if r == "R4"
                else s.update(endpoint="https://user:pw@practice-a.example/hook")
            ),
            (400, "Subscription.channel.endpoint|Subscription.endpoint", "subscription:endpoint"),
        ),
        (
            lambda s, r: (
                s["_criteria"]["extension"][0].update(valueString="Communication?sender=Practitioner/x")
                if r == "R4"
                else s["filterBy"][0].update(filterParameter="sender")
            ),
            (
                400,
                "Subscription.criteria.extension[0]|Subscription.filterBy[0].filterParameter",
                "subscription:filter",
            ),
        ),
        (
            lambda s, r: (
                s["_criteria"]["extension"][0].update(valueString="Communication?patient=Patient/x\u202e1")
                if r == "R4"
                else s["filterBy"][0].update(value="Patient/x\u202e1")
            ),
            (400, None, "subscription:filter"),  # a control character (R5: the validator may say it first)
        ),
        (
            lambda s, r: (
                s["_criteria"]["extension"][0].update(
                    valueString="Communication?patient=" + ",".join(f"Patient/p{i}" for i in range(51))
                )
                if r == "R4"
                else s["filterBy"][0].update(value=",".join(f"Patient/p{i}" for i in range(51)))
            ),
            (400, None, "subscription:filter"),  # more than MAX_FILTER_VALUES alternatives
        ),
        (
            lambda s, r: (
                s["channel"].update(type="websocket")
                if r == "R4"
                else s["channelType"].update(code="websocket")
            ),
            (400, "Subscription.channel.type|Subscription.channelType", "subscription:channel-type"),
        ),
        (
            lambda s, r: (
                s["channel"]["_payload"]["extension"][0].update(valueCode="everything")
                if r == "R4"
                else s.update(content="everything")
            ),
            (None, None, None),  # R5: the validator's required binding (422); R4: ours (400)
        ),
    ],
)
def test_an_invalid_subscription_is_a_4xx_operation_outcome_naming_the_field(b, release, change, expected):
    body = copy.deepcopy(sub(release, "note"))
    change(body, release)
    resp = b.post("a", "/fhir/Subscription", body)
    assert 400 <= resp.status_code < 500 and is_outcome(resp), resp.get_data(as_text=True)
    status, expression, rule = _field(resp)
    if expected[0] is not None:
        assert status == expected[0]
        if expected[1] is not None:
            assert expression in expected[1].split("|")
        assert rule == expected[2]
    else:
        assert "content" in expression or "payload" in expression
    assert b.get("a", "/fhir/Subscription").get_json()["entry"] == []  # nothing was stored


def test_a_subscription_breaking_base_fhir_is_422_from_the_validator(b, release):
    body = sub(release, "note")
    body["heartbeatPeriod" if release == "R5" else "reason"] = {"not": "valid"}
    resp = b.post("a", "/fhir/Subscription", body)
    assert resp.status_code == 422 and is_outcome(resp)


@pytest.mark.parametrize(
    "url", ["http://127.0.0.1:9/hook", "http://localhost/hook", "http://[::1]:8080/hook"]
)
def test_http_is_accepted_only_to_a_loopback_receiver(b, release, url):
    body = sub(release, "note")
    if release == "R4":
        body["channel"]["endpoint"] = url
    else:
        body["endpoint"] = url
    register_origin(b.app, "practice-a", url)
    assert b.post("a", "/fhir/Subscription", body).status_code == 201


# ---- endpoints only where the operator registered them (the trust boundary)


def _with_endpoint(release: str, url: str) -> dict[str, Any]:
    body = sub(release, "note")
    if release == "R4":
        body["channel"]["endpoint"] = url
    else:
        body["endpoint"] = url
    return body


@pytest.mark.parametrize(
    "url",
    [
        "https://elsewhere.example/fhir/notify",  # another host
        "https://practice-a.example:8443/fhir/notify",  # the same host, another port
        "https://hooks.practice-a.example/fhir/notify",  # a subdomain is another host
        "https://practice-a.example.attacker.example/fhir/notify",
        "https://10.0.0.7/admin",  # an internal address
        "http://127.0.0.1:6379/",  # the bridge's own loopback: https-or-loopback passes, not this
        "http://localhost/hook",
    ],
)
def test_an_endpoint_at_an_origin_not_registered_for_the_partner_is_refused(b, release, url):
    resp = b.post("a", "/fhir/Subscription", _with_endpoint(release, url))
    assert resp.status_code == 422 and is_outcome(resp), resp.get_data(as_text=True)
    status, expression, rule = _field(resp)
    assert expression == ("Subscription.channel.endpoint" if release == "R4" else "Subscription.endpoint")
    assert rule == "subscription:endpoint-not-registered"
    assert "operator must register" in resp.get_json()["issue"][0]["details"]["text"]
    assert b.get("a", "/fhir/Subscription").get_json()["entry"] == []  # nothing was stored
    assert b.app.extensions["fhir_kap"].events.subs.of_partner("practice-a") == []


def test_the_same_host_at_another_port_is_another_origin(b, release):
    register_origin(b.app, "practice-a", "https://hooks.example:8443")
    ok = b.post("a", "/fhir/Subscription", _with_endpoint(release, "https://hooks.example:8443/n"))
    assert ok.status_code == 201, ok.get_data(as_text=True)
    for other in ("https://hooks.example/n", "https://hooks.example:9443/n"):
        resp = b.post("a", "/fhir/Subscription", _with_endpoint(release, other))
        assert resp.status_code == 422 and _field(resp)[2] == "subscription:endpoint-not-registered", other


def test_a_registered_origin_matches_whatever_the_case_and_the_default_port(b, release):
    for url in ("https://PRACTICE-A.example/x", "https://practice-a.example:443/y?z=1"):
        assert b.post("a", "/fhir/Subscription", _with_endpoint(release, url)).status_code == 201, url


def test_another_partners_registration_is_not_this_ones(b, release):
    register_origin(b.app, "practice-b", "https://practice-b.example")
    resp = b.post("a", "/fhir/Subscription", _with_endpoint(release, "https://practice-b.example/n"))
    assert resp.status_code == 422 and _field(resp)[2] == "subscription:endpoint-not-registered"
    assert (
        b.post("b", "/fhir/Subscription", _with_endpoint(release, "https://practice-b.example/n")).status_code
        == 201
    )


def test_the_partners_webhook_origin_is_registered(tmp_path, release):
    b = make_bridge(
        tmp_path,
        fhir_version=release,
        partners={
            "c": (
                "practice-c",
                "system/*.*",
                {
                    "references": ["Organization/practice-c"],
                    "webhook_url": "https://hooks.practice-c.example/kap",
                },
            )
        },
    )
    ok = b.post("c", "/fhir/Subscription", _with_endpoint(release, "https://hooks.practice-c.example/fhir"))
    assert ok.status_code == 201, ok.get_data(as_text=True)
    resp = b.post(
        "c", "/fhir/Subscription", _with_endpoint(release, "https://hooks.practice-c.example:444/x")
    )
    assert resp.status_code == 422 and _field(resp)[2] == "subscription:endpoint-not-registered"


def test_https_or_loopback_still_holds_for_a_registered_origin(b, release):
    register_origin(b.app, "practice-a", "http://practice-a.example")
    resp = b.post("a", "/fhir/Subscription", _with_endpoint(release, "http://practice-a.example/hook"))
    assert resp.status_code == 400 and _field(resp)[2] == "subscription:endpoint-https"


def test_an_endpoint_must_be_printable_ascii(b, release):
    """What the origin check reads is what the sender connects to: no characters URL parsers
    drop or keep differently (whitespace is already refused by base FHIR's url type: 422)."""
    for url, expected in (
        ("https://practice-a.example/é", (400, "subscription:endpoint")),
        ("https://practice-a.example/a b", (422, None)),
        ("https://practice-a.ex\tample/x", (422, None)),
    ):
        resp = b.post("a", "/fhir/Subscription", _with_endpoint(release, url))
        assert resp.status_code == expected[0] and is_outcome(resp), url
        if expected[1]:
            assert _field(resp)[2] == expected[1]
    assert b.get("a", "/fhir/Subscription").get_json()["entry"] == []


def test_an_update_to_an_unregistered_endpoint_is_refused_and_changes_nothing(b, release):
    created = _create(b, "a", sub(release, "note"))
    body = _with_endpoint(release, "https://elsewhere.example/n")
    body["id"] = created["id"]
    resp = b.client.put(
        f"/fhir/Subscription/{created['id']}",
        data=json.dumps(body),
        headers=b.h("a", **{"Content-Type": FHIR}),
    )
    assert resp.status_code == 422 and _field(resp)[2] == "subscription:endpoint-not-registered"
    assert b.get("a", f"/fhir/Subscription/{created['id']}").get_json() == created


def test_a_removed_registration_refuses_the_next_create_at_once(b, release):
    """Read afresh on each create: the bridge's 5 s authentication cache does not delay it."""
    from fhir_kap.storage.partners import Partners

    _create(b, "a", sub(release, "note"))
    elsewhere = Partners(b.app.extensions["fhir_kap"].partners.db)  # as `fhir-kap partners` would
    elsewhere.set_subscription_origins("practice-a", [])
    resp = b.post("a", "/fhir/Subscription", sub(release, "note"))
    assert resp.status_code == 422 and _field(resp)[2] == "subscription:endpoint-not-registered"


# ---- events, $events, $status


def _note(bridge, patient: str = "client-1", release: str = "R4") -> str:
    note = fixture("Example-Communication-note-1.json", release)
    note["subject"] = {"reference": f"Patient/{patient}"}
    note["identifier"][0]["value"] = f"note-{patient}"
    resp = bridge.post("clinic", "/fhir/Communication", note)
    assert resp.status_code == 201, resp.get_data(as_text=True)
    return resp.get_json()["id"]


@pytest.fixture
def consented(tmp_path, release):
    return _registered(
        make_bridge(tmp_path, fhir_version=release, consent=fixture("Consent-open-ended.json", release))
    )


def test_a_note_for_the_subscriber_is_numbered_and_replayed_by_events(consented, release):
    b = consented
    sid = _create(b, "a", sub(release, "note"))["id"]
    other = _create(b, "b", sub(release, "note"))["id"]  # practice-b: the note is not addressed to it
    nid = _note(b, release=release)
    _note(b, patient="client-2", release=release)  # filtered out: another patient
    bundle = _events(b, "a", sid)
    assert bundle["type"] == ("history" if release == "R4" else "subscription-notification")
    st = status_of(bundle, release)
    assert st["type"] == "query-event" and st["since"] == "1"
    assert st["events"] == [("1", f"http://bridge.test/fhir/Communication/{nid}")]
    assert [e["fullUrl"] for e in bundle["entry"][1:]] == [f"http://bridge.test/fhir/Communication/{nid}"]
    assert "resource" not in bundle["entry"][1]  # id-only
    assert status_of(_events(b, "b", other), release)["events"] == []


def test_a_stored_subscription_that_no_longer_parses_fails_no_write_and_hears_nothing(consented, release):
    b = consented
    broken = _create(b, "a", sub(release, "note"))["id"]
    fine = _create(b, "a", sub(release, "note"))["id"]
    with b.app.extensions["fhir_kap"].db.transaction() as tx:  # e.g. a limit lowered since
        tx.execute(
            "UPDATE subscriptions SET body = ?, version = version + 1 WHERE id = ?",
            (json.dumps({"resourceType": "Subscription", "channelType": 5}), broken),
        )
    _note(b, release=release)  # 201: the clinic's write does not fail for a practice's subscription
    assert status_of(_events(b, "a", fine), release)["events"] != []
    assert b.get("a", f"/fhir/Subscription/{broken}/$events").status_code < 500


def test_a_note_whose_consent_was_revoked_stays_numbered_but_is_never_named(consented, release):
    b = consented
    sid = _create(b, "a", sub(release, "note"))["id"]
    nid = _note(b, release=release)
    assert status_of(_events(b, "a", sid), release)["events"] == [
        ("1", f"http://bridge.test/fhir/Communication/{nid}")
    ]
    # The client refuses the therapist from now on (how a clinic revokes: tests/integration/test_webhooks.py).
    assert (
        b.post("clinic", "/fhir/Consent", fixture("Consent-deny-ref-therapist.json", release)).status_code
        == 201
    )
    for content in ("", "?content=full-resource", "?content=id-only"):
        bundle = _events(b, "a", sid, content)
        assert status_of(bundle, release)["events"] == [("1", None)]
        assert len(bundle["entry"]) == 1 and nid not in json.dumps(bundle)


def test_full_resource_carries_the_note_only_while_consent_permits(consented, release):
    b = consented
    body = sub(release, "note")
    if release == "R4":
        body["channel"]["_payload"]["extension"][0]["valueCode"] = "full-resource"
    else:
        body["content"] = "full-resource"
    sid = _create(b, "a", body)["id"]
    nid = _note(b, release=release)
    bundle = _events(b, "a", sid)
    assert bundle["entry"][1]["resource"]["id"] == nid
    assert status_of(_events(b, "a", sid, "?content=empty"), release)["events"] == [("1", None)]


def test_events_since_and_until_select_a_range(consented, release):
    b = consented
    sid = _create(b, "a", sub(release, "note"))["id"]
    for i in range(3):
        note = fixture("Example-Communication-note-1.json", release)
        note["identifier"][0]["value"] = f"range-{i}"
        assert b.post("clinic", "/fhir/Communication", note).status_code == 201
    numbers = lambda q: [n for n, _ in status_of(_events(b, "a", sid, q), release)["events"]]  # noqa: E731
    assert numbers("") == ["1", "2", "3"]
    assert numbers("?eventsSinceNumber=2") == ["2", "3"]
    assert numbers("?eventsSinceNumber=2&eventsUntilNumber=2") == ["2"]
    assert numbers("?eventsSinceNumber=9") == []
    bad = b.get("a", f"/fhir/Subscription/{sid}/$events?eventsSinceNumber=-1")
    assert bad.status_code == 400 and _field(bad)[1] == "eventsSinceNumber"
    posted = b.post(
        "a",
        f"/fhir/Subscription/{sid}/$events",
        {"resourceType": "Parameters", "parameter": [{"name": "eventsSinceNumber", "valueString": "3"}]},
    )
    assert [n for n, _ in status_of(posted.get_json(), release)["events"]] == ["3"]


def test_status_reports_each_own_subscription(consented, release):
    b = consented
    one = _create(b, "a", sub(release, "note"))["id"]
    two = _create(b, "a", sub(release, "referral"))["id"]
    _note(b, release=release)
    inst = b.get("a", f"/fhir/Subscription/{one}/$status").get_json()
    assert inst["type"] == "searchset" and len(inst["entry"]) == 1
    st = status_of(inst, release)
    assert (st["type"], st["status"], st["since"]) == ("query-status", "requested", "1")
    both = b.get("a", "/fhir/Subscription/$status").get_json()
    assert len(both["entry"]) == 2
    only = b.get("a", f"/fhir/Subscription/$status?id={two}").get_json()
    assert len(only["entry"]) == 1


def test_a_referral_task_is_an_event_for_the_practice_that_sent_it_only(consented, release):
    b = consented
    mine = _create(b, "a", sub(release, "referral"))["id"]
    theirs = _create(b, "b", sub(release, "referral"))["id"]
    ref = b.post("a", "/fhir/ServiceRequest", fixture("Example-ServiceRequest-referral-1.json", release))
    assert ref.status_code == 201, ref.get_data(as_text=True)
    moved = b.client.post(
        f"/kap/referrals/{ref.get_json()['id']}/status", json={"status": "accepted"}, headers=b.h("clinic")
    )
    assert moved.status_code == 200, moved.get_data(as_text=True)
    bundle = _events(b, "a", mine)
    events = status_of(bundle, release)["events"]
    assert [n for n, _ in events] == ["1", "2"] and len({f for _, f in events}) == 1
    assert "/Task/" in events[0][1]
    tasks = [e["resource"] for e in bundle["entry"][1:]]
    assert [t["resourceType"] for t in tasks] == ["Task", "Task"]
    assert status_of(_events(b, "b", theirs), release)["events"] == []


def test_a_withdrawn_referral_is_one_event_for_its_cancelled_task(consented, release):
    b = consented
    sid = _create(b, "a", sub(release, "referral"))["id"]
    sr = b.post("a", "/fhir/ServiceRequest", fixture("Example-ServiceRequest-referral-1.json", release))
    assert sr.status_code == 201, sr.get_data(as_text=True)
    body = sr.get_json()
    withdrawn = {k: v for k, v in body.items() if k != "meta"} | {"status": "revoked"}
    resp = b.client.put(
        f"/fhir/ServiceRequest/{body['id']}",
        data=json.dumps(withdrawn),
        headers={**b.h("a"), "Content-Type": FHIR, "If-Match": 'W/"1"'},
    )
    assert resp.status_code == 200, resp.get_data(as_text=True)
    bundle = _events(b, "a", sid)
    assert [n for n, _ in status_of(bundle, release)["events"]] == ["1", "2"]  # created, cancelled
    assert [e["resource"]["resourceType"] for e in bundle["entry"][1:]] == ["Task", "Task"]


def test_a_task_status_filter_keeps_only_those_moves(consented, release):
    b = consented
    body = sub(release, "referral")
    if release == "R4":
        body["_criteria"] = {
            "extension": [
                {"url": BACKPORT + "backport-filter-criteria", "valueString": "Task?business-status=accepted"}
            ]
        }
    else:
        body["filterBy"] = [{"filterParameter": "business-status", "value": "accepted"}]
    sid = _create(b, "a", body)["id"]
    ref = b.post(
        "a", "/fhir/ServiceRequest", fixture("Example-ServiceRequest-referral-1.json", release)
    ).get_json()
    for status in ("accepted", "scheduled"):
        assert (
            b.client.post(
                f"/kap/referrals/{ref['id']}/status", json={"status": status}, headers=b.h("clinic")
            ).status_code
            == 200
        )
    assert [n for n, _ in status_of(_events(b, "a", sid), release)["events"]] == ["1"]


# ---- topics and the CapabilityStatement


def test_the_capability_statement_advertises_the_topics(b, release):
    cs = b.client.get("/fhir/metadata").get_json()
    entry = next(r for r in cs["rest"][0]["resource"] if r["type"] == "Subscription")
    assert {o["name"] for o in entry["operation"]} == {"status", "events"}
    if release == "R4":
        canon = {
            e["valueCanonical"]
            for e in entry["extension"]
            if e["url"].endswith("subscriptiontopic-canonical")
        }
        assert canon == {NOTE_TOPIC, REFERRAL_TOPIC}
        assert b.get("a", "/fhir/SubscriptionTopic").status_code == 404
    else:
        assert any(r["type"] == "SubscriptionTopic" for r in cs["rest"][0]["resource"])
        found = b.get("a", "/fhir/SubscriptionTopic").get_json()
        assert {e["resource"]["url"] for e in found["entry"]} == {NOTE_TOPIC, REFERRAL_TOPIC}
        one = b.get("a", "/fhir/SubscriptionTopic/continuity-note-available")
        assert one.status_code == 200 and one.get_json()["url"] == NOTE_TOPIC
        assert b.get("a", f"/fhir/SubscriptionTopic?url={REFERRAL_TOPIC}").get_json()["entry"][0]["resource"][
            "id"
        ] == ("referral-status-changed")


def test_a_partner_holds_a_bounded_number_of_subscriptions(b, release, monkeypatch):
    from fhir_kap.bridge import subscriptions

    monkeypatch.setattr(subscriptions, "MAX_PER_PARTNER", 2)
    for _ in range(2):
        _create(b, "a", sub(release, "note"))
    resp = b.post("a", "/fhir/Subscription", sub(release, "note"))
    assert resp.status_code == 400 and _field(resp)[2] == "subscription:limit"
    _create(b, "b", sub(release, "note"))  # another partner's count is its own


def test_a_note_corrected_away_from_the_subscriber_is_never_named_nor_handed_out_as_it_was(
    consented, release
):
    """The clinic re-files a note (another client, another recipient): the subscriber's GET says
    404, and so does $events: the event keeps its number, loses its focus, and the old version's
    content is never sent (full-resource sends only what the partner may read now)."""
    b = consented
    body = sub(release, "note")
    if release == "R4":
        body["channel"]["_payload"]["extension"][0]["valueCode"] = "full-resource"
    else:
        body["content"] = "full-resource"
    sid = _create(b, "a", body)["id"]
    nid = _note(b, release=release)
    first = _events(b, "a", sid)
    assert first["entry"][1]["resource"]["id"] == nid  # full-resource while it is readable
    note = b.get("clinic", f"/fhir/Communication/{nid}").get_json()
    moved = dict(
        note,
        subject={"reference": "Patient/client-2"},
        recipient=[{"reference": "Practitioner/other-therapist"}],
    )
    resp = b.client.put(
        f"/fhir/Communication/{nid}",
        data=json.dumps(moved),
        headers=b.h("clinic", **{"Content-Type": FHIR, "If-Match": 'W/"1"'}),
    )
    assert resp.status_code == 200, resp.get_data(as_text=True)
    assert b.get("a", f"/fhir/Communication/{nid}").status_code == 404
    after = _events(b, "a", sid)
    assert status_of(after, release)["events"] == [("1", None)]
    assert len(after["entry"]) == 1  # the status alone: no resource, old or new


@pytest.mark.parametrize("parameter", [5, True, 1.5, "x", {"name": "eventsSinceNumber"}])
def test_events_with_parameters_that_are_no_list_is_400_naming_it(b, release, parameter):
    sid = _create(b, "a", sub(release, "note"))["id"]
    resp = b.post(
        "a", f"/fhir/Subscription/{sid}/$events", {"resourceType": "Parameters", "parameter": parameter}
    )
    assert resp.status_code == 400 and is_outcome(resp)
    assert "Parameters.parameter" in resp.get_data(as_text=True)


@pytest.mark.parametrize(("if_match", "status"), [("yesterday", 400), ('W/"9"', 412)])
def test_a_subscription_update_with_an_unreadable_or_stale_if_match_is_refused(b, release, if_match, status):
    created = _create(b, "a", sub(release, "note"))
    resp = b.client.put(
        f"/fhir/Subscription/{created['id']}",
        data=json.dumps(created),
        headers=b.h("a", **{"Content-Type": FHIR, "If-Match": if_match}),
    )
    assert resp.status_code == status and is_outcome(resp)


def _nested(levels: int) -> dict[str, Any]:
    """An extension nesting `levels` extensions inside each other."""
    ext: dict[str, Any] = {"url": "http://example.org/deep", "valueString": "x"}
    for _ in range(levels):
        ext = {"url": "http://example.org/deep", "extension": [ext]}
    return ext


def test_a_subscription_nested_too_deep_is_refused_and_searches_still_answer(b, release):
    """One depth rule for every write path: a Subscription nesting 125 levels used to be stored
    (201), then break its owner's `GET /fhir/Subscription` with a 500 until it was deleted."""
    deep = dict(sub(release, "note"), extension=[_nested(125)])
    resp = b.post("a", "/fhir/Subscription", deep)
    assert is_outcome(resp) and _field(resp)[0::2] == (400, "fhir:nesting")
    created = _create(b, "a", sub(release, "note"))
    resp = b.client.put(
        f"/fhir/Subscription/{created['id']}",
        data=json.dumps(dict(deep, id=created["id"])),
        headers=b.h("a", **{"Content-Type": FHIR, "If-Match": 'W/"1"'}),
    )
    assert _field(resp)[0::2] == (400, "fhir:nesting")
    found = b.get("a", "/fhir/Subscription")
    assert found.status_code == 200 and [e["resource"]["id"] for e in found.get_json()["entry"]] == [
        created["id"]
    ]
