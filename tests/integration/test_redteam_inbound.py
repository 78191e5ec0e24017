"""Red-team findings on the inbound path (issue 14, "a partner must not be able to harm another
partner"; "searches that cost what they return"): F2, F6, F8, F11 b of the 2026-12-05 review.

Work is counted (calls, rows), never timed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from testkit.bridge import load

DATA = Path(__file__).resolve().parents[1] / "data" / "ehr"
SCOPES = "system/*.read system/*.write kap/consent-authority"
HUB_NPI = {"system": "http://hl7.org/fhir/sid/us-npi", "value": "1003000126"}


def _hub(bridge, name: str = "referrer-hub") -> str:
    """A consent authority (a referring practice collecting its clients' releases)."""
    _, token = bridge.app.extensions["fhir_kap"].partners.add(name, scopes=SCOPES, npis=[HUB_NPI["value"]])
    bridge.tokens[name] = token
    return name


def _consent(patient: str, value: str) -> dict[str, Any]:
    c = load("Consent-open-ended.json")
    c.pop("id", None)
    c["patient"] = {"reference": patient}
    c["identifier"][0]["value"] = value
    return c


def _text(resp) -> str:
    return resp.get_data(as_text=True)


# --- F2: an authority's earlier Consents are all admitted when it refers the client ---------------


@pytest.mark.parametrize(("crowd", "own"), [(0, 0), (205, 0), (0, 205)])
def test_an_authoritys_earlier_deny_counts_from_its_referral_whatever_others_stored(bridge, crowd, own):
    """Practice B (no authority) stores `crowd` Consents naming the client (and the hub `own`
    earlier Consents of its own); the hub's deny, posted before it referred the client, still
    counts once it does: A's read of the note is 404."""
    pat = "Patient/client-crowded"
    hub = _hub(bridge)
    store = bridge.app.extensions["fhir_kap"].store
    with store.transaction() as tx:  # the set-up: B's Consents straight into the store
        for i in range(crowd):
            store.create(_consent(pat, f"b-crowd-{i}"), source="practice-b", tx=tx)
        for i in range(own):
            store.create(_consent(pat, f"hub-earlier-{i}"), source=hub, tx=tx)
    grant = bridge.post("clinic", "/fhir/Consent", _consent(pat, "clinic-grant"))
    assert grant.status_code == 201, _text(grant)
    deny = _consent(pat, "hub-deny")
    deny["performer"] = [{"type": "Practitioner", "identifier": HUB_NPI}]
    deny["provision"]["provision"] = [{"type": "deny", "actor": deny["provision"]["actor"]}]
    resp = bridge.post(hub, "/fhir/Consent", deny, Prefer="return=OperationOutcome")
    assert resp.status_code == 201 and "consent:not-in-scope" in _text(resp)  # not yet referred
    note = load("Example-Communication-note-1.json")
    note.pop("id", None)
    note["subject"] = {"reference": pat}
    rid = bridge.post("clinic", "/fhir/Communication", note).get_json(force=True)["id"]
    assert bridge.get("a", f"/fhir/Communication/{rid}").status_code == 200  # the grant alone
    sr = load("Example-ServiceRequest-referral-1.json")
    sr.pop("id", None)
    sr["subject"] = {"reference": pat}
    sr["identifier"][0]["value"] = "hub-referral"
    sr["requester"] = {"type": "Practitioner", "identifier": HUB_NPI}
    resp = bridge.post(hub, "/fhir/ServiceRequest", sr)
    assert resp.status_code == 201, _text(resp)
    assert bridge.get("a", f"/fhir/Communication/{rid}").status_code == 404


# --- F6: a Consent's identifier is claimed only by writers whose Consents count -------------------


def _rules(resp) -> set[str]:
    out = set()
    for i in resp.get_json(force=True).get("issue", []):
        out |= {e["valueString"] for e in i.get("extension", []) if e["url"].endswith("/rule")}
    return out


def _deny(patient: str, value: str) -> dict[str, Any]:
    deny = _consent(patient, value)
    deny["performer"] = [{"type": "Practitioner", "identifier": HUB_NPI}]
    deny["provision"]["provision"] = [{"type": "deny", "actor": deny["provision"]["actor"]}]
    return deny


def _referral(bridge, who: str, patient: str, value: str) -> None:
    sr = load("Example-ServiceRequest-referral-1.json")
    sr.pop("id", None)
    sr["subject"] = {"reference": patient}
    sr["identifier"][0]["value"] = value
    sr["requester"] = {"type": "Practitioner", "identifier": HUB_NPI}
    resp = bridge.post(who, "/fhir/ServiceRequest", sr)
    assert resp.status_code == 201, _text(resp)


def _clinic_note(bridge, patient: str) -> str:
    note = load("Example-Communication-note-1.json")
    note.pop("id", None)
    note["subject"] = {"reference": patient}
    resp = bridge.post("clinic", "/fhir/Communication", note)
    assert resp.status_code == 201, _text(resp)
    return resp.get_json(force=True)["id"]


def test_a_partner_whose_consents_do_not_count_cannot_squat_an_authoritys_identifier(bridge):
    """B (no authority) posts Consents with the identifier the hub will use (205 of them): the
    hub's own Consent later is stored and counts; B still reads its own."""
    pat = "Patient/client-squat"
    hub = _hub(bridge)
    resp = bridge.post(  # over HTTP: stored, answered as deciding nothing
        "b", "/fhir/Consent", _consent(pat, "hub-consent-0001"), Prefer="return=OperationOutcome"
    )
    assert resp.status_code == 201 and "consent:not-authority" in _rules(resp), _text(resp)
    store = bridge.app.extensions["fhir_kap"].store
    with store.transaction() as tx:
        for i in range(205):
            store.create(
                _consent(pat, "hub-consent-0001") | {"dateTime": f"2024-01-{1 + i % 28:02d}"},
                source="practice-b",
                tx=tx,
            )
    assert bridge.post("clinic", "/fhir/Consent", _consent(pat, "clinic-grant")).status_code == 201
    rid = _clinic_note(bridge, pat)
    _referral(bridge, hub, pat, "hub-squat-referral")
    assert bridge.get("a", f"/fhir/Communication/{rid}").status_code == 200
    resp = bridge.post(hub, "/fhir/Consent", _deny(pat, "hub-consent-0001"))
    assert resp.status_code == 201, _text(resp)
    assert bridge.get("a", f"/fhir/Communication/{rid}").status_code == 404  # the hub's deny counts
    mine = bridge.get("b", "/fhir/Consent?identifier=http://fhir-kap.example/sid/consent|hub-consent-0001")
    assert mine.get_json(force=True)["total"] >= 1
    # and another authority still cannot take the hub's identifier, however many B's there are
    other = _hub(bridge, "second-hub")
    resp = bridge.post(other, "/fhir/Consent", _deny(pat, "hub-consent-0001"))
    assert resp.status_code == 403 and "bridge:identifier-owner" in _rules(resp)


def test_a_consent_stored_before_its_writer_counted_does_not_take_anothers_identifier(bridge):
    """B, without authority, stores a revocation carrying the clinic's identifier (allowed: it
    decides nothing); made an authority later, its referral admits its earlier Consents, but not
    that one: the clinic's grant holds."""
    pat = "Patient/client-later"
    grant = _consent(pat, "clinic-consent-7")
    assert bridge.post("clinic", "/fhir/Consent", grant).status_code == 201
    rid = _clinic_note(bridge, pat)
    revoke = dict(grant, status="inactive", dateTime="2025-06-01")
    assert bridge.post("b", "/fhir/Consent", revoke).status_code == 201
    partners = bridge.app.extensions["fhir_kap"].partners
    partners.revoke("practice-b")
    bridge.tokens["b"] = partners.add("practice-b", scopes=SCOPES, npis=[HUB_NPI["value"]])[1]
    _referral(bridge, "b", pat, "b-referral")
    assert bridge.get("a", f"/fhir/Communication/{rid}").status_code == 200


@pytest.mark.parametrize("who", ["b", "hub"])
def test_validate_does_not_tell_whether_another_writer_holds_a_consent_identifier(bridge, who):
    """$validate answers the same for the clinic's identifier and a free one, to an authority and
    to a partner whose Consents do not count (the owner check is made at write time only)."""
    if who == "hub":
        who = _hub(bridge)
    assert (
        bridge.post("clinic", "/fhir/Consent", _consent("Patient/client-1", "consent-held")).status_code
        == 201
    )
    answers = []
    for value in ("consent-held", "consent-free"):
        params = {
            "resourceType": "Parameters",
            "parameter": [
                {"name": "resource", "resource": _consent("Patient/client-1", value)},
                {"name": "mode", "valueCode": "create"},
            ],
        }
        resp = bridge.post(who, "/fhir/Consent/$validate", params)
        assert resp.status_code == 200, _text(resp)
        answers.append(resp.get_json(force=True)["issue"])
    assert answers[0] == answers[1]
    assert "bridge:identifier-owner" not in _text(resp)
    if who != "b":  # the authority's write is refused, as before
        resp = bridge.post(who, "/fhir/Consent", _consent("Patient/client-1", "consent-held"))
        assert resp.status_code == 403 and "bridge:identifier-owner" in _rules(resp)


# --- F8: conditional references in a transaction cost O(entries + references) ---------------------


class _Counted:
    """Counts calls of `identifiers_of` in the inbound path and of the store's identifier lookup."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        import fhir_kap.exchange.inbound as inbound
        from fhir_kap.storage.store import Store

        self.identifiers = self.lookups = 0
        idents, lookup = inbound.identifiers_of, Store.with_identifier

        def counting_identifiers(*a: Any, **k: Any) -> Any:
            self.identifiers += 1
            return idents(*a, **k)

        def counting_lookup(*a: Any, **k: Any) -> Any:
            self.lookups += 1
            return lookup(*a, **k)

        monkeypatch.setattr(inbound, "identifiers_of", counting_identifiers)
        monkeypatch.setattr(Store, "with_identifier", counting_lookup)


def _patients_naming(conditions) -> dict[str, Any]:
    """A transaction of len(conditions) Patients, entry i carrying the conditional references
    `conditions[i]` (none of which matches anything)."""
    entries = [
        {
            "fullUrl": f"urn:uuid:00000000-0000-0000-0000-{i:012d}",
            "resource": {
                "resourceType": "Patient",
                "identifier": [{"system": "s", "value": f"v{i}"}],
                "extension": [
                    {
                        "url": "u",
                        "valueReference": {"reference": f"Patient?identifier={c}"},
                    }
                    for c in refs
                ],
            },
            "request": {"method": "POST", "url": "Patient"},
        }
        for i, refs in enumerate(conditions)
    ]
    return {"resourceType": "Bundle", "type": "transaction", "entry": entries}


def _compact(body: dict[str, Any]) -> str:
    return json.dumps(body, separators=(",", ":"))


def test_a_transactions_conditional_references_are_resolved_once_each(bridge, monkeypatch):
    """500 entries x 20 unresolvable references (20 distinct conditions): each entry's identifiers
    are read once, each distinct condition looked up in the store once; 412, nothing stored."""
    work = _Counted(monkeypatch)
    bundle = _patients_naming([[f"s|x{j}" for j in range(20)]] * 500)
    resp = bridge.post("b", "/fhir", _compact(bundle))
    assert resp.status_code == 412 and "bridge:conditional-reference" in _text(resp)
    assert work.identifiers <= 500 + 20
    assert work.lookups <= 20
    assert bridge.get("b", "/fhir/Patient?_count=0").get_json(force=True)["total"] == 0


def test_a_transaction_naming_too_many_stored_conditions_is_refused_within_a_bounded_work(
    bridge, monkeypatch
):
    """500 x 20 distinct unresolvable conditions: at most MAX_STORED_CONDITIONS store lookups, then
    400; a Bundle of 500 entries naming one or two distinct conditions each is looked up whole."""
    from fhir_kap.exchange.inbound import MAX_STORED_CONDITIONS

    work = _Counted(monkeypatch)
    bundle = _patients_naming([[f"s|x{i}-{j}" for j in range(20)] for i in range(500)])
    resp = bridge.post("b", "/fhir", _compact(bundle))
    assert resp.status_code == 400 and "too-costly" in _text(resp)
    assert work.lookups <= MAX_STORED_CONDITIONS
    assert work.identifiers <= 500 + MAX_STORED_CONDITIONS
    # a legitimate shape: each note its own client, all one sender (501 distinct conditions)
    ordinary = _patients_naming([[f"s|client-{i}", "s|the-sender"] for i in range(500)])
    resp = bridge.post("b", "/fhir", _compact(ordinary))
    assert resp.status_code == 412 and "too-costly" not in _text(resp)  # each looked up (none stored)


MRN = "urn:oid:1.2.3.4.5"


def _mrn_patient(value: str) -> dict[str, Any]:
    return {
        "resourceType": "Patient",
        "identifier": [{"system": MRN, "value": value}],
        "name": [{"family": "Rivera"}],
    }


def _note_about(value: str, n: int) -> dict[str, Any]:
    note = load("Example-Communication-note-1.json")
    note.pop("id", None)
    note["identifier"][0]["value"] = f"cond-note-{n}"
    note["subject"] = {"reference": f"Patient?identifier={MRN}|{value}"}
    return {"resource": note, "request": {"method": "POST", "url": "Communication"}}


def test_conditional_references_still_select_one_entry_or_one_stored_resource(bridge):
    """The index answers as the scan did: an entry of the Bundle, else the sender's own resource
    (not another partner's); two entries carrying the identifier are several (412)."""
    assert bridge.post("a", "/fhir/Patient", _mrn_patient("MRN-S")).status_code == 201  # A's, not B's
    stored = bridge.post("b", "/fhir/Patient", _mrn_patient("MRN-S"))
    assert stored.status_code == 201, _text(stored)
    entries = [
        {"resource": _mrn_patient("MRN-E"), "request": {"method": "POST", "url": "Patient"}},
        _note_about("MRN-E", 1),
        _note_about("MRN-S", 2),
        _note_about("MRN-E", 3),  # the same condition again: answered from the cache
    ]
    resp = bridge.post("b", "/fhir", {"resourceType": "Bundle", "type": "transaction", "entry": entries})
    assert resp.status_code == 200, _text(resp)
    ids = [e["response"]["location"].split("/")[1] for e in resp.get_json(force=True)["entry"]]
    subjects = [
        bridge.get("b", f"/fhir/Communication/{rid}").get_json(force=True)["subject"] for rid in ids[1:]
    ]
    assert [s["reference"] for s in subjects] == [
        f"Patient/{ids[0]}",
        f"Patient/{stored.get_json(force=True)['id']}",
        f"Patient/{ids[0]}",
    ]
    twice = [
        {"resource": _mrn_patient("MRN-T"), "request": {"method": "POST", "url": "Patient"}},
        {"resource": _mrn_patient("MRN-T"), "request": {"method": "POST", "url": "Patient"}},
        _note_about("MRN-T", 4),
    ]
    resp = bridge.post("b", "/fhir", {"resourceType": "Bundle", "type": "transaction", "entry": twice})
    assert resp.status_code == 412 and "matched several" in _text(resp), _text(resp)


# --- F11 b: a batch entry with a conditional reference is refused as a single create is ---------


def test_a_batch_entry_with_a_conditional_reference_is_refused_like_a_single_create(bridge):
    bad = load("Example-Communication-note-1.json")
    bad.pop("id", None)
    bad["identifier"][0]["value"] = "batch-conditional"
    bad["basedOn"] = [{"reference": "ServiceRequest?identifier=http://x.example|y"}]
    good = load("Example-Communication-note-1.json")
    good.pop("id", None)
    good["identifier"][0]["value"] = "batch-plain"
    single = bridge.post("b", "/fhir/Communication", bad)
    assert single.status_code == 400
    batch = {
        "resourceType": "Bundle",
        "type": "batch",
        "entry": [
            {"resource": bad, "request": {"method": "POST", "url": "Communication"}},
            {"resource": good, "request": {"method": "POST", "url": "Communication"}},
        ],
    }
    resp = bridge.post("b", "/fhir", batch)
    assert resp.status_code == 200, _text(resp)
    refused, stored = (e["response"] for e in resp.get_json(force=True)["entry"])
    assert refused["status"].startswith("400") and stored["status"].startswith("201")
    assert refused["outcome"]["issue"] == single.get_json(force=True)["issue"]  # the same rule and message
    for value, total in (("batch-conditional", 0), ("batch-plain", 1)):
        found = bridge.get("b", f"/fhir/Communication?identifier={good['identifier'][0]['system']}|{value}")
        assert found.get_json(force=True)["total"] == total, value


# --- a transaction's conditional PUT on a type no partner updates ---------------------------------


def test_a_transactions_conditional_put_of_a_clinical_context_type_is_refused_like_a_plain_put(bridge):
    """`PUT Condition?identifier=` is 400 `bridge:update-type` alone (the referral's context is
    kept as sent); inside a transaction it used to be accepted, storing a new Condition each time."""
    ehr = json.loads((DATA / "08-bundle-collection-absolute-fullurls.json").read_text())
    cond = next(e["resource"] for e in ehr["entry"] if e["resource"]["resourceType"] == "Condition")
    cond = {k: v for k, v in cond.items() if k not in ("id", "recorder", "asserter")}
    cond["identifier"] = [{"system": "http://b.example/cond", "value": "c-1"}]
    cond["subject"] = {"reference": "Patient/client-1"}
    url = "Condition?identifier=http://b.example/cond|c-1"
    plain = bridge.client.put(f"/fhir/{url}", json=cond, headers=bridge.h("b"))
    assert plain.status_code in (400, 405)
    tx = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [{"resource": cond, "request": {"method": "PUT", "url": url}}],
    }
    before = bridge.get("clinic", "/fhir/Condition?_count=0").get_json(force=True)["total"]
    resp = bridge.post("b", "/fhir", tx)
    assert resp.status_code == 400 and "bridge:update-type" in _text(resp), _text(resp)
    assert bridge.get("clinic", "/fhir/Condition?_count=0").get_json(force=True)["total"] == before


def test_an_error_answer_lists_at_most_a_bounded_number_of_issues(bridge):
    """Every entry's unresolvable references were one issue each: a 0.8 MB transaction got a
    5.2 MB OperationOutcome. An error answer now lists the first MAX_ERROR_ISSUES issues and one
    more saying how many were left out."""
    from fhir_kap.bridge.app import MAX_ERROR_ISSUES

    bundle = _patients_naming([[f"s|x{j}" for j in range(3)]] * 200)
    resp = bridge.post("b", "/fhir", _compact(bundle))
    assert resp.status_code == 412
    issues = resp.get_json(force=True)["issue"]
    assert len(issues) == MAX_ERROR_ISSUES + 1
    assert (
        issues[-1]["severity"] == "information"
        and "more issue(s) not listed" in issues[-1]["details"]["text"]
    )
    assert all(i["severity"] == "error" for i in issues[:-1])


def test_a_transaction_never_stores_a_conditional_reference_too_long_to_resolve(bridge):
    """A reference over 4,096 characters is not read as one, so a transaction stored
    `Patient?_id=x0,x1,...` (4,901 characters) as it was (200), where a single create or a batch
    refuses it: now 400 bridge:conditional-reference naming the entry, nothing stored."""
    long_ref = "Patient?_id=" + ",".join(f"x{j}" for j in range(1000))
    patient = {
        "resourceType": "Patient",
        "identifier": [{"system": "http://b.example/mrn", "value": "long-ref-1"}],
        "extension": [{"url": "http://b.example/ext", "valueReference": {"reference": long_ref}}],
    }
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [{"resource": patient, "request": {"method": "POST", "url": "Patient"}}],
    }
    resp = bridge.post("b", "/fhir", bundle)
    assert resp.status_code == 400 and "bridge:conditional-reference" in _text(resp), _text(resp)[:300]
    assert bridge.get("b", "/fhir/Patient?_count=0").get_json(force=True)["total"] == 0
