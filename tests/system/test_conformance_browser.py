"""The HTML report rendered by a real headless Chromium: it renders, and its counts match the JSON."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from fhir_kap.conformance.reports import html_report

DATA = Path(__file__).resolve().parents[1] / "data" / "check"
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="module")
def chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if not exe:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed under CI: .ci/run must `apt-get install -y chromium`")
        pytest.skip("chromium not installed (apt-get install -y chromium); CI installs it")
    return exe


def _run(chromium: str, tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [chromium, *FLAGS, f"--user-data-dir={tmp_path / 'profile'}", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_html_report__rendered_dom_counts_match_json(chromium, tmp_path):
    report = json.loads((DATA / "report-sample.json").read_text())
    page = tmp_path / "report.html"
    page.write_text(html_report(report), encoding="utf-8")
    proc = _run(chromium, tmp_path, "--dump-dom", page.as_uri())
    dom = proc.stdout
    assert "<main>" in dom, proc.stderr[-2000:]
    counts = dict(re.findall(r'data-count="(\w+)">(\d+)<', dom))
    assert {k: int(v) for k, v in counts.items()} == {k: report["summary"][k] for k in counts}
    assert set(counts) == {"total", "pass", "fail", "skip", "required_failed"}
    rows = re.findall(r'<tr class="result (\w+)"', dom)
    assert len(rows) == report["summary"]["total"]
    assert {o: rows.count(o) for o in ("pass", "fail", "skip")} == {
        o: report["summary"][o] for o in ("pass", "fail", "skip")
    }
    assert 'id="verdict">FAILED<' in dom


def test_html_report__screenshot_is_written(chromium, tmp_path):
    report = json.loads((DATA / "report-sample.json").read_text())
    page = tmp_path / "report.html"
    page.write_text(html_report(report), encoding="utf-8")
    shot = tmp_path / "report.png"
    proc = _run(chromium, tmp_path, "--window-size=1280,1800", f"--screenshot={shot}", page.as_uri())
    assert shot.is_file() and shot.stat().st_size > 10_000, proc.stderr[-2000:]
    if os.environ.get("FHIR_KAP_KEEP_SCREENSHOT"):
        shutil.copy(shot, os.environ["FHIR_KAP_KEEP_SCREENSHOT"])
