"""Partner checks (rcv-01 … rcv-03, ref-01): what a referring practice's EHR must do with what
the adapter sends it, one KAP Communication at a time, and with the referrals it holds
(conformance/checks/, layer 3: orchestration; imports base and the conformance context only).

    rcv-01  a KAP Communication (the first Communication example) is created
    rcv-02  the same Communication sent again as a conditional create (If-None-Exist on its
            identifier, as the delivery worker sends it) leaves exactly one resource
    rcv-03  the Communication reads back without losing data
    ref-01  a referral (ServiceRequest) and its Patient are created, found by identifier and by
            patient, and read back

The Communication keeps the example's references as the adapter sends them (not rewritten to
resources on the server): a server that insists on resolving them fails rcv-01 with its reason.
"""

from __future__ import annotations

from typing import Any

from ..context import SPEC_R4, Check, Context, Failed, Skipped, identifier_param, outcome_hint
from ..masking import compare_resources


def _communication(ctx: Context) -> dict[str, Any]:
    example = next((e for e in ctx.examples() if e["resourceType"] == "Communication"), None)
    if example is None:
        raise Skipped("no Communication among the KAP examples")
    return ctx.tag(example, "rcv-communication")


def _need(ctx: Context) -> dict[str, Any]:
    item = ctx.state.get("rcv")
    if not item:
        raise Skipped("the Communication was not created (rcv-01 failed)")
    return dict(item)


def _rcv_create(ctx: Context) -> str:
    sent = _communication(ctx)
    resp, stored = ctx.create(sent)
    if resp.status not in (200, 201) or not stored or not stored.get("id"):
        raise Failed(f"creating a KAP Communication answered {resp.status}{outcome_hint(resp)}")
    ctx.state["rcv"] = {"sent": sent, "stored": stored}
    return f"created Communication/{stored['id']} ({resp.status})"


def _rcv_conditional(ctx: Context) -> str:
    item = _need(ctx)
    value = item["sent"]["identifier"][-1]["value"]
    again = _communication(ctx)
    header = {"If-None-Exist": f"identifier={ctx.run_system}|{value}"}
    resp, _ = ctx.create(again, headers=header)
    if resp.status not in (200, 201):
        raise Failed(f"the conditional create answered {resp.status}{outcome_hint(resp)}")
    found, _ = ctx.search_all("Communication", identifier_param(ctx.run_system, value))
    if len(found) != 1:
        raise Failed(
            f"the Communication sent twice (second time with If-None-Exist) left {len(found)} resources"
        )
    if resp.status != 200:
        return f"one resource kept, but the conditional create answered {resp.status} (200 expected)"
    return f"conditional create answered {resp.status}; exactly one Communication"


def _rcv_read(ctx: Context) -> str:
    item = _need(ctx)
    path = f"Communication/{item['stored']['id']}"
    resp = ctx.request("GET", path)
    ctx.exercise("Communication", "read", resp, f"GET {path}")
    back = resp.json()
    if resp.status != 200 or not isinstance(back, dict):
        raise Failed(f"read {path} answered {resp.status}{outcome_hint(resp)}")
    lost, _, _ = compare_resources(item["sent"], back)
    if lost:
        raise Failed(f"the server dropped data: {', '.join(lost[:8])}")
    return f"{path} read back without loss"


def _ref_referral(ctx: Context) -> str:
    examples = ctx.examples()
    patient = next((e for e in examples if e["resourceType"] == "Patient"), None)
    referral = next((e for e in examples if e["resourceType"] == "ServiceRequest"), None)
    if patient is None or referral is None:
        raise Skipped("no Patient or ServiceRequest among the KAP examples")
    resp, stored_patient = ctx.create(ctx.tag(patient, "ref-patient"))
    if resp.status not in (200, 201) or not stored_patient or not stored_patient.get("id"):
        raise Failed(f"creating the referral's Patient answered {resp.status}{outcome_hint(resp)}")
    pref = f"Patient/{stored_patient['id']}"
    referral = ctx.tag(referral, "ref-referral")
    referral["subject"] = {"reference": pref}
    resp, stored = ctx.create(referral)
    if resp.status not in (200, 201) or not stored or not stored.get("id"):
        raise Failed(f"creating the referral answered {resp.status}{outcome_hint(resp)}")
    by_id, _ = ctx.search_all("ServiceRequest", identifier_param(ctx.run_system, "ref-referral"))
    by_patient, _ = ctx.search_all("ServiceRequest", {"patient": pref})
    for what, found in (("identifier", by_id), ("patient", by_patient)):
        if [r.get("id") for r in found] != [stored["id"]]:
            raise Failed(
                f"search ServiceRequest by {what} found {[r.get('id') for r in found]}, expected [{stored['id']}]"
            )
    path = f"ServiceRequest/{stored['id']}"
    back = ctx.request("GET", path)
    ctx.exercise("ServiceRequest", "read", back, f"GET {path}")
    if back.status != 200:
        raise Failed(f"read {path} answered {back.status}")
    lost, _, _ = compare_resources(referral, back.json() or {})
    if lost:
        raise Failed(f"the server dropped data of the referral: {', '.join(lost[:8])}")
    return f"{path} (subject {pref}) found by identifier and by patient, read back without loss"


CHECKS = (
    Check(
        "rcv-01",
        "partner",
        "a KAP Communication is created",
        SPEC_R4 + "http.html#create",
        True,
        _rcv_create,
    ),
    Check(
        "rcv-02",
        "partner",
        "the same Communication as a conditional create → one resource",
        SPEC_R4 + "http.html#ccreate",
        True,
        _rcv_conditional,
    ),
    Check(
        "rcv-03",
        "partner",
        "the Communication reads back without loss",
        SPEC_R4 + "http.html#read",
        True,
        _rcv_read,
    ),
    Check(
        "ref-01",
        "partner",
        "a referral and its Patient are created, found and read back",
        SPEC_R4 + "servicerequest.html#search",
        True,
        _ref_referral,
    ),
)
