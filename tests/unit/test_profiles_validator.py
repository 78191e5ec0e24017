"""The FHIR validator: valid fixtures pass, every invalid-corpus case is rejected at the right place."""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fhir_kap.config import Release
from fhir_kap.validation import (
    IMPLEMENTED_CONSTRAINTS,
    Validator,
    detect_release,
    load_profile_rules,
    looks_like_transcript,
)

ROOT = Path(__file__).resolve().parents[2]
FHIR = Path(__file__).resolve().parents[1] / "data" / "fhir"
CASES = json.loads((FHIR / "invalid" / "cases.json").read_text())
RELEASE = {"r4": Release.R4, "r5": Release.R5}
VALID = sorted((FHIR / "valid").glob("r*/*.json")) + sorted(
    (ROOT / "profiles" / "examples").glob("r[45]/*.json")
)


def _load(path: Path) -> dict:
    return json.loads(path.read_text())


@pytest.mark.parametrize("path", VALID, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_valid_resource__has_no_issues(path: Path) -> None:
    issues = Validator.load(RELEASE[path.parent.name]).validate(_load(path), models=True)
    assert issues == []


@pytest.mark.parametrize("case", CASES, ids=lambda c: c["file"])
def test_invalid_resource__rejected_with_rule_and_expression(case: dict) -> None:
    issues = Validator.load(RELEASE[case["release"]]).validate(_load(FHIR / "invalid" / case["file"]))
    found = [(i.rule, i.expression) for i in issues]
    assert (case["rule"], case["expression"]) in found
    assert all(i.pointer is not None and i.message for i in issues)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c["file"])
def test_fast_path_is_at_least_as_strict_as_fhir_resources(case: dict) -> None:
    validator = Validator.load(RELEASE[case["release"]])
    resource = _load(FHIR / "invalid" / case["file"])
    model_issues = [
        i
        for i in validator.validate(resource, profile=False, models=True)
        if i.rule and i.rule.startswith("model:")
    ]
    fast_issues = validator.validate(resource, profile=False)
    if model_issues:
        assert fast_issues


def test_r5_element_in_r4__message_names_the_r4_element() -> None:
    resource = _load(FHIR / "invalid" / "r4" / "procedure-r5-occurrence.json")
    messages = [i.message for i in Validator.load(Release.R4).validate(resource)]
    assert any("R4 uses performed[x]" in m for m in messages)


def test_messages_do_not_quote_free_text() -> None:
    resource = _load(FHIR / "invalid" / "r4" / "note-transcript.json")
    for issue in Validator.load(Release.R4).validate(resource):
        assert "colours" not in issue.message and "Freedom" not in issue.message


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Client: I saw colours.\nTherapist: What did that mean?", True),
        ("T: How are you?\nC: Floating.", True),
        ("Pt: tired. Dr Lee: rest today.", True),
        ("[00:12:31] long pause", True),
        ("Integration going well. Client: stable, sleeping better.", False),
        ("Plan: two more integration sessions. Next review 10:30 on Friday.", False),
        ("", False),
        ("S: sleeping better.\nO: calm, vitals normal.\nA: stable.\nP: one more integration session.", False),
        ("Q: How was it?\nA: Bright.\nQ: And after?\nA: Quiet.", True),  # a Q/A exchange
        ("T: How are you?\nP: Fine.\nT: Sleeping?\nP: Yes.", True),
    ],
)
def test_looks_like_transcript(text: str, expected: bool) -> None:
    assert looks_like_transcript(text) is expected


class _CountingLabel:
    def __init__(self, pattern) -> None:
        self.pattern = pattern
        self.calls = 0

    def match(self, text, pos):
        self.calls += 1
        return self.pattern.match(text, pos)


