"""Subscription notifications through the durable rest-hook queue: handshake (requested -> active,
or error/off), events in order, a failing endpoint retried, a redirect refused, consent asked
again at send time, heartbeats, an endpoint whose origin the operator no longer registers (or of
a revoked partner) posted nothing more, and the legacy hook untouched beside them."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest

from fhir_kap.fhir.retry import Backoff
from testkit.bridge import FHIR, load
from testkit.receiver import ScriptedReceiver
from testkit.subscriptions import FIXTURE_ORIGIN, fixture, register_origin, sub


class Receiver(ScriptedReceiver):
    """A subscriber's endpoint answering from a script of statuses (then 200)."""

    def bundles(self) -> list[dict[str, Any]]:
        return self.bodies()

    def kinds(self, release: str) -> list[str]:
        return [_kind(b, release) for b in self.bundles()]


def _kind(bundle: dict[str, Any], release: str) -> str:
    res = bundle["entry"][0]["resource"]
    if release == "R5":
        return res["type"]
    return next(p["valueCode"] for p in res["parameter"] if p["name"] == "type")


def _focus(bundle: dict[str, Any], release: str) -> list[str | None]:
    res = bundle["entry"][0]["resource"]
    if release == "R5":
        return [e.get("focus", {}).get("reference") for e in res.get("notificationEvent", [])]
    out = []
    for p in res["parameter"]:
        if p["name"] == "notification-event":
            parts = {q["name"]: q for q in p["part"]}
            out.append(parts.get("focus", {}).get("valueReference", {}).get("reference"))
    return out


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.server.shutdown()


@pytest.fixture(params=["R4", "R5"])
def release(request: pytest.FixtureRequest) -> str:
    return request.param


