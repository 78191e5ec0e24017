"""FHIR validation: base structure (generated fast validators), required bindings, core invariants,
and the KAP profile rules read from the StructureDefinitions in `profiles/`.

Fast path: the fastjsonschema code in `fhir_kap/validation/_generated/<release>/structure.py` (generated from
the official FHIR JSON Schemas with required-binding code lists injected, see
profiles/build/gen_validators.py). Only when it fails is the slower jsonschema validator run on
the same schema to list every error with its path. Contained resources and Bundle entries are
validated by recursing with their own type's validator.

Messages never quote free text from the resource (codes are quoted, truncated).
"""
from __future__ import annotations

import base64
import binascii
import importlib
import re
from dataclasses import dataclass, field
from datetime import date, datetime
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Iterator

import orjson

from ..config import CANONICAL, CS, Release, data_path
from ..errors import Issue, ProfileError, quote
from ..fhir.release import detect_release
from ..fhir.textscan import looks_like_transcript

__all__ = ["Validator", "detect_release", "looks_like_transcript", "load_profile_rules", "SUPPORTED_TYPES",
           "KAP_PROFILES"]

SUPPORTED_TYPES = ("ServiceRequest", "Procedure", "Consent", "Communication", "Patient", "Practitioner",
                   "PractitionerRole", "Organization", "AuditEvent", "Provenance", "Task",
                   "OperationOutcome", "Bundle")
KAP_PROFILES = {f"{CANONICAL}/StructureDefinition/{n}": t for n, t in (
    ("kap-referral", "ServiceRequest"), ("kap-session", "Procedure"),
    ("kap-release-of-information", "Consent"), ("kap-continuity-note", "Communication"))}

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
# R4 profile paths (the StructureDefinitions are written for 4.0.1) as they are named in R5; None: no R5 twin.
_R5_PATHS: dict[str, str | None] = {
    "Procedure.performed": "Procedure.occurrence",
    "Consent.patient": "Consent.subject",
    "Consent.scope": None,
    "Consent.provision.type": None,
}

# ---------------------------------------------------------------------------------------------- paths

def _pointer(parts: tuple[Any, ...]) -> str:
    return "".join("/" + str(p).replace("~", "~0").replace("/", "~1") for p in parts)


def _expr(root: str, parts: tuple[Any, ...]) -> str:
    out = root
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else f".{p}"
    return out


# ---------------------------------------------------------------------------------- structure (schema)

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
    _slow: Any = None
    _patterns: dict[str, str] | None = None

    def slow(self) -> Any:
        if self._slow is None:
            import jsonschema
            definitions = _definitions(self.module)
            checker = jsonschema.FormatChecker(formats=())
            checker.checks(CALENDAR_FORMAT)(calendar_date_ok)
            self._slow = jsonschema.Draft6Validator(
                {"$ref": f"#/definitions/{self.root}", "definitions": definitions}, format_checker=checker)
            self._patterns = {d["pattern"]: n for n, d in definitions.items()
                              if isinstance(d, dict) and "pattern" in d and "properties" not in d}
        return self._slow


@lru_cache(maxsize=None)
def _definitions(module: Any) -> dict[str, Any]:
    return dict(orjson.loads(module.DEFINITIONS_JSON))


@lru_cache(maxsize=None)
def _structure(release: Release, resource_type: str) -> _Structure:
    mod = _structure_module(release)
    return _Structure(fast=getattr(mod, f"validate___definitions_{resource_type.lower()}"),
                      root=resource_type, module=mod)


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
    was a quarter of the validation time. For ASCII text the same answer is a few substring
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
        if kind == "fhir-string":  # non-empty, no whitespace but space, TAB, CR and LF
            ok = bool(text) and not _other_space(text)
        elif kind == "no-space":
            ok = not _any_space(text)
        else:  # "non-empty"
            ok = bool(text)
        return True if ok else None


_FAST_PATTERNS = {"^[ \\r\\n\\t\\S]+$": "fhir-string", "^^[\\s\\S]+$$": "non-empty", "^\\S*$": "no-space"}


