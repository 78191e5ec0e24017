"""Wrongly typed elements are bad input, never a server error: create, PUT, conditional PUT answer
a 4xx OperationOutcome naming the field and the rule, and `$validate` (a read-only partner's
too) answers 200 with the error issues (the validator never raises: tests/unit/test_validator_robustness.py)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest

from testkit.bridge import FHIR, is_outcome, load

pytestmark = pytest.mark.bridge(consent="Consent-open-ended.json")


def _body(name: str, edit: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    doc = load(name)
    doc.pop("id", None)
    edit(doc)
    return doc


def _scope(d: dict[str, Any]) -> None:
    d["scope"] = {"coding": 5}


def _identifier(d: dict[str, Any]) -> None:
    d["identifier"] = 5


def _category(d: dict[str, Any]) -> None:
    d["category"] = [{"coding": 5}]


def _security_code(d: dict[str, Any]) -> None:
    d["meta"]["security"][0]["code"] = []


def _profile(d: dict[str, Any]) -> None:
    d.setdefault("meta", {})["profile"] = 5


CASES = [
    ("clinic", "POST", "/fhir/Consent", "Consent-open-ended.json", _scope, "Consent.scope.coding"),
    ("clinic", "POST", "/fhir/Consent", "Consent-open-ended.json", _identifier, "Consent.identifier"),
    ("a", "POST", "/fhir/ServiceRequest", "Example-ServiceRequest-referral-1.json", _category,
     "ServiceRequest.category[0].coding"),
    ("a", "PUT", "/fhir/ServiceRequest?identifier=x|y", "Example-ServiceRequest-referral-1.json", _category,
     "ServiceRequest.category[0].coding"),
    ("a", "POST", "/fhir/ServiceRequest", "Example-ServiceRequest-referral-1.json", _profile,
     "ServiceRequest.meta.profile"),
    ("a", "PUT", "/fhir/ServiceRequest?identifier=x|y", "Example-ServiceRequest-referral-1.json", _profile,
     "ServiceRequest.meta.profile"),
    ("clinic", "POST", "/fhir/Procedure", "Example-Procedure-session-1.json", _security_code,
     "Procedure.meta.security[0].code"),
]  # fmt: skip

VALIDATE = [
    ("/fhir/Procedure/$validate", _body("Example-Procedure-session-1.json", _security_code),
     "Procedure.meta.security[0].code"),
    ("/fhir/Consent/$validate", {"resourceType": "Consent", "scope": {"coding": 5}}, "Consent.scope.coding"),
    ("/fhir/Patient/$validate", {"resourceType": "Patient", "meta": {"profile": 5}}, "Patient.meta.profile"),
    ("/fhir/ServiceRequest/$validate", {"resourceType": "ServiceRequest", "meta": {"profile": 5}},
     "ServiceRequest.meta.profile"),
]  # fmt: skip


def _expressions(resp: Any) -> set[str]:
    body = resp.get_json(force=True)
    return {e for i in body["issue"] if i["severity"] in ("error", "fatal") for e in i.get("expression", [])}


@pytest.mark.parametrize(("who", "method", "path", "fixture", "edit", "expression"), CASES)
def test_a_wrongly_typed_element_is_a_4xx_outcome_naming_it(
    bridge, who, method, path, fixture, edit, expression
):
    body = _body(fixture, edit)
    if method == "POST":
        resp = bridge.post(who, path, body)
    else:
        resp = bridge.client.put(path, data=json.dumps(body), headers=bridge.h(who, **{"Content-Type": FHIR}))
    assert 400 <= resp.status_code < 500, resp.get_data(as_text=True)
    assert is_outcome(resp)
    assert expression in _expressions(resp), resp.get_data(as_text=True)


@pytest.mark.parametrize(("path", "body", "expression"), VALIDATE)
def test_validate_answers_the_errors_of_a_wrongly_typed_element(bridge, path, body, expression):
    resp = bridge.post("reader", path, body)
    assert resp.status_code == 200, resp.get_data(as_text=True)
    assert is_outcome(resp)
    assert expression in _expressions(resp), resp.get_data(as_text=True)


def test_validate_against_a_kap_profile_with_a_wrongly_typed_meta_profile_is_no_500(bridge):
    resp = bridge.post(
        "reader",
        "/fhir/ServiceRequest/$validate?profile=http://fhir-kap.example/StructureDefinition/kap-referral",
        {"resourceType": "ServiceRequest", "meta": {"profile": 5}},
    )
    assert resp.status_code == 200 and is_outcome(resp), resp.get_data(as_text=True)
    assert _expressions(resp)  # the referral's errors, named
