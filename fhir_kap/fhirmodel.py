"""The ONE place that picks fhir.resources models: R4B models for R4, R5 models for R5.

fhir.resources has no 4.0.1 package; R4B (4.3) is the closest and agrees with R4 for the
resources fhir-kap exchanges except where the README's "R4 vs R4B" table says otherwise.
Imports are lazy: fhir.resources costs ~250 ms to import.
"""
from __future__ import annotations

import importlib
from functools import lru_cache
from typing import Any

from .config import Release

__all__ = ["model_class", "parse_model"]


@lru_cache(maxsize=None)
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
