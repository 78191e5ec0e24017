"""Conformance checks: can this FHIR server take part in KAP exchange, and if not, why
(conformance/, layer 3: orchestration; imports base, client/ and the conformance modules).

A small test framework run against a live server. Each check has an id (`cap-01`), a group,
a title, the spec rule it checks, whether it is *required* (a failed required check makes the
run fail), and an outcome (pass / fail / skip) with a reason. A failure keeps the HTTP
exchanges that proved it, with secrets and patient data masked (masking.py).

This module runs them: `run_checks` probes the server, picks the release, runs the checks the
role needs (registry.ROLES; `read_only` keeps only those that write nothing) in order on one
`Context` (context.py), cleans up (cleanup.py), runs cap-08 (claims the server did not honour,
the clean-up's DELETEs included) and returns the `RunReport`. Test data carries the run's tag and
a run-specific identifier system (`http://fhir-kap.example/sid/check-run/<uuid>`); it is deleted
afterwards unless `keep_data`, and what remains is searched for and reported either way.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from ..client import FhirClient, NoAuth
from ..config import Release
from ..errors import ConfigError, KapError, ServerError
from .cleanup import Cleanup, clean_up
from .context import RUN_TAG_SYSTEM, Check, CheckConfig, Context, Exchange, Failed, Skipped
from .registry import GROUPS, all_checks, checks_for, claims_check, fix_for, role, rule_url


@dataclass(frozen=True)
class CheckResult:
    id: str
    group: str
    title: str
    rule: str
    required: bool
    outcome: str  # pass | fail | skip
    reason: str
    exchanges: tuple[Exchange, ...] = ()
    duration_ms: int = 0
    rule_url: str | None = None
    fix: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "group": self.group,
            "title": self.title,
            "rule": self.rule,
            "rule_url": self.rule_url,
            "fix": self.fix,
            "required": self.required,
            "outcome": self.outcome,
            "reason": self.reason,
            "duration_ms": self.duration_ms,
            "exchanges": [e.to_dict() for e in self.exchanges],
        }


@dataclass(frozen=True)
class RunReport:
    """The result of one run. `to_dict()` is the JSON report (schema in reports.py)."""

    server: str
    fhir_version: str | None
    auth: str
    run_system: str
    started: str
    finished: str
    results: tuple[CheckResult, ...]
    data_kept: bool = False
    cleanup_problems: tuple[str, ...] = ()
    role: str = "full"
    read_only: bool = False
    run_tag: str = ""
    cleanup: Cleanup | None = None

    @property
    def passed(self) -> bool:
        """True when every required check passed (skips do not count against it)."""
        return all(r.outcome != "fail" for r in self.results if r.required)

    def summary(self) -> dict[str, int]:
        out = {"total": len(self.results), "pass": 0, "fail": 0, "skip": 0, "required_failed": 0}
        for r in self.results:
            out[r.outcome] += 1
            if r.outcome == "fail" and r.required:
                out["required_failed"] += 1
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "report": "fhir-kap-check",
            "version": 1,
            "server": self.server,
            "fhir_version": self.fhir_version,
            "auth": self.auth,
            "run_system": self.run_system,
            "started": self.started,
            "finished": self.finished,
            "passed": self.passed,
            "summary": self.summary(),
            "role": self.role,
            "read_only": self.read_only,
            "run_tag": self.run_tag,
            "data_kept": self.data_kept,
            "cleanup_problems": list(self.cleanup_problems),
            "cleanup": (self.cleanup or Cleanup(attempted=False)).to_dict(),
            "groups": list(GROUPS),
            "results": [r.to_dict() for r in self.results],
        }


class ServerUnreachable(ServerError):
    """The server could not be reached at all (the CLI exits 2)."""

    exit_code = 2


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def run_checks(
    config: CheckConfig,
    *,
    progress: Callable[[int, int, CheckResult | None, Check], None] | None = None,
    client: Any = None,
) -> RunReport:
    """Run the checks against `config.server`; raise ServerUnreachable when it cannot be reached."""
    unknown = [g for g in config.only if g not in GROUPS]
    if unknown:
        raise ConfigError(
            f"unknown check group(s) {', '.join(unknown)}; choose from {', '.join(GROUPS)}", rule="check:only"
        )
    the_role = role(config.role)
    checks = all_checks(config.invalid_dir)
    client = client or FhirClient(
        config.server, auth=config.auth or NoAuth(), timeout=config.timeout, session=config.session
    )
    ctx = Context(config=config, client=client, run_id=str(uuid.uuid4()))
    ctx.needs = dict(the_role.needs)
    ctx.conditional_types = the_role.conditional
    ctx.needs_transaction = the_role.transaction
    ctx.secrets.update(s for s in config.secrets if s)
    started = _now()
    try:
        probe = ctx.request("GET", "metadata")
    except OSError as exc:  # requests' ConnectionError/Timeout are OSErrors
        raise ServerUnreachable(
            f"cannot reach {config.server} ({type(exc).__name__})", retryable=True, url=config.server
        ) from None
    except ServerError as exc:
        if exc.status is None:
            raise ServerUnreachable(
                f"cannot reach {config.server} ({exc.summary})", retryable=True, url=config.server
            ) from None
        raise
    ctx.exchanges.clear()
    doc = probe.json()
    declared = doc.get("fhirVersion") if isinstance(doc, dict) else None
    if config.fhir_version != "auto":
        ctx.release = Release.parse(config.fhir_version)
    else:
        try:
            ctx.release = Release.parse(declared)
        except ConfigError:
            ctx.release = Release.R4
    wanted = checks_for(config.role, checks, read_only=config.read_only, only=config.only)
    last = claims_check(config.role, read_only=config.read_only)
    if last and config.only and last.group not in config.only:
        last = None
    total = len(wanted) + (1 if last else 0)
    results: list[CheckResult] = []
    for n, check in enumerate(wanted):
        if progress:
            progress(n, total, None, check)
        result = _run_one(ctx, check)
        results.append(result)
        if progress:
            progress(n + 1, total, result, check)
    ctx.exchanges.clear()
    cleanup = clean_up(ctx)
    if last:  # after the clean-up, so its DELETEs count too
        if progress:
            progress(total - 1, total, None, last)
        results.append(_run_one(ctx, last, release=declared))
        if progress:
            progress(total, total, results[-1], last)
    return RunReport(
        server=config.server,
        fhir_version=declared,
        auth=config.auth_kind,
        run_system=ctx.run_system,
        started=started,
        finished=_now(),
        results=tuple(results),
        data_kept=config.keep_data or bool(cleanup.remaining),
        cleanup_problems=cleanup.problems,
        role=config.role,
        read_only=config.read_only,
        run_tag=f"{RUN_TAG_SYSTEM}|{ctx.run_id}",
        cleanup=cleanup,
    )


def _run_one(ctx: Context, check: Check, release: str | None = None) -> CheckResult:
    ctx.exchanges.clear()
    t0 = time.monotonic()
    try:
        reason = check.run(ctx)
        outcome = "pass"
    except Failed as exc:
        outcome, reason = "fail", str(exc)
    except Skipped as exc:
        outcome, reason = "skip", str(exc)
    except OSError as exc:
        outcome, reason = "fail", f"connection failed during the check ({type(exc).__name__})"
    except KapError as exc:
        outcome, reason = "fail", f"{type(exc).__name__}: {exc}"
    ms = int((time.monotonic() - t0) * 1000)
    kept = tuple(ctx.exchanges[-4:]) if outcome == "fail" else ()
    if outcome == "fail" and not kept and check.group == "capability" and "metadata_exchange" in ctx.state:
        kept = (ctx.state["metadata_exchange"],)  # the CapabilityStatement is the evidence
    return CheckResult(
        check.id,
        check.group,
        check.title,
        check.rule,
        check.required,
        outcome,
        reason,
        kept,
        ms,
        rule_url(check.rule, release or (ctx.metadata or {}).get("fhirVersion")),
        fix_for(check.id),
    )
