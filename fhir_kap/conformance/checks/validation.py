"""Validation checks (val-01, then one per invalid example): `$validate` accepts a valid KAP
referral and rejects each instance of the invalid-examples manifest
(conformance/checks/, layer 3: orchestration; imports base and the conformance context only).

The checks after val-01 come from `profiles/examples/invalid/manifest.json`, numbered from val-02
in manifest order; each item gives the title, the rule and whether the check is required.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ..context import SPEC_R4, Check, Context, Failed, Response, Skipped, outcome_hint
from .capability import server_rest


def _validate_offered(ctx: Context) -> bool:
    rest = server_rest(ctx)
    ops = list(rest.get("operation") or [])
    for r in rest.get("resource") or []:
        ops += r.get("operation") or []
    return any(
        str(o.get("name", "")).lstrip("$") == "validate" or str(o.get("definition", "")).endswith("/validate")
        for o in ops
    )


def _need_validate(ctx: Context) -> None:
    if not _validate_offered(ctx):
        raise Skipped("the CapabilityStatement does not offer $validate")


def _validate(ctx: Context, resource: dict[str, Any]) -> tuple[Response, list[dict[str, Any]]]:
    resp = ctx.request("POST", f"{resource['resourceType']}/$validate", body=resource)
    doc = resp.json()
    if isinstance(doc, dict) and doc.get("resourceType") == "Parameters":
        doc = next((p.get("resource") for p in doc.get("parameter") or [] if p.get("name") == "return"), None)
    if not isinstance(doc, dict) or doc.get("resourceType") != "OperationOutcome":
        raise Failed(f"$validate answered {resp.status} without an OperationOutcome")
    errors = [i for i in doc.get("issue") or [] if i.get("severity") in ("error", "fatal")]
    return resp, errors


def _v_valid(ctx: Context) -> str:
    _need_validate(ctx)
    example = next(e for e in ctx.examples() if e["resourceType"] == "ServiceRequest")
    resp, errors = _validate(ctx, example)
    if errors or resp.status >= 400:
        raise Failed(
            f"$validate rejected the valid KAP referral example ({resp.status}): {outcome_hint(resp)}"
        )
    return f"valid KAP referral accepted ({resp.status})"


def _v_invalid(item: Mapping[str, Any]) -> Callable[[Context], str]:
    def run(ctx: Context) -> str:
        _need_validate(ctx)
        resp, errors = _validate(ctx, copy.deepcopy(item["resource"]))
        if not errors:
            raise Failed(
                f"$validate accepted {item['file']} ({item['why']}) with {resp.status} and no error issue"
            )
        return f"rejected with {len(errors)} error issue(s){outcome_hint(resp)}"

    return run


def checks(invalid: Sequence[Mapping[str, Any]]) -> list[Check]:
    """val-01, then one check per item of the invalid-examples manifest (val-02, val-03, ...)."""
    out = [
        Check(
            "val-01",
            "validation",
            "$validate accepts a valid KAP example",
            SPEC_R4 + "resource-operation-validate.html",
            True,
            _v_valid,
        ),
    ]
    for n, item in enumerate(invalid, start=2):
        out.append(
            Check(
                f"val-{n:02d}",
                "validation",
                f"$validate rejects {item['title']}",
                item["rule"],
                bool(item.get("required", True)),
                _v_invalid(item),
            )
        )
    return out