@lru_cache(maxsize=None)
def _structure_module(release: Release) -> Any:
    """The generated structure module of `release`, with `_StringPattern`s in its pattern table."""
    mod = importlib.import_module(f"fhir_kap.validation._generated.{release.short}.structure")
    table = mod.REGEX_PATTERNS
    for key, kind in _FAST_PATTERNS.items():
        if key in table and not isinstance(table[key], _StringPattern):
            table[key] = _StringPattern(table[key], kind)
    return mod


@lru_cache(maxsize=None)
def _choice_index(release: Release) -> dict[str, str]:
    """JSON name of a choice variant -> its stem ('performedPeriod' -> 'performed')."""
    mod = importlib.import_module(f"fhir_kap.validation._generated.{release.short}")
    out: dict[str, str] = {}
    for stem_path, names in mod.CHOICES.items():
        stem = stem_path.rsplit(".", 1)[1]
        for n in names:
            out[n] = stem
    return out


def _schema_issues(st: _Structure, resource: dict[str, Any], rt: str, release: Release) -> list[Issue]:
    issues: list[Issue] = []
    validator = st.slow()
    patterns = st._patterns or {}
    rel = "R4" if release is Release.R4 else "R5"
    for err in validator.iter_errors(resource):
        path = tuple(err.absolute_path)
        kw = err.validator
        if kw == "additionalProperties":
            extra = [k for k in err.instance if k not in err.schema.get("properties", {})]
            for k in extra:
                hint = ""
                table = _R5_ONLY if release is Release.R4 else _R4_ONLY
                for (t, stem), h in table.items():
                    if t == rt and (k == stem or k.startswith(stem) and k[len(stem):][:1].isupper()):
                        hint = f" ({h})"
                owner = _expr(rt, path)
                issues.append(Issue("error", "structure", f"{quote(k)} is not an {rel} element of {owner}{hint}",
                                    _expr(rt, path + (k,)), _pointer(path + (k,)), "schema:additional"))
        elif kw == "required":
            missing = [k for k in err.validator_value if k not in err.instance]
            for k in missing:
                issues.append(Issue("error", "required", f"Missing required element '{k}'",
                                    _expr(rt, path + (k,)), _pointer(path + (k,)), "schema:required"))
        elif kw == "anyOf" and all(set(s) == {"required"} for s in err.validator_value):
            k = err.validator_value[0]["required"][0]
            issues.append(Issue("error", "required", f"Missing required element '{k}'",
                                _expr(rt, path + (k,)), _pointer(path + (k,)), "schema:required"))
        elif kw == "enum" and not isinstance(err.instance, str):
            issues.append(Issue("error", "structure", f"Wrong JSON type: expected a code (string), "
                                f"got {type(err.instance).__name__}", _expr(rt, path), _pointer(path),
                                "schema:type"))
        elif kw == "enum":
            issues.append(Issue("error", "code-invalid",
                                f"Code {quote(err.instance)} is not in the required value set "
                                f"(allowed: {', '.join(map(str, err.validator_value[:12]))}"
                                f"{', ...' if len(err.validator_value) > 12 else ''})",
                                _expr(rt, path), _pointer(path), "binding:required"))
        elif kw == "type":
            issues.append(Issue("error", "structure", f"Wrong JSON type: expected {err.validator_value}, "
                                f"got {type(err.instance).__name__}", _expr(rt, path), _pointer(path),
                                "schema:type"))
        elif kw == "pattern":
            kind = patterns.get(err.validator_value, "primitive")
            issues.append(Issue("error", "value", f"Value is not a valid FHIR {kind}",
                                _expr(rt, path), _pointer(path), "schema:pattern"))
        elif kw == "format":
            issues.append(Issue("error", "value", "Date is not a calendar date (no such day in that month)",
                                _expr(rt, path), _pointer(path), "schema:calendar-date"))
        elif kw == "minItems":
            issues.append(Issue("error", "structure", "Arrays must not be empty in FHIR JSON",
                                _expr(rt, path), _pointer(path), "schema:minItems"))
        elif kw == "const":
            issues.append(Issue("error", "structure", f"Expected {quote(err.validator_value)}",
                                _expr(rt, path), _pointer(path), "schema:const"))
        elif kw in ("minimum", "maximum"):
            issues.append(Issue("error", "value", f"Number out of range ({kw} {err.validator_value})",
                                _expr(rt, path), _pointer(path), f"schema:{kw}"))
        else:
            issues.append(Issue("error", "structure", f"Breaks the FHIR schema ({kw})",
                                _expr(rt, path), _pointer(path), f"schema:{kw}"))
    if not issues:  # fastjsonschema and jsonschema disagree: never let that pass silently
        issues.append(Issue("error", "structure", f"Breaks the FHIR {rel} schema of {rt}", rt, "",
                            "schema:structure"))
    return issues


