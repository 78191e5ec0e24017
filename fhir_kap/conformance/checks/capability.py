"""Capability checks (cap-01 … cap-08): what the server's CapabilityStatement declares, and
whether the server does what it declares
(conformance/checks/, layer 3: orchestration; imports base and the conformance context only).

cap-01 reads /metadata once and keeps it on the context; the other capability checks, and the
validation checks looking for $validate (`server_rest`), read it from there, so the runner always
runs cap-01 first. cap-09 looks for the KAP SubscriptionTopics where Subscription is claimed (R4:
the backport IG's topic-canonical extension, R5: SubscriptionTopic resources; skipped otherwise).
cap-04 … cap-06 check what the run's role needs (`Context.needs`,
`conditional_types`, `needs_transaction`, from registry.ROLES). cap-08 (`CLAIMS_CHECK`) runs
after every other check and the clean-up: each interaction the CapabilityStatement claims that a
check or the clean-up then tried and saw fail is one finding ("claims X, does not do X").
"""

from __future__ import annotations

from typing import Any

from ...config import CANONICAL, Release
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
#: What the KAP clinic's side needs of each KAP type: create, read and search; update where a
#: partner amends what it sent (a referral, a consent it revokes). Delete is never needed.
CLINIC_INTERACTIONS: dict[str, tuple[str, ...]] = {
    t: ("create", "read", "update", "search-type")
    if t in ("ServiceRequest", "Consent")
    else ("create", "read", "search-type")
    for t in KAP_TYPES
}


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


def _needs(ctx: Context) -> dict[str, tuple[str, ...]]:
    return ctx.needs or dict.fromkeys(KAP_TYPES, NEEDED_INTERACTIONS)


def _cap_interactions(ctx: Context) -> str:
    resources = _resources(ctx)
    missing = []
    needs = _needs(ctx)
    for rtype, wanted in needs.items():
        have = {i.get("code") for i in (resources.get(rtype) or {}).get("interaction") or []}
        lacking = [i for i in wanted if i not in have]
        if lacking:
            missing.append(f"{rtype} lacks {'/'.join(lacking)}" if rtype in resources else f"{rtype} absent")
    if missing:
        raise Failed("; ".join(missing))
    return (
        "; ".join(f"{t}: {', '.join(i)}" for t, i in needs.items())
        if ctx.needs
        else (f"{len(KAP_TYPES)} types with {', '.join(NEEDED_INTERACTIONS)}")
    )


def _cap_conditional(ctx: Context) -> str:
    resources = _resources(ctx)
    types = ctx.conditional_types or KAP_TYPES
    lacking = [t for t in types if not (resources.get(t) or {}).get("conditionalCreate")]
    if lacking:
        raise Failed(f"conditionalCreate not declared for {', '.join(lacking)}")
    return f"conditionalCreate declared for {', '.join(types) if ctx.conditional_types else 'every KAP type'}"


def _cap_transaction(ctx: Context) -> str:
    if not ctx.needs_transaction:
        raise Skipped("this role does not use transactions")
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


#: The topics a KAP clinic's server publishes for the practices (topic-based Subscriptions).
KAP_TOPICS = (
    f"{CANONICAL}/SubscriptionTopic/continuity-note-available",
    f"{CANONICAL}/SubscriptionTopic/referral-status-changed",
)
#: The Subscriptions R5 Backport IG's CapabilityStatement extension naming a supported topic (R4).
TOPIC_CANONICAL_EXT = (
    "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/"
    "capabilitystatement-subscriptiontopic-canonical"
)


def _topic_urls(node: Any) -> set[str]:
    """The topic canonicals named by backport extensions on `node` (a CapabilityStatement element)."""
    out = set()
    for ext in (node.get("extension") or []) if isinstance(node, dict) else []:
        if isinstance(ext, dict) and ext.get("url") == TOPIC_CANONICAL_EXT:
            value = ext.get("valueCanonical") or ext.get("valueUri")
            if isinstance(value, str):
                out.add(value.split("|", 1)[0])
    return out


