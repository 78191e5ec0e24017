"""The FHIR facade over HTTP (Flask test client): each endpoint and each error class."""

from __future__ import annotations

import email.utils
import json
import uuid
from datetime import UTC, datetime

import pytest

from testkit.bridge import FHIR, is_outcome, load, make_bridge


def test_metadata_is_an_honest_capability_statement(bridge):
    resp = bridge.client.get("/fhir/metadata")
    cs = resp.get_json(force=True)
    assert resp.status_code == 200 and cs["resourceType"] == "CapabilityStatement"
    assert cs["fhirVersion"] == "4.0.1"
    types = {r["type"]: r for r in cs["rest"][0]["resource"]}
    from fhir_kap.bridge.subscriptions import capability  # Subscription (and R5 SubscriptionTopic)

    with bridge.app.app_context():
        subscribed = {r["type"] for r in capability(bridge.app.extensions["fhir_kap"].release)[0]}
    assert set(types) - subscribed == {
        "ServiceRequest",
        "Consent",
        "Communication",
        "Procedure",
        "Patient",
        "Practitioner",
        "PractitionerRole",
        "Organization",
        "Condition",
        "AllergyIntolerance",
        "MedicationStatement",
        "MedicationRequest",
        "Observation",
        "DocumentReference",
        "QuestionnaireResponse",
        "Task",
    }
    assert "create" not in {i["code"] for i in types["Task"]["interaction"]}
    assert {"patient", "identifier", "status", "recipient", "category", "based-on"} <= {
        p["name"] for p in types["Communication"]["searchParam"]
    }


def test_metadata_follows_the_configured_release(tmp_path):
    bridge = make_bridge(tmp_path, fhir_version="R5")
    assert bridge.client.get("/fhir/metadata").get_json(force=True)["fhirVersion"] == "5.0.0"


@pytest.mark.parametrize(
    "name",
    [
        "Example-Communication-note-1.json",
        "Example-ServiceRequest-referral-1.json",
        "Consent-open-ended.json",
        "Example-Practitioner-ref-therapist.json",
    ],
)
def test_create__answers_201_with_location_etag_and_last_modified(bridge, name):
    resource = load(name)
    resp = bridge.post("a", f"/fhir/{resource['resourceType']}", resource)
    assert resp.status_code == 201, resp.get_data(as_text=True)
    body = resp.get_json(force=True)
    assert (
        resp.headers["Location"]
        == f"http://bridge.test/fhir/{resource['resourceType']}/{body['id']}/_history/1"
    )
    assert resp.headers["ETag"] == 'W/"1"' and resp.headers["Last-Modified"].endswith("GMT")
    assert resp.headers["Content-Type"].startswith(FHIR)


@pytest.mark.parametrize(
    "prefer,expect",
    [
        ("return=minimal", None),
        ("return=representation", "Communication"),
        ("return=OperationOutcome", "OperationOutcome"),
    ],
)
def test_create__honours_prefer(bridge, prefer, expect):
    resp = bridge.post("a", "/fhir/Communication", load("Example-Communication-note-1.json"), Prefer=prefer)
    assert resp.status_code == 201
    if expect is None:
        assert resp.get_data() == b""
    else:
        assert resp.get_json(force=True)["resourceType"] == expect


def test_create__if_none_exist_returns_the_existing_resource(bridge):
    note = load("Example-Communication-note-1.json")
    cond = {"If-None-Exist": "identifier=http://fhir-kap.example/sid/note|note-1"}
    first = bridge.post("a", "/fhir/Communication", note, **cond)
    again = bridge.post("a", "/fhir/Communication", note, **cond)
    assert (first.status_code, again.status_code) == (201, 200)
    assert first.headers["Location"] == again.headers["Location"]


def test_create__if_none_exist_does_not_see_another_partners_resources(bridge):
    note = load("Example-Communication-note-1.json")
    cond = {"If-None-Exist": "identifier=http://fhir-kap.example/sid/note|note-1"}
    assert bridge.post("a", "/fhir/Communication", note, **cond).status_code == 201
    assert bridge.post("b", "/fhir/Communication", note, **cond).status_code == 201


def test_read_vread_and_history_of_own_resource(bridge):
    created = bridge.post("a", "/fhir/Communication", load("Example-Communication-note-1.json")).get_json(
        force=True
    )
    rid = created["id"]
    read = bridge.get("a", f"/fhir/Communication/{rid}")
    assert (
        read.status_code == 200 and read.get_json(force=True) == created and read.headers["ETag"] == 'W/"1"'
    )
    assert bridge.get("a", f"/fhir/Communication/{rid}/_history/1").get_json(force=True) == created
    hist = bridge.get("a", f"/fhir/Communication/{rid}/_history").get_json(force=True)
    assert hist["type"] == "history" and [e["resource"]["id"] for e in hist["entry"]] == [rid]
    assert bridge.get("a", f"/fhir/Communication/{rid}/_history/2").status_code == 404


