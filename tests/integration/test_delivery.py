"""The delivery worker: happy paths against the real SEKMET server (open, bearer, SMART),
precise faults with `responses` (503, 429 Retry-After, timeout, 400, redirects, garbled 2xx),
garbled answers in front of SEKMET reconciled by identifier, consent re-check at send time, and
the outbox's retry schedule. Runs on SQLite and on PostgreSQL."""

from __future__ import annotations

import copy
import json
import uuid
from pathlib import Path
from urllib.parse import unquote

import pytest
import requests
import responses

from fhir_kap.client import BearerAuth, FhirClient, RetryPolicy, SmartBackendAuth
from fhir_kap.errors import ConfigError
from fhir_kap.exchange.delivery import Backoff, DeliveryWorker, Stats, if_none_exist
from fhir_kap.storage.db import Database
from fhir_kap.storage.outbox import Outbox
from testkit.brokenserver import FaultFront

DATA = Path(__file__).resolve().parents[1] / "data" / "delivery"
NOTE = json.loads((DATA / "Communication-continuity-note.json").read_text())
FAKE = "http://fhir.test/fhir"
T0 = 1_700_000_000.0


class Clock:
    """A clock the test moves by hand."""

    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Sleeps(list):
    def __call__(self, seconds: float) -> None:
        self.append(seconds)


def note(value: str | None = None) -> dict:
    res = copy.deepcopy(NOTE)
    res["identifier"][0]["value"] = value or f"N-{uuid.uuid4().hex[:12]}"
    return res


def allow(item) -> tuple[bool, str]:
    return True, "permitted"


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def outbox(db, clock) -> Outbox:
    return Outbox(db, clock=clock)


def queue(outbox: Outbox, resources: list[dict], base_url: str, endpoint: str = "practice-a") -> list[int]:
    return [
        outbox.enqueue(
            r,
            endpoint=endpoint,
            base_url=base_url,
            recipient_ref="Practitioner/ref-therapist",
            purpose="TREAT",
        )[0].id
        for r in resources
    ]


def on_server(client: FhirClient, resource: dict) -> list[dict]:
    ident = resource["identifier"][0]
    return list(client.search("Communication", {"identifier": f"{ident['system']}|{ident['value']}"}))


def worker(outbox, client_for, clock, **kw) -> DeliveryWorker:
    kw.setdefault("consent_check", allow)
    return DeliveryWorker(
        outbox,
        client_for,
        clock=clock,
        worker_id="w-test",
        backoff=kw.pop("backoff", Backoff(base=10, cap=300, jitter=0)),
        **kw,
    )


# ---------------------------------------------------------------- SEKMET happy paths


@pytest.mark.sekmet
@pytest.mark.parametrize("use_transactions", [False, True], ids=["single", "transaction"])
def test_run_once__delivers_each_item_once_and_records_server_id(sekmet, outbox, clock, use_transactions):
    client = FhirClient(sekmet.base_url)
    notes = [note() for _ in range(5)]
    ids = queue(outbox, notes, sekmet.base_url)
    stats = worker(outbox, lambda name: client, clock, use_transactions=use_transactions).run_once()
    assert (stats.claimed, stats.delivered, stats.retried, stats.dead) == (5, 5, 0, 0)
    assert stats.transactions == (1 if use_transactions else 0)
    for item_id, res in zip(ids, notes):
        item = outbox.get(item_id)
        [stored] = on_server(client, res)
        assert item.state == "delivered" and item.server_id == stored["id"]
        assert item.server_version == stored["meta"]["versionId"]


