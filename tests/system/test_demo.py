"""`fhir-kap demo --once`: the whole journey over real HTTP, checked at the practice's EHR."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from fhir_kap.demo.journey import EXPECTED_AT_PRACTICE


@pytest.mark.slow
def test_demo_once__practice_ehr_holds_exactly_the_permitted_notes(tmp_path):
    env = {**os.environ, "FHIR_KAP_DATA_DIR": str(tmp_path / "data")}
    env.pop("FHIR_KAP_DATABASE_URL", None)
    run = subprocess.run(
        [sys.executable, "-m", "fhir_kap.cli", "demo", "--once"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    out = run.stdout
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert (
        f"holds {len(EXPECTED_AT_PRACTICE)} continuity notes from fhir-kap: "
        f"{', '.join(EXPECTED_AT_PRACTICE)}  (as expected)" in out
    )
    lines = out.splitlines()

    assert "refused   kap:psychotherapy-note-never-exchanged" in next(x for x in lines if "note-psy-01" in x)
    assert "refused   recipient-not-named" in next(x for x in lines if "note-unnamed-01" in x)
    assert "queued" in next(x for x in lines if "note-followup-01" in x)
    deliveries = [x for x in lines if "fhir-kap deliver --once" in x]
    assert "delivered 4" in deliveries[0] and "held 1" in deliveries[1]
    statuses = [x.split()[-1] for x in lines if "GET /fhir/Task" in x]
    assert statuses == ["received", "completed"]
    assert "Traceback" not in run.stderr
