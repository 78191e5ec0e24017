"""The consent context the send-time consent re-check decides on (storage/, layer 2: IO adapter;
imports base and pure core).

The `outbox_context` table (created by the outbox's migrations, storage/sql/schema/outbox-*.sql)
keeps the latest version of the resources the consent gate needs (Consents, PractitionerRoles,
Organizations, Practitioners, Patients), by (type, id). A Consent is one consent per business
identifier: an EHR that re-posts it (e.g. revoked) gets a new server id, and the gate must see
the new state, not two consents. `Outbox.put_context` / `Outbox.context_for` delegate here.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from .. import jsonio
from ..consent import CONTEXT_TYPES
from ..errors import InputError, quote
from ..fhir.identifiers import business_identifier, patient_reference
from .db import Database

__all__ = ["CONTEXT_TYPES", "ConsentContext", "consent_key"]


class ConsentContext:
    """The consent context on a shared `Database`; `clock` gives "now" in epoch seconds."""

    def __init__(self, db: Database, *, clock: Callable[[], float] = time.time) -> None:
        self.db = db
        self.clock = clock

    def put(self, resource: dict[str, Any], *, now: float | None = None) -> bool:
        """Keep the latest version of a Consent / PractitionerRole / Organization /
        Practitioner / Patient by (type, id). An older `meta.versionId` than the stored one is
        ignored; a Consent replaces any stored Consent with the same business identifier (an EHR
        re-posting a revoked consent gets a new server id). Returns True when stored."""
        rtype = resource.get("resourceType") if isinstance(resource, dict) else None
        if rtype not in CONTEXT_TYPES:
            raise InputError(
                f"Consent context must be one of {', '.join(CONTEXT_TYPES)}, not {quote(rtype)}",
                pointer="/resourceType",
                expression="resourceType",
                rule="outbox:context-type",
            )
        rid = resource.get("id")
        if not isinstance(rid, str) or not rid:
            raise InputError(
                f"{rtype} in the consent context needs an id",
                pointer="/id",
                expression=f"{rtype}.id",
                rule="outbox:context-id",
                code="required",
            )
        meta = resource.get("meta")
        if meta is not None and not isinstance(meta, dict):
            raise InputError(
                f"{rtype}.meta must be an object",
                pointer="/meta",
                expression=f"{rtype}.meta",
                rule="fhir:meta",
            )
        version = (meta or {}).get("versionId")
        if version is not None and not isinstance(version, str):
            raise InputError(
                f"{rtype}.meta.versionId must be a string",
                pointer="/meta/versionId",
                expression=f"{rtype}.meta.versionId",
                rule="fhir:meta",
            )
        if rtype == "Consent" and patient_reference(resource) is None:
            # unreadable here would mean "applies to every client": refuse it instead
            raise InputError(
                "Consent needs a literal patient (R4 patient / R5 subject) reference",
                pointer="/patient",
                expression="Consent.patient",
                rule="outbox:context-patient",
                code="required",
            )
        patient = (
            patient_reference(resource)
            if rtype == "Consent"
            else (f"Patient/{rid}" if rtype == "Patient" else None)
        )
        ident = consent_key(resource) if rtype == "Consent" else None
        ts = float(self.clock() if now is None else now)
        body = jsonio.dumps(resource).decode()
        with self.db.transaction() as tx:
            old = tx.execute("SELECT version FROM outbox_context WHERE type = ? AND id = ?", (rtype, rid))
            if old and _older(version, old[0]["version"]):
                return False
            if ident:  # the same client's consent under another server id: this arrival replaces it
                tx.execute(
                    "DELETE FROM outbox_context WHERE type = ? AND ident = ? AND patient_ref = ? AND id <> ?",
                    (rtype, ident, patient, rid),
                )
            if old:
                tx.execute(
                    "UPDATE outbox_context SET version = ?, patient_ref = ?, body = ?, ident = ?, "
                    "updated_at = ? WHERE type = ? AND id = ?",
                    (version, patient, body, ident, ts, rtype, rid),
                )
            else:
                tx.execute(
                    "INSERT INTO outbox_context (type, id, version, patient_ref, body, ident, "
                    "updated_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (rtype, rid, version, patient, body, ident, ts),
                )
        return True

    def for_patient(self, patient_ref: str) -> list[dict[str, Any]]:
        """The consent context for one patient: that patient's Consents (and Patient resource)
        plus every stored PractitionerRole, Organization and Practitioner."""
        rows = self.db.query(
            "SELECT body FROM outbox_context WHERE patient_ref = ? OR patient_ref IS NULL ORDER BY type, id",
            (patient_ref,),
        )
        return [jsonio.loads(r["body"], source="outbox context") for r in rows]


def consent_key(resource: dict[str, Any]) -> str | None:
    """`SYSTEM|VALUE` under which a Consent in the context is one consent (`business_identifier`)."""
    found = business_identifier(resource)
    return "|".join(found) if found else None


def _older(new: str | None, old: str | None) -> bool:
    """True when version `new` is known to be older than `old` (numeric versionIds)."""
    try:
        return new is not None and old is not None and int(new) < int(old)
    except ValueError:
        return False
