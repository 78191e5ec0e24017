"""Append-only store of AuditEvent and Provenance resources (storage/, layer 2: IO adapter;
imports base only).

Every consent decision (permit or deny) leaves an AuditEvent, every disclosed resource a
Provenance; both are kept here as JSON with a few indexed columns for queries (type,
recorded, patient, recipient, outcome, consent reference). The database itself refuses to
change history: SQLite triggers and a PostgreSQL trigger raise on UPDATE and DELETE (and
TRUNCATE), so a bug or a careless operator cannot rewrite the log through this database
connection either (storage/sql/schema/auditlog-1*.sql).

Writes: `append` (one record, one commit), `append_many` (several, one commit) and `batch`
(an `AuditBatch` that collects the records one request decides, up to a stated bound, and
writes them in one commit): a search that decides many rows costs one disk sync, not one per
row (docs/operations/search-and-audit.md).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any

from .. import jsonio
from ..errors import InputError, quote
from .db import Database
from .sql import migrations

__all__ = [
    "AUDIT_TYPES",
    "OUTCOME_CODES",
    "OUTCOME_NAMES",
    "AuditBatch",
    "AuditLog",
    "AuditRecord",
    "disclosed",
    "extract",
    "reason_codes",
]


AUDIT_TYPES = ("AuditEvent", "Provenance")
RECIPIENT_ROLES = frozenset({"IRCP", "PRCP", "RCV", "recipient"})
#: An audit record's outcome code (`AuditRecord.outcome`) by the name operators use.
OUTCOME_NAMES = {"0": "permit", "4": "deny", "8": "malformed", "12": "failure"}
#: The AuditEvent outcome code of each name (`--outcome deny`, the console's filter).
OUTCOME_CODES = {name: code for code, name in OUTCOME_NAMES.items()}
_REASON_CODE = re.compile(r"^[a-z0-9][a-z0-9\-]{0,63}$")


@dataclass(frozen=True)
class AuditRecord:
    """The indexed columns drawn from one AuditEvent or Provenance."""

    resource_type: str
    resource_id: str | None
    recorded: str
    recorded_epoch: float
    patient: str | None
    recipient: str | None
    outcome: str | None
    consent_ref: str | None


def _ref(node: Any) -> str | None:
    """A Reference's literal reference, else its identifier as `system|value`."""
    if not isinstance(node, dict):
        return None
    if isinstance(node.get("reference"), str):
        return node["reference"]
    ident = node.get("identifier")
    if isinstance(ident, dict) and isinstance(ident.get("value"), str):
        return f"{ident.get('system', '')}|{ident['value']}"
    return None


def _codes(node: Any) -> set[str]:
    """Every code in a CodeableConcept / list of them / Coding."""
    out: set[str] = set()
    items = node if isinstance(node, list) else [node]
    for cc in items:
        if not isinstance(cc, dict):
            continue
        for coding in cc.get("coding") or ([cc] if "code" in cc else []):
            if isinstance(coding, dict) and isinstance(coding.get("code"), str):
                out.add(coding["code"])
    return out


def _epoch(value: str | date | datetime, where: str) -> float:
    if isinstance(value, datetime):
        dt = value
    elif isinstance(value, date):
        dt = datetime(value.year, value.month, value.day)
    else:
        try:
            dt = datetime.fromisoformat(str(value))
        except ValueError:
            raise InputError(
                f"{where} is not a FHIR instant or date", pointer="/recorded", rule="audit:recorded"
            ) from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.timestamp()


def reason_codes(event: dict[str, Any]) -> list[str]:
    """Why: the reason codes the consent gate gave (R4 `outcomeDesc`, R5 `outcome.detail`), e.g.
    `outside-period`; only code-shaped words, never free text."""
    text = event.get("outcomeDesc")
    outcome = event.get("outcome")
    if not isinstance(text, str) and isinstance(outcome, dict):
        detail = outcome.get("detail")
        first = detail[0] if isinstance(detail, list) and detail else None
        text = first.get("text") if isinstance(first, dict) else None
    if not isinstance(text, str):
        return []
    codes = text.split(": ", 1)[1] if ": " in text else text
    return [c for c in (x.strip() for x in codes.split(",")) if _REASON_CODE.match(c)]


