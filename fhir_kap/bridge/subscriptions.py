"""Topic-based Subscriptions over /fhir (R4 backport and R5): Subscription create, read, update,
delete and search, `$status`, `$events`, and the SubscriptionTopics (R5) (issue 15). The rules
(topics, shapes, filters, notification Bundles, the event sink and the sender's channel) are in
exchange/subscriptions.py; this module is their HTTP face.

A partner sees only its own Subscriptions: another partner's is answered exactly like one that
does not exist (404), and a search never lists it. Its endpoint must be at an origin the
operator registered for the partner (422 `subscription:endpoint-not-registered` otherwise),
read afresh on each create and update.

Room: bridge/ (layer 4, entry point; the only Flask user): may import any room; nothing imports it but cli/.
"""

from __future__ import annotations

import time
from typing import Any

from flask import Flask, Response, request
from werkzeug.exceptions import MethodNotAllowed

from .. import jsonio
from ..config import Release
from ..errors import InputError, NotFound, PreconditionFailed, ProfileError
from ..exchange.subscriptions import (
    BACKPORT,
    CONTENTS,
    EVENT_PREFIX,
    MAX_EVENTS,
    EventSink,
    Spec,
    SubscriptionChannel,
    check_registered,
    notification_bundle,
    parse_subscription,
    shown,
    spec_of,
    status_resource,
    topics,
)
from ..fhir.digits import ascii_digits
from ..fhir.identifiers import new_id
from ..storage.partners import Partner
from ..storage.subscriptions import SubscriptionRow, Subscriptions
from ..storage.webhooks import WebhookJobs
from .app import current_partner, fhir_response, services
from .fhir import _base, _check_id, _not_found, _resource_body, _scope, if_match_version

__all__ = ["capability", "event_sink", "register"]

_SEARCH = {"_id", "status", "_count", "_format"}
MAX_PER_PARTNER = 50  # Subscriptions a partner may hold at once (each costs a query per matching write)
_OPERATIONS = {
    Release.R4: (
        (
            "status",
            "http://hl7.org/fhir/uv/subscriptions-backport/OperationDefinition/backport-subscription-status",
        ),
        (
            "events",
            "http://hl7.org/fhir/uv/subscriptions-backport/OperationDefinition/backport-subscription-events",
        ),
    ),
    Release.R5: (
        ("status", "http://hl7.org/fhir/OperationDefinition/Subscription-status"),
        ("events", "http://hl7.org/fhir/OperationDefinition/Subscription-events"),
    ),
}
TOPIC_CANONICAL_EXT = BACKPORT + "capabilitystatement-subscriptiontopic-canonical"


def event_sink(**deps: Any) -> EventSink:
    """The Inbound event sink: numbers Subscription events in each write's transaction and queues
    their notifications on the notifier's job table (none are queued without a notifier: the
    events are still numbered, for `$events`). Registers the Subscription channel with the notifier.
    `deps`: db, store, partners, access, release, notifier."""
    db, store, partners, access = deps["db"], deps["store"], deps["partners"], deps["access"]
    notifier = deps.get("notifier")
    subs = Subscriptions(db)
    jobs = (
        notifier.webhook_jobs
        if notifier is not None and notifier.webhook_jobs is not None
        else WebhookJobs(db)
    )
    channel = SubscriptionChannel(subs, store, partners, access.can_read, deps["release"], jobs)
    if notifier is not None:
        notifier.add_channel(channel)
    return EventSink(
        subs,
        store,
        partners,
        access.can_read,
        jobs if notifier is not None else None,
        channel=channel,
        wake=notifier.wake if notifier is not None else None,
        read_resolving=access.can_read,
    )


