"""A FHIR resource's business identifier: the one rule for which identifier names a resource.

Used wherever a resource must be recognised again: the outbox's idempotency key, the
conditional create (`If-None-Exist: identifier=SYSTEM|VALUE`) sent to a server, the consent
context's "one consent per business identifier", and the bridge's own conditional store.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["business_identifier"]


def business_identifier(resource: Any) -> tuple[str, str] | None:
    """(system, value) of the first identifier with a non-empty system and value, skipping
    `use: old`; None when there is none.

    >>> business_identifier({"identifier": [{"use": "old", "system": "s", "value": "OLD"},
    ...                                     {"system": "s", "value": "NEW"}]})
    ('s', 'NEW')
    >>> business_identifier({"identifier": [{"system": "s", "value": ""}]}) is None
    True
    """
    idents = resource.get("identifier") if isinstance(resource, Mapping) else None
    for ident in idents if isinstance(idents, list) else []:
        if not isinstance(ident, Mapping) or ident.get("use") == "old":
            continue
        system, value = ident.get("system"), ident.get("value")
        if isinstance(system, str) and system and isinstance(value, str) and value:
            return system, value
    return None