@pytest.mark.sekmet
@pytest.mark.parametrize("use_transactions", [False, True], ids=["single", "transaction"])
def test_resending_after_a_lost_outbox_commit__creates_no_duplicate(
    sekmet, db, tmp_path, clock, use_transactions
):
    """A worker killed after the POST and before recording it sends again: the conditional
    create finds the first copy, so the server still holds one."""
    client = FhirClient(sekmet.base_url)
    notes = [note(), note()]
    first = Outbox(db, clock=clock)
    queue(first, notes, sekmet.base_url)
    worker(first, lambda name: client, clock, use_transactions=use_transactions).run_once()
    replay = Outbox(Database(f"sqlite:///{tmp_path / 'replay.sqlite3'}"), clock=clock)
    ids = queue(replay, notes, sekmet.base_url)
    stats = worker(replay, lambda name: client, clock, use_transactions=use_transactions).run_once()
    assert (stats.delivered, stats.existing) == (0, 2)
    for item_id, res in zip(ids, notes):
        [stored] = on_server(client, res)
        assert replay.get(item_id).server_id == stored["id"]


@pytest.mark.sekmet
@pytest.mark.parametrize("auth_kind", ["bearer", "smart-secret", "smart-jwt"])
def test_run_once__delivers_with_bearer_and_smart_backend_auth(sekmet_auth, outbox, clock, auth_kind):
    auth = {
        "bearer": lambda: BearerAuth(sekmet_auth.token),
        "smart-secret": lambda: SmartBackendAuth(
            sekmet_auth.client_id, client_secret=sekmet_auth.client_secret, scope="system/*.*"
        ),
        "smart-jwt": lambda: SmartBackendAuth(
            sekmet_auth.jwt_client_id,
            private_key_pem=sekmet_auth.private_key_pem,
            key_id="kap-test-1",
            scope="system/*.*",
        ),
    }[auth_kind]()
    client = FhirClient(sekmet_auth.base_url, auth=auth)
    notes = [note(), note(), note()]
    queue(outbox, notes, sekmet_auth.base_url)
    stats = worker(outbox, lambda name: client, clock, use_transactions=True).run_once()
    assert stats.delivered == 3 and outbox.counts()["delivered"] == 3
    assert all(len(on_server(client, r)) == 1 for r in notes)


@pytest.mark.sekmet
def test_consent_revoked__item_held_with_reason_and_nothing_sent(sekmet, outbox, clock):
    client = FhirClient(sekmet.base_url)
    kept, revoked = note(), note()
    _, revoked_id = queue(outbox, [kept, revoked], sekmet.base_url)

    def check(item):
        if item.id == revoked_id:
            return False, "Consent/consent-1 is inactive (revoked)"
        return True, "permitted by Consent/consent-1"

    stats = worker(outbox, lambda name: client, clock, consent_check=check).run_once()
    assert (stats.delivered, stats.held) == (1, 1)
    held = outbox.get(revoked_id)
    assert held.state == "held" and "Consent/consent-1 is inactive (revoked)" in held.hold_reason
    assert on_server(client, revoked) == [] and len(on_server(client, kept)) == 1
    assert worker(outbox, lambda name: client, clock).run_once().claimed == 0  # stays held


@pytest.mark.sekmet
def test_consent_check_that_fails__holds_the_item(sekmet, outbox, clock):
    client = FhirClient(sekmet.base_url)
    res = note()
    [item_id] = queue(outbox, [res], sekmet.base_url)

    def broken(item):
        raise ValueError("consent store unreadable")

    stats = worker(outbox, lambda name: client, clock, consent_check=broken).run_once()
    assert stats.held == 1 and outbox.get(item_id).state == "held"
    assert "consent re-check failed" in outbox.get(item_id).hold_reason
    assert on_server(client, res) == []


@pytest.mark.sekmet
def test_refused_transaction__falls_back_to_singles_so_one_bad_item_blocks_nothing(sekmet, outbox, clock):
    client = FhirClient(sekmet.base_url)
    good = [note(), note()]
    bad = dict(note(), unknownElement="not FHIR")
    good_ids = queue(outbox, good, sekmet.base_url)
    [bad_id] = queue(outbox, [bad], sekmet.base_url)
    stats = worker(outbox, lambda name: client, clock, use_transactions=True).run_once()
    assert (stats.transactions, stats.fallbacks, stats.delivered, stats.dead) == (1, 1, 2, 1)
    assert all(outbox.get(i).state == "delivered" for i in good_ids)
    dead = outbox.get(bad_id)
    assert dead.state == "dead" and ("400" in dead.last_error or "422" in dead.last_error)
    assert on_server(client, bad) == []