def test_search_with_parameters_and_paging_links(bridge):
    for n in range(3):
        note = load("Example-Communication-note-1.json")
        note["identifier"][0]["value"] = f"note-{n}"  # three notes (the same one three times is one)
        bridge.post("a", "/fhir/Communication", note)
    page = bridge.get("a", "/fhir/Communication?patient=client-1&status=completed&_count=2").get_json(
        force=True
    )
    assert page["type"] == "searchset" and page["total"] == 3 and len(page["entry"]) == 2
    nxt = next(link["url"] for link in page["link"] if link["relation"] == "next")
    page2 = bridge.get("a", nxt.replace("http://bridge.test", "")).get_json(force=True)
    assert len(page2["entry"]) == 1
    assert not [link for link in page2["link"] if link["relation"] == "next"]
    none = bridge.get("a", "/fhir/Communication?category=safety").get_json(force=True)
    assert none["total"] == 0


def test_transaction_resolves_urn_uuid_references_all_or_nothing(bridge):
    prac, note = load("Example-Practitioner-ref-therapist.json"), load("Example-Communication-note-1.json")
    urn = f"urn:uuid:{uuid.uuid4()}"
    note["recipient"] = [{"reference": urn}]
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {"fullUrl": urn, "resource": prac, "request": {"method": "POST", "url": "Practitioner"}},
            {"resource": note, "request": {"method": "POST", "url": "Communication"}},
        ],
    }
    resp = bridge.post("a", "/fhir", bundle)
    assert resp.status_code == 200, resp.get_data(as_text=True)
    out = resp.get_json(force=True)
    assert out["type"] == "transaction-response"
    assert [e["response"]["status"] for e in out["entry"]] == ["201 Created", "201 Created"]
    prac_ref = out["entry"][0]["response"]["location"].rsplit("/_history", 1)[0]
    note_url = out["entry"][1]["response"]["location"]
    stored = bridge.get("a", "/fhir/" + note_url).get_json(force=True)
    assert stored["recipient"] == [{"reference": prac_ref}]


def test_transaction_with_one_bad_entry_stores_nothing(bridge):
    bad = load("Example-Communication-note-1.json")
    bad["status"] = "bogus"
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "resource": load("Example-Communication-note-1.json"),
                "request": {"method": "POST", "url": "Communication"},
            },
            {"resource": bad, "request": {"method": "POST", "url": "Communication"}},
        ],
    }
    resp = bridge.post("a", "/fhir", bundle)
    assert resp.status_code == 422 and is_outcome(resp)
    assert "/entry/1/resource/status" in resp.get_data(as_text=True)
    assert bridge.get("a", "/fhir/Communication").get_json(force=True)["total"] == 0


def test_batch_processes_entries_independently(bridge):
    bad = load("Example-Communication-note-1.json")
    bad["status"] = "bogus"
    bundle = {
        "resourceType": "Bundle",
        "type": "batch",
        "entry": [
            {
                "resource": load("Example-Communication-note-1.json"),
                "request": {"method": "POST", "url": "Communication"},
            },
            {"resource": bad, "request": {"method": "POST", "url": "Communication"}},
        ],
    }
    out = bridge.post("a", "/fhir", bundle).get_json(force=True)
    assert out["type"] == "batch-response"
    assert [e["response"]["status"] for e in out["entry"]] == ["201 Created", "422 Unprocessable Entity"]
    assert bridge.get("a", "/fhir/Communication").get_json(force=True)["total"] == 1


def _note() -> bytes:
    return json.dumps(load("Example-Communication-note-1.json")).encode()