def disclosed(event: dict[str, Any]) -> str | None:
    """The resource an audit record is about: its first entity or target that is neither the
    patient nor a Consent (an AuditEvent's disclosed resource, a Provenance's target)."""
    for node in [
        *(e.get("what") for e in event.get("entity") or [] if isinstance(e, dict)),
        *(event.get("target") or []),
    ]:
        ref = node.get("reference") if isinstance(node, dict) else None
        if isinstance(ref, str) and not ref.startswith(("Patient/", "Consent/")):
            return ref
    return None


def extract(resource: dict[str, Any]) -> AuditRecord:
    """The indexed columns of an AuditEvent (R4 or R5) or a Provenance.

    patient: AuditEvent.patient (R5) or an entity/target referencing a Patient; recipient: an
    agent whose type/role is a recipient (IRCP, PRCP); outcome: the outcome code (R4 "0"/"4"/
    "8"/"12", R5 outcome.code.code); consent: an entity referencing a Consent, or a Provenance
    policy naming one.
    """
    rtype = resource.get("resourceType") if isinstance(resource, dict) else None
    if rtype not in AUDIT_TYPES:
        raise InputError(
            f"The audit log takes AuditEvent or Provenance, not {quote(rtype)}",
            pointer="/resourceType",
            expression="resourceType",
            rule="audit:type",
        )
    recorded = resource.get("recorded")
    if not isinstance(recorded, str) or not recorded:
        raise InputError(
            f"{rtype}.recorded is required in the audit log",
            pointer="/recorded",
            expression=f"{rtype}.recorded",
            rule="audit:recorded",
            code="required",
        )
    refs: list[str] = []
    for entity in resource.get("entity") or []:
        if isinstance(entity, dict):
            r = _ref(entity.get("what"))
            if r:
                refs.append(r)
    for target in resource.get("target") or []:
        r = _ref(target)
        if r:
            refs.append(r)
    patient = _ref(resource.get("patient")) or next((r for r in refs if r.startswith("Patient/")), None)
    consent = next((r for r in refs if r.startswith("Consent/")), None)
    if consent is None:
        consent = next(
            (p for p in resource.get("policy") or [] if isinstance(p, str) and "Consent/" in p), None
        )
    recipient = None
    for agent in resource.get("agent") or []:
        if (
            isinstance(agent, dict)
            and (_codes(agent.get("type")) | _codes(agent.get("role"))) & RECIPIENT_ROLES
        ):
            recipient = _ref(agent.get("who"))
            if recipient:
                break
    outcome_raw = resource.get("outcome")
    if isinstance(outcome_raw, str):
        outcome: str | None = outcome_raw
    elif isinstance(outcome_raw, dict):
        outcome = next(iter(sorted(_codes(outcome_raw.get("code")))), None)
    else:
        outcome = None
    rid = resource.get("id") if isinstance(resource.get("id"), str) else None
    return AuditRecord(
        rtype, rid, recorded, _epoch(recorded, f"{rtype}.recorded"), patient, recipient, outcome, consent
    )