def capability(release: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(CapabilityStatement.rest.resource entries, CapabilityStatement extensions) for Subscriptions:
    R4 advertises the topics with the backport IG's `capabilitystatement-subscriptiontopic-canonical`
    extension on the Subscription entry; R5 also serves the SubscriptionTopic resources."""
    release = Release.parse(release)
    entry: dict[str, Any] = {"type": "Subscription"}
    if release is Release.R4:
        entry["extension"] = [{"url": TOPIC_CANONICAL_EXT, "valueCanonical": url} for url in topics()]
        entry["supportedProfile"] = [BACKPORT + "backport-subscription"]
    entry["interaction"] = [{"code": c} for c in ("create", "read", "update", "delete", "search-type")]
    entry["versioning"] = "versioned-update"
    entry["updateCreate"] = False
    entry["conditionalCreate"] = False
    entry["conditionalUpdate"] = False
    entry["conditionalDelete"] = "not-supported"
    entry["searchParam"] = [{"name": "_id", "type": "token"}, {"name": "status", "type": "token"}]
    entry["operation"] = [{"name": n, "definition": d} for n, d in _OPERATIONS[release]]
    resources = [entry]
    if release is Release.R5:
        resources.insert(
            0,
            {
                "type": "SubscriptionTopic",
                "interaction": [{"code": "read"}, {"code": "search-type"}],
                "searchParam": [{"name": "_id", "type": "token"}, {"name": "url", "type": "uri"}],
            },
        )
    return resources, []


def _svc() -> tuple[Any, EventSink, Subscriptions]:
    svc = services()
    sink = svc.events
    return svc, sink, sink.subs


def _partner(interaction: str) -> Partner:
    partner = current_partner()
    _scope(partner, "Subscription", interaction)
    return partner


def _own(partner: Partner, sid: str) -> SubscriptionRow:
    _check_id("Subscription", sid)
    row = _svc()[2].get(sid, partner=partner.name)
    if row is None:  # the same answer whether it does not exist, was deleted, or is another's
        raise _not_found("Subscription", sid)
    return row


def _headers(row: SubscriptionRow, *, location: bool = False) -> dict[str, str]:
    out = {"ETag": f'W/"{row.version}"'}
    if location:
        out["Location"] = f"{_base()}/Subscription/{row.id}"  # no vread of Subscriptions: no _history
    return out


def _checked_body(release: Release, partner: Partner, sid: str | None = None) -> tuple[dict[str, Any], Spec]:
    """(what is kept of the Subscription sent, its Spec); 4xx naming the field otherwise (an
    endpoint at an origin not registered for `partner`: 422). On an update (`sid`) the body's
    id must be the URL's."""
    body = _resource_body("Subscription")
    jsonio.check_depth(body)  # stored, then wrapped in searchset and notification Bundles
    if sid is not None and body.get("id") != sid:
        raise InputError(
            "The body's id must be the id in the URL",
            pointer="/id",
            expression="Subscription.id",
            rule="http:id-mismatch",
        )
    errors = [i for i in services().validator.validate(body, profile=False) if i.is_error]
    if errors:
        raise ProfileError(errors)
    spec = parse_subscription(body, release)
    # The registration as it is now (not the 5 s authentication cache): a removal counts at once.
    registered = services().partners.get(partner.name) or partner
    check_registered(spec, registered, release)
    kept = {k: v for k, v in body.items() if k not in ("id", "status", "meta", "text")}
    profile = (body.get("meta") or {}).get("profile") if isinstance(body.get("meta"), dict) else None
    if profile:
        kept["meta"] = {"profile": profile}
    return kept, spec


def _created(subs: Subscriptions, partner: Partner, spec: Spec, kept: dict[str, Any]) -> SubscriptionRow:
    row = subs.create(
        new_id(),
        partner.name,
        spec.topic,
        spec.status,
        kept,
        base=_base(),
        heartbeat_period=spec.heartbeat_period,
        end_at=spec.end_at,
        now=time.time(),
        at_most=MAX_PER_PARTNER,
    )
    if row is None:
        raise InputError(
            f"A partner holds at most {MAX_PER_PARTNER} Subscriptions; delete one first",
            expression="Subscription",
            rule="subscription:limit",
            code="too-costly",
        )
    _queue_handshake(row)
    return row


def _queue_handshake(row: SubscriptionRow) -> None:
    """Queue the handshake of a `requested` Subscription, in the caller's transaction (the
    caller wakes the sender once that has committed)."""
    sink = _svc()[1]
    if sink.wake is None or sink.jobs is None or row.status != "requested":
        return
    sink.jobs.enqueue(
        row.partner, EVENT_PREFIX + "handshake", f"Subscription/{row.id}", str(row.version), now=time.time()
    )


def _bundle_of(entries: list[dict[str, Any]], self_url: str) -> dict[str, Any]:
    return {
        "resourceType": "Bundle",
        "type": "searchset",
        "total": len(entries),
        "link": [{"relation": "self", "url": self_url}],
        "entry": entries,
    }


def register(app: Flask) -> None:
    @app.post("/fhir/Subscription")
    def subscription_create() -> Response:
        partner = _partner("write")
        svc, sink, subs = _svc()
        kept, spec = _checked_body(svc.release, partner)
        # The Subscription and its handshake job commit together; the limit is counted inside
        # that write transaction (`at_most`), so a burst of creates cannot pass it.
        with subs.db.transaction():
            row = _created(subs, partner, spec, kept)
        if sink.wake is not None and row.status == "requested":
            sink.wake()
        return fhir_response(shown(row), 201, _headers(row, location=True))

    @app.get("/fhir/Subscription")
    def subscription_search() -> Response:
        partner = _partner("search")
        unknown = sorted(set(request.args) - _SEARCH)
        if unknown:
            raise InputError(
                f"Search parameter '{unknown[0][:40]}' is not supported on Subscription; supported: _id, status",
                expression=unknown[0][:40],
                rule="search:parameter",
                code="not-supported",
            )
        status = request.args.get("status")
        ids = {i for v in request.args.getlist("_id") for i in v.split(",") if i}
        rows = [r for r in _svc()[2].of_partner(partner.name, status=status) if not ids or r.id in ids]
        base = _base()
        entries = [
            {"fullUrl": f"{base}/Subscription/{r.id}", "resource": shown(r), "search": {"mode": "match"}}
            for r in rows
        ]
        return fhir_response(_bundle_of(entries, f"{base}/Subscription"))

    @app.get("/fhir/Subscription/<sid>")
    def subscription_read(sid: str) -> Response:
        row = _own(_partner("read"), sid)
        return fhir_response(shown(row), 200, _headers(row))

    @app.put("/fhir/Subscription/<sid>")
    def subscription_update(sid: str) -> Response:
        partner = _partner("write")
        row = _own(partner, sid)
        svc, sink, subs = _svc()
        kept, spec = _checked_body(svc.release, partner, sid)
        wanted = if_match_version()  # optional here (version-aware when given); unreadable: 400
        if wanted is not None and wanted != row.version:
            raise PreconditionFailed(
                f"Subscription/{sid} is at version {row.version}", rule="http:if-match", code="conflict"
            )
        with subs.db.transaction():  # the new version and its handshake job commit together
            updated = subs.replace(
                row,
                spec.topic,
                spec.status,
                kept,
                heartbeat_period=spec.heartbeat_period,
                end_at=spec.end_at,
                now=time.time(),
            )
            if updated is None:
                raise PreconditionFailed(
                    f"Subscription/{sid} changed meanwhile; read it again", rule="http:if-match"
                )
            _queue_handshake(updated)
        if sink.wake is not None and updated.status == "requested":
            sink.wake()
        return fhir_response(shown(updated), 200, _headers(updated, location=True))

    @app.delete("/fhir/Subscription/<sid>")
    def subscription_delete(sid: str) -> Response:
        partner = _partner("write")
        _own(partner, sid)
        _svc()[2].delete(sid, partner.name)
        return fhir_response(None, 204)

    @app.route("/fhir/Subscription/<sid>", methods=["POST", "PATCH"])
    def subscription_not_allowed(sid: str) -> Response:
        raise MethodNotAllowed(valid_methods=["GET", "HEAD", "PUT", "DELETE"])

    @app.route("/fhir/Subscription/$status", methods=["GET", "POST"])
    def subscription_status_type() -> Response:
        partner = _partner("read")
        ids = {i for v in request.args.getlist("id") for i in v.split(",") if i}
        states = {s for v in request.args.getlist("status") for s in v.split(",") if s}
        rows = [
            r
            for r in _svc()[2].of_partner(partner.name)
            if (not ids or r.id in ids) and (not states or r.status in states)
        ]
        return _status_bundle(rows, f"{_base()}/Subscription/$status")

    @app.route("/fhir/Subscription/<sid>/$status", methods=["GET", "POST"])
    def subscription_status_instance(sid: str) -> Response:
        row = _own(_partner("read"), sid)
        return _status_bundle([row], f"{_base()}/Subscription/{sid}/$status")

    @app.route("/fhir/Subscription/<sid>/$events", methods=["GET", "POST"])
    def subscription_events(sid: str) -> Response:
        partner = _partner("read")
        row = _own(partner, sid)
        svc, sink, subs = _svc()
        args = _operation_args()
        since = _number(args.get("eventsSinceNumber"), "eventsSinceNumber")
        until = _number(args.get("eventsUntilNumber"), "eventsUntilNumber")
        last = row.events if until is None else min(until, row.events)
        first = max(1, last - MAX_EVENTS + 1) if since is None else max(1, since)
        content = args.get("content") or _spec_content(row)
        if content not in CONTENTS:
            raise InputError(
                f"content is one of {', '.join(CONTENTS)}", expression="content", rule="subscription:content"
            )
        found = subs.events(row.id, first, last, limit=MAX_EVENTS) if first <= last else []
        channel = sink.channel
        assert channel is not None
        items = [channel.item(partner, content, e) for e in found]
        return fhir_response(notification_bundle(svc.release, row.base, row, "query-event", items))

    @app.get("/fhir/SubscriptionTopic")
    def subscription_topic_search() -> Response:
        _topics_served()
        current_partner()
        url = request.args.get("url")
        ids = {i for v in request.args.getlist("_id") for i in v.split(",") if i}
        base = _base()
        entries = [
            {
                "fullUrl": f"{base}/SubscriptionTopic/{t.id}",
                "resource": t.resource,
                "search": {"mode": "match"},
            }
            for t in topics().values()
            if (url is None or t.url == url) and (not ids or t.id in ids)
        ]
        return fhir_response(_bundle_of(entries, f"{base}/SubscriptionTopic"))

    @app.get("/fhir/SubscriptionTopic/<tid>")
    def subscription_topic_read(tid: str) -> Response:
        _topics_served()
        current_partner()
        for t in topics().values():
            if t.id == tid:
                return fhir_response(t.resource)
        raise NotFound(
            f"SubscriptionTopic/{tid[:64]} is not known",
            expression="SubscriptionTopic",
            rule="fhir:not-found",
        )


def _topics_served() -> None:
    if (
        services().release is not Release.R5
    ):  # R4 has no SubscriptionTopic type: topics are in the CapabilityStatement
        raise NotFound(
            "SubscriptionTopic is an R5 resource; an R4 deployment lists its topics in the CapabilityStatement",
            rule="fhir:resource-type",
            code="not-supported",
        )


def _spec_content(row: SubscriptionRow) -> str:
    return spec_of(row).content


def _status_bundle(rows: list[SubscriptionRow], self_url: str) -> Response:
    release = services().release
    entries = []
    for r in rows:
        st = status_resource(release, r.base, r, "query-status", [])
        entries.append({"fullUrl": f"urn:uuid:{st['id']}", "resource": st, "search": {"mode": "match"}})
    return fhir_response(_bundle_of(entries, self_url))


def _operation_args() -> dict[str, str]:
    """An operation's parameters: the query string, or a POSTed Parameters resource."""
    args = dict(request.args.items())
    if request.method == "POST" and request.content_length:
        from .fhir import read_json_body

        body = read_json_body()
        if not isinstance(body, dict) or body.get("resourceType") != "Parameters":
            raise InputError(
                "An operation's body is a Parameters resource", expression="Parameters", rule="fhir:operation"
            )
        given = body.get("parameter", [])
        if not isinstance(given, list):
            raise InputError(
                "Parameters.parameter is a list of parameters",
                pointer="/parameter",
                expression="Parameters.parameter",
                rule="fhir:operation",
            )
        for p in given:
            if isinstance(p, dict) and isinstance(p.get("name"), str):
                for key in ("valueString", "valueCode", "valueInteger", "valueInteger64", "valueUnsignedInt"):
                    if key in p:
                        args[p["name"]] = str(p[key])
    return args


def _number(value: str | None, name: str) -> int | None:
    if value is None or value == "":
        return None
    if not ascii_digits(value):
        raise InputError(
            f"{name} is an event number (a non-negative integer)",
            expression=name,
            rule="subscription:event-number",
        )
    return int(value)
