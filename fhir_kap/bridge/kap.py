"""The KAP API under /kap: the clinic's own systems post records and move referrals.

`POST /kap/records` takes one KAP record (JSON) or many (NDJSON). Each record is checked,
mapped to FHIR, profile-checked and, when it names recipients, consent-gated per recipient:
- a recipient partner with its own FHIR server: the resource is queued in the outbox;
- a recipient partner without one: the resource is stored here for it to fetch, and its
  rest-hook (if any) is told the id;
- a refused disclosure, or a recipient no partner answers to: listed with the reason.
Context records (consents, people, organisations, clients) go to the consent context.
The answer lists every record as `queued`, `stored`, `context`, `held` or `refused`, with why.
"""
from __future__ import annotations

import io
from datetime import UTC, datetime
from typing import Any

from flask import Flask, Response, request

from .. import jsonio
from ..errors import InputError, Issue, KapError
from ..inbound import addressed_to
from .app import current_partner, json_response, services
from .fhir import read_json_body

__all__ = ["register"]

_CONTEXT_RESOURCES = ("Consent", "Practitioner", "PractitionerRole", "Organization", "Patient")
_MAX_RECORDS = 1000


def register(app: Flask) -> None:
    @app.post("/kap/records")
    def records() -> Response:
        partner = current_partner(["kap/records.write"])
        docs = _documents()
        results = [_one(label, doc, partner.name) for label, doc in docs]
        summary: dict[str, int] = {}
        for r in results:
            summary[r["outcome"]] = summary.get(r["outcome"], 0) + 1
        status = 200 if any(r["outcome"] in ("queued", "stored", "context") for r in results) else 422
        return json_response({"summary": summary, "results": results}, status)

    @app.post("/kap/referrals/<rid>/status")
    def referral_status(rid: str) -> Response:
        current_partner(["kap/referrals.write"])
        body = read_json_body(("application/json", "application/fhir+json"))
        if not isinstance(body, dict) or not isinstance(body.get("status"), str):
            raise InputError("The body must be an object with a string 'status'", pointer="/status",
                             rule="referral:body")
        unknown = set(body) - {"status", "reason"}
        if unknown:
            raise InputError(f"Unknown field '{min(unknown)[:40]}'; allowed: status, reason",
                             rule="referral:body")
        task = services().inbound.referral_status(rid, body["status"], reason=body.get("reason"))
        return json_response({"task": f"Task/{task.id}", "version": task.version,
                              "status": task.resource["status"],
                              "businessStatus": task.resource["businessStatus"]["coding"][0]["code"]})


def _documents() -> list[tuple[str, Any]]:
    mimetype = request.mimetype
    if mimetype not in ("application/json", "application/x-ndjson", "application/ndjson"):
        from .fhir import UnsupportedMediaType

        raise UnsupportedMediaType(f"Content-Type '{(mimetype or 'none')[:60]}' is not supported; send "
                                   "application/json or application/x-ndjson", rule="http:content-type")
    data = request.get_data(cache=False)
    if not data.strip():
        raise InputError("The request body is empty", pointer="", rule="json:empty")
    if mimetype == "application/json":
        return [("record", jsonio.loads(data, source="body"))]
    docs = list(jsonio.iter_documents(io.BytesIO(data), source="line"))
    if len(docs) > _MAX_RECORDS:
        raise InputError(f"At most {_MAX_RECORDS} records per request", rule="kap:records-size", code="too-costly")
    return docs


