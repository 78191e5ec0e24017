"""Information categories of a resource, as the KAP profiles represent them.

`Communication.category` and `meta.tag` on Procedure / ServiceRequest carry codes of the
information-category CodeSystem (config.CS.INFO_CATEGORY). Codes of other systems (e.g.
communication-category `notification`) are ignored. A psychotherapy note — by category or
by a `PSYTHPN` security label — is never disclosed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..config import CS

__all__ = ["KNOWN_CATEGORIES", "PSYCHOTHERAPY_NOTE", "PSYTHPN", "Categories", "categories_of"]

KNOWN_CATEGORIES = frozenset({
    "session-dates", "response-themes", "safety", "care-coordination",
    "treatment-history", "risk-considerations", "contraindications", "psychotherapy-note",
})
PSYCHOTHERAPY_NOTE = "psychotherapy-note"
PSYTHPN = "PSYTHPN"
# Where each resource type carries its information category (data, not code paths).
CATEGORY_SOURCES: dict[str, tuple[str, ...]] = {
    "Communication": ("category",),
    "Procedure": ("meta.tag",),
    "ServiceRequest": ("meta.tag",),
}


@dataclass(frozen=True)
class Categories:
    """The information categories found on a resource."""

    codes: frozenset[str]
    unknown: tuple[str, ...]
    psychotherapy: bool
    mapped: bool  # False when the resource type has no category mapping


def _codings(value: Any) -> list[dict[str, Any]]:
    """Codings from a list of CodeableConcepts or of Codings (meta.tag)."""
    out: list[dict[str, Any]] = []
    if not isinstance(value, list):
        return out
    for item in value:
        if not isinstance(item, dict):
            continue
        if "coding" in item:
            out += [c for c in item.get("coding") or [] if isinstance(c, dict)] \
                if isinstance(item.get("coding"), list) else []
        else:
            out.append(item)
    return out


def _meta(resource: dict[str, Any], key: str) -> list[dict[str, Any]]:
    meta = resource.get("meta")
    return _codings(meta.get(key)) if isinstance(meta, dict) else []


def categories_of(resource: dict[str, Any]) -> Categories:
    """The information categories of `resource`.

    >>> categories_of({"resourceType": "Procedure", "meta": {"tag": [
    ...     {"system": CS.INFO_CATEGORY, "code": "session-dates"}]}}).codes
    frozenset({'session-dates'})
    """
    rtype = resource.get("resourceType")
    sources = CATEGORY_SOURCES.get(rtype if isinstance(rtype, str) else "", ())
    codings: list[dict[str, Any]] = []
    for source in sources:
        codings += _meta(resource, "tag") if source == "meta.tag" else _codings(resource.get(source))
    # A psychotherapy-note marker anywhere (category, tag or security) blocks, whatever the type.
    marks = _meta(resource, "tag") + _meta(resource, "security") + _codings(resource.get("category"))
    psy = any(c.get("code") == PSYTHPN for c in _meta(resource, "security")) or any(
        c.get("system") == CS.INFO_CATEGORY and c.get("code") == PSYCHOTHERAPY_NOTE for c in marks)
    codes: set[str] = set()
    unknown: list[str] = []
    for c in codings:
        if c.get("system") != CS.INFO_CATEGORY:
            continue
        code = c.get("code")
        if isinstance(code, str) and code in KNOWN_CATEGORIES:
            codes.add(code)
        else:
            unknown.append(str(code)[:64])
    return Categories(frozenset(codes), tuple(unknown), psy, bool(sources))
