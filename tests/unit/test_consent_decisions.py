"""Table-driven consent decisions: tests/data/consent/cases.json (R4 and R5, every rule)."""

from __future__ import annotations

import json
from datetime import date, datetime
from pathlib import Path

import pytest

from fhir_kap.consent import ConsentGate, Recipient

DATA = Path(__file__).resolve().parents[1] / "data" / "consent"
CASES = json.loads((DATA / "cases.json").read_text())["cases"]
DIRECTORY = sorted(p.stem for p in DATA.glob("Practitioner*.json")) + ["Organization-practice-a"]


def load(name: str) -> dict:
    return json.loads((DATA / f"{name}.json").read_text())


def when(text: str) -> date | datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00")) if "T" in text else date.fromisoformat(text)


def test_table_has_enough_cases_covering_both_releases():
    assert len(CASES) >= 60
    assert any(c["id"].startswith("r5-") for c in CASES) and any(c["id"].startswith("r4-") for c in CASES)
    assert {c["expect"] for c in CASES} == {"permit", "deny"}


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_decision_table(case: dict):
    names = case["context"] + (DIRECTORY if case.get("directory", True) else [])
    gate = ConsentGate([load(n) for n in names])
    decision = gate.decide(
        load(case["resource"]), Recipient.parse(case["recipient"]), case["purpose"], when(case["date"])
    )
    out = decision.to_json()
    assert out["decision"] == case["expect"], out
    assert out["reasons"][0]["code"] == case["reason"], out
    if "consent" in case:
        assert out["consent"] == case["consent"]
    if decision.permit:
        assert out["consent"] and out["consent"].startswith("Consent/")
        assert "record-provenance" in out["obligations"]
    else:
        assert out["obligations"] == []


def test_context_bundle_is_unpacked():
    bundle = {
        "resourceType": "Bundle",
        "type": "collection",
        "entry": [{"resource": load(n)} for n in ["r4-consent-org"] + DIRECTORY],
    }
    gate = ConsentGate([bundle])
    d = gate.decide(
        load("Procedure-session-dates"), Recipient.parse("Practitioner/th-001"), "TREAT", date(2024, 5, 1)
    )
    assert d.permit


def _nest(depth: int) -> dict:
    consent = load("r4-consent-main")
    node = consent["provision"]
    for _ in range(depth):
        child = {"type": "deny" if node["type"] == "permit" else "permit"}
        node["provision"] = [child]
        node = child
    return consent


@pytest.mark.parametrize("depth", [40, 10_000])
def test_huge_nesting_denies_with_clear_reason_without_recursion_error(depth: int):
    gate = ConsentGate([_nest(depth)] + [load(n) for n in DIRECTORY])
    d = gate.decide(
        load("Procedure-session-dates"), Recipient.parse("Practitioner/th-001"), "TREAT", date(2024, 5, 1)
    )
    assert not d.permit
    assert d.reasons[0].code == "malformed-consent"
    assert "nested deeper than" in d.reasons[0].message


def test_reasons_carry_ids_and_codes_never_resource_text():
    note = load("Communication-note-themes")
    note["payload"] = [{"contentString": "SECRET-CLINICAL-TEXT"}]
    note["id"] = "note-themes"
    gate = ConsentGate([load("r4-consent-main")])
    d = gate.decide(note, Recipient.parse("Practitioner/th-001"), "TREAT", date(2024, 5, 1))
    assert "SECRET-CLINICAL-TEXT" not in json.dumps(d.to_json())


@pytest.mark.parametrize("bad", ["", "abc", "|x", "system|", "Practitioner/"])
def test_recipient_parse_rejects_garbage(bad: str):
    from fhir_kap.errors import InputError

    with pytest.raises(InputError):
        Recipient.parse(bad)


@pytest.mark.parametrize(
    "purpose,on", [("", date(2024, 5, 1)), ("TREAT", datetime(2024, 5, 1, 12)), ("TREAT", "2024-05-01")]
)
def test_bad_request_inputs_raise_input_error(purpose, on):
    from fhir_kap.errors import InputError

    gate = ConsentGate([load("r4-consent-main")])
    with pytest.raises(InputError):
        gate.decide(load("Procedure-session-dates"), Recipient.parse("Practitioner/th-001"), purpose, on)


def test_preview_lists_each_candidate_with_decision_and_reason():
    gate = ConsentGate([load("r4-consent-main")] + [load(n) for n in DIRECTORY])
    names = [
        "Procedure-session-dates",
        "Communication-note-themes",
        "Communication-note-psychotherapy",
        "Communication-note-safety",
    ]
    rows = gate.preview(
        [load(n) for n in names], Recipient.parse("Practitioner/th-001"), None, date(2024, 5, 1)
    )
    assert [(r["resource"], r["decision"], r["reasons"][0]["code"]) for r in rows] == [
        ("Procedure/ses-001", "permit", "permit"),
        ("Communication/note-themes", "deny", "nested-deny"),
        ("Communication/note-psy", "deny", "psychotherapy-note"),
        ("Communication/note-safety", "permit", "permit"),
    ]
    assert rows[3]["purposes"] == ["TREAT"]  # safety is denied for COC by the nested provision
    assert rows[0]["purposes"] == ["TREAT", "COC"]
