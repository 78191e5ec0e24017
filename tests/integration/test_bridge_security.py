"""Fixes from the security review: who may feed the consent gate, what a Task may say, and hostile input.

Consent context comes only from consent authorities (clinic systems, `kap/consent-authority`);
a referral's Task carries no free text; hostile search values, conditions and Bundles give
4xx OperationOutcomes, never a 500; a rest-hook fires only for a recipient the gate lets read.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar

import pytest

from testkit.bridge import FHIR, is_outcome, load, make_bridge

URN = "urn:uuid:11111111-1111-1111-1111-111111111111"


# A referring practice that collects the client's signed releases: its own therapist is its identity.
pytestmark = pytest.mark.bridge(
    partners={
        "authority": (
            "referrer-hub",
            "system/*.read system/*.write kap/consent-authority",
            {"references": ["Practitioner/hub-therapist"]},
        )
    }
)
_OWN = {
    "a": "Practitioner/ref-therapist",
    "b": "Practitioner/other-therapist",
    "authority": "Practitioner/hub-therapist",
}


def _own_consent(name: str, poster: str) -> dict:
    """A consent fixture under the poster's own business identifier (a Consent's identifier belongs
    to whoever first wrote it: the clinic's `consent-1` is not theirs to reuse)."""
    consent = load(name)
    if poster != "clinic":
        consent["identifier"][0]["value"] = f"{consent['identifier'][0]['value']}-{poster}"
    return consent


def _refer(bridge, poster: str) -> None:
    """The poster refers client-1 (a consent authority's Consents count only for clients it referred)."""
    referral = load("Example-ServiceRequest-referral-1.json")
    referral["identifier"][0]["value"] = f"referral-{poster}"
    referral["requester"] = {"reference": _OWN[poster]}
    assert bridge.post(poster, "/fhir/ServiceRequest", referral).status_code == 201


def _note(bridge, recipient: str = "Practitioner/ref-therapist") -> str:
    note = load("Example-Communication-note-1.json")
    note["recipient"] = [{"reference": recipient}]
    resp = bridge.post("clinic", "/fhir/Communication", note)
    assert resp.status_code == 201, resp.get_data(as_text=True)
    return resp.get_json(force=True)["id"]


def _created(resp) -> str:
    assert resp.status_code == 201, resp.get_data(as_text=True)
    return resp.get_json(force=True)["id"]


# --- C1: consent context only from consent authorities -------------------------------------------


@pytest.mark.parametrize(
    "poster,readable", [("a", False), ("b", False), ("authority", True), ("clinic", True)]
)
def test_a_permit_consent_decides_only_when_its_sender_is_a_consent_authority(bridge, poster, readable):
    bridge.post("clinic", "/fhir/Consent", load("Consent-expired.json"))
    rid = _note(bridge)
    assert bridge.get("a", f"/fhir/Communication/{rid}").status_code == 404
    if poster == "authority":
        _refer(bridge, poster)
    cid = _created(bridge.post(poster, "/fhir/Consent", _own_consent("Consent-open-ended.json", poster)))
    assert bridge.get(poster, f"/fhir/Consent/{cid}").status_code == 200  # stored, readable by its sender
    assert bridge.get("a", f"/fhir/Communication/{rid}").status_code == (200 if readable else 404)


@pytest.mark.parametrize("kind", ["transaction", "batch"])
def test_a_consent_in_a_non_authoritys_bundle_is_stored_but_decides_nothing(bridge, kind):
    bridge.post("clinic", "/fhir/Consent", load("Consent-expired.json"))
    rid = _note(bridge)

    def bundle(poster: str) -> dict:
        return {
            "resourceType": "Bundle",
            "type": kind,
            "entry": [
                {
                    "fullUrl": URN,
                    "resource": _own_consent("Consent-open-ended.json", poster),
                    "request": {"method": "POST", "url": "Consent"},
                }
            ],
        }

    resp = bridge.post("a", "/fhir", bundle("a"))
    assert (
        resp.status_code == 200
        and resp.get_json(force=True)["entry"][0]["response"]["status"] == "201 Created"
    )
    assert bridge.get("a", f"/fhir/Communication/{rid}").status_code == 404
    _refer(bridge, "authority")
    assert bridge.post("authority", "/fhir", bundle("authority")).status_code == 200
    assert bridge.get("a", f"/fhir/Communication/{rid}").status_code == 200


