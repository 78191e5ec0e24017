"""Topic-based Subscriptions: topics, the Subscription shapes of R4 (Subscriptions R5 Backport IG
1.1.0) and R5, filters, notification Bundles, the event sink Inbound tells of every write, and
the channel the rest-hook sender (`webhooks.Notifier`) posts them through (exchange/, layer 3:
orchestration; imports base, storage/ and `webhooks`, `inbound_rules` of its own room).

    write committed ─▶ EventSink.record (in the write's transaction): for each listening
      Subscription whose topic, partner and filters match, the next event number and a job
      ─▶ Notifier (leased queue, back-off, no redirects) ─▶ SubscriptionChannel.prepare: the
         Bundle, built at send time with the consent gate asked again ─▶ POST

Where notifications go is the operator's choice (the trust boundary): a Subscription's
endpoint must be at an origin registered for its partner (`Partner.endpoint_origins`: its
webhook URL's and `partners subscription-origins`), checked when it is created or changed
(`check_registered`, 422) and again before every notification is posted (`prepare`: one no
longer registered, or of a revoked partner, is not sent and turns the Subscription off).
Otherwise any partner could have the bridge POST to any host it names (an internal service,
the bridge's own loopback) and read from the Subscription's status whether it answered.

Topics are data (`mappings/subscription-topics/`). What a subscriber is told of a focus is
decided when a notification is sent or `$events` replays it, never earlier: a note the consent
gate no longer lets the partner read (a revocation between the event and its delivery
included) keeps its event number but is sent without its focus or resource, exactly like an
`empty` payload (the subscriber learns that event N happened, never which note).
"""

from __future__ import annotations

import ipaddress
import logging
import re
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cache, lru_cache
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from .. import jsonio
from ..config import CANONICAL, Release, data_path
from ..errors import InputError, KapError, ProfileError
from ..storage.partners import Partner, Partners
from ..storage.store import Store, StoredResource
from ..storage.subscriptions import Listener, SubscriptionEvent, SubscriptionRow, Subscriptions
from ..storage.webhooks import WebhookJob, WebhookJobs
from .inbound_rules import Resolve, addressed_to, remembering
from .webhooks import Deferred, Prepared

log = logging.getLogger("fhir_kap.subscriptions")

__all__ = [
    "BACKPORT",
    "CONTENTS",
    "EVENT_PREFIX",
    "TOPIC_BASE",
    "EventSink",
    "Spec",
    "SubscriptionChannel",
    "Topic",
    "check_endpoint",
    "check_registered",
    "endpoint_expression",
    "spec_of",
    "matches",
    "notification_bundle",
    "parse_subscription",
    "shown",
    "status_resource",
    "topics",
]

TOPIC_BASE = f"{CANONICAL}/SubscriptionTopic/"
BACKPORT = "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/"
CONTENTS = ("empty", "id-only", "full-resource")
CHANNEL_TYPES = "http://terminology.hl7.org/CodeSystem/subscription-channel-type"
#: The webhook_jobs `event` of a Subscription's notifications: subscription-handshake, ...-heartbeat, ...-event.
EVENT_PREFIX = "subscription-"
MAX_HEADERS = 10
MAX_EVENTS = 100  # per $events answer
#: How many Subscription versions' parsed filters a write's fan-out keeps (`EventSink`).
SPEC_CACHE = 4096
_PRINTABLE = re.compile(r"[\x21-\x7e]+")
_HEADER = re.compile(r"^([A-Za-z0-9-]{1,64}):[ \t]*([\x20-\x7e]{0,2048})$")
_EXT_FILTER = BACKPORT + "backport-filter-criteria"
_EXT_CONTENT = BACKPORT + "backport-payload-content"
_EXT_HEARTBEAT = BACKPORT + "backport-heartbeat-period"
_EXT_TIMEOUT = BACKPORT + "backport-timeout"
_EXT_MAX_COUNT = BACKPORT + "backport-max-count"


@dataclass(frozen=True)
class Topic:
    """A SubscriptionTopic the bridge publishes: its canonical url, the resource type it is
    about, its filter parameters, and the R5 resource (mappings/subscription-topics/)."""

    id: str
    url: str
    resource_type: str
    filters: tuple[str, ...]
    resource: dict[str, Any]


