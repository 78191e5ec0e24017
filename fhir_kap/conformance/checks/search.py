"""Search checks (srch-01 … srch-08): the search parameters KAP exchange relies on, and paging
(conformance/checks/, layer 3: orchestration; imports base and the conformance context only).

The search data (the KAP journey plus Procedures of varied status and category) is created once
per run by the first search check and shared by the others through `Context.state`.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any

from ...config import CANONICAL
from ..context import SPEC_R4, Check, Context, Failed, Skipped, identifier_param, outcome_hint, query_text


def _search_set(ctx: Context) -> dict[str, Any]:
    """Create (once) the search data: the journey plus 5 Procedures of varied status/category."""
    if "search" in ctx.state:
        if ctx.state["search"] is None:
            raise Skipped("the search data could not be created")
        return ctx.state["search"]
    ctx.state["search"] = None
    journey = ctx.create_journey("search")
    idmap = ctx.state["idmaps"]["search"]
    proc_key = next(k for k in journey if k.startswith("Procedure/"))
    template = journey[proc_key]["sent"]
    kinds = [
        ("completed", "dosing"),
        ("completed", "preparation"),
        ("completed", "integration"),
        ("in-progress", "dosing"),
    ]
    procs = [v["stored"] for k, v in journey.items() if k.startswith("Procedure/")]
    system = f"{CANONICAL}/CodeSystem/kap-session-kind"
    for n, (status, kind) in enumerate(kinds):
        res = copy.deepcopy(template)
        res["identifier"] = [i for i in res.get("identifier", []) if i.get("system") != ctx.run_system]
        res["identifier"] = [{**i, "value": f"{i.get('value')}-{n}"} for i in res["identifier"]]
        ctx.tag(res, f"search-proc-{n}")
        res["status"] = status
        concept = {"coding": [{"system": system, "code": kind}]}
        res["category"] = [concept] if isinstance(res.get("category"), list) else concept
        if kind != "dosing":  # a dose and its monitoring belong to dosing sessions only (a KAP rule)
            res["extension"] = [
                e
                for e in res.get("extension", [])
                if not str(e.get("url", "")).endswith(("/kap-dose", "/kap-monitoring"))
            ]
            if not res["extension"]:
                del res["extension"]
        resp, stored = ctx.create(res)
        if resp.status not in (200, 201) or not stored:
            raise Failed(f"creating search Procedure {n} answered {resp.status}{outcome_hint(resp)}")
        procs.append(stored)
    patient = next(v for k, v in idmap.items() if k.startswith("Patient/"))
    data = {
        "journey": journey,
        "idmap": idmap,
        "patient": patient,
        "procedures": [p for p in procs if _refs(p, "subject") == [patient]],
        "all_procedures": procs,
        "communications": [v["stored"] for k, v in journey.items() if k.startswith("Communication/")],
        "referral": next(v for k, v in idmap.items() if k.startswith("ServiceRequest/")),
    }
    ctx.state["search"] = data
    return data


def _refs(resource: Mapping[str, Any], element: str) -> list[str]:
    value = resource.get(element)
    items = value if isinstance(value, list) else [value] if value else []
    return [str(i.get("reference")) for i in items if isinstance(i, dict) and i.get("reference")]


def _ids(resources: Iterable[Mapping[str, Any]]) -> list[str]:
    return sorted(str(r.get("id")) for r in resources)


def _expect(ctx: Context, rtype: str, params: dict[str, str], expected: Iterable[Mapping[str, Any]]) -> str:
    found, _ = ctx.search_all(rtype, params)
    want = _ids(expected)
    got = _ids(found)
    if got != want:
        missing = sorted(set(want) - set(got))
        extra = sorted(set(got) - set(want))
        raise Failed(
            f"{rtype}?{query_text(params)} found {len(got)} (expected {len(want)}); "
            f"missing {missing or '-'}, unexpected {extra or '-'}"
        )
    return f"{rtype}?{query_text(params)} → {len(got)} as expected"


def _status_of(p: Mapping[str, Any]) -> str:
    return str(p.get("status"))


def _has_category(p: Mapping[str, Any], system: str, code: str) -> bool:
    cat = p.get("category")
    concepts = cat if isinstance(cat, list) else [cat] if isinstance(cat, dict) else []
    return any(
        c.get("system") == system and c.get("code") == code
        for concept in concepts
        if isinstance(concept, dict)
        for c in concept.get("coding") or []
    )


def _s_patient(ctx: Context) -> str:
    data = _search_set(ctx)
    return _expect(ctx, "Procedure", {"patient": data["patient"]}, data["procedures"])


def _s_identifier(ctx: Context) -> str:
    data = _search_set(ctx)
    sr = next(v for k, v in data["journey"].items() if k.startswith("ServiceRequest/"))
    value = sr["sent"]["identifier"][-1]["value"]
    return _expect(ctx, "ServiceRequest", identifier_param(ctx.run_system, value), [sr["stored"]])


def _s_status(ctx: Context) -> str:
    data = _search_set(ctx)
    want = [p for p in data["procedures"] if _status_of(p) == "in-progress"]
    return _expect(ctx, "Procedure", {"patient": data["patient"], "status": "in-progress"}, want)


def _s_category(ctx: Context) -> str:
    data = _search_set(ctx)
    system = f"{CANONICAL}/CodeSystem/kap-session-kind"
    want = [p for p in data["procedures"] if _has_category(p, system, "dosing")]
    return _expect(ctx, "Procedure", {"patient": data["patient"], "category": f"{system}|dosing"}, want)


def _s_based_on(ctx: Context) -> str:
    data = _search_set(ctx)
    want = [p for p in data["all_procedures"] if data["referral"] in _refs(p, "basedOn")]
    return _expect(ctx, "Procedure", {"based-on": data["referral"]}, want)


def _s_recipient(ctx: Context) -> str:
    data = _search_set(ctx)
    recipients = [r for c in data["communications"] for r in _refs(c, "recipient")]
    if not recipients:
        raise Skipped("the Communication examples have no recipient reference")
    want = [
        c
        for c in data["communications"]
        if recipients[0] in _refs(c, "recipient") and _refs(c, "subject") == [data["patient"]]
    ]
    return _expect(ctx, "Communication", {"recipient": recipients[0], "patient": data["patient"]}, want)


def _s_last_updated(ctx: Context) -> str:
    data = _search_set(ctx)
    stamps = [str((p.get("meta") or {}).get("lastUpdated") or "") for p in data["procedures"]]
    if not all(stamps):
        raise Failed("created Procedures carry no meta.lastUpdated")
    first = min(stamps, key=lambda s: datetime.fromisoformat(s.replace("Z", "+00:00")))
    a = _expect(
        ctx, "Procedure", {"patient": data["patient"], "_lastUpdated": f"ge{first}"}, data["procedures"]
    )
    _expect(ctx, "Procedure", {"patient": data["patient"], "_lastUpdated": f"lt{first}"}, [])
    return f"{a}; lt{first} → 0"


def _s_paging(ctx: Context) -> str:
    data = _search_set(ctx)
    count = 2
    found, pages = ctx.search_all("Procedure", {"patient": data["patient"], "_count": str(count)})
    if any(n > count for n in pages):
        raise Failed(f"_count={count} ignored: page sizes {pages}")
    got = [str(r.get("id")) for r in found]
    dupes = sorted({i for i in got if got.count(i) > 1})
    want = _ids(data["procedures"])
    if dupes or sorted(got) != want:
        raise Failed(
            f"paging returned {len(got)} items over {len(pages)} pages; duplicates {dupes or '-'}, "
            f"missing {sorted(set(want) - set(got)) or '-'}"
        )
    return f"{len(want)} items over {len(pages)} pages of ≤{count} ({pages}), each exactly once"


CHECKS = (
    Check(
        "srch-01",
        "search",
        "search by patient",
        SPEC_R4 + "procedure.html#search (patient)",
        True,
        _s_patient,
    ),
    Check("srch-02", "search", "search by identifier", SPEC_R4 + "search.html#token", True, _s_identifier),
    Check(
        "srch-03", "search", "search by status", SPEC_R4 + "procedure.html#search (status)", True, _s_status
    ),
    Check(
        "srch-04",
        "search",
        "search by category (system|code)",
        SPEC_R4 + "search.html#token",
        True,
        _s_category,
    ),
    Check(
        "srch-05",
        "search",
        "search by based-on",
        SPEC_R4 + "procedure.html#search (based-on)",
        True,
        _s_based_on,
    ),
    Check(
        "srch-06",
        "search",
        "search by recipient",
        SPEC_R4 + "communication.html#search (recipient)",
        True,
        _s_recipient,
    ),
    Check(
        "srch-07",
        "search",
        "search by _lastUpdated",
        SPEC_R4 + "search.html#lastUpdated",
        True,
        _s_last_updated,
    ),
    Check("srch-08", "search", "_count paging to the end", SPEC_R4 + "http.html#paging", True, _s_paging),
)
