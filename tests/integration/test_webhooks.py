"""Rest-hooks are durable: queued with the write they announce, retried, dead-lettered, never lost in a crash."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fhir_kap.exchange.webhooks import EVENT_COMMUNICATION, EVENT_TASK, Notifier, sign
from fhir_kap.fhir.retry import Backoff
from fhir_kap.storage.db import Database
from testkit.bridge import FHIR, load
from testkit.receiver import ScriptedReceiver


class Receiver(ScriptedReceiver):
    """A partner's webhook endpoint that answers from a script: [(status, headers), ...], then 204."""

    def __init__(self) -> None:
        super().__init__(204, "/hook")


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.server.shutdown()


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


def _notifier(db: Database, url: str | None, clock: Clock | None = None, **kw) -> Notifier:
    """A notifier on the `db` fixture's database: SQLite and PostgreSQL."""
    targets = {"practice-a": (url, "s3cret")} if url else {}
    return Notifier(timeout=2, db=db, resolve=targets.get, clock=clock or time.time, **kw)


def _run_until_quiet(n: Notifier, clock: Clock, rounds: int = 20) -> None:
    for _ in range(rounds):
        n.run_due()
        clock.now += 1000  # past any back-off


def test_a_hook_that_answers_503_is_retried_until_it_takes_the_notification(db, receiver):
    clock = Clock()
    n = _notifier(db, receiver.url, clock)
    receiver.script = [(503, {}), (502, {})]
    assert n.enqueue("practice-a", EVENT_COMMUNICATION, "Communication/c1", "1")
    assert n.run_due() == 1
    (job,) = n.jobs()
    assert (job.state, job.attempts, job.last_status, job.last_error) == ("pending", 1, 503, "HTTP 503")
    assert job.next_attempt_at > clock.now  # backed off, not hammered
    assert n.run_due() == 0  # not due yet
    _run_until_quiet(n, clock)
    (job,) = n.jobs()
    assert (job.state, job.attempts, job.last_status) == ("delivered", 3, 204)
    assert receiver.bodies() == [{"event": EVENT_COMMUNICATION, "resource": "Communication/c1"}] * 3
    headers, body = receiver.received[-1]
    assert headers["X-KAP-Signature"] == sign("s3cret", headers["X-KAP-Timestamp"], body)


def test_retry_after_on_429_is_honoured(db, receiver):
    clock = Clock()
    n = _notifier(db, receiver.url, clock, backoff=Backoff(base=1.0))
    receiver.script = [(429, {"Retry-After": "120"})]
    n.enqueue("practice-a", EVENT_COMMUNICATION, "Communication/c1", "1")
    n.run_due()
    (job,) = n.jobs()
    assert job.state == "pending" and job.next_attempt_at >= clock.now + 120


@pytest.mark.parametrize(
    "header, waits",
    [
        ("Wed, 21 Oct 2099 07:28:00 GMT", 86_400.0),  # an HTTP date far ahead: honoured up to a day
        ("99999999999", 86_400.0),  # more seconds than a day
        ("inf", None),  # unreadable: the back-off decides (it once meant 'never', stranding the job)
    ],
)
def test_no_retry_after_puts_a_job_off_for_ever(db, receiver, header, waits):
    clock = Clock()
    n = _notifier(db, receiver.url, clock, backoff=Backoff(base=1.0, cap=300.0, jitter=0))
    receiver.script = [(429, {"Retry-After": header})]
    n.enqueue("practice-a", EVENT_COMMUNICATION, "Communication/c1", "1")
    n.run_due()
    (job,) = n.jobs()
    assert job.state == "pending"
    assert job.next_attempt_at - clock.now == (waits if waits is not None else 1.0)


def test_a_job_that_fails_on_this_side_is_given_up_after_the_attempt_limit(db, receiver):
    """An error before anything is sent (here the partner lookup) counts as an attempt like a
    receiver's 503: retried with back-off, then dead-lettered, never retried for ever."""
    clock = Clock()
    n = _notifier(db, receiver.url, clock, max_attempts=3)

    def broken(name: str):
        raise RuntimeError("partner store unavailable")

    n.resolve = broken
    n.enqueue("practice-a", EVENT_COMMUNICATION, "Communication/c1", "1")
    _run_until_quiet(n, clock)
    (job,) = n.jobs()
    assert (job.state, job.attempts) == ("dead", 3)
    assert job.last_error == "RuntimeError; gave up after 3 attempts"  # the type only, never a message
    assert receiver.bodies() == []