@cache
def topics() -> dict[str, Topic]:
    """The published topics by canonical url."""
    out: dict[str, Topic] = {}
    for path in sorted((data_path("mappings") / "subscription-topics").glob("SubscriptionTopic-*.json")):
        res = jsonio.loads(path.read_bytes(), source=path.name)
        trigger = res["resourceTrigger"][0]["resource"].rsplit("/", 1)[-1]
        filters = tuple(f["filterParameter"] for f in res.get("canFilterBy", []))
        out[res["url"]] = Topic(res["id"], res["url"], trigger, filters, res)
    return out


NOTE_TOPIC = TOPIC_BASE + "continuity-note-available"
REFERRAL_TOPIC = TOPIC_BASE + "referral-status-changed"


@dataclass(frozen=True)
class Spec:
    """What a Subscription asks for, whatever its release's shape."""

    topic: str
    filters: tuple[tuple[str, tuple[str, ...]], ...]
    endpoint: str
    content: str
    heartbeat_period: int | None
    timeout: int | None
    max_count: int | None
    end_at: float | None
    headers: tuple[tuple[str, str], ...]
    status: str


def _bad(message: str, expression: str, rule: str, code: str = "value") -> InputError:
    return InputError(message, expression=expression, rule=f"subscription:{rule}", code=code)


def check_endpoint(url: Any, expression: str) -> str:
    """A rest-hook endpoint: https, or http only to a loopback address (a receiver on the
    bridge's own machine); no credentials, no fragment."""
    if not isinstance(url, str) or not url:
        raise _bad("A rest-hook Subscription needs an endpoint", expression, "endpoint", "required")
    if not _PRINTABLE.fullmatch(url):
        # What is checked against the registration, shown and posted to is the URL as written:
        # no whitespace or control characters (urlsplit drops some silently), no non-ASCII.
        raise _bad("The endpoint must be printable ASCII (percent-encode the rest)", expression, "endpoint")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number
    except ValueError:
        raise _bad("The endpoint is not a valid URL", expression, "endpoint") from None
    if parts.scheme not in ("http", "https") or not parts.hostname or len(url) > 2048:
        raise _bad("The endpoint must be an https URL with a host", expression, "endpoint")
    if parts.username is not None or parts.password is not None or parts.fragment:
        raise _bad(
            "The endpoint must not carry credentials or a #fragment (send credentials as a header)",
            expression,
            "endpoint",
        )
    if parts.scheme == "http" and not _loopback(parts.hostname):
        raise _bad(
            "The endpoint must be https (http is accepted only to a loopback address)",
            expression,
            "endpoint-https",
        )
    return url


def endpoint_expression(release: Release) -> str:
    """Where a Subscription's endpoint is: R4 `Subscription.channel.endpoint`, R5 `Subscription.endpoint`."""
    return "Subscription.channel.endpoint" if release is Release.R4 else "Subscription.endpoint"


def check_registered(spec: Spec, partner: Partner, release: Release) -> None:
    """422 `subscription:endpoint-not-registered` unless the endpoint is at an origin (scheme,
    host, port) the operator registered for `partner` (`Partner.endpoint_origins`): a partner
    never chooses where the bridge posts on its own."""
    if not partner.may_post_to(spec.endpoint):
        raise ProfileError(
            "The endpoint is not at an origin (scheme, host, port) registered for this partner: the "
            "clinic's operator must register it (fhir-kap partners subscription-origins)",
            expression=endpoint_expression(release),
            rule="subscription:endpoint-not-registered",
            code="business-rule",
        )


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _ext(element: Any, url: str) -> list[dict[str, Any]]:
    if not isinstance(element, dict):
        return []
    return [e for e in element.get("extension") or [] if isinstance(e, dict) and e.get("url") == url]


def _one_ext_value(element: Any, url: str, key: str, expression: str) -> Any:
    found = _ext(element, url)
    if len(found) > 1:
        raise _bad(f"At most one {url.rsplit('/', 1)[-1]} extension", expression, "extension")
    return found[0].get(key) if found else None


def _positive(value: Any, expression: str, *, zero: bool = False, maximum: int = 86400) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < (0 if zero else 1) or value > maximum:
        raise _bad(f"Must be an integer from {0 if zero else 1} to {maximum}", expression, "integer")
    return value


def _instant(value: Any, expression: str) -> float | None:
    if value is None:
        return None
    try:
        moment = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        raise _bad("Must be a FHIR instant", expression, "end") from None
    if moment.tzinfo is None:
        raise _bad("Must be a FHIR instant with a time zone", expression, "end")
    return moment.timestamp()