@pytest.mark.parametrize(
    "text",
    [
        "\n" * 20_000 + "x: y: z",  # every line start runs into the same label position
        ". " * 20_000 + "x: y: z",
        "Client  \n" * 5_000 + "x: y",
    ],
)
def test_a_hostile_note_costs_one_label_try_per_word_not_per_line(text: str) -> None:
    """The one-regex scan was quadratic here (26 s for 20,000 blank lines): every line start
    scanned all the blank lines after it. The label is now tried at most once per word (the
    start of a whitespace-separated token), never from inside a blank run."""
    from fhir_kap.fhir.textscan import SPEAKER_AT as _SPEAKER_AT
    from fhir_kap.fhir.textscan import turns

    label = _CountingLabel(_SPEAKER_AT)
    turns(text, label, after_sentences=True)  # type: ignore[arg-type]
    assert label.calls <= len(text.split()) + 1


@pytest.mark.parametrize(
    "path, expected",
    [
        (FHIR / "valid" / "r4" / "Procedure-ses-004.json", Release.R4),
        (FHIR / "valid" / "r4" / "Consent-con-001.json", Release.R4),
        (FHIR / "valid" / "r5" / "Procedure-ses-004.json", Release.R5),
        (FHIR / "valid" / "r5" / "Consent-con-001.json", Release.R5),
    ],
)
def test_detect_release__by_shape(path: Path, expected: Release) -> None:
    assert detect_release(_load(path)) is expected


def test_detect_release__undecidable_is_none() -> None:
    assert detect_release({"resourceType": "Patient", "id": "p1"}) is None


@pytest.mark.parametrize(
    "resource, expected",
    [
        ({"resourceType": "Procedure", "reportedBoolean": True}, Release.R5),  # an element prefix
        (
            {
                "resourceType": "Procedure",
                "performedDateTime": "2024-01-01",
                "occurrenceDateTime": "2024-01-01",
            },
            None,
        ),
        ({"resourceType": "ServiceRequest", "orderDetail": [{}]}, None),  # both releases have it
        ({"resourceType": "Consent", "verification": [{}]}, None),  # both releases have it
        ({"resourceType": "Consent", "patient": {}, "provision": [{}]}, None),
        (
            {
                "resourceType": "Bundle",
                "entry": [
                    {"resource": {"resourceType": "Patient"}},
                    {"resource": {"resourceType": "Consent", "decision": "permit"}},
                ],
            },
            Release.R5,
        ),
    ],
)
def test_detect_release__one_rule_for_validator_mapper_and_consent(resource, expected) -> None:
    """Validation, mapping and the consent compiler tell a release by the same elements."""
    from fhir_kap.consent import policy
    from fhir_kap.fhir import release as fhirmodel
    from fhir_kap.records import mapping

    assert detect_release(resource) is fhirmodel.detect_release(resource) is expected
    assert mapping.detect_release(resource) is (expected or Release.R4)
    if resource["resourceType"] == "Consent":
        r4, r5 = fhirmodel.release_signals(resource)
        assert policy.detect_release(resource) is (None if r4 and r5 else expected or Release.R4)


def test_bundle_entries_and_contained_are_validated_with_their_own_type() -> None:
    bad = _load(FHIR / "invalid" / "r4" / "procedure-status-bogus.json")
    bundle = {"resourceType": "Bundle", "type": "collection", "entry": [{"resource": bad}]}
    issues = Validator.load(Release.R4).validate(bundle)
    assert ("binding:required", "Bundle.entry[0].resource.status") in [(i.rule, i.expression) for i in issues]
    assert any(i.pointer == "/entry/0/resource/status" for i in issues)


def test_not_an_object__is_an_issue_not_a_crash() -> None:
    assert [i.rule for i in Validator.load(Release.R4).validate([1, 2])] == ["schema:type"]  # type: ignore[arg-type]
    assert [i.rule for i in Validator.load(Release.R4).validate({"resourceType": "Nope"})] == [
        "schema:resourceType"
    ]