# --------------------------------------------------------------------------------------- walkers

_DATE_RE = re.compile(r"^\d{4}(-\d{2}(-\d{2})?)?")


def _period_out_of_order(start: str, end: str) -> bool:
    try:
        if "T" in start and "T" in end:
            return datetime.fromisoformat(start.replace("Z", "+00:00")) > \
                datetime.fromisoformat(end.replace("Z", "+00:00"))
    except (ValueError, TypeError):
        return False
    n = min(len(start), len(end), 10)
    return start[:n] > end[:n]


def _walk_finds_something(resource: dict[str, Any], choices: dict[str, str]) -> bool:
    """A path-free pre-pass of `_walk_checks` (no tuples built): True when it would report."""
    choice_keys = choices.keys()
    stack: list[Any] = [resource]
    pop, push = stack.pop, stack.append
    while stack:
        node = pop()
        if type(node) is dict:
            hits = node.keys() & choice_keys
            if len(hits) > 1 and len({choices[k] for k in hits}) < len(hits):
                return True
            for k, v in node.items():
                t = type(v)
                if (t is dict or t is list) and k != "contained" and k != "resource":
                    push(v)
            if "start" in node and "end" in node:
                s, e = node["start"], node["end"]
                if isinstance(s, str) and isinstance(e, str) and _DATE_RE.match(s) and _DATE_RE.match(e) \
                        and _period_out_of_order(s, e):
                    return True
        else:
            for v in node:
                t = type(v)
                if t is dict or t is list:
                    push(v)
    return False


def _walk_checks(node: Any, rt: str, path: tuple[Any, ...], choices: dict[str, str],
                 out: list[Issue]) -> None:
    """Choice-type conflicts and Period start <= end, everywhere in the resource (not contained)."""
    if isinstance(node, dict):
        seen: dict[str, str] = {}
        for k, v in node.items():
            stem = choices.get(k)
            if stem is not None:
                if stem in seen:
                    out.append(Issue("error", "structure",
                                     f"Only one of {stem}[x] may be given: '{seen[stem]}' and '{k}' both are",
                                     _expr(rt, path + (k,)), _pointer(path + (k,)), "choice:one-of"))
                else:
                    seen[stem] = k
            if isinstance(v, (dict, list)) and k not in ("contained", "resource"):
                _walk_checks(v, rt, path + (k,), choices, out)
        s, e = node.get("start"), node.get("end")
        if isinstance(s, str) and isinstance(e, str) and _DATE_RE.match(s) and _DATE_RE.match(e) \
                and _period_out_of_order(s, e):
            out.append(Issue("error", "invariant", "Period start is after its end", _expr(rt, path),
                             _pointer(path), "per-1"))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            if isinstance(v, (dict, list)):
                _walk_checks(v, rt, path + (i,), choices, out)


def _codes(cc: Any) -> list[tuple[Any, Any]]:
    if not isinstance(cc, dict):
        return []
    return [(c.get("system"), c.get("code")) for c in cc.get("coding") or [] if isinstance(c, dict)]


def _core_invariants(resource: dict[str, Any], rt: str, release: Release) -> list[Issue]:
    out: list[Issue] = []
    if rt == "Consent" and release is Release.R4:
        if not resource.get("policy") and not resource.get("policyRule"):
            out.append(Issue("error", "invariant", "Either a policy or a policyRule is required", "Consent",
                             "", "ppc-1"))
        scope_codes = {c for _s, c in _codes(resource.get("scope"))}
        for key, code in (("ppc-2", "patient-privacy"), ("ppc-3", "research"), ("ppc-4", "adr"),
                          ("ppc-5", "treatment")):
            if code in scope_codes and not resource.get("patient"):
                out.append(Issue("error", "invariant", f"A consent with scope '{code}' must name a patient",
                                 "Consent.patient", "/patient", key))
    return out


# --------------------------------------------------------------------------------- profile rules