class AuditLog:
    """Append and query audit resources; nothing is ever updated or deleted."""

    def __init__(self, db: Database) -> None:
        self.db = db
        migrations.ensure(db, "auditlog")

    def append(self, resource: dict[str, Any]) -> int:
        """Store one AuditEvent or Provenance (committed before returning); its sequence number."""
        return self.append_many([resource])[0]

    def append_many(self, resources: Sequence[dict[str, Any]]) -> list[int]:
        """Store AuditEvents and Provenances in one commit (one disk sync), all or none; their
        sequence numbers.

        Through the group committer (`Database.write`): concurrent appends share one commit, and
        inside a caller's transaction the records join it."""
        rows = [(extract(r), jsonio.dumps(r).decode()) for r in resources]

        def insert(tx: Any) -> list[int]:
            return [
                int(
                    tx.execute(
                        "INSERT INTO audit_log (resource_type, resource_id, recorded, recorded_epoch, "
                        "patient, recipient, outcome, consent_ref, body) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) "
                        "RETURNING seq",
                        (
                            rec.resource_type,
                            rec.resource_id,
                            rec.recorded,
                            rec.recorded_epoch,
                            rec.patient,
                            rec.recipient,
                            rec.outcome,
                            rec.consent_ref,
                            body,
                        ),
                    )[0]["seq"]
                )
                for rec, body in rows
            ]

        return self.db.write(insert) if rows else []

    def batch(self, limit: int) -> AuditBatch:
        """A batch of at most `limit` records, written in one commit by `AuditBatch.commit`."""
        return AuditBatch(self, limit)

    def query(
        self,
        resource_type: str | None = None,
        patient: str | None = None,
        outcome: str | None = None,
        since: str | date | datetime | None = None,
        *,
        recipient: str | None = None,
        consent: str | None = None,
        limit: int = 100,
    ) -> list[dict[str, Any]]:
        """Stored resources matching every filter given, newest first (by `recorded`).

        `since` is inclusive (an instant, or a date meaning its midnight UTC); `consent`
        without `/_history/N` matches every version of that Consent; with it, that version.
        """
        return [
            r["resource"]
            for r in self.page(
                resource_type, patient, outcome, since, recipient=recipient, consent=consent, limit=limit
            )
        ]

    def page(
        self,
        resource_type: str | None = None,
        patient: str | None = None,
        outcome: str | None = None,
        since: str | date | datetime | None = None,
        *,
        until: str | date | datetime | None = None,
        recipient: str | None = None,
        consent: str | None = None,
        before: tuple[float, int] | None = None,
        limit: int = 100,
    ) -> list[dict[str, Any]]:
        """One page of `query` (same filters, newest first) with each record's `seq`,
        `recorded_epoch` and `resource`: `until` is exclusive (a date: its midnight UTC), and
        `before=(recorded_epoch, seq)` of a page's last row gives the next, older page
        (keyset paging: as fast on the millionth row as on the first)."""
        where: list[str] = []
        params: list[Any] = []
        for column, value in (
            ("resource_type", resource_type),
            ("patient", patient),
            ("outcome", outcome),
            ("recipient", recipient),
        ):
            if value is not None:
                where.append(f"{column} = ?")
                params.append(value)
        if consent is not None and "/_history/" in consent:
            where.append("consent_ref = ?")
            params.append(consent)
        elif consent is not None:
            where.append("(consent_ref = ? OR consent_ref LIKE ?)")
            params += [consent, consent + "/_history/%"]
        if since is not None:
            where.append("recorded_epoch >= ?")
            params.append(_epoch(since, "since"))
        if until is not None:
            where.append("recorded_epoch < ?")
            params.append(_epoch(until, "until"))
        if before is not None:
            where.append("(recorded_epoch < ? OR (recorded_epoch = ? AND seq < ?))")
            params += [float(before[0]), float(before[0]), int(before[1])]
        clause = f"WHERE {' AND '.join(where)} " if where else ""
        rows = self.db.query(
            f"SELECT seq, recorded_epoch, body FROM audit_log {clause}"
            "ORDER BY recorded_epoch DESC, seq DESC LIMIT ?",
            (*params, int(limit)),
        )
        return [
            {
                "seq": int(r["seq"]),
                "recorded_epoch": float(r["recorded_epoch"]),
                "resource": jsonio.loads(r["body"], source="audit log"),
            }
            for r in rows
        ]

    def count(self) -> int:
        """How many records the log holds."""
        return int(self.db.query("SELECT COUNT(*) AS n FROM audit_log")[0]["n"])


class AuditBatch:
    """The audit records of one unit of work (a search page), written together in one commit.

    `limit` is the most records the batch takes: the caller states its bound on audit volume,
    and a record past it raises ValueError (a bug in the caller's bound, never silently
    dropped). `commit` writes what was added (nothing when empty) and empties the batch.
    """

    def __init__(self, log: AuditLog, limit: int) -> None:
        self.log = log
        self.limit = max(0, int(limit))
        self._records: list[dict[str, Any]] = []

    def add(self, resource: dict[str, Any]) -> None:
        if len(self._records) >= self.limit:
            raise ValueError(f"audit batch bound of {self.limit} records exceeded")
        self._records.append(resource)

    def __len__(self) -> int:
        return len(self._records)

    def commit(self) -> list[int]:
        """Write every record added, in one commit; their sequence numbers."""
        records, self._records = self._records, []
        return self.log.append_many(records)