def test_every_profile_constraint_has_an_implementation() -> None:
    profiles, _term = load_profile_rules()
    keys = {c["key"] for p in profiles.values() for c in p.constraints}
    assert keys == IMPLEMENTED_CONSTRAINTS


GENERATED = ROOT / "fhir_kap" / "validation" / "_generated"


@pytest.mark.parametrize("release", ["r4", "r5"])
def test_generated_code_is_up_to_date_with_its_generator(release: str) -> None:
    """Every generated module (the release's index, datatypes, one module per resource type)
    carries the hash of the generator that wrote it."""
    expected = hashlib.sha256((ROOT / "profiles" / "build" / "gen_validators.py").read_bytes()).hexdigest()
    modules = sorted((GENERATED / release).rglob("*.py"))
    stale = [
        str(m.relative_to(GENERATED))
        for m in modules
        if m.name != "__init__.py" or m.parent.name == release
        if f"GENERATOR_SHA256 = {expected!r}" not in m.read_text()
    ]
    assert len(modules) > 100 and stale == []


def _regenerate_script():
    spec = importlib.util.spec_from_file_location("regenerate", ROOT / "profiles" / "build" / "regenerate.py")
    assert spec and spec.loader
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def test_generated_code_records_the_pinned_input_packages_and_compiler() -> None:
    """Every generated module names the tarballs it was built from, by the hashes
    profiles/build/regenerate.py pins; together they cover every pin."""
    script = _regenerate_script()
    covered: set[str] = set()
    for module in (
        "r4",
        "r4.datatypes",
        "r4.resources.observation",
        "r5",
        "r5.datatypes",
        "r5.resources.observation",
    ):
        generated = importlib.import_module(f"fhir_kap.validation._generated.{module}")
        assert generated.INPUTS_SHA256, module
        assert {spec: script.PINS.get(spec) for spec in generated.INPUTS_SHA256} == generated.INPUTS_SHA256, (
            module
        )
        covered |= set(generated.INPUTS_SHA256)
        if module.endswith("datatypes"):
            assert generated.FASTJSONSCHEMA == script.FASTJSONSCHEMA, module
    assert covered == set(script.PINS)


def test_a_hostile_unknown_element_name_is_shown_shortened():
    resource = _load(FHIR / "valid" / "r4" / "Procedure-ses-004.json")
    resource["y" * 5000] = 1
    issues = Validator.load(Release.R4).validate(resource)
    assert issues and all("y" * 41 not in i.message for i in issues)


@pytest.mark.parametrize("release", [Release.R4, Release.R5])
def test_the_fast_string_patterns_answer_exactly_as_the_official_regexes(release):
    """structure._StringPattern stands in for three whole-string patterns of the generated code: same
    truthiness on every ASCII character, on the empty string, and on non-ASCII (the regex itself)."""
    import re

    from fhir_kap.validation.structure import _FAST_PATTERNS, _StringPattern, _structure_module

    table = _structure_module(release).REGEX_PATTERNS
    installed = {k: v for k, v in table.items() if k in _FAST_PATTERNS}
    assert len(installed) == 3 and all(isinstance(v, _StringPattern) for v in installed.values())
    samples = [
        "",
        " ",
        "a",
        "a b",
        "\t\r\n",
        "x\x0by",
        "\u00a0",
        "ok\u2028",
        "é",
        " lead",
        "trail ",
        "a\x1fb",
    ]
    samples += [chr(c) for c in range(128)] + [f"a{chr(c)}b" for c in range(128)]
    for key, fast in installed.items():
        original = re.compile(fast.original.pattern)
        for text in samples:
            assert bool(fast.search(text)) == bool(original.search(text)), (key, repr(text))


