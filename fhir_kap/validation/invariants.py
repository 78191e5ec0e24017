"""FHIR invariants and the KAP profile constraints (validation/, layer 1: pure core; imports base
only).

Core invariants checked in code, in one walk over the resource: choice types given once
(`choice:one-of`), Period start <= end (per-1), no empty element or value (ele-1), extensions
with a value or extensions (ext-1), strings within 1 MB and numbers within 18 digits; and the R4
Consent's ppc-1..5. The invariants of whole resources (dom-*, bdl-*, que-12, ...) are in
resource_invariants.py. The kap-* constraints the KAP
StructureDefinitions declare (FHIRPath expressions there, for readers and other validators) are
implemented here by key in `_constraint_holds`; IMPLEMENTED_CONSTRAINTS lists them and a test
keeps it equal to the keys the profiles declare.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Iterator
from datetime import datetime
from typing import TYPE_CHECKING, Any

from ..config import CANONICAL, CS, Release
from ..errors import Issue, ProfileError
from ..fhir.textscan import looks_like_transcript
from .paths import _at, _codes, _expr, _in_vs, _items, _pointer, _text

if TYPE_CHECKING:
    from .rules import _Terminology

_DATE_RE = re.compile(r"^\d{4}(-\d{2}(-\d{2})?)?", re.ASCII)


def _period_out_of_order(start: str, end: str) -> bool:
    """per-1 as FHIRPath decides it: start <= end at their common precision; where the common
    part is equal but one is more precise (2023-06-21 against 2023-06-21T06:20:00Z) the
    comparison is empty and the invariant fails, as the reference validator reports."""
    try:
        if "T" in start and "T" in end:
            return datetime.fromisoformat(start.replace("Z", "+00:00")) > datetime.fromisoformat(
                end.replace("Z", "+00:00")
            )
    except (ValueError, TypeError):
        return False
    n = min(len(start), len(end), 10)
    if start[:n] != end[:n]:
        return start[:n] > end[:n]
    return ("T" in start) != ("T" in end)


STRING_LIMIT = 1024 * 1024  # "Strings SHALL NOT exceed 1 MB" (base64Binary is exempt)
_DECIMAL_LIMIT = 10**18  # a JSON integer literal beyond 18 digits fits no FHIR number type
_EXTENSION_KEYS = ("extension", "modifierExtension")


def _is_resource(v: Any) -> bool:
    """A nested resource (contained, Bundle.entry.resource, ...): validated by recursion."""
    return type(v) is dict and "resourceType" in v


def _extension_problem(ext: Any) -> tuple[str, str] | None:
    """(rule, message) when an extension breaks ext-1 (extensions or a value[x], not both and not
    neither) or names a version in its url (the url is the definition's, never versioned)."""
    if type(ext) is not dict:
        return None
    has_value = any(k.startswith("value") and k[5:6].isupper() for k in ext)
    if has_value == ("extension" in ext):
        return "ext-1", "An extension must have either extensions or a value[x], not both (ext-1)"
    url = ext.get("url")
    if type(url) is str and "|" in url:
        return "ext:url", "An extension url must not contain a version"
    return None


def _walk_finds_something(resource: dict[str, Any], choices: dict[str, str]) -> bool:
    """A path-free pre-pass of `_walk_checks` (no tuples built): True when it would report."""
    choice_keys = choices.keys()
    stack: list[Any] = [resource]
    pop, push = stack.pop, stack.append
    while stack:
        node = pop()
        if type(node) is dict:
            if not node:
                return True  # ele-1
            hits = node.keys() & choice_keys
            if len(hits) > 1 and len({choices[k] for k in hits}) < len(hits):
                return True
            for k, v in node.items():
                t = type(v)
                if t is dict:
                    if "resourceType" not in v:
                        push(v)
                elif t is list:
                    if k != "contained":
                        push(v)
                        if k in _EXTENSION_KEYS and any(_extension_problem(e) for e in v):
                            return True
                elif t is str:
                    if not v or len(v) > STRING_LIMIT:
                        return True
                elif t is int and not -_DECIMAL_LIMIT < v < _DECIMAL_LIMIT:
                    return True
            if "start" in node and "end" in node:
                s, e = node["start"], node["end"]
                if (
                    isinstance(s, str)
                    and isinstance(e, str)
                    and _DATE_RE.match(s)
                    and _DATE_RE.match(e)
                    and _period_out_of_order(s, e)
                ):
                    return True
        else:
            for v in node:
                t = type(v)
                if t is dict:
                    if "resourceType" not in v:
                        push(v)
                elif t is list:
                    push(v)
                elif t is str and not v:
                    return True
    return False


def _value_issue(k: Any, v: Any, rt: str, path: tuple[Any, ...]) -> Issue | None:
    """ele-1 (an empty string), the 1 MB string limit and the decimal digit limit, for one value."""
    if type(v) is str:
        if not v:
            return Issue(
                "error", "invariant", "Value cannot be empty (ele-1: a value or children)",
                _expr(rt, path), _pointer(path), "ele-1",
            )  # fmt: skip
        if len(v) > STRING_LIMIT and not (k == "data" or str(k).endswith("Base64Binary")):
            return Issue(
                "error", "too-long", "String is longer than the FHIR limit of 1 MB",
                _expr(rt, path), _pointer(path), "string:max-length",
            )  # fmt: skip
    elif type(v) is int and not -_DECIMAL_LIMIT < v < _DECIMAL_LIMIT:
        return Issue(
            "error", "value", "Number has more than 18 digits (no FHIR number type holds it)",
            _expr(rt, path), _pointer(path), "decimal:digits",
        )  # fmt: skip
    return None


def _walk_checks(
    node: Any, rt: str, path: tuple[Any, ...], choices: dict[str, str], out: list[Issue]
) -> None:
    """Choice-type conflicts, Period start <= end (per-1), empty elements (ele-1), extensions with
    a value or extensions (ext-1) and value limits, everywhere in the resource (nested resources
    are validated on their own)."""
    if isinstance(node, dict):
        if not node and path:
            out.append(
                Issue(
                    "error",
                    "invariant",
                    "Element is empty (ele-1: all FHIR elements must have a value or children)",
                    _expr(rt, path),
                    _pointer(path),
                    "ele-1",
                )
            )
        seen: dict[str, str] = {}
        for k, v in node.items():
            stem = choices.get(k)
            if stem is not None:
                if stem in seen:
                    out.append(
                        Issue(
                            "error",
                            "structure",
                            f"Only one of {stem}[x] may be given: '{seen[stem]}' and '{k}' both are",
                            _expr(rt, path + (k,)),
                            _pointer(path + (k,)),
                            "choice:one-of",
                        )
                    )
                else:
                    seen[stem] = k
            if k in _EXTENSION_KEYS and isinstance(v, list):
                for i, e in enumerate(v):
                    problem = _extension_problem(e)
                    if problem is not None:
                        out.append(
                            Issue(
                                "error",
                                "invariant",
                                problem[1],
                                _expr(rt, path + (k, i)),
                                _pointer(path + (k, i)),
                                problem[0],
                            )
                        )
            if isinstance(v, list) and k != "contained" or isinstance(v, dict) and "resourceType" not in v:
                _walk_checks(v, rt, path + (k,), choices, out)
            else:
                issue = _value_issue(k, v, rt, path + (k,))
                if issue is not None:
                    out.append(issue)
        s, e = node.get("start"), node.get("end")
        if (
            isinstance(s, str)
            and isinstance(e, str)
            and _DATE_RE.match(s)
            and _DATE_RE.match(e)
            and _period_out_of_order(s, e)
        ):
            out.append(
                Issue(
                    "error",
                    "invariant",
                    "Period start is after its end",
                    _expr(rt, path),
                    _pointer(path),
                    "per-1",
                )
            )
    elif isinstance(node, list):
        for i, v in enumerate(node):
            if isinstance(v, list) or isinstance(v, dict) and "resourceType" not in v:
                _walk_checks(v, rt, path + (i,), choices, out)
            elif type(v) is str and not v:
                issue = _value_issue(i, v, rt, path + (i,))
                if issue is not None:
                    out.append(issue)


def _core_invariants(resource: dict[str, Any], rt: str, release: Release) -> list[Issue]:
    out: list[Issue] = []
    if rt == "Consent" and release is Release.R4:
        if not resource.get("policy") and not resource.get("policyRule"):
            out.append(
                Issue(
                    "error",
                    "invariant",
                    "Either a policy or a policyRule is required",
                    "Consent",
                    "",
                    "ppc-1",
                )
            )
        scope_codes = {c for _s, c in _codes(resource.get("scope"))}
        for key, code in (
            ("ppc-2", "patient-privacy"),
            ("ppc-3", "research"),
            ("ppc-4", "adr"),
            ("ppc-5", "treatment"),
        ):
            if code in scope_codes and not resource.get("patient"):
                out.append(
                    Issue(
                        "error",
                        "invariant",
                        f"A consent with scope '{code}' must name a patient",
                        "Consent.patient",
                        "/patient",
                        key,
                    )
                )
    return out


def _note_texts(resource: dict[str, Any]) -> Iterator[tuple[str, tuple[Any, ...]]]:
    for i, p in enumerate(_items(resource.get("payload"))):
        if not isinstance(p, dict):
            continue
        if isinstance(p.get("contentString"), str):
            yield p["contentString"], ("payload", i, "contentString")
        cc = p.get("contentCodeableConcept")
        if isinstance(cc, dict) and isinstance(cc.get("text"), str):
            yield cc["text"], ("payload", i, "contentCodeableConcept", "text")
        att = p.get("contentAttachment")
        if (
            isinstance(att, dict)
            and str(att.get("contentType", "")).startswith("text/")
            and isinstance(att.get("data"), str)
        ):
            try:
                yield (
                    base64.b64decode(att["data"], validate=True).decode("utf-8", "replace"),
                    ("payload", i, "contentAttachment", "data"),
                )
            except (binascii.Error, ValueError):
                pass


_SYSTEM_IN_EXPR = re.compile(r"system='([^']+)'")


def _constraint_holds(
    key: str, expression: str, resource: dict[str, Any], rt: str, release: Release, term: _Terminology
) -> list[tuple[str, tuple[Any, ...]]]:
    """Evaluate a kap-* constraint; returns (message suffix, json path) for each violation."""
    raw_meta = resource.get("meta")
    meta: dict[str, Any] = raw_meta if isinstance(raw_meta, dict) else {}
    security = {
        (_text(s.get("system")), _text(s.get("code")))
        for s in _items(meta.get("security"))
        if isinstance(s, dict)
    }
    if key == "kap-sec-1":
        need = {(CS.V3_CONFIDENTIALITY, "R"), (CS.V3_ACTCODE, "PSY")}
        return [] if need <= security else [("", ("meta", "security"))]
    if key == "kap-id-1":
        system = _SYSTEM_IN_EXPR.search(expression).group(1)  # type: ignore[union-attr]
        ok = any(
            isinstance(i, dict) and i.get("system") == system and i.get("value")
            for i in _items(resource.get("identifier"))
        )
        return [] if ok else [(f" (system {system})", ("identifier",))]
    if key == "kap-referral-1":
        tags = {
            (_text(t.get("system")), _text(t.get("code")))
            for t in _items(meta.get("tag"))
            if isinstance(t, dict)
        }
        return [] if (CS.INFO_CATEGORY, "care-coordination") in tags else [("", ("meta", "tag"))]
    if key == "kap-session-1":
        cats = resource.get("category")
        cats = cats if isinstance(cats, list) else [cats]
        dosing = any((CS.SESSION_KIND, "dosing") in _codes(c) for c in cats)
        n = sum(
            1
            for e in _items(resource.get("extension"))
            if isinstance(e, dict) and e.get("url") == f"{CANONICAL}/StructureDefinition/kap-dose"
        )
        return [("", ("extension",))] if dosing and n != 1 else []
    if key == "kap-session-2":
        stem = "performed" if release is Release.R4 else "occurrence"
        return [] if any(k.startswith(stem) and not k.startswith("_") for k in resource) else [("", (stem,))]
    if key == "kap-roi-1":
        for prov, p in _at(resource, ["provision"], ()):
            for actor, _ap in _at(prov, ["actor"], p):
                if (CS.V3_PARTICIPATION, "IRCP") in {
                    x for r in ([actor.get("role")] if isinstance(actor, dict) else []) for x in _codes(r)
                }:
                    return []
        return [("", ("provision",))]
    if key == "kap-roi-2":
        return [
            ("", p)
            for c, p in _at(resource, ["provision", "code"], ())
            if (CS.INFO_CATEGORY, "psychotherapy-note") in _codes(c)
        ]
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


IMPLEMENTED_CONSTRAINTS = frozenset(
    {
        "kap-sec-1",
        "kap-id-1",
        "kap-referral-1",
        "kap-session-1",
        "kap-session-2",
        "kap-roi-1",
        "kap-roi-2",
        "kap-note-1",
        "kap-note-2",
    }
)