def _one(label: str, doc: Any, source: str) -> dict[str, Any]:
    svc = services()
    out: dict[str, Any] = {"item": label}
    if isinstance(doc, dict):
        out["record"] = str(doc.get("record"))[:40]
        if isinstance(doc.get("id"), str):
            out["id"] = doc["id"][:64]
    try:
        record = svc.inputs.check(doc)
        resource = svc.mapper.to_fhir(record, svc.release)
        errors = [i for i in svc.validator.validate(resource) if i.is_error]
        if errors:
            from ..errors import ProfileError

            raise ProfileError(errors)
    except KapError as exc:
        return {**out, "outcome": "refused", "status": exc.http_status,
                "reasons": [_reason(i) for i in exc.issues]}
    rtype = resource["resourceType"]
    if rtype in _CONTEXT_RESOURCES:
        svc.outbox.put_context(resource)
        return {**out, "outcome": "context", "resource": f"{rtype}/{resource.get('id')}"}
    recipients = [r for r in resource.get("recipient") or [] if isinstance(r, dict)]
    if not recipients:
        return {**out, "outcome": "held", "reasons": ["the record names no recipient to disclose it to"]}
    deliveries = [_deliver(resource, ref, source) for ref in recipients]
    outcomes = {d["outcome"] for d in deliveries}
    overall = next(o for o in ("queued", "stored", "held", "refused") if o in outcomes)
    return {**out, "outcome": overall, "deliveries": deliveries}


def _deliver(resource: dict[str, Any], ref: dict[str, Any], source: str) -> dict[str, Any]:
    from ..consent import ConsentGate, Recipient, apply_security_labels, audit_event

    svc = services()
    shown = ref.get("reference") if isinstance(ref.get("reference"), str) else "(identifier)"
    single = dict(resource, recipient=[ref])
    partner = next((p for p in svc.partners.list() if not p.revoked and not p.is_clinic
                    and addressed_to(single, p, svc.store.get) is not None), None)
    if partner is None:
        return {"recipient": shown, "outcome": "held", "reasons": ["no registered partner answers to this recipient"]}
    key = addressed_to(single, partner, svc.store.get) or ""
    recipient = Recipient.parse(key)
    patient = (resource.get("subject") or {}).get("reference")
    now = datetime.now(UTC)
    decision = ConsentGate(svc.access.context(patient)).decide(resource, recipient, svc.options.read_purpose,
                                                               on=now.date())
    svc.audit.append(audit_event(decision, resource, recipient, svc.options.read_purpose, release=svc.release,
                                 recorded=now, actor=f"partner:{source}"))
    base = {"recipient": shown, "partner": partner.name}
    if not decision.permit:
        return {**base, "outcome": "refused", "reasons": [r.to_json() for r in decision.reasons]}
    labelled = apply_security_labels(resource)
    if partner.endpoint_url:
        item, created = svc.outbox.enqueue(labelled, endpoint=partner.name, base_url=partner.endpoint_url,
                                           recipient_ref=key, purpose=svc.options.read_purpose,
                                           consent_ref=_consent_ref(decision.consent))
        return {**base, "outcome": "queued", "outbox_item": item.id, "new": created}
    acc = svc.inbound.accept(labelled, source=source,
                             if_none_exist=_identifier_condition(labelled))
    return {**base, "outcome": "stored", "resource": f"{acc.stored.type}/{acc.stored.id}", "new": acc.created}


def _consent_ref(consent: Any) -> str | None:
    if consent is None:
        return None
    if isinstance(consent, str):
        return consent
    if isinstance(consent, dict):
        meta = consent.get("meta") or {}
        ref = f"Consent/{consent.get('id')}"
        return f"{ref}/_history/{meta['versionId']}" if meta.get("versionId") else ref
    return str(consent)


def _identifier_condition(resource: dict[str, Any]) -> dict[str, list[str]] | None:
    for ident in resource.get("identifier") or []:
        if isinstance(ident, dict) and ident.get("system") and ident.get("value"):
            return {"identifier": [f"{ident['system']}|{ident['value']}"]}
    return None


def _reason(issue: Issue) -> dict[str, Any]:
    out: dict[str, Any] = {"message": issue.message}
    if issue.rule:
        out["rule"] = issue.rule
    if issue.pointer is not None:
        out["pointer"] = issue.pointer
    if issue.expression:
        out["expression"] = issue.expression
    return out
