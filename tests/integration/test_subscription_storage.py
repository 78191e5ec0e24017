"""The Subscription tables on SQLite and PostgreSQL: a partner's own rows only, event numbers
taken in the writer's transaction without gaps, heartbeats claimed once, ends, deletes."""

from __future__ import annotations

import pytest

from fhir_kap.storage.subscriptions import Subscriptions
from fhir_kap.storage.webhooks import WebhookJobs

NOTE = "http://fhir-kap.example/SubscriptionTopic/continuity-note-available"


def _new(subs: Subscriptions, sid: str, partner: str = "practice-a", **kw) -> None:
    args = {"heartbeat_period": None, "end_at": None, "now": 1000.0, **kw}
    subs.create(sid, partner, NOTE, "requested", {"reason": "r"}, base="https://b.example/fhir", **args)


def test_a_partner_lists_and_deletes_only_its_own(db):
    subs = Subscriptions(db)
    _new(subs, "s1")
    _new(subs, "s2", partner="practice-b")
    assert [r.id for r in subs.of_partner("practice-a")] == ["s1"]
    assert subs.get("s2", partner="practice-a") is None and subs.get("s2") is not None
    assert subs.delete("s2", "practice-a") is False and subs.get("s2") is not None
    assert subs.delete("s2", "practice-b") is True and subs.get("s2") is None


def test_event_numbers_grow_by_one_and_are_rolled_back_with_their_write(db):
    subs = Subscriptions(db)
    _new(subs, "s1")
    with db.transaction() as tx:
        assert [r.id for r in subs.listening(tx, NOTE)] == ["s1"]
        assert subs.add_event(tx, "s1", "2026-12-04T10:00:00Z", "Communication/n1", "1") == 1
    with pytest.raises(RuntimeError), db.transaction() as tx:
        subs.add_event(tx, "s1", "2026-12-04T10:00:01Z", "Communication/n2", "1")
        raise RuntimeError("the write failed")
    with db.transaction() as tx:
        assert subs.add_event(tx, "s1", "2026-12-04T10:00:02Z", "Communication/n3", "1") == 2
    assert [(e.number, e.focus) for e in subs.events("s1", 1, 9)] == [
        (1, "Communication/n1"),
        (2, "Communication/n3"),
    ]
    assert [e.number for e in subs.events("s1", 2, 2)] == [2]
    assert subs.get("s1").events == 2


def test_an_off_subscription_does_not_listen(db):
    subs = Subscriptions(db)
    _new(subs, "s1")
    assert subs.set_status("s1", "off", error="x", now=2000.0)
    with db.transaction() as tx:
        assert subs.listening(tx, NOTE) == []


def test_status_moves_only_from_the_states_given(db):
    subs = Subscriptions(db)
    _new(subs, "s1")
    assert not subs.set_status("s1", "active", only_from=("error",), now=1.0)
    assert subs.set_status("s1", "active", only_from=("requested",), now=1.0)
    assert not subs.set_status("s1", "active", now=1.0)  # already there
    assert subs.get("s1").status == "active"


def test_a_heartbeat_is_claimed_once_per_period(db):
    subs = Subscriptions(db)
    _new(subs, "s1", heartbeat_period=10.0)
    subs.set_status("s1", "active", now=1000.0)
    assert subs.due_heartbeats(1005.0) == []
    first = subs.due_heartbeats(1010.0)
    assert [r.id for r, _ in first] == ["s1"]
    assert subs.due_heartbeats(1010.0) == []  # another worker at the same moment gets none
    assert subs.next_heartbeat() == 1020.0
    subs.sent("s1", 1015.0)  # something was delivered: the clock restarts
    assert subs.due_heartbeats(1020.0) == [] and subs.next_heartbeat() == 1025.0


def test_a_subscription_past_its_end_is_turned_off_once(db):
    subs = Subscriptions(db)
    _new(subs, "s1", end_at=1500.0)
    assert subs.expire(1400.0) == []
    assert subs.expire(1500.0) == ["s1"] and subs.get("s1").status == "off"
    assert subs.expire(1600.0) == []


def test_replace_is_refused_when_the_row_changed_meanwhile(db):
    subs = Subscriptions(db)
    _new(subs, "s1")
    row = subs.get("s1")
    assert (
        subs.replace(
            row, NOTE, "requested", {"reason": "2"}, heartbeat_period=None, end_at=None, now=2.0
        ).version
        == 2
    )
    assert (
        subs.replace(row, NOTE, "requested", {"reason": "3"}, heartbeat_period=None, end_at=None, now=3.0)
        is None
    )


def test_a_deferred_job_is_due_again_without_an_attempt_spent(db):
    jobs = WebhookJobs(db)
    jobs.enqueue("practice-a", "subscription-event", "Subscription/s1", "1", now=1.0)
    (job,) = jobs.claim("w", 10, 1.0, 30.0)
    assert job.attempts == 1
    assert jobs.defer(job, "w", next_at=5.0, now=1.0)
    assert jobs.claim("w", 10, 2.0, 30.0) == []
    (again,) = jobs.claim("w", 10, 5.0, 30.0)
    assert again.attempts == 1
