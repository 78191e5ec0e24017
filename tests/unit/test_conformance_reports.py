"""Report renderers and masking: pure functions over a stored report (tests/data/check/)."""

from __future__ import annotations

import copy
import json
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from fhir_kap.conformance import compare_resources, mask_body, mask_headers
from fhir_kap.conformance.reports import console_table, html_report, junit_xml

DATA = Path(__file__).resolve().parents[1] / "data" / "check"


@pytest.fixture()
def report() -> dict:
    return json.loads((DATA / "report-sample.json").read_text())


def test_junit__one_suite_per_group_with_failures_and_skips(report):
    root = ET.fromstring(junit_xml(report))
    assert root.tag == "testsuites"
    suites = {s.get("name"): s for s in root.findall("testsuite")}
    assert list(suites) == [g for g in report["groups"] if any(r["group"] == g for r in report["results"])]
    failed = {c.get("name").split()[0] for c in root.iter("testcase") if c.find("failure") is not None}
    assert failed == {r["id"] for r in report["results"] if r["outcome"] == "fail" and r["required"]}
    assert int(root.get("failures")) == report["summary"]["required_failed"]
    assert sum(int(s.get("tests")) for s in suites.values()) == report["summary"]["total"]
    skipped = {c.get("name").split()[0] for c in root.iter("testcase") if c.find("skipped") is not None}
    assert "cap-07" in skipped


def test_junit__optional_failure_is_skipped_not_failed(report):
    r = next(r for r in report["results"] if r["id"] == "err-05")
    r.update(outcome="fail", reason="accepted status bogus")
    report["summary"]["fail"] += 1
    root = ET.fromstring(junit_xml(report))
    case = next(c for c in root.iter("testcase") if c.get("name").startswith("err-05"))
    assert case.find("failure") is None
    assert "optional check failed: accepted status bogus" in case.find("skipped").get("message")


@pytest.mark.parametrize("render", [html_report, junit_xml])
def test_renderers__escape_hostile_text(report, render):
    hostile = '<script>alert("x")</script> & ]]>'
    report["results"][0]["reason"] = hostile
    report["server"] = "http://srv/<b>"
    out = render(copy.deepcopy(report))
    if render is html_report:
        assert "<script>" not in out and "&lt;script&gt;" in out
    if render is junit_xml:
        assert ET.fromstring(out).find(".//testcase/system-out").text == hostile


def test_html__self_contained_with_failing_exchanges_in_details(report):
    page = html_report(report)
    for external in ("<script", "<link", "src=", "@import", "url("):
        assert external not in page
    assert page.count("<details>") == sum(len(r["exchanges"]) for r in report["results"])
    assert f'data-count="fail">{report["summary"]["fail"]}<' in page


def test_console_table__lists_every_check_and_verdict(report):
    text = console_table(report)
    for r in report["results"]:
        assert r["id"] in text
    assert text.splitlines()[-1].startswith("FAILED: 33 passed, 2 failed (2 required), 1 skipped of 36")


@pytest.mark.parametrize(
    "body, hidden, kept",
    [
        (
            b'{"resourceType":"Patient","id":"p1","name":[{"family":"Doe"}],"birthDate":"1980-01-02",'
            b'"telecom":[{"value":"555"}],"address":[{"city":"X"}],"gender":"female"}',
            ["Doe", "1980-01-02", "555", '"X"'],
            ['"id":"p1"', '"gender":"female"'],
        ),
        (
            b'{"resourceType":"Communication","payload":[{"contentString":"felt calmer"}],'
            b'"category":[{"coding":[{"code":"session-dates"}]}]}',
            ["felt calmer"],
            ["session-dates"],
        ),
        (b'{"access_token":"abc123secret","expires_in":300}', ["abc123secret"], ['"expires_in":300']),
        (
            b"grant_type=client_credentials&client_assertion=eyJhbGciOi.x.y",
            ["eyJhbGciOi"],
            ["grant_type=client_credentials"],
        ),
        (
            b'{"resourceType":"OperationOutcome","issue":[{"severity":"error","diagnostics":"Patient.name missing"}]}',
            [],
            ["Patient.name missing"],
        ),
    ],
)
def test_mask_body__hides_patient_data_and_secrets_keeps_codes(body, hidden, kept):
    out = mask_body(body)
    for h in hidden:
        assert h not in out
    for k in kept:
        assert k in out


def test_mask_body__known_secret_masked_anywhere_and_cut_to_2kb():
    out = mask_body(b'{"resourceType":"Bundle","id":"tok-XYZ-1234"}', secrets=["tok-XYZ-1234"])
    assert "tok-XYZ-1234" not in out
    assert len(mask_body(b"x" * 10_000)) < 2100


def test_mask_headers__keeps_scheme_hides_credentials():
    out = mask_headers(
        {
            "Authorization": "Bearer s3cr3t",
            "Content-Type": "application/fhir+json",
            "Cookie": "a=b",
            "X-Other": "dropped",
        }
    )
    assert out == {"Authorization": "Bearer ***", "Content-Type": "application/fhir+json"}


@pytest.mark.parametrize(
    "sent, back, expected",
    [
        ({"a": 1}, {"a": 1, "id": "x", "meta": {"versionId": "1"}}, ([], [], [])),
        ({"t": "2025-01-09T15:30:00+02:00"}, {"t": "2025-01-09T13:30:00.000Z"}, ([], [], [])),
        ({"a": 1, "b": [1]}, {"b": [2], "c": 3}, (["/a"], ["/b/0"], ["/c"])),
    ],
)
def test_compare_resources__lost_changed_added(sent, back, expected):
    assert compare_resources(sent, back) == expected
