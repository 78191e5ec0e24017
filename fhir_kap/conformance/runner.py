"""Conformance checks: can this FHIR server take part in KAP exchange, and if not, why
(conformance/, layer 3: orchestration; imports base, client/ and the conformance modules).

A small test framework run against a live server. Each check has an id (`cap-01`), a group,
a title, the spec rule it checks, whether it is *required* (a failed required check makes the
run fail), and an outcome (pass / fail / skip) with a reason. A failure keeps the HTTP
exchanges that proved it, with secrets and patient data masked (masking.py).

This module runs them: `run_checks` probes the server, picks the release, runs the checks of
registry.py in order on one `Context` (context.py) and returns the `RunReport`. Test data is
created under a run-specific identifier system (`http://fhir-kap.example/sid/check-run/<uuid>`)
and deleted afterwards unless `keep_data`.
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
from .context import Check, CheckConfig, Context, Exchange, Failed, Skipped
from .examples import CREATE_ORDER
from .registry import GROUPS, all_checks


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

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "group": self.group,
            "title": self.title,
            "rule": self.rule,
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
            "data_kept": self.data_kept,
            "cleanup_problems": list(self.cleanup_problems),
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
    checks = all_checks(config.invalid_dir)
    client = client or FhirClient(
        config.server, auth=config.auth or NoAuth(), timeout=config.timeout, session=config.session
    )
    ctx = Context(config=config, client=client, run_id=str(uuid.uuid4()))
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
    wanted = [c for c in checks if not config.only or c.group in config.only]
    if config.only and "capability" not in config.only:
        wanted = [c for c in checks if c.id == "cap-01"] + wanted  # the others read its metadata
    results: list[CheckResult] = []
    for n, check in enumerate(wanted):
        if progress:
            progress(n, len(wanted), None, check)
        result = _run_one(ctx, check)
        results.append(result)
        if progress:
            progress(n + 1, len(wanted), result, check)
    problems: list[str] = []
    if not config.keep_data:
        problems = _cleanup(ctx)
    return RunReport(
        server=config.server,
        fhir_version=declared,
        auth=config.auth_kind,
        run_system=ctx.run_system,
        started=started,
        finished=_now(),
        results=tuple(results),
        data_kept=config.keep_data,
        cleanup_problems=tuple(problems),
    )


def _run_one(ctx: Context, check: Check) -> CheckResult:
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
        check.id, check.group, check.title, check.rule, check.required, outcome, reason, kept, ms
    )


def _cleanup(ctx: Context) -> list[str]:
    """Delete what the run created (newest first); also anything found under the run system."""
    problems = []
    seen = set(ctx.created)
    for rtype in CREATE_ORDER:
        try:
            resp = ctx.request("GET", rtype, params={"identifier": f"{ctx.run_system}|", "_count": "100"})
            bundle = resp.json() if resp.status == 200 else None
        except (OSError, KapError):
            bundle = None
        for e in (bundle or {}).get("entry") or [] if isinstance(bundle, dict) else []:
            res = e.get("resource") or {}
            key = (str(res.get("resourceType") or ""), str(res.get("id") or ""))
            if key[0] and key[1] and key not in seen:
                ctx.created.append(key)
                seen.add(key)
    order = {t: i for i, t in enumerate(CREATE_ORDER)}
    # Reversed before the (stable) sort: newest first within a type.
    for rtype, rid in sorted(ctx.created[::-1], key=lambda k: -order.get(k[0], -1)):  # noqa: C415 - see above
        try:
            resp = ctx.request("DELETE", f"{rtype}/{rid}")
            if resp.status not in (200, 202, 204, 404, 410):
                problems.append(f"{rtype}/{rid}: delete answered {resp.status}")
        except (OSError, KapError) as exc:
            problems.append(f"{rtype}/{rid}: {type(exc).__name__}")
    ctx.created.clear()
    return problems