def test_a_refusing_hook_is_dead_lettered_at_once_and_a_down_one_after_the_attempt_limit(db, receiver):
    clock = Clock()
    n = _notifier(db, receiver.url, clock, max_attempts=3)
    receiver.script = [(410, {})]
    n.enqueue("practice-a", EVENT_COMMUNICATION, "Communication/refused", "1")
    n.run_due()
    (job,) = n.jobs("dead")
    assert (job.resource, job.attempts, job.last_status) == ("Communication/refused", 1, 410)

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        down = f"http://127.0.0.1:{s.getsockname()[1]}/hook"
    n.resolve = {"practice-a": (down, None)}.get
    n.enqueue("practice-a", EVENT_COMMUNICATION, "Communication/down", "1")
    _run_until_quiet(n, clock)
    (job,) = (j for j in n.jobs() if j.resource == "Communication/down")
    assert (job.state, job.attempts, job.last_status) == ("dead", 3, None)
    assert "gave up after 3 attempts" in job.last_error


@pytest.mark.parametrize(
    "status, state",
    [(408, "pending"), (500, "pending"), (507, "pending"), (501, "dead"), (505, "dead"), (404, "dead")],
)
def test_which_answers_are_tried_again_later_is_the_outbox_rule(db, receiver, status, state):
    clock = Clock()
    n = _notifier(db, receiver.url, clock)
    receiver.script = [(status, {})]
    n.enqueue("practice-a", EVENT_COMMUNICATION, "Communication/c1", "1")
    n.run_due()
    (job,) = n.jobs()
    assert (job.state, job.attempts, job.last_status) == (state, 1, status)


def test_a_partner_without_a_webhook_any_more_gets_nothing(db, receiver):
    n = _notifier(db, None)
    n.enqueue("practice-a", EVENT_COMMUNICATION, "Communication/c1", "1")
    n.run_due()
    (job,) = n.jobs()
    assert job.state == "dead" and "revoked or removed" in job.last_error
    assert receiver.received == []


def test_the_same_event_is_queued_once_per_version(db):
    n = _notifier(db, None)
    assert n.enqueue("practice-a", EVENT_TASK, "Task/t1", "2")
    assert not n.enqueue("practice-a", EVENT_TASK, "Task/t1", "2")
    assert n.enqueue("practice-a", EVENT_TASK, "Task/t1", "3")
    assert [j.version for j in n.jobs()] == ["2", "3"]


def test_counts_are_per_partner_and_state_uncapped(db):
    from fhir_kap.storage.webhooks import WebhookJobs

    jobs = WebhookJobs(db)
    for v in range(1_005):
        jobs.enqueue("practice-a", EVENT_TASK, "Task/t1", str(v), now=0.0)
    jobs.enqueue("practice-b", EVENT_TASK, "Task/t2", "1", now=0.0)
    assert jobs.counts() == {"practice-a": {"pending": 1_005}, "practice-b": {"pending": 1}}


def test_a_job_whose_sender_died_mid_post_is_sent_again_after_its_lease(db, receiver):
    clock = Clock()
    n = _notifier(db, receiver.url, clock)
    n.enqueue("practice-a", EVENT_COMMUNICATION, "Communication/c1", "1")
    # What a sender that crashed after claiming leaves behind:
    n.db.execute(
        "UPDATE webhook_jobs SET state = 'sending', lease_owner = 'dead-worker', lease_until = ?, "
        "attempts = 1",
        (clock.now + 60,),
    )
    other = _notifier(db, receiver.url, clock)
    assert other.run_due() == 0  # still leased
    clock.now += 61
    assert other.run_due() == 1
    (job,) = other.jobs()
    assert (job.state, job.attempts) == ("delivered", 2)
    assert len(receiver.received) == 1