@dataclass(frozen=True)
class _Rule:
    """One checkable statement from a StructureDefinition differential (paths are R4 element paths)."""

    kind: str  # card | fixed | pattern | slice | extension | binding | target
    path: str
    min: int = 0
    max: str = "*"
    value: Any = None
    slice: str | None = None


@dataclass(eq=False)
class ProfileRules:
    """The rules of one KAP profile, read from its StructureDefinition (hashed by identity)."""

    url: str
    type: str
    rules: list[_Rule] = field(default_factory=list)
    constraints: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class _Terminology:
    value_sets: dict[str, tuple[str, frozenset[str]]]  # VS url -> (system, codes)
    extensions: dict[str, dict[str, Any]]  # ext url -> {value: type|None, binding, subs: {...}}


def _cards(el: dict[str, Any]) -> tuple[int, str]:
    return int(el.get("min", 0)), str(el.get("max", "*"))


@lru_cache(maxsize=4)
def load_profile_rules(folder: Path | None = None) -> tuple[dict[str, ProfileRules], _Terminology]:
    """Read the KAP StructureDefinitions, ValueSets and CodeSystems in `folder` (default: profiles/)."""
    folder = folder or data_path("profiles")
    cs_codes: dict[str, list[str]] = {}
    vsets: dict[str, tuple[str, frozenset[str]]] = {}
    sds = []
    for f in sorted(folder.glob("*.json")):
        if f.name in ("package.json",) or f.name.startswith("."):
            continue
        res = orjson.loads(f.read_bytes())
        if res.get("resourceType") == "CodeSystem":
            cs_codes[res["url"]] = [c["code"] for c in res.get("concept", [])]
        elif res.get("resourceType") == "StructureDefinition":
            sds.append(res)
    for f in sorted(folder.glob("ValueSet-*.json")):
        res = orjson.loads(f.read_bytes())
        inc = res["compose"]["include"][0]
        codes = [c["code"] for c in inc["concept"]] if "concept" in inc else cs_codes[inc["system"]]
        vsets[res["url"]] = (inc["system"], frozenset(codes))
    profiles: dict[str, ProfileRules] = {}
    extensions: dict[str, dict[str, Any]] = {}
    for sd in sds:
        elements = sd["differential"]["element"]
        if sd["type"] == "Extension":
            ext: dict[str, Any] = {"value": None, "binding": None, "subs": {}}
            for e in elements:
                eid = e["id"]
                if eid == "Extension.value[x]" and e.get("type"):
                    ext["value"] = e["type"][0]["code"]
                    ext["binding"] = (e.get("binding") or {}).get("valueSet")
                elif eid.startswith("Extension.extension:"):
                    name = eid.split(":", 1)[1].split(".", 1)[0]
                    sub = ext["subs"].setdefault(name, {"min": 0, "max": "*", "value": None, "binding": None})
                    if "sliceName" in e:
                        sub["min"], sub["max"] = _cards(e)
                    elif eid.endswith("value[x]"):
                        sub["value"] = e["type"][0]["code"]
                        sub["binding"] = (e.get("binding") or {}).get("valueSet")
            extensions[sd["url"]] = ext
            continue
        pr = ProfileRules(sd["url"], sd["type"])
        for e in elements:
            path = e["path"]
            if path == sd["type"]:
                pr.constraints = list(e.get("constraint", []))
                continue
            if "slicing" in e and "min" not in e:
                continue
            lo, hi = _cards(e)
            if "sliceName" in e:
                if path.endswith(".extension"):
                    pr.rules.append(_Rule("extension", path, lo, hi, e["type"][0]["profile"][0], e["sliceName"]))
                else:
                    pr.rules.append(_Rule("slice", path, lo, hi, e["patternCodeableConcept"], e["sliceName"]))
                continue
            if "min" in e or "max" in e:
                pr.rules.append(_Rule("card", path, lo, hi))
            if "fixedCode" in e:
                pr.rules.append(_Rule("fixed", path, value=e["fixedCode"]))
            if "patternCodeableConcept" in e:
                pr.rules.append(_Rule("pattern", path, value=e["patternCodeableConcept"]))
            if (e.get("binding") or {}).get("strength") == "required":
                pr.rules.append(_Rule("binding", path, value=e["binding"]["valueSet"]))
            for t in e.get("type", []):
                if t.get("targetProfile"):
                    pr.rules.append(_Rule("target", path, value=tuple(p.rsplit("/", 1)[1]
                                                                      for p in t["targetProfile"])))
        profiles[sd["url"]] = pr
    return profiles, _Terminology(vsets, extensions)