# ---------------------------------------------------------------- precise faults


@pytest.fixture
def rsps():
    with responses.RequestsMock(assert_all_requests_are_fired=True) as mock:
        yield mock


def created(rsps, server_id: str = "srv-1") -> None:
    body = dict(note("x"), id=server_id, meta={"versionId": "1"})
    rsps.add(
        responses.POST,
        f"{FAKE}/Communication",
        json=body,
        status=201,
        headers={"Location": f"{FAKE}/Communication/{server_id}/_history/1"},
    )


def fake_client(sleeps: Sleeps, attempts: int = 1) -> FhirClient:
    return FhirClient(
        FAKE, sleep=sleeps, retry=RetryPolicy(attempts=attempts, base=0.5, jitter=0), rand=lambda: 0.0
    )


def test_conditional_create__sends_if_none_exist_on_the_idempotency_key(outbox, clock, rsps):
    created(rsps)
    res = note("N 1&2")
    queue(outbox, [res], FAKE)
    worker(outbox, lambda name: fake_client(Sleeps()), clock).run_once()
    sent = rsps.calls[0].request
    assert sent.headers["If-None-Exist"] == "identifier=http://fhir-kap.example/sid/note|N%201%262"
    assert json.loads(sent.body) == res


def test_503_then_201__retried_later_by_the_outbox_with_backoff(outbox, clock, rsps):
    rsps.add(responses.POST, f"{FAKE}/Communication", status=503)
    created(rsps)
    [item_id] = queue(outbox, [note()], FAKE)
    w = worker(outbox, lambda name: fake_client(Sleeps()), clock)
    first = w.run_once()
    item = outbox.get(item_id)
    assert first.retried == 1 and item.state == "pending" and item.next_attempt_at == T0 + 10
    assert "503" in item.last_error
    assert w.run_once().claimed == 0  # not due yet
    clock.now = T0 + 10
    second = w.run_once()
    assert second.delivered == 1 and outbox.get(item_id).server_id == "srv-1"
    assert outbox.get(item_id).attempts == 2


def test_429_with_retry_after__client_waits_as_told_then_delivers(outbox, clock, rsps):
    rsps.add(responses.POST, f"{FAKE}/Communication", status=429, headers={"Retry-After": "2"})
    created(rsps)
    [item_id] = queue(outbox, [note()], FAKE)
    sleeps = Sleeps()
    stats = worker(outbox, lambda name: fake_client(sleeps, attempts=3), clock).run_once()
    assert stats.delivered == 1 and sleeps == [2.0]
    assert outbox.get(item_id).state == "delivered"


def test_timeout__is_retried_with_a_summary_naming_it(outbox, clock, rsps):
    rsps.add(responses.POST, f"{FAKE}/Communication", body=requests.exceptions.ReadTimeout("slow"))
    [item_id] = queue(outbox, [note()], FAKE)
    stats = worker(outbox, lambda name: fake_client(Sleeps()), clock).run_once()
    item = outbox.get(item_id)
    assert stats.retried == 1 and item.state == "pending"
    assert "ReadTimeout" in item.last_error


def test_400_operation_outcome__dead_letters_at_once_with_the_server_reason(outbox, clock, rsps):
    oo = json.loads((DATA / "OperationOutcome-invalid.json").read_text())
    rsps.add(responses.POST, f"{FAKE}/Communication", json=oo, status=400)
    [item_id] = queue(outbox, [note()], FAKE)
    stats = worker(outbox, lambda name: fake_client(Sleeps()), clock).run_once()
    item = outbox.get(item_id)
    assert (stats.dead, stats.retried) == (1, 0)
    assert item.state == "dead" and "400" in item.last_error
    assert "required at Communication.status" in item.last_error
    assert "field required" not in item.last_error  # the server's free text may echo content
    assert "Dosing session" not in item.last_error


