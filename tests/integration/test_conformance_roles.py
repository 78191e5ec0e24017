"""`fhir-kap check` roles, honest clean-up and --read-only against the broken test server (issue 18).

Each role runs the checks it names in the registry; a server whose DELETE answers 404 keeps the
run's data, and the report says exactly what remains (the same set the server still holds), in
JSON, JUnit, HTML, the TestReport and the console summary.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET

import pytest

from fhir_kap.cli import main
from fhir_kap.config import Release
from fhir_kap.conformance import CheckConfig, run_checks
from fhir_kap.conformance.registry import ROLES, all_checks, checks_for
from fhir_kap.validation import Validator
from testkit.brokenserver import BrokenServer

ROLE_CHECKS = {
    "practice-receiver": ["cap-01", "cap-02", "cap-03", "cap-04", "cap-05", "cap-07"]
    + ["rcv-01", "rcv-02", "rcv-03", "err-01", "sec-01", "sec-02", "sec-03", "cap-08"],
    "referral-sender": ["cap-01", "cap-02", "cap-03", "cap-04", "cap-05", "cap-07"]
    + ["rcv-01", "rcv-02", "rcv-03", "ref-01", "err-01", "err-03", "sec-01", "sec-02", "sec-03", "cap-08"],
}


def _run(role: str, defects: set[str] = frozenset(), **kw):
    with BrokenServer(defects=set(defects)) as server:
        report = run_checks(CheckConfig(server=server.base_url, role=role, **kw))
        left = {f"{t}/{i}" for (t, i) in server.store if (t, i) not in server.deleted}
    return report, left


def _remaining(report) -> set[str]:
    return {f"{t}/{i}" for t, i, _ in report.cleanup.remaining}


@pytest.mark.parametrize("role", sorted(ROLES))
def test_role__runs_its_checks_passes_on_a_good_server_and_leaves_nothing(role):
    report, left = _run(role)
    ids = [r.id for r in report.results]
    expected = ROLE_CHECKS.get(role) or [c.id for c in checks_for(role, all_checks())] + ["cap-08"]
    assert ids == expected
    assert {r.id for r in report.results if r.outcome == "fail"} == set()
    assert report.passed and left == set() and _remaining(report) == set()
    assert not report.data_kept and report.to_dict()["cleanup"]["deleted"] > 0


def test_roles__practice_receiver_never_faces_delete_or_transactions():
    report, _ = _run("practice-receiver")
    assert not {r.id for r in report.results} & {"rt-05", "cap-06", "idem-02", "idem-03"}
    cap04 = next(r for r in report.results if r.id == "cap-04")
    assert cap04.reason == "Communication: create, read, search-type"


@pytest.mark.parametrize("role", ["practice-receiver", "referral-sender", "clinic"])
def test_delete_404__remaining_data_reported_exactly_and_claim_broken(role):
    report, left = _run(role, {"delete_404"})
    assert left and _remaining(report) == left  # exactly what the server still holds
    assert all(why == "DELETE answered 404" for _, _, why in report.cleanup.remaining)
    assert report.data_kept and report.cleanup.deleted == 0
    claims = next(r for r in report.results if r.id == "cap-08")
    assert (
        claims.outcome == "fail" and "says Communication delete, the server does not do it" in claims.reason
    )
    assert claims.fix.startswith("make the server do what its CapabilityStatement declares")
    d = report.to_dict()
    assert d["cleanup"]["remaining_count"] == len(left)
    assert sum(d["cleanup"]["remaining_by_type"].values()) == len(left)
    assert any("DELETE answered 404" in p and "not deleted" in p for p in d["cleanup_problems"])


def test_every_created_resource_carries_the_run_tag():
    with BrokenServer(defects={"delete_404"}) as server:
        report = run_checks(CheckConfig(server=server.base_url, role="full"))
        stored = [h[-1] for h in server.store.values()]
    code = report.run_tag.split("|")[1]
    assert stored
    untagged = [
        f"{r['resourceType']}/{r['id']}"
        for r in stored
        if not any(t.get("code") == code for t in (r.get("meta") or {}).get("tag") or [])
    ]
    assert untagged == []


@pytest.mark.parametrize("role", sorted(ROLES))
def test_read_only__writes_nothing(role):
    with BrokenServer() as server:
        writes = []
        server.app.before_request(lambda: writes.append(1) if _writes() else None)
        report = run_checks(CheckConfig(server=server.base_url, role=role, read_only=True))
        stored = len(server.store)
    assert writes == [] and stored == 0
    assert {r.group for r in report.results} <= {"capability", "validation", "security"}
    assert "cap-08" not in {r.id for r in report.results}
    assert report.read_only and report.cleanup.remaining == ()


def _writes() -> bool:
    from flask import request

    return request.method in ("PUT", "DELETE", "PATCH") or (
        request.method == "POST" and not request.path.endswith("/$validate")
    )


def test_cli__every_report_and_the_exit_summary_name_what_remains(tmp_path, capsys):
    out = {k: tmp_path / f"check.{k}" for k in ("json", "xml", "html", "tr.json")}
    with BrokenServer(defects={"delete_404"}) as server:
        code = main(
            [
                "check",
                "--server",
                server.base_url,
                "--role",
                "practice-receiver",
                "--json",
                str(out["json"]),
                "--junit",
                str(out["xml"]),
                "--html",
                str(out["html"]),
                "--testreport",
                str(out["tr.json"]),
            ]
        )
        left = {f"{t}/{i}" for (t, i) in server.store if (t, i) not in server.deleted}
    assert code == 1 and len(left) == 1
    (only,) = left
    rtype, rid = only.split("/")
    text = capsys.readouterr().out
    assert "LEFT ON THE SERVER: 1 test resources" in text and rid in text
    report = json.loads(out["json"].read_text())
    assert report["role"] == "practice-receiver"
    assert report["cleanup"]["remaining"] == [{"type": rtype, "id": rid, "why": "DELETE answered 404"}]
    props = {p.get("name"): p.get("value") for p in ET.parse(out["xml"]).getroot().find("properties")}
    assert props["cleanup.remaining"] == only
    assert f'<td class="id">{rid}</td>' in out["html"].read_text()
    tr = json.loads(out["tr.json"].read_text())
    assert Validator.load(Release.R4).validate(tr) == []
    assert only in tr["teardown"]["action"][0]["operation"]["message"]
    results = [t["action"][0]["assert"]["result"] for t in tr["test"]]
    assert (
        results.count("fail") == report["summary"]["fail"]
        and results.count("pass") == report["summary"]["pass"]
    )


def test_cli__r5_server_gets_an_r5_testreport(tmp_path):
    with BrokenServer(fhir_version="5.0.0") as server:
        path = tmp_path / "tr.json"
        main(["check", "--server", server.base_url, "--read-only", "--testreport", str(path)])
    tr = json.loads(path.read_text())
    assert isinstance(tr["testScript"], str)
    assert Validator.load(Release.R5).validate(tr) == []
