"""Issue 14, forged authorship: what a partner writes names the partner as its author (or is
filled from it), the clinic's identity comes only from clinic systems, and the stored resource
says who wrote it (`meta.source`). Single POST, transaction, batch and collection Bundles.
"""

from __future__ import annotations

import copy

import pytest

from fhir_kap.errors import Forbidden
from fhir_kap.exchange.authorship import AUTHORSHIP, Authorship
from fhir_kap.storage.partners import Partner
from testkit.bridge import load

CLINIC_SENDER = {"reference": "Organization/kap-clinic", "display": "KAP clinic"}
CLINIC_ORG = {
    "type": "Organization",
    "identifier": {"system": "http://fhir-kap.example/sid/org", "value": "kap-clinic"},
}


def _rule(resp) -> list[str]:
    return [
        e["valueString"]
        for i in resp.get_json(force=True)["issue"]
        for e in i.get("extension", [])
        if e["url"].endswith("/rule")
    ]


def _forged(sender=CLINIC_SENDER) -> dict:
    """A 'clinic note' practice-b writes to practice-a's therapist."""
    note = load("Example-Communication-note-1.json")
    note["sender"] = sender
    note["identifier"] = [{"system": "http://fhir-kap.example/sid/note", "value": "forged"}]
    return note


@pytest.mark.parametrize(
    "sender",
    [
        CLINIC_SENDER,
        CLINIC_ORG,
        {"reference": "Practitioner/ref-therapist"},  # another practice's practitioner
        {
            "type": "Practitioner",
            "identifier": {"system": "http://hl7.org/fhir/sid/us-npi", "value": "1234567893"},
        },
        {"reference": "Organization/unknown-here"},
    ],
    ids=["clinic-literal", "clinic-identifier", "other-practice", "other-npi", "unresolved"],
)
def test_a_practice_cannot_post_a_note_whose_sender_is_not_itself(bridge, sender):
    resp = bridge.post("b", "/fhir/Communication", _forged(sender))
    assert resp.status_code == 403 and "bridge:authorship" in _rule(resp), resp.get_data(as_text=True)
    assert resp.get_json(force=True)["issue"][0]["expression"] == ["Communication.sender"]
    assert bridge.get("clinic", "/fhir/Communication").get_json(force=True).get("total") == 0


@pytest.mark.parametrize("kind", ["transaction", "batch", "collection"])
def test_a_forged_sender_in_a_bundle_is_refused(bridge, kind):
    entry = {"fullUrl": "urn:uuid:11111111-1111-1111-1111-111111111111", "resource": _forged()}
    if kind != "collection":
        entry["request"] = {"method": "POST", "url": "Communication"}
    resp = bridge.post("b", "/fhir", {"resourceType": "Bundle", "type": kind, "entry": [entry]})
    if kind == "batch":
        got = resp.get_json(force=True)["entry"][0]["response"]
        assert got["status"].startswith("403") and "bridge:authorship" in str(got["outcome"])
    else:
        assert resp.status_code == 403 and "bridge:authorship" in _rule(resp)
    assert bridge.get("clinic", "/fhir/Communication").get_json(force=True).get("total") == 0


def test_the_partners_own_sender_is_taken_and_a_missing_one_filled(bridge):
    own = bridge.post("b", "/fhir/Communication", _forged({"reference": "Practitioner/other-therapist"}))
    assert own.status_code == 201, own.get_data(as_text=True)
    by_npi = _forged(
        {
            "type": "Practitioner",
            "identifier": {"system": "http://hl7.org/fhir/sid/us-npi", "value": "1245319599"},
        }
    )
    by_npi["identifier"][0]["value"] = "by-npi"
    assert bridge.post("b", "/fhir/Communication", by_npi).status_code == 201
    missing = _forged()
    del missing["sender"]
    missing["identifier"][0]["value"] = "filled"
    resp = bridge.post("b", "/fhir/Communication", missing)
    assert resp.status_code == 201, resp.get_data(as_text=True)
    assert resp.get_json(force=True)["sender"] == {"reference": "Practitioner/other-therapist"}


def test_the_clinic_may_name_the_clinic(bridge):
    resp = bridge.post("clinic", "/fhir/Communication", _forged())
    assert resp.status_code == 201, resp.get_data(as_text=True)


@pytest.mark.parametrize("who,name", [("b", "practice-b"), ("clinic", "clinic-ehr")])
def test_meta_source_names_the_writer_and_its_readers_see_it(bridge, who, name):
    note = _forged({"reference": "Practitioner/other-therapist"} if who == "b" else CLINIC_SENDER)
    note["meta"]["source"] = "urn:fhir-kap:partner:clinic-ehr"  # a claim of its own is replaced
    rid = bridge.post(who, "/fhir/Communication", note).get_json(force=True)["id"]
    for reader in {who, "clinic"}:
        got = bridge.get(reader, f"/fhir/Communication/{rid}").get_json(force=True)
        assert got["meta"]["source"] == f"urn:fhir-kap:partner:{name}"


def test_a_forged_referral_requester_is_refused(bridge):
    sr = load("Example-ServiceRequest-referral-1.json")  # requester: practice-a's role
    resp = bridge.post("b", "/fhir/ServiceRequest", sr)
    assert resp.status_code == 403 and "bridge:authorship" in _rule(resp)
    assert bridge.post("a", "/fhir/ServiceRequest", sr).status_code == 201


# --- every author element of the table is enforced --------------------------------------------

_PRACTICE = Partner(
    "practice-b", ("system/*.*",), npis=("1245319599",), references=("Practitioner/other-therapist",)
)
_CLINIC = Partner("clinic-ehr", ("kap/clinic",), references=("Organization/kap-clinic",))
_CASES = [(rtype, a) for rtype, authors in AUTHORSHIP.items() for a in authors]


def _at(path: str, value: dict) -> dict:
    """A resource body with `value` at the dotted `path`."""
    head, _, rest = path.partition(".")
    return {head: _at(rest, value) if rest else value}


@pytest.mark.parametrize("rtype,author", _CASES, ids=[f"{t}.{a.path}" for t, a in _CASES])
def test_every_author_element_in_the_table_is_enforced(rtype, author):
    rule = Authorship(_PRACTICE, [_PRACTICE, _CLINIC], clinic_identifier=None, stored=lambda t, i: None)
    forged = {"resourceType": rtype, "subject": {"reference": "Patient/p"}, **_at(author.path, CLINIC_SENDER)}
    with pytest.raises(Forbidden) as err:
        rule.check(forged, None)
    assert err.value.issues[0].rule == "bridge:authorship"
    assert err.value.issues[0].expression.startswith(f"{rtype}.{author.path.split('.')[0]}")
    own = {"resourceType": rtype, **_at(author.path, {"reference": "Practitioner/other-therapist"})}
    rule.check(own, None)  # the partner itself: taken
    if author.client:
        rule.check(
            {
                "resourceType": rtype,
                "subject": {"reference": "Patient/p"},
                **_at(author.path, {"reference": "Patient/p"}),
            },
            None,
        )
    else:
        with pytest.raises(Forbidden):
            rule.check(
                {
                    "resourceType": rtype,
                    "subject": {"reference": "Patient/p"},
                    **_at(author.path, {"reference": "Patient/p"}),
                },
                None,
            )
    filled = rule.fill({"resourceType": rtype})
    if author.fill:
        assert author.path in filled
    clinic = Authorship(_CLINIC, [_PRACTICE, _CLINIC], clinic_identifier=None, stored=lambda t, i: None)
    clinic.check(copy.deepcopy(forged), None)  # clinic systems write on behalf of others
