"""The package is typed (py.typed) and mypy-clean: the public API's types are part of it."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_mypy__reports_no_issues_in_the_package():
    if not shutil.which("mypy", path=str(Path(sys.executable).parent)):
        pytest.skip("mypy is not installed in this environment (it is in the test extra)")
    run = subprocess.run([sys.executable, "-m", "mypy"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-4000:]
