"""PSYTHPN anywhere (issue 14): a psychotherapy-note mark in any Coding of the resource blocks the
disclosure, and an Attachment is disclosed only as part of a resource whose categories are permitted.

Fixtures: tests/data/consent/psythpn/ (variants of Communication-note-safety, which
r4-consent-main permits to Practitioner/th-001 for TREAT on 2024-05-01; `cases.json` lists each
with its expected decision).
"""

from __future__ import annotations

import copy
import json
from datetime import date
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fhir_kap.consent import ConsentGate, Recipient
from fhir_kap.consent.categories import categories_of

DATA = Path(__file__).resolve().parents[1] / "data" / "consent"
CASES = json.loads((DATA / "psythpn" / "cases.json").read_text())["cases"]
ON = date(2024, 5, 1)
TH = Recipient.parse("Practitioner/th-001")


def _load(name: str) -> dict[str, Any]:
    return json.loads((DATA / f"{name}.json").read_text())


GATE = ConsentGate(
    [
        _load(n)
        for n in (
            "r4-consent-main",
            "Practitioner-th-001",
            "PractitionerRole-role-th-001",
            "Organization-practice-a",
        )
    ]
)
BASE = _load("Communication-note-safety")


def test_the_base_note_is_permitted():
    assert GATE.decide(BASE, TH, "TREAT", ON).permit


@pytest.mark.parametrize("case", CASES, ids=[c["file"] for c in CASES])
def test_psythpn_anywhere__fixture_decides_as_listed(case):
    resource = json.loads((DATA / "psythpn" / f"{case['file']}.json").read_text())
    decision = GATE.decide(resource, TH, "TREAT", ON)
    assert ("permit" if decision.permit else "deny") == case["expect"], case["where"]
    assert decision.reasons[0].code == case["reason"], case["where"]


def test_too_deep_to_check_counts_as_a_psychotherapy_note():
    note = copy.deepcopy(BASE)
    ext: dict[str, Any] = {"url": "http://example.org/x", "valueString": "leaf"}
    for _ in range(100):
        ext = {"url": "http://example.org/x", "extension": [ext]}
    note["extension"] = [ext]
    assert categories_of(note).psychotherapy
    assert GATE.decide(note, TH, "TREAT", ON).reasons[0].code == "psychotherapy-note"


MARKS = st.sampled_from(["PSYTHPN", "psythpn", " PsyThpn ", "psychotherapy-note", "PSYCHOTHERAPY-NOTE"])
NOT_MARKS = st.sampled_from(["PSY", "R", "notification", "psychotherapy", "PSYTHPNX", "note"])
SYSTEMS = st.sampled_from(
    [
        None,
        "http://terminology.hl7.org/CodeSystem/v3-ActCode",
        "http://fhir-kap.example/CodeSystem/kap-information-category",
        "urn:oid:2.16.840.1.113883.5.4",
        "http://example.org/local",
    ]
)
PLACES = st.sampled_from(
    ["extension", "modifierExtension", "payload", "category", "subject", "meta", "contained", "sender"]
)


def _place(note: dict[str, Any], code: str, system: str | None, place: str, depth: int, form: str) -> None:
    coding: dict[str, Any] = {"code": code} if system is None else {"system": system, "code": code}
    ext: dict[str, Any] = {"url": "http://example.org/ext/leaf"}
    if form == "valueCoding":
        ext["valueCoding"] = coding
    elif form == "valueCodeableConcept":
        ext["valueCodeableConcept"] = {"coding": [coding]}
    else:
        ext["valueCode"] = code
    for _ in range(depth):
        ext = {"url": "http://example.org/ext/outer", "extension": [ext]}
    if place in ("extension", "modifierExtension"):
        note.setdefault(place, []).append(ext)
    elif place == "payload":
        note["payload"][0].setdefault("extension", []).append(ext)
    elif place == "category":
        note["category"][0].setdefault("extension", []).append(ext)
    elif place in ("subject", "sender"):
        note[place].setdefault("extension", []).append(ext)
    elif place == "meta":
        note["meta"].setdefault("extension", []).append(ext)
    else:
        note["contained"] = [{"resourceType": "Basic", "id": "b", "code": {"text": "x"}, "extension": [ext]}]


FORMS = st.sampled_from(["valueCoding", "valueCodeableConcept", "valueCode"])


@settings(max_examples=150, deadline=None)
@given(MARKS, SYSTEMS, PLACES, st.integers(0, 6), FORMS)
def test_property__a_mark_in_any_coding_anywhere_denies(code, system, place, depth, form):
    note = copy.deepcopy(BASE)
    _place(note, code, system, place, depth, form)
    decision = GATE.decide(note, TH, "TREAT", ON)
    assert not decision.permit and decision.reasons[0].code == "psychotherapy-note"


@settings(max_examples=100, deadline=None)
@given(NOT_MARKS, SYSTEMS, PLACES.filter(lambda p: p != "contained"), st.integers(0, 6), FORMS)
def test_property__other_codes_anywhere_leave_a_permitted_note_permitted(code, system, place, depth, form):
    note = copy.deepcopy(BASE)
    _place(note, code, system, place, depth, form)
    assert GATE.decide(note, TH, "TREAT", ON).permit
