"""FHIR structure checks (validation/, layer 1: pure core; imports base only, and its own
generated code in `_generated/`).

Fast path: the fastjsonschema code generated from the official FHIR JSON Schemas with
required-binding code lists injected (profiles/build/gen_validators.py, run through
profiles/build/regenerate.py), one module per resource type in
`fhir_kap/validation/_generated/<release>/resources/<type>.py` over one shared
`<release>/datatypes.py`. A type's module is imported the first time a resource of that type is
validated (`_structure`), so validating a Communication never loads the Observation rules. Only
when the fast path fails is the slower jsonschema validator run on the same definitions (the
type's own plus the shared ones) to list every error with its path (`_schema_issues`). The
generated code calls `calendar_date_ok` (the `fhir-calendar-date` format) and runs its string
patterns through `_StringPattern`, installed in the one shared pattern table before any type
module is used.

Messages never quote free text from the resource (codes are quoted, truncated).
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date
from functools import cache
from typing import Any

import orjson

from ..config import Release
from ..errors import Issue, quote
from .paths import _expr, _pointer

# Elements renamed between R4 and R5 (resource, element stem) -> hint shown with "not an element".
_R5_ONLY = {
    ("Procedure", "occurrence"): "it is R5; R4 uses performed[x]",
    ("Procedure", "reason"): "it is R5; R4 uses reasonCode / reasonReference",
    ("ServiceRequest", "reason"): "it is R5; R4 uses reasonCode / reasonReference",
    ("Consent", "subject"): "it is R5; R4 uses patient",
    ("Consent", "decision"): "it is R5; R4 uses provision.type",
    ("Consent", "grantor"): "it is R5; R4 uses performer",
    ("Consent", "grantee"): "it is R5; R4 names recipients as provision.actor",
    ("Consent", "controller"): "it is R5; R4 uses organization",
    ("Consent", "date"): "it is R5; R4 uses dateTime",
    ("Consent", "regulatoryBasis"): "it is R5; R4 uses policyRule",
    ("Communication", "contentCodeableConcept"): "it is R5; R4 uses contentString",
}
_R4_ONLY = {
    ("Procedure", "performed"): "it is R4; R5 uses occurrence[x]",
    ("Procedure", "reasonCode"): "it is R4; R5 uses reason",
    ("Procedure", "reasonReference"): "it is R4; R5 uses reason",
    ("ServiceRequest", "reasonCode"): "it is R4; R5 uses reason",
    ("ServiceRequest", "reasonReference"): "it is R4; R5 uses reason",
    ("Consent", "scope"): "it is R4; R5 has no scope",
    ("Consent", "patient"): "it is R4; R5 uses subject",
    ("Consent", "dateTime"): "it is R4; R5 uses date",
    ("Consent", "performer"): "it is R4; R5 uses grantor",
    ("Consent", "organization"): "it is R4; R5 uses controller",
    ("Consent", "policyRule"): "it is R4; R5 uses regulatoryBasis",
    ("Communication", "contentString"): "it is R4; R5 uses contentAttachment or contentCodeableConcept",
}

CALENDAR_FORMAT = "fhir-calendar-date"  # set on date/dateTime/instant by profiles/build/gen_validators.py


def calendar_date_ok(value: Any) -> bool:
    """True unless `value` names a day the calendar lacks (the FHIR regexes allow 2024-02-30).

    >>> calendar_date_ok("2024-02-29"), calendar_date_ok("2023-02-29"), calendar_date_ok("2024-02")
    (True, False, True)
    """
    if not isinstance(value, str) or len(value) < 10:
        return True
    try:
        date(int(value[:4]), int(value[5:7]), int(value[8:10]))
    except ValueError:
        return False
    return True


_FORMATS = {CALENDAR_FORMAT: calendar_date_ok}


@dataclass
class _Structure:
    """One root type's generated validator (`fast`) and, built on first failure only, a
    jsonschema validator over the same definitions that lists every error (`slow`)."""

    fast: Callable[..., Any]
    root: str
    module: Any
    shared: Any
    _slow: Any = None
    _patterns: dict[str, str] | None = None

    def slow(self) -> Any:
        if self._slow is None:
            import jsonschema

            definitions = {**_definitions(self.shared), **_definitions(self.module)}
            checker = jsonschema.FormatChecker(formats=())
            checker.checks(CALENDAR_FORMAT)(calendar_date_ok)
            self._slow = jsonschema.Draft6Validator(
                {"$ref": f"#/definitions/{self.root}", "definitions": definitions}, format_checker=checker
            )
            self._patterns = {
                d["pattern"]: n
                for n, d in definitions.items()
                if isinstance(d, dict) and "pattern" in d and "properties" not in d
            }
        return self._slow


@cache
def _definitions(module: Any) -> dict[str, Any]:
    return dict(orjson.loads(module.DEFINITIONS_JSON))


@cache
def resource_types(release: Release) -> frozenset[str]:
    """Every concrete resource type of `release` (the generated list: one module per type)."""
    return frozenset(
        importlib.import_module(f"fhir_kap.validation._generated.{release.short}").RESOURCE_TYPES
    )


@cache
def _structure(release: Release, resource_type: str) -> _Structure:
    """The structure validator of one type of `resource_types(release)`, its module imported now."""
    shared = _structure_module(release)
    mod = importlib.import_module(
        f"fhir_kap.validation._generated.{release.short}.resources.{resource_type.lower()}"
    )
    return _Structure(
        fast=getattr(mod, f"validate___definitions_{resource_type.lower()}"),
        root=resource_type,
        module=mod,
        shared=shared,
    )


def _other_space(t: str) -> bool:
    """Whether ASCII `t` holds whitespace other than ' ', TAB, CR, LF (str.isspace and re's \\s agree
    below 128: also VT, FF and \\x1c-\\x1f). Plain `in` tests: a generator here cost twice as much."""
    return "\x0b" in t or "\x0c" in t or "\x1c" in t or "\x1d" in t or "\x1e" in t or "\x1f" in t


def _any_space(t: str) -> bool:
    """Whether ASCII `t` holds any whitespace at all."""
    return " " in t or "\t" in t or "\n" in t or "\r" in t or _other_space(t)


class _StringPattern:
    """A stand-in for one of the official schemas' whole-string patterns, with its exact result
    (truthy when it matches, else None) and a plain-string fast path for ASCII text.

    The generated code runs `^[ \\r\\n\\t\\S]+$` (R4 `string`), `^^[\\s\\S]+$$` (R5 `string`) and
    `^\\S*$` (`uri`, `id`-like types) over every string it meets; on a 3 KB note that regex loop
    was a quarter of the validation time. The base64 pattern costs ~0.15 s per MB of attachment
    as a regex, a few ms as a split and a character-class match. For ASCII text the same answer is a few substring
    scans; anything else goes to the original compiled pattern. A test compares both on every
    ASCII character and on generated strings.
    """

    def __init__(self, original: Any, kind: str) -> None:
        self.original = original
        self.pattern = original.pattern
        self.kind = kind

    def search(self, text: str) -> Any:
        if not text.isascii():
            return self.original.search(text)
        kind = self.kind
        if kind == "base64":  # groups of 4 from [0-9a-zA-Z+/=], whitespace between groups
            chunks = text.split()
            ok = (
                bool(chunks)
                and all(len(c) % 4 == 0 for c in chunks)
                and _BASE64_CHARS.fullmatch("".join(chunks)) is not None
            )
        elif kind == "fhir-string":  # non-empty, no whitespace but space, TAB, CR and LF
            ok = bool(text) and not _other_space(text)
        elif kind == "no-space":
            ok = not _any_space(text)
        else:  # "non-empty"
            ok = bool(text)
        return True if ok else None


_FAST_PATTERNS = {
    "^[ \\r\\n\\t\\S]+$": "fhir-string",
    "^^[\\s\\S]+$$": "non-empty",
    "^\\S*$": "no-space",
    "^\\s*([0-9a-zA-Z\\+/=]{4}\\s*)+$": "base64",
}
_BASE64_CHARS = re.compile(r"[0-9a-zA-Z+/=]*")


@cache
def _structure_module(release: Release) -> Any:
    """The shared datatypes module of `release`, with `_StringPattern`s in its pattern table (the
    one table every type module imports)."""
    mod = importlib.import_module(f"fhir_kap.validation._generated.{release.short}.datatypes")
    table = mod.REGEX_PATTERNS
    for key, kind in _FAST_PATTERNS.items():
        if key in table and not isinstance(table[key], _StringPattern):
            table[key] = _StringPattern(table[key], kind)
    return mod


@cache
def _choice_index(release: Release) -> dict[str, str]:
    """JSON name of a choice variant -> its stem ('performedPeriod' -> 'performed')."""
    mod = importlib.import_module(f"fhir_kap.validation._generated.{release.short}")
    out: dict[str, str] = {}
    for stem_path, names in mod.CHOICES.items():
        stem = stem_path.rsplit(".", 1)[1]
        for n in names:
            out[n] = stem
    return out


def _only_comments(key: str, value: Any) -> bool:
    return key.startswith("_") and isinstance(value, dict) and value.keys() == {"fhir_comments"}


def _schema_issues(st: _Structure, resource: dict[str, Any], rt: str, release: Release) -> list[Issue]:
    issues: list[Issue] = []
    ignored = False
    validator = st.slow()
    patterns = st._patterns or {}
    rel = "R4" if release is Release.R4 else "R5"
    for err in validator.iter_errors(resource):
        path = tuple(err.absolute_path)
        kw = err.validator
        if kw == "additionalProperties":
            extra = [k for k in err.instance if k not in err.schema.get("properties", {})]
            # JSON comments of old FHIR releases (also as the only content of `_id`) are ignored, as
            # HL7's validator does; any other content of `_id` is an error (no extensions on Resource.id)
            for k in [k for k in extra if k == "fhir_comments" or _only_comments(k, err.instance[k])]:
                extra.remove(k)
                ignored = True
            for k in extra:
                hint = ""
                table = _R5_ONLY if release is Release.R4 else _R4_ONLY
                for (t, stem), h in table.items():
                    if t == rt and (k == stem or k.startswith(stem) and k[len(stem) :][:1].isupper()):
                        hint = f" ({h})"
                owner = _expr(rt, path)
                issues.append(
                    Issue(
                        "error",
                        "structure",
                        f"{quote(k)} is not an {rel} element of {owner}{hint}",
                        _expr(rt, path + (k,)),
                        _pointer(path + (k,)),
                        "schema:additional",
                    )
                )
        elif kw == "required":
            missing = [k for k in err.validator_value if k not in err.instance]
            for k in missing:
                issues.append(
                    Issue(
                        "error",
                        "required",
                        f"Missing required element '{k}'",
                        _expr(rt, path + (k,)),
                        _pointer(path + (k,)),
                        "schema:required",
                    )
                )
        elif kw == "anyOf" and all(set(s) == {"required"} for s in err.validator_value):
            k = err.validator_value[0]["required"][0]
            issues.append(
                Issue(
                    "error",
                    "required",
                    f"Missing required element '{k}'",
                    _expr(rt, path + (k,)),
                    _pointer(path + (k,)),
                    "schema:required",
                )
            )
        elif kw == "enum" and not isinstance(err.instance, str):
            issues.append(
                Issue(
                    "error",
                    "structure",
                    f"Wrong JSON type: expected a code (string), got {type(err.instance).__name__}",
                    _expr(rt, path),
                    _pointer(path),
                    "schema:type",
                )
            )
        elif kw == "enum":
            issues.append(
                Issue(
                    "error",
                    "code-invalid",
                    f"Code {quote(err.instance)} is not in the required value set "
                    f"(allowed: {', '.join(map(str, err.validator_value[:12]))}"
                    f"{', ...' if len(err.validator_value) > 12 else ''})",
                    _expr(rt, path),
                    _pointer(path),
                    "binding:required",
                )
            )
        elif kw == "type":
            issues.append(
                Issue(
                    "error",
                    "structure",
                    f"Wrong JSON type: expected {err.validator_value}, got {type(err.instance).__name__}",
                    _expr(rt, path),
                    _pointer(path),
                    "schema:type",
                )
            )
        elif kw == "pattern":
            kind = patterns.get(err.validator_value, "primitive")
            issues.append(
                Issue(
                    "error",
                    "value",
                    f"Value is not a valid FHIR {kind}",
                    _expr(rt, path),
                    _pointer(path),
                    "schema:pattern",
                )
            )
        elif kw == "format":
            issues.append(
                Issue(
                    "error",
                    "value",
                    "Date is not a calendar date (no such day in that month)",
                    _expr(rt, path),
                    _pointer(path),
                    "schema:calendar-date",
                )
            )
        elif kw == "minItems":
            issues.append(
                Issue(
                    "error",
                    "structure",
                    "Arrays must not be empty in FHIR JSON",
                    _expr(rt, path),
                    _pointer(path),
                    "schema:minItems",
                )
            )
        elif kw == "const":
            issues.append(
                Issue(
                    "error",
                    "structure",
                    f"Expected {quote(err.validator_value)}",
                    _expr(rt, path),
                    _pointer(path),
                    "schema:const",
                )
            )
        elif kw in ("minimum", "maximum"):
            issues.append(
                Issue(
                    "error",
                    "value",
                    f"Number out of range ({kw} {err.validator_value})",
                    _expr(rt, path),
                    _pointer(path),
                    f"schema:{kw}",
                )
            )
        else:
            issues.append(
                Issue(
                    "error",
                    "structure",
                    f"Breaks the FHIR schema ({kw})",
                    _expr(rt, path),
                    _pointer(path),
                    f"schema:{kw}",
                )
            )
    if not issues and not ignored:  # fastjsonschema and jsonschema disagree: never pass silently
        issues.append(
            Issue("error", "structure", f"Breaks the FHIR {rel} schema of {rt}", rt, "", "schema:structure")
        )
    return issues
