"""fhir-kap: a FHIR interoperability adapter for Ketamine-Assisted Psychotherapy care.

Layers (data flows one way; tests/test_layering.py enforces the arrows):
  0 base          errors, config, fhirmodel, jsonio          import nothing of ours but layer 0
  1 pure core     inputs, transforms, mapping, profiles, consent  (no IO: no files, sockets, clocks
                                                              they are not handed)  -> layer 0
  2 IO adapters   client (the only `requests` user), outbox, store, notify        -> layer 0
  3 orchestration pipeline, outbound, delivery, inbound, conformance, demo        -> layers 0-2
  4 entry points  bridge/ (the only `flask` user), cli/        -> anything; nothing imports them
"""
from __future__ import annotations

from .config import Release, Settings, load_settings
from .errors import (InputError, Issue, KapError, MappingError, ProfileError,
                     ServerError, operation_outcome)

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "Release",
    "Settings",
    "load_settings",
    "Issue",
    "KapError",
    "InputError",
    "MappingError",
    "ProfileError",
    "ServerError",
    "operation_outcome",
]