@pytest.mark.sekmet
def test_revocation_during_a_batch__holds_the_items_not_yet_sent(sekmet, outbox, clock):
    """Consent is re-checked right before each send, not once per batch."""
    client = FhirClient(sekmet.base_url)
    first, second = note(), note()
    first_id, second_id = queue(outbox, [first, second], sekmet.base_url)
    calls: list[int] = []

    def check(item):
        calls.append(item.id)
        return (len(calls) == 1), "Consent/consent-1 revoked after the first send"

    stats = worker(outbox, lambda name: client, clock, consent_check=check).run_once()
    assert (stats.delivered, stats.held) == (1, 1)
    assert outbox.get(calls[0]).state == "delivered" and outbox.get(calls[1]).state == "held"


def test_item_whose_lease_passed_to_another_worker__is_not_sent(outbox, clock, rsps):
    [item_id] = queue(outbox, [note()], FAKE)
    me = worker(outbox, lambda name: fake_client(Sleeps()), clock)
    [item] = outbox.claim(me.worker_id, 10, clock(), lease_seconds=1)
    clock.now += 5  # lease expired; another worker takes the item over
    assert outbox.claim("other-worker", 10, clock(), lease_seconds=300)
    stats = Stats()
    me._deliver_endpoint(item.endpoint, [item], stats)
    assert stats.lost_lease == 1 and len(rsps.calls) == 0
    assert outbox.get(item_id).lease_owner == "other-worker"


@pytest.mark.parametrize("status", [503, 500])
def test_persistent_5xx__dead_after_max_attempts_with_growing_backoff(outbox, clock, rsps, status):
    """A 500 is not repeated at once by the client, but the outbox tries it again like a 503."""
    for _ in range(3):
        rsps.add(responses.POST, f"{FAKE}/Communication", status=status)
    [item_id] = queue(outbox, [note()], FAKE)
    w = worker(
        outbox,
        lambda name: fake_client(Sleeps()),
        clock,
        max_attempts=3,
        backoff=Backoff(base=10, cap=15, jitter=0),
    )
    waits = []
    for _ in range(3):
        before = clock.now
        w.run_once()
        item = outbox.get(item_id)
        if item.state == "pending":
            waits.append(item.next_attempt_at - before)
            clock.now = item.next_attempt_at
    assert waits == [10, 15]  # 10, then min(cap 15, 20)
    assert len(rsps.calls) == 3
    item = outbox.get(item_id)
    assert item.state == "dead" and item.last_error.startswith("gave up after 3 attempts")
    assert str(status) in item.last_error


def test_500__not_repeated_at_once_but_retried_later_then_delivered(outbox, clock, rsps):
    rsps.add(responses.POST, f"{FAKE}/Communication", status=500)
    created(rsps)
    [item_id] = queue(outbox, [note()], FAKE)
    w = worker(
        outbox,
        lambda name: fake_client(Sleeps(), attempts=3),
        clock,
        backoff=Backoff(base=10, cap=15, jitter=0),
    )
    stats = w.run_once()
    item = outbox.get(item_id)
    assert (stats.retried, stats.dead, len(rsps.calls)) == (1, 0, 1)  # the client did not repeat it
    assert item.state == "pending" and item.next_attempt_at == clock.now + 10 and "500" in item.last_error
    clock.now = item.next_attempt_at
    assert w.run_once().delivered == 1
    assert outbox.get(item_id).state == "delivered"


@pytest.mark.parametrize("status", [501, 505])
def test_5xx_that_waiting_does_not_change__dead_letters_at_once(outbox, clock, rsps, status):
    rsps.add(responses.POST, f"{FAKE}/Communication", status=status)
    [item_id] = queue(outbox, [note()], FAKE)
    stats = worker(outbox, lambda name: fake_client(Sleeps()), clock).run_once()
    assert (stats.dead, stats.retried) == (1, 0)
    assert outbox.get(item_id).state == "dead"


