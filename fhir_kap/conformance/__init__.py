"""`fhir-kap check`: conformance checks against a FHIR server (layer 3, orchestration).

The runner, its context and masking, the checks by group, and the reports (console, JSON,
JUnit, HTML):

    runner.py    run_checks, RunReport, CheckResult, clean-up of the run's data
    context.py   CheckConfig, Check, Context (the recorded HTTP exchanges), Failed, Skipped
    masking.py   mask_body, mask_headers, compare_resources
    examples.py  the valid KAP examples and the invalid-examples manifest
    registry.py  GROUPS and the explicit list of check modules, all_checks
    checks/      one module per group: capability, round_trip, idempotency, search, errors,
                 validation, security
    reports.py   console, JUnit XML and HTML renderings of the JSON report

May import layers 0-2.
"""

from __future__ import annotations

from .checks.capability import KAP_TYPES
from .context import Check, CheckConfig, Context, Exchange, Failed, Skipped
from .examples import load_examples, load_invalid_examples
from .masking import compare_resources, mask_body, mask_headers
from .registry import GROUPS, all_checks
from .runner import CheckResult, RunReport, ServerUnreachable, run_checks

__all__ = [
    "GROUPS",
    "KAP_TYPES",
    "Check",
    "CheckConfig",
    "CheckResult",
    "Context",
    "Exchange",
    "Failed",
    "RunReport",
    "ServerUnreachable",
    "Skipped",
    "all_checks",
    "compare_resources",
    "load_examples",
    "load_invalid_examples",
    "mask_body",
    "mask_headers",
    "run_checks",
]
