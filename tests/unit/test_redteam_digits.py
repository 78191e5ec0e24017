"""Red-team finding F9 (2026-12-05) in the pure code: a number read from outside input is ASCII
digits only. `str.isdigit()` also takes `²` (a Latin-1 header byte), which float()/int() refuse,
and float()/int() read other scripts' digits (`٣` as 3).

- `Retry-After: ²` (or `٣`, `①`) is unreadable (None), like a garbled header, instead of raising
  (the rest-hook sender and the client read it) or counting 3 seconds.
- copies of one Consent whose meta.versionId is such a "digit" are unordered (fail closed when one
  is a revocation), never a ValueError in the gate.
"""

from __future__ import annotations

import copy
import json
from datetime import date
from pathlib import Path

import pytest

from fhir_kap.consent import ConsentGate, Recipient
from fhir_kap.fhir.retry import Backoff, retry_after_seconds

DATA = Path(__file__).resolve().parents[1] / "data" / "consent"
NOT_ASCII = ["\u00b2", "\u2460", "\u0663", "\uff17", "1\u00b2", "\u00b2\u00b3"]


def load(name: str) -> dict:
    return json.loads((DATA / f"{name}.json").read_text())


@pytest.mark.parametrize("value", NOT_ASCII)
def test_retry_after__non_ascii_digits_are_unreadable_like_garbage(value):
    assert retry_after_seconds(value) is None
    assert retry_after_seconds(f" {value} ") is None
    assert retry_after_seconds("garbled") is None  # the same answer as a garbled header
    # so the back-off schedule is used, as for no Retry-After at all
    assert Backoff(jitter=0).wait(3, retry_after_seconds(value)) == Backoff(jitter=0).wait(3, None) == 4.0


def test_retry_after__ascii_seconds_and_dates_still_read():
    assert retry_after_seconds("120") == 120.0 and retry_after_seconds(" 7 ") == 7.0
    assert retry_after_seconds("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412470.0) == 10.0


def _copies(*versions: tuple[str, str]) -> ConsentGate:
    consent = load("r4-consent-main")
    copies = []
    for version, status in versions:
        c = copy.deepcopy(consent)
        c.setdefault("meta", {})["versionId"] = version
        c["status"] = status
        copies.append(c)
    return ConsentGate([*copies, load("Practitioner-th-001"), load("Organization-practice-a")])


def _decide(gate: ConsentGate) -> dict:
    return gate.decide(
        load("Procedure-session-dates"), Recipient.parse("Practitioner/th-001"), "TREAT", date(2024, 5, 1)
    ).to_json()


@pytest.mark.parametrize("value", [*NOT_ASCII, "9" * 5000])
def test_consent_versions__non_ascii_digits_are_unordered_and_fail_closed(value):
    """An active copy at version 1 and a revocation at version `²`: which is current cannot be
    told, so the consent denies (it raised ValueError: int('²'); 5000 digits int() cannot read)."""
    assert _decide(_copies(("1", "active")))["decision"] == "permit"  # the control
    out = _decide(_copies(("1", "active"), (value, "inactive")))
    assert out["decision"] == "deny", out
    # and an active `²` copy beside an active `1`: still no error, ordered as a non-number (1 wins)
    assert _decide(_copies(("1", "active"), (value, "active")))["decision"] == "permit"


@pytest.mark.parametrize(
    "value", ["\u0662\u0660\u0662\u0664-01-01T00:00:00Z", "\u0662\u0660\u0662\u0664-01-01"]
)
def test_consent_periods__dates_in_other_scripts_digits_are_refused(value):
    """`\\d` matches any script's digits and int() reads them: `٢٠٢٤-01-01` was the year 2024."""
    from fhir_kap.consent.periods import PeriodError, parse_bound

    with pytest.raises(PeriodError):
        parse_bound(value, end=False)
    assert parse_bound(value.translate(str.maketrans("\u0660\u0661\u0662\u0664", "0124")), end=False)
