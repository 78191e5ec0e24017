"""Notification Bundles, Subscription shapes and filters (exchange/subscriptions.py, pure parts).

The Subscriptions R5 Backport IG's package (hl7.fhir.uv.subscriptions-backport) is not on the npm
registry (`npm view` answers 404) and packages.fhir.org is not reachable from here, so the
notification Bundles are checked against the IG's written rules (1.1.0), one test per rule,
and against base FHIR with the project's validator.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest

from fhir_kap.config import Release
from fhir_kap.errors import InputError
from fhir_kap.exchange.subscriptions import (
    BACKPORT,
    Item,
    check_endpoint,
    matches,
    notification_bundle,
    parse_subscription,
    status_resource,
    topics,
)
from fhir_kap.storage.subscriptions import SubscriptionRow
from fhir_kap.validation import Validator
from testkit.subscriptions import fixture, sub

BASE = "https://bridge.example/fhir"
NOTE = "http://fhir-kap.example/SubscriptionTopic/continuity-note-available"
KINDS = ("handshake", "heartbeat", "event-notification", "query-event", "query-status")


def _row(release: Release, events: int = 2) -> SubscriptionRow:
    body = sub("R4" if release is Release.R4 else "R5", "note")
    del body["status"]
    return SubscriptionRow(
        "sub-1", "practice-a", NOTE, "active", BASE, body, 1, events, None, None, None, None
    )


def _items(release: Release, content: str) -> list[Item]:
    note = dict(
        fixture("Example-Communication-note-1.json", "R4" if release is Release.R4 else "R5"), id="note-1"
    )
    if content == "empty":
        return [Item(2, "2026-12-04T10:00:00Z")]
    return [
        Item(
            2,
            "2026-12-04T10:00:00Z",
            "Communication/note-1",
            note if content == "full-resource" else None,
        )
    ]


def _bundle(release: Release, kind: str = "event-notification", content: str = "id-only") -> dict[str, Any]:
    items = _items(release, content) if kind in ("event-notification", "query-event") else []
    return notification_bundle(release, BASE, _row(release), kind, items)


def _params(bundle: dict[str, Any]) -> list[dict[str, Any]]:
    return bundle["entry"][0]["resource"]["parameter"]


@pytest.mark.parametrize("release", [Release.R4, Release.R5])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("content", ["empty", "id-only", "full-resource"])
def test_every_notification_bundle_is_valid_base_fhir(release, kind, content):
    bundle = _bundle(release, kind, content)
    assert [i for i in Validator.load(release).validate(bundle, profile=False) if i.is_error] == []


@pytest.mark.parametrize("release", [Release.R4, Release.R5])
def test_status_resources_alone_are_valid_base_fhir(release):
    st = status_resource(release, BASE, _row(release), "query-status", [])
    assert [i for i in Validator.load(release).validate(st, profile=False) if i.is_error] == []


# ---- the backport IG's written rules for R4 notifications (1.1.0), one test each


def test_backport_r4_a_notification_is_a_history_bundle():
    bundle = _bundle(Release.R4)
    assert bundle["type"] == "history"
    assert bundle["meta"]["profile"] == [BACKPORT + "backport-subscription-notification-r4"]


def test_backport_r4_the_first_entry_is_the_subscription_status_parameters():
    first = _bundle(Release.R4)["entry"][0]
    assert first["resource"]["resourceType"] == "Parameters"
    assert first["resource"]["meta"]["profile"] == [BACKPORT + "backport-subscription-status-r4"]


def test_backport_r4_the_status_entry_reads_as_a_status_query():
    first = _bundle(Release.R4)["entry"][0]
    assert first["request"] == {"method": "GET", "url": f"{BASE}/Subscription/sub-1/$status"}
    assert first["response"] == {"status": "200"}


@pytest.mark.parametrize("kind", KINDS)
def test_backport_r4_subscription_status_and_type_appear_once_each(kind):
    names = [p["name"] for p in _params(_bundle(Release.R4, kind))]
    for name in ("subscription", "status", "type", "topic", "events-since-subscription-start"):
        assert names.count(name) == 1, name
    params = {p["name"]: p for p in _params(_bundle(Release.R4, kind))}
    assert params["subscription"]["valueReference"]["reference"] == f"{BASE}/Subscription/sub-1"
    assert params["topic"]["valueCanonical"] == NOTE
    assert params["type"]["valueCode"] == kind


def test_backport_r4_event_counts_are_strings():
    """R4 has no integer64: the IG carries event numbers as strings."""
    params = _params(_bundle(Release.R4))
    since = next(p for p in params if p["name"] == "events-since-subscription-start")
    assert since == {"name": "events-since-subscription-start", "valueString": "2"}
    event = next(p for p in params if p["name"] == "notification-event")
    assert {"name": "event-number", "valueString": "2"} in event["part"]


def test_backport_r4_a_notification_event_has_its_number_timestamp_and_focus():
    event = next(p for p in _params(_bundle(Release.R4)) if p["name"] == "notification-event")
    parts = {q["name"]: q for q in event["part"]}
    assert set(parts) == {"event-number", "timestamp", "focus"}
    assert parts["timestamp"]["valueInstant"] == "2026-12-04T10:00:00Z"
    assert parts["focus"]["valueReference"]["reference"] == f"{BASE}/Communication/note-1"


@pytest.mark.parametrize("kind", ["handshake", "heartbeat", "query-status"])
def test_backport_r4_handshakes_and_heartbeats_carry_no_events(kind):
    bundle = _bundle(Release.R4, kind)
    assert [p for p in _params(bundle) if p["name"] == "notification-event"] == []
    assert len(bundle["entry"]) == 1


def test_backport_r4_empty_content_names_no_resource():
    bundle = _bundle(Release.R4, content="empty")
    event = next(p for p in _params(bundle) if p["name"] == "notification-event")
    assert "focus" not in {q["name"] for q in event["part"]}
    assert len(bundle["entry"]) == 1


def test_backport_r4_id_only_content_has_an_entry_per_focus_without_the_resource():
    entries = _bundle(Release.R4, content="id-only")["entry"][1:]
    assert len(entries) == 1
    assert entries[0]["fullUrl"] == f"{BASE}/Communication/note-1"
    assert "resource" not in entries[0]
    assert entries[0]["request"]["method"] in ("POST", "PUT") and entries[0]["response"]["status"] in (
        "200",
        "201",
    )


def test_backport_r4_full_resource_content_carries_the_resource():
    entries = _bundle(Release.R4, content="full-resource")["entry"][1:]
    assert (
        entries[0]["resource"]["resourceType"] == "Communication" and entries[0]["resource"]["id"] == "note-1"
    )


def test_r5_a_notification_is_a_subscription_notification_bundle_led_by_its_status():
    bundle = _bundle(Release.R5)
    assert bundle["type"] == "subscription-notification"
    st = bundle["entry"][0]["resource"]
    assert st["resourceType"] == "SubscriptionStatus" and st["type"] == "event-notification"
    assert st["eventsSinceSubscriptionStart"] == "2"  # integer64: a JSON string
    assert st["notificationEvent"] == [
        {
            "eventNumber": "2",
            "timestamp": "2026-12-04T10:00:00Z",
            "focus": {"reference": f"{BASE}/Communication/note-1"},
        }
    ]
    assert st["subscription"] == {"reference": f"{BASE}/Subscription/sub-1"} and st["topic"] == NOTE


# ---- Subscription shapes


def test_the_r4_backport_shape_is_read_whole():
    spec = parse_subscription(sub("R4", "note"), Release.R4)
    assert (spec.topic, spec.filters, spec.content) == (
        NOTE,
        (("patient", ("Patient/client-1",)),),
        "id-only",
    )
    assert (spec.heartbeat_period, spec.timeout, spec.max_count) == (3600, 10, 10)
    assert spec.headers == (("Authorization", "Bearer practice-a-receiver-secret"),)


def test_the_r5_shape_is_read_whole():
    spec = parse_subscription(sub("R5", "note"), Release.R5)
    assert (spec.topic, spec.filters, spec.content) == (
        NOTE,
        (("patient", ("Patient/client-1",)),),
        "id-only",
    )
    assert (spec.heartbeat_period, spec.timeout, spec.max_count) == (3600, 10, 10)


def test_an_r5_subscription_on_an_r4_deployment_names_the_missing_criteria():
    with pytest.raises(InputError) as err:
        parse_subscription(sub("R5", "note"), Release.R4)
    assert err.value.issues[0].expression == "Subscription.criteria"


def test_r4_without_payload_is_empty_content():
    body = copy.deepcopy(sub("R4", "note"))
    del body["channel"]["payload"], body["channel"]["_payload"]
    assert parse_subscription(body, Release.R4).content == "empty"


@pytest.mark.parametrize(
    ("url", "ok"),
    [
        ("https://practice.example/hook", True),
        ("http://127.0.0.1:8080/hook", True),
        ("http://127.5.5.5/hook", True),
        ("http://[::1]/hook", True),
        ("http://localhost/hook", True),
        ("http://practice.example/hook", False),
        ("http://10.0.0.1/hook", False),
        ("ftp://practice.example/hook", False),
        ("https://u:p@practice.example/hook", False),
        ("https://practice.example/hook#x", False),
        ("https://practice.example:notaport/hook", False),
        ("", False),
    ],
)
def test_endpoints_are_https_or_loopback_http(url, ok):
    if ok:
        assert check_endpoint(url, "Subscription.endpoint") == url
    else:
        with pytest.raises(InputError) as err:
            check_endpoint(url, "Subscription.endpoint")
        assert err.value.issues[0].expression == "Subscription.endpoint"


def test_topics_are_the_two_published():
    assert {t.id: (t.resource_type, t.filters) for t in topics().values()} == {
        "continuity-note-available": ("Communication", ("patient", "category")),
        "referral-status-changed": ("Task", ("patient", "status", "business-status")),
    }


@pytest.mark.parametrize(
    ("filters", "expected"),
    [
        ((), True),
        ((("patient", ("Patient/client-1",)),), True),
        ((("patient", ("client-1",)),), True),
        ((("patient", ("https://x.example/fhir/Patient/client-1",)),), True),
        ((("patient", ("Patient/client-2",)),), False),
        ((("patient", ("Patient/client-2", "Patient/client-1")),), True),
        ((("category", ("session-dates",)),), True),
        (
            (("category", ("http://fhir-kap.example/CodeSystem/kap-information-category|session-dates",)),),
            True,
        ),
        ((("category", ("http://other.example|session-dates",)),), False),
        ((("patient", ("Patient/client-1",)), ("category", ("dosing",))), False),
    ],
)
def test_filters_match_a_note(filters, expected):
    note = fixture("Example-Communication-note-1.json", "R4")
    assert matches(filters, note) is expected
