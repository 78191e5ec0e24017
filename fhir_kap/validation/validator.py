"""The FHIR validator (validation/, layer 1: pure core; imports base only): structure, required
bindings, core invariants, and the KAP profile rules read from the StructureDefinitions in `profiles/`.

`Validator.load(release)` is the entry point. Every resource type of the release is validated
(`resource_types(release)`, the generated list; a type's rules are loaded on first use). One
resource is checked in this order: the generated structure validator (structure.py; contained
resources, Bundle entries and Parameters resources are validated by recursing with their own
type's validator), choice types and periods, core invariants (invariants.py: ele-1, ext-1,
dom-2..5, bdl-*, ...), then the KAP profiles it claims in meta.profile (rules.py) and, on request,
the fhir.resources models. A resource that breaks the structure still gets the later checks, which
read a value of the wrong JSON type as absent (so a profile rule can still say what is missing);
should one trip all the same, the structure errors stand beside a `validation:checks-skipped`
warning, and the validator never raises for bad input.

Messages never quote free text from the resource (codes are quoted, truncated).
"""

from __future__ import annotations

import dataclasses
from functools import cache
from pathlib import Path
from typing import Any

from ..config import CANONICAL, Release
from ..errors import Issue, ProfileError, quote
from ..fhir.release import detect_release
from ..fhir.textscan import looks_like_transcript
from .invariants import _core_invariants, _walk_checks, _walk_finds_something
from .paths import _expr, _pointer
from .resource_invariants import resource_invariants
from .rules import ProfileRules, _profile_issues, _Terminology, load_profile_rules
from .structure import _FORMATS, _choice_index, _schema_issues, _structure, resource_types

__all__ = [
    "Validator",
    "detect_release",
    "looks_like_transcript",
    "load_profile_rules",
    "SUPPORTED_TYPES",
    "KAP_PROFILES",
    "resource_types",
]

# The resource types fhir-kap maps, exchanges or writes itself (a KAP meaning). Validation does not
# use this list: it validates every type of `resource_types(release)`.
SUPPORTED_TYPES = (
    "ServiceRequest",
    "Procedure",
    "Consent",
    "Communication",
    "Patient",
    "Practitioner",
    "PractitionerRole",
    "Organization",
    "AuditEvent",
    "Provenance",
    "Task",
    "OperationOutcome",
    "Bundle",
)
KAP_PROFILES = {
    f"{CANONICAL}/StructureDefinition/{n}": t
    for n, t in (
        ("kap-referral", "ServiceRequest"),
        ("kap-session", "Procedure"),
        ("kap-release-of-information", "Consent"),
        ("kap-continuity-note", "Communication"),
    )
}


class Validator:
    """Validates FHIR resources of one release: structure, required bindings, invariants, KAP profiles.

    >>> v = Validator.load(Release.R4)
    >>> [i.rule for i in v.validate({"resourceType": "Procedure", "status": "bogus",
    ...                               "subject": {"reference": "Patient/p1"}})]
    ['binding:required']
    """

    def __init__(self, release: Release, profiles: dict[str, ProfileRules], term: _Terminology) -> None:
        self.release = release
        self.profiles = profiles
        self.term = term
        self._choices = _choice_index(release)
        self._types = resource_types(release)

    @classmethod
    def load(cls, release: Release, profiles_folder: Path | None = None) -> Validator:
        """The validator for `release` (cached), with KAP rules from `profiles_folder` (default profiles/)."""
        return _load_validator(release, profiles_folder)

    def validate(
        self, resource: dict[str, Any], *, profile: bool = True, models: bool = False
    ) -> list[Issue]:
        """All issues found in `resource` (empty when valid). Never raises for bad input."""
        return self._validate(resource, profile=profile, models=models)

    def _validate(self, resource: Any, *, profile: bool, models: bool) -> list[Issue]:
        if not isinstance(resource, dict):
            return [
                Issue("error", "structure", "A FHIR resource must be a JSON object", None, "", "schema:type")
            ]
        rt = resource.get("resourceType")
        if not isinstance(rt, str) or rt not in self._types:
            rel = "R4" if self.release is Release.R4 else "R5"
            return [
                Issue(
                    "error",
                    "structure",
                    f"resourceType {quote(rt)} is not a FHIR {rel} resource type"
                    if isinstance(rt, str)
                    else "resourceType is missing: a FHIR resource names its type",
                    "resourceType" if rt is None else None,
                    "/resourceType",
                    "schema:resourceType",
                )
            ]
        st = _structure(self.release, rt)
        issues: list[Issue] = []
        try:
            st.fast(resource, _FORMATS)
        except Exception:  # noqa: BLE001 - any fastjsonschema failure means: collect the details
            issues = _schema_issues(st, resource, rt, self.release)
        malformed = bool(issues)
        try:
            issues += self._rules(resource, rt, profile=profile)
        except Exception:  # a last resort, see below
            # The checks after the structure check read any JSON (a value of the wrong type reads as
            # absent; tests/unit/test_validator_robustness.py type-swaps every element of the KAP
            # examples). Should one still trip over a malformed resource, its structure errors
            # stand and the skipped checks are named; on a well-formed resource it is a bug: raise.
            if not malformed:
                raise
            issues.append(
                Issue(
                    "warning",
                    "incomplete",
                    f"Invariant and profile checks of this {rt} were skipped: it breaks the FHIR structure",
                    rt,
                    "",
                    "validation:checks-skipped",
                )
            )
        if models:
            # fhir.resources is a second opinion with known false rejections (R5 `_id`, no 4.0.1
            # models, ...): where the FHIR rules above found no error, its objections are warnings.
            own_error = any(i.is_error for i in issues)
            issues += [
                i if own_error else dataclasses.replace(i, severity="warning")
                for i in _model_issues(resource, rt, self.release)
            ]
        return issues

    def _rules(self, resource: dict[str, Any], rt: str, *, profile: bool) -> list[Issue]:
        """The checks after the structure check: choice types and values, core and resource
        invariants, the nested resources, and the KAP profiles named in meta.profile (a list of
        canonical strings; entries of another type name no profile)."""
        issues: list[Issue] = []
        if _walk_finds_something(resource, self._choices):
            _walk_checks(resource, rt, (), self._choices, issues)
        issues += _core_invariants(resource, rt, self.release)
        issues += resource_invariants(resource, rt, self.release)
        for parts, nested in _nested_resources(resource, rt):
            issues += [_nest(x, rt, parts) for x in self._validate(nested, profile=profile, models=False)]
        if profile:
            meta = resource.get("meta")
            claimed = meta.get("profile") if isinstance(meta, dict) else None
            for url in claimed if isinstance(claimed, list) else []:
                pr = self.profiles.get(url.split("|")[0]) if isinstance(url, str) else None
                if pr is not None and pr.type == rt:
                    issues += _profile_issues(resource, rt, pr, self.release, self.term)
        return issues

    def check(self, resource: dict[str, Any], *, profile: bool = True) -> None:
        """Raise ProfileError with every error issue when `resource` is invalid."""
        errors = [i for i in self.validate(resource, profile=profile) if i.is_error]
        if errors:
            raise ProfileError(errors)