@pytest.mark.parametrize("poster,blocked", [("b", False), ("a", False), ("authority", True)])
def test_a_deny_consent_blocks_only_when_its_sender_is_a_consent_authority(bridge, poster, blocked):
    assert bridge.post("clinic", "/fhir/Consent", load("Consent-open-ended.json")).status_code == 201
    rid = _note(bridge)
    assert bridge.get("a", f"/fhir/Communication/{rid}").status_code == 200
    if poster == "authority":
        _refer(bridge, poster)
    _created(bridge.post(poster, "/fhir/Consent", _own_consent("Consent-deny-ref-therapist.json", poster)))
    assert bridge.get("a", f"/fhir/Communication/{rid}").status_code == (404 if blocked else 200)


@pytest.mark.parametrize("poster,readable", [("b", False), ("clinic", True)])
def test_a_practitioner_role_links_a_practitioner_to_a_granted_organisation_only_from_an_authority(
    bridge, poster, readable
):
    assert (
        bridge.post("clinic", "/fhir/Consent", load("Consent-grant-to-organization.json")).status_code == 201
    )
    rid = _note(bridge, "Practitioner/other-therapist")  # practice-b's practitioner
    assert bridge.get("b", f"/fhir/Communication/{rid}").status_code == 404
    _created(
        bridge.post(
            poster, "/fhir/PractitionerRole", load("PractitionerRole-other-therapist-at-granted-org.json")
        )
    )
    assert bridge.get("b", f"/fhir/Communication/{rid}").status_code == (200 if readable else 404)


def test_a_revoked_consent_authority_no_longer_feeds_the_gate(bridge):
    svc = bridge.app.extensions["fhir_kap"]
    bridge.post("clinic", "/fhir/Consent", load("Consent-expired.json"))
    rid = _note(bridge)
    _refer(bridge, "authority")
    svc.partners.revoke("referrer-hub")
    assert svc.inbound.is_authority("referrer-hub") is False
    # authority looked up: none (it was one, and it referred the client)
    svc.inbound.accept(_own_consent("Consent-open-ended.json", "authority"), source="referrer-hub")
    assert bridge.get("a", f"/fhir/Communication/{rid}").status_code == 404


# --- C3: a referral's Task carries no free text -------------------------------------------------


def _referral(bridge) -> str:
    return _created(bridge.post("a", "/fhir/ServiceRequest", load("Example-ServiceRequest-referral-1.json")))


def _move(bridge, sr: str, body: dict):
    return bridge.client.post(
        f"/kap/referrals/{sr}/status",
        data=json.dumps(body),
        headers=bridge.h("clinic", **{"Content-Type": "application/json"}),
    )


@pytest.mark.parametrize(
    "reason", ["Uncontrolled hypertension 190/110", "", "not eligible", "NOT-ELIGIBLE", "x" * 5000]
)
def test_a_free_text_status_reason_is_refused_and_the_task_unchanged(bridge, reason):
    sr = _referral(bridge)
    resp = _move(bridge, sr, {"status": "declined", "reason": reason})
    assert resp.status_code == 400 and is_outcome(resp) and "referral:reason" in resp.get_data(as_text=True)
    task = bridge.get("a", f"/fhir/Task?focus=ServiceRequest/{sr}").get_json(force=True)["entry"][0][
        "resource"
    ]
    assert task["businessStatus"]["coding"][0]["code"] == "received" and "statusReason" not in task
    assert "190/110" not in resp.get_data(as_text=True)


@pytest.mark.parametrize("release", ["R4", "R5"])
def test_a_status_reason_code_becomes_a_coding_in_the_releases_shape(tmp_path, release):
    from fhir_kap.exchange.inbound import REFERRAL_REASON_SYSTEM, referral_task

    bridge = make_bridge(tmp_path, fhir_version=release)
    svc = bridge.app.extensions["fhir_kap"]
    referral, _ = svc.store.create(load("Example-ServiceRequest-referral-1.json"), source="practice-a")
    svc.store.create(referral_task(referral, svc.inbound.clinic_owner), source="practice-a")
    task = svc.inbound.referral_status(referral.id, "declined", reason="capacity").resource
    coding = {"system": REFERRAL_REASON_SYSTEM, "code": "capacity", "display": "No capacity"}
    expected = {"concept": {"coding": [coding]}} if release == "R5" else {"coding": [coding]}
    assert task["statusReason"] == expected and "text" not in json.dumps(task["statusReason"])