@pytest.mark.parametrize(
    "case,path,body,headers,status,rule",
    [
        ("malformed JSON", "/fhir/Communication", b'{"resourceType": ', {}, 400, "json:syntax"),
        ("invalid UTF-8", "/fhir/Communication", b'{"resourceType": "\xff"}', {}, 400, "json:syntax"),
        ("empty body", "/fhir/Communication", b"", {}, 400, "json:empty"),
        ("not an object", "/fhir/Communication", b"[1, 2]", {}, 400, "fhir:resource"),
        (
            "type mismatch",
            "/fhir/Communication",
            json.dumps(load("Example-ServiceRequest-referral-1.json")).encode(),
            {},
            400,
            "http:type-mismatch",
        ),
        ("unknown type", "/fhir/Basic", b"{}", {}, 404, "fhir:resource-type"),
        (
            "wrong JSON type",
            "/fhir/Communication",
            json.dumps({**load("Example-Communication-note-1.json"), "status": 5}).encode(),
            {},
            422,
            "schema:type",
        ),
        (
            "text/plain",
            "/fhir/Communication",
            _note(),
            {"Content-Type": "text/plain"},
            415,
            "http:content-type",
        ),
        (
            "form",
            "/fhir/Communication",
            _note(),
            {"Content-Type": "application/x-www-form-urlencoded"},
            415,
            "http:content-type",
        ),
        (
            "latin-1",
            "/fhir/Communication",
            _note(),
            {"Content-Type": "application/fhir+json; charset=latin-1"},
            415,
            "http:charset",
        ),
        ("too large", "/fhir/Communication", b'{"a": "' + b"x" * 1_100_000 + b'"}', {}, 413, "http:413"),
        (
            "bad If-None-Exist",
            "/fhir/Communication",
            _note(),
            {"If-None-Exist": "&&=="},
            400,
            "http:if-none-exist",
        ),
        (
            "transaction DELETE",
            "/fhir",
            json.dumps(
                {
                    "resourceType": "Bundle",
                    "type": "transaction",
                    "entry": [
                        {
                            "resource": load("Example-Communication-note-1.json"),
                            "request": {"method": "DELETE", "url": "Communication/x"},
                        }
                    ],
                }
            ).encode(),
            {},
            400,
            "bridge:bundle-method",
        ),
        (
            "transaction PUT by id",
            "/fhir",
            json.dumps(
                {
                    "resourceType": "Bundle",
                    "type": "transaction",
                    "entry": [
                        {
                            "resource": load("Example-Communication-note-1.json"),
                            "request": {"method": "PUT", "url": "Communication/x"},
                        }
                    ],
                }
            ).encode(),
            {},
            400,
            "bridge:bundle-url",
        ),
        (
            "bundle type",
            "/fhir",
            b'{"resourceType": "Bundle", "type": "history"}',
            {},
            400,
            "bridge:bundle-type",
        ),
    ],
)
def test_bad_requests_answer_4xx_operation_outcome_naming_the_rule(
    bridge, case, path, body, headers, status, rule
):
    resp = bridge.post("a", path, body, **headers)
    assert resp.status_code == status, resp.get_data(as_text=True)
    assert is_outcome(resp)
    assert rule in resp.get_data(as_text=True)
    assert bridge.get("clinic", "/fhir/Communication").get_json(force=True)["total"] == 0


@pytest.mark.parametrize(
    "path,status",
    [
        ("/fhir/Communication/" + "a" * 65, 400),
        ("/fhir/Communication/caf%C3%A9", 400),
        ("/fhir/Communication/..%2F..%2Fetc%2Fpasswd", 404),
        ("/fhir/Communication/a b", 400),
        ("/fhir/Communication/x/_history/abc", 404),
        ("/fhir/Communication/x/_history/-1", 404),
        ("/fhir/Observation/x", 404),
        ("/fhir/Communication?_count=abc", 400),
        ("/fhir/Communication?_count=100000", 400),
        ("/fhir/Communication?nonsense=1", 400),
        ("/fhir/Communication?_lastUpdated=yesterday", 400),
        ("/nowhere", 404),
    ],
)
def test_hostile_ids_and_parameters_answer_4xx_operation_outcome(bridge, path, status):
    resp = bridge.get("a", path)
    assert resp.status_code == status and is_outcome(resp)


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic abc"}])
def test_requests_without_a_valid_token_are_401(bridge, headers):
    resp = bridge.client.get("/fhir/Communication", headers=headers)
    assert (
        resp.status_code == 401 and is_outcome(resp) and resp.headers["WWW-Authenticate"].startswith("Bearer")
    )


def test_revoked_token_is_401(bridge):
    bridge.app.extensions["fhir_kap"].partners.revoke("practice-a")
    assert bridge.get("a", "/fhir/Communication").status_code == 401


def test_scopes_limit_interactions(bridge):
    resp = bridge.post("reader", "/fhir/Communication", load("Example-Communication-note-1.json"))
    assert resp.status_code == 403 and "auth:scope" in resp.get_data(as_text=True)
    assert bridge.get("reader", "/fhir/Consent").status_code == 403
    assert bridge.post("a", "/kap/records", b"{}").status_code == 403


