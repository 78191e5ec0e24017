"""The KAP API under /kap: the clinic's own systems post records and move referrals.

`POST /kap/records` takes one KAP record (JSON) or many (NDJSON). Each record is checked,
mapped to FHIR, profile-checked and, when it names recipients, consent-gated per recipient:
- a recipient partner with its own FHIR server: the resource is queued in the outbox;
- a recipient partner without one: the resource is stored here for it to fetch, and its
  rest-hook (if any) is told the id;
- a refused disclosure, or a recipient no partner answers to: listed with the reason.
Context records (consents, people, organisations, clients) go to the consent context.
Records naming no recipient (sessions) are stored here for the clinic and disclosed to no one.
The answer lists every record as `queued`, `stored`, `context`, `held` or `refused`, with why;
the consent path (gate, AuditEvent, Provenance, labels, outbox) is fhir_kap.exchange.outbound's.

Room: bridge/ (layer 4, entry point; the only Flask user): may import any room; nothing imports it but cli/.
"""

from __future__ import annotations

import io
from typing import Any

from flask import Flask, Response, request

from .. import jsonio
from ..consent import apply_security_labels
from ..errors import InputError, KapError, UnsupportedMediaType
from ..exchange.inbound import addressed_to
from ..exchange.inbound_rules import remembering
from ..exchange.outbound import CONTEXT_TYPES, Outbound, Target, issue_reason
from ..fhir.identifiers import business_identifier
from ..fhir.searchvalues import token_value
from ..records.pipeline import Pipeline
from ..storage.partners import Partner
from .app import current_partner, json_response, services
from .fhir import read_json_body

__all__ = ["register"]

_MAX_RECORDS = 1000


def register(app: Flask) -> None:
    @app.post("/kap/records")
    def records() -> Response:
        partner = current_partner(["kap/records.write"])
        docs = _documents()
        results = [_one(label, doc, partner) for label, doc in docs]
        summary: dict[str, int] = {}
        for r in results:
            summary[r["outcome"]] = summary.get(r["outcome"], 0) + 1
        status = 200 if any(r["outcome"] in ("queued", "stored", "context") for r in results) else 422
        return json_response({"summary": summary, "results": results}, status)

    @app.post("/kap/referrals/<rid>/status")
    def referral_status(rid: str) -> Response:
        """Move a referral's Task: `{"status": ..., "reason": CODE}`. `reason` is optional and one
        of not-eligible, client-declined, client-unreachable, capacity, duplicate, other; free
        text is refused (400, `referral:reason`), since the referring practice reads the Task
        without a consent check."""
        current_partner(["kap/referrals.write"])
        body = read_json_body(("application/json", "application/fhir+json"))
        if not isinstance(body, dict) or not isinstance(body.get("status"), str):
            raise InputError(
                "The body must be an object with a string 'status'", pointer="/status", rule="referral:body"
            )
        unknown = set(body) - {"status", "reason"}
        if unknown:
            raise InputError(
                f"Unknown field '{min(unknown)[:40]}'; allowed: status, reason", rule="referral:body"
            )
        task = services().inbound.referral_status(rid, body["status"], reason=body.get("reason"))
        return json_response(
            {
                "task": f"Task/{task.id}",
                "version": task.version,
                "status": task.resource["status"],
                "businessStatus": task.resource["businessStatus"]["coding"][0]["code"],
            }
        )


def _documents() -> list[tuple[str, Any]]:
    mimetype = request.mimetype
    if mimetype not in ("application/json", "application/x-ndjson", "application/ndjson"):
        raise UnsupportedMediaType(
            f"Content-Type '{(mimetype or 'none')[:60]}' is not supported; send "
            "application/json or application/x-ndjson",
            rule="http:content-type",
        )
    data = request.get_data(cache=False)
    if not data.strip():
        raise InputError("The request body is empty", pointer="", rule="json:empty")
    if mimetype == "application/json":
        return [("record", jsonio.loads(data, source="body"))]
    docs = list(jsonio.iter_documents(io.BytesIO(data), source="line"))
    if len(docs) > _MAX_RECORDS:
        raise InputError(
            f"At most {_MAX_RECORDS} records per request", rule="kap:records-size", code="too-costly"
        )
    return docs


def _outbound(source: str) -> Outbound:
    svc = services()
    return Outbound(
        Pipeline(svc.inputs, svc.mapper),
        svc.outbox,
        svc.audit,
        release=svc.release,
        purpose=svc.options.read_purpose,
        actor=f"partner:{source}",
    )