@settings(max_examples=300, deadline=None)
@given(text=st.text(alphabet=st.characters(max_codepoint=0x3000), max_size=40))
def test_the_fast_string_patterns_agree_on_generated_text(text):
    import re

    from fhir_kap.validation.structure import _FAST_PATTERNS, _structure_module

    for release in (Release.R4, Release.R5):
        for key, fast in _structure_module(release).REGEX_PATTERNS.items():
            if key in _FAST_PATTERNS:
                assert bool(fast.search(text)) == bool(re.compile(fast.original.pattern).search(text))


@pytest.mark.parametrize(
    "text",
    [
        "Client: I saw colours.\nTherapist: What did that mean?",
        "Mary: it was bright.\nClient: yes, and then quiet.",  # name-like turn lines with a speaker word
        "Pt: tired. Dr Lee: rest today.",  # clinical labels after a sentence
        "[00:12:31] long pause",
        "Integration going well. Client: stable, sleeping better.",
        "Plan: two more integration sessions. Next review 10:30 on Friday.",
        "S: sleeping better.\nO: calm.\nA: stable.\nP: one more integration session.",  # a SOAP note
    ],
)
def test_the_record_check_and_the_fhir_profile_refuse_the_same_transcripts(text: str) -> None:
    """One rule (textscan.looks_like_transcript) at both doors: a note the KAP-record check lets in
    is never refused as a transcript once mapped to FHIR, and the other way round."""
    from fhir_kap.errors import InputError
    from fhir_kap.records.inputs import TRANSCRIPT_RULE, load_input_schemas

    record = _load(ROOT / "profiles" / "examples" / "records" / "note-note-0001.json")
    record["text"] = text
    try:
        load_input_schemas().check(record)
        record_refused = False
    except InputError as exc:
        record_refused = any(i.rule == TRANSCRIPT_RULE for i in exc.issues)
    resource = _load(ROOT / "profiles" / "examples" / "r4" / "Communication-note-0001.json")
    resource["payload"] = [{"contentString": text}]
    fhir_refused = any(
        i.rule.startswith("kap-note") and "transcript" in i.message.lower()
        for i in Validator.load(Release.R4).validate(resource)
    )
    assert record_refused is fhir_refused is looks_like_transcript(text)


def test_textscan_examples() -> None:
    import doctest

    from fhir_kap.fhir import textscan

    result = doctest.testmod(textscan)
    assert result.attempted > 0 and result.failed == 0


def test_fhirmodel_and_mapping_examples() -> None:
    import doctest

    from fhir_kap.fhir import release as fhirmodel
    from fhir_kap.records import mapping

    for module in (fhirmodel, mapping):
        result = doctest.testmod(module)
        assert result.attempted > 0 and result.failed == 0, module.__name__


def test_validation_examples() -> None:
    import doctest

    from fhir_kap.validation import structure, validator

    for module in (structure, validator):
        result = doctest.testmod(module)
        assert result.attempted > 0 and result.failed == 0, module.__name__


@pytest.mark.parametrize("release", [Release.R4, Release.R5])
def test_the_generated_type_list_is_the_one_list_of_types_validated(release):
    """The generated RESOURCE_TYPES (the official schema's ResourceList) is the one list: each type
    has its own generated module with its entry point, no other module is there, and the
    validator accepts exactly those types (every other resourceType is unknown, never
    'not supported')."""
    from fhir_kap.validation import SUPPORTED_TYPES, resource_types

    types = resource_types(release)
    folder = GENERATED / release.short / "resources"
    assert {p.stem for p in folder.glob("*.py")} - {"__init__"} == {t.lower() for t in types}
    assert set(SUPPORTED_TYPES) <= types and len(types) > 140
    for t in types:
        text = (folder / f"{t.lower()}.py").read_text()
        assert f"def validate___definitions_{t.lower()}(" in text and f"ROOT = {t!r}" in text
    validator = Validator.load(release)
    assert [i.rule for i in validator.validate({"resourceType": "Foo"})] == ["schema:resourceType"]
    unknown = validator.validate({"resourceType": "Foo"})[0].message
    assert "not a FHIR" in unknown and "fhir-kap" not in unknown
