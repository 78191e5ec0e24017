"""Hostile input to the command line: a clear OperationOutcome and exit 2, never a traceback,
never a half-written result."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fhir_kap.cli import main

DATA = Path(__file__).resolve().parents[1] / "data" / "hostile"


@pytest.fixture(autouse=True)
def data_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("FHIR_KAP_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.delenv("FHIR_KAP_DATABASE_URL", raising=False)
    monkeypatch.delenv("FHIR_KAP_CONFIG", raising=False)


def _cli(*argv: str, stdin: bytes = b"") -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fhir_kap.cli", *argv], input=stdin, capture_output=True, timeout=120
    )


def test_map__malformed_line_midway__leaves_a_complete_bundle_and_one_outcome():
    run = _cli("map", "-", stdin=b'{"record":"client","id":"c1"}\n{bad\n')
    assert run.returncode == 2
    assert json.loads(run.stdout)["resourceType"] == "Bundle"  # parseable, not cut off
    outcome = json.loads(run.stderr)
    assert {i["diagnostics"].split(";")[0] for i in outcome["issue"]} >= {"rule json:syntax"}
    assert b"Traceback" not in run.stderr


@pytest.mark.parametrize(
    "argv",
    [
        ["outbox", "show", "99999999999999999999"],
        ["outbox", "retry", "-3"],
        ["outbox", "list", "--limit", "-1"],
        ["audit", "--limit", "1e9"],
    ],
)
def test_out_of_range_numbers__are_usage_errors(argv):
    run = _cli(*argv)
    assert run.returncode == 2 and b"Traceback" not in run.stderr
    assert b"must be" in run.stderr


@pytest.mark.parametrize(
    "name, rule",
    [
        ("Bundle-entries-not-objects.json", "outbox:context-type"),
        ("Consent-meta-not-an-object.json", "fhir:meta"),
        ("Consent-without-patient.json", "outbox:context-patient"),
    ],
)
def test_add_context__hostile_resources__refused_with_the_rule(name, rule, capsys):
    assert main(["outbox", "add-context", str(DATA / name)]) == 2
    assert rule in capsys.readouterr().err


def test_add_context__a_bundle_with_one_bad_entry__stores_nothing(capsys):
    assert main(["outbox", "add-context", str(DATA / "Bundle-consent-and-observation.json")]) == 2
    capsys.readouterr()
    from fhir_kap.config import load_settings
    from fhir_kap.storage.db import Database
    from fhir_kap.storage.outbox import Outbox

    assert Outbox(Database(load_settings().db_url)).context_for("Patient/client-0001") == []
