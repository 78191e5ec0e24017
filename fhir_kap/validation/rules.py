"""KAP profile rules (validation/, layer 1: pure core; imports base only, reads profiles/ once).

`load_profile_rules` reads the KAP StructureDefinitions, ValueSets and CodeSystems in `profiles/`
(written by profiles/build/gen_package.py) into checkable rules: cardinality, fixed and pattern
values, slices, extensions, required bindings and reference target types, plus the kap-*
constraints (implemented in invariants.py). `_profile_issues` checks one resource against the
rules of a profile it claims. The StructureDefinitions are written for R4 (4.0.1); R5 paths are
derived through `_R5_PATHS`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cache, lru_cache
from pathlib import Path
from typing import Any

import orjson

from ..config import Release, data_path
from ..errors import Issue, quote
from ..fhir.references import parse_reference
from .invariants import _constraint_holds
from .paths import _at, _count, _expr, _in_vs, _items, _matches_pattern, _pointer

# R4 profile paths (the StructureDefinitions are written for 4.0.1) as they are named in R5; None: no R5 twin.
_R5_PATHS: dict[str, str | None] = {
    "Procedure.performed": "Procedure.occurrence",
    "Consent.patient": "Consent.subject",
    "Consent.scope": None,
    "Consent.provision.type": None,
}


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
                    pr.rules.append(
                        _Rule("extension", path, lo, hi, e["type"][0]["profile"][0], e["sliceName"])
                    )
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
                    pr.rules.append(
                        _Rule("target", path, value=tuple(p.rsplit("/", 1)[1] for p in t["targetProfile"]))
                    )
        profiles[sd["url"]] = pr
    return profiles, _Terminology(vsets, extensions)


def _r5_path(path: str, release: Release) -> str | None:
    if release is Release.R4:
        return path
    for old, new in _R5_PATHS.items():
        if path == old or path.startswith(old + "."):
            return None if new is None else new + path[len(old) :]
    return path


def _check_extension(
    ext: dict[str, Any], spec: dict[str, Any], term: _Terminology, rt: str, path: tuple[Any, ...]
) -> list[Issue]:
    out: list[Issue] = []
    if spec["value"]:
        key = "value" + spec["value"][0].upper() + spec["value"][1:]
        if key not in ext:
            out.append(
                Issue(
                    "error",
                    "required",
                    f"Extension {ext.get('url')} needs {key}",
                    _expr(rt, path),
                    _pointer(path),
                    "profile:extension-value",
                )
            )
        elif spec["binding"] and not _in_vs(ext[key], term.value_sets[spec["binding"]]):
            out.append(
                Issue(
                    "error",
                    "code-invalid",
                    f"Code not in {spec['binding']}",
                    _expr(rt, path + (key,)),
                    _pointer(path + (key,)),
                    "binding:required",
                )
            )
        return out
    subs = [s for s in _items(ext.get("extension")) if isinstance(s, dict)]
    for name, sub in spec["subs"].items():
        found = [(i, s) for i, s in enumerate(subs) if s.get("url") == name]
        if len(found) < sub["min"] or (sub["max"] != "*" and len(found) > int(sub["max"])):
            out.append(
                Issue(
                    "error",
                    "structure",
                    f"Extension {ext.get('url')} needs {sub['min']}..{sub['max']} "
                    f"'{name}' parts, has {len(found)}",
                    _expr(rt, path + ("extension",)),
                    _pointer(path + ("extension",)),
                    "profile:cardinality",
                )
            )
        for i, s in found:
            out += _check_extension(
                s,
                {"value": sub["value"], "binding": sub["binding"], "subs": {}},
                term,
                rt,
                path + ("extension", i),
            )
    return out


_VALUE_KINDS = frozenset({"fixed", "pattern", "binding", "target"})


@cache
def _rule_paths(
    pr: ProfileRules, release: Release
) -> tuple[tuple[_Rule, str, list[str], list[str], float], ...]:
    """Each rule with its path in `release` split once (rules with no twin in the release
    dropped): (rule, path, its parts, the parent's parts, the upper bound as a number)."""
    out = []
    for rule in pr.rules:
        rpath = _r5_path(rule.path, release)
        if rpath is not None:
            parts = rpath.split(".")[1:]
            out.append((rule, rpath, parts, parts[:-1], float("inf") if rule.max == "*" else int(rule.max)))
    return tuple(out)


def _profile_issues(
    resource: dict[str, Any], rt: str, pr: ProfileRules, release: Release, term: _Terminology
) -> list[Issue]:
    out: list[Issue] = []
    name = pr.url.rsplit("/", 1)[1]
    for rule, rpath, parts, parent_parts, most in _rule_paths(pr, release):
        last = parts[-1]
        kind = rule.kind
        if kind == "card" or kind == "slice":
            parents = _at(resource, parent_parts, ()) if parent_parts else [(resource, ())]
        if kind == "card":
            for parent, ppath in parents:
                n = _count(parent, last)
                if n < rule.min or n > most:
                    code = "required" if n < rule.min else "structure"
                    out.append(
                        Issue(
                            "error",
                            code,
                            f"{name}: {rpath} needs {rule.min}..{rule.max}, has {n}",
                            _expr(rt, ppath + (last,)),
                            _pointer(ppath + (last,)),
                            "profile:cardinality",
                        )
                    )
            continue
        values = _at(resource, parts, ()) if kind in _VALUE_KINDS else []
        if rule.kind == "fixed":
            for v, p in values:
                if v != rule.value:
                    out.append(
                        Issue(
                            "error",
                            "value",
                            f"{name}: {rpath} must be {rule.value!r}, is {quote(v)}",
                            _expr(rt, p),
                            _pointer(p),
                            "profile:fixed",
                        )
                    )
        elif rule.kind == "pattern":
            for v, p in values:
                if not _matches_pattern(v, rule.value):
                    out.append(
                        Issue(
                            "error",
                            "value",
                            f"{name}: {rpath} must carry {_pattern_text(rule.value)}",
                            _expr(rt, p),
                            _pointer(p),
                            "profile:pattern",
                        )
                    )
        elif rule.kind == "slice":
            for parent, ppath in parents:
                items = parent.get(last) if isinstance(parent, dict) else None
                items = items if isinstance(items, list) else ([items] if items is not None else [])
                n = sum(1 for it in items if _matches_pattern(it, rule.value))
                if n < rule.min or (rule.max != "*" and n > int(rule.max)):
                    out.append(
                        Issue(
                            "error",
                            "required" if n < rule.min else "structure",
                            f"{name}: {rpath} needs {rule.min}..{rule.max} entries with "
                            f"{_pattern_text(rule.value)}, has {n}",
                            _expr(rt, ppath + (last,)),
                            _pointer(ppath + (last,)),
                            "profile:pattern",
                        )
                    )
        elif rule.kind == "extension":
            exts = [
                (i, e)
                for i, e in enumerate(_items(resource.get("extension")))
                if isinstance(e, dict) and e.get("url") == rule.value
            ]
            n = len(exts)
            if n < rule.min or (rule.max != "*" and n > int(rule.max)):
                out.append(
                    Issue(
                        "error",
                        "required" if n < rule.min else "structure",
                        f"{name}: extension {rule.value.rsplit('/', 1)[1]} needs {rule.min}..{rule.max}, "
                        f"has {n}",
                        _expr(rt, ("extension",)),
                        _pointer(("extension",)),
                        "profile:extension",
                    )
                )
            spec = term.extensions.get(rule.value)
            for i, e in exts:
                if spec:
                    out += _check_extension(e, spec, term, rt, ("extension", i))
        elif rule.kind == "binding":
            vs = term.value_sets[rule.value]
            for v, p in values:
                if not _in_vs(v, vs):
                    out.append(
                        Issue(
                            "error",
                            "code-invalid",
                            f"{name}: {rpath} must use a code from {rule.value}",
                            _expr(rt, p),
                            _pointer(p),
                            "binding:required",
                        )
                    )
        elif rule.kind == "target":
            for v, p in values:
                # the type it names, however it names it: relative, absolute, versioned, conditional
                # (`Type?...`), or Reference.type beside an identifier; a contained '#id' is not judged
                ref = parse_reference(v) if isinstance(v, dict) else None
                named = ref.type if ref is not None and ref.kind not in ("contained", "container") else None
                if named is not None and named not in rule.value:
                    out.append(
                        Issue(
                            "error",
                            "value",
                            f"{name}: {rpath} must reference {' | '.join(rule.value)}",
                            _expr(rt, p + ("reference",)),
                            _pointer(p + ("reference",)),
                            "profile:target-type",
                        )
                    )
    for c in pr.constraints:
        for suffix, p in _constraint_holds(c["key"], c["expression"], resource, rt, release, term):
            out.append(
                Issue(
                    "error", "invariant", f"{name}: {c['human']}{suffix}", _expr(rt, p), _pointer(p), c["key"]
                )
            )
    return out


def _pattern_text(pattern: dict[str, Any]) -> str:
    return ", ".join(f"{c.get('system')}|{c.get('code')}" for c in pattern.get("coding", []))