def test_a_later_move_without_a_reason_drops_the_old_one(bridge):
    sr = _referral(bridge)
    assert _move(bridge, sr, {"status": "accepted", "reason": "other"}).status_code == 200
    assert _move(bridge, sr, {"status": "scheduled"}).status_code == 200
    task = bridge.get("a", f"/fhir/Task?focus=ServiceRequest/{sr}").get_json(force=True)["entry"][0][
        "resource"
    ]
    assert "statusReason" not in task


# --- I1, I2, I7: search values and conditions --------------------------------------------------

_MANY = ",".join(["a"] * 1200)


@pytest.mark.parametrize(
    "query,rule,name",
    [
        ("_lastUpdated=9999-12-31", "search:date", "_lastUpdated"),
        ("_lastUpdated=0001-01-01T00:00%2B05:00", "search:date", "_lastUpdated"),
        ("_lastUpdated=9999-12-31T23:59-05:00", "search:date", "_lastUpdated"),
        (f"category={_MANY}", "search:too-many-values", "category"),
        (f"_id={_MANY}", "search:too-many-values", "_id"),
        (
            "category=" + ",".join(["a"] * 60) + "&status=" + ",".join(["b"] * 60),
            "search:too-many-values",
            "status",
        ),
    ],
)
@pytest.mark.parametrize("who", ["a", "clinic"])
def test_hostile_search_values_are_400_naming_the_parameter(bridge, query, rule, name, who):
    resp = bridge.get(who, f"/fhir/Communication?{query}")
    text = resp.get_data(as_text=True)
    assert resp.status_code == 400 and is_outcome(resp) and rule in text, text
    assert resp.get_json(force=True)["issue"][0]["expression"] == [name]


def test_a_hundred_alternatives_are_still_searched(bridge):
    rid = _note(bridge)
    resp = bridge.get("clinic", "/fhir/Communication?_id=" + ",".join(["x"] * 99 + [rid]))
    assert resp.status_code == 200 and resp.get_json(force=True)["total"] == 1


@pytest.mark.parametrize(
    "condition,rule",
    [
        ("_sort=x", "http:if-none-exist"),
        ("_count=x", "http:if-none-exist"),
        ("_summary=true", "http:if-none-exist"),
        ("identifier=http://x|1&_include=Communication:subject", "http:if-none-exist"),
        ("_elements=id", "http:if-none-exist"),
        ("_lastUpdated=9999-12-31", "search:date"),
        ("category=" + ",".join(["a"] * 19) + "&category=" + ",".join(["a"] * 200), "search:too-many-values"),
    ],
)
@pytest.mark.parametrize("where", ["header", "transaction", "batch"])
def test_a_condition_that_selects_nothing_or_too_much_is_400_and_writes_nothing(
    bridge, condition, rule, where
):
    first = _created(bridge.post("a", "/fhir/Communication", load("Example-Communication-note-1.json")))
    note = load("Example-Communication-note-1.json")
    if where == "header":
        resp = bridge.post("a", "/fhir/Communication", note, **{"If-None-Exist": condition})
        outcome = resp
        assert resp.status_code == 400
    else:
        bundle = {
            "resourceType": "Bundle",
            "type": where,
            "entry": [
                {
                    "fullUrl": URN,
                    "resource": note,
                    "request": {"method": "POST", "url": "Communication", "ifNoneExist": condition},
                }
            ],
        }
        resp = bridge.post("a", "/fhir", bundle)
        if where == "transaction":
            assert resp.status_code == 400
            outcome = resp
        else:
            entry = resp.get_json(force=True)["entry"][0]["response"]
            assert resp.status_code == 200 and entry["status"].startswith("400")
            outcome = None
            assert rule in json.dumps(entry["outcome"])
    if outcome is not None:
        assert is_outcome(outcome) and rule in outcome.get_data(as_text=True)
    found = bridge.get("a", "/fhir/Communication").get_json(force=True)
    assert [e["resource"]["id"] for e in found["entry"]] == [first]  # neither a new write nor a 200 with it


def test_store_refuses_a_condition_without_criteria(tmp_path):
    from fhir_kap.errors import InputError

    svc = make_bridge(tmp_path).app.extensions["fhir_kap"]
    with pytest.raises(InputError) as err:
        svc.store.create(
            load("Example-Communication-note-1.json"), source="x", if_none_exist={"_count": ["1"]}
        )
    assert err.value.issues[0].rule == "http:if-none-exist"
    assert svc.store.counts() == {}


