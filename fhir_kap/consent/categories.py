"""Information categories of a resource, as the KAP profiles represent them.

`Communication.category` and `meta.tag` on Communication / Procedure / ServiceRequest carry
codes of the information-category CodeSystem (config.CS.INFO_CATEGORY). Fail closed:

- a Coding whose code is `psychotherapy-note` or `PSYTHPN` (any case, whatever its system, or
  none) anywhere in the resource — `category`, `meta.tag`, `meta.security`, extensions and
  modifierExtensions at any level, nested elements, `contained` resources, Bundle entries; an
  extension's `valueCode` too — marks a psychotherapy note: never disclosed. So does an
  Attachment titled as psychotherapy, therapy or process notes. A resource nested deeper than
  `_MAX_DEPTH` cannot be checked and counts as one (fail closed).
- attachments carry no category of their own: an Attachment is disclosed only as part of its
  resource, so only when every category of that resource is permitted (and no mark above is
  on it or anywhere else in the resource).
- a category-source coding with a missing or unrecognised system is an *unknown* category
  (denied), except the few base systems listed in IGNORED_SYSTEMS (communication-category
  `notification` beside our own code).

Room: consent/ (layer 1, pure core: no IO, no clock): may import the base rooms only.
"""

from __future__ import annotations

import re
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
#: Deepest JSON nesting the psychotherapy-note walk checks; deeper fails closed (the bridge
#: refuses deeper writes anyway).
_MAX_DEPTH = 128
_PSY_CODES = frozenset({PSYCHOTHERAPY_NOTE, PSYTHPN.casefold()})  # as compared: stripped, casefolded
#: An Attachment's title that names psychotherapy or process notes marks it as one (titles are
#: short: a linear scan).
_PSY_TITLE = re.compile(
    r"(?<![a-z])(psycho[\s_-]*therapy[\s_-]*notes?|therapy[\s_-]*notes?|process[\s_-]*notes?|psythpn)(?![a-z])",
    re.IGNORECASE,
)
#: Elements only an Attachment carries beside `title`: a dict with one of them and a title is read
#: as an Attachment wherever it sits (one under an `_ATTACHMENT_ELEMENTS` key always is).
_CODE_KEYS = frozenset({"code", "valueCode"})
#: Elements of type Attachment in the resources KAP exchanges and in extensions.
_ATTACHMENT_ELEMENTS = frozenset(
    {"contentAttachment", "valueAttachment", "attachment", "presentedForm", "photo", "sourceAttachment"}
)
_ATTACHMENT_KEYS = frozenset({"contentType", "data", "url", "size", "hash", "creation"})


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


def _is_psychotherapy(resource: Any) -> bool:
    """A psychotherapy-note mark anywhere in the resource: any Coding (or `valueCode`) whose code
    is `psychotherapy-note` or `PSYTHPN`, in any system and any case, at any depth (meta,
    category, extensions, modifierExtensions, nested elements, contained resources, Bundle
    entries), or an Attachment titled as psychotherapy or process notes. Deeper than
    `_MAX_DEPTH` cannot be checked: fail closed."""
    return isinstance(resource, dict) and _marked(resource, 0, False)


def _marked(node: dict[str, Any], depth: int, attachment: bool) -> bool:
    if depth > _MAX_DEPTH:
        return True  # too deep to check: fail closed
    for key, value in node.items():
        cls = value.__class__
        if cls is str:
            if key in _CODE_KEYS:
                if value in _PSY_CODES or value.strip().casefold() in _PSY_CODES:
                    return True
            elif (
                key == "title"
                and (attachment or not _ATTACHMENT_KEYS.isdisjoint(node))
                and _PSY_TITLE.search(value)
            ):
                return True
        elif cls is dict:
            if _marked(value, depth + 1, key in _ATTACHMENT_ELEMENTS):
                return True
        elif cls is list and _marked_list(value, depth + 1, key in _ATTACHMENT_ELEMENTS):
            return True
    return False


def _marked_list(items: list[Any], depth: int, attachment: bool) -> bool:
    if depth > _MAX_DEPTH:
        return True
    for item in items:
        cls = item.__class__
        if cls is dict:
            if _marked(item, depth + 1, attachment):
                return True
        elif cls is list and _marked_list(item, depth + 1, attachment):
            return True
    return False


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