#: The most values one filter parameter of a Subscription may list (alternatives, comma-separated
#: or repeated): each is matched against every note or Task written.
MAX_FILTER_VALUES = 50


def _filters(topic: Topic, given: Sequence[tuple[str, str, str]]) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """(parameter, values) pairs; `given` is (parameter, value, expression) as written."""
    out: dict[str, list[str]] = {}
    for name, value, expression in given:
        if name not in topic.filters:
            raise _bad(
                f"The topic {topic.id} cannot filter by '{name[:40]}'; it can by: {', '.join(topic.filters)}",
                expression,
                "filter",
                "not-supported",
            )
        values = [v.strip() for v in value.split(",") if v.strip()]
        if not values or any(len(v) > 256 or not v.isprintable() for v in values):
            raise _bad(
                "A filter needs a value (printable characters, at most 256 of them)", expression, "filter"
            )
        out.setdefault(name, []).extend(values)
        if len(out[name]) > MAX_FILTER_VALUES:  # each is matched against every note written
            raise _bad(
                f"At most {MAX_FILTER_VALUES} values per filter parameter ('{name[:40]}')",
                expression,
                "filter",
            )
    return tuple((k, tuple(v)) for k, v in sorted(out.items()))


def parse_subscription(body: Any, release: Release) -> Spec:
    """The Spec of a Subscription in the deployment's shape: R4 (the backport profile:
    `criteria` the topic canonical, `_criteria` filter extensions, payload content, heartbeat,
    timeout and max-count extensions) or R5; InputError naming the field otherwise."""
    if not isinstance(body, dict) or body.get("resourceType") != "Subscription":
        raise _bad("The body must be a Subscription", "resourceType", "resource", "invalid")
    status = body.get("status")
    if status not in ("requested", "off"):
        raise _bad(
            "A new or changed Subscription has status 'requested' (or 'off' to pause it)",
            "Subscription.status",
            "status",
        )
    if release is Release.R4:
        return _parse_r4(body, status)
    return _parse_r5(body, status)


def _topic(url: Any, expression: str) -> Topic:
    found = topics().get(url) if isinstance(url, str) else None
    if found is None:
        raise _bad(
            f"Not a topic of this server; topics: {', '.join(topics())}", expression, "topic", "not-supported"
        )
    return found


def _headers(values: Sequence[tuple[str, str]]) -> tuple[tuple[str, str], ...]:
    if len(values) > MAX_HEADERS:
        raise _bad(f"At most {MAX_HEADERS} headers", values[0][1], "header")
    out = []
    for text, expression in values:
        m = _HEADER.match(text) if isinstance(text, str) else None
        if m is None or m.group(1).lower() in ("content-type", "content-length", "host", "transfer-encoding"):
            raise _bad(
                "A header is 'Name: value' (not Content-Type, Content-Length or Host)", expression, "header"
            )
        out.append((m.group(1), m.group(2)))
    return tuple(out)


