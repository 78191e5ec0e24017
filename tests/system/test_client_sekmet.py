"""FhirClient against the real SEKMET FHIR R4 server: every happy path, auth, and refusals."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import pytest

from fhir_kap.client import (
    BearerAuth,
    FhirClient,
    SmartBackendAuth,
    entry_results,
    identifier_query,
    transaction_bundle,
)
from fhir_kap.config import Release
from fhir_kap.errors import InputError, ServerError

pytestmark = pytest.mark.sekmet

DATA = Path(__file__).resolve().parents[1] / "data" / "client"


def load(name: str) -> dict:
    return json.loads((DATA / name).read_text())


def fresh(name: str, value: str | None = None) -> dict:
    """A fixture resource with a business identifier nobody used before on this server."""
    res = load(name)
    res["identifier"][0]["value"] = value or f"T-{uuid.uuid4().hex[:12]}"
    return res


@pytest.fixture
def client(sekmet) -> FhirClient:
    return FhirClient(sekmet.base_url, sleep=lambda s: pytest.fail(f"unexpected retry wait {s}"))


def test_capabilities__negotiates_r4_and_lists_interactions(client):
    caps = client.capabilities()
    assert caps.fhir_version is Release.R4
    assert caps.supports("Communication", "create") and caps.supports("Patient", "search-type")
    assert {"Patient", "Communication"} <= caps.conditional_create
    assert caps.transaction and caps.batch
    assert client.capabilities() is caps  # cached


def test_preflight__passes_for_what_the_server_offers(client):
    caps = client.preflight(
        ["Patient", "Communication"],
        interactions=("create", "read", "update"),
        transaction=True,
        release=Release.R4,
    )
    assert caps.fhir_version is Release.R4


@pytest.mark.parametrize(
    "kwargs, expected",
    [
        (
            {"resource_types": ["Patient"], "release": Release.R5},
            "FHIR 5.0.0 needed but the server speaks 4.0.1",
        ),
        ({"resource_types": ["NotAType"]}, "resource type NotAType not supported"),
        (
            {"resource_types": ["Patient"], "interactions": ("create", "frobnicate")},
            "Patient lacks interaction(s) frobnicate",
        ),
    ],
)
def test_preflight__refuses_naming_what_is_missing(client, kwargs, expected):
    with pytest.raises(ServerError) as err:
        client.preflight(**kwargs)
    assert expected in err.value.summary
    assert err.value.retryable is False


def test_conditional_create__second_post_returns_the_existing_resource(client):
    patient = fresh("Patient-client.json", f"A&B {uuid.uuid4().hex[:8]}")  # needs URL-encoding
    query = identifier_query(patient)
    first = client.create(patient, if_none_exist=query)
    second = client.create(patient, if_none_exist=query)
    assert (first.status, first.created) == (201, True)
    assert (second.status, second.created) == (200, False)
    assert second.id == first.id and first.version_id == "1"
    ident = patient["identifier"][0]
    found = list(client.search("Patient", {"identifier": f"{ident['system']}|{ident['value']}"}))
    assert [r["id"] for r in found] == [first.id]


def test_conditional_create__several_matches_is_412(client):
    patient = fresh("Patient-client.json")
    client.create(patient)
    client.create(patient)  # two resources with the same identifier, created unconditionally
    with pytest.raises(ServerError) as err:
        client.create(patient, if_none_exist=identifier_query(patient))
    assert err.value.status == 412 and err.value.retryable is False
    assert err.value.summary.startswith("POST Patient: 412")


def test_update__with_current_version_then_stale_version_gives_412(client):
    created = client.create(fresh("Patient-client.json"))
    body = dict(created.resource, active=False)
    updated = client.update(body, if_match=created.version_id)
    assert (updated.status, updated.version_id, updated.created) == (200, "2", False)
    with pytest.raises(ServerError) as err:
        client.update(dict(body, gender="other"), if_match=f'W/"{created.version_id}"')
    assert err.value.status == 412
    assert err.value.url == f"{client.base_url}/Patient/{created.id}"


def test_read_vread_delete__round_trip(client):
    created = client.create(fresh("Patient-client.json"))
    client.update(dict(created.resource, active=False))
    assert client.read("Patient", created.id)["active"] is False
    assert client.vread("Patient", created.id, "1")["active"] is True
    assert client.delete("Patient", created.id) in (200, 204)
    with pytest.raises(ServerError) as err:
        client.read("Patient", created.id)
    assert err.value.status in (404, 410) and not err.value.retryable


def test_search__follows_next_links_to_the_end(client):
    family = f"Paging{uuid.uuid4().hex[:8]}"
    ids = set()
    for _ in range(25):
        patient = fresh("Patient-client.json")
        patient["name"][0]["family"] = family
        ids.add(client.create(patient).id)
    first = client.search_bundle("Patient", {"family": family, "_count": "10"})
    assert len(first["entry"]) == 10
    assert any(link["relation"] == "next" for link in first["link"]), "server should page"
    got = [r["id"] for r in client.search("Patient", {"family": family, "_count": "10"})]
    assert sorted(got) == sorted(ids)


def test_transaction__server_resolves_urn_uuid_references(client):
    patient = fresh("Patient-client.json")
    note = fresh("Communication-continuity-note.json")
    bundle = transaction_bundle([patient, note])
    response = client.transaction(bundle)
    results = entry_results(response)
    assert [r.status for r in results] == [201, 201]
    stored_note = client.read("Communication", results[1].id)
    assert stored_note["subject"]["reference"].endswith(f"Patient/{results[0].id}")
    again = entry_results(client.transaction(transaction_bundle([patient, note])))
    assert [(r.status, r.id) for r in again] == [(200, results[0].id), (200, results[1].id)]


def test_batch__entries_succeed_or_fail_one_by_one(client):
    """A batch Bundle: each entry stands alone (here two independent Patients, one of them
    refused), and a Bundle of another type never leaves the client."""
    good = fresh("Patient-client.json")
    bad = fresh("Patient-client.json")
    bad["gender"] = 7  # wrong JSON type: the server refuses this entry alone
    bundle = transaction_bundle([good, bad], conditional=False)
    bundle["type"] = "batch"
    results = entry_results(client.batch(bundle))
    assert results[0].status == 201 and results[0].id
    assert results[1].status >= 400
    assert client.read("Patient", results[0].id)["identifier"] == good["identifier"]
    with pytest.raises(InputError) as err:
        client.batch(transaction_bundle([good]))
    assert err.value.issues[0].rule == "fhir:bundle-type"


def test_server_rejection__becomes_server_error_with_outcome(client):
    note = fresh("Communication-continuity-note.json")
    note["bogusElement"] = True
    with pytest.raises(ServerError) as err:
        client.create(note)
    e = err.value
    assert 400 <= e.status < 500 and e.retryable is False
    assert e.remote_outcome["resourceType"] == "OperationOutcome"
    assert e.summary.startswith(f"POST Communication: {e.status}")
    assert any(i.message.startswith("server reported") and i.rule == "remote-server" for i in e.issues)
    said = [i.get("diagnostics") or (i.get("details") or {}).get("text") for i in e.remote_outcome["issue"]]
    assert all(text not in str(e.operation_outcome()) for text in said if text)  # free text never shown


# ---- auth (server with bearer + SMART)


def test_bearer_auth__is_accepted(sekmet_auth):
    c = FhirClient(sekmet_auth.base_url, auth=BearerAuth(sekmet_auth.token))
    created = c.create(fresh("Patient-client.json"))
    assert c.read("Patient", created.id)["id"] == created.id


@pytest.mark.parametrize("auth", [None, BearerAuth("not-the-token")], ids=["no-token", "wrong-token"])
def test_unauthenticated__is_401_not_retried(sekmet_auth, auth):
    c = FhirClient(sekmet_auth.base_url, auth=auth, sleep=lambda s: pytest.fail("retried"))
    with pytest.raises(ServerError) as err:
        c.read("Patient", "x")
    assert err.value.status == 401 and err.value.retryable is False
    assert "not-the-token" not in str(err.value) and "not-the-token" not in repr(c)


def smart(server, kind: str, **kw) -> SmartBackendAuth:
    if kind == "client_secret":
        return SmartBackendAuth(server.client_id, client_secret=server.client_secret, **kw)
    return SmartBackendAuth(
        server.jwt_client_id, private_key_pem=server.private_key_pem, key_id="kap-test-1", **kw
    )


@pytest.mark.parametrize("kind", ["client_secret", "private_key_jwt"])
def test_smart_backend__discovers_token_endpoint_and_caches_the_token(sekmet_auth, kind):
    auth = smart(sekmet_auth, kind)
    c = FhirClient(sekmet_auth.base_url, auth=auth)
    created = c.create(fresh("Patient-client.json"))
    c.read("Patient", created.id)
    list(c.search("Patient", {"_id": created.id}))
    assert auth.token_url == f"{sekmet_auth.root_url}/auth/token"
    assert auth.token_requests == 1


@pytest.mark.parametrize("kind", ["client_secret", "private_key_jwt"])
def test_smart_backend__renews_the_token_before_it_expires(sekmet_auth, kind):
    now = [time.time()]
    auth = smart(sekmet_auth, kind, clock=lambda: now[0])
    c = FhirClient(sekmet_auth.base_url, auth=auth)
    c.capabilities()
    c.search_bundle("Patient", {"_count": "1"})
    now[0] += 3600 - 61  # SEKMET tokens live 3600 s: still outside the 60 s margin
    c.search_bundle("Patient", {"_count": "1"})
    assert auth.token_requests == 1
    now[0] += 2  # inside the margin: a new token (for private_key_jwt: a fresh jti is accepted)
    c.search_bundle("Patient", {"_count": "1"})
    assert auth.token_requests == 2


def test_smart_backend__wrong_secret_is_401_without_leaking_it(sekmet_auth):
    auth = SmartBackendAuth(sekmet_auth.client_id, client_secret="wrong-secret-value")
    c = FhirClient(sekmet_auth.base_url, auth=auth)
    with pytest.raises(ServerError) as err:
        c.read("Patient", "x")
    assert err.value.status == 401 and "invalid_client" in err.value.summary
    assert "wrong-secret-value" not in str(err.value) and "wrong-secret-value" not in repr(auth)


def test_return_minimal__ids_and_versions_come_from_location(client):
    single = client.create(fresh("Patient-client.json"), prefer="return=minimal")
    assert single.resource is None and single.id and single.version_id == "1"
    response = client.transaction(transaction_bundle([fresh("Patient-client.json")]), prefer="return=minimal")
    [entry] = entry_results(response)
    assert entry.created and entry.resource is None
    assert client.read("Patient", entry.id)["meta"]["versionId"] == entry.version_id