def test_a_refused_transaction_entry__is_dead_lettered_with_the_server_issue_codes(outbox, clock, rsps):
    oo = json.loads((DATA / "OperationOutcome-invalid.json").read_text())
    ok = dict(note("x"), id="srv-1", meta={"versionId": "1"})
    rsps.add(
        responses.POST,
        FAKE,
        status=200,
        json={
            "resourceType": "Bundle",
            "type": "transaction-response",
            "entry": [
                {
                    "resource": ok,
                    "response": {"status": "201 Created", "location": "Communication/srv-1/_history/1"},
                },
                {"response": {"status": "422 Unprocessable Entity", "outcome": oo}},
            ],
        },
    )
    good_id, bad_id = queue(outbox, [note(), note()], FAKE)
    stats = worker(outbox, lambda name: fake_client(Sleeps()), clock, use_transactions=True).run_once()
    assert (stats.delivered, stats.dead) == (1, 1)
    dead = outbox.get(bad_id)
    assert dead.state == "dead" and "422" in dead.last_error
    assert "required at Communication.status" in dead.last_error  # codes and locations, never free text
    assert "field required" not in dead.last_error


def test_transaction_unavailable__retries_all_items_without_falling_back(outbox, clock, rsps):
    rsps.add(responses.POST, FAKE, status=503)
    ids = queue(outbox, [note(), note()], FAKE)
    stats = worker(outbox, lambda name: fake_client(Sleeps()), clock, use_transactions=True).run_once()
    assert (stats.retried, stats.fallbacks) == (2, 0)
    assert all(outbox.get(i).state == "pending" for i in ids)


def test_endpoint_without_client__items_wait_for_the_configuration(outbox, clock):
    [item_id] = queue(outbox, [note()], FAKE, endpoint="unknown-practice")

    def client_for(name):
        raise ConfigError(f"No endpoint '{name}' in the settings", rule="settings")

    stats = worker(outbox, client_for, clock).run_once()
    item = outbox.get(item_id)
    assert stats.retried == 1 and "No endpoint 'unknown-practice'" in item.last_error


def test_items_of_several_endpoints_go_to_their_own_server(outbox, clock, rsps):
    created(rsps, "a-1")
    rsps.add(
        responses.POST,
        "http://other.test/fhir/Communication",
        status=201,
        json=dict(note("y"), id="b-1", meta={"versionId": "1"}),
    )
    [a] = queue(outbox, [note()], FAKE, endpoint="a")
    [b] = queue(outbox, [note()], "http://other.test/fhir", endpoint="b")
    clients = {"a": fake_client(Sleeps()), "b": FhirClient("http://other.test/fhir")}
    stats = worker(outbox, clients.__getitem__, clock).run_once()
    assert stats.delivered == 2
    assert (outbox.get(a).server_id, outbox.get(b).server_id) == ("a-1", "b-1")


def test_if_none_exist__escapes_search_special_characters():
    assert if_none_exist("http://x/sid|a,b$c|d") == "identifier=http://x/sid|a%5C%2Cb%5C%24c%5C%7Cd"


def test_held_then_released__the_hold_costs_no_attempt(outbox, clock, rsps):
    """A consent hold sends nothing, so release → re-check → hold cycles never use up attempts."""
    [item_id] = queue(outbox, [note()], FAKE)
    deny = lambda item: (False, "Consent/consent-1 is inactive")  # noqa: E731
    for _ in range(3):
        stats = worker(outbox, lambda name: fake_client(Sleeps()), clock, consent_check=deny).run_once()
        assert stats.held == 1
        assert outbox.get(item_id).attempts == 0
        outbox.release(item_id, now=clock())


