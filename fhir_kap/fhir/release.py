"""The ONE place that picks fhir.resources models (R4B models for R4, R5 models for R5) and
that tells a resource's release from its shape (`detect_release`).

fhir.resources has no 4.0.1 package; R4B (4.3) is the closest and agrees with R4 for the
resources fhir-kap exchanges except where docs/validation.md says otherwise.
Imports are lazy: fhir.resources costs ~250 ms to import.

Room: fhir/ (layer 0, base): may import errors, config, jsonio and fhir/ only.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from functools import cache
from typing import Any

from ..config import Release

__all__ = ["detect_release", "model_class", "parse_model", "release_signals"]


@cache
def model_class(release: Release, resource_type: str) -> Any:
    """The pydantic model class for `resource_type` in `release`.

    >>> model_class(Release.R4, "Consent").__module__
    'fhir.resources.R4B.consent'
    """
    base = "fhir.resources.R4B" if release is Release.R4 else "fhir.resources"
    module = importlib.import_module(f"{base}.{resource_type.lower()}")
    return getattr(module, resource_type)


def parse_model(resource: dict[str, Any], release: Release) -> Any:
    """Validate a resource dict with the fhir.resources model of its release (raises pydantic errors)."""
    return model_class(release, str(resource.get("resourceType"))).model_validate(resource)


# Elements (or element prefixes, ending in "*") that exist in one release only, for the types
# fhir-kap exchanges. An element both releases have (even with another shape) is no signal.
_R4_ONLY: dict[str, tuple[str, ...]] = {
    "Procedure": ("performed*", "reasonCode", "reasonReference"),
    "ServiceRequest": ("reasonCode", "reasonReference"),
    "Consent": ("scope", "patient", "dateTime", "performer", "organization", "policyRule", "policy"),
    "Organization": ("telecom", "address"),
}
_R5_ONLY: dict[str, tuple[str, ...]] = {
    "Procedure": ("occurrence*", "reason", "supportingInfo", "focus", "reported*"),
    "ServiceRequest": ("reason", "focus", "bodyStructure"),
    "Consent": (
        "subject",
        "decision",
        "grantor",
        "grantee",
        "controller",
        "date",
        "period",
        "regulatoryBasis",
        "manager",
        "policyBasis",
        "policyText",
    ),
    "Organization": ("description", "qualification"),
}


def _has(resource: Mapping[str, Any], names: tuple[str, ...]) -> bool:
    return any(
        any(k.startswith(n[:-1]) for k in resource) if n.endswith("*") else n in resource for n in names
    )


def release_signals(resource: Mapping[str, Any]) -> tuple[bool, bool]:
    """(has R4-only elements, has R5-only elements) of one resource (not a Bundle's entries)."""
    rt = str(resource.get("resourceType"))
    r4 = _has(resource, _R4_ONLY.get(rt, ()))
    r5 = _has(resource, _R5_ONLY.get(rt, ()))
    if rt == "Consent":
        provision = resource.get("provision")
        r4 = r4 or isinstance(provision, dict)
        r5 = r5 or isinstance(provision, list)
    elif rt == "Procedure":
        r5 = r5 or any(
            isinstance(c, dict) and ("concept" in c or "reference" in c)  # CodeableReference
            for c in resource.get("complication") or []
        )
    elif rt == "Organization":
        # R5 moved an organisation's telecom and address into `contact`: contact alone reads as R5
        r5 = r5 or ("contact" in resource and not r4)
    elif rt == "Communication":
        payload = [p for p in resource.get("payload") or [] if isinstance(p, dict)]
        r4 = r4 or any("contentString" in p for p in payload)
        r5 = r5 or any("contentCodeableConcept" in p for p in payload)
        if not (r4 or r5) and payload:  # fhir-kap writes an R5 note as a text/plain attachment
            attachment = payload[0].get("contentAttachment")
            r5 = isinstance(attachment, dict) and str(attachment.get("contentType", "")).startswith(
                "text/plain"
            )
    return r4, r5


def detect_release(resource: Any) -> Release | None:
    """A resource's FHIR release from its shape: None when nothing (or both) tell R4 from R5.
    A Bundle has the release of its first entry that tells.

    >>> detect_release({"resourceType": "Procedure", "performedDateTime": "2024-01-01"})
    <Release.R4: '4.0.1'>
    >>> detect_release({"resourceType": "Procedure", "occurrencePeriod": {}})
    <Release.R5: '5.0.0'>
    >>> detect_release({"resourceType": "Patient", "id": "p1"}) is None
    True
    """
    if not isinstance(resource, Mapping):
        return None
    if resource.get("resourceType") == "Bundle":
        for entry in resource.get("entry") or []:
            found = detect_release(entry.get("resource")) if isinstance(entry, Mapping) else None
            if found:
                return found
        return None
    r4, r5 = release_signals(resource)
    if r4 == r5:
        return None
    return Release.R4 if r4 else Release.R5
