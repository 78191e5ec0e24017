"""The habits CI enforces: `.ci/run` stops on a lint, format or type error before any test runs."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RUFF = shutil.which("ruff", path=str(Path(sys.executable).parent))


def test_ci_run_checks_lint_format_and_types_before_the_tests_and_stops_on_failure():
    script = (ROOT / ".ci" / "run").read_text()
    assert "set -euo pipefail" in script
    lint = script.index("ruff check")
    assert (
        lint
        < script.index("ruff format --no-cache --check")
        < script.index("-m mypy")
        < script.index("-m pytest")
    )


@pytest.mark.skipif(RUFF is None, reason="ruff is installed by `.ci/bootstrap test`")
@pytest.mark.parametrize(
    "source, rule",
    [
        ("import os\n", "F401"),  # an unused import
        ("def f(x=[]):\n    return x\n", "B006"),  # a mutable default
        ("from typing import List\n\nX: List[int] = []\n", "UP035"),  # pre-3.9 typing
    ],
)
def test_the_project_lint_rules_reject_a_probe(tmp_path, source, rule):
    probe = tmp_path / "probe.py"
    probe.write_text(source)
    run = subprocess.run(
        [RUFF, "check", "--no-cache", "--config", str(ROOT / "pyproject.toml"), str(probe)],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 1 and rule in run.stdout, run.stdout


@pytest.mark.skipif(RUFF is None, reason="ruff is installed by `.ci/bootstrap test`")
def test_the_format_check_rejects_unformatted_code(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("x = {  'a':1 }\n")
    run = subprocess.run(
        [RUFF, "format", "--no-cache", "--check", "--config", str(ROOT / "pyproject.toml"), str(probe)],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 1


def test_pre_commit_runs_the_checks_ci_runs_with_the_pinned_tools():
    import yaml

    config = yaml.safe_load((ROOT / ".pre-commit-config.yaml").read_text())
    hooks = {h["id"]: h for repo in config["repos"] for h in repo["hooks"]}
    assert {"ruff-check", "ruff-format", "mypy"} <= set(hooks)
    for hook in hooks.values():
        assert hook["language"] == "system" and hook["entry"].startswith(".venv/bin/"), hook["id"]
        assert (ROOT / hook["entry"].split()[0]).name in {"ruff", "python"}