def _parse_r4(body: dict[str, Any], status: str) -> Spec:
    topic = _topic(body.get("criteria"), "Subscription.criteria")
    given = []
    for i, e in enumerate(_ext(body.get("_criteria"), _EXT_FILTER)):
        expression = f"Subscription.criteria.extension[{i}]"
        value = e.get("valueString")
        if not isinstance(value, str):
            raise _bad("A filter criteria extension has a valueString", expression, "filter")
        rtype, sep, query = value.partition("?")
        if not sep or rtype != topic.resource_type:
            raise _bad(
                f"A filter criteria is '{topic.resource_type}?[parameter]=[value]'", expression, "filter"
            )
        for name, v in parse_qsl(query, keep_blank_values=True):
            given.append((name, v, expression))
    channel = body.get("channel")
    if not isinstance(channel, dict):
        raise _bad("A Subscription has a channel", "Subscription.channel", "channel", "required")
    if channel.get("type") != "rest-hook":
        raise _bad(
            "The only channel type is rest-hook", "Subscription.channel.type", "channel-type", "not-supported"
        )
    endpoint = check_endpoint(channel.get("endpoint"), "Subscription.channel.endpoint")
    payload = channel.get("payload")
    if payload is not None and payload not in ("application/fhir+json", "application/json"):
        raise _bad(
            "The payload is application/fhir+json", "Subscription.channel.payload", "payload", "not-supported"
        )
    content = _one_ext_value(
        channel.get("_payload"), _EXT_CONTENT, "valueCode", "Subscription.channel.payload.extension"
    )
    if content is None:
        content = "id-only" if payload else "empty"
    if content not in CONTENTS:
        raise _bad(
            f"Payload content is one of {', '.join(CONTENTS)}",
            "Subscription.channel.payload.extension",
            "content",
        )
    if content != "empty" and payload is None:
        raise _bad(
            "A payload content other than empty needs channel.payload",
            "Subscription.channel.payload",
            "payload",
            "required",
        )
    ext_at = "Subscription.channel.extension"
    headers = channel.get("header") or []
    return Spec(
        topic.url,
        _filters(topic, given),
        endpoint,
        content,
        _positive(_one_ext_value(channel, _EXT_HEARTBEAT, "valueUnsignedInt", ext_at), ext_at),
        _positive(_one_ext_value(channel, _EXT_TIMEOUT, "valueUnsignedInt", ext_at), ext_at, maximum=60),
        _positive(_one_ext_value(channel, _EXT_MAX_COUNT, "valuePositiveInt", ext_at), ext_at, maximum=1000),
        _instant(body.get("end"), "Subscription.end"),
        _headers([(h, f"Subscription.channel.header[{i}]") for i, h in enumerate(headers)]),
        status,
    )


def _parse_r5(body: dict[str, Any], status: str) -> Spec:
    topic = _topic(body.get("topic"), "Subscription.topic")
    given = []
    for i, f in enumerate(body.get("filterBy") or []):
        expression = f"Subscription.filterBy[{i}]"
        if not isinstance(f, dict):
            raise _bad("A filterBy is an object", expression, "filter")
        if f.get("resourceType") not in (
            None,
            topic.resource_type,
            f"http://hl7.org/fhir/StructureDefinition/{topic.resource_type}",
        ):
            raise _bad(f"The topic is about {topic.resource_type}", expression + ".resourceType", "filter")
        if f.get("comparator") not in (None, "eq") or f.get("modifier") is not None:
            raise _bad("Only equality filters are supported", expression, "filter", "not-supported")
        name, value = f.get("filterParameter"), f.get("value")
        if not isinstance(name, str) or not isinstance(value, str):
            raise _bad("A filterBy has a filterParameter and a value", expression, "filter", "required")
        given.append((name, value, expression + ".filterParameter"))
    channel = body.get("channelType")
    if (
        not isinstance(channel, dict)
        or channel.get("code") != "rest-hook"
        or channel.get("system") not in (None, CHANNEL_TYPES)
    ):
        raise _bad(
            "The only channel type is rest-hook", "Subscription.channelType", "channel-type", "not-supported"
        )
    endpoint = check_endpoint(body.get("endpoint"), "Subscription.endpoint")
    content_type = body.get("contentType")
    if content_type is not None and content_type not in ("application/fhir+json", "application/json"):
        raise _bad(
            "The contentType is application/fhir+json", "Subscription.contentType", "payload", "not-supported"
        )
    content = body.get("content", "empty")
    if content not in CONTENTS:
        raise _bad(f"content is one of {', '.join(CONTENTS)}", "Subscription.content", "content")
    params = []
    for i, p in enumerate(body.get("parameter") or []):
        name, value = (p.get("name"), p.get("value")) if isinstance(p, dict) else (None, None)
        params.append((f"{name}: {value}", f"Subscription.parameter[{i}]"))
    return Spec(
        topic.url,
        _filters(topic, given),
        endpoint,
        content,
        _positive(body.get("heartbeatPeriod"), "Subscription.heartbeatPeriod"),
        _positive(body.get("timeout"), "Subscription.timeout", maximum=60),
        _positive(body.get("maxCount"), "Subscription.maxCount", maximum=1000),
        _instant(body.get("end"), "Subscription.end"),
        _headers(params),
        status,
    )


# ---- filters


def _ref_id(value: str, rtype: str) -> str:
    """'Patient/x', 'x' or 'https://host/fhir/Patient/x' -> 'x'."""
    tail = value.rstrip("/").split("/")
    if len(tail) >= 2 and tail[-2] == rtype:
        return tail[-1]
    return value if "/" not in value else ""


