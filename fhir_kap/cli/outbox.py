"""`fhir-kap outbox ...`: operate the delivery queue (list, show, retry, release, hold, purge, add-context).

The parsers are registered by cli/exchange.py beside `send` and `deliver`; this module holds their
handler and the table and JSON output.

Room: cli/ (layer 4, entry point): may import any room (heavy imports inside the handlers); nothing imports it.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from ..errors import Conflict, InputError, NotFound
from ._io import write_json

if TYPE_CHECKING:  # heavy imports stay inside the handlers
    from ..config import Settings
    from ..storage.outbox import Outbox, OutboxItem

DAY = 86_400.0


def open_outbox(settings: Settings) -> tuple[Outbox, Any]:
    """The outbox and the audit log on the deployment's database."""
    from ..storage.auditlog import AuditLog
    from ..storage.db import Database
    from ..storage.outbox import Outbox

    db = Database(settings.db_url)
    return Outbox(db), AuditLog(db)


def outbox_handler(args: argparse.Namespace, settings: Settings) -> int:
    outbox, _ = open_outbox(settings)
    action = args.outbox_command
    if action == "list":
        items = outbox.list(args.state, endpoint=args.endpoint, limit=args.limit)
        if args.json:
            write_json({"items": [i.summary() for i in items], "counts": outbox.counts()})
        else:
            _table(items)
            print("\n" + "  ".join(f"{k} {v}" for k, v in outbox.counts().items()))
        return 0
    if action == "show":
        item = outbox.get(args.id)
        if item is None:
            raise NotFound(f"Outbox item {args.id} does not exist", rule="outbox:item")
        data = item.summary()
        if args.resource:
            data["resource"] = item.resource
        if args.json:
            write_json(data)
        else:
            width = max(len(k) for k in data)
            for key, value in data.items():
                if key == "resource":
                    from ..jsonio import dumps

                    value = dumps(value, pretty=True).decode()
                print(f"{key:<{width}}  {'-' if value is None else value}")
        return 0
    if action == "retry" and (args.id is None) == (args.state is None):
        raise InputError(
            "outbox retry takes one item ID or --state dead|held (not both)", rule="cli:argument"
        )
    if action == "retry" and args.id is None:
        return _retry_all(args, outbox)
    if action == "retry" and args.endpoint is not None:
        raise InputError("--endpoint goes with --state (bulk retry)", rule="cli:argument")
    if action in ("retry", "release"):
        item = getattr(outbox, action)(args.id)
        return _report(args, item, f"item {item.id}: pending again (attempts {item.attempts})")
    if action == "hold":
        if not outbox.hold(args.id, args.reason):
            current = outbox.get(args.id)
            if current is None:
                raise NotFound(f"Outbox item {args.id} does not exist", rule="outbox:item")
            raise Conflict(
                f"Outbox item {args.id} is {current.state}; only pending items can be held",
                rule="outbox:state",
            )
        held = outbox.get(args.id)
        assert held is not None
        return _report(args, held, f"item {args.id}: held ({args.reason})")
    if action == "purge-delivered":
        if args.older_than < 0:
            raise InputError("--older-than must be zero or more days", rule="cli:argument")
        n = outbox.purge_delivered(outbox.clock() - args.older_than * DAY)
        if args.json:
            write_json({"purged": n})
        else:
            print(f"purged {n} delivered item(s) older than {args.older_than:g} day(s)")
        return 0
    if action == "add-context":
        return _add_context(args, outbox)
    raise InputError(f"unknown outbox action '{action}'", rule="cli:argument")  # argparse prevents it


def _add_context(args: argparse.Namespace, outbox: Outbox) -> int:
    from dataclasses import replace

    from ..jsonio import iter_documents
    from ._io import open_input

    stored = skipped = 0
    found: list[tuple[str, Any]] = []  # read everything first: all of it is stored, or none
    for path in args.files:
        with open_input(path) as fh:
            for label, doc in iter_documents(fh, source=path):
                if isinstance(doc, dict) and doc.get("resourceType") == "Bundle":
                    entries = doc.get("entry") or []
                    if not isinstance(entries, list):
                        raise InputError(
                            f"{label}: Bundle.entry must be a list",
                            pointer="/entry",
                            expression="Bundle.entry",
                            rule="fhir:bundle",
                        )
                    for i, entry in enumerate(entries):
                        found.append(
                            (
                                f"{label}#entry[{i}]",
                                entry.get("resource") if isinstance(entry, dict) else None,
                            )
                        )
                else:
                    found.append((label, doc))
    with outbox.db.transaction():
        for label, res in found:
            try:
                ok = outbox.put_context(res)
            except InputError as exc:
                raise InputError([replace(i, message=f"{label}: {i.message}") for i in exc.issues]) from None
            stored, skipped = (stored + 1, skipped) if ok else (stored, skipped + 1)
    if args.json:
        write_json({"stored": stored, "older_versions_skipped": skipped})
    else:
        print(f"stored {stored} context resource(s); {skipped} older version(s) skipped")
    return 0


def _retry_all(args: argparse.Namespace, outbox: Outbox) -> int:
    """Every item in `args.state` (of `args.endpoint`) back to pending, in one transaction
    (`Outbox.retry_all`); nothing is skipped (the key stays for scripts that read it)."""
    retried = outbox.retry_all(args.state, endpoint=args.endpoint)
    skipped: list[int] = []
    where = f" of endpoint {args.endpoint}" if args.endpoint else ""
    if args.json:
        write_json({"state": args.state, "endpoint": args.endpoint, "retried": retried, "skipped": skipped})
    else:
        print(
            f"{len(retried)} {args.state} item(s){where} pending again"
            + (f", {len(skipped)} skipped (moved meanwhile)" if skipped else "")
        )
    return 0


def _report(args: argparse.Namespace, item: OutboxItem, text: str) -> int:
    if args.json:
        write_json(item.summary())
    else:
        print(text)
    return 0


def _table(items: list[OutboxItem]) -> None:
    from ..storage.outbox import iso

    headers = ("ID", "STATE", "ENDPOINT", "TYPE", "KEY", "TRIES", "WHEN", "NOTE")
    rows = []
    for i in items:
        when = i.delivered_at if i.state == "delivered" else i.next_attempt_at
        note = (
            (f"server id {i.server_id}" if i.server_id else "")
            if i.state == "delivered"
            else ((i.hold_reason if i.state == "held" else i.last_error) or "")
        )
        key = i.idempotency_key.rsplit("/", 1)[-1]
        rows.append(
            (
                str(i.id),
                i.state,
                i.endpoint,
                i.resource_type,
                key,
                str(i.attempts),
                (iso(when) or "")[:19].replace("T", " "),
                _clip(note, 60),
            )
        )
    widths = [max(len(h), *(len(r[n]) for r in rows)) if rows else len(h) for n, h in enumerate(headers)]
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip())
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())


def _clip(text: str, n: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 1] + "…"