def _nested_resources(resource: dict[str, Any], rt: str) -> list[tuple[tuple[Any, ...], Any]]:
    """(JSON path, resource) of the resources held inside `resource`: contained ones, Bundle
    entries and their response outcomes, Parameters' resources (parts included)."""
    out: list[tuple[tuple[Any, ...], Any]] = []
    contained = resource.get("contained")
    for i, c in enumerate(contained if isinstance(contained, list) else []):
        out.append((("contained", i), c))
    if rt == "Bundle" and isinstance(resource.get("entry"), list):
        for i, e in enumerate(resource["entry"]):
            if isinstance(e, dict) and "resource" in e:
                out.append((("entry", i, "resource"), e["resource"]))
            response = e.get("response") if isinstance(e, dict) else None
            if isinstance(response, dict) and "outcome" in response:
                out.append((("entry", i, "response", "outcome"), response["outcome"]))
    elif rt == "Parameters":
        stack: list[tuple[tuple[Any, ...], Any]] = [(("parameter",), resource.get("parameter"))]
        while stack:
            path, params = stack.pop()
            for i, p in enumerate(params if isinstance(params, list) else []):
                if isinstance(p, dict):
                    if "resource" in p:
                        out.append(((*path, i, "resource"), p["resource"]))
                    if "part" in p:
                        stack.append(((*path, i, "part"), p["part"]))
    return out


def _nest(issue: Issue, parent_rt: str, parts: tuple[Any, ...]) -> Issue:
    expr = issue.expression
    if expr:
        tail = expr.split(".", 1)[1] if "." in expr else ""
        expr = _expr(parent_rt, parts) + ("." + tail if tail else "")
    return Issue(
        issue.severity, issue.code, issue.message, expr, _pointer(parts) + (issue.pointer or ""), issue.rule
    )


@cache
def _load_validator(release: Release, profiles_folder: Path | None) -> Validator:
    profiles, term = load_profile_rules(profiles_folder)
    return Validator(release, profiles, term)


def _model_issues(resource: dict[str, Any], rt: str, release: Release) -> list[Issue]:
    from pydantic import ValidationError

    from ..fhir.release import parse_model

    try:
        parse_model(resource, release)
    except ValidationError as exc:
        out = []
        for err in exc.errors(include_input=False, include_url=False):
            loc = tuple(
                p for p in err.get("loc", ()) if not (isinstance(p, str) and p.startswith("function-"))
            )
            out.append(
                Issue(
                    "error",
                    "structure",
                    f"fhir.resources: {err.get('msg', 'invalid')}",
                    _expr(rt, loc),
                    _pointer(loc),
                    f"model:{rt}",
                )
            )
        return out
    except ImportError:
        return [
            Issue(
                "warning",
                "not-supported",
                f"fhir.resources has no {'R4B' if release is Release.R4 else 'R5'} model of {rt}",
                rt,
                "",
                f"model:{rt}",
            )
        ]
    except (TypeError, ValueError, AttributeError) as exc:
        return [
            Issue(
                "error",
                "structure",
                f"fhir.resources could not read the {rt}: {type(exc).__name__}",
                rt,
                "",
                f"model:{rt}",
            )
        ]
    return []