def matches(filters: Sequence[tuple[str, Sequence[str]]], resource: Mapping[str, Any]) -> bool:
    """Whether `resource` passes every filter (values of one parameter are alternatives)."""
    for name, values in filters:
        if not any(_match_one(name, v, resource) for v in values):
            return False
    return True


def _match_one(name: str, value: str, resource: Mapping[str, Any]) -> bool:
    if name == "patient":
        field = "subject" if resource.get("resourceType") == "Communication" else "for"
        ref = (resource.get(field) or {}).get("reference")
        want = _ref_id(value, "Patient")
        return (
            bool(want)
            and isinstance(ref, str)
            and ref.startswith("Patient/")
            and _ref_id(ref, "Patient") == want
        )
    if name == "status":
        return resource.get("status") == value
    codings: list[Any] = []
    if name == "category":
        for concept in resource.get("category") or []:
            codings += (concept or {}).get("coding") or []
    elif name == "business-status":
        codings = (resource.get("businessStatus") or {}).get("coding") or []
    system, sep, code = value.rpartition("|")
    return any(
        isinstance(c, dict) and c.get("code") == code and (not sep or c.get("system") == system)
        for c in codings
    )


# ---- what a subscriber sees


def shown(row: SubscriptionRow) -> dict[str, Any]:
    """The Subscription as the partner reads it: its body with id, meta and the current status
    (and in R4 the last error: codes and statuses only, never a response body)."""
    out: dict[str, Any] = {"resourceType": "Subscription", "id": row.id}
    meta = dict(row.body.get("meta") or {})
    meta["versionId"] = str(row.version)
    out["meta"] = meta
    for key, value in row.body.items():
        if key not in ("resourceType", "id", "meta", "status"):
            out[key] = value
    out["status"] = row.status
    if row.error and row.status in ("error", "off") and "criteria" in row.body:
        out["error"] = row.error  # R4 Subscription.error; R5 has no such element
    return out


def _now_instant() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class Item:
    """One event as a notification shows it: its number and time, and the focus reference and
    resource when the payload and the consent gate allow them."""

    number: int
    at: str
    focus: str | None = None
    resource: dict[str, Any] | None = None
    created: bool = True


def status_resource(
    release: Release,
    base: str,
    row: SubscriptionRow,
    kind: str,
    items: Sequence[Item],
    status: str | None = None,
) -> dict[str, Any]:
    """The SubscriptionStatus of a notification: backport Parameters in R4, SubscriptionStatus in R5."""
    sid = str(uuid.uuid4())
    state = status or row.status
    if release is Release.R4:
        params: list[dict[str, Any]] = [
            {"name": "subscription", "valueReference": {"reference": f"{base}/Subscription/{row.id}"}},
            {"name": "topic", "valueCanonical": row.topic},
            {"name": "status", "valueCode": state},
            {"name": "type", "valueCode": kind},
            {"name": "events-since-subscription-start", "valueString": str(row.events)},
        ]
        for it in items:
            part: list[dict[str, Any]] = [
                {"name": "event-number", "valueString": str(it.number)},
                {"name": "timestamp", "valueInstant": it.at},
            ]
            if it.focus:
                part.append({"name": "focus", "valueReference": {"reference": f"{base}/{it.focus}"}})
            params.append({"name": "notification-event", "part": part})
        return {
            "resourceType": "Parameters",
            "id": sid,
            "meta": {"profile": [BACKPORT + "backport-subscription-status-r4"]},
            "parameter": params,
        }
    out: dict[str, Any] = {
        "resourceType": "SubscriptionStatus",
        "id": sid,
        "status": state,
        "type": kind,
        "eventsSinceSubscriptionStart": str(row.events),
    }
    events = []
    for it in items:
        ev: dict[str, Any] = {"eventNumber": str(it.number), "timestamp": it.at}
        if it.focus:
            ev["focus"] = {"reference": f"{base}/{it.focus}"}
        events.append(ev)
    if events:
        out["notificationEvent"] = events
    out["subscription"] = {"reference": f"{base}/Subscription/{row.id}"}
    out["topic"] = row.topic
    return out