def _at(node: Any, parts: list[str], path: tuple[Any, ...]) -> Iterator[tuple[Any, tuple[Any, ...]]]:
    """Values at an element path (lists flattened), with their JSON paths. A stem matches choices."""
    if not parts:
        yield node, path
        return
    if isinstance(node, list):
        for i, item in enumerate(node):
            yield from _at(item, parts, path + (i,))
        return
    if not isinstance(node, dict):
        return
    head = parts[0]
    keys = [head] if head in node else [k for k in node if k.startswith(head) and k[len(head):][:1].isupper()]
    for k in keys:
        v = node[k]
        if isinstance(v, list):
            for i, item in enumerate(v):
                yield from _at(item, parts[1:], path + (k, i))
        else:
            yield from _at(v, parts[1:], path + (k,))


def _count(node: Any, name: str) -> int:
    if not isinstance(node, dict):
        return 0
    keys = [name] if name in node else [k for k in node if k.startswith(name) and k[len(name):][:1].isupper()]
    n = 0
    for k in keys:
        v = node[k]
        n += len(v) if isinstance(v, list) else 1
    return n


def _matches_pattern(value: Any, pattern: dict[str, Any]) -> bool:
    have = set(_codes(value))
    return all((c.get("system"), c.get("code")) in have for c in pattern.get("coding", []))


def _in_vs(value: Any, vs: tuple[str, frozenset[str]]) -> bool:
    system, codes = vs
    if isinstance(value, str):
        return value in codes
    if isinstance(value, dict) and "code" in value and "coding" not in value:
        return value.get("system") == system and value.get("code") in codes
    return any(s == system and c in codes for s, c in _codes(value))


def _r5_path(path: str, release: Release) -> str | None:
    if release is Release.R4:
        return path
    for old, new in _R5_PATHS.items():
        if path == old or path.startswith(old + "."):
            return None if new is None else new + path[len(old):]
    return path


def _note_texts(resource: dict[str, Any]) -> Iterator[tuple[str, tuple[Any, ...]]]:
    for i, p in enumerate(resource.get("payload") or []):
        if not isinstance(p, dict):
            continue
        if isinstance(p.get("contentString"), str):
            yield p["contentString"], ("payload", i, "contentString")
        cc = p.get("contentCodeableConcept")
        if isinstance(cc, dict) and isinstance(cc.get("text"), str):
            yield cc["text"], ("payload", i, "contentCodeableConcept", "text")
        att = p.get("contentAttachment")
        if isinstance(att, dict) and str(att.get("contentType", "")).startswith("text/") and \
                isinstance(att.get("data"), str):
            try:
                yield base64.b64decode(att["data"], validate=True).decode("utf-8", "replace"), \
                    ("payload", i, "contentAttachment", "data")
            except (binascii.Error, ValueError):
                pass


_SYSTEM_IN_EXPR = re.compile(r"system='([^']+)'")


