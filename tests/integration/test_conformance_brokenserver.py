"""`fhir-kap check` against a deliberately broken server: each defect fails the right checks only."""

from __future__ import annotations

from pathlib import Path

import pytest

from fhir_kap.client import BearerAuth, NoAuth
from fhir_kap.conformance import CheckConfig, run_checks
from testkit.brokenserver import BrokenServer

ROOT = Path(__file__).resolve().parents[2]
# The KAP examples shipped with the profiles; the minimal set in tests/data/check until they land.
EXAMPLES = next(
    p
    for p in (ROOT / "profiles" / "examples" / "r4", ROOT / "tests" / "data" / "check" / "examples" / "r4")
    if p.is_dir()
)
TOKEN = "broken-server-token-0123"

EXPECTED_FAILURES = {
    "wrong_version": {"cap-02"},
    "no_conditional_create": {"cap-05", "idem-01", "rcv-02"},
    "non_atomic_transaction": {"idem-03"},
    "error_500": {"err-01", "err-06"},
    "open_access": {"sec-01", "sec-02"},
    "ignore_count": {"srch-08"},
    "delete_404": {"rt-05", "cap-08"},
    "subscription_no_topics": {"cap-09"},  # optional: reported, the run still passes
}


def _run(defects: set[str]):
    with BrokenServer(defects=defects, token=TOKEN) as server:
        report = run_checks(
            CheckConfig(
                server=server.base_url, auth=BearerAuth(TOKEN), auth_kind="bearer", examples_dir=EXAMPLES
            )
        )
        left = [k for k in server.store if k not in server.deleted]
    return report, left


def _failed(report) -> set[str]:
    return {r.id for r in report.results if r.outcome == "fail"}


def test_well_behaved_server__every_check_passes_and_data_is_removed():
    report, left = _run(set())
    assert _failed(report) == set()
    # auth is bearer, not smart; it claims neither conditionalUpdate nor Subscription
    assert {r.id for r in report.results if r.outcome == "skip"} == {"cap-07", "cap-09", "rt-06"}
    assert report.passed
    assert left == []


@pytest.mark.parametrize("defect", sorted(EXPECTED_FAILURES))
def test_defect__reported_by_the_right_checks_only(defect):
    report, _ = _run({defect})
    assert _failed(report) == EXPECTED_FAILURES[defect]
    failing = [r for r in report.results if r.outcome == "fail"]
    assert all(r.exchanges for r in failing), "a failure keeps the exchange that proved it"
    assert report.passed is all(not r.required for r in failing)


def test_failure_evidence__masks_the_token_and_patient_data():
    report, _ = _run({"open_access"})
    text = repr(report.to_dict())
    assert TOKEN not in text
    sec = next(r for r in report.results if r.id == "sec-01")
    assert sec.exchanges[-1].status == 200
    assert "Authorization" not in sec.exchanges[-1].request_headers


def test_without_auth__security_checks_skip_with_reason():
    with BrokenServer() as server:
        report = run_checks(
            CheckConfig(server=server.base_url, auth=NoAuth(), examples_dir=EXAMPLES, only=("security",))
        )
    assert [(r.id, r.outcome) for r in report.results] == [
        ("cap-01", "pass"),
        ("sec-01", "skip"),
        ("sec-02", "skip"),
        ("sec-03", "skip"),
    ]
    assert "no auth configured" in report.results[1].reason


def test_keep_data__leaves_the_run_data_in_place():
    with BrokenServer() as server:
        report = run_checks(
            CheckConfig(server=server.base_url, examples_dir=EXAMPLES, only=("idempotency",), keep_data=True)
        )
        left = [r for (t, i), h in server.store.items() for r in h[-1:] if (t, i) not in server.deleted]
    assert report.data_kept
    assert left and all(any(i["system"] == report.run_system for i in r.get("identifier", [])) for r in left)
