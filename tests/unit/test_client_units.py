"""Pure helpers of the client: identifier queries, transaction Bundles, capability parsing,
transaction-response reading. No network."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest

from fhir_kap.client import entry_results, identifier_query, parse_capabilities, transaction_bundle
from fhir_kap.config import Release
from fhir_kap.errors import InputError, ServerError

DATA = Path(__file__).resolve().parents[1] / "data" / "client"


def load(name: str) -> dict:
    return json.loads((DATA / name).read_text())


@pytest.mark.parametrize(
    "identifiers, expected",
    [
        ([{"system": "http://x.org/sid", "value": "A1"}], "identifier=http://x.org/sid|A1"),
        (
            [{"system": "http://x.org/sid", "value": "A&B 1=2+3#"}],
            "identifier=http://x.org/sid|A%26B%201%3D2%2B3%23",
        ),
        ([{"system": "urn:oid:1.2.3", "value": "x|y,z$"}], "identifier=urn:oid:1.2.3|x%5C%7Cy%5C%2Cz%5C%24"),
        (
            [
                {"use": "old", "system": "http://x.org/a", "value": "OLD"},
                {"system": "http://x.org/b", "value": "NEW"},
            ],
            "identifier=http://x.org/b|NEW",
        ),
        ([{"value": "no-system"}, {"system": "http://x.org/b"}], None),
        ([], None),
    ],
    ids=["plain", "reserved-chars", "fhir-escapes", "skips-old", "incomplete", "none"],
)
def test_identifier_query__encodes_value_and_keeps_the_bar(identifiers, expected):
    assert identifier_query({"resourceType": "Patient", "identifier": identifiers}) == expected


def test_transaction_bundle__matches_golden_and_rewrites_references():
    counter = itertools.count(1)
    resources = [load("Patient-client.json"), load("Communication-continuity-note.json")]
    before = json.dumps(resources)
    bundle = transaction_bundle(resources, new_uuid=lambda: f"00000000-0000-4000-8000-{next(counter):012d}")
    assert bundle == load("Bundle-transaction-expected.json")
    assert json.dumps(resources) == before  # inputs untouched


def test_transaction_bundle__leaves_outside_references_and_can_be_unconditional():
    note = load("Communication-continuity-note.json")
    note["sender"] = {"reference": "Practitioner/elsewhere"}
    bundle = transaction_bundle([note], conditional=False)
    entry = bundle["entry"][0]
    assert entry["resource"]["subject"] == {"reference": "Patient/p1"}
    assert entry["resource"]["sender"] == {"reference": "Practitioner/elsewhere"}
    assert entry["request"] == {"method": "POST", "url": "Communication"}
    assert entry["fullUrl"].startswith("urn:uuid:") and len(entry["fullUrl"]) == 45


@pytest.mark.parametrize("bad", [{"id": "x"}, "Patient", {"resourceType": "../metadata"}])
def test_transaction_bundle__rejects_non_resources(bad):
    with pytest.raises(InputError) as err:
        transaction_bundle([bad])
    assert err.value.issues[0].pointer == "/resourceType"


def test_parse_capabilities__reads_an_r5_statement():
    caps = parse_capabilities(load("CapabilityStatement-r5-minimal.json"))
    assert caps.fhir_version is Release.R5 and caps.software == "R5 Test Server 2.1"
    assert caps.supports("Patient", "create") and not caps.supports("Communication", "create")
    assert caps.conditional_create == {"Patient"} and caps.conditional_update == frozenset()
    assert (caps.transaction, caps.batch) == (False, True)


@pytest.mark.parametrize(
    "name, content_type, expected",
    [
        ("CapabilityStatement-no-version.json", "application/fhir+json; fhirVersion=5.0", Release.R5),
        ("CapabilityStatement-no-version.json", 'application/fhir+json;fhirversion="4.0"', Release.R4),
        ("CapabilityStatement-r5-minimal.json", "application/fhir+json; fhirVersion=5.0", Release.R5),
    ],
)
def test_parse_capabilities__falls_back_to_the_mime_fhirversion(name, content_type, expected):
    assert parse_capabilities(load(name), content_type=content_type).fhir_version is expected


@pytest.mark.parametrize(
    "name, content_type",
    [
        ("CapabilityStatement-r4b.json", None),
        ("CapabilityStatement-no-version.json", "application/fhir+json"),
    ],
)
def test_parse_capabilities__refuses_unsupported_versions(name, content_type):
    with pytest.raises(ServerError) as err:
        parse_capabilities(load(name), content_type=content_type)
    assert "unsupported FHIR version" in err.value.summary and err.value.retryable is False


def test_parse_capabilities__refuses_something_else():
    with pytest.raises(ServerError, match="did not answer with a CapabilityStatement"):
        parse_capabilities(load("OperationOutcome-invalid.json"))


def test_entry_results__reads_statuses_ids_versions_and_outcomes():
    response = {
        "resourceType": "Bundle",
        "type": "batch-response",
        "entry": [
            {"response": {"status": "201 Created", "location": "Patient/p9/_history/1", "etag": 'W/"1"'}},
            {
                "resource": {"resourceType": "Communication", "id": "c9", "meta": {"versionId": "3"}},
                "response": {"status": "200 OK"},
            },
            {
                "response": {
                    "status": "422 Unprocessable Entity",
                    "outcome": load("OperationOutcome-invalid.json"),
                }
            },
        ],
    }
    got = entry_results(response)
    assert [(r.status, r.id, r.version_id, r.created) for r in got] == [
        (201, "p9", "1", True),
        (200, "c9", "3", False),
        (422, None, None, False),
    ]
    assert got[2].outcome["resourceType"] == "OperationOutcome"


@pytest.mark.parametrize(
    "entry",
    [
        {"response": {"status": ""}},
        {"response": {"status": "   "}},
        {"response": {"status": "\u00b200 OK"}},
        {"response": {"status": "\u0662\u0660\u0661 Created"}},
        {"response": "201 Created"},
        "not an entry",
        None,
    ],
)
def test_entry_results__a_garbled_entry_is_a_status_0_result_never_an_exception(entry):
    """A server's transaction-response is outside input: an empty or non-ASCII status, or an entry
    that is not an object, reads as status 0 (not written; the caller retries or reconciles)."""
    got = entry_results({"resourceType": "Bundle", "type": "transaction-response", "entry": [entry]})
    assert [r.status for r in got] == [0]
