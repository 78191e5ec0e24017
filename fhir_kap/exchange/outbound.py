"""Outbound disclosure: KAP record → FHIR → consent gate → labels → audit → outbox.

    out = Outbound(pipeline, outbox, audit, release=Release.R4)
    result = out.submit("note.json", record, Target("practice-a", "https://ehr.example/fhir"))

Nothing is queued without a permit from the ConsentGate over the client's stored consent
context; every decision writes an AuditEvent, every permitted disclosure a Provenance citing the
exact Consent version, and the queued resource carries the R and PSY security labels.
`send_time_check` is the same gate again at delivery time, so a revocation holds queued items.

Room: exchange/ (layer 3, orchestration): may import layers 0-2.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from ..config import Release
from ..consent import CONTEXT_TYPES, ConsentGate, Recipient, apply_security_labels, audit_event, provenance
from ..errors import Issue, KapError
from ..fhir.identifiers import patient_reference
from ..records.pipeline import Pipeline
from ..storage.outbox import Outbox, OutboxItem
from .telemetry import consent_decision

__all__ = ["CONTEXT_TYPES", "Outbound", "SendResult", "Target", "send_time_check"]


@dataclass(frozen=True)
class Target:
    """Where a disclosure is delivered: an endpoint name (settings) and its FHIR base URL."""

    endpoint: str
    base_url: str
    serves: tuple[str, ...] | None = None  # the recipients it is registered for; None: ad hoc URL


@dataclass
class SendResult:
    """What happened to one document: queued / context / refused, with machine-readable reasons."""

    label: str
    outcome: str
    resource: str | None = None
    deliveries: list[dict[str, Any]] = field(default_factory=list)
    reasons: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"item": self.label, "outcome": self.outcome}
        if self.resource:
            out["resource"] = self.resource
        if self.deliveries:
            out["deliveries"] = self.deliveries
        if self.reasons:
            out["reasons"] = self.reasons
        return out


def issue_reason(issue: Issue) -> dict[str, Any]:
    out: dict[str, Any] = {"message": issue.message}
    for key in ("rule", "pointer", "expression"):
        value = getattr(issue, key)
        if value is not None:
            out[key] = value
    return out


class Outbound:
    """Consent-gated enqueueing of clinic records for one FHIR release."""

    def __init__(
        self,
        pipeline: Pipeline,
        outbox: Outbox,
        audit: Any,
        *,
        release: Release,
        purpose: str = "TREAT",
        actor: str = "fhir-kap",
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.pipeline = pipeline
        self.outbox = outbox
        self.audit = audit
        self.release = release
        self.purpose = purpose
        self.actor = actor
        self.clock = clock

    def submit(
        self, label: str, doc: Any, target: Target, *, recipients: list[str] | None = None
    ) -> SendResult:
        """Map, validate and gate one KAP record (or FHIR resource), then queue it per recipient.

        Consents and parties are kept as consent context instead. The recipients are the
        resource's own (`Communication.recipient`) unless `recipients` are given
        (`Practitioner/x` or `system|value`), which a Procedure or ServiceRequest needs.
        """
        resource = self.prepare(doc)
        if isinstance(resource, KapError):
            return SendResult(label, "refused", reasons=[issue_reason(i) for i in resource.issues])
        rtype, rid = resource["resourceType"], resource.get("id")
        ref = f"{rtype}/{rid}"
        if rtype in CONTEXT_TYPES:
            self.outbox.put_context(resource)
            return SendResult(label, "context", ref)
        addressed = [
            r["reference"]
            for r in resource.get("recipient") or []
            if isinstance(r, dict) and isinstance(r.get("reference"), str)
        ]
        names = list(recipients or addressed)
        if not names:
            return SendResult(
                label,
                "refused",
                ref,
                reasons=[
                    {
                        "message": "no recipient: name one (--recipient) to disclose this resource to",
                        "rule": "outbound:recipient",
                    }
                ],
            )
        stray = [n for n in names if addressed and n not in addressed]
        if stray:  # a note goes only to those it is addressed to
            return SendResult(
                label,
                "refused",
                ref,
                reasons=[
                    {
                        "message": f"{stray[0]} is not among the note's recipients",
                        "rule": "outbound:recipient",
                    }
                ],
            )
        unserved = [n for n in names if target.serves is not None and n not in target.serves]
        if unserved:  # the endpoint must be the recipient's own server
            return SendResult(
                label,
                "refused",
                ref,
                reasons=[
                    {
                        "message": f"endpoint {target.endpoint} is not registered for {unserved[0]}: "
                        f"add it to `recipients` under [endpoints.{target.endpoint}] in the settings "
                        "(the references and SYSTEM|VALUE identifiers that server receives for)",
                        "rule": "outbound:endpoint-recipient",
                    }
                ],
            )
        deliveries = [self.disclose(resource, name, target) for name in names]
        outcomes = {d["outcome"] for d in deliveries}
        outcome = next(o for o in ("queued", "already-queued", "refused") if o in outcomes)
        return SendResult(label, outcome, ref, deliveries)

    def prepare(self, doc: Any) -> dict[str, Any] | KapError:
        """A KAP record (or FHIR resource) → checked, mapped, validated FHIR; or the error.

        A FHIR resource is re-built from its KAP record: only mapped elements leave, never a
        caller's `contained`, `text`, `note` or extensions the gate cannot see.
        """
        try:
            if isinstance(doc, dict) and "resourceType" in doc:
                doc = self.pipeline.from_fhir(doc, self.release)
            return self.pipeline.to_fhir(doc, self.release)
        except KapError as exc:
            return exc

    def gate(self, resource: dict[str, Any], recipient_key: str) -> tuple[Any, dict[str, Any] | None]:
        """Decide one disclosure and audit it; on permit also write the Provenance citing the
        Consent version and return the labelled copy that may leave (else None)."""
        ref = f"{resource['resourceType']}/{resource.get('id')}"
        patient = patient_reference(resource)
        now = self.clock()
        recipient = Recipient.parse(recipient_key)
        decision = ConsentGate(self.outbox.context_for(patient) if patient else []).decide(
            resource, recipient, self.purpose, now
        )
        consent_decision("enqueue", decision.permit, decision.codes)
        event = audit_event(
            decision, resource, recipient, self.purpose, release=self.release, recorded=now, actor=self.actor
        )
        if not decision.permit:
            self.audit.append(event)
            return decision, None
        self.audit.append_many([event, provenance(ref, decision, release=self.release, recorded=now)])
        return decision, apply_security_labels(resource)

    def disclose(
        self, resource: dict[str, Any], recipient_key: str, target: Target, *, shown: str | None = None
    ) -> dict[str, Any]:
        """Gate one disclosure and, when permitted, queue it for `target` (durably)."""
        name = shown or recipient_key
        decision, labelled = self.gate(resource, recipient_key)
        if labelled is None:
            return {
                "recipient": name,
                "outcome": "refused",
                "reasons": [r.to_json() for r in decision.reasons],
            }
        patient = (resource.get("subject") or {}).get("reference")
        item, created = self.outbox.enqueue(
            labelled,
            endpoint=target.endpoint,
            base_url=target.base_url,
            patient_ref=patient,
            recipient_ref=recipient_key,
            purpose=self.purpose,
            consent_ref=decision.consent,
        )
        out = {
            "recipient": name,
            "outcome": "queued" if created else "already-queued",
            "outbox_item": item.id,
            "state": item.state,
            "consent": decision.consent,
        }
        if not created and item.state in ("held", "dead"):  # same key: the first version stays queued
            out["hint"] = f"item {item.id} is {item.state}: `fhir-kap outbox release|retry {item.id}`"
        return out


def send_time_check(
    outbox: Outbox, audit: Any, release: Release, clock: Callable[[], datetime] = lambda: datetime.now(UTC)
) -> Callable[[OutboxItem], tuple[bool, str]]:
    """The delivery worker's consent re-check: the ConsentGate over the item's patient's current
    context, for the item's recipient and purpose, now. Every decision is audited. Fails closed:
    no recipient, purpose or patient means hold."""

    def check(item: OutboxItem) -> tuple[bool, str]:
        if not item.recipient_ref or not item.purpose:
            consent_decision("send", False, ("item-no-recipient",))
            return False, "the item records no recipient or purpose to check consent against"
        if not item.patient_ref:
            consent_decision("send", False, ("item-no-patient",))
            return False, "the item records no patient to find consents for"
        now = clock()
        recipient = Recipient.parse(item.recipient_ref)
        decision = ConsentGate(outbox.context_for(item.patient_ref)).decide(
            item.resource, recipient, item.purpose, now
        )
        consent_decision("send", decision.permit, decision.codes)
        audit.append(
            audit_event(decision, item.resource, recipient, item.purpose, release=release, recorded=now)
        )
        reason = "; ".join(r.message for r in decision.reasons) or ("permit" if decision.permit else "deny")
        return decision.permit, reason

    return check
