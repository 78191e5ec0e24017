"""Error checks (err-01 … err-06): bad requests get a 4xx answer with an OperationOutcome
(conformance/checks/, layer 3: orchestration; imports base and the conformance context only).
"""

from __future__ import annotations

from ..context import SPEC_R4, Check, Context, Failed, Response, outcome_hint
from .idempotency import service_request


def _is_4xx_with_outcome(resp: Response, what: str) -> str:
    if not 400 <= resp.status < 500:
        raise Failed(f"{what}: expected a 4xx answer, got {resp.status}")
    if not resp.is_outcome:
        raise Failed(f"{what}: answered {resp.status} but the body is not an OperationOutcome")
    return f"{what}: {resp.status} with an OperationOutcome{outcome_hint(resp)}"


def _e_malformed(ctx: Context) -> str:
    resp = ctx.request("POST", "Patient", raw_body=b'{"resourceType": "Patient", "active": tru')
    return _is_4xx_with_outcome(resp, "malformed JSON")


def _e_unknown_type(ctx: Context) -> str:
    resp = ctx.request("POST", "KapNoSuchType", body={"resourceType": "KapNoSuchType"})
    return _is_4xx_with_outcome(resp, "unknown resource type")


def _e_invalid_structure(ctx: Context) -> str:
    bad = {
        "resourceType": "ServiceRequest",
        "identifier": [{"system": ctx.run_system, "value": "err-structure"}],
    }
    resp, _ = ctx.create(bad, probe=True)
    return _is_4xx_with_outcome(resp, "ServiceRequest without status, intent and subject")


def _e_invalid_code(ctx: Context) -> str:
    bad = service_request(ctx, "err-code", "Patient/kap-check-none")
    bad["status"] = "bogus"
    resp, _ = ctx.create(bad, probe=True)
    return _is_4xx_with_outcome(resp, "ServiceRequest.status 'bogus' (required binding request-status)")


def _e_type_mismatch(ctx: Context) -> str:
    body = ctx.mark({"resourceType": "Practitioner", "active": True})
    resp = ctx.request("POST", "Patient", body=body)
    if 200 <= resp.status < 300:
        doc = resp.json()
        if isinstance(doc, dict) and doc.get("id"):
            ctx.created.append((str(doc.get("resourceType")), str(doc["id"])))
    return _is_4xx_with_outcome(resp, "a Practitioner posted to /Patient")


def _e_bad_utf8(ctx: Context) -> str:
    resp = ctx.request("POST", "Patient", raw_body=b'{"resourceType": "Patient", "gender": "\xff\xfe"}')
    return _is_4xx_with_outcome(resp, "a body that is not UTF-8")


CHECKS = (
    Check(
        "err-01",
        "errors",
        "malformed JSON → 4xx with OperationOutcome",
        SPEC_R4 + "http.html#create (400)",
        True,
        _e_malformed,
    ),
    Check(
        "err-02",
        "errors",
        "unknown resource type → 4xx with OperationOutcome",
        SPEC_R4 + "http.html#general (404 unknown type)",
        True,
        _e_unknown_type,
    ),
    Check(
        "err-03",
        "errors",
        "missing required elements → 4xx with OperationOutcome",
        SPEC_R4 + "http.html#create (400/422)",
        True,
        _e_invalid_structure,
    ),
    Check(
        "err-04",
        "errors",
        "resourceType not matching the URL → 4xx",
        SPEC_R4 + "http.html#create",
        True,
        _e_type_mismatch,
    ),
    # Not required: the adapter validates every resource it sends itself, so a server that
    # skips code checks can still exchange KAP data; it is a risk for data from other clients.
    Check(
        "err-05",
        "errors",
        "invalid code (status 'bogus') → 4xx with OperationOutcome",
        SPEC_R4 + "terminologies.html#required",
        False,
        _e_invalid_code,
    ),
    # Not required: the adapter only sends UTF-8 (orjson); a 500 here is robustness, not exchange.
    Check(
        "err-06",
        "errors",
        "body not UTF-8 → 4xx with OperationOutcome",
        "RFC 8259 §8.1; " + SPEC_R4 + "json.html",
        False,
        _e_bad_utf8,
    ),
)
