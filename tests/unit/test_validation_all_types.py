"""Validation of resource types without a KAP meaning: valid ones pass in R4 and R5, typical errors
are caught with the right rule, and a type's generated rules are loaded only when it is validated."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fhir_kap.config import Release
from fhir_kap.validation import Validator

DATA = Path(__file__).resolve().parents[1] / "data" / "validation"
CASES = json.loads((DATA / "cases.json").read_text())
RELEASE = {"r4": Release.R4, "r5": Release.R5}
VALID = sorted(DATA.glob("r*/valid-*.json"))


def _load(path: Path) -> dict:
    return json.loads(path.read_text())


@pytest.mark.parametrize("path", VALID, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_valid_resource_of_any_type__has_no_errors(path: Path) -> None:
    issues = Validator.load(RELEASE[path.parent.name]).validate(_load(path), models=True)
    assert [i for i in issues if i.is_error] == []


def test_the_valid_fixtures_cover_six_types_in_both_releases() -> None:
    names = {(p.parent.name, p.stem) for p in VALID}
    types = ("Observation", "Condition", "AllergyIntolerance", "MedicationStatement", "DocumentReference")
    assert {(r, f"valid-{t}") for r in ("r4", "r5") for t in (*types, "QuestionnaireResponse")} <= names


@pytest.mark.parametrize("case", CASES, ids=lambda c: c["file"])
def test_invalid_resource_of_any_type__rejected_with_rule_and_expression(case: dict) -> None:
    issues = Validator.load(RELEASE[case["release"]]).validate(_load(DATA / case["file"]))
    assert (case["rule"], case["expression"]) in [(i.rule, i.expression) for i in issues]
    assert all(i.is_error and i.message and i.pointer is not None for i in issues)


def test_no_real_resource_type_is_rejected_as_unsupported() -> None:
    """Every type of both releases gets its own rules, never 'not supported'. In a fresh interpreter:
    loading every type's rules (and their jsonschema failure paths) in the test process made the
    hypothesis tests after it 40x slower (garbage collection over the extra objects)."""
    code = (
        "from fhir_kap.config import Release\n"
        "from fhir_kap.validation import Validator, resource_types\n"
        "bad = []\n"
        "for rel in (Release.R4, Release.R5):\n"
        "    v = Validator.load(rel)\n"
        "    for rt in sorted(resource_types(rel)):\n"
        "        issues = v.validate({'resourceType': rt})\n"
        "        if any(i.rule == 'schema:resourceType' or i.code == 'not-supported' for i in issues):\n"
        "            bad.append(rt)\n"
        "print(len(resource_types(Release.R4)), len(resource_types(Release.R5)), bad)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["146", "158", "[]"]


@pytest.mark.parametrize(
    "resource, rule",
    [
        ({"resourceType": "Bundle", "type": "collection", "total": 1}, "bdl-1"),
        (
            {"resourceType": "Bundle", "type": "collection", "entry": [{"fullUrl": "Patient/1"}]},
            "bdl:fullUrl",
        ),
        (
            {
                "resourceType": "Patient",
                "contained": [{"resourceType": "Patient", "id": "c1", "meta": {"versionId": "2"}}],
                "link": [{"other": {"reference": "#c1"}, "type": "seealso"}],
            },
            "dom-4",
        ),
        (
            {
                "resourceType": "Patient",
                "text": {
                    "status": "generated",
                    "div": "<div xmlns='http://www.w3.org/1999/xhtml'><p>x</pa></div>",
                },
            },
            "txt-1",
        ),
        (
            {
                "resourceType": "Encounter",
                "status": "finished",
                "class": {"code": "AMB"},
                "period": {"start": "2024-02-02", "end": "2024-02-01"},
            },
            "per-1",
        ),
        (
            {
                "resourceType": "Patient",
                "text": {
                    "status": "generated",
                    "div": "<div xmlns='http://www.w3.org/1999/xhtml'>&reg;</div>",
                },
            },
            "txt-1",
        ),
    ],
    ids=["bdl-1", "fullUrl", "dom-4", "xhtml", "per-1", "xhtml-html-entity"],
)
def test_resource_invariants_r4(resource: dict, rule: str) -> None:
    assert rule in [i.rule for i in Validator.load(Release.R4).validate(resource)]


def test_validating_one_type_loads_only_that_types_rules() -> None:
    """Validating a Communication imports its own generated module and the shared datatypes, never
    the Observation rules (nor any other type's): checked in a fresh interpreter."""
    code = (
        "import sys\n"
        "from fhir_kap.config import Release\n"
        "from fhir_kap.validation import Validator\n"
        "v = Validator.load(Release.R4)\n"
        "assert v.validate({'resourceType': 'Communication', 'status': 'completed'}) == []\n"
        "loaded = sorted(m.rsplit('.', 1)[1] for m in sys.modules if '._generated.r4.resources.' in m)\n"
        "print(','.join(loaded))\n"
        "v.validate({'resourceType': 'Observation', 'status': 'final', 'code': {'text': 'x'}})\n"
        "print('fhir_kap.validation._generated.r4.resources.observation' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    first, second = out.split()
    assert first == "communication"
    assert second == "True"


def test_xml_entities_and_character_references_are_fine_in_a_narrative() -> None:
    div = "<div xmlns='http://www.w3.org/1999/xhtml'>&lt;3 &amp; &#160;&#x2713;</div>"
    patient = {"resourceType": "Patient", "text": {"status": "generated", "div": div}}
    assert Validator.load(Release.R4).validate(patient) == []
