"""The validator never raises for bad input: every element of the KAP examples (R4 and R5, one
example per resource type) replaced in turn by a value of another JSON type gives issues, and the
structure errors still name the field and the rule."""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fhir_kap.config import Release
from fhir_kap.errors import Issue
from fhir_kap.validation import Validator

EXAMPLES = Path(__file__).resolve().parents[2] / "profiles" / "examples"
JUNK: tuple[Any, ...] = (5, "x", [], {}, True, None)


def _examples() -> list[tuple[Release, Path]]:
    """The first example of each resource type, per release (the KAP-profiled ones included)."""
    out = []
    for release in (Release.R4, Release.R5):
        seen: set[str] = set()
        for f in sorted((EXAMPLES / release.short).glob("*.json")):
            rt = f.name.split("-", 1)[0]
            if rt not in seen:
                seen.add(rt)
                out.append((release, f))
    return out


def _paths(node: Any, at: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    """Every element path (of a list, its first entry: the size stays bounded)."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield at + (k,)
            yield from _paths(v, at + (k,))
    elif isinstance(node, list) and node:
        yield at + (0,)
        yield from _paths(node[0], at + (0,))


def _swapped(base: dict[str, Any], at: tuple[Any, ...], value: Any) -> dict[str, Any]:
    doc = copy.deepcopy(base)
    node: Any = doc
    for k in at[:-1]:
        node = node[k]
    node[at[-1]] = value
    return doc


def test_the_examples_cover_the_kap_profiles():
    claimed = {
        p
        for _r, f in _examples()
        for p in json.loads(f.read_text()).get("meta", {}).get("profile", [])
        if "fhir-kap.example" in p
    }
    assert {p.rsplit("/", 1)[1] for p in claimed} == {
        "kap-referral",
        "kap-session",
        "kap-release-of-information",
        "kap-continuity-note",
    }


@pytest.mark.parametrize(("release", "path"), _examples(), ids=lambda x: getattr(x, "name", str(x)))
def test_type_swapped_elements_give_issues_never_an_exception(release: Release, path: Path):
    v = Validator.load(release)
    base = json.loads(path.read_text())
    assert not [i for i in v.validate(base) if i.is_error]
    n = 0
    for at in _paths(base):
        if at == ("resourceType",):
            continue
        for junk in JUNK:
            doc = _swapped(base, at, junk)
            issues = v.validate(doc)  # the KAP profile path: the examples claim their profile
            assert isinstance(issues, list) and all(isinstance(i, Issue) for i in issues)
            # the checks after the structure check read the malformed resource themselves: the
            # validator's last resort (skipping them) is never needed here
            assert not [i for i in issues if i.rule == "validation:checks-skipped"], (at, junk)
            if junk is None or junk == [] or junk == {}:  # never valid FHIR JSON
                assert any(i.is_error for i in issues), (at, junk)
            n += 1
    assert n > 50


@pytest.mark.parametrize(
    ("resource", "expression", "rule"),
    [
        ({"resourceType": "Consent", "scope": {"coding": 5}}, "Consent.scope.coding", "schema:type"),
        ({"resourceType": "Consent", "identifier": 5}, "Consent.identifier", "schema:type"),
        ({"resourceType": "Patient", "meta": {"profile": 5}}, "Patient.meta.profile", "schema:type"),
        (
            {"resourceType": "ServiceRequest", "meta": {"profile": [{"a": 1}]}},
            "ServiceRequest.meta.profile[0]",
            "schema:type",
        ),
    ],
)
def test_a_wrongly_typed_element_is_named_with_its_rule(resource, expression, rule):
    issues = Validator.load(Release.R4).validate(resource)
    assert any(i.is_error and i.expression == expression and i.rule == rule for i in issues), issues


def test_profile_rules_still_run_beside_structure_errors():
    """A session whose security label's code is a list: the structure error, and kap-sec-1 (the
    labels it requires are not all there) from the KAP profile."""
    base = json.loads((EXAMPLES / "r4" / "Procedure-ses-dose-01.json").read_text())
    doc = copy.deepcopy(base)
    doc["meta"]["security"][0]["code"] = []
    rules = {i.rule for i in Validator.load(Release.R4).validate(doc)}
    assert "kap-sec-1" in rules
    assert rules & {"schema:type", "schema:minItems"}


def test_a_check_that_trips_over_a_malformed_resource_leaves_its_structure_errors(monkeypatch):
    """The last resort: a later check raising on a resource that breaks the structure is named as
    skipped beside the structure errors; on a well-formed resource it is a bug and raises."""
    from fhir_kap.validation import validator as module

    def trips(*_args: Any) -> list[Issue]:
        raise TypeError("a check that cannot read the resource")

    monkeypatch.setattr(module, "resource_invariants", trips)
    v = Validator.load(Release.R4)
    issues = v.validate({"resourceType": "Consent", "identifier": 5})
    assert {(i.severity, i.rule) for i in issues} >= {
        ("error", "schema:type"),
        ("warning", "validation:checks-skipped"),
    }
    with pytest.raises(TypeError):
        v.validate({"resourceType": "Patient", "id": "p1"})
