"""Idempotency checks (idem-01 … idem-03): conditional create, urn:uuid references in a transaction,
and a failing transaction rolled back whole
(conformance/checks/, layer 3: orchestration; imports base and the conformance context only).
"""

from __future__ import annotations

import uuid
from typing import Any

from ...config import Release
from ..context import SPEC_R4, Check, Context, Failed, identifier_param, outcome_hint


def _patient(ctx: Context, value: str) -> dict[str, Any]:
    return ctx.mark(
        {
            "resourceType": "Patient",
            "identifier": [{"system": ctx.run_system, "value": value}],
            "active": True,
        }
    )


def _idem_conditional(ctx: Context) -> str:
    value = "idem-conditional"
    header = {"If-None-Exist": f"identifier={ctx.run_system}|{value}"}
    first, _ = ctx.create(_patient(ctx, value), headers=header)
    if first.status not in (200, 201):
        raise Failed(f"first conditional create answered {first.status}{outcome_hint(first)}")
    second, _ = ctx.create(_patient(ctx, value), headers=header)
    if second.status not in (200, 201):
        raise Failed(f"second conditional create answered {second.status}{outcome_hint(second)}")
    found, _ = ctx.search_all("Patient", identifier_param(ctx.run_system, value))
    if len(found) != 1:
        raise Failed(f"two conditional creates with the same If-None-Exist left {len(found)} resources")
    if second.status != 200:
        return f"one resource kept, but the second create answered {second.status} (200 expected)"
    return f"first {first.status}, second {second.status}; exactly one resource"


def _bundle(entries: list[dict[str, Any]]) -> dict[str, Any]:
    return {"resourceType": "Bundle", "type": "transaction", "entry": entries}


def _entry(full_url: str, resource: dict[str, Any]) -> dict[str, Any]:
    return {
        "fullUrl": full_url,
        "resource": resource,
        "request": {"method": "POST", "url": resource["resourceType"]},
    }


def service_request(ctx: Context, value: str, subject: str) -> dict[str, Any]:
    """A small referral that still carries what a KAP referral needs beyond base FHIR (when it was
    written and why), so that a KAP-aware server (the fhir-kap bridge) accepts it too."""
    reason = {"text": "Treatment-resistant depression"}
    return ctx.mark(
        {
            "resourceType": "ServiceRequest",
            "identifier": [{"system": ctx.run_system, "value": value}],
            "status": "active",
            "intent": "order",
            "subject": {"reference": subject},
            "authoredOn": "2025-01-09T15:30:00+02:00",
            **({"reason": [{"concept": reason}]} if ctx.release is Release.R5 else {"reasonCode": [reason]}),
        }
    )


def _remember_bundle(ctx: Context, bundle: Any) -> list[str]:
    locations = []
    for e in (bundle or {}).get("entry") or [] if isinstance(bundle, dict) else []:
        loc = ((e or {}).get("response") or {}).get("location") or ""
        parts = loc.split("/_history")[0].split("/")
        if len(parts) >= 2 and (parts[-2], parts[-1]) not in ctx.created:
            ctx.created.append((parts[-2], parts[-1]))
        locations.append("/".join(parts[-2:]))
    return locations


def _idem_transaction(ctx: Context) -> str:
    pid = f"urn:uuid:{uuid.uuid4()}"
    bundle = _bundle(
        [
            _entry(pid, _patient(ctx, "idem-tx-patient")),
            _entry(f"urn:uuid:{uuid.uuid4()}", service_request(ctx, "idem-tx-sr", pid)),
        ]
    )
    resp = ctx.request("POST", "", body=bundle)
    ctx.exercise("", "transaction", resp, "POST [base] (transaction)")
    doc = resp.json()
    if resp.status != 200 or not isinstance(doc, dict) or doc.get("type") != "transaction-response":
        raise Failed(f"transaction answered {resp.status}{outcome_hint(resp)}, not a transaction-response")
    locations = _remember_bundle(ctx, doc)
    found, _ = ctx.search_all("ServiceRequest", identifier_param(ctx.run_system, "idem-tx-sr"))
    patients, _ = ctx.search_all("Patient", identifier_param(ctx.run_system, "idem-tx-patient"))
    if len(found) != 1 or len(patients) != 1:
        raise Failed(
            f"after the transaction: {len(patients)} patients, {len(found)} requests (1 and 1 expected)"
        )
    ref = (found[0].get("subject") or {}).get("reference", "")
    want = f"Patient/{patients[0].get('id')}"
    if not (ref == want or ref.endswith("/" + want)):
        raise Failed(f"the urn:uuid reference was stored as '{ref}', not resolved to {want}")
    return f"urn:uuid resolved to {want}; entries at {', '.join(locations)}"


def _idem_atomic(ctx: Context) -> str:
    pid = f"urn:uuid:{uuid.uuid4()}"
    invalid = ctx.mark(
        {
            "resourceType": "ServiceRequest",
            "identifier": [{"system": ctx.run_system, "value": "idem-atomic-bad"}],
        }
    )  # no status/intent/subject
    bundle = _bundle(
        [_entry(pid, _patient(ctx, "idem-atomic-patient")), _entry(f"urn:uuid:{uuid.uuid4()}", invalid)]
    )
    resp = ctx.request("POST", "", body=bundle)
    _remember_bundle(ctx, resp.json())
    patients, _ = ctx.search_all("Patient", identifier_param(ctx.run_system, "idem-atomic-patient"))
    for p in patients:
        if ("Patient", p.get("id")) not in ctx.created:
            ctx.created.append(("Patient", p["id"]))
    if resp.status < 400:
        raise Failed(
            f"a transaction with an invalid entry (ServiceRequest without status, intent, subject)"
            f" answered {resp.status}; it must fail as a whole"
        )
    if patients:
        raise Failed(
            f"the transaction failed ({resp.status}) but its valid Patient entry was kept: not rolled back"
        )
    return f"answered {resp.status}; nothing of the transaction remains"


CHECKS = (
    Check(
        "idem-01",
        "idempotency",
        "conditional create twice → one resource",
        SPEC_R4 + "http.html#ccreate",
        True,
        _idem_conditional,
    ),
    Check(
        "idem-02",
        "idempotency",
        "transaction resolves urn:uuid references",
        SPEC_R4 + "http.html#trules",
        True,
        _idem_transaction,
    ),
    Check(
        "idem-03",
        "idempotency",
        "transaction with an invalid entry is rolled back whole",
        SPEC_R4 + "http.html#transaction",
        True,
        _idem_atomic,
    ),
)
