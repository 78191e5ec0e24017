"""`fhir-kap consent evaluate|preview`: consent decisions from the command line.

evaluate exits 0 on permit, 1 on deny, 2 on bad input (OperationOutcome on stderr).

Room: cli/ (layer 4, entry point): may import any room (heavy imports inside the handlers); nothing imports it.
"""

from __future__ import annotations

import argparse
from datetime import UTC, date, datetime
from typing import Any

from ..errors import InputError

__all__ = ["register"]


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "consent", help="consent gate: evaluate a disclosure, preview what a recipient gets"
    )
    sub = p.add_subparsers(dest="consent_command", metavar="ACTION")
    ev = sub.add_parser("evaluate", help="permit or deny one disclosure (exit 0 permit, 1 deny, 2 bad input)")
    _common(ev)
    ev.add_argument("--resource", metavar="FILE", required=True, help="the resource to disclose (JSON)")
    ev.add_argument(
        "--purpose", metavar="CODE", required=True, help="v3-ActReason code (TREAT, COC, ...) or system|code"
    )
    ev.add_argument(
        "--fhir-version",
        metavar="VERSION",
        default=None,
        help="release of the audit output: 4.0.1 (default) or 5.0.0",
    )
    ev.add_argument(
        "--audit-out",
        metavar="FILE",
        default=None,
        help="write the AuditEvent (and Provenance on permit) as a collection Bundle",
    )
    ev.set_defaults(handler=_evaluate)
    pv = sub.add_parser("preview", help="dry run: each candidate resource with its decision and reason")
    _common(pv)
    pv.add_argument(
        "--purpose", metavar="CODE", default=None, help="only this purpose (default: any the consents name)"
    )
    pv.add_argument(
        "--candidates",
        metavar="FILE",
        nargs="+",
        default=None,
        help="resources to check (default: the clinical resources in --context)",
    )
    pv.add_argument("--json", action="store_true", help="JSON output instead of the table")
    pv.set_defaults(handler=_preview)
    p.set_defaults(handler=lambda args, settings: (p.print_help(), 2)[1])


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--context",
        metavar="FILE",
        nargs="+",
        required=True,
        help="Consents, PractitionerRoles, Organizations, ... (JSON, NDJSON or Bundles)",
    )
    p.add_argument("--recipient", metavar="REF", required=True, help="'Practitioner/abc' or 'system|value'")
    p.add_argument("--date", metavar="YYYY-MM-DD", default=None, help="disclosure date (default today)")


def _read(paths: list[str]) -> list[dict[str, Any]]:
    from ..jsonio import iter_documents
    from ._io import open_input

    out: list[dict[str, Any]] = []
    for path in paths:
        with open_input(path) as fh:
            for label, doc in iter_documents(fh, source=path):
                if not isinstance(doc, dict) or not isinstance(doc.get("resourceType"), str):
                    raise InputError(
                        f"{label}: not a FHIR resource (no resourceType)",
                        pointer="/resourceType",
                        expression="resourceType",
                        rule="consent:input",
                    )
                out.append(doc)
    return out


def _date(text: str | None) -> date:
    if text is None:
        return date.today()
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise InputError(
            f"--date must be YYYY-MM-DD (got {text[:20]!r})", rule="consent:date", code="value"
        ) from None


def _evaluate(args: argparse.Namespace, settings: Any) -> int:
    from ..config import Release
    from ..consent import ConsentGate, Recipient, audit_event, provenance
    from ..jsonio import dumps
    from ._io import write_json

    release = Release.parse(args.fhir_version) if args.fhir_version else settings.fhir_version
    recipient = Recipient.parse(args.recipient)
    on = _date(args.date)
    context = _read(args.context)
    resources = _read([args.resource])
    if len(resources) != 1:
        raise InputError("--resource must hold exactly one resource", rule="consent:input")
    resource = resources[0]
    gate = ConsentGate(context)
    decision = gate.decide(resource, recipient, args.purpose, on)
    if args.audit_out:
        recorded = datetime.now(UTC)
        entries = [
            audit_event(decision, resource, recipient, args.purpose, release=release, recorded=recorded)
        ]
        if decision.permit:
            rid = resource.get("id")
            target = f"{resource['resourceType']}/{rid}" if isinstance(rid, str) else resource["resourceType"]
            entries.append(provenance(target, decision, release=release, recorded=recorded))
        bundle = {
            "resourceType": "Bundle",
            "type": "collection",
            "timestamp": recorded.isoformat(timespec="seconds"),
            "entry": [{"resource": e} for e in entries],
        }
        try:
            with open(args.audit_out, "wb") as fh:
                fh.write(dumps(bundle, pretty=True) + b"\n")
        except OSError as exc:
            raise InputError(
                f"cannot write '{args.audit_out}': {exc.strerror}", rule="output:unwritable"
            ) from None
    write_json(decision.to_json())
    return 0 if decision.permit else 1


def _preview(args: argparse.Namespace, settings: Any) -> int:
    from ..consent import ConsentGate, Recipient
    from ._io import write_json

    recipient = Recipient.parse(args.recipient)
    on = _date(args.date)
    gate = ConsentGate(_read(args.context))
    candidates = _read(args.candidates) if args.candidates else list(gate.clinical)
    rows = gate.preview(candidates, recipient, args.purpose, on)
    if args.json:  # the table otherwise, on a terminal or piped alike (as every table command)
        write_json(rows)
        return 0
    width = max([len(r["resource"]) for r in rows] + [8])
    print(f"{'RESOURCE':<{width}}  DECISION  REASON")
    for r in rows:
        reason = r["reasons"][0]["code"] if r["reasons"] else ""
        extra = f" ({', '.join(r['purposes'])})" if r["purposes"] else ""
        print(f"{r['resource']:<{width}}  {r['decision']:<8}  {reason}{extra}")
    return 0
