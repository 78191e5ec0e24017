"""Consent decisions/s for a client with 5 consents vs parsing one Consent with fhir.resources.

Target (issue 3): a decision costs less than one Consent parse, i.e. decisions/s ÷ parses/s ≥ 1.
The gate compiles its policies once at construction; decide() only walks the compiled tree.
"""

from __future__ import annotations

import json
import sys
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
DATA = ROOT / "tests" / "data" / "consent"

CONSENTS = [
    "r4-consent-main",
    "r4-consent-org",
    "r4-consent-npi",
    "r4-consent-separate-deny",
    "r4-consent-deny-with-permit",
]
DIRECTORY = [
    "Practitioner-th-001",
    "Practitioner-th-002",
    "Organization-practice-a",
    "PractitionerRole-role-th-001",
    "PractitionerRole-role-th-002-inactive",
]
RESOURCES = [
    "Procedure-session-dates",
    "Communication-note-safety",
    "Communication-note-themes",
    "ServiceRequest-referral",
]


def _load(name: str) -> dict:
    return json.loads((DATA / f"{name}.json").read_text())


def _rate(fn, budget: float) -> float:
    """Calls per second of fn() over about `budget` seconds (after a warm-up)."""
    for _ in range(50):
        fn()
    n, start = 0, time.perf_counter()
    while True:
        for _ in range(200):
            fn()
        n += 200
        elapsed = time.perf_counter() - start
        if elapsed >= budget:
            return n / elapsed


def run(quick: bool = False) -> list[dict]:
    from fhir_kap.config import Release
    from fhir_kap.consent import ConsentGate, Recipient
    from fhir_kap.fhir.release import model_class

    budget = 0.3 if quick else 2.0
    gate = ConsentGate([_load(n) for n in CONSENTS + DIRECTORY])
    resources = [_load(n) for n in RESOURCES]
    recipient = Recipient.parse("Practitioner/th-001")
    on = date(2024, 5, 1)
    state = {"i": 0}

    def decide() -> None:
        state["i"] += 1
        gate.decide(resources[state["i"] % len(resources)], recipient, "TREAT", on)

    consent = _load("r4-consent-main")
    model = model_class(Release.R4, "Consent")
    decisions = _rate(decide, budget)
    parses = _rate(lambda: model.model_validate(consent), budget)
    return [
        {
            "name": "consent decisions/s (5 consents)",
            "value": decisions,
            "unit": "decisions/s",
            "baseline_name": "fhir.resources Consent parse/s",
            "baseline": parses,
            "ratio": decisions / parses,
            "target": {"ratio_min": 1},
        }
    ]


if __name__ == "__main__":
    quick = "--quick" in sys.argv
    print(f"{'benchmark':<36} {'value':>12} {'unit':<14} {'baseline':<32} {'value':>10} {'ratio':>7}")
    for r in run(quick):
        print(
            f"{r['name']:<36} {r['value']:>12,.0f} {r['unit']:<14} {r['baseline_name']:<32} "
            f"{r['baseline']:>10,.0f} {r['ratio']:>7.1f}"
        )