def _constraint_holds(key: str, expression: str, resource: dict[str, Any], rt: str, release: Release,
                      term: _Terminology) -> list[tuple[str, tuple[Any, ...]]]:
    """Evaluate a kap-* constraint; returns (message suffix, json path) for each violation."""
    raw_meta = resource.get("meta")
    meta: dict[str, Any] = raw_meta if isinstance(raw_meta, dict) else {}
    security = {(s.get("system"), s.get("code")) for s in meta.get("security") or [] if isinstance(s, dict)}
    if key == "kap-sec-1":
        need = {(CS.V3_CONFIDENTIALITY, "R"), (CS.V3_ACTCODE, "PSY")}
        return [] if need <= security else [("", ("meta", "security"))]
    if key == "kap-id-1":
        system = _SYSTEM_IN_EXPR.search(expression).group(1)  # type: ignore[union-attr]
        ok = any(isinstance(i, dict) and i.get("system") == system and i.get("value")
                 for i in resource.get("identifier") or [])
        return [] if ok else [(f" (system {system})", ("identifier",))]
    if key == "kap-referral-1":
        tags = {(t.get("system"), t.get("code")) for t in meta.get("tag") or [] if isinstance(t, dict)}
        return [] if (CS.INFO_CATEGORY, "care-coordination") in tags else [("", ("meta", "tag"))]
    if key == "kap-session-1":
        cats = resource.get("category")
        cats = cats if isinstance(cats, list) else [cats]
        dosing = any((CS.SESSION_KIND, "dosing") in _codes(c) for c in cats)
        n = sum(1 for e in resource.get("extension") or []
                if isinstance(e, dict) and e.get("url") == f"{CANONICAL}/StructureDefinition/kap-dose")
        return [("", ("extension",))] if dosing and n != 1 else []
    if key == "kap-session-2":
        stem = "performed" if release is Release.R4 else "occurrence"
        return [] if any(k.startswith(stem) and not k.startswith("_") for k in resource) else [("", (stem,))]
    if key == "kap-roi-1":
        for prov, p in _at(resource, ["provision"], ()):
            for actor, ap in _at(prov, ["actor"], p):
                if (CS.V3_PARTICIPATION, "IRCP") in {x for r in ([actor.get("role")] if isinstance(
                        actor, dict) else []) for x in _codes(r)}:
                    return []
        return [("", ("provision",))]
    if key == "kap-roi-2":
        return [("", p) for c, p in _at(resource, ["provision", "code"], ())
                if (CS.INFO_CATEGORY, "psychotherapy-note") in _codes(c)]
    if key == "kap-note-1":
        bad: list[tuple[str, tuple[Any, ...]]] = []
        for c, p in _at(resource, ["category"], ()):
            if (CS.INFO_CATEGORY, "psychotherapy-note") in _codes(c):
                bad.append((": category psychotherapy-note", p))
        if any(code == "PSYTHPN" for _s, code in security):
            bad.append((": PSYTHPN security label", ("meta", "security")))
        for text, p in _note_texts(resource):
            if looks_like_transcript(text):
                bad.append((": the payload reads as a transcript", p))
        return bad
    if key == "kap-note-2":
        vs = term.value_sets[f"{CANONICAL}/ValueSet/kap-note-category"]
        ok = any(_in_vs(c, vs) for c, _p in _at(resource, ["category"], ()))
        return [] if ok else [("", ("category",))]
    raise ProfileError(f"No implementation for profile constraint {key}", rule="profile:unknown-constraint")


IMPLEMENTED_CONSTRAINTS = frozenset({"kap-sec-1", "kap-id-1", "kap-referral-1", "kap-session-1",
                                     "kap-session-2", "kap-roi-1", "kap-roi-2", "kap-note-1", "kap-note-2"})


def _check_extension(ext: dict[str, Any], spec: dict[str, Any], term: _Terminology, rt: str,
                     path: tuple[Any, ...]) -> list[Issue]:
    out: list[Issue] = []
    if spec["value"]:
        key = "value" + spec["value"][0].upper() + spec["value"][1:]
        if key not in ext:
            out.append(Issue("error", "required", f"Extension {ext.get('url')} needs {key}", _expr(rt, path),
                             _pointer(path), "profile:extension-value"))
        elif spec["binding"] and not _in_vs(ext[key], term.value_sets[spec["binding"]]):
            out.append(Issue("error", "code-invalid", f"Code not in {spec['binding']}",
                             _expr(rt, path + (key,)), _pointer(path + (key,)), "binding:required"))
        return out
    subs = [s for s in ext.get("extension") or [] if isinstance(s, dict)]
    for name, sub in spec["subs"].items():
        found = [(i, s) for i, s in enumerate(subs) if s.get("url") == name]
        if len(found) < sub["min"] or (sub["max"] != "*" and len(found) > int(sub["max"])):
            out.append(Issue("error", "structure", f"Extension {ext.get('url')} needs {sub['min']}..{sub['max']} "
                             f"'{name}' parts, has {len(found)}", _expr(rt, path + ("extension",)),
                             _pointer(path + ("extension",)), "profile:cardinality"))
        for i, s in found:
            out += _check_extension(s, {"value": sub["value"], "binding": sub["binding"], "subs": {}}, term,
                                    rt, path + ("extension", i))
    return out


_VALUE_KINDS = frozenset({"fixed", "pattern", "binding", "target"})


