"""`fhir-kap check` shows its progress on a terminal only (a tqdm bar over the checks, the one
running and the counts so far), and nothing when stderr is piped or with `--quiet`."""

from __future__ import annotations

import io
from dataclasses import dataclass

import pytest

from fhir_kap.cli.check import _Progress


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@dataclass
class _Check:
    id: str
    title: str


@dataclass
class _Result:
    outcome: str


def _run(progress: _Progress) -> None:
    checks = [_Check("cap-01", "/metadata returns a CapabilityStatement"), _Check("rt-01", "created")]
    for n, (check, outcome) in enumerate(zip(checks, ["pass", "fail"])):
        progress(n, len(checks), None, check)
        progress(n + 1, len(checks), _Result(outcome), check)


def test_on_a_terminal_the_bar_names_the_running_check_and_the_counts():
    stream = _Terminal()
    _run(_Progress(stream))
    shown = stream.getvalue()
    assert "cap-01" in shown and "rt-01" in shown and "fail=1" in shown and "2/2" in shown


@pytest.mark.parametrize(
    ("stream", "quiet"), [(io.StringIO(), False), (_Terminal(), True)], ids=["piped", "quiet"]
)
def test_piped_or_quiet_shows_nothing(stream, quiet):
    _run(_Progress(stream, quiet=quiet))
    assert stream.getvalue() == ""
