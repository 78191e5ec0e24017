"""Named transforms: registry, doctest examples, and forward/inverse pairs."""

from __future__ import annotations

import doctest

import pytest

from fhir_kap.records import transforms
from fhir_kap.records.transforms import TRANSFORMS, CodeTable, CodeTables, TransformError

TABLES = CodeTables(
    {
        "route": CodeTable.build(
            "route",
            {
                "im": ({"system": "http://snomed.info/sct", "code": "78421000"},),
                "nasal": ({"system": "http://snomed.info/sct", "code": "46713006"},),
            },
            {"im": "Intramuscular"},
        )
    }
)


def test_docstring_examples__all_pass():
    result = doctest.testmod(transforms)
    assert result.attempted >= len(TRANSFORMS) and result.failed == 0


def test_every_transform__has_a_usage_example():
    for t in TRANSFORMS.values():
        assert ">>>" in (t.forward.__doc__ or "") + (t.inverse.__doc__ or ""), t.name


@pytest.mark.parametrize(
    "name,value,args",
    [
        ("reference", "client-0001", {"type": "Patient"}),
        ("party-reference", {"practitioner_role": "role-1"}, {}),
        (
            "party-reference",
            {"identifier": {"system": "http://hl7.org/fhir/sid/us-npi", "value": "1234567893"}},
            {},
        ),
        ("coding", "TREAT", {"system": "http://terminology.hl7.org/CodeSystem/v3-ActReason"}),
        ("concept", "nasal", {"table": "route"}),
        ("base64-text", "Ünïcode text\nwith lines", {}),
        ("codeable-reference", "consent-1", {"of": "reference", "type": "Consent"}),
        ("quantity", 62.5, {"unit": "mg", "code": "mg"}),
        ("value-map", "rejected", {"map": {"rejected": "not-done"}}),
        ("datetime", "2024-03-18T09:00:00.250+05:30", {}),
        ("date", "2024-02-29", {}),
    ],
)
def test_inverse_undoes_forward(name, value, args):
    t = TRANSFORMS[name]
    assert t.inverse(t.forward(value, args, TABLES), args, TABLES) == value


def test_concept__unknown_local_code_names_the_table():
    with pytest.raises(TransformError) as exc:
        TRANSFORMS["concept"].forward("oral", {"table": "route"}, TABLES)
    assert exc.value.table == "route" and "'oral'" in str(exc.value)


def test_concept__reads_back_any_coding_the_table_knows():
    cc = {
        "coding": [
            {"system": "urn:other", "code": "x"},
            {"system": "http://snomed.info/sct", "code": "78421000"},
        ]
    }
    assert TRANSFORMS["concept"].inverse(cc, {"table": "route"}, TABLES) == "im"


def test_code_table__ambiguous_codings_are_not_used_to_read_back():
    table = CodeTable.build(
        "t",
        {
            "a": ({"system": "s", "code": "1"},),
            "b": ({"system": "s", "code": "1"}, {"system": "s", "code": "2"}),
        },
        {},
    )
    assert table.local_code([{"system": "s", "code": "2"}]) == "b"
    with pytest.raises(TransformError):
        table.local_code([{"system": "s", "code": "1"}])


@pytest.mark.parametrize(
    "name,value,args",
    [
        ("reference", {"reference": "Practitioner/p1"}, {"type": "Patient"}),
        ("reference", {"reference": "not a reference"}, {"type": "Patient"}),
        ("party-reference", {"reference": "Device/d1"}, {}),
        ("base64-text", "@@@", {}),
        ("quantity", {"value": 5, "code": "g"}, {"unit": "mg", "code": "mg"}),
        ("datetime", "2024-03", {}),
        ("coding", {"system": "urn:other", "code": "x"}, {"system": "urn:mine"}),
    ],
)
def test_inverse__rejects_values_it_cannot_read(name, value, args):
    with pytest.raises(TransformError):
        TRANSFORMS[name].inverse(value, args, TABLES)