def _one(label: str, doc: Any, partner: Partner) -> dict[str, Any]:
    svc = services()
    source = partner.name
    out: dict[str, Any] = {"item": label}
    if isinstance(doc, dict):
        if isinstance(doc.get("record"), str):
            out["record"] = doc["record"][:40]
        if isinstance(doc.get("id"), str):
            out["id"] = doc["id"][:64]
    outbound = _outbound(source)
    resource = outbound.prepare(doc)
    if isinstance(resource, KapError):
        return {
            **out,
            "outcome": "refused",
            "status": resource.http_status,
            "reasons": [issue_reason(i) for i in resource.issues],
        }
    rtype = resource["resourceType"]
    if rtype in CONTEXT_TYPES:
        # Only consent authorities feed the consent gate: by this request's scopes (a SMART
        # token may carry fewer than the partner holds), never by the partner's registration.
        if not partner.is_consent_authority:
            return {
                **out,
                "outcome": "refused",
                "status": 403,
                "reasons": [
                    {
                        "message": "consents and parties are taken only from the clinic or a consent authority",
                        "rule": "kap:consent-authority",
                    }
                ],
            }
        if not partner.is_clinic:
            # A consent authority's Consents and parties count only as far as its scope admits
            # them and only under identifiers it owns: checks made on the FHIR path alone. Put
            # here straight into the context, its record would replace the clinic's copy.
            return {
                **out,
                "outcome": "refused",
                "status": 403,
                "reasons": [
                    {
                        "message": "a consent authority sends Consents and parties as FHIR (POST /fhir/Consent, "
                        "POST /fhir/PractitionerRole, ...), where they are scoped to its clients and identifiers; "
                        "/kap/records takes them from the clinic's systems only",
                        "rule": "kap:context-from-clinic",
                    }
                ],
            }
        svc.outbox.put_context(resource)
        return {**out, "outcome": "context", "resource": f"{rtype}/{resource.get('id')}"}
    recipients = [r for r in resource.get("recipient") or [] if isinstance(r, dict)]
    if not recipients:  # the clinic's own record (a session): kept here, disclosed to no one
        acc = svc.inbound.accept(
            apply_security_labels(resource), source=source, if_none_exist=_identifier_condition(resource)
        )
        return {
            **out,
            "outcome": "stored",
            "resource": f"{acc.stored.type}/{acc.stored.id}",
            "new": acc.created,
        }
    deliveries = [_deliver(outbound, resource, ref, source) for ref in recipients]
    outcomes = {d["outcome"] for d in deliveries}
    overall = next(o for o in ("queued", "already-queued", "stored", "held", "refused") if o in outcomes)
    return {**out, "outcome": overall, "deliveries": deliveries}


def _deliver(
    outbound: Outbound, resource: dict[str, Any], ref: dict[str, Any], source: str
) -> dict[str, Any]:
    """One recipient: the partner answering to it, the consent gate, then its outbox or our store."""
    svc = services()
    shown = ref.get("reference") if isinstance(ref.get("reference"), str) else "(identifier)"
    single = dict(resource, recipient=[ref])
    get = remembering(svc.store.get)  # the recipient's party read once, not once per partner
    partner = next(
        (
            p
            for p in svc.partners.list()
            if not p.revoked and not p.is_clinic and addressed_to(single, p, get) is not None
        ),
        None,
    )
    if partner is None:
        return {
            "recipient": shown,
            "outcome": "held",
            "reasons": ["no registered partner answers to this recipient"],
        }
    key = addressed_to(single, partner, get) or ""
    if partner.endpoint_url:
        target = Target(partner.name, partner.endpoint_url)
        return {**outbound.disclose(resource, key, target, shown=shown), "partner": partner.name}
    decision, labelled = outbound.gate(resource, key)
    base = {"recipient": shown, "partner": partner.name}
    if labelled is None:
        return {**base, "outcome": "refused", "reasons": [r.to_json() for r in decision.reasons]}
    acc = svc.inbound.accept(labelled, source=source, if_none_exist=_identifier_condition(labelled))
    return {**base, "outcome": "stored", "resource": f"{acc.stored.type}/{acc.stored.id}", "new": acc.created}


def _identifier_condition(resource: dict[str, Any]) -> dict[str, list[str]] | None:
    found = business_identifier(resource)
    return {"identifier": [token_value(*found)]} if found else None