@lru_cache(maxsize=None)
def _rule_paths(pr: ProfileRules, release: Release) -> tuple[tuple[_Rule, str, list[str]], ...]:
    """Each rule with its path in `release` split once (rules with no twin in the release dropped)."""
    out = []
    for rule in pr.rules:
        rpath = _r5_path(rule.path, release)
        if rpath is not None:
            out.append((rule, rpath, rpath.split(".")[1:]))
    return tuple(out)


def _profile_issues(resource: dict[str, Any], rt: str, pr: ProfileRules, release: Release,
                    term: _Terminology) -> list[Issue]:
    out: list[Issue] = []
    name = pr.url.rsplit("/", 1)[1]
    for rule, rpath, parts in _rule_paths(pr, release):
        last = parts[-1]
        kind = rule.kind
        if kind == "card" or kind == "slice":
            parents = list(_at(resource, parts[:-1], ()))
        if kind == "card":
            for parent, ppath in parents:
                n = _count(parent, last)
                if n < rule.min or (rule.max != "*" and n > int(rule.max)):
                    code = "required" if n < rule.min else "structure"
                    out.append(Issue("error", code, f"{name}: {rpath} needs {rule.min}..{rule.max}, has {n}",
                                     _expr(rt, ppath + (last,)), _pointer(ppath + (last,)),
                                     "profile:cardinality"))
            continue
        values = list(_at(resource, parts, ())) if kind in _VALUE_KINDS else []
        if rule.kind == "fixed":
            for v, p in values:
                if v != rule.value:
                    out.append(Issue("error", "value", f"{name}: {rpath} must be {rule.value!r}, is {quote(v)}",
                                     _expr(rt, p), _pointer(p), "profile:fixed"))
        elif rule.kind == "pattern":
            for v, p in values:
                if not _matches_pattern(v, rule.value):
                    out.append(Issue("error", "value", f"{name}: {rpath} must carry "
                                     f"{_pattern_text(rule.value)}", _expr(rt, p), _pointer(p), "profile:pattern"))
        elif rule.kind == "slice":
            for parent, ppath in parents:
                items = parent.get(last) if isinstance(parent, dict) else None
                items = items if isinstance(items, list) else ([items] if items is not None else [])
                n = sum(1 for it in items if _matches_pattern(it, rule.value))
                if n < rule.min or (rule.max != "*" and n > int(rule.max)):
                    out.append(Issue("error", "required" if n < rule.min else "structure",
                                     f"{name}: {rpath} needs {rule.min}..{rule.max} entries with "
                                     f"{_pattern_text(rule.value)}, has {n}", _expr(rt, ppath + (last,)),
                                     _pointer(ppath + (last,)), "profile:pattern"))
        elif rule.kind == "extension":
            exts = [(i, e) for i, e in enumerate(resource.get("extension") or [])
                    if isinstance(e, dict) and e.get("url") == rule.value]
            n = len(exts)
            if n < rule.min or (rule.max != "*" and n > int(rule.max)):
                out.append(Issue("error", "required" if n < rule.min else "structure",
                                 f"{name}: extension {rule.value.rsplit('/', 1)[1]} needs {rule.min}..{rule.max}, "
                                 f"has {n}", _expr(rt, ("extension",)), _pointer(("extension",)),
                                 "profile:extension"))
            spec = term.extensions.get(rule.value)
            for i, e in exts:
                if spec:
                    out += _check_extension(e, spec, term, rt, ("extension", i))
        elif rule.kind == "binding":
            vs = term.value_sets[rule.value]
            for v, p in values:
                if not _in_vs(v, vs):
                    out.append(Issue("error", "code-invalid", f"{name}: {rpath} must use a code from "
                                     f"{rule.value}", _expr(rt, p), _pointer(p), "binding:required"))
        elif rule.kind == "target":
            for v, p in values:
                ref = v.get("reference") if isinstance(v, dict) else None
                if isinstance(ref, str) and ref.split("/")[-2:-1] and ref.split("/")[-2] not in rule.value:
                    out.append(Issue("error", "value", f"{name}: {rpath} must reference "
                                     f"{' | '.join(rule.value)}", _expr(rt, p + ("reference",)),
                                     _pointer(p + ("reference",)), "profile:target-type"))
    for c in pr.constraints:
        for suffix, p in _constraint_holds(c["key"], c["expression"], resource, rt, release, term):
            out.append(Issue("error", "invariant", f"{name}: {c['human']}{suffix}", _expr(rt, p), _pointer(p),
                             c["key"]))
    return out


