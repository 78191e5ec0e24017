"""Capability checks (cap-01 … cap-07): what the server's CapabilityStatement declares
(conformance/checks/, layer 3: orchestration; imports base and the conformance context only).

cap-01 reads /metadata once and keeps it on the context; the other capability checks, and the
validation checks looking for $validate (`server_rest`), read it from there, so the runner always
runs cap-01 first.
"""

from __future__ import annotations

from typing import Any

from ...config import Release
from ..context import FHIR_JSON, SPEC_R4, Check, Context, Failed, Skipped

KAP_TYPES = (
    "ServiceRequest",
    "Procedure",
    "Consent",
    "Communication",
    "Patient",
    "Practitioner",
    "PractitionerRole",
    "Organization",
)
NEEDED_INTERACTIONS = ("create", "read", "update", "search-type")


def _cap_metadata(ctx: Context) -> str:
    resp = ctx.request("GET", "metadata")
    doc = resp.json()
    if resp.status != 200 or not isinstance(doc, dict) or doc.get("resourceType") != "CapabilityStatement":
        raise Failed(f"GET /metadata answered {resp.status}, not a CapabilityStatement")
    ctx.metadata = doc
    ctx.state["metadata_exchange"] = ctx.exchanges[-1]
    return f"CapabilityStatement (kind {doc.get('kind', '?')}, {len(server_rest(ctx).get('resource') or [])} resource types)"


def server_rest(ctx: Context) -> dict[str, Any]:
    """The server `rest` entry of the CapabilityStatement cap-01 read; Skipped without one."""
    if ctx.metadata is None:
        raise Skipped("no CapabilityStatement (cap-01 failed)")
    for rest in ctx.metadata.get("rest") or []:
        if rest.get("mode", "server") == "server":
            return rest
    return {}


def _cap_version(ctx: Context) -> str:
    if ctx.metadata is None:
        raise Skipped("no CapabilityStatement (cap-01 failed)")
    declared = str(ctx.metadata.get("fhirVersion") or "")
    wanted = ctx.config.fhir_version
    if wanted != "auto":
        if Release.parse(wanted).value != declared:
            raise Failed(f"server declares fhirVersion '{declared}', the check was asked for {wanted}")
        return f"fhirVersion {declared} as requested"
    if declared not in (Release.R4.value, Release.R5.value):
        raise Failed(
            f"server declares fhirVersion '{declared}'; KAP exchange needs 4.0.1 (R4) or 5.0.0 (R5)"
            f" — the remaining checks assume {ctx.release.value}"
        )
    return f"fhirVersion {declared}"


def _cap_json(ctx: Context) -> str:
    if ctx.metadata is None:
        raise Skipped("no CapabilityStatement (cap-01 failed)")
    formats = [str(f) for f in ctx.metadata.get("format") or []]
    if not any(f in ("json", FHIR_JSON, "application/json") or f.startswith(FHIR_JSON) for f in formats):
        raise Failed(f"format lists {formats or 'nothing'}; JSON (application/fhir+json) is needed")
    return f"formats: {', '.join(formats)}"


def _resources(ctx: Context) -> dict[str, dict[str, Any]]:
    return {str(r.get("type")): r for r in server_rest(ctx).get("resource") or [] if isinstance(r, dict)}


def _cap_interactions(ctx: Context) -> str:
    resources = _resources(ctx)
    missing = []
    for rtype in KAP_TYPES:
        have = {i.get("code") for i in (resources.get(rtype) or {}).get("interaction") or []}
        lacking = [i for i in NEEDED_INTERACTIONS if i not in have]
        if lacking:
            missing.append(f"{rtype} lacks {'/'.join(lacking)}" if rtype in resources else f"{rtype} absent")
    if missing:
        raise Failed("; ".join(missing))
    return f"{len(KAP_TYPES)} types with {', '.join(NEEDED_INTERACTIONS)}"


def _cap_conditional(ctx: Context) -> str:
    resources = _resources(ctx)
    lacking = [t for t in KAP_TYPES if not (resources.get(t) or {}).get("conditionalCreate")]
    if lacking:
        raise Failed(f"conditionalCreate not declared for {', '.join(lacking)}")
    return "conditionalCreate declared for every KAP type"


def _cap_transaction(ctx: Context) -> str:
    codes = {i.get("code") for i in server_rest(ctx).get("interaction") or []}
    if "transaction" not in codes:
        raise Failed(f"system interactions {sorted(c for c in codes if c) or 'none'} lack 'transaction'")
    return "transaction declared"


def _cap_smart(ctx: Context) -> str:
    if ctx.config.auth_kind != "smart":
        raise Skipped("auth is not smart")
    resp = ctx.request("GET", ".well-known/smart-configuration")
    doc = resp.json()
    if resp.status != 200 or not isinstance(doc, dict) or not doc.get("token_endpoint"):
        raise Failed(f"GET .well-known/smart-configuration answered {resp.status} without a token_endpoint")
    caps = doc.get("capabilities") or []
    return f"token_endpoint advertised; capabilities: {', '.join(caps) or 'none listed'}"


CHECKS = (
    Check(
        "cap-01",
        "capability",
        "/metadata returns a CapabilityStatement",
        SPEC_R4 + "http.html#capabilities",
        True,
        _cap_metadata,
    ),
    Check(
        "cap-02",
        "capability",
        "fhirVersion is 4.0.1 or 5.0.0 (as requested)",
        SPEC_R4 + "capabilitystatement.html (fhirVersion)",
        True,
        _cap_version,
    ),
    Check("cap-03", "capability", "JSON format supported", SPEC_R4 + "http.html#mime-type", True, _cap_json),
    Check(
        "cap-04",
        "capability",
        "KAP resource types support create/read/update/search-type",
        SPEC_R4 + "capabilitystatement.html (rest.resource.interaction)",
        True,
        _cap_interactions,
    ),
    Check(
        "cap-05",
        "capability",
        "conditional create declared",
        SPEC_R4 + "http.html#ccreate",
        True,
        _cap_conditional,
    ),
    Check(
        "cap-06",
        "capability",
        "transaction declared",
        SPEC_R4 + "http.html#transaction",
        True,
        _cap_transaction,
    ),
    Check(
        "cap-07",
        "capability",
        "SMART discovery document",
        "SMART App Launch 2.0 conformance.html (.well-known/smart-configuration)",
        True,
        _cap_smart,
    ),
)
