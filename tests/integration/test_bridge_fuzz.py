"""Fuzz: thousands of generated bad bodies get only 4xx OperationOutcomes, and nothing is stored."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from testkit.bridge import FHIR, load

NOTE = load("Example-Communication-note-1.json")
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
not_a_string = json_values.filter(lambda v: not isinstance(v, str))


def _mutated(field: str, value: object) -> bytes:
    return json.dumps({**NOTE, field: value}).encode()


bad_bodies = st.one_of(
    st.binary(max_size=300),
    json_values.filter(lambda v: not isinstance(v, dict)).map(lambda v: json.dumps(v).encode()),
    st.dictionaries(st.text(max_size=10), json_values, max_size=5).map(lambda d: json.dumps(d).encode()),
    st.text(max_size=30).filter(lambda t: t != "Communication").map(lambda t: _mutated("resourceType", t)),
    st.text(max_size=30)
    .filter(
        lambda t: (
            t
            not in (
                "preparation",
                "in-progress",
                "not-done",
                "on-hold",
                "stopped",
                "completed",
                "entered-in-error",
                "unknown",
            )
        )
    )
    .map(lambda t: _mutated("status", t)),
    not_a_string.map(lambda v: _mutated("status", v)),
    json_values.filter(lambda v: not isinstance(v, dict)).map(lambda v: _mutated("subject", v)),
    json_values.map(lambda v: _mutated("zzUnknownElement", v)),
    st.integers(1, 200).map(lambda n: json.dumps(NOTE).encode()[:-n]),
    st.sampled_from(["payload", "subject", "category"]).map(  # a missing sender is filled from the poster
        lambda k: json.dumps({x: y for x, y in NOTE.items() if x != k}).encode()
    ),
)


@pytest.mark.slow
@settings(max_examples=1500, deadline=None, suppress_health_check=list(HealthCheck))
@given(body=bad_bodies, ctype=st.sampled_from([FHIR, "application/json", FHIR + "; charset=utf-8"]))
def test_generated_bad_bodies_get_4xx_operation_outcome_and_store_nothing(bridge, body, ctype):
    resp = bridge.client.post(
        "/fhir/Communication", data=body, headers=bridge.h("a", **{"Content-Type": ctype})
    )
    assert 400 <= resp.status_code < 500, (resp.status_code, body[:200])
    outcome = resp.get_json(force=True, silent=True)
    assert outcome["resourceType"] == "OperationOutcome" and outcome["issue"]
    assert all(i["severity"] in ("error", "fatal") for i in outcome["issue"])
    assert bridge.app.extensions["fhir_kap"].store.counts() == {}


@pytest.mark.slow
@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(body=bad_bodies)
def test_generated_bad_transaction_entries_store_nothing(bridge, body):
    try:
        resource = json.loads(body)
    except ValueError:
        resource = body.decode("latin-1")
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {"resource": NOTE, "request": {"method": "POST", "url": "Communication"}},
            {"resource": resource, "request": {"method": "POST", "url": "Communication"}},
        ],
    }
    resp = bridge.client.post(
        "/fhir", data=json.dumps(bundle), headers=bridge.h("a", **{"Content-Type": FHIR})
    )
    assert 400 <= resp.status_code < 500
    assert resp.get_json(force=True)["resourceType"] == "OperationOutcome"
    assert bridge.app.extensions["fhir_kap"].store.counts() == {}
