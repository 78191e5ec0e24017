"""The JSON report of a run as a FHIR TestReport (R4 or R5), the resource TestScript runners and
Touchstone read (conformance/, layer 3: orchestration; pure function, imports base only).

One `test` per check (name "id title", description the rule and its link) with one `assert`
action: result pass / fail / skip, message the reason (and what to change when it failed),
detail the spec link. Optional checks that fail are `fail` too, so the counts of pass / fail /
skip asserts equal the JSON report's summary; TestReport.result is `pass` when every required
check passed. The clean-up is the `teardown`: one operation, `pass` when nothing remains,
`warning` naming what was left. R4 and R5 differ only in `testScript` (a Reference in R4, a
canonical in R5). `fhir_kap.validation.Validator.load(release).validate(...)` finds no issue.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..config import CANONICAL, Release

__all__ = ["TEST_SCRIPT", "test_report"]

TEST_SCRIPT = f"{CANONICAL}/TestScript/fhir-kap-check"


def _instant(value: Any) -> str | None:
    text = str(value or "")
    return text.replace("+00:00", "Z") if "T" in text else None


def test_report(report: Mapping[str, Any], release: Release) -> dict[str, Any]:
    """The TestReport of `report` (RunReport.to_dict()) in `release`."""
    s = report["summary"]
    judged = s["pass"] + s["fail"]
    role = report.get("role", "full")
    tests = []
    for r in report["results"]:
        message = r["reason"] or r["outcome"]
        if r["outcome"] == "fail":
            message = ("" if r["required"] else "(optional check) ") + message
            if r.get("fix"):
                message += f" — what to change: {r['fix']}"
        assertion: dict[str, Any] = {"result": r["outcome"], "message": message}
        if r.get("rule_url"):
            assertion["detail"] = r["rule_url"]
        tests.append(
            {
                "name": f"{r['id']} {r['title']}",
                "description": r["rule"] + (f" ({r['rule_url']})" if r.get("rule_url") else ""),
                "action": [{"assert": assertion}],
            }
        )
    c = report.get("cleanup") or {}
    lines = [f"{i['type']}/{i['id']}" for i in c.get("remaining") or []]
    teardown = {
        "result": "warning" if lines else "pass",
        "message": (
            f"{len(lines)} test resources left on the server (tag {report.get('run_tag')}): {', '.join(lines)}"
            if lines
            else f"{c.get('deleted', 0)} test resources deleted; a search by the run's tag finds nothing left"
        ),
    }
    out: dict[str, Any] = {
        "resourceType": "TestReport",
        "identifier": {
            "system": f"{CANONICAL}/sid/check-run",
            "value": str(report["run_system"]).rsplit("/", 1)[-1],
        },
        "name": f"fhir-kap check ({role}) of {report['server']}",
        "status": "completed",
        "testScript": (
            {"reference": TEST_SCRIPT, "display": f"fhir-kap check, role {role}"}
            if release is Release.R4
            else TEST_SCRIPT
        ),
        "result": "pass" if report["passed"] else "fail",
        "score": round(100 * s["pass"] / judged, 2) if judged else 100,
        "tester": "fhir-kap check",
        "participant": [
            {
                "type": "server",
                "uri": str(report["server"]),
                "display": f"FHIR {report.get('fhir_version') or '?'}",
            },
            {"type": "client", "uri": TEST_SCRIPT, "display": "fhir-kap check"},
        ],
        "test": tests,
        "teardown": {"action": [{"operation": teardown}]},
    }
    issued = _instant(report.get("finished"))
    if issued:
        out["issued"] = issued
    return out