def notification_bundle(
    release: Release,
    base: str,
    row: SubscriptionRow,
    kind: str,
    items: Sequence[Item],
    status: str | None = None,
) -> dict[str, Any]:
    """A notification Bundle: R4 `history` whose first entry is the backport status Parameters
    (request GET .../$status, response 200), R5 `subscription-notification` whose first entry is
    the SubscriptionStatus; then one entry per focus named (id-only: fullUrl, request and
    response; full-resource: the resource too)."""
    st = status_resource(release, base, row, kind, items, status)
    first: dict[str, Any] = {"fullUrl": f"urn:uuid:{st['id']}", "resource": st}
    if release is Release.R4:
        first["request"] = {"method": "GET", "url": f"{base}/Subscription/{row.id}/$status"}
        first["response"] = {"status": "200"}
    entries = [first]
    for it in items:
        if not it.focus:
            continue
        rtype = it.focus.split("/", 1)[0]
        entry: dict[str, Any] = {"fullUrl": f"{base}/{it.focus}"}
        if it.resource is not None:
            entry["resource"] = it.resource
        entry["request"] = {
            "method": "POST" if it.created else "PUT",
            "url": rtype if it.created else it.focus,
        }
        entry["response"] = {"status": "201" if it.created else "200"}
        entries.append(entry)
    bundle: dict[str, Any] = {"resourceType": "Bundle", "id": str(uuid.uuid4())}
    if release is Release.R4:
        bundle["meta"] = {"profile": [BACKPORT + "backport-subscription-notification-r4"]}
    bundle["type"] = "history" if release is Release.R4 else "subscription-notification"
    bundle["timestamp"] = _now_instant()
    bundle["entry"] = entries
    return bundle


# ---- events, numbered in the write's transaction


MayRead = Callable[[Partner, StoredResource], bool]


class EventSink:
    """`exchange.inbound.EventSink`: numbers an event for each listening Subscription a
    committed write matches, and queues its notification, inside the write's transaction."""

    def __init__(
        self,
        subs: Subscriptions,
        store: Store,
        partners: Partners,
        may_read: MayRead,
        jobs: WebhookJobs | None,
        clock: Callable[[], float] = time.time,
        *,
        channel: SubscriptionChannel | None = None,
        wake: Callable[[], None] | None = None,
        read_resolving: Callable[[Partner, StoredResource, Resolve], bool] | None = None,
    ) -> None:
        """`read_resolving(partner, note, resolve)`: `may_read` reading the note's recipient
        parties through `resolve` (the write's, each party read once); `may_read` otherwise."""
        self.subs = subs
        self.read_resolving = read_resolving
        self.channel = channel  # what $events builds its items with
        self.wake = wake  # the sender's wake-up (None: this process does not notify)
        self.store = store
        self.partners = partners
        self.may_read = may_read
        self.jobs = jobs
        self.clock = clock
        self._specs: OrderedDict[tuple[str, int], Any] = OrderedDict()  # (id, version) -> filters
        self._specs_lock = threading.Lock()

    def record(self, tx: Any, accepted: Sequence[Any]) -> int:
        queued = 0
        resolve = remembering(self.store.get)  # each recipient party read once per write

        def note_reader(partner: Partner, stored: StoredResource) -> bool:
            return self._note_reader(partner, stored, resolve)

        for acc in accepted:
            # the Task a create made is new with it; the one an update moved (a withdrawn
            # referral's) follows as an entry of its own (`inbound._with_moved_tasks`)
            task = None if acc.updated else acc.task
            for stored, created in ((acc.stored, acc.created), (task, True)):
                if stored is None:
                    continue
                if stored.type == "Communication" and created:
                    queued += self._fan_out(tx, NOTE_TOPIC, stored, note_reader)
                elif stored.type == "Task" and (created or stored is acc.stored):
                    queued += self._fan_out(tx, REFERRAL_TOPIC, stored, self._referrer)
        return queued

    def _note_reader(
        self, partner: Partner, stored: StoredResource, resolve: Callable[[str, str], StoredResource | None]
    ) -> bool:
        if stored.source == partner.name or addressed_to(stored.resource, partner, resolve) is None:
            return False
        if self.read_resolving is not None:  # consent-gated, audited like a read
            return self.read_resolving(partner, stored, resolve)
        return self.may_read(partner, stored)

    @staticmethod
    def _referrer(partner: Partner, stored: StoredResource) -> bool:
        return stored.source == partner.name  # the practice that sent the referral

    def _fan_out(
        self, tx: Any, topic: str, stored: StoredResource, hears: Callable[[Partner, StoredResource], bool]
    ) -> int:
        listening = self.subs.listeners(tx, topic)  # ids, owners and versions: no body
        if not listening:
            return 0
        by_name = {p.name: p for p in self.partners.list()}
        listening = [
            sub
            for sub in listening
            if (p := by_name.get(sub.partner)) is not None and not p.revoked  # before any body is read
        ]
        filters_of = self._filters(tx, listening)
        at = stored.last_updated or _now_instant()
        n = 0
        decided: dict[str, bool] = {}  # one (audited) decision per partner, however many Subscriptions
        for sub in listening:
            partner = by_name[sub.partner]
            filters = filters_of.get((sub.id, sub.version))
            if filters is None:  # no longer parses: it hears nothing, and the write goes on
                continue
            if not matches(filters, stored.resource):
                continue
            if partner.name not in decided:
                decided[partner.name] = hears(partner, stored)
            if not decided[partner.name]:
                continue
            number = self.subs.add_event(tx, sub.id, at, f"{stored.type}/{stored.id}", str(stored.version))
            if self.jobs is not None:
                n += self.jobs.enqueue(
                    sub.partner,
                    EVENT_PREFIX + "event",
                    f"Subscription/{sub.id}",
                    str(number),
                    now=self.clock(),
                )
        return n

    def _filters(self, tx: Any, listening: Sequence[Listener]) -> dict[tuple[str, int], Any]:
        """The parsed filters of each listening Subscription by (id, version), None when its body
        no longer parses. A body is read and parsed only for a version this sink has not seen
        (kept for the last `SPEC_CACHE` versions): a write decodes no Subscription body it
        decoded before, however many listen."""
        keys = [(sub.id, sub.version) for sub in listening]
        with self._specs_lock:
            out = {key: self._specs[key] for key in keys if key in self._specs}
        missing = [sub.id for sub in listening if (sub.id, sub.version) not in out]
        if not missing:
            return out
        for row in self.subs.rows_in(tx, missing):
            try:
                filters: Any = spec_of(row).filters
            except KapError:
                log.warning("subscription %s no longer parses: no event for it", row.id)
                filters = None
            out[(row.id, row.version)] = filters
            with self._specs_lock:
                self._specs[(row.id, row.version)] = filters
                while len(self._specs) > SPEC_CACHE:
                    self._specs.popitem(last=False)
        return out