def test_method_not_allowed_is_an_operation_outcome(bridge):
    resp = bridge.client.delete("/fhir/metadata", headers=bridge.h("a"))
    assert resp.status_code in (404, 405) and is_outcome(resp)


def test_health_and_readiness(bridge):
    assert bridge.client.get("/healthz").get_json() == {"status": "ok"}
    ready = bridge.client.get("/readyz")
    assert ready.status_code == 200 and ready.get_json()["database"] == "sqlite"


def test_after_a_failed_disk_sync_writes_get_503_and_readiness_fails(bridge, monkeypatch):
    import errno

    from fhir_kap.storage.sql import walsync as dbmod

    def failing(fd: int) -> None:
        raise OSError(errno.EIO, "simulated")

    monkeypatch.setattr(dbmod, "_fdatasync", failing)
    first = bridge.post("a", "/fhir/Communication", load("Example-Communication-note-1.json"))
    assert first.status_code == 503 and is_outcome(first)
    assert "may or may not have been kept" in first.get_json(force=True)["issue"][0]["details"]["text"]
    monkeypatch.undo()
    later = bridge.post("a", "/fhir/Communication", load("Example-Communication-note-1.json"))
    assert (
        later.status_code == 503 and "restarted" in later.get_json(force=True)["issue"][0]["details"]["text"]
    )
    ready = bridge.client.get("/readyz")
    assert ready.status_code == 503 and ready.get_json() == {
        "status": "unavailable",
        "database": "write-failed",
    }
    assert bridge.get("a", "/fhir/Communication").status_code == 200  # reads go on


def test_every_response_carries_a_request_id_and_logs_no_query_values(bridge, caplog):
    caplog.set_level("INFO", logger="fhir_kap.bridge")
    resp = bridge.get(
        "a", "/fhir/Communication?identifier=http://x|SECRET-MRN-123", **{"X-Request-ID": "req-12345678"}
    )
    assert resp.headers["X-Request-ID"] == "req-12345678"
    line = json.loads([r.getMessage() for r in caplog.records if "req-12345678" in r.getMessage()][-1])
    assert line["route"] == "/fhir/<rtype>" and line["status"] == 200 and line["method"] == "GET"
    assert "SECRET-MRN-123" not in caplog.text


def test_an_unexpected_error_is_500_with_only_a_request_id(bridge, monkeypatch, caplog):
    store = bridge.app.extensions["fhir_kap"].store

    def boom(*a, **k):
        raise RuntimeError("patient Jane Doe")

    monkeypatch.setattr(store, "get", boom)
    resp = bridge.get("a", "/fhir/Communication/abc")
    assert resp.status_code == 500 and is_outcome(resp)
    assert "Jane" not in resp.get_data(as_text=True) and "Jane" not in caplog.text
    assert resp.headers["X-Request-ID"] in resp.get_data(as_text=True)


def test_create__last_modified_is_the_stored_instant_as_an_http_date(bridge):
    from email.utils import format_datetime, parsedate_to_datetime

    resp = bridge.post(
        "a", "/fhir/Communication", load("Example-Communication-note-1.json"), Prefer="return=representation"
    )
    instant = resp.get_json(force=True)["meta"]["lastUpdated"]
    stamp = datetime.fromisoformat(instant.replace("Z", "+00:00")).replace(microsecond=0)
    assert parsedate_to_datetime(resp.headers["Last-Modified"]) == stamp
    assert resp.headers["Last-Modified"] == format_datetime(stamp, usegmt=True)


def test_a_location_outside_plain_uri_characters_is_still_quoted(tmp_path):
    """The bridge passes its own URI-safe Location through as is; anything else (an IRI base URL
    from the configuration) still goes through werkzeug's IRI-to-URI quoting."""
    from fhir_kap.bridge import BridgeOptions, create_app
    from fhir_kap.config import load_settings
    from fhir_kap.storage.db import Database
    from fhir_kap.storage.partners import Partners

    s = load_settings(env={}, data_dir=tmp_path / "data")
    token = Partners(Database(s.db_url)).add("practice-a", references=["Practitioner/ref-therapist"])[1]
    app = create_app(s, BridgeOptions(base_url="http://exämple.test/k ap/fhir", notify=False))
    resp = app.test_client().post(
        "/fhir/Communication",
        data=json.dumps(load("Example-Communication-note-1.json")),
        headers={"Authorization": f"Bearer {token}", "Content-Type": FHIR},
    )
    assert resp.status_code == 201
    assert resp.headers["Location"].startswith("http://xn--exmple-cua.test/k%20ap/fhir/Communication/")


