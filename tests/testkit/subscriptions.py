"""Helpers of the Subscription tests: fixtures in a deployment's release, registering a
receiver's origin for a partner (what the operator does before a partner may subscribe to it),
and reading a notification's status (R4 backport Parameters or R5 SubscriptionStatus) as plain
values."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .bridge import load

DATA = Path(__file__).resolve().parents[1] / "data" / "subscriptions"
#: Where the fixtures' endpoints are (tests/data/subscriptions/*.json).
FIXTURE_ORIGIN = "https://practice-a.example"


def register_origin(app: Any, partner: str, *urls: str) -> None:
    """Register the origins of `urls` for `partner`'s Subscriptions on the bridge `app` (Flask),
    beside those it has: `fhir-kap partners subscription-origins` in a test."""
    from fhir_kap.storage.partners import origin_of

    partners = app.extensions["fhir_kap"].partners
    known = partners.get(partner)
    assert known is not None, partner
    found = [origin_of(u) for u in urls]
    assert all(found), urls
    partners.set_subscription_origins(partner, [*known.subscription_origins, *(o for o in found if o)])


def fixture(name: str, release: str) -> dict[str, Any]:
    """A bridge fixture in the deployment's release (R5 through its KAP record, as test_bridge_r5 does)."""
    from fhir_kap.config import Release
    from fhir_kap.records.mapping import Mapper

    if release == "R4":
        return load(name)
    mapper = Mapper.load()
    return mapper.to_fhir(mapper.from_fhir(load(name), Release.R4), Release.R5)


def sub(release: str, name: str) -> dict[str, Any]:
    """tests/data/subscriptions/Subscription-<release>-<name>.json"""
    return json.loads((DATA / f"Subscription-{release.lower()}-{name}.json").read_text())


def status_of(bundle: dict[str, Any], release: str) -> dict[str, Any]:
    """The first entry's status as {type, status, since, events: [(number, focus or None)]}."""
    res = bundle["entry"][0]["resource"]
    if release == "R5":
        return {
            "type": res["type"],
            "status": res["status"],
            "since": res["eventsSinceSubscriptionStart"],
            "events": [
                (e["eventNumber"], e.get("focus", {}).get("reference"))
                for e in res.get("notificationEvent", [])
            ],
        }
    params = res["parameter"]
    one = {
        p["name"]: next(v for k, v in p.items() if k.startswith("value")) for p in params if "part" not in p
    }
    events = []
    for p in params:
        if p["name"] == "notification-event":
            parts = {q["name"]: q for q in p["part"]}
            focus = parts.get("focus", {}).get("valueReference", {}).get("reference")
            events.append((parts["event-number"]["valueString"], focus))
    return {
        "type": one["type"],
        "status": one["status"],
        "since": one["events-since-subscription-start"],
        "events": events,
    }