class _ByVersion:
    """A stored Subscription as a cache key: its id and version (its body changes only with a
    new version), so a write that fans out neither copies nor serialises any body."""

    __slots__ = ("key", "row")

    def __init__(self, row: SubscriptionRow) -> None:
        self.key = (row.id, row.version)
        self.row = row

    def __hash__(self) -> int:
        return hash(self.key)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _ByVersion) and other.key == self.key


@lru_cache(maxsize=1024)
def _parsed(keyed: _ByVersion) -> Spec:
    row = keyed.row
    release = Release.R4 if "criteria" in row.body else Release.R5
    return parse_subscription(dict(row.body, status="requested"), release)


def spec_of(row: SubscriptionRow) -> Spec:
    """What a stored Subscription asks for (parsed once per id and version). Raises InputError
    when the body no longer parses (a topic or a limit changed since it was accepted)."""
    return _parsed(_ByVersion(row))


# ---- the channel the Notifier posts through


class SubscriptionChannel:
    """What the rest-hook sender needs for Subscription jobs: the request to post (built now,
    with the consent gate asked again), what an outcome does to the Subscription's status, and
    the scheduled work (heartbeats, ends) each round."""

    prefix = EVENT_PREFIX

    def __init__(
        self,
        subs: Subscriptions,
        store: Store,
        partners: Partners,
        may_read: MayRead,
        release: Release,
        jobs: WebhookJobs,
        *,
        user_agent: str = "fhir-kap-bridge",
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.subs = subs
        self.store = store
        self.partners = partners
        self.may_read = may_read
        self.release = release
        self.jobs = jobs
        self.user_agent = user_agent
        self.clock = clock

    def prepare(self, job: WebhookJob, default_timeout: float) -> Prepared | Deferred | str:
        """The POST for `job`; a second later for an event of a Subscription whose handshake has
        not succeeded yet (`requested`: events are sent once it is active, or in error); or why it
        is not sent (the job is dead-lettered with that reason)."""
        sid = job.resource.removeprefix("Subscription/")
        row = self.subs.get(sid, partner=job.partner)
        if row is None:
            return "the subscription was deleted"
        if row.status == "off":
            return "the subscription is off"
        partner = self.partners.get(row.partner)  # read now: a registration changed meanwhile counts
        try:
            spec = spec_of(row)
        except KapError:
            return self._stop(sid, "subscription:unreadable")
        if partner is None or partner.revoked:
            return self._stop(sid, "subscription:partner-revoked")
        if not partner.may_post_to(spec.endpoint):
            return self._stop(sid, "subscription:endpoint-not-registered")
        kind = job.event.removeprefix(EVENT_PREFIX)
        if kind != "handshake" and row.status == "requested":
            return Deferred(1.0)
        if kind == "handshake":
            bundle = notification_bundle(self.release, row.base, row, "handshake", [], status="requested")
        elif kind == "heartbeat":
            bundle = notification_bundle(self.release, row.base, row, "heartbeat", [])
        else:
            found = self.subs.events(row.id, int(job.version), int(job.version))
            if not found:
                return "the event is gone"
            items = [self.item(partner, spec.content, e) for e in found]
            bundle = notification_bundle(self.release, row.base, row, "event-notification", items)
        headers = {"Content-Type": "application/fhir+json", "User-Agent": self.user_agent}
        for name, value in spec.headers:
            headers[name] = value
        timeout = float(min(spec.timeout, default_timeout)) if spec.timeout else default_timeout
        return Prepared(spec.endpoint, jsonio.dumps(bundle), headers, timeout)

    def _stop(self, sid: str, code: str) -> str:
        """A Subscription the bridge may no longer post for (its endpoint's origin is not
        registered any more, its partner was revoked): turned off, as when a notification is
        given up; the job goes dead with `code` as its reason."""
        self.subs.set_status(
            sid,
            "off",
            error=f"delivery stopped ({code})",
            only_from=("requested", "active", "error"),
            now=self.clock(),
        )
        return code

    def item(self, partner: Partner, content: str, event: SubscriptionEvent) -> Item:
        """An event as `partner` may see it now: the focus only for id-only and full-resource,
        and only while the partner may read the resource's CURRENT version (consent-gated and
        audited, like a read: the same answer a GET gives now); otherwise the event's number and
        time alone. A full-resource payload is that current version, never the one the event was
        raised on: a note corrected since (another client, another recipient, entered-in-error)
        is never handed out as it was."""
        bare = Item(event.number, event.at)
        if content == "empty" or not event.focus:
            return bare
        rtype, _, rid = event.focus.partition("/")
        current = self.store.get(rtype, rid)
        if current is None or current.deleted:
            return bare
        if rtype == "Task":
            allowed = current.source == partner.name
        else:
            allowed = self.may_read(partner, current)
        if not allowed:
            return bare
        return Item(
            event.number,
            event.at,
            event.focus,
            current.resource if content == "full-resource" else None,
            created=current.version == 1,
        )

    def outcome(self, job: WebhookJob, state: str, status: int | None) -> None:
        """delivered: active again (and the heartbeat clock restarts); a failed attempt: error;
        given up: off (too many errors)."""
        sid = job.resource.removeprefix("Subscription/")
        now = self.clock()
        if state == "delivered":
            self.subs.sent(sid, now)
            self.subs.set_status(sid, "active", only_from=("requested", "error"), now=now)
        elif state == "pending":
            self.subs.set_status(
                sid,
                "error",
                error=f"delivery failed ({status or 'no answer'})",
                only_from=("requested", "active"),
                now=now,
            )
        elif state == "dead":
            self.subs.set_status(
                sid,
                "off",
                error=f"delivery given up ({status or 'no answer'})",
                only_from=("requested", "active", "error"),
                now=now,
            )

    def tick(self, now: float) -> float | None:
        """Turn off Subscriptions past their end and queue the heartbeats due; when the next is due."""
        self.subs.expire(now)
        if not self.subs.heartbeat_due(now):  # most rounds: no write transaction at all
            return self.subs.next_heartbeat()
        with self.subs.db.transaction():  # claimed and queued together
            for row, seq in self.subs.due_heartbeats(now):
                self.jobs.enqueue(
                    row.partner, EVENT_PREFIX + "heartbeat", f"Subscription/{row.id}", str(seq), now=now
                )
        return self.subs.next_heartbeat()
