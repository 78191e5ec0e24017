"""The HTML report in headless Chromium at 1400×900: every failed check is in the first screen
(issue 18). A copy of the page gets a probe script (the report itself has none) that writes each
failed check's box and the viewport into the DOM; `--dump-dom` returns it."""

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
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking"]
PROBE = """<script>
const boxes = [...document.querySelectorAll('#failures li.failure')].map(li => {
  const r = li.getBoundingClientRect();
  return {id: li.dataset.check, top: r.top, bottom: r.bottom};
});
const out = document.createElement('pre');
out.id = 'probe';
out.textContent = JSON.stringify({w: innerWidth, h: innerHeight, boxes});
document.body.appendChild(out);
</script>"""


@pytest.fixture(scope="module")
def chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if not exe:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed under CI: .ci/run must `apt-get install -y chromium`")
        pytest.skip("chromium not installed (apt-get install -y chromium); CI installs it")
    return exe


@pytest.mark.parametrize("name", ["report-left-behind.json", "report-sample.json"])
def test_html_report__every_failed_check_in_the_first_screen_at_1400x900(chromium, tmp_path, name):
    report = json.loads((DATA / name).read_text())
    failed = {r["id"] for r in report["results"] if r["outcome"] == "fail"}
    page = tmp_path / "report.html"
    page.write_text(html_report(report).replace("</body>", PROBE + "</body>"), encoding="utf-8")
    proc = subprocess.run(
        [
            chromium,
            *FLAGS,
            f"--user-data-dir={tmp_path / 'profile'}",
            "--window-size=1400,900",
            "--dump-dom",
            page.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    m = re.search(r'<pre id="probe">(.*?)</pre>', proc.stdout, re.S)
    assert m, proc.stderr[-2000:]
    probe = json.loads(m.group(1).replace("&quot;", '"').replace("&amp;", "&"))
    assert probe["w"] == 1400 and 700 <= probe["h"] <= 900, probe  # the window less its frame
    assert {b["id"] for b in probe["boxes"]} == failed
    below = [b for b in probe["boxes"] if b["bottom"] > probe["h"]]
    assert below == [], f"below the fold at {probe['h']}px: {below}"
    shot = tmp_path / "first-screen.png"
    subprocess.run(
        [
            chromium,
            *FLAGS,
            f"--user-data-dir={tmp_path / 'p2'}",
            "--window-size=1400,900",
            f"--screenshot={shot}",
            page.as_uri(),
        ],
        capture_output=True,
        timeout=120,
    )
    if os.environ.get("FHIR_KAP_KEEP_SCREENSHOT"):
        shutil.copy(shot, os.environ["FHIR_KAP_KEEP_SCREENSHOT"])