class App:
    def __init__(self, tmp_path, release: str) -> None:
        from fhir_kap.bridge import BridgeOptions, create_app
        from fhir_kap.config import load_settings
        from fhir_kap.storage.db import Database
        from fhir_kap.storage.partners import Partners

        settings = load_settings(env={}, data_dir=tmp_path / "data", fhir_version=release)
        registry = Partners(Database(settings.db_url))
        self.tokens = {
            "clinic": registry.add(
                "clinic-ehr",
                scopes="system/*.* kap/clinic kap/referrals.write",
                references=["Organization/kap-clinic"],
            )[1],
            "a": registry.add(
                "practice-a",
                npis=["1234567893"],
                references=["Practitioner/ref-therapist", "PractitionerRole/ref-therapist-role"],
            )[1],
        }
        self.release = release
        self.app = create_app(settings, BridgeOptions(base_url="http://bridge.test/fhir", webhook_timeout=2))
        self.client = self.app.test_client()
        self.notifier = self.app.extensions["fhir_kap"].inbound.notifier
        self.subs = self.app.extensions["fhir_kap"].events.subs

    def post(self, who: str, path: str, body: Any):
        return self.client.post(
            path,
            data=json.dumps(body),
            headers={"Authorization": f"Bearer {self.tokens[who]}", "Content-Type": FHIR},
        )

    def get(self, who: str, path: str):
        return self.client.get(path, headers={"Authorization": f"Bearer {self.tokens[who]}"})

    def subscribe(self, url: str, name: str = "note", **changes: Any) -> str:
        body = sub(self.release, name)
        if self.release == "R4":
            body["channel"]["endpoint"] = url
            body["channel"].pop("header", None)
        else:
            body["endpoint"] = url
            body.pop("parameter", None)
        body.update(changes)
        register_origin(self.app, "practice-a", url)  # the operator registered the receiver first
        resp = self.post("a", "/fhir/Subscription", body)
        assert resp.status_code == 201, resp.get_data(as_text=True)
        return resp.get_json()["id"]

    def status(self, sid: str) -> str:
        return self.get("a", f"/fhir/Subscription/{sid}").get_json()["status"]

    def note(self, ident: str = "n1") -> str:
        note = fixture("Example-Communication-note-1.json", self.release)
        note["identifier"][0]["value"] = ident
        resp = self.post("clinic", "/fhir/Communication", note)
        assert resp.status_code == 201, resp.get_data(as_text=True)
        return resp.get_json()["id"]

    def wait(self, predicate, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            assert time.monotonic() < deadline, "timed out"
            self.notifier.drain(timeout=1)
            time.sleep(0.02)


@pytest.fixture
def app(tmp_path, release) -> Iterator[App]:
    a = App(tmp_path, release)
    yield a
    a.notifier.stop()


def test_the_handshake_activates_a_subscription_and_events_follow_in_order(app, receiver, release):
    sid = app.subscribe(receiver.url)
    app.wait(lambda: app.status(sid) == "active")
    assert receiver.kinds(release) == ["handshake"]
    hs = receiver.bundles()[0]
    assert hs["type"] == ("history" if release == "R4" else "subscription-notification")
    assert app.post("clinic", "/fhir/Consent", fixture("Consent-open-ended.json", release)).status_code == 201
    first, second = app.note("n1"), app.note("n2")
    app.wait(lambda: len(receiver.bundles()) == 3)
    events = sorted((_focus(b, release) for b in receiver.bundles()[1:]), key=str)
    assert events == sorted(
        [
            [f"http://bridge.test/fhir/Communication/{first}"],
            [f"http://bridge.test/fhir/Communication/{second}"],
        ],
        key=str,
    )
    assert {j.state for j in app.notifier.jobs()} == {"delivered"}


def test_a_refused_handshake_puts_the_subscription_in_error_then_off(app, receiver, release):
    app.notifier.backoff = Backoff(base=0.01, cap=0.01)
    app.notifier.max_attempts = 2
    receiver.script = [(503, {}), (503, {})]
    sid = app.subscribe(receiver.url)
    app.wait(lambda: app.status(sid) == "off")
    (job,) = app.notifier.jobs()
    assert job.state == "dead" and "gave up" in job.last_error
    assert receiver.kinds(release) == ["handshake", "handshake"]


def test_a_failed_attempt_is_error_and_a_later_success_is_active_again(app, receiver, release):
    app.notifier.backoff = Backoff(base=0.2, cap=0.2)
    receiver.script = [(503, {})]
    sid = app.subscribe(receiver.url)
    app.wait(lambda: app.status(sid) == "error")
    app.wait(lambda: app.status(sid) == "active")


def test_a_redirect_is_never_followed_and_the_subscription_goes_off(app, receiver, release):
    receiver.script = [(307, {"Location": "https://elsewhere.example/"})]
    sid = app.subscribe(receiver.url)
    app.wait(lambda: app.status(sid) == "off")
    (job,) = app.notifier.jobs()
    assert job.state == "dead" and "redirects are not followed" in job.last_error
    if release == "R4":  # R4 has Subscription.error
        shown = app.get("a", f"/fhir/Subscription/{sid}").get_json()
        assert shown["error"] == "delivery given up (307)"
    assert len(receiver.bundles()) == 1


def test_consent_revoked_between_event_and_delivery_sends_the_event_without_the_note(app, receiver, release):
    sid = app.subscribe(receiver.url)
    app.wait(lambda: app.status(sid) == "active")
    app.notifier.backoff = Backoff(base=3600.0, cap=3600.0)
    receiver.script = [(503, {})]  # the event's first try fails: it waits for a retry
    assert app.post("clinic", "/fhir/Consent", fixture("Consent-open-ended.json", release)).status_code == 201
    nid = app.note()
    app.wait(lambda: len(receiver.bundles()) == 2)
    assert _focus(receiver.bundles()[1], release) == [f"http://bridge.test/fhir/Communication/{nid}"]
    assert (
        app.post("clinic", "/fhir/Consent", fixture("Consent-deny-ref-therapist.json", release)).status_code
        == 201
    )
    app.notifier.db.execute("UPDATE webhook_jobs SET next_attempt_at = 0")
    app.wait(lambda: len(receiver.bundles()) == 3)
    retried = receiver.bundles()[2]
    assert _focus(retried, release) == [None] and nid not in json.dumps(retried)
    assert len(retried["entry"]) == 1


def test_heartbeats_come_when_nothing_else_was_sent(app, receiver, release):
    ext = "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/backport-heartbeat-period"
    if release == "R4":
        body = sub(release, "note")
        sid = app.subscribe(
            receiver.url,
            channel={
                **body["channel"],
                "endpoint": receiver.url,
                "extension": [{"url": ext, "valueUnsignedInt": 1}],
            },
        )
    else:
        sid = app.subscribe(receiver.url, heartbeatPeriod=1)
    app.wait(lambda: app.status(sid) == "active")
    app.notifier.ensure_started()
    deadline = time.monotonic() + 8
    while receiver.kinds(release).count("heartbeat") < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert receiver.kinds(release)[0] == "handshake"
    assert receiver.kinds(release).count("heartbeat") >= 2


def test_a_deleted_subscription_gets_nothing_more(app, receiver, release):
    app.notifier.backoff = Backoff(base=3600.0, cap=3600.0)
    receiver.script = [(503, {})]
    sid = app.subscribe(receiver.url)
    app.wait(lambda: app.status(sid) == "error")
    assert (
        app.client.delete(
            f"/fhir/Subscription/{sid}", headers={"Authorization": f"Bearer {app.tokens['a']}"}
        ).status_code
        == 204
    )
    app.notifier.db.execute("UPDATE webhook_jobs SET next_attempt_at = 0")
    app.wait(lambda: app.notifier.jobs()[0].state == "dead")
    assert "deleted" in app.notifier.jobs()[0].last_error and len(receiver.bundles()) == 1


def test_the_legacy_hook_still_works_beside_subscriptions(tmp_path, receiver, release):
    """A partner registered with a webhook (the custom rest-hook) still gets {"event", "resource"}."""
    from fhir_kap.bridge import BridgeOptions, create_app
    from fhir_kap.config import load_settings
    from fhir_kap.storage.db import Database
    from fhir_kap.storage.partners import Partners

    settings = load_settings(env={}, data_dir=tmp_path / "data", fhir_version=release)
    registry = Partners(Database(settings.db_url))
    clinic = registry.add(
        "clinic-ehr", scopes="system/*.* kap/clinic", references=["Organization/kap-clinic"]
    )[1]
    registry.add(
        "practice-a",
        npis=["1234567893"],
        references=["Practitioner/ref-therapist", "PractitionerRole/ref-therapist-role"],
        webhook_url=receiver.url,
    )
    app = create_app(settings, BridgeOptions(base_url="http://bridge.test/fhir", webhook_timeout=2))
    c = app.test_client()
    h = {"Authorization": f"Bearer {clinic}", "Content-Type": FHIR}
    assert (
        c.post(
            "/fhir/Consent", data=json.dumps(fixture("Consent-open-ended.json", release)), headers=h
        ).status_code
        == 201
    )
    resp = c.post(
        "/fhir/Communication",
        data=json.dumps(fixture("Example-Communication-note-1.json", release)),
        headers=h,
    )
    assert resp.status_code == 201
    notifier = app.extensions["fhir_kap"].inbound.notifier
    assert notifier.drain(timeout=10)
    assert receiver.bundles() == [
        {"event": "communication-available", "resource": f"Communication/{resp.get_json()['id']}"}
    ]
    notifier.stop()
    assert load  # the fixtures module is the bridge's


def test_a_subscription_past_its_end_is_turned_off(app, receiver, release):
    sid = app.subscribe(receiver.url, end="2020-01-01T00:00:00Z")
    app.notifier.tick()  # each sender round turns off what has ended
    assert app.status(sid) == "off"
    assert app.post("clinic", "/fhir/Consent", fixture("Consent-open-ended.json", release)).status_code == 201
    app.note()
    assert app.subs.get(sid).events == 0  # an `off` Subscription counts no events


def test_an_event_waits_for_the_handshake_without_spending_attempts(tmp_path, receiver):
    """A channel that is not ready defers its job: due again later, the attempt not counted."""
    from fhir_kap.exchange.webhooks import Deferred, Notifier, Prepared
    from fhir_kap.storage.db import Database

    answers: list[Any] = [Deferred(0.0), Deferred(0.0), Prepared(receiver.url, b"{}", {}, 2.0)]
    outcomes: list[str] = []

    class Channel:
        prefix = "subscription-"

        def prepare(self, job, default_timeout):
            return answers.pop(0)

        def outcome(self, job, state, status):
            outcomes.append(state)

        def tick(self, now):
            return None

    notifier = Notifier(timeout=2, db=Database(f"sqlite:///{tmp_path / 'q.db'}"), max_attempts=1)
    notifier.add_channel(Channel())
    notifier.enqueue("practice-a", "subscription-event", "Subscription/s1", "1")
    for _ in range(3):
        notifier.run_due()
    (job,) = notifier.jobs()
    assert (job.state, job.attempts, outcomes) == ("delivered", 1, ["delivered"])  # one real attempt
    assert len(receiver.bundles()) == 1


def test_events_of_a_requested_subscription_are_held_until_it_is_active(tmp_path, release):
    from fhir_kap.exchange.webhooks import Deferred, Prepared
    from fhir_kap.storage.webhooks import WebhookJob
    from testkit.bridge import make_bridge

    b = make_bridge(tmp_path, fhir_version=release, consent=fixture("Consent-open-ended.json", release))
    register_origin(b.app, "practice-a", FIXTURE_ORIGIN)
    body = sub(release, "note")
    sid = b.post("a", "/fhir/Subscription", body).get_json()["id"]
    note = fixture("Example-Communication-note-1.json", release)
    assert b.post("clinic", "/fhir/Communication", note).status_code == 201
    sink = b.app.extensions["fhir_kap"].events
    job = WebhookJob(
        1, "practice-a", "subscription-event", f"Subscription/{sid}", "1", "sending", 1, 0.0, None, None
    )
    assert isinstance(sink.channel.prepare(job, 5.0), Deferred)  # still `requested`: no handshake yet
    sink.subs.set_status(sid, "active", now=time.time())
    prepared = sink.channel.prepare(job, 5.0)
    assert (
        isinstance(prepared, Prepared)
        and prepared.headers["Authorization"] == "Bearer practice-a-receiver-secret"
    )
    assert prepared.timeout == 5.0 and prepared.url == "https://practice-a.example/fhir/notify"
    sink.subs.set_status(sid, "off", now=time.time())
    assert sink.channel.prepare(job, 5.0) == "the subscription is off"


def test_a_registration_removed_stops_the_next_notification_and_turns_the_subscription_off(
    app, receiver, release
):
    """The sender checks the endpoint's origin again before each post: the operator removed it
    (`fhir-kap partners subscription-origins practice-a`, another process) after the handshake."""
    from fhir_kap.storage.db import Database
    from fhir_kap.storage.partners import Partners

    sid = app.subscribe(receiver.url)
    app.wait(lambda: app.status(sid) == "active")
    Partners(Database(app.notifier.db.url)).set_subscription_origins("practice-a", [])
    assert app.post("clinic", "/fhir/Consent", fixture("Consent-open-ended.json", release)).status_code == 201
    app.note()
    app.wait(lambda: any(j.state == "dead" for j in app.notifier.jobs()))
    assert receiver.kinds(release) == ["handshake"]  # the event was never posted
    dead = [j for j in app.notifier.jobs() if j.state == "dead"]
    assert [(j.event, j.last_error) for j in dead] == [
        ("subscription-event", "subscription:endpoint-not-registered")
    ]
    assert app.status(sid) == "off"
    shown = app.get("a", f"/fhir/Subscription/{sid}").get_json()
    if release == "R4":  # R4 has Subscription.error
        assert shown["error"] == "delivery stopped (subscription:endpoint-not-registered)"
    status = app.get("a", f"/fhir/Subscription/{sid}/$status").get_json()["entry"][0]["resource"]
    assert (
        status.get("status") or next(p["valueCode"] for p in status["parameter"] if p["name"] == "status")
    ) == "off"
    # Registered again, the partner asks for a new handshake and is active again.
    shown["status"] = "requested"
    shown.pop("error", None)
    register_origin(app.app, "practice-a", receiver.url)
    resp = app.client.put(
        f"/fhir/Subscription/{sid}",
        data=json.dumps(shown),
        headers={"Authorization": f"Bearer {app.tokens['a']}", "Content-Type": FHIR},
    )
    assert resp.status_code == 200, resp.get_data(as_text=True)
    app.wait(lambda: app.status(sid) == "active")
    assert receiver.kinds(release) == ["handshake", "handshake"]


def test_a_revoked_partners_subscription_gets_nothing_more_and_is_off(app, receiver, release):
    sid = app.subscribe(receiver.url)
    app.wait(lambda: app.status(sid) == "active")
    app.notifier.backoff = Backoff(base=3600.0, cap=3600.0)
    receiver.script = [(503, {})]  # the event's first try fails: it waits for a retry
    assert app.post("clinic", "/fhir/Consent", fixture("Consent-open-ended.json", release)).status_code == 201
    app.note()
    app.wait(lambda: len(receiver.bundles()) == 2 and app.status(sid) == "error")
    app.app.extensions["fhir_kap"].partners.revoke("practice-a")
    app.notifier.db.execute("UPDATE webhook_jobs SET next_attempt_at = 0")
    app.wait(lambda: any(j.state == "dead" for j in app.notifier.jobs()))
    assert receiver.kinds(release) == ["handshake", "event-notification"]  # nothing after the revocation
    assert [j.last_error for j in app.notifier.jobs() if j.state == "dead"] == [
        "subscription:partner-revoked"
    ]
    assert app.subs.get(sid).status == "off"
