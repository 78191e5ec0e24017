"""Red-team findings on the inbound path (issue 14, "a partner must not be able to harm another
partner"; "searches that cost what they return"): F2, F6, F8, F11 b of the 2026-12-05 review.

Work is counted (calls, rows), never timed.
"""

from __future__ import annotations

from typing import Any

import pytest

from testkit.bridge import load

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
