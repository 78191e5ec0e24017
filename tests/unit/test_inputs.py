"""KAP record input check: valid samples pass; every invalid record names its pointer and rule."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from fhir_kap import jsonio
from fhir_kap.errors import InputError
from fhir_kap.records.inputs import RECORD_TYPES, check_record, load_input_schemas

ROOT = Path(__file__).resolve().parents[2]
RECORDS = ROOT / "profiles" / "examples" / "records"
INVALID = Path(__file__).resolve().parents[1] / "data" / "records" / "invalid"
MANIFEST = json.loads((INVALID / "manifest.json").read_text())


@pytest.fixture(scope="module")
def schemas():
    return load_input_schemas(ROOT / "profiles" / "input")


@pytest.mark.parametrize("path", sorted(RECORDS.glob("*.json")), ids=lambda p: p.name)
def test_sample_record__is_accepted(schemas, path):
    record = json.loads(path.read_text())
    assert schemas.check(record) is record


def test_sample_journey__covers_every_record_type():
    types = {json.loads(p.read_text())["record"] for p in RECORDS.glob("*.json")}
    assert types == set(RECORD_TYPES)


def test_journey_ndjson__holds_the_same_records_as_the_json_files():
    with open(RECORDS / "journey.ndjson", "rb") as fh:
        streamed = [doc for _, doc in jsonio.iter_documents(fh, source="journey.ndjson")]
    singles = [json.loads(p.read_text()) for p in RECORDS.glob("*.json")]

    def key(r):
        return (r["record"], r["id"])

    assert sorted(streamed, key=key) == sorted(singles, key=key)


@pytest.mark.parametrize("case", MANIFEST, ids=lambda c: c["file"])
def test_invalid_record__is_rejected_with_pointer_and_rule(schemas, case):
    record = json.loads((INVALID / case["file"]).read_text())
    with pytest.raises(InputError) as exc:
        schemas.check(record)
    found = {(i.pointer, i.rule) for i in exc.value.issues}
    assert (case["pointer"], case["rule"]) in found, found
    assert all(i.expression for i in exc.value.issues)


def test_invalid_corpus__covers_every_file_in_the_folder():
    listed = {c["file"] for c in MANIFEST}
    on_disk = {p.name for p in INVALID.glob("*.json")} - {"manifest.json"}
    assert listed == on_disk


def test_all_errors_are_collected__not_just_the_first(schemas):
    record = json.loads((RECORDS / "session-ses-dose-01.json").read_text())
    record.update(status="bogus", start="not-a-date", performers=[])
    del record["client"]
    with pytest.raises(InputError) as exc:
        schemas.check(record)
    pointers = {i.pointer for i in exc.value.issues}
    assert {"/status", "/start", "/performers", "/client"} <= pointers


def test_expression__uses_record_type_and_fhirpath_like_indexes(schemas):
    record = json.loads((RECORDS / "referral-ref-0001.json").read_text())
    record["goals"][1] = 7
    with pytest.raises(InputError) as exc:
        schemas.check(record)
    (issue,) = exc.value.issues
    assert (issue.expression, issue.pointer, issue.rule) == ("referral.goals[1]", "/goals/1", "schema:type")


@pytest.mark.parametrize("field,value", [("reason", 12345), ("authored", "Alex Testperson 1985")])
def test_error_messages__never_quote_the_offending_value(schemas, field, value):
    record = json.loads((RECORDS / "referral-ref-0001.json").read_text())
    record[field] = value
    with pytest.raises(InputError) as exc:
        schemas.check(record)
    text = json.dumps(exc.value.operation_outcome())
    assert str(value) not in text


def test_psychotherapy_note__rule_says_it_is_never_exchanged(schemas):
    record = json.loads((INVALID / "note-psychotherapy-note.json").read_text())
    with pytest.raises(InputError) as exc:
        schemas.check(record)
    (issue,) = exc.value.issues
    assert "never exchanged" in issue.message and issue.code == "security"


def test_check_record__uses_the_shipped_schemas_by_default():
    record = json.loads((RECORDS / "client-client-0001.json").read_text())
    assert check_record(record)["id"] == "client-0001"


def test_operation_outcome__carries_pointer_and_rule_extensions(schemas):
    with pytest.raises(InputError) as exc:
        schemas.check({"record": "organization", "id": "o-1", "kind": "hospital", "name": "X"})
    issue = exc.value.operation_outcome()["issue"][0]
    assert issue["expression"] == ["organization.kind"]
    assert {e["valueString"] for e in issue["extension"]} == {"/kind", "schema:enum"}


def test_missing_schema_file__is_a_clear_error(tmp_path):
    (tmp_path / "client.schema.json").write_text((ROOT / "profiles/input/client.schema.json").read_text())
    with pytest.raises(InputError, match="referral.schema.json is missing"):
        load_input_schemas(tmp_path)


SCHEMA_CASES = [
    c for c in MANIFEST if c["rule"].startswith("schema:") and c["pointer"] not in ("", "/record")
]


@pytest.mark.parametrize("case", SCHEMA_CASES, ids=lambda c: c["file"])
def test_fast_twin_schema__rejects_every_invalid_record_too(schemas, case):
    """The fastjsonschema fast path must be at least as strict as jsonschema on the corpus
    (cases broken by KAP rules or before any schema runs are left out: the twins never see them)."""
    from fastjsonschema import JsonSchemaValueException

    record = json.loads((INVALID / case["file"]).read_text())
    fast = schemas.fast[record["record"]]
    with pytest.raises(JsonSchemaValueException):
        fast(record)


@pytest.mark.parametrize("path", sorted(RECORDS.glob("*.json")), ids=lambda p: p.name)
def test_fast_twin_schema__accepts_every_sample_record(schemas, path):
    record = json.loads(path.read_text())
    schemas.fast[record["record"]](record)


def test_hostile_unknown_field_names_are_shown_shortened_and_few(schemas):
    record = json.loads((RECORDS / "session-ses-dose-01.json").read_text())
    record |= {("x" * 500) + str(i): 1 for i in range(20)}
    with pytest.raises(InputError) as exc:
        schemas.check(record)
    message = " ".join(i.message for i in exc.value.issues)
    assert "x" * 41 not in message and "and more" in message and len(message) < 1000


def test_one_hostile_unknown_field_name_is_shown_shortened_too(schemas):
    record = json.loads((RECORDS / "session-ses-dose-01.json").read_text())
    record["y" * 5000] = 1
    with pytest.raises(InputError) as exc:
        schemas.check(record)
    [issue] = exc.value.issues
    assert "y" * 41 not in issue.message and len(issue.message) < 200
    assert issue.rule == "schema:additionalProperties" and issue.pointer == "/" + "y" * 5000  # exact where


def test_a_utf8_byte_order_mark_is_skipped() -> None:
    assert jsonio.loads(b'\xef\xbb\xbf{"a": 1}') == {"a": 1}
    stream = io.BytesIO(b'\xef\xbb\xbf{"resourceType": "Patient"}\n')
    assert [d for _, d in jsonio.iter_documents(stream)] == [{"resourceType": "Patient"}]


def test_errors_say_what_is_expected_in_words_and_suggest_near_miss_fields() -> None:
    record = {
        "record": "referral",
        "id": "r1",
        "status": "active",
        "client": "c1",
        "referrer": {"practitioner": "p1"},
        "clinic": "k",
        "authored": "2026-11-30",
        "reason": "x",
        "colaboration_model": "shared",
    }
    with pytest.raises(InputError) as err:
        check_record(record)
    messages = [i.message for i in err.value.issues]
    assert (
        "referral: Unknown field(s): 'colaboration_model' (did you mean 'collaboration_model'?)" in messages
    )
    authored = [m for m in messages if m.startswith("referral.authored")]
    assert authored == [
        "referral.authored: must be a date and time with seconds and a time zone, e.g. 2026-11-30T10:00:00-05:00"
    ]
    assert not any("\\d" in m or "^" in m for m in messages)  # never a regex


def test_the_sample_consents_stay_valid_for_at_least_another_year() -> None:
    """`send` with the samples must not answer outside-period: they expired once (2025-02-28)."""
    from datetime import date, timedelta

    for f in sorted((ROOT / "profiles" / "examples" / "records").glob("consent-*.json")):
        end = date.fromisoformat(json.loads(f.read_text())["period"]["end"])
        assert end >= date.today() + timedelta(days=365), f"{f.name} ends {end}: renew the samples"
