r"""Red-team finding F7 (2026-12-05) over the bridge app's test client: a condition's value is read
with FHIR's search escapes (R4 search.html, "Escaping Search Parameters"), the same way by a
conditional update (`PUT Type?identifier=`), a conditional create (If-None-Exist, a transaction's
conditional PUT) and a search.

`identifier=SYSTEM|a\,b` is the one value `a,b`. The conditional update used to give up on the
`\` and run the condition as a search that split it at the comma into `SYSTEM|a\` OR `b`, a bare
code matching any identifier whose value is `b`: the partner's PUT replaced its Patient `b`.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import quote

import pytest

from fhir_kap.client import token_query
from testkit.bridge import FHIR

SYSTEM = "http://b.example/mrn"


def _patient(value: str, family: str) -> dict[str, Any]:
    return {
        "resourceType": "Patient",
        "identifier": [{"system": SYSTEM, "value": value}],
        "name": [{"family": family}],
    }


def _post(bridge, value: str, family: str, **headers: str) -> dict[str, Any]:
    resp = bridge.post("a", "/fhir/Patient", _patient(value, family), **headers)
    assert resp.status_code == 201, resp.get_data(as_text=True)
    return resp.get_json(force=True)


def _put(bridge, query: str, body: dict[str, Any]):
    return bridge.client.put(
        f"/fhir/Patient?{query}", data=json.dumps(body), headers=bridge.h("a", **{"Content-Type": FHIR})
    )


def _found(bridge, query: str) -> list[str]:
    resp = bridge.get("a", f"/fhir/Patient?{query}")
    assert resp.status_code == 200, resp.get_data(as_text=True)
    return sorted(e["resource"]["identifier"][0]["value"] for e in resp.get_json(force=True).get("entry", []))


def _everyone(bridge) -> dict[str, dict[str, Any]]:
    resp = bridge.get("a", "/fhir/Patient?_count=50")
    return {e["resource"]["id"]: e["resource"] for e in resp.get_json(force=True).get("entry", [])}


def test_conditional_update_with_an_escaped_comma_never_touches_the_patient_b(bridge):
    b = _post(bridge, "b", "Bee")
    # the reviewer's request, byte for byte: identifier=http://b.example/mrn|a\,b
    query = "identifier=http%3A%2F%2Fb.example%2Fmrn%7Ca%5C%2Cb"

    created = _put(bridge, query, _patient("a,b", "Comma"))
    assert created.status_code == 201, created.get_data(as_text=True)
    new = created.get_json(force=True)
    assert new["id"] != b["id"] and new["identifier"][0]["value"] == "a,b"

    again = _put(bridge, query, _patient("a,b", "Comma Again"))  # now it matches exactly that one
    assert again.status_code == 200, again.get_data(as_text=True)
    assert again.get_json(force=True)["id"] == new["id"]

    everyone = _everyone(bridge)
    assert set(everyone) == {b["id"], new["id"]}
    kept = everyone[b["id"]]
    assert kept["meta"]["versionId"] == "1"
    assert kept["name"] == [{"family": "Bee"}] and kept["identifier"] == [{"system": SYSTEM, "value": "b"}]
    assert everyone[new["id"]]["name"] == [{"family": "Comma Again"}]


def test_search_reads_escapes_and_still_ors_at_a_bare_comma(bridge):
    for value in ("a", "b", "a,b", "x|y", "c\\d", "m$n"):
        _post(bridge, value, "P")
    assert _found(bridge, quote(f"identifier={SYSTEM}|a\\,b", safe="=")) == ["a,b"]
    assert _found(bridge, quote(f"identifier={SYSTEM}|a,{SYSTEM}|b", safe="=")) == ["a", "b"]
    assert _found(bridge, quote(f"identifier={SYSTEM}|a\\,b,{SYSTEM}|b", safe="=")) == ["a,b", "b"]
    assert _found(bridge, quote("identifier=a\\,b", safe="=")) == ["a,b"]  # a bare code, escaped
    assert _found(bridge, quote(f"identifier={SYSTEM}|x\\|y", safe="=")) == ["x|y"]
    assert _found(bridge, quote("identifier=x\\|y", safe="=")) == ["x|y"]  # one code, not system x
    assert _found(bridge, quote(f"identifier={SYSTEM}|c\\\\d", safe="=")) == ["c\\d"]
    assert _found(bridge, quote(f"identifier={SYSTEM}|m\\$n", safe="=")) == ["m$n"]
    # an escaped backslash before a bare comma: the value `a\` OR the code b
    assert _found(bridge, quote(f"identifier={SYSTEM}|a\\\\,b", safe="=")) == ["b"]


def test_if_none_exist_with_an_escaped_comma_creates_once_and_never_returns_b(bridge):
    b = _post(bridge, "b", "Bee")
    condition = f"identifier={SYSTEM}|a\\,b"
    first = bridge.post("a", "/fhir/Patient", _patient("a,b", "Comma"), **{"If-None-Exist": condition})
    assert first.status_code == 201, first.get_data(as_text=True)
    made = first.get_json(force=True)
    assert made["id"] != b["id"] and made["identifier"][0]["value"] == "a,b"

    second = bridge.post("a", "/fhir/Patient", _patient("a,b", "Comma"), **{"If-None-Exist": condition})
    assert second.status_code == 200, second.get_data(as_text=True)
    assert second.get_json(force=True)["id"] == made["id"]
    assert set(_everyone(bridge)) == {b["id"], made["id"]}


def test_a_transactions_conditional_put_reads_the_escape_too(bridge):
    b = _post(bridge, "b", "Bee")
    entry = {
        "resource": _patient("a,b", "Comma"),
        "request": {"method": "PUT", "url": f"Patient?identifier={SYSTEM}|a\\,b"},
    }
    resp = bridge.post("a", "/fhir", {"resourceType": "Bundle", "type": "transaction", "entry": [entry]})
    assert resp.status_code == 200, resp.get_data(as_text=True)
    assert resp.get_json(force=True)["entry"][0]["response"]["status"].startswith("201")
    kept = _everyone(bridge)[b["id"]]
    assert kept["meta"]["versionId"] == "1" and kept["name"] == [{"family": "Bee"}]


@pytest.mark.parametrize("value", ["a,b", "x|y", "c\\d", "m$n", "all,of|them\\$"])
def test_the_projects_own_client_condition_finds_what_it_wrote(bridge, value):
    """`client.token_query` escapes a value for a query; the bridge reads it back as that value."""
    made = _post(bridge, value, "First")
    _post(bridge, "b", "Bee")
    resp = _put(bridge, token_query(SYSTEM, value), _patient(value, "Second"))
    assert resp.status_code == 200, resp.get_data(as_text=True)
    assert resp.get_json(force=True)["id"] == made["id"]
    assert _found(bridge, token_query(SYSTEM, value)) == [value]


def test_a_create_whose_identifier_has_a_comma_is_never_taken_for_a_resend_of_another(bridge):
    """A create looks the sender's resource with the same business identifier up, to answer a
    resend with what was stored. The lookup reads the identifier itself (exactly), and the
    implicit condition built from it is escaped (`SYSTEM|a\\,b`), so whatever reads that
    condition agrees: the Patient `a,b` is never taken for the Patient `b`."""
    first = _post(bridge, "b", "Bee")
    created = _post(bridge, "a,b", "Ayebee")  # 201: a new Patient, not the b one
    assert created["id"] != first["id"] and created["identifier"][0]["value"] == "a,b"
    again = bridge.post("a", "/fhir/Patient", _patient("a,b", "Ayebee"))
    assert again.status_code == 200 and again.get_json(force=True)["id"] == created["id"]  # the resend
