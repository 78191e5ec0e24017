"""Issue 14, consent authorities scoped: a Consent's business identifier belongs to whoever first
wrote it; revocation is monotonic; an authority's Consent counts only for a client it referred;
a PractitionerRole widens a grant only from the clinic or the organisation itself.
"""

from __future__ import annotations

import pytest

from testkit.bridge import load

SCOPES = "system/*.read system/*.write kap/consent-authority"


def _authority(bridge, name="referrer-hub", **identity) -> str:
    svc = bridge.app.extensions["fhir_kap"]
    _, token = svc.partners.add(name, scopes=SCOPES, **identity)
    bridge.tokens[name] = token
    return name


def _note(bridge, recipient="Practitioner/ref-therapist") -> str:
    note = load("Example-Communication-note-1.json")
    note["recipient"] = [{"reference": recipient}]
    resp = bridge.post("clinic", "/fhir/Communication", note)
    assert resp.status_code == 201, resp.get_data(as_text=True)
    return resp.get_json(force=True)["id"]


def _rules(resp) -> str:
    return resp.get_data(as_text=True)


def test_another_partner_cannot_reuse_the_clinics_consent_identifier(bridge):
    hub = _authority(bridge, npis=["1003000126"])
    assert bridge.post("clinic", "/fhir/Consent", load("Consent-expired.json")).status_code == 201
    rid = _note(bridge)
    resp = bridge.post(hub, "/fhir/Consent", load("Consent-open-ended.json"))  # same identifier consent-1
    assert resp.status_code == 403 and "bridge:identifier-owner" in _rules(resp)
    assert bridge.get("a", f"/fhir/Communication/{rid}").status_code == 404


def test_re_posting_the_old_active_copy_never_undoes_a_revocation(bridge):
    active = load("Consent-open-ended.json")
    assert bridge.post("clinic", "/fhir/Consent", active).status_code == 201
    rid = _note(bridge)
    assert bridge.get("a", f"/fhir/Communication/{rid}").status_code == 200
    revoked = dict(active, status="inactive")
    assert bridge.post("clinic", "/fhir/Consent", revoked).status_code == 201
    assert bridge.get("a", f"/fhir/Communication/{rid}").status_code == 404
    again = bridge.post("clinic", "/fhir/Consent", active)  # the older state, stored anew
    assert again.status_code == 201
    assert bridge.get("a", f"/fhir/Communication/{rid}").status_code == 404
    signed_later = dict(active, dateTime="2025-06-01")  # a new signature does reactivate
    assert bridge.post("clinic", "/fhir/Consent", signed_later).status_code == 201
    assert bridge.get("a", f"/fhir/Communication/{rid}").status_code == 200


@pytest.mark.parametrize("referred", [False, True])
def test_an_authoritys_deny_counts_only_for_a_client_it_referred(bridge, referred):
    hub = _authority(bridge, references=["PractitionerRole/ref-therapist-role"])
    assert bridge.post("clinic", "/fhir/Consent", load("Consent-open-ended.json")).status_code == 201
    rid = _note(bridge)
    if referred:
        sr = bridge.post(hub, "/fhir/ServiceRequest", load("Example-ServiceRequest-referral-1.json"))
        assert sr.status_code == 201, sr.get_data(as_text=True)
    deny = bridge.post(hub, "/fhir/Consent", load("Consent-deny-ref-therapist.json"))
    assert deny.status_code == 201, deny.get_data(as_text=True)
    assert bridge.get("a", f"/fhir/Communication/{rid}").status_code == (404 if referred else 200)


@pytest.mark.parametrize("org_itself", [False, True])
def test_a_practitioner_role_widens_a_grant_only_from_the_organisation_itself(bridge, org_itself):
    refs = ["Practitioner/other-therapist"] + (["Organization/practice-org"] if org_itself else [])
    hub = _authority(bridge, references=refs)
    assert (
        bridge.post("clinic", "/fhir/Consent", load("Consent-grant-to-organization.json")).status_code == 201
    )
    rid = _note(bridge, "Practitioner/other-therapist")
    bridge.app.extensions["fhir_kap"].partners.revoke("practice-b")  # the reader is the hub now
    role = bridge.post(
        hub, "/fhir/PractitionerRole", load("PractitionerRole-other-therapist-at-granted-org.json")
    )
    assert role.status_code == 201, role.get_data(as_text=True)
    assert bridge.get(hub, f"/fhir/Communication/{rid}").status_code == (200 if org_itself else 404)