# --- I3, I4: Bundle entries --------------------------------------------------------------------


@pytest.mark.parametrize("full_url", [[], {}, 7, True])
@pytest.mark.parametrize("kind", ["transaction", "batch"])
def test_a_non_string_full_url_is_400_naming_the_entry(bridge, full_url, kind):
    bundle = {
        "resourceType": "Bundle",
        "type": kind,
        "entry": [
            {
                "fullUrl": URN,
                "resource": load("Example-Communication-note-1.json"),
                "request": {"method": "POST", "url": "Communication"},
            },
            {
                "fullUrl": full_url,
                "resource": load("Example-Communication-note-1.json"),
                "request": {"method": "POST", "url": "Communication"},
            },
        ],
    }
    resp = bridge.post("a", "/fhir", bundle)
    body = resp.get_json(force=True)
    if kind == "transaction":
        assert resp.status_code == 400 and is_outcome(resp)
        assert "/entry/1/fullUrl" in json.dumps(body) and "Bundle.entry[1].fullUrl" in json.dumps(body)
        assert bridge.get("clinic", "/fhir/Communication").get_json(force=True)["total"] == 0
    else:
        assert resp.status_code == 200
        assert [e["response"]["status"][:3] for e in body["entry"]] == ["201", "400"]
        assert "bridge:bundle-fullurl" in json.dumps(body["entry"][1])


def _deep(depth: int) -> str:
    return '{"a":' * depth + "1" + "}" * depth


@pytest.mark.parametrize("depth", [70, 900, 990])
@pytest.mark.parametrize("kind", ["transaction", "batch"])
def test_a_deeply_nested_entry_is_rejected_before_any_rewriting(bridge, depth, kind):
    note = json.dumps(load("Example-Communication-note-1.json"))[:-1] + f', "_status": {_deep(depth)}}}'
    entry = f'{{"fullUrl":"{URN}","request":{{"method":"POST","url":"Communication"}},"resource":{note}}}'
    body = f'{{"resourceType":"Bundle","type":"{kind}","entry":[{entry}]}}'
    resp = bridge.post("a", "/fhir", body)
    text = resp.get_data(as_text=True)
    assert resp.status_code == (400 if kind == "transaction" else 200) and "bridge:nesting" in text, text[
        :300
    ]
    assert bridge.get("clinic", "/fhir/Communication").get_json(force=True)["total"] == 0


def test_a_transaction_within_the_nesting_limit_still_resolves_its_references(bridge):
    note = load("Example-Communication-note-1.json")
    note["basedOn"] = [{"reference": URN}]
    sr = load("Example-ServiceRequest-referral-1.json")
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {"fullUrl": URN, "resource": sr, "request": {"method": "POST", "url": "ServiceRequest"}},
            {"resource": note, "request": {"method": "POST", "url": "Communication"}},
        ],
    }
    resp = bridge.post("clinic", "/fhir", bundle)
    assert resp.status_code == 200, resp.get_data(as_text=True)
    sr_id = resp.get_json(force=True)["entry"][0]["fullUrl"].rsplit("/", 1)[1]
    stored = bridge.get("clinic", "/fhir/Communication").get_json(force=True)["entry"][0]["resource"]
    assert stored["basedOn"] == [{"reference": f"ServiceRequest/{sr_id}"}]


# --- 9: rest-hooks only for recipients the gate lets read ---------------------------------------


