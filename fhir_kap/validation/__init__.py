"""Validation of FHIR resources (layer 1, pure core: no IO).

Structure (the generated validators in `_generated/`, see CONTRIBUTING.md to regenerate them),
FHIR invariants and the KAP profile rules. `Validator.load(release)` is the entry point.

May import layer 0 only.
"""
from __future__ import annotations

from .validator import (IMPLEMENTED_CONSTRAINTS, KAP_PROFILES, SUPPORTED_TYPES, Validator, detect_release,
                        load_profile_rules, looks_like_transcript)

__all__ = ["IMPLEMENTED_CONSTRAINTS", "KAP_PROFILES", "SUPPORTED_TYPES", "Validator", "detect_release",
           "load_profile_rules", "looks_like_transcript"]