def _pattern_text(pattern: dict[str, Any]) -> str:
    return ", ".join(f"{c.get('system')}|{c.get('code')}" for c in pattern.get("coding", []))


# ------------------------------------------------------------------------------------------ Validator

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

    @classmethod
    def load(cls, release: Release, profiles_folder: Path | None = None) -> "Validator":
        """The validator for `release` (cached), with KAP rules from `profiles_folder` (default profiles/)."""
        return _load_validator(release, profiles_folder)

    def validate(self, resource: dict[str, Any], *, profile: bool = True, models: bool = False) -> list[Issue]:
        """All issues found in `resource` (empty when valid). Never raises for bad input."""
        return self._validate(resource, profile=profile, models=models)

    def _validate(self, resource: Any, *, profile: bool, models: bool) -> list[Issue]:
        if not isinstance(resource, dict):
            return [Issue("error", "structure", "A FHIR resource must be a JSON object", None, "",
                          "schema:type")]
        rt = resource.get("resourceType")
        if not isinstance(rt, str) or rt not in SUPPORTED_TYPES:
            return [Issue("error", "not-supported",
                          f"resourceType {quote(rt) if isinstance(rt, str) else 'missing'} is not one fhir-kap "
                          f"validates ({', '.join(SUPPORTED_TYPES)})", "resourceType" if rt is None else None,
                          "/resourceType", "schema:resourceType")]
        st = _structure(self.release, rt)
        issues: list[Issue] = []
        try:
            st.fast(resource, _FORMATS)
        except Exception:  # noqa: BLE001 - any fastjsonschema failure means: collect the details
            issues = _schema_issues(st, resource, rt, self.release)
        if _walk_finds_something(resource, self._choices):
            _walk_checks(resource, rt, (), self._choices, issues)
        issues += _core_invariants(resource, rt, self.release)
        for i, c in enumerate(resource.get("contained") or [] if isinstance(resource.get("contained"), list) else []):
            issues += [_nest(x, rt, ("contained", i)) for x in self._validate(c, profile=profile, models=False)]
        if rt == "Bundle" and isinstance(resource.get("entry"), list):
            for i, e in enumerate(resource["entry"]):
                if isinstance(e, dict) and "resource" in e:
                    issues += [_nest(x, rt, ("entry", i, "resource"))
                               for x in self._validate(e["resource"], profile=profile, models=False)]
        if profile:
            meta = resource.get("meta")
            for url in (meta.get("profile") or []) if isinstance(meta, dict) else []:
                pr = self.profiles.get(str(url).split("|")[0])
                if pr is not None and pr.type == rt:
                    issues += _profile_issues(resource, rt, pr, self.release, self.term)
        if models:
            issues += _model_issues(resource, rt, self.release)
        return issues

    def check(self, resource: dict[str, Any], *, profile: bool = True) -> None:
        """Raise ProfileError with every error issue when `resource` is invalid."""
        errors = [i for i in self.validate(resource, profile=profile) if i.is_error]
        if errors:
            raise ProfileError(errors)


def _nest(issue: Issue, parent_rt: str, parts: tuple[Any, ...]) -> Issue:
    expr = issue.expression
    if expr:
        tail = expr.split(".", 1)[1] if "." in expr else ""
        expr = _expr(parent_rt, parts) + ("." + tail if tail else "")
    return Issue(issue.severity, issue.code, issue.message, expr, _pointer(parts) + (issue.pointer or ""),
                 issue.rule)


@lru_cache(maxsize=None)
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
            loc = tuple(p for p in err.get("loc", ()) if not (isinstance(p, str) and p.startswith("function-")))
            out.append(Issue("error", "structure", f"fhir.resources: {err.get('msg', 'invalid')}",
                             _expr(rt, loc), _pointer(loc), f"model:{rt}"))
        return out
    except (TypeError, ValueError, AttributeError, ImportError) as exc:
        return [Issue("error", "structure", f"fhir.resources could not read the {rt}: {type(exc).__name__}", rt,
                      "", f"model:{rt}")]
    return []