# ---------------------------------------------------------------- redirects (issue 14)


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_redirect__never_followed_and_dead_lettered_naming_the_location_host_only(
    outbox, clock, rsps, status
):
    """A partner endpoint answering 3xx must not get the note re-sent where Location points."""
    elsewhere = "http://elsewhere.test:8443/fhir/Communication"
    rsps.add(
        responses.POST,
        f"{FAKE}/Communication",
        status=status,
        headers={"Location": f"{elsewhere}?identifier=note|N-secret-id"},
    )
    rsps.add(responses.POST, elsewhere, status=201, json=note("x"))
    rsps.add(responses.GET, elsewhere, status=200, json=note("x"))
    rsps.assert_all_requests_are_fired = False
    [item_id] = queue(outbox, [note()], FAKE)
    stats = worker(outbox, lambda name: fake_client(Sleeps(), attempts=3), clock).run_once()
    item = outbox.get(item_id)
    assert [c.request.url for c in rsps.calls] == [f"{FAKE}/Communication"]  # one request, no follow
    assert (stats.dead, stats.retried, stats.delivered) == (1, 0, 0) and item.state == "dead"
    assert f"{status}" in item.last_error and "elsewhere.test:8443" in item.last_error
    assert "redirects are never followed" in item.last_error
    assert "/fhir" not in item.last_error.split("elsewhere.test:8443")[1]  # no path, no query
    assert "N-secret-id" not in item.last_error


def test_redirect_from_https_to_http__named_a_downgrade(outbox, clock, rsps):
    base = "https://ehr.test/fhir"
    rsps.add(
        responses.POST,
        f"{base}/Communication",
        status=308,
        headers={"Location": "http://ehr.test/fhir/Communication"},
    )
    [item_id] = queue(outbox, [note()], base)
    worker(outbox, lambda name: FhirClient(base, retry=RetryPolicy(attempts=1)), clock).run_once()
    item = outbox.get(item_id)
    assert len(rsps.calls) == 1 and item.state == "dead"
    assert "https to plain http" in item.last_error and "ehr.test" in item.last_error


# ---------------------------------------------------------------- garbled 2xx (issue 14)

GARBLED = b'{"resourceType": "Communication", "id": "\xff<html>'


def garbled(rsps, status: int = 200) -> None:
    rsps.add(
        responses.POST,
        f"{FAKE}/Communication",
        body=GARBLED,
        status=status,
        content_type="application/fhir+json",
    )


def found(rsps, *server_ids: str, status: int = 200) -> None:
    bundle = {
        "resourceType": "Bundle",
        "type": "searchset",
        "entry": [
            {"resource": dict(note("x"), id=sid, meta={"versionId": "3"}), "search": {"mode": "match"}}
            for sid in server_ids
        ],
    }
    rsps.add(responses.GET, f"{FAKE}/Communication", json=bundle, status=status)


def test_garbled_2xx_with_one_copy_on_the_server__reconciled_as_delivered(outbox, clock, rsps, caplog):
    garbled(rsps, 201)
    found(rsps, "srv-9")
    res = note("N 1&2")
    [item_id] = queue(outbox, [res], FAKE)
    with caplog.at_level("WARNING", logger="fhir_kap.delivery"):
        stats = worker(outbox, lambda name: fake_client(Sleeps()), clock).run_once()
    item = outbox.get(item_id)
    assert (stats.reconciled, stats.dead, stats.retried) == (1, 0, 0)
    assert (item.state, item.server_id, item.server_version) == ("delivered", "srv-9", "3")
    assert "reconciled by identifier" in item.last_error and "not JSON" in item.last_error
    read = rsps.calls[1].request
    # the conditional read asks exactly what the If-None-Exist header said
    assert read.method == "GET"
    path, _, query = read.url.partition("?")
    assert path == f"{FAKE}/Communication"
    assert unquote(query) == unquote(rsps.calls[0].request.headers["If-None-Exist"])
    assert unquote(query) == "identifier=http://fhir-kap.example/sid/note|N 1&2"
    assert "reconciled by identifier: server id srv-9" in caplog.text
    assert "Dosing" not in caplog.text and "N%201" not in caplog.text


