"""One error root for fhir-kap; every error renders as a FHIR OperationOutcome.

Each stage raises its own subclass (input, mapping, profile, consent, server, ...),
and every issue says *where* (a JSON pointer into the source and a FHIRPath expression)
and *why* (the rule broken, in a sentence). Messages carry ids, never patient data.

Room: errors (layer 0, base): imports nothing of ours.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any

__all__ = [
    "Issue",
    "remote_issue_summary",
    "KapError",
    "InputError",
    "MappingError",
    "ProfileError",
    "Unauthorized",
    "Forbidden",
    "UnsupportedMediaType",
    "Gone",
    "CommitUnavailable",
    "NotFound",
    "Conflict",
    "PreconditionFailed",
    "ServerError",
    "ConfigError",
    "operation_outcome",
    "quote",
]

POINTER_EXTENSION = "http://fhir-kap.example/StructureDefinition/source-json-pointer"
RULE_EXTENSION = "http://fhir-kap.example/StructureDefinition/rule"


@dataclass(frozen=True)
class Issue:
    """One problem found, in the shape of an OperationOutcome.issue.

    >>> Issue("error", "value", "Unknown code 'bogus'", expression="Procedure.status",
    ...       pointer="/status", rule="binding:required").expression
    'Procedure.status'
    """

    severity: str  # fatal | error | warning | information
    code: str  # FHIR issue-type: invalid, structure, required, value, invariant, security, ...
    message: str  # one human sentence, no patient data
    expression: str | None = None  # FHIRPath of the offending element
    pointer: str | None = None  # RFC 6901 JSON pointer into the source document
    rule: str | None = None  # id of the rule broken, e.g. "schema:enum", "kap-sr-1"

    def prefixed(self, expression_prefix: str | None = None, pointer_prefix: str = "") -> Issue:
        """The same issue seen from a parent: both paths get the parent's prefix."""
        expr = self.expression
        if expression_prefix:
            expr = f"{expression_prefix}.{expr}" if expr else expression_prefix
        ptr = pointer_prefix + (self.pointer or "") if pointer_prefix else self.pointer
        return replace(self, expression=expr, pointer=ptr)

    @property
    def is_error(self) -> bool:
        return self.severity in ("error", "fatal")

    def to_fhir(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "severity": self.severity,
            "code": self.code,
            "details": {"text": self.message},
        }
        ext = []
        if self.pointer is not None:
            ext.append({"url": POINTER_EXTENSION, "valueString": self.pointer})
        if self.rule:
            ext.append({"url": RULE_EXTENSION, "valueString": self.rule})
        if ext:
            out["extension"] = ext
        diag = [
            x
            for x in (
                f"rule {self.rule}" if self.rule else None,
                f"at {self.pointer}" if self.pointer else None,
            )
            if x
        ]
        if diag:
            out["diagnostics"] = "; ".join(diag)
        if self.expression:
            out["expression"] = [self.expression]
        return out


def quote(value: Any, limit: int = 40) -> str:
    """A value as it is shown in a message: a string or number repr'd and cut to `limit`
    characters (an input's key or code can be as long as the body allows); anything else only
    by its type, since an object or list may hold a name.

    >>> quote("status"), quote("x" * 50), quote({"name": "Jane"})
    ("'status'", "'xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx...'", '<dict>')
    """
    if not isinstance(value, (str, int, float)):  # bool is an int
        return f"<{type(value).__name__}>"
    s = str(value)
    return repr(s if len(s) <= limit else s[: limit - 3] + "...")


def operation_outcome(issues: Iterable[Issue], *, id: str | None = None) -> dict[str, Any]:
    """Render issues as a FHIR OperationOutcome (valid in R4 and R5)."""
    rendered = [i.to_fhir() for i in issues]
    if not rendered:
        rendered = [{"severity": "information", "code": "informational", "details": {"text": "All OK"}}]
    oo: dict[str, Any] = {"resourceType": "OperationOutcome"}
    if id:
        oo["id"] = id
    oo["issue"] = rendered
    return oo


class KapError(Exception):
    """Root of every fhir-kap error. Carries issues; renders as an OperationOutcome.

    `http_status` is what the bridge answers; `exit_code` what the CLI exits with.
    """

    http_status: int = 400
    exit_code: int = 2
    default_code: str = "invalid"

    def __init__(
        self,
        message_or_issues: str | Issue | Sequence[Issue],
        *,
        expression: str | None = None,
        pointer: str | None = None,
        rule: str | None = None,
        code: str | None = None,
    ) -> None:
        if isinstance(message_or_issues, str):
            issues: tuple[Issue, ...] = (
                Issue("error", code or self.default_code, message_or_issues, expression, pointer, rule),
            )
        elif isinstance(message_or_issues, Issue):
            issues = (message_or_issues,)
        else:
            issues = tuple(message_or_issues)
        self.issues: tuple[Issue, ...] = issues
        super().__init__("; ".join(i.message for i in issues) or self.__class__.__name__)

    def operation_outcome(self) -> dict[str, Any]:
        return operation_outcome(self.issues)


