"""AuditEvent (IHE BALP "AuthZ-Consent" style) for every decision, Provenance for every disclosure.

Both are built for the release the receiver speaks. R4: AuditEvent.type / subtype, outcome
code 0|4|8, agent.purposeOfUse. R5: category / code, outcome.code, authorization. The
Provenance cites the exact Consent version as policy and as a `source` entity. The time
is always handed in (`recorded`): this module reads no clock.

Room: consent/ (layer 1, pure core: no IO, no clock): may import the base rooms only.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from ..config import CANONICAL, CS, Release
from ..errors import InputError
from ..fhir.identifiers import patient_reference
from .decide import Decision
from .policy import normalise_purpose
from .recipients import Recipient

__all__ = ["audit_event", "provenance", "AUDIT_OUTCOME"]

DCM = "http://dicom.nema.org/resources/ontology/DCM"
BALP_AUTHZ = "https://profiles.ihe.net/ITI/BALP/CodeSystem/AuthZsubType"
AUDIT_OUTCOME = "http://terminology.hl7.org/CodeSystem/audit-event-outcome"
OBJECT_ROLE = "http://terminology.hl7.org/CodeSystem/object-role"
ENTITY_TYPE = "http://terminology.hl7.org/CodeSystem/audit-entity-type"
PROV_AGENT = "http://terminology.hl7.org/CodeSystem/provenance-participant-type"
AUDIT_ACTION_EXECUTE = "E"
SECURITY_ALERT = {"system": DCM, "code": "110113", "display": "Security Alert"}
AUTHZ_CONSENT = {
    "system": BALP_AUTHZ,
    "code": "AuthZ-Consent",
    "display": "Authorization Decision using Roles and Consent",
}
APPLICATION = {"system": DCM, "code": "110150", "display": "Application"}
RECIPIENT_ROLE = {"system": CS.V3_PARTICIPATION, "code": "IRCP", "display": "information recipient"}


def _instant(recorded: datetime) -> str:
    if not isinstance(recorded, datetime) or recorded.tzinfo is None:
        raise InputError("recorded must be a datetime with a timezone", rule="audit:recorded")
    return recorded.isoformat(timespec="seconds")


def _outcome(decision: Decision) -> str:
    if decision.permit:
        return "0"
    return "8" if any(r.code == "malformed-consent" for r in decision.reasons) else "4"


def _recipient_ref(recipient: Recipient) -> dict[str, Any]:
    if recipient.reference:
        return {"reference": recipient.reference}
    system, value = recipient.identifiers[0]
    return {"identifier": {"system": system, "value": value}}


def _purpose_coding(purpose: str) -> dict[str, str]:
    system, _, code = normalise_purpose(purpose).rpartition("|")
    return {"system": system, "code": code}


def _reference(resource: dict[str, Any]) -> str:
    rid = resource.get("id")
    return (
        f"{resource.get('resourceType')}/{rid}"
        if isinstance(rid, str) and rid
        else str(resource.get("resourceType"))
    )


def _detail(decision: Decision) -> str:
    codes = ", ".join(dict.fromkeys(r.code for r in decision.reasons)) or "none"
    return f"{'permit' if decision.permit else 'deny'}: {codes}"


def audit_event(
    decision: Decision,
    resource: dict[str, Any],
    recipient: Recipient,
    purpose: str,
    *,
    release: Release,
    recorded: datetime,
    actor: str = "fhir-kap",
) -> dict[str, Any]:
    """An AuditEvent recording a consent decision (permit or deny) for `release`."""
    when = _instant(recorded)
    purpose_cc = {"coding": [_purpose_coding(purpose)]}
    actor_who = {"identifier": {"system": CS.ID_PARTY, "value": actor}, "display": actor}
    res_ref = _reference(resource)
    patient = patient_reference(resource)
    r4 = release is Release.R4
    entities: list[dict[str, Any]] = []

    def entity(ref: str, role: str, display: str) -> dict[str, Any]:
        role_coding = {"system": OBJECT_ROLE, "code": role, "display": display}
        if r4:
            return {
                "what": {"reference": ref},
                "type": {"system": ENTITY_TYPE, "code": "2", "display": "System Object"},
                "role": role_coding,
            }
        return {"what": {"reference": ref}, "role": {"coding": [role_coding]}}

    if decision.consent:
        entities.append(entity(decision.consent, "13", "Security Resource"))
    entities.append(entity(res_ref, "4", "Domain Resource"))
    if patient:
        entities.append(entity(patient, "1", "Patient"))
    agents = [
        {"type": {"coding": [APPLICATION]}, "who": actor_who, "requestor": False},
        {"type": {"coding": [RECIPIENT_ROLE]}, "who": _recipient_ref(recipient), "requestor": True},
    ]
    observer = {"identifier": {"system": CS.ID_PARTY, "value": actor}, "display": actor}
    if r4:
        for a in agents:
            a["purposeOfUse"] = [purpose_cc]
        return {
            "resourceType": "AuditEvent",
            "type": SECURITY_ALERT,
            "subtype": [AUTHZ_CONSENT],
            "action": AUDIT_ACTION_EXECUTE,
            "recorded": when,
            "outcome": _outcome(decision),
            "outcomeDesc": _detail(decision),
            "purposeOfEvent": [purpose_cc],
            "agent": agents,
            "source": {
                "site": CANONICAL,
                "observer": observer,
                "type": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/security-source-type",
                        "code": "4",
                        "display": "Application Server",
                    }
                ],
            },
            "entity": entities,
        }
    out: dict[str, Any] = {
        "resourceType": "AuditEvent",
        "category": [{"coding": [SECURITY_ALERT]}],
        "code": {"coding": [AUTHZ_CONSENT]},
        "action": AUDIT_ACTION_EXECUTE,
        "recorded": when,
        "outcome": {
            "code": {"system": AUDIT_OUTCOME, "code": _outcome(decision)},
            "detail": [{"text": _detail(decision)}],
        },
        "authorization": [purpose_cc],
        "agent": agents,
        "source": {"site": {"display": CANONICAL}, "observer": observer},
        "entity": entities,
    }
    if patient:
        out["patient"] = {"reference": patient}
    return out


def provenance(
    target_ref: str,
    decision: Decision,
    *,
    release: Release,
    recorded: datetime,
    agent: str = "Organization/kap-clinic",
) -> dict[str, Any]:
    """A Provenance for a disclosed resource citing the exact Consent version (policy + source entity)."""
    if not decision.permit or not decision.consent:
        raise InputError(
            "a Provenance is only written for a permitted disclosure with a consent", rule="provenance:permit"
        )
    if not isinstance(target_ref, str) or not target_ref:
        raise InputError("the Provenance target must be a reference 'Type/id'", rule="provenance:target")
    when = _instant(recorded)
    consent_url = decision.consent
    prov_agent: dict[str, Any] = {
        "type": {"coding": [{"system": PROV_AGENT, "code": "custodian", "display": "Custodian"}]},
        "who": {"reference": agent},
    }
    entity: dict[str, Any] = {"role": "source", "what": {"reference": consent_url}}
    return {
        "resourceType": "Provenance",
        "target": [{"reference": target_ref}],
        "recorded": when,
        "policy": [consent_url],
        "agent": [prov_agent],
        "entity": [entity],
    }