def _cap_topics(ctx: Context) -> str:
    """Topic support where Subscription is claimed: the topics must be discoverable (R4 backport
    extension, or R5 SubscriptionTopic resources). The KAP topics are what a practice subscribes
    to at the clinic's server: the clinic role needs them; any other role is told whether they are
    there (a general-purpose server publishing topics of its own passes)."""
    resources = _resources(ctx)
    if "Subscription" not in resources:
        raise Skipped("the CapabilityStatement claims no Subscription support")
    rest = server_rest(ctx)
    found = _topic_urls(ctx.metadata) | _topic_urls(rest) | _topic_urls(resources["Subscription"])
    how = "backport extension"
    if "SubscriptionTopic" in resources:  # R5: the topics are resources of their own
        for url in KAP_TOPICS:
            if url in found:
                continue
            resp = ctx.request("GET", "SubscriptionTopic", params={"url": url})
            doc = resp.json()
            entries = (doc.get("entry") or []) if resp.status == 200 and isinstance(doc, dict) else []
            if any((e.get("resource") or {}).get("url") == url for e in entries if isinstance(e, dict)):
                found.add(url)
                how = "SubscriptionTopic resources"
    if not found:
        raise Failed("the server claims Subscription but names no SubscriptionTopic (no topic found)")
    missing = [u for u in KAP_TOPICS if u not in found]
    if not missing:
        return f"both KAP topics published ({how})"
    named = (
        f"{len(found)} topic(s) published ({', '.join(sorted(found)[:4])}{', ...' if len(found) > 4 else ''})"
    )
    if ctx.config.role == "clinic":
        raise Failed(f"the KAP topics are not published: {', '.join(missing)}; {named}")
    return f"{named}; not the KAP topics (needed only of the KAP clinic's server)"


def claimed(ctx: Context) -> set[tuple[str, str]]:
    """(type or "" for system, interaction) pairs the CapabilityStatement claims."""
    out: set[tuple[str, str]] = set()
    for rtype, res in _resources(ctx).items():
        out |= {(rtype, str(i.get("code"))) for i in res.get("interaction") or []}
        if res.get("conditionalCreate"):
            out.add((rtype, "conditional-create"))
        if res.get("conditionalUpdate"):
            out.add((rtype, "conditional-update"))
    out |= {("", str(i.get("code"))) for i in server_rest(ctx).get("interaction") or []}
    return out


def _cap_claims(ctx: Context) -> str:
    claims = claimed(ctx)
    broken: dict[tuple[str, str], str] = {}
    tried = 0
    for rtype, interaction, status, what in ctx.exercised:
        key = (rtype, interaction)
        if key not in claims:
            continue
        tried += 1
        if not 200 <= status < 300 and key not in broken:
            broken[key] = f"{what} answered {status}"
    if broken:
        raise Failed(
            "; ".join(
                f"the CapabilityStatement says {t + ' ' if t else ''}{i}, the server does not do it ({w})"
                for (t, i), w in broken.items()
            )
        )
    if not tried:
        raise Skipped("no claimed interaction was exercised in this run")
    return f"{tried} requests for claimed interactions, each answered 2xx"


CLAIMS_CHECK = Check(
    "cap-08",
    "capability",
    "what the CapabilityStatement claims, the server does",
    SPEC_R4 + "capabilitystatement.html (rest.resource.interaction)",
    True,
    _cap_claims,
)

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
        "the role's resource types declare the interactions it needs",
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
    Check(
        "cap-09",
        "capability",
        "Subscription topics are named where Subscription is claimed (the KAP topics for the clinic role)",
        "Subscriptions R5 Backport IG components.html (SubscriptionTopic canonicals)",
        False,
        _cap_topics,
    ),
)
