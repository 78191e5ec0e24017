"""parse_reference remembers short references (issue 14, CPU per POST): the same answers as an
uncached read, and nothing a sender can make large is kept."""

from __future__ import annotations

from typing import Any

from fhir_kap.fhir import references
from fhir_kap.fhir.references import parse_reference


def test_remembered_references_read_as_before() -> None:
    cases: list[dict[str, Any]] = [
        {"reference": "Patient/p1"},
        {"reference": " https://ehr.example/fhir/Patient/p1/_history/2 "},
        {"reference": "#pat", "type": "Patient"},
        {"reference": "Patient?identifier=urn%3Aoid%3A1.2%7CE1"},
        {"reference": "urn:uuid:0f6a2c1e-2b1a-4c3d-9e8f-0a1b2c3d4e5f"},
        {"type": "Practitioner", "identifier": {"system": "s", "value": "v"}},
        {"reference": "not a reference", "identifier": {"system": "s", "value": "v"}},
        {"reference": ""},
    ]
    for value in cases:
        text = value.get("reference")
        ident = references._identifier(value.get("identifier"))
        rtype = value.get("type")
        uncached = references._parse(text, rtype, ident)
        assert parse_reference(value) == uncached
        assert parse_reference(value) == uncached  # the second read comes from the cache
    assert parse_reference("Patient/p1") == parse_reference({"reference": "Patient/p1"})


def test_the_cache_keys_on_everything_that_changes_the_answer() -> None:
    as_patient = parse_reference({"reference": "#x", "type": "Patient"})
    as_practitioner = parse_reference({"reference": "#x", "type": "Practitioner"})
    assert as_patient is not None and as_practitioner is not None
    assert (as_patient.type, as_practitioner.type) == ("Patient", "Practitioner")
    hits = references._parse_text.cache_info().hits
    parse_reference({"reference": "#x", "type": "Patient"})
    assert references._parse_text.cache_info().hits == hits + 1  # this read came from the cache


def test_large_references_are_read_but_not_kept() -> None:
    big = "x" * 10_000
    before = references._parse_text.cache_info().currsize
    long_value = parse_reference({"reference": "Patient/p1", "identifier": {"system": "s", "value": big}})
    long_type = parse_reference({"reference": "Patient/p2", "type": big})
    long_text = parse_reference("Patient/" + big)
    assert long_value is not None and long_value.identifier == ("s", big)
    assert long_type is not None and long_type.type == "Patient"
    assert long_text is None  # an id longer than 64 characters is not a literal reference
    assert references._parse_text.cache_info().currsize == before
