"""The one benchmark command runs to completion (quick mode) and writes its JSON.

Speed targets are judged by `bench/run.py` itself against same-run baselines, never here.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_bench_quick__every_suite_reports_figures_beside_a_baseline(tmp_path):
    out = tmp_path / "results.json"
    run = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "run.py"), "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=ROOT,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert {r["suite"] for r in rows} == {
        "mapping",
        "validation",
        "consent",
        "bridge",
        "client",
        "delivery",
        "bulk",
        "cli",
        "console",
    }
    broken = [r["name"] for r in rows if r.get("value") is None]
    assert not broken, broken
    assert all(r.get("baseline") for r in rows if r["suite"] != "client" or "baseline" in r)
    assert "ratio" in run.stdout and "figures in" in run.stdout
