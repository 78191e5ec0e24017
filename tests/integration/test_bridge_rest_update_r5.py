"""Issue 15, REST in an R5 deployment: a referral amended and withdrawn by PUT (its R5 Task
cancelled), a consent revoked by PUT (reads refused at once; R5 Consents name their client in
`subject` and are signed in `date`), and `$validate` against the R5 definitions."""

from __future__ import annotations

import json

import pytest

from fhir_kap.config import Release
from fhir_kap.records.mapping import Mapper
from fhir_kap.validation import Validator
from testkit.bridge import FHIR, load


def _as_r5(name: str) -> dict:
    mapper = Mapper.load()
    return mapper.to_fhir(mapper.from_fhir(load(name), Release.R4), Release.R5)


pytestmark = pytest.mark.bridge(fhir_version="R5")


def _put(bridge, who: str, path: str, body, **headers: str):
    return bridge.client.put(
        path, data=json.dumps(body), headers=bridge.h(who, **{"Content-Type": FHIR, **headers})
    )


def test_an_r5_referral_amended_then_withdrawn_by_put(bridge):
    posted = bridge.post("a", "/fhir/ServiceRequest", _as_r5("Example-ServiceRequest-referral-1.json"))
    assert posted.status_code == 201, posted.get_data(as_text=True)
    sr = posted.get_json(force=True)
    path = f"/fhir/ServiceRequest/{sr['id']}"
    amended = _put(bridge, "a", path, dict(sr, priority="urgent"), **{"If-Match": 'W/"1"'})
    assert amended.status_code == 200, amended.get_data(as_text=True)
    assert Validator.load(Release.R5).validate(amended.get_json(force=True)) == []
    withdrawn = _put(bridge, "a", path, dict(sr, status="revoked"), **{"If-Match": 'W/"2"'})
    assert withdrawn.status_code == 200
    task = bridge.get("a", f"/fhir/Task?focus=ServiceRequest/{sr['id']}").get_json(force=True)["entry"][0][
        "resource"
    ]
    assert task["status"] == "cancelled" and Validator.load(Release.R5).validate(task) == []


def test_an_r5_consent_revoked_by_put_refuses_the_next_read(bridge):
    posted = bridge.post("clinic", "/fhir/Consent", _as_r5("Consent-open-ended.json"))
    assert posted.status_code == 201, posted.get_data(as_text=True)
    consent = posted.get_json(force=True)
    note = bridge.post("clinic", "/fhir/Communication", _as_r5("Example-Communication-note-1.json"))
    rid = note.get_json(force=True)["id"]
    assert bridge.get("a", f"/fhir/Communication/{rid}").status_code == 200
    revoked = _put(
        bridge,
        "clinic",
        f"/fhir/Consent/{consent['id']}",
        dict(consent, status="inactive"),
        **{"If-Match": 'W/"1"'},
    )
    assert revoked.status_code == 200, revoked.get_data(as_text=True)
    assert bridge.get("a", f"/fhir/Communication/{rid}").status_code == 404


def test_validate_uses_the_r5_definitions(bridge):
    r5 = _as_r5("Example-ServiceRequest-referral-1.json")
    ok = bridge.post("a", "/fhir/ServiceRequest/$validate", r5)
    assert ok.status_code == 200 and all(
        i["severity"] == "information" for i in ok.get_json(force=True)["issue"]
    )
    r4_shape = bridge.post(
        "a", "/fhir/ServiceRequest/$validate", load("Example-ServiceRequest-referral-1.json")
    )
    assert r4_shape.status_code == 200
    assert any(
        i["severity"] == "error" for i in r4_shape.get_json(force=True)["issue"]
    )  # reasonCode is R4 only
