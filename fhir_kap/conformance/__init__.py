"""`fhir-kap check`: conformance checks against a FHIR server (layer 3, orchestration).

The runner, its context and masking, the checks by group, and the reports (console, JSON,
JUnit, HTML).

May import layers 0-2.
"""
from __future__ import annotations

from .runner import (GROUPS, KAP_TYPES, Check, CheckConfig, CheckResult, Context, Exchange, Failed, RunReport,
                     ServerUnreachable, Skipped, all_checks, compare_resources, load_examples,
                     load_invalid_examples, mask_body, mask_headers, run_checks)

__all__ = ["GROUPS", "KAP_TYPES", "Check", "CheckConfig", "CheckResult", "Context", "Exchange", "Failed",
           "RunReport", "ServerUnreachable", "Skipped", "all_checks", "compare_resources", "load_examples",
           "load_invalid_examples", "mask_body", "mask_headers", "run_checks"]
