"""fhir-kap: a FHIR interoperability adapter for Ketamine-Assisted Psychotherapy care.

Data flows one way through rooms of five layers (the one table is tests/unit/test_layering.py;
docs/architecture.md draws it): base (errors, config, jsonio, fhir/) -> pure core (records/,
validation/, consent/: no IO) -> IO adapters (storage/, client/) -> orchestration (exchange/,
conformance/, demo/) -> entry points (bridge/, cli/).

The names below are the public API, pinned by tests/unit/test_exports.py. They are imported on
first use, so `import fhir_kap` (and the `fhir-kap` command) stays fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# name -> module (under fhir_kap) that defines it
_EXPORTS = {
    "Release": "config",
    "Settings": "config",
    "EndpointConfig": "config",
    "load_settings": "config",
    "Issue": "errors",
    "KapError": "errors",
    "InputError": "errors",
    "MappingError": "errors",
    "ProfileError": "errors",
    "ServerError": "errors",
    "operation_outcome": "errors",
    "Pipeline": "records.pipeline",
    "Mapper": "records.mapping",
    "Validator": "validation",
    "ConsentGate": "consent",
    "Recipient": "consent",
    "Database": "storage.db",
    "Outbox": "storage.outbox",
    "AuditLog": "storage.auditlog",
    "FhirClient": "client",
    "NoAuth": "client",
    "BearerAuth": "client",
    "SmartBackendAuth": "client",
    "RetryPolicy": "client",
    "DeliveryWorker": "exchange.delivery",
    "CheckConfig": "conformance",
    "run_checks": "conformance",
    "BridgeOptions": "bridge",
    "create_app": "bridge",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'fhir_kap' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:
    from .bridge import BridgeOptions, create_app
    from .client import BearerAuth, FhirClient, NoAuth, RetryPolicy, SmartBackendAuth
    from .config import EndpointConfig, Release, Settings, load_settings
    from .conformance import CheckConfig, run_checks
    from .consent import ConsentGate, Recipient
    from .errors import (
        InputError,
        Issue,
        KapError,
        MappingError,
        ProfileError,
        ServerError,
        operation_outcome,
    )
    from .exchange.delivery import DeliveryWorker
    from .records.mapping import Mapper
    from .records.pipeline import Pipeline
    from .storage.auditlog import AuditLog
    from .storage.db import Database
    from .storage.outbox import Outbox
    from .validation import Validator
