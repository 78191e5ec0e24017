"""Round-trip checks (rt-01 … rt-05): the KAP examples are created, read back without loss, found
by identifier, updated with If-Match (and by a conditional update where the CapabilityStatement
claims it) and deleted where it claims delete (a server that keeps what partners wrote, as the
fhir-kap bridge does, skips rt-05: its clean-up then reports what the run left)
(conformance/checks/, layer 3: orchestration; imports base and the conformance context only).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from ...config import CANONICAL
from ..context import (
    SPEC_R4,
    Check,
    Context,
    Failed,
    Response,
    Skipped,
    identifier_param,
    outcome_hint,
)
from ..masking import compare_resources
from .capability import claimed


def _rt_create(ctx: Context) -> str:
    journey = ctx.create_journey("rt")
    ctx.state["rt"] = journey
    return f"{len(journey)} KAP examples ({ctx.release.short}) created: {', '.join(journey)}"


def _need_rt(ctx: Context) -> dict[str, dict[str, Any]]:
    journey = ctx.state.get("rt")
    if not journey:
        raise Skipped("the examples were not created (rt-01 failed)")
    return journey


def _rt_read(ctx: Context) -> str:
    journey = _need_rt(ctx)
    lost_all, notes = [], []
    for key, item in journey.items():
        stored = item["stored"]
        resp = ctx.request("GET", f"{stored['resourceType']}/{stored['id']}")
        ctx.exercise(stored["resourceType"], "read", resp, f"GET {stored['resourceType']}/{stored['id']}")
        back = resp.json()
        if resp.status != 200 or not isinstance(back, dict):
            raise Failed(f"read {key} answered {resp.status}")
        item["read"] = back
        lost, changed, added = compare_resources(item["sent"], back)
        if lost:
            lost_all.append(f"{key} lost {', '.join(lost[:6])}")
        if changed or added:
            notes.append(
                f"{key}: changed {', '.join(changed[:4]) or '-'}; added {', '.join(added[:4]) or '-'}"
            )
    if lost_all:
        raise Failed("the server dropped data: " + "; ".join(lost_all))
    return "all read back without loss" + (" (server changes: " + "; ".join(notes) + ")" if notes else "")


def _rt_identifier(ctx: Context) -> str:
    journey = _need_rt(ctx)
    for key, item in journey.items():
        value = item["sent"]["identifier"][-1]["value"]
        found, _ = ctx.search_all(item["stored"]["resourceType"], identifier_param(ctx.run_system, value))
        ids = [r.get("id") for r in found]
        if ids != [item["stored"]["id"]]:
            raise Failed(f"search by identifier for {key} found {ids}, expected [{item['stored']['id']}]")
    return f"each of {len(journey)} found exactly once by identifier"


def _version(resource: Mapping[str, Any] | None, resp: Response | None = None) -> str | None:
    v = ((resource or {}).get("meta") or {}).get("versionId")
    if not v and resp is not None:
        etag = resp.headers.get("ETag") or resp.headers.get("etag") or ""
        v = etag.replace("W/", "").strip('"') or None
    return v


def _rt_update(ctx: Context) -> str:
    journey = _need_rt(ctx)
    key = next((k for k in journey if k.startswith("ServiceRequest/")), next(iter(journey)))
    item = journey[key]
    current = item.get("read") or item["stored"]
    rtype, rid = current["resourceType"], current["id"]
    version = _version(current)
    if not version:
        raise Failed(f"{key} carries no meta.versionId, so If-Match cannot be used")
    changed = copy.deepcopy(current)
    changed.setdefault("extension", []).append(
        {"url": f"{CANONICAL}/StructureDefinition/kap-goal", "valueString": "check update"}
    )
    resp = ctx.request("PUT", f"{rtype}/{rid}", body=changed, headers={"If-Match": f'W/"{version}"'})
    ctx.exercise(rtype, "update", resp, f"PUT {rtype}/{rid}")
    if resp.status != 200:
        raise Failed(
            f'update with the current version (If-Match W/"{version}") answered {resp.status}'
            f"{outcome_hint(resp)}"
        )
    new_version = _version(resp.json(), resp)
    if new_version == version:
        raise Failed(f"update answered 200 but the version stayed {version}")
    stale = ctx.request("PUT", f"{rtype}/{rid}", body=changed, headers={"If-Match": f'W/"{version}"'})
    if stale.status != 412:
        raise Failed(f"update with the stale version {version} answered {stale.status}, expected 412")
    return f"If-Match current → 200 (version {version} → {new_version}); stale → 412"


def _rt_conditional_update(ctx: Context) -> str:
    journey = _need_rt(ctx)
    key = next((k for k in journey if k.startswith("ServiceRequest/")), None)
    if key is None:
        raise Skipped("no ServiceRequest among the examples")
    if ("ServiceRequest", "conditional-update") not in claimed(ctx):
        raise Skipped("the CapabilityStatement does not claim conditionalUpdate for ServiceRequest")
    item = journey[key]
    rid = item["stored"]["id"]
    value = item["sent"]["identifier"][-1]["value"]
    got = ctx.request("GET", f"ServiceRequest/{rid}")
    current = got.json() if got.status == 200 and isinstance(got.json(), dict) else item["stored"]
    changed = {k: v for k, v in copy.deepcopy(current).items() if k not in ("id", "meta")}
    changed["meta"] = {
        k: v for k, v in (current.get("meta") or {}).items() if k in ("tag", "profile", "security")
    }
    changed.setdefault("note", []).append({"text": "check conditional update"})
    resp = ctx.request("PUT", "ServiceRequest", body=changed, params=identifier_param(ctx.run_system, value))
    ctx.exercise("ServiceRequest", "conditional-update", resp, "PUT ServiceRequest?identifier=…")
    if resp.status != 200:
        raise Failed(f"conditional update of the one match answered {resp.status}{outcome_hint(resp)}")
    doc = resp.json()
    if isinstance(doc, dict) and doc.get("id") not in (None, rid):
        raise Failed(f"conditional update answered {doc.get('id')}, not the one match {rid}")
    found, _ = ctx.search_all("ServiceRequest", identifier_param(ctx.run_system, value))
    if [r.get("id") for r in found] != [rid]:
        raise Failed(f"after the conditional update, the identifier finds {[r.get('id') for r in found]}")
    return f"PUT ServiceRequest?identifier=… updated {rid} (version {_version(doc, resp)})"


def _rt_delete(ctx: Context) -> str:
    journey = _need_rt(ctx)
    claims = claimed(ctx)
    types = list(dict.fromkeys(item["stored"]["resourceType"] for item in journey.values()))
    unclaimed = [t for t in types if (t, "delete") not in claims]
    if len(unclaimed) == len(types):
        raise Skipped(
            f"the CapabilityStatement claims delete for none of {', '.join(types)}: nothing deleted "
            "(what the run wrote is listed under clean-up)"
        )
    done = []
    for key in reversed(list(journey)):
        stored = journey[key]["stored"]
        if stored["resourceType"] in unclaimed:
            continue
        path = f"{stored['resourceType']}/{stored['id']}"
        resp = ctx.request("DELETE", path)
        ctx.exercise(stored["resourceType"], "delete", resp, f"DELETE {path}")
        if resp.status not in (200, 202, 204):
            raise Failed(f"delete {key} answered {resp.status}{outcome_hint(resp)}")
        after = ctx.request("GET", path)
        if after.status not in (404, 410):
            raise Failed(f"read after delete of {key} answered {after.status}, expected 404 or 410")
        done.append(after.status)
        if (stored["resourceType"], stored["id"]) in ctx.created:
            ctx.created.remove((stored["resourceType"], stored["id"]))
    kept = f" ({', '.join(unclaimed)}: no delete claimed, left)" if unclaimed else ""
    return f"{len(done)} deleted; reads then answered {sorted(set(done))}{kept}"


CHECKS = (
    Check(
        "rt-01", "round-trip", "each KAP example is created", SPEC_R4 + "http.html#create", True, _rt_create
    ),
    Check("rt-02", "round-trip", "read back without losing data", SPEC_R4 + "http.html#read", True, _rt_read),
    Check(
        "rt-03",
        "round-trip",
        "found by identifier",
        SPEC_R4 + "search.html#token (identifier)",
        True,
        _rt_identifier,
    ),
    Check(
        "rt-04",
        "round-trip",
        "update with If-Match; stale version → 412",
        SPEC_R4 + "http.html#concurrency",
        True,
        _rt_update,
    ),
    Check(
        "rt-05",
        "round-trip",
        "delete (where claimed), then read → 404/410",
        SPEC_R4 + "http.html#delete",
        True,
        _rt_delete,
    ),
    Check(
        "rt-06",
        "round-trip",
        "conditional update by identifier (where claimed)",
        SPEC_R4 + "http.html#cond-update",
        False,
        _rt_conditional_update,
    ),
)
