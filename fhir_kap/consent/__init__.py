"""Consent gate (layer 1, pure core): R4/R5 Consents → one policy; fail-closed disclosure decisions;
security labels; AuditEvent and Provenance builders.

No IO and no clock: the disclosure date and the audit time are always handed in.
Imports only the base rooms (errors, config, jsonio, fhir/) and the standard library.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import date, datetime
from typing import Any

from .audit import audit_event, provenance
from .categories import categories_of
from .decide import CONTEXT_TYPES, Decision, Reason
from .decide import ConsentGate as _Gate
from .labels import apply_security_labels, envelope_labels, envelope_reveals_sensitivity, label_envelope
from .preview import preview as _preview
from .recipients import Recipient

__all__ = [
    "CONTEXT_TYPES",
    "ConsentGate",
    "Decision",
    "Reason",
    "Recipient",
    "apply_security_labels",
    "audit_event",
    "provenance",
    "envelope_reveals_sensitivity",
    "label_envelope",
    "envelope_labels",
    "categories_of",
]


class ConsentGate(_Gate):
    __doc__ = _Gate.__doc__

    def preview(
        self,
        candidates: Iterable[dict[str, Any]],
        recipient: Recipient,
        purpose: str | None,
        on: date | datetime,
    ) -> list[dict[str, Any]]:
        """Each candidate with its decision and reasons (a dry run; nothing is sent or audited)."""
        return _preview(self, candidates, recipient, purpose, on)