def test_http_dates_match_the_standard_library():
    import doctest

    from fhir_kap.bridge import app as app_module

    result = doctest.testmod(app_module)
    assert result.attempted > 0 and result.failed == 0
    for instant in [
        "2024-02-29T23:59:59Z",
        "2026-11-24T01:02:03.456789Z",
        "1999-12-31T00:00:00.000Z",
        "2026-11-24T02:02:03+01:00",
    ]:
        expected = datetime.fromisoformat(instant.replace("Z", "+00:00")).astimezone(UTC)
        assert app_module.http_date(instant) == email.utils.format_datetime(expected, usegmt=True)


def test_return_operationoutcome_lists_the_issues_fhir_kap_import_reports(bridge):
    """One inbound path: the bridge's issues for a resource are the ones `fhir-kap import` gives."""
    from pathlib import Path

    from fhir_kap.records.pipeline import Pipeline

    doc = json.loads(
        (
            Path(__file__).resolve().parents[1] / "data" / "ehr" / "02-servicerequest-logical-references.json"
        ).read_text()
    )
    resp = bridge.post("clinic", "/fhir/ServiceRequest", doc, Prefer="return=OperationOutcome")
    assert resp.status_code == 201 and is_outcome(resp)

    def rule(issue: dict) -> str:
        return next(e["valueString"] for e in issue.get("extension", []) if e["url"].endswith("/rule"))

    answered = sorted(
        (i["severity"], rule(i), tuple(i.get("expression", ())))
        for i in resp.get_json(force=True)["issue"]
        if any(e["url"].endswith("/rule") for e in i.get("extension", []))
    )
    (imported,) = [o for o in Pipeline.load().ingest.document("doc", doc) if o.result]
    expected = sorted((i.severity, i.rule, (i.expression,) if i.expression else ()) for i in imported.issues)
    assert (
        answered == expected
        and ("warning", "import:unresolved-reference", ("ServiceRequest.subject",)) in answered
    )
    # a resend (same business identifier, same content) is the resource already held
    again = bridge.post("clinic", "/fhir/ServiceRequest", doc)
    assert (
        again.status_code == 200
        and again.get_json(force=True)["id"] == resp.headers["Location"].split("/")[-3]
    )


@pytest.mark.parametrize(
    "method, path, allow",
    [
        ("PUT", "/fhir/Condition/x", "GET, HEAD"),
        ("DELETE", "/fhir/Communication/x", "GET, HEAD, PUT"),
        ("PATCH", "/fhir/ServiceRequest/x", "GET, HEAD, PUT"),  # PUT: a partner updates its own
        ("DELETE", "/fhir/Communication", "GET, HEAD, POST, PUT"),
        ("POST", "/fhir/Task", "GET, HEAD"),
    ],
)
def test_an_interaction_the_bridge_lacks_on_a_type_it_serves_is_405_with_allow(bridge, method, path, allow):
    resp = bridge.client.open(
        path, method=method, data="{}", headers=bridge.h("clinic", **{"Content-Type": FHIR})
    )
    assert resp.status_code == 405 and is_outcome(resp) and resp.headers["Allow"] == allow
    assert "http:405" in resp.get_data(as_text=True)
    # an unknown path stays 404
    assert bridge.client.open("/fhir/Nope/x", method=method, headers=bridge.h("clinic")).status_code == 404


@pytest.mark.parametrize(
    "headers, query, status",
    [
        ({"Accept": "application/fhir+xml"}, "", 406),
        ({}, "?_format=xml", 406),
        ({}, "?_format=application/fhir%2Bxml", 406),
        ({"Accept": "text/html"}, "", 406),
        ({"Accept": "application/fhir+json; fhirVersion=5.0"}, "", 406),
        ({"Accept": "application/fhir+json; fhirVersion=4.0"}, "", 200),
        ({"Accept": "application/fhir+xml, application/fhir+json;q=0.9"}, "", 200),
        ({"Accept": "*/*"}, "?_format=json", 200),
    ],
)
def test_content_negotiation_is_json_and_the_deployments_fhir_version(bridge, headers, query, status):
    resp = bridge.get("a", "/fhir/Communication" + query, **headers)
    assert resp.status_code == status and (status == 200 or is_outcome(resp))


def test_a_body_for_another_fhir_version_is_415(bridge):
    note = load("Example-Communication-note-1.json")
    resp = bridge.post("a", "/fhir/Communication", note, **{"Content-Type": FHIR + "; fhirVersion=5.0"})
    assert resp.status_code == 415 and is_outcome(resp) and "FHIR 4.0.1" in resp.get_data(as_text=True)
