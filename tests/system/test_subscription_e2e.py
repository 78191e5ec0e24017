"""A practice's FHIR subscriber against a served bridge (`fhir-kap serve`, 2 workers), R4 and R5.

The subscriber is written from the Subscriptions R5 Backport IG and the R5 Subscription pages
only (an http.server and urllib, none of fhir-kap's client code): it takes the handshake,
heartbeats and event notifications, checks every Bundle with the base validator, notices the
events it missed while it was down (events-since-subscription-start ahead of what it saw) and
fetches them with `$events`, and never gets a note that the client's consent does not permit
that day, a revocation between the event and its delivery included. The operator registers the
subscriber's origin with `fhir-kap partners subscription-origins` while the bridge runs; once
it removes it, nothing more is posted there and the Subscription is off.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from fhir_kap.config import Release
from fhir_kap.validation import Validator
from testkit.serve import free_port, start_serve, stop
from testkit.subscriptions import fixture, sub

ROOT = Path(__file__).resolve().parents[2]
HEARTBEAT = 2


class Subscriber:
    """A rest-hook endpoint as the IG describes one: 200 to every notification while up, 503
    while down; what it got, in arrival order."""

    def __init__(self, release: str) -> None:
        self.release = release
        self.down = False
        self.bundles: list[dict[str, Any]] = []
        self.raw: list[bytes] = []
        self.headers: list[dict[str, str]] = []
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                data = self.rfile.read(int(self.headers["Content-Length"]))
                with outer.lock:
                    if not outer.down:  # a subscriber that is down takes nothing in
                        outer.raw.append(data)
                        outer.bundles.append(json.loads(data))
                        outer.headers.append(dict(self.headers))
                self.send_response(503 if outer.down else 200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/notify"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def status(self, bundle: dict[str, Any]) -> tuple[str, int, list[tuple[int, str | None]]]:
        """(type, events since start, [(event number, focus)]) of a notification, per the IG."""
        res = bundle["entry"][0]["resource"]
        if self.release == "R5":
            assert (
                bundle["type"] == "subscription-notification" and res["resourceType"] == "SubscriptionStatus"
            )
            events = [
                (int(e["eventNumber"]), e.get("focus", {}).get("reference"))
                for e in res.get("notificationEvent", [])
            ]
            return res["type"], int(res["eventsSinceSubscriptionStart"]), events
        assert bundle["type"] == "history" and res["resourceType"] == "Parameters"
        values = {p["name"]: p for p in res["parameter"]}
        events = []
        for p in res["parameter"]:
            if p["name"] == "notification-event":
                parts = {q["name"]: q for q in p["part"]}
                focus = parts.get("focus", {}).get("valueReference", {}).get("reference")
                events.append((int(parts["event-number"]["valueString"]), focus))
        return (
            values["type"]["valueCode"],
            int(values["events-since-subscription-start"]["valueString"]),
            events,
        )

    def received(self) -> list[tuple[str, int, list[tuple[int, str | None]]]]:
        with self.lock:
            return [self.status(b) for b in self.bundles]


@pytest.fixture(params=["R4", "R5"], scope="module")
def served(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Any]]:
    release = request.param
    data = tmp_path_factory.mktemp(f"subs-{release}")
    env = {
        **os.environ,
        "FHIR_KAP_DATA_DIR": str(data),
        "PYTHONPATH": str(ROOT),
        "FHIR_KAP_LOG_LEVEL": "WARNING",
        "FHIR_KAP_FHIR_VERSION": release,
    }
    env.pop("FHIR_KAP_DATABASE_URL", None)

    def partners(*args: str) -> Any:
        done = subprocess.run(
            [sys.executable, "-m", "fhir_kap.cli", "partners", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        return json.loads(done.stdout)

    def add(*args: str) -> str:
        return str(partners("add", *args)["token"])

    tokens = {
        "clinic": add(
            "clinic-ehr",
            "--scopes",
            "system/*.*",
            "kap/clinic",
            "kap/referrals.write",
            "--reference",
            "Organization/kap-clinic",
        ),
        "a": add(
            "practice-a",
            "--npi",
            "1234567893",
            "--reference",
            "Practitioner/ref-therapist",
            "PractitionerRole/ref-therapist-role",
        ),
    }
    port = free_port()
    proc = start_serve(env, port, data / "serve.log", "--workers", "2")
    try:
        yield {
            "release": release,
            "base": f"http://127.0.0.1:{port}/fhir",
            "tokens": tokens,
            "log": data / "serve.log",
            "partners": partners,
        }
    finally:
        stop([proc])


def _call(served: dict[str, Any], who: str, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    req = urllib.request.Request(
        served["base"] + path,
        data=None if body is None else json.dumps(body).encode(),
        method=method,
        headers={
            "Authorization": f"Bearer {served['tokens'][who]}",
            "Content-Type": "application/fhir+json",
            "Accept": "application/fhir+json",
        },
    )
    try:
        with urllib.request.urlopen(req, timeout=15) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"null")


def _wait(predicate, what: str, timeout: float = 40.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


@pytest.mark.slow
def test_a_subscriber_written_from_the_ig_gets_what_it_may_and_catches_up(served):
    release = served["release"]
    validator = Validator.load(Release.parse(release))
    subscriber = Subscriber(release)
    try:
        _scenario(served, release, subscriber, validator)
    finally:
        subscriber.server.shutdown()


def _scenario(served: dict[str, Any], release: str, subscriber: Subscriber, validator: Validator) -> None:
    def note(ident: str) -> str:
        body = fixture("Example-Communication-note-1.json", release)
        body["identifier"][0]["value"] = ident
        status, created = _call(served, "clinic", "POST", "/Communication", body)
        assert status == 201, created
        return f"{served['base']}/Communication/{created['id']}"

    # The operator registers the subscriber's origin (while the bridge runs), then it subscribes:
    # id-only, this client's notes, a heartbeat every 2 s.
    origin = subscriber.url.rsplit("/", 1)[0]
    listed = served["partners"]("subscription-origins", "practice-a", origin)
    assert listed["subscription_origins"] == [origin]
    body = sub(release, "note")
    if release == "R4":
        body["channel"]["endpoint"] = subscriber.url
        for ext in body["channel"]["extension"]:
            if ext["url"].endswith("backport-heartbeat-period"):
                ext["valueUnsignedInt"] = HEARTBEAT
    else:
        body["endpoint"] = subscriber.url
        body["heartbeatPeriod"] = HEARTBEAT
    status, created = _call(served, "a", "POST", "/Subscription", body)
    assert status == 201 and created["status"] == "requested", created
    sid = created["id"]
    _wait(lambda: any(k == "handshake" for k, _, _ in subscriber.received()), "the handshake")
    _wait(lambda: _call(served, "a", "GET", f"/Subscription/{sid}")[1]["status"] == "active", "active")
    assert (
        subscriber.headers[0]["Authorization"] == "Bearer practice-a-receiver-secret"
    )  # the header it asked for

    # An event the consent permits names the note.
    assert _call(served, "clinic", "POST", "/Consent", fixture("Consent-open-ended.json", release))[0] == 201
    first = note("e2e-1")
    _wait(lambda: any(k == "event-notification" for k, _, _ in subscriber.received()), "event 1")
    assert [ev for k, _, evs in subscriber.received() if k == "event-notification" for ev in evs] == [
        (1, first)
    ]

    # Heartbeats while nothing else is sent.
    _wait(lambda: any(k == "heartbeat" for k, _, _ in subscriber.received()), "a heartbeat", timeout=15)

    # Down while two notes arrive; back up, it sees it is behind and catches up with $events.
    subscriber.down = True
    second, third = note("e2e-2"), note("e2e-3")
    time.sleep(1.0)
    subscriber.down = False
    seen = {n: f for k, _, evs in subscriber.received() for n, f in evs}
    _wait(lambda: max(s for _, s, _ in subscriber.received()) >= 3, "a notification showing 3 events")
    behind = max(s for _, s, _ in subscriber.received())
    status, replay = _call(
        served,
        "a",
        "GET",
        f"/Subscription/{sid}/$events?eventsSinceNumber={max(seen) + 1}&eventsUntilNumber={behind}",
    )
    assert status == 200
    assert [e for e in validator.validate(replay, profile=False) if e.is_error] == []
    kind, _, events = subscriber.status(replay)
    assert kind == "query-event" and events == [(2, second), (3, third)]

    # Revoked between the event and its delivery: the event keeps its number, never its note.
    subscriber.down = True
    fourth = note("e2e-4")
    time.sleep(0.5)
    assert (
        _call(served, "clinic", "POST", "/Consent", fixture("Consent-deny-ref-therapist.json", release))[0]
        == 201
    )
    subscriber.down = False
    _wait(lambda: any(n == 4 for _, _, evs in subscriber.received() for n, _ in evs), "event 4 delivered")
    assert [f for _, _, evs in subscriber.received() for n, f in evs if n == 4] == [None]
    status, replay = _call(served, "a", "GET", f"/Subscription/{sid}/$events?eventsSinceNumber=4")
    assert status == 200 and subscriber.status(replay)[2] == [(4, None)]
    # A note after the revocation is no event at all.
    fifth = note("e2e-5")
    time.sleep(2 * HEARTBEAT)
    status, found = _call(served, "a", "GET", f"/Subscription/{sid}/$status")
    res = found["entry"][0]["resource"]
    since = (
        res["eventsSinceSubscriptionStart"]
        if release == "R5"
        else next(
            p["valueString"] for p in res["parameter"] if p["name"] == "events-since-subscription-start"
        )
    )
    assert status == 200 and int(since) == 4

    # Every notification was valid FHIR, of the IG's kinds; the denied notes were never named.
    with subscriber.lock:
        bundles, raw = list(subscriber.bundles), list(subscriber.raw)
    kinds = {subscriber.status(b)[0] for b in bundles}
    assert kinds <= {"handshake", "heartbeat", "event-notification"} and "heartbeat" in kinds
    for bundle in bundles:
        assert [e for e in validator.validate(bundle, profile=False) if e.is_error] == []
    for denied in (fourth, fifth):
        assert not any(denied.rsplit("/", 1)[1].encode() in r for r in raw)
        assert denied.rsplit("/", 1)[1] not in json.dumps(replay)

    # The operator removes the registration: the next notification (a heartbeat) is not sent,
    # the Subscription is off, and it cannot be pointed there again.
    served["partners"]("subscription-origins", "practice-a")
    _wait(lambda: _call(served, "a", "GET", f"/Subscription/{sid}")[1]["status"] == "off", "off", timeout=15)
    count = len(subscriber.received())
    time.sleep(2 * HEARTBEAT)
    status, shown = _call(served, "a", "GET", f"/Subscription/{sid}")
    assert status == 200 and shown["status"] == "off" and len(subscriber.received()) == count
    if release == "R4":
        assert shown["error"] == "delivery stopped (subscription:endpoint-not-registered)"
    shown.update(status="requested")
    status, refused = _call(served, "a", "PUT", f"/Subscription/{sid}", shown)
    assert status == 422 and "subscription:endpoint-not-registered" in json.dumps(refused)
