"""The consent-audit cases shared by the builders' unit tests and the SEKMET system test."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

DATA = Path(__file__).resolve().parents[1] / "data" / "consent"
RECORDED = datetime(2024, 5, 1, 12, 30, tzinfo=UTC)


def load(name: str) -> dict:
    return json.loads((DATA / f"{name}.json").read_text())


DIRECTORY = [
    load(n) for n in ("Practitioner-th-001", "Organization-practice-a", "PractitionerRole-role-th-001")
]
REQUESTS = [  # (consent fixture, resource fixture, recipient, purpose) → permit and deny and malformed
    ("r4-consent-main", "Procedure-session-dates", "Practitioner/th-001", "TREAT"),
    ("r4-consent-main", "Communication-note-themes", "Practitioner/th-001", "TREAT"),
    ("r4-malformed-type", "Procedure-session-dates", "http://hl7.org/fhir/sid/us-npi|1234567893", "COC"),
    ("r5-consent-main", "Procedure-session-dates", "Practitioner/th-001", "COC"),
]
