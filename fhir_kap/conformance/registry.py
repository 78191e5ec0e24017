"""Every check, in run order: the groups and the explicit list of their modules
(conformance/, layer 3: orchestration; imports base and the conformance checks only).

The order of `GROUPS` is the order of the report; `_checks` names each group module of
`checks/` in that order, so a new check is added to its group module's `CHECKS` and a new group
both here and in `GROUPS`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..config import data_path
from .checks import capability, errors, idempotency, round_trip, search, security, validation
from .context import Check
from .examples import load_invalid_examples

GROUPS = ("capability", "round-trip", "idempotency", "search", "errors", "validation", "security")


def _checks(invalid: Sequence[Mapping[str, Any]]) -> list[Check]:
    return [
        *capability.CHECKS,
        *round_trip.CHECKS,
        *idempotency.CHECKS,
        *search.CHECKS,
        *errors.CHECKS,
        *validation.checks(invalid),
        *security.CHECKS,
    ]


def all_checks(invalid_dir: Path | None = None) -> list[Check]:
    """Every check, in run order (the validation checks depend on the invalid-examples manifest)."""
    folder = invalid_dir or data_path("profiles") / "examples" / "invalid"
    return _checks(load_invalid_examples(Path(folder)))