class _Hook(BaseHTTPRequestHandler):
    received: ClassVar[list] = []

    def do_POST(self):
        self.received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.mark.parametrize(
    "consent,hooked", [(None, False), ("Consent-expired.json", False), ("Consent-open-ended.json", True)]
)
def test_a_rest_hook_fires_only_when_the_consent_gate_lets_the_recipient_read_the_note(
    tmp_path, consent, hooked
):
    from fhir_kap.bridge import BridgeOptions, create_app
    from fhir_kap.config import load_settings
    from fhir_kap.storage.db import Database
    from fhir_kap.storage.partners import Partners

    _Hook.received = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Hook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        settings = load_settings(env={}, data_dir=tmp_path / "data")
        partners = Partners(Database(settings.db_url))
        _, clinic = partners.add("clinic-ehr", scopes="system/*.* kap/clinic")
        partners.add(
            "practice-a",
            npis=["1234567893"],
            references=["Practitioner/ref-therapist"],
            webhook_url=f"http://127.0.0.1:{server.server_port}/hook",
        )
        app = create_app(settings, BridgeOptions(base_url="http://bridge.test/fhir"))
        client = app.test_client()
        headers = {"Authorization": f"Bearer {clinic}", "Content-Type": FHIR}
        if consent:
            assert (
                client.post("/fhir/Consent", data=json.dumps(load(consent)), headers=headers).status_code
                == 201
            )
        resp = client.post(
            "/fhir/Communication", data=json.dumps(load("Example-Communication-note-1.json")), headers=headers
        )
        assert resp.status_code == 201
        svc = app.extensions["fhir_kap"]
        assert svc.inbound.notifier.drain(timeout=10)
        rid = resp.get_json()["id"]
        assert _Hook.received == (
            [{"event": "communication-available", "resource": f"Communication/{rid}"}] if hooked else []
        )
        events = svc.audit.query("AuditEvent", limit=100)
        # The gate's decisions for the hook are audited like reads: when the job is queued, and
        # again right before it is sent (a permit); a denied note gets no job and no second look.
        assert len(events) == (2 if hooked else 1)
        assert all((e["outcome"] == "0") is hooked for e in events)
    finally:
        server.shutdown()


# --- a Consent posted before its client was referred -----------------------------------------------


def _outcome_rules(resp) -> set[str]:
    body = resp.get_json(force=True)
    return {
        e.get("valueString")
        for i in body.get("issue", [])
        for e in i.get("extension", [])
        if e.get("url", "").endswith("/rule")
    }


def test_an_authoritys_consent_sent_before_the_referral_says_so_and_counts_once_the_client_is_referred(
    bridge,
):
    bridge.post("clinic", "/fhir/Consent", load("Consent-expired.json"))
    rid = _note(bridge)
    early = bridge.post(
        "authority",
        "/fhir/Consent",
        _own_consent("Consent-open-ended.json", "authority"),
        Prefer="return=OperationOutcome",
    )
    assert early.status_code == 201 and "consent:not-in-scope" in _outcome_rules(early)
    assert bridge.get("a", f"/fhir/Communication/{rid}").status_code == 404  # it decides nothing yet
    _refer(bridge, "authority")  # the referral admits the Consent already sent
    assert bridge.get("a", f"/fhir/Communication/{rid}").status_code == 200


def test_a_consent_from_a_partner_that_is_no_consent_authority_says_it_decides_nothing(bridge):
    resp = bridge.post(
        "a",
        "/fhir/Consent",
        _own_consent("Consent-open-ended.json", "a"),
        Prefer="return=OperationOutcome",
    )
    assert resp.status_code == 201 and "consent:not-authority" in _outcome_rules(resp)


def test_an_authoritys_consent_after_its_referral_carries_no_such_warning(bridge):
    _refer(bridge, "authority")
    resp = bridge.post(
        "authority",
        "/fhir/Consent",
        _own_consent("Consent-open-ended.json", "authority"),
        Prefer="return=OperationOutcome",
    )
    assert resp.status_code == 201
    assert not {"consent:not-in-scope", "consent:not-authority"} & _outcome_rules(resp)


def test_a_withdrawn_referral_no_longer_makes_its_client_the_authoritys(bridge):
    bridge.post("clinic", "/fhir/Consent", load("Consent-expired.json"))
    rid = _note(bridge)
    referral = load("Example-ServiceRequest-referral-1.json")
    referral["identifier"][0]["value"] = "referral-authority"
    referral["requester"] = {"reference": _OWN["authority"]}
    sr = bridge.post("authority", "/fhir/ServiceRequest", referral).get_json(force=True)
    withdrawn = bridge.client.put(
        f"/fhir/ServiceRequest/{sr['id']}",
        data=json.dumps(dict(sr, status="entered-in-error")),
        headers=bridge.h("authority", **{"Content-Type": FHIR, "If-Match": 'W/"1"'}),
    )
    assert withdrawn.status_code == 200, withdrawn.get_data(as_text=True)
    resp = bridge.post(
        "authority",
        "/fhir/Consent",
        _own_consent("Consent-open-ended.json", "authority"),
        Prefer="return=OperationOutcome",
    )
    assert resp.status_code == 201 and "consent:not-in-scope" in _outcome_rules(resp)
    assert bridge.get("a", f"/fhir/Communication/{rid}").status_code == 404