def test_two_senders_on_one_queue_post_each_job_once(db, receiver):
    first = _notifier(db, receiver.url)
    for i in range(40):
        first.enqueue("practice-a", EVENT_COMMUNICATION, f"Communication/c{i}", "1")
    second = _notifier(db, receiver.url)
    threads = [
        threading.Thread(target=lambda n=n: [n.run_due(limit=3) for _ in range(30)]) for n in (first, second)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert sorted(b["resource"] for b in receiver.bodies()) == sorted(
        f"Communication/c{i}" for i in range(40)
    )
    assert {j.state for j in first.jobs(limit=100)} == {"delivered"}


# ---- through the bridge


def _bridge(tmp_path: Path, url: str):
    from fhir_kap.bridge import BridgeOptions, create_app
    from fhir_kap.config import load_settings
    from fhir_kap.storage.partners import Partners

    settings = load_settings(env={}, data_dir=tmp_path / "data")
    partners = Partners(Database(settings.db_url))
    tokens = {}
    if partners.get("clinic-ehr") is None:
        tokens["clinic"] = partners.add(
            "clinic-ehr",
            scopes="system/*.* kap/clinic kap/referrals.write",
            references=["Organization/kap-clinic"],
        )[1]
        tokens["a"] = partners.add(
            "practice-a",
            npis=["1234567893"],
            references=["Practitioner/ref-therapist", "PractitionerRole/ref-therapist-role"],
            webhook_url=url,
        )[1]
    app = create_app(settings, BridgeOptions(base_url="http://bridge.test/fhir", webhook_timeout=2))
    return app, tokens


def _post(app, token: str, path: str, body: dict):
    return app.test_client().post(
        path, data=json.dumps(body), headers={"Authorization": f"Bearer {token}", "Content-Type": FHIR}
    )


def test_a_note_accepted_while_the_hook_was_down_is_announced_by_the_next_process(tmp_path, receiver):
    app, tokens = _bridge(tmp_path, receiver.url)
    notifier = app.extensions["fhir_kap"].inbound.notifier
    notifier.backoff = Backoff(base=3600.0, cap=3600.0)  # this process will not try again in time
    receiver.script = [(503, {})]
    assert _post(app, tokens["clinic"], "/fhir/Consent", load("Consent-open-ended.json")).status_code == 201
    note = _post(app, tokens["clinic"], "/fhir/Communication", load("Example-Communication-note-1.json"))
    assert note.status_code == 201
    assert notifier.drain(timeout=10)
    (job,) = notifier.jobs()
    assert (job.state, job.last_status) == ("pending", 503)
    notifier.stop()  # the process "crashes"; its queue is in the database

    later, _ = _bridge(tmp_path, receiver.url)
    successor = later.extensions["fhir_kap"].inbound.notifier
    successor.db.execute("UPDATE webhook_jobs SET next_attempt_at = 0")  # the back-off has passed
    assert later.test_client().get("/healthz").status_code == 200  # any request starts the sender
    deadline = time.monotonic() + 10
    while successor.jobs()[0].state != "delivered" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert successor.jobs()[0].state == "delivered"
    ref = f"Communication/{note.get_json()['id']}"
    assert receiver.bodies() == [{"event": EVENT_COMMUNICATION, "resource": ref}] * 2
    successor.stop()


def test_a_hook_job_exists_exactly_when_its_note_was_created(tmp_path, receiver):
    app, tokens = _bridge(tmp_path, receiver.url)
    notifier = app.extensions["fhir_kap"].inbound.notifier
    assert _post(app, tokens["clinic"], "/fhir/Consent", load("Consent-open-ended.json")).status_code == 201
    note = load("Example-Communication-note-1.json")
    ident = note["identifier"][0]
    cond = {"If-None-Exist": f"identifier={ident['system']}|{ident['value']}"}
    for expected in (201, 200):  # the second POST finds the first: no new note, no second job
        resp = app.test_client().post(
            "/fhir/Communication",
            data=json.dumps(note),
            headers={"Authorization": f"Bearer {tokens['clinic']}", "Content-Type": FHIR, **cond},
        )
        assert resp.status_code == expected
    bad = dict(note, status="bogus")
    assert _post(app, tokens["clinic"], "/fhir/Communication", bad).status_code == 422
    assert notifier.drain(timeout=10)
    assert [(j.event, j.state) for j in notifier.jobs()] == [(EVENT_COMMUNICATION, "delivered")]
    notifier.stop()


def test_each_referral_status_move_is_announced_to_the_referring_practice(tmp_path, receiver):
    app, tokens = _bridge(tmp_path, receiver.url)
    notifier = app.extensions["fhir_kap"].inbound.notifier
    referral = _post(app, tokens["a"], "/fhir/ServiceRequest", load("Example-ServiceRequest-referral-1.json"))
    assert referral.status_code == 201, referral.get_data(as_text=True)
    rid = referral.get_json()["id"]
    for status in ("accepted", "scheduled"):
        moved = app.test_client().post(
            f"/kap/referrals/{rid}/status",
            json={"status": status},
            headers={"Authorization": f"Bearer {tokens['clinic']}"},
        )
        assert moved.status_code == 200, moved.get_data(as_text=True)
    assert notifier.drain(timeout=10)
    tasks = [j for j in notifier.jobs() if j.event == EVENT_TASK]
    assert [(j.version, j.state) for j in tasks] == [("2", "delivered"), ("3", "delivered")]
    assert {b["resource"] for b in receiver.bodies()} == {tasks[0].resource}
    notifier.stop()


def test_partners_webhooks_lists_the_queue_and_puts_a_dead_job_back(tmp_path, monkeypatch, capsys):
    from fhir_kap.cli import main
    from fhir_kap.config import load_settings

    monkeypatch.delenv("FHIR_KAP_DATABASE_URL", raising=False)
    monkeypatch.delenv("FHIR_KAP_CONFIG", raising=False)
    monkeypatch.setenv("FHIR_KAP_DATA_DIR", str(tmp_path / "data"))
    n = _notifier(Database(load_settings().db_url), None)
    n.enqueue("practice-a", EVENT_COMMUNICATION, "Communication/c1", "1")
    n.run_due()  # no webhook for practice-a: dead
    assert main(["partners", "webhooks", "--state", "dead"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [(j["resource"], j["state"], j["attempts"]) for j in listed] == [("Communication/c1", "dead", 1)]
    assert "s3cret" not in json.dumps(listed)
    assert main(["partners", "webhooks", "--retry", str(listed[0]["id"])]) == 0
    moved = json.loads(capsys.readouterr().out)
    assert moved["state"] == "pending" and moved["attempts"] == 0 and moved["last_error"] is None
    assert main(["partners", "webhooks", "--retry", str(listed[0]["id"])]) != 0  # only a dead job goes back
    assert "webhook:not-dead" in capsys.readouterr().err  # an OperationOutcome on stderr


def test_a_write_that_queues_no_hook_does_not_wake_the_sender(tmp_path, receiver):
    """Without a hook to call, a note costs the sender thread nothing (no query per write)."""
    from fhir_kap.bridge import BridgeOptions, create_app
    from fhir_kap.config import load_settings
    from fhir_kap.storage.partners import Partners

    settings = load_settings(env={}, data_dir=tmp_path / "data")
    token = Partners(Database(settings.db_url)).add(
        "clinic-ehr", scopes="system/*.* kap/clinic", references=["Organization/kap-clinic"]
    )[1]
    app = create_app(settings, BridgeOptions(base_url="http://bridge.test/fhir"))
    notifier = app.extensions["fhir_kap"].inbound.notifier
    wakes = []
    real_wake = notifier.wake
    notifier.wake = lambda: wakes.append(1) or real_wake()
    for n in range(5):
        note = load("Example-Communication-note-1.json")
        note["identifier"][0]["value"] = f"note-{n}"  # five notes (the same one five times is one)
        assert _post(app, token, "/fhir/Communication", note).status_code == 201
    assert wakes == [] and not notifier._wake.is_set()  # the request path never woke the sender
    notifier.stop()


def _garbage_server() -> tuple[socket.socket, str]:
    """A 'webhook' that answers with a malformed HTTP status line."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)

    def serve() -> None:
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            conn.recv(65536)
            conn.sendall(b"NOT-HTTP garbage\r\n\r\n")
            conn.close()

    threading.Thread(target=serve, daemon=True).start()
    return srv, f"http://127.0.0.1:{srv.getsockname()[1]}/hook"


def test_one_partners_broken_hook_does_not_stall_the_others(db, receiver):
    srv, broken = _garbage_server()
    try:
        clock = Clock()
        n = Notifier(
            timeout=2,
            db=db,
            clock=clock,
            resolve={"broken": (broken, None), "practice-a": (receiver.url, "s3cret")}.get,
        )
        n.enqueue("broken", EVENT_COMMUNICATION, "Communication/b1", "1")
        n.enqueue("practice-a", EVENT_COMMUNICATION, "Communication/a1", "1")
        assert n.run_due() == 2
        jobs = {j.partner: j for j in n.jobs()}
        assert jobs["practice-a"].state == "delivered"
        assert jobs["broken"].state == "pending" and jobs["broken"].next_attempt_at > clock.now
        assert jobs["broken"].last_error and "garbage" not in jobs["broken"].last_error  # a type name only
    finally:
        srv.close()


def test_a_redirect_is_never_followed(db, receiver):
    inner = Receiver()  # an "internal" service the hook would like the bridge to call
    try:
        receiver.script = [(302, {"Location": inner.url + "/admin/delete"})]
        n = _notifier(db, receiver.url)
        n.enqueue("practice-a", EVENT_COMMUNICATION, "Communication/c1", "1")
        n.run_due()
        (job,) = n.jobs()
        assert (job.state, job.last_status) == ("dead", 302) and "not followed" in job.last_error
        assert inner.received == []
    finally:
        inner.server.shutdown()


def test_a_job_for_a_note_the_partner_may_no_longer_read_is_not_sent(db, receiver):
    n = _notifier(db, receiver.url, allowed=lambda partner, ref: False)  # e.g. consent withdrawn since
    n.enqueue("practice-a", EVENT_COMMUNICATION, "Communication/c1", "1")
    n.run_due()
    (job,) = n.jobs()
    assert job.state == "dead" and "consent" in job.last_error
    assert receiver.received == []


def test_a_job_whose_lease_passed_to_another_worker_mid_batch_is_sent_once(db, receiver):
    clock = Clock()
    first = _notifier(db, receiver.url, clock)
    second = _notifier(db, receiver.url, clock)
    first.enqueue("practice-a", EVENT_COMMUNICATION, "Communication/slow", "1")
    first.enqueue("practice-a", EVENT_COMMUNICATION, "Communication/next", "1")
    real_notify = first.notify

    def slow_notify(url, event, ref, *, secret=None):
        if ref == "Communication/slow":  # while this post hangs, the batch's lease runs out ...
            clock.now += first.lease_seconds + 1
            assert second.run_due() == 1  # ... and another worker takes the second job
        return real_notify(url, event, ref, secret=secret)

    first.notify = slow_notify
    first.run_due()
    assert sorted(b["resource"] for b in receiver.bodies()) == ["Communication/next", "Communication/slow"]
    assert {j.state for j in first.jobs()} == {"delivered"}


def test_a_queued_hook_is_dropped_when_consent_is_withdrawn_before_it_is_sent(tmp_path, receiver):
    app, tokens = _bridge(tmp_path, receiver.url)
    notifier = app.extensions["fhir_kap"].inbound.notifier
    notifier.backoff = Backoff(base=3600.0, cap=3600.0)
    receiver.script = [(503, {})]  # the first try fails: the job waits for a retry
    assert _post(app, tokens["clinic"], "/fhir/Consent", load("Consent-open-ended.json")).status_code == 201
    assert (
        _post(
            app, tokens["clinic"], "/fhir/Communication", load("Example-Communication-note-1.json")
        ).status_code
        == 201
    )
    assert notifier.drain(timeout=10)
    assert notifier.jobs()[0].state == "pending"
    # The client now refuses the therapist: the retry must not tell the practice the note exists.
    assert (
        _post(app, tokens["clinic"], "/fhir/Consent", load("Consent-deny-ref-therapist.json")).status_code
        == 201
    )
    notifier.db.execute("UPDATE webhook_jobs SET next_attempt_at = 0")
    assert notifier.drain(timeout=10)
    (job,) = notifier.jobs()
    assert job.state == "dead" and "consent" in job.last_error
    assert len(receiver.received) == 1  # only the failed first try
    notifier.stop()


def test_a_hook_that_answers_a_byte_at_a_time_is_cut_off_at_the_deadline(db):
    """A per-read timeout never fires for a hook that keeps sending; the whole exchange has one."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)

    def drip() -> None:
        conn, _ = srv.accept()
        conn.recv(65536)
        try:
            for byte in b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n":
                conn.sendall(bytes([byte]))
                time.sleep(0.2)  # each byte well inside the 1 s timeout; the answer takes ~9 s
        except OSError:
            pass
        finally:
            conn.close()

    threading.Thread(target=drip, daemon=True).start()
    try:
        result = Notifier(timeout=1).notify(
            f"http://127.0.0.1:{srv.getsockname()[1]}/hook", EVENT_COMMUNICATION, "Communication/c1"
        )
        assert not result.delivered and result.status is None  # cut off, not the 204 that would come
    finally:
        srv.close()


def test_every_dead_job_of_a_partner_goes_back_at_once(db):
    n = _notifier(db, None)  # nobody has a webhook: every job dies
    for i in range(3):
        n.enqueue("practice-a", EVENT_COMMUNICATION, f"Communication/a{i}", "1")
    n.enqueue("practice-b", EVENT_COMMUNICATION, "Communication/b0", "1")
    n.run_due()
    assert len(n.jobs("dead")) == 4
    moved = n.retry(partner="practice-a")
    assert [j.resource for j in moved] == [f"Communication/a{i}" for i in range(3)]
    assert all(j.state == "pending" and j.last_error is None for j in moved)
    assert [j.partner for j in n.jobs("dead")] == ["practice-b"]
    assert [j.resource for j in n.jobs(partner="practice-b")] == ["Communication/b0"]
