"""`fhir-kap consent evaluate|preview`: exit codes 0/1/2, JSON out, OperationOutcome on bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fhir_kap.cli import main

DATA = Path(__file__).resolve().parents[1] / "data" / "consent"
CTX = [str(DATA / f"{n}.json") for n in ("r4-consent-main", "Practitioner-th-001")]


def evaluate(*extra: str, resource: str = "Procedure-session-dates") -> list[str]:
    return [
        "consent",
        "evaluate",
        "--context",
        *CTX,
        "--resource",
        str(DATA / f"{resource}.json"),
        "--date",
        "2024-05-01",
        *extra,
    ]


@pytest.mark.parametrize(
    "argv,code,decision",
    [
        (evaluate("--recipient", "Practitioner/th-001", "--purpose", "TREAT"), 0, "permit"),
        (
            evaluate("--recipient", "http://hl7.org/fhir/sid/us-npi|1234567893", "--purpose", "TREAT"),
            0,
            "permit",
        ),
        (evaluate("--recipient", "Practitioner/th-002", "--purpose", "TREAT"), 1, "deny"),
        (
            evaluate(
                "--recipient",
                "Practitioner/th-001",
                "--purpose",
                "TREAT",
                resource="Communication-note-psythpn",
            ),
            1,
            "deny",
        ),
    ],
)
def test_evaluate_prints_decision_and_exits_by_outcome(capsys, argv, code, decision):
    assert main(argv) == code
    out = json.loads(capsys.readouterr().out)
    assert out["decision"] == decision and set(out) == {"decision", "reasons", "consent", "obligations"}


@pytest.mark.parametrize(
    "argv",
    [
        evaluate("--recipient", "nonsense", "--purpose", "TREAT"),
        evaluate("--recipient", "Practitioner/th-001", "--purpose", "TREAT", "--fhir-version", "3.0"),
        [
            "consent",
            "evaluate",
            "--context",
            "/nonexistent.json",
            "--resource",
            CTX[0],
            "--recipient",
            "Practitioner/th-001",
            "--purpose",
            "TREAT",
        ],
        [
            "consent",
            "evaluate",
            "--context",
            *CTX,
            "--resource",
            CTX[0],
            "--recipient",
            "Practitioner/th-001",
            "--purpose",
            "TREAT",
            "--date",
            "01/05/2024",
        ],
    ],
)
def test_evaluate_bad_input_exits_2_with_operation_outcome(capsys, argv):
    assert main(argv) == 2
    err = json.loads(capsys.readouterr().err)
    assert err["resourceType"] == "OperationOutcome"


@pytest.mark.parametrize(
    "content",
    [b"{not json", b"[1, 2]", b'{"resourceType": "Consent", "provision": ' * 3000, b"\xff\xfe garbage", b""],
)
def test_hostile_context_never_tracebacks(tmp_path, content):
    bad = tmp_path / "bad.json"
    bad.write_bytes(content)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "fhir_kap.cli",
            "consent",
            "evaluate",
            "--context",
            str(bad),
            "--resource",
            str(DATA / "Procedure-session-dates.json"),
            "--recipient",
            "Practitioner/th-001",
            "--purpose",
            "TREAT",
            "--date",
            "2024-05-01",
        ],
        capture_output=True,
        timeout=60,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert proc.returncode == 2, proc.stderr[-500:]
    assert b"Traceback" not in proc.stderr
    assert json.loads(proc.stderr)["resourceType"] == "OperationOutcome"


def test_deeply_nested_consent_file_denies_without_traceback(tmp_path):
    consent = json.loads((DATA / "r4-consent-main.json").read_text())
    node = consent["provision"]
    for _ in range(200):  # ~400 JSON levels: under orjson's limit, far over the gate's
        node["provision"] = [{"type": "deny"}]
        node = node["provision"][0]
    path = tmp_path / "deep.json"
    path.write_text(json.dumps(consent))
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "fhir_kap.cli",
            "consent",
            "evaluate",
            "--context",
            str(path),
            "--resource",
            str(DATA / "Procedure-session-dates.json"),
            "--recipient",
            "Practitioner/th-001",
            "--purpose",
            "TREAT",
            "--date",
            "2024-05-01",
        ],
        capture_output=True,
        timeout=60,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert proc.returncode == 1 and b"Traceback" not in proc.stderr
    assert json.loads(proc.stdout)["reasons"][0]["code"] == "malformed-consent"


@pytest.mark.parametrize("version,permit", [("4.0.1", True), ("5.0.0", True), ("4.0.1", False)])
def test_audit_out_writes_a_collection_bundle(tmp_path, version, permit):
    from fhir_kap.config import Release
    from fhir_kap.fhir.release import parse_model

    out = tmp_path / "audit.json"
    rec = "Practitioner/th-001" if permit else "Practitioner/th-002"
    code = main(
        evaluate("--recipient", rec, "--purpose", "TREAT", "--fhir-version", version, "--audit-out", str(out))
    )
    assert code == (0 if permit else 1)
    bundle = json.loads(out.read_text())
    assert bundle["type"] == "collection"
    kinds = [e["resource"]["resourceType"] for e in bundle["entry"]]
    assert kinds == (["AuditEvent", "Provenance"] if permit else ["AuditEvent"])
    for e in bundle["entry"]:
        parse_model(e["resource"], Release.parse(version))


def test_preview_json_lists_context_candidates(capsys):
    argv = [
        "consent",
        "preview",
        "--context",
        *CTX,
        str(DATA / "Communication-note-themes.json"),
        str(DATA / "Procedure-session-dates.json"),
        "--recipient",
        "Practitioner/th-001",
        "--date",
        "2024-05-01",
        "--json",
    ]
    assert main(argv) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["resource"], r["decision"]) for r in rows] == [
        ("Communication/note-themes", "deny"),
        ("Procedure/ses-001", "permit"),
    ]


def test_preview_with_candidates_and_purpose(capsys):
    argv = [
        "consent",
        "preview",
        "--context",
        *CTX,
        "--recipient",
        "Practitioner/th-001",
        "--purpose",
        "COC",
        "--date",
        "2024-05-01",
        "--json",
        "--candidates",
        str(DATA / "Communication-note-safety.json"),
    ]
    assert main(argv) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows[0]["decision"] == "deny" and rows[0]["reasons"][0]["code"] == "nested-deny"


def test_preview_prints_the_table_when_piped_too(capsys):
    """One rule for every table command: the table, on a terminal or piped; JSON only with --json."""
    argv = [
        "consent",
        "preview",
        "--context",
        *CTX,
        str(DATA / "Communication-note-themes.json"),
        str(DATA / "Procedure-session-dates.json"),
        "--recipient",
        "Practitioner/th-001",
        "--date",
        "2024-05-01",
    ]
    assert main(argv) == 0
    header, *rows = capsys.readouterr().out.splitlines()
    assert header.split() == ["RESOURCE", "DECISION", "REASON"]
    assert [r.split()[:2] for r in rows] == [
        ["Communication/note-themes", "deny"],
        ["Procedure/ses-001", "permit"],
    ]