def test_garbled_2xx_with_no_copy__retried_later_then_delivered(outbox, clock, rsps):
    garbled(rsps)
    found(rsps)
    created(rsps, "srv-2")
    [item_id] = queue(outbox, [note()], FAKE)
    w = worker(outbox, lambda name: fake_client(Sleeps()), clock)
    first = w.run_once()
    item = outbox.get(item_id)
    assert (first.retried, first.dead, item.state) == (1, 0, "pending")
    assert "no copy found by identifier" in item.last_error
    clock.now = item.next_attempt_at
    assert w.run_once().delivered == 1 and outbox.get(item_id).server_id == "srv-2"


@pytest.mark.parametrize(
    "answer, expected",
    [
        (lambda rsps: found(rsps, "srv-1", "srv-2"), "found 2 copies"),
        (
            lambda rsps: found(rsps, status=500),
            "reconciling by identifier failed: GET Communication search: 500",
        ),
        (
            lambda rsps: rsps.add(responses.GET, f"{FAKE}/Communication", body=b"<html>", status=200),
            "reconciling by identifier failed",
        ),
    ],
    ids=["several", "read-fails", "read-garbled"],
)
def test_garbled_2xx_not_reconcilable__dead_lettered_with_the_reason(outbox, clock, rsps, answer, expected):
    garbled(rsps)
    answer(rsps)
    [item_id] = queue(outbox, [note()], FAKE)
    stats = worker(outbox, lambda name: fake_client(Sleeps()), clock).run_once()
    item = outbox.get(item_id)
    assert (stats.dead, stats.reconciled, item.state) == (1, 0, "dead")
    assert "not JSON" in item.last_error and expected in item.last_error


def test_2xx_naming_no_id__reconciled_by_identifier(outbox, clock, rsps):
    rsps.add(responses.POST, f"{FAKE}/Communication", status=200, body=b"")
    found(rsps, "srv-5")
    [item_id] = queue(outbox, [note()], FAKE)
    stats = worker(outbox, lambda name: fake_client(Sleeps()), clock).run_once()
    assert stats.reconciled == 1 and outbox.get(item_id).server_id == "srv-5"


def test_garbled_transaction_answer__falls_back_to_singles_that_find_the_copies(outbox, clock, rsps):
    rsps.add(responses.POST, FAKE, body=GARBLED, status=200, content_type="application/fhir+json")
    for sid in ("srv-a", "srv-b"):
        rsps.add(
            responses.POST,
            f"{FAKE}/Communication",
            json=dict(note("x"), id=sid, meta={"versionId": "1"}),
            status=200,
        )
    ids = queue(outbox, [note(), note()], FAKE)
    stats = worker(outbox, lambda name: fake_client(Sleeps()), clock, use_transactions=True).run_once()
    assert (stats.fallbacks, stats.existing, stats.dead) == (1, 2, 0)
    assert [outbox.get(i).server_id for i in ids] == ["srv-a", "srv-b"]


@pytest.mark.sekmet
@pytest.mark.parametrize("mode", ["garble", "garble_unsent"], ids=["stored", "not-stored"])
def test_garbled_200_from_sekmet__reconciled_and_stored_exactly_once(sekmet, outbox, clock, mode):
    """Over real HTTP: a front before SEKMET garbles the answer to the create, after SEKMET stored
    the note (reconciled at once) or without forwarding it (tried again, then stored)."""
    res = note()
    with FaultFront(mode, upstream=sekmet.base_url) as front:
        [item_id] = queue(outbox, [res], front.base_url)
        w = worker(outbox, lambda name: FhirClient(front.base_url, retry=RetryPolicy(attempts=1)), clock)
        first = w.run_once()
        item = outbox.get(item_id)
        if mode == "garble":
            assert (first.reconciled, item.state) == (1, "delivered")
        else:
            assert (first.retried, item.state) == (1, "pending")
            front.mode = "pass"
            clock.now = item.next_attempt_at
            assert w.run_once().delivered == 1
        assert [r.method for r in front.received][:2] == ["POST", "GET"]
    [stored] = on_server(FhirClient(sekmet.base_url), res)
    assert outbox.get(item_id).server_id == stored["id"]