class InputError(KapError):
    """Unreadable or invalid input: malformed JSON, a KAP record breaking its schema, ..."""

    http_status = 400
    exit_code = 2
    default_code = "structure"


class MappingError(KapError):
    """A record could not be mapped (unknown local code, missing concept in a code table)."""

    http_status = 422
    exit_code = 1
    default_code = "code-invalid"


class ProfileError(KapError):
    """A FHIR resource breaks base FHIR or a KAP profile rule."""

    http_status = 422
    exit_code = 1
    default_code = "invariant"


class Unauthorized(KapError):
    """No valid credentials (401)."""

    http_status = 401
    exit_code = 1
    default_code = "login"


class Forbidden(KapError):
    """Credentials valid, interaction not allowed for this partner (403)."""

    http_status = 403
    exit_code = 1
    default_code = "forbidden"


class UnsupportedMediaType(KapError):
    """A body that is not FHIR JSON (415)."""

    http_status = 415
    exit_code = 2
    default_code = "not-supported"


class Gone(KapError):
    """The resource was deleted (410)."""

    http_status = 410
    exit_code = 1
    default_code = "deleted"


class CommitUnavailable(KapError):
    """The database could not commit: nothing was acknowledged (503)."""

    http_status = 503
    exit_code = 1
    default_code = "transient"


class NotFound(KapError):
    http_status = 404
    exit_code = 1
    default_code = "not-found"


class Conflict(KapError):
    http_status = 409
    exit_code = 1
    default_code = "conflict"


class PreconditionFailed(KapError):
    http_status = 412
    exit_code = 1
    default_code = "conflict"


class ConfigError(KapError):
    """Bad settings or a missing secret (the secret's *name* is named, never its value)."""

    http_status = 500
    exit_code = 2
    default_code = "exception"


class ServerError(KapError):
    """A remote FHIR server answered with an error (or could not be reached).

    `retryable` is true for connection errors, 429 and 502/503/504; never for 4xx.
    """

    http_status = 502
    exit_code = 1

    def __init__(
        self,
        summary: str,
        *,
        status: int | None = None,
        remote_outcome: dict[str, Any] | None = None,
        retryable: bool = False,
        url: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        self.status = status
        self.retry_after = retry_after  # seconds the server asked us to wait (429/503), if any
        self.remote_outcome = remote_outcome
        self.retryable = retryable
        remote = _remote_issues(remote_outcome)
        said = remote_issue_summary(remote_outcome)
        # the server's issue codes and locations, whoever builds the error: never its free text
        self.summary = summary + (f" (server issues: {said})" if said else "")
        self.url = url
        super().__init__(
            [Issue("error", "exception", self.summary, rule="remote-server")] + remote, code="exception"
        )


def _remote_issues(oo: dict[str, Any] | None) -> list[Issue]:
    """The server's issues by code and location only: its free text (details, diagnostics) may
    quote the resource it refused, so it stays in `remote_outcome` and is never shown."""
    if not isinstance(oo, dict) or oo.get("resourceType") != "OperationOutcome":
        return []
    out = []
    for raw in oo.get("issue") or []:
        if not isinstance(raw, dict):
            continue
        code = str(raw.get("code", "exception"))[:40]
        expr = raw.get("expression") or []
        where = expr[0][:120] if expr and isinstance(expr[0], str) else None
        out.append(
            Issue(
                str(raw.get("severity", "error"))[:20],
                code,
                f"server reported {code}" + (f" at {where}" if where else ""),
                expression=where,
                rule="remote-server",
            )
        )
    return out


def remote_issue_summary(oo: dict[str, Any] | None, limit: int = 5) -> str:
    """`code at expression; ...` for the first `limit` issues of a server's OperationOutcome
    (no free text), or '' when there are none.

    >>> remote_issue_summary({"resourceType": "OperationOutcome", "issue": [
    ...     {"code": "required", "expression": ["Communication.status"], "diagnostics": "Jane Doe ..."}]})
    'required at Communication.status'
    """
    return "; ".join(i.message.removeprefix("server reported ") for i in _remote_issues(oo)[:limit])
