"""Information categories of a resource, as the KAP profiles represent them.

`Communication.category` and `meta.tag` on Communication / Procedure / ServiceRequest carry
codes of the information-category CodeSystem (config.CS.INFO_CATEGORY). Fail closed:

- a coding whose code is `psychotherapy-note` (whatever its system, or none) anywhere in
  `category`, `meta.tag` or `meta.security`, or a `PSYTHPN` code (any case, any system) in
  `meta.security` / `meta.tag` / `category`, marks a psychotherapy note — never disclosed.
  The same marks on a `contained` resource or a Bundle entry mark the whole resource.
- a category-source coding with a missing or unrecognised system is an *unknown* category
  (denied), except the few base systems listed in IGNORED_SYSTEMS (communication-category
  `notification` beside our own code).

Room: consent/ (layer 1, pure core: no IO, no clock): may import the base rooms only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..config import CS

__all__ = [
    "KNOWN_CATEGORIES",
    "PSYCHOTHERAPY_NOTE",
    "PSYTHPN",
    "CATEGORY_SOURCES",
    "IGNORED_SYSTEMS",
    "Categories",
    "categories_of",
]

KNOWN_CATEGORIES = frozenset(
    {
        "session-dates",
        "response-themes",
        "safety",
        "care-coordination",
        "treatment-history",
        "risk-considerations",
        "contraindications",
        "psychotherapy-note",
    }
)
PSYCHOTHERAPY_NOTE = "psychotherapy-note"
PSYTHPN = "PSYTHPN"
# Where each resource type carries its information category (data, not code paths).
CATEGORY_SOURCES: dict[str, tuple[str, ...]] = {
    "Communication": ("category", "meta.tag"),
    "Procedure": ("meta.tag",),
    "ServiceRequest": ("meta.tag",),
}
# Codings of these systems in a category source are not information categories and are skipped.
IGNORED_SYSTEMS: dict[str, frozenset[str]] = {
    "category": frozenset({CS.COMM_CATEGORY}),
    "meta.tag": frozenset(),
}
_MAX_NESTING = 8


@dataclass(frozen=True)
class Categories:
    """The information categories found on a resource."""

    codes: frozenset[str]
    unknown: tuple[str, ...]
    psychotherapy: bool
    mapped: bool  # False when the resource type has no category mapping
    contained: bool = False  # the resource carries contained resources


def _codings(value: Any) -> list[dict[str, Any]]:
    """Codings from a list (or one) of CodeableConcepts or Codings (meta.tag)."""
    out: list[dict[str, Any]] = []
    items = value if isinstance(value, list) else [value] if isinstance(value, dict) else []
    for item in items:
        if not isinstance(item, dict):
            continue
        if "coding" in item:
            coding = item.get("coding")
            out += [c for c in coding if isinstance(c, dict)] if isinstance(coding, list) else []
        else:
            out.append(item)
    return out


def _meta(resource: dict[str, Any], key: str) -> list[dict[str, Any]]:
    meta = resource.get("meta")
    return _codings(meta.get(key)) if isinstance(meta, dict) else []


def _code(coding: dict[str, Any]) -> str:
    code = coding.get("code")
    return code.strip().casefold() if isinstance(code, str) else ""


def _is_psychotherapy(resource: Any, depth: int = 0) -> bool:
    """A psychotherapy-note mark on the resource, its contained resources or its Bundle entries."""
    if not isinstance(resource, dict):
        return False
    marks = _meta(resource, "tag") + _meta(resource, "security") + _codings(resource.get("category"))
    if any(_code(c) in (PSYCHOTHERAPY_NOTE, PSYTHPN.casefold()) for c in marks):
        return True
    if depth >= _MAX_NESTING:
        return bool(resource.get("contained") or resource.get("entry"))  # too deep to check: fail closed
    nested: list[Any] = []
    if isinstance(resource.get("contained"), list):
        nested += resource["contained"]
    if resource.get("resourceType") == "Bundle" and isinstance(resource.get("entry"), list):
        nested += [e.get("resource") for e in resource["entry"] if isinstance(e, dict)]
    return any(_is_psychotherapy(r, depth + 1) for r in nested)


def categories_of(resource: dict[str, Any]) -> Categories:
    """The information categories of `resource`.

    >>> categories_of({"resourceType": "Procedure", "meta": {"tag": [
    ...     {"system": CS.INFO_CATEGORY, "code": "session-dates"}]}}).codes
    frozenset({'session-dates'})
    >>> categories_of({"resourceType": "Communication", "category": [
    ...     {"coding": [{"code": "psychotherapy-note"}]}]}).psychotherapy
    True
    """
    rtype = resource.get("resourceType")
    sources = CATEGORY_SOURCES.get(rtype if isinstance(rtype, str) else "", ())
    codes: set[str] = set()
    unknown: list[str] = []
    for source in sources:
        codings = _meta(resource, "tag") if source == "meta.tag" else _codings(resource.get(source))
        for c in codings:
            system = c.get("system")
            if isinstance(system, str) and system in IGNORED_SYSTEMS.get(source, frozenset()):
                continue
            code = c.get("code")
            if system == CS.INFO_CATEGORY and isinstance(code, str) and code in KNOWN_CATEGORIES:
                codes.add(code)
            else:  # a missing, misspelt or foreign system, or a code we do not know: fail closed
                unknown.append(f"{str(system)[:128]}|{str(code)[:64]}")
    contained = resource.get("contained")
    return Categories(
        frozenset(codes),
        tuple(unknown),
        _is_psychotherapy(resource),
        bool(sources),
        contained is not None and contained != [],
    )
