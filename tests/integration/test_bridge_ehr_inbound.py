"""The bridge's EHR-facing writes under pressure: resends never undo a newer state, conditional
entries look only at the sender's own resources, a transaction never stores a reference to an id it
did not store, and shapes that cannot be stored safely are refused with a 4xx naming the rule."""

from __future__ import annotations

import copy

import pytest

from testkit.bridge import is_outcome, load

MRN = "urn:oid:1.2.3.4.5"


def _consent(end: str, status: str = "active") -> dict:
    c = load("Consent-open-ended.json")
    c.pop("id", None)
    c["status"] = status
    c["provision"]["period"] = {"start": "2025-01-10", "end": end}
    return c


def _patient(value: str, family: str = "Rivera") -> dict:
    return {
        "resourceType": "Patient",
        "identifier": [{"system": MRN, "value": value}],
        "name": [{"family": family}],
    }


def _rule(resp) -> str:
    return resp.get_data(as_text=True)


def test_re_posting_an_older_state_of_a_consent_is_stored_not_taken_for_a_resend(bridge):
    narrow, wide = _consent("2026-06-30"), _consent("2099-12-31")
    first = bridge.post("clinic", "/fhir/Consent", narrow)
    second = bridge.post("clinic", "/fhir/Consent", wide)
    third = bridge.post("clinic", "/fhir/Consent", copy.deepcopy(narrow))  # narrowing it again
    assert [r.status_code for r in (first, second, third)] == [201, 201, 201]
    assert third.get_json(force=True)["id"] != first.get_json(force=True)["id"]
    # the same as the newest copy: a resend, nothing new
    again = bridge.post("clinic", "/fhir/Consent", copy.deepcopy(narrow))
    assert again.status_code == 200 and again.get_json(force=True)["id"] == third.get_json(force=True)["id"]


@pytest.mark.parametrize("others", [0, 2, 3, 25])
def test_a_conditional_put_sees_only_the_senders_resources(bridge, others):
    for i in range(others):
        assert bridge.post("b", "/fhir/Patient", _patient("MRN-1", f"Other{i}")).status_code == 201
    mine = bridge.post("a", "/fhir/Patient", _patient("MRN-1")).get_json(force=True)["id"]
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "resource": _patient("MRN-1", "Rivera-Moreno"),
                "request": {"method": "PUT", "url": f"Patient?identifier={MRN}|MRN-1"},
            }
        ],
    }
    resp = bridge.post("a", "/fhir", bundle)
    assert resp.status_code == 200, _rule(resp)
    (entry,) = resp.get_json(force=True)["entry"]
    assert entry["response"]["status"] == "200 OK" and entry["fullUrl"].endswith(f"Patient/{mine}")
    assert (
        bridge.get("a", f"/fhir/Patient/{mine}").get_json(force=True)["name"][0]["family"] == "Rivera-Moreno"
    )


def test_a_transaction_never_points_at_an_id_it_did_not_store(bridge):
    for i in range(25):  # another partner's Patients with the same MRN must not crowd the match
        bridge.post("b", "/fhir/Patient", _patient("MRN-2", f"Other{i}"))
    mine = bridge.post("a", "/fhir/Patient", _patient("MRN-2")).get_json(force=True)["id"]
    note = load("Example-Communication-note-1.json")
    note["identifier"][0]["value"] = "note-tx-1"
    note["subject"] = {"reference": "urn:uuid:2f0c7e1a-5b7c-4a8e-9d1e-0c3b2a1f4e5d"}
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "fullUrl": "urn:uuid:2f0c7e1a-5b7c-4a8e-9d1e-0c3b2a1f4e5d",
                "resource": _patient("MRN-2"),
                "request": {"method": "POST", "url": "Patient", "ifNoneExist": f"identifier={MRN}|MRN-2"},
            },
            {"resource": note, "request": {"method": "POST", "url": "Communication"}},
        ],
    }
    resp = bridge.post("a", "/fhir", bundle)
    assert resp.status_code == 200, _rule(resp)
    location = resp.get_json(force=True)["entry"][1]["response"]["location"]
    stored = bridge.get("a", "/fhir/" + location.split("/_history")[0]).get_json(force=True)
    assert stored["subject"]["reference"] == f"Patient/{mine}"
    assert bridge.get("a", f"/fhir/{stored['subject']['reference']}").status_code == 200


def test_a_single_create_nested_too_deep_is_400_naming_the_rule(bridge):
    ext: dict = {"url": "https://ehr.example.org/x", "valueString": "v"}
    for _ in range(100):
        ext = {"url": "https://ehr.example.org/x", "extension": [ext]}
    referral = load("Example-ServiceRequest-referral-1.json")
    referral["extension"].append(ext)
    resp = bridge.post("clinic", "/fhir/ServiceRequest", referral)
    assert resp.status_code == 400 and is_outcome(resp) and "fhir:nesting" in _rule(resp)


def test_a_conditional_reference_outside_a_transaction_is_refused(bridge):
    note = load("Example-Communication-note-1.json")
    note["subject"] = {"reference": f"Patient?identifier={MRN}|MRN-3"}
    resp = bridge.post("clinic", "/fhir/Communication", note)
    assert resp.status_code == 400 and is_outcome(resp) and "bridge:conditional-reference" in _rule(resp)


def _deep_note(levels: int) -> dict:
    note = load("Example-Communication-note-1.json")
    note["identifier"][0]["value"] = "deep-note"
    ext: dict = {"url": "https://ehr.example.org/x", "valueString": "v"}
    for _ in range(levels):
        ext = {"url": "https://ehr.example.org/x", "extension": [ext]}
    note["extension"] = [ext]
    return note


def test_the_deepest_resource_accepted_still_reads_back_in_every_bundle(bridge):
    """One depth rule for every write path, with headroom for the Bundles wrapped around a stored
    resource: whatever is stored, its read, search and _history answer (the 125-level note used to
    be stored, then break its recipient's searches with a 500 for good)."""
    from fhir_kap.jsonio import MAX_DEPTH, too_deep

    levels = next(n for n in range(200) if too_deep(_deep_note(n + 1), MAX_DEPTH))  # the deepest accepted
    note = _deep_note(levels)
    resp = bridge.post("clinic", "/fhir/Communication", note)
    assert resp.status_code == 201, _rule(resp)
    rid = resp.get_json(force=True)["id"]
    for path in (f"/fhir/Communication/{rid}", f"/fhir/Communication/{rid}/_history", "/fhir/Communication"):
        assert bridge.get("clinic", path).status_code == 200, path
    bundle = {
        "resourceType": "Bundle",
        "type": "batch",
        "entry": [{"resource": _deep_note(levels), "request": {"method": "POST", "url": "Communication"}}],
    }
    assert bridge.post("clinic", "/fhir", bundle).status_code == 200
    resp = bridge.post("clinic", "/fhir/Communication", _deep_note(levels + 1))
    assert resp.status_code == 400 and "fhir:nesting" in _rule(resp)
    resp = bridge.post("clinic", "/fhir/Communication", _deep_note(125))
    assert resp.status_code == 400 and "fhir:nesting" in _rule(resp)
