"""Validation of FHIR resources (layer 1, pure core: no IO).

Structure (the generated validators in `_generated/`, one module per resource type loaded on
first use, see profiles/build/regenerate.py to regenerate them), FHIR invariants and the KAP
profile rules, for every resource type of R4 and R5 (`resource_types(release)`).
`Validator.load(release)` is the entry point. Modules: validator (the Validator), structure (the generated structure validators
and their slow path), invariants (core FHIR invariants and the kap-* constraints), rules (KAP
profile rules read from profiles/), paths (JSON paths and element lookups they share).

May import layer 0 only.
"""

from __future__ import annotations

from .invariants import IMPLEMENTED_CONSTRAINTS
from .rules import load_profile_rules
from .validator import (
    KAP_PROFILES,
    SUPPORTED_TYPES,
    Validator,
    detect_release,
    looks_like_transcript,
    resource_types,
)

__all__ = [
    "IMPLEMENTED_CONSTRAINTS",
    "KAP_PROFILES",
    "SUPPORTED_TYPES",
    "Validator",
    "detect_release",
    "load_profile_rules",
    "looks_like_transcript",
    "resource_types",
]
