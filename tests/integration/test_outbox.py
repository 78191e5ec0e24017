"""The durable outbox, on SQLite and on PostgreSQL."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from fhir_kap.errors import Conflict, InputError, NotFound
from fhir_kap.storage.db import Database
from fhir_kap.storage.outbox import STATES, Outbox, idempotency_key_of

DATA = Path(__file__).resolve().parents[1] / "data"
NOTE = json.loads((DATA / "delivery" / "Communication-continuity-note.json").read_text())
BASE = "http://practice-a.example/fhir"
T0 = 1_700_000_000.0


def note(n: int) -> dict:
    res = copy.deepcopy(NOTE)
    res["identifier"][0]["value"] = f"NOTE-{n:04d}"
    return res


@pytest.fixture
def outbox(db):
    return Outbox(db, clock=lambda: T0)


def enqueue(outbox: Outbox, n: int, **kw) -> int:
    item, created = outbox.enqueue(
        note(n),
        endpoint=kw.pop("endpoint", "practice-a"),
        base_url=BASE,
        recipient_ref="Practitioner/ref-therapist",
        purpose="TREAT",
        **kw,
    )
    assert created
    return item.id


def test_enqueue__stores_pending_item_with_key_patient_and_times(outbox):
    item, created = outbox.enqueue(
        note(1),
        endpoint="practice-a",
        base_url=BASE,
        recipient_ref="Practitioner/ref-therapist",
        purpose="TREAT",
        consent_ref="Consent/consent-1/_history/2",
    )
    assert created
    assert item.state == "pending" and item.attempts == 0
    assert item.idempotency_key == "http://fhir-kap.example/sid/note|NOTE-0001"
    assert item.patient_ref == "Patient/client-1"
    assert item.consent_ref == "Consent/consent-1/_history/2"
    assert item.created_at == item.updated_at == item.next_attempt_at == T0
    assert outbox.get(item.id).resource == note(1)


def test_enqueue__same_key_same_endpoint_returns_existing_item(outbox):
    first, _ = outbox.enqueue(note(1), endpoint="practice-a", base_url=BASE)
    changed = note(1)
    changed["status"] = "entered-in-error"
    again, created = outbox.enqueue(changed, endpoint="practice-a", base_url=BASE)
    assert not created and again.id == first.id and again.resource["status"] == "completed"
    assert outbox.counts()["pending"] == 1


def test_enqueue__same_key_other_endpoint_is_a_separate_item(outbox):
    a, _ = outbox.enqueue(note(1), endpoint="practice-a", base_url=BASE)
    b, created = outbox.enqueue(note(1), endpoint="practice-b", base_url="http://b.example/fhir")
    assert created and a.id != b.id


@pytest.mark.parametrize(
    "resource, rule",
    [
        ({"resourceType": "Communication", "status": "completed"}, "outbox:idempotency-key"),
        (
            {
                "resourceType": "Communication",
                "identifier": [{"system": "http://x", "value": "1", "use": "old"}],
            },
            "outbox:idempotency-key",
        ),
        ({"status": "completed"}, "fhir:resourceType"),
        ("not a resource", "fhir:resourceType"),
    ],
)
def test_enqueue__refuses_resources_without_type_or_business_identifier(outbox, resource, rule):
    with pytest.raises(InputError) as err:
        outbox.enqueue(resource, endpoint="practice-a", base_url=BASE)
    assert err.value.issues[0].rule == rule
    assert outbox.counts()["pending"] == 0


def test_idempotency_key_of__skips_old_identifiers():
    res = {
        "resourceType": "Communication",
        "identifier": [
            {"system": "http://a", "value": "old-1", "use": "old"},
            {"system": "http://b", "value": "2"},
        ],
    }
    assert idempotency_key_of(res) == "http://b|2"


def test_claim__marks_due_items_sending_with_lease_and_counts_attempt(outbox):
    ids = [enqueue(outbox, n) for n in range(3)]
    claimed = outbox.claim("w1", limit=2, now=T0, lease_seconds=60)
    assert [i.id for i in claimed] == ids[:2]
    assert all(
        i.state == "sending" and i.lease_owner == "w1" and i.lease_until == T0 + 60 and i.attempts == 1
        for i in claimed
    )
    assert outbox.counts() == {"pending": 1, "sending": 2, "delivered": 0, "held": 0, "dead": 0}


def test_claim__skips_items_not_yet_due(outbox):
    enqueue(outbox, 1, now=T0 + 100)
    assert outbox.claim("w1", now=T0) == []
    assert len(outbox.claim("w1", now=T0 + 100)) == 1


def test_claim__never_hands_one_item_to_two_workers_while_leased(outbox):
    enqueue(outbox, 1)
    assert len(outbox.claim("w1", now=T0, lease_seconds=30)) == 1
    assert outbox.claim("w2", now=T0 + 29, lease_seconds=30) == []


def test_claim__reclaims_sending_item_after_its_lease_expired(outbox):
    enqueue(outbox, 1)
    outbox.claim("dead-worker", now=T0, lease_seconds=30)
    again = outbox.claim("w2", now=T0 + 31, lease_seconds=30)
    assert len(again) == 1 and again[0].lease_owner == "w2" and again[0].attempts == 2
    # the first worker's late report is refused: the lease moved on
    assert not outbox.mark_delivered(again[0].id, server_id="x", worker_id="dead-worker", now=T0 + 32)
    assert outbox.mark_delivered(again[0], server_id="x", now=T0 + 32)


def test_recover__gives_back_the_leases_of_a_restarted_worker(outbox):
    for n in range(3):
        enqueue(outbox, n)
    outbox.claim("w1", now=T0, lease_seconds=3600)
    assert outbox.recover("w1", now=T0 + 1) == 3
    assert outbox.counts()["pending"] == 3
    assert len(outbox.claim("w1", now=T0 + 1)) == 3


def test_mark_delivered__records_server_id_version_location(outbox):
    enqueue(outbox, 1)
    [item] = outbox.claim("w1", now=T0)
    assert outbox.mark_delivered(
        item,
        server_id="abc",
        server_version="1",
        location="http://s/fhir/Communication/abc/_history/1",
        now=T0 + 5,
    )
    got = outbox.get(item.id)
    assert (got.state, got.server_id, got.server_version, got.delivered_by, got.delivered_at) == (
        "delivered",
        "abc",
        "1",
        "w1",
        T0 + 5,
    )
    assert got.lease_owner is None and got.last_error is None


def test_mark_retry__returns_item_to_pending_at_next_time_with_error(outbox):
    enqueue(outbox, 1)
    [item] = outbox.claim("w1", now=T0)
    assert outbox.mark_retry(item, "POST Communication: 503 Service Unavailable", T0 + 30, now=T0)
    assert outbox.claim("w1", now=T0 + 29) == []
    [again] = outbox.claim("w1", now=T0 + 30)
    assert again.last_error.startswith("POST Communication: 503") and again.attempts == 2


def test_mark_dead__keeps_item_until_operator_retry_resets_attempts(outbox):
    enqueue(outbox, 1)
    [item] = outbox.claim("w1", now=T0)
    assert outbox.mark_dead(item, "POST Communication: 400 Bad Request", now=T0)
    assert outbox.claim("w1", now=T0 + 10_000) == []
    back = outbox.retry(item.id, now=T0 + 50)
    assert (back.state, back.attempts, back.next_attempt_at) == ("pending", 0, T0 + 50)


def test_retry_all__moves_every_item_of_that_state_and_endpoint_at_once(outbox):
    dead_a = [enqueue(outbox, n) for n in (1, 2)]
    dead_b = enqueue(outbox, 3, endpoint="practice-b")
    held = enqueue(outbox, 4)
    for item in outbox.claim("w1", now=T0, limit=10):
        if item.id != held:
            assert outbox.mark_dead(item, "POST Communication: 400 Bad Request", now=T0)
    outbox.recover("w1", now=T0)
    assert outbox.hold(held, "operator: check recipient")
    assert outbox.retry_all("dead", endpoint="practice-a", now=T0 + 5) == dead_a
    assert outbox.get(dead_b).state == "dead" and outbox.get(held).state == "held"
    assert [(outbox.get(i).state, outbox.get(i).attempts) for i in dead_a] == [("pending", 0)] * 2
    assert outbox.retry_all("dead", now=T0 + 6) == [dead_b]
    assert outbox.retry_all("held", now=T0 + 7) == [held] and outbox.get(held).hold_reason is None
    assert outbox.retry_all("dead", now=T0 + 8) == []
    with pytest.raises(Conflict):
        outbox.retry_all("delivered")


def test_hold_and_release__held_items_are_not_claimed_until_released(outbox):
    item_id = enqueue(outbox, 1)
    assert outbox.hold(item_id, "operator: check recipient")
    assert outbox.get(item_id).hold_reason == "operator: check recipient"
    assert outbox.claim("w1", now=T0 + 10) == []
    released = outbox.release(item_id, now=T0 + 20)
    assert released.state == "pending" and released.hold_reason is None
    assert len(outbox.claim("w1", now=T0 + 20)) == 1


def test_hold__by_worker_requires_its_lease(outbox):
    enqueue(outbox, 1)
    [item] = outbox.claim("w1", now=T0)
    assert not outbox.hold(item, "consent revoked", worker_id="w2")
    assert outbox.hold(item, "consent revoked", worker_id="w1")
    assert outbox.get(item.id).state == "held"


def test_hold_recipient__holds_every_pending_item_for_that_recipient(outbox):
    enqueue(outbox, 1)
    enqueue(outbox, 2)
    outbox.enqueue(note(3), endpoint="practice-a", base_url=BASE, recipient_ref="Practitioner/other")
    assert outbox.hold_recipient("Practitioner/ref-therapist", "consent revoked") == 2
    assert outbox.counts()["held"] == 2 and outbox.counts()["pending"] == 1


@pytest.mark.parametrize("operation, state_needed", [("release", "held"), ("retry", "dead")])
def test_operator_moves__refuse_items_in_other_states(outbox, operation, state_needed):
    item_id = enqueue(outbox, 1)
    with pytest.raises(Conflict) as err:
        getattr(outbox, operation)(item_id)
    assert "is pending" in str(err.value) and state_needed in str(err.value)
    with pytest.raises(NotFound):
        getattr(outbox, operation)(item_id + 999)


def test_purge_delivered__removes_only_delivered_items_older_than_cutoff(outbox):
    for n in range(3):
        enqueue(outbox, n)
    items = outbox.claim("w1", now=T0)
    outbox.mark_delivered(items[0], server_id="a", now=T0 + 10)
    outbox.mark_delivered(items[1], server_id="b", now=T0 + 100)
    assert outbox.purge_delivered(older_than=T0 + 50) == 1
    assert outbox.counts() == {"pending": 0, "sending": 1, "delivered": 1, "held": 0, "dead": 0}


def test_list__filters_by_state_and_endpoint_in_id_order(outbox):
    ids = [enqueue(outbox, n) for n in range(3)]
    enqueue(outbox, 9, endpoint="practice-b")
    outbox.hold(ids[1], "x")
    assert [i.id for i in outbox.list("pending", endpoint="practice-a")] == [ids[0], ids[2]]
    assert [i.id for i in outbox.list(limit=2)] == ids[:2]
    with pytest.raises(InputError):
        outbox.list("bogus")


def test_counts__lists_every_state(outbox):
    assert outbox.counts() == dict.fromkeys(STATES, 0)


def test_summary__carries_no_resource_content(outbox):
    item_id = enqueue(outbox, 1)
    text = json.dumps(outbox.get(item_id).summary())
    assert "Dosing session" not in text and "NOTE-0001" in text


def test_outbox_survives_reopening_the_database(db, tmp_path):
    enqueue(Outbox(db, clock=lambda: T0), 1)
    db.close()
    reopened = Outbox(Database(db.url), clock=lambda: T0)
    assert reopened.counts()["pending"] == 1


def test_context__keeps_latest_version_and_returns_patient_consents_plus_parties(outbox):
    consent = json.loads((DATA / "bridge" / "Example-Consent-consent-1.json").read_text())
    role = json.loads((DATA / "bridge" / "Example-PractitionerRole-ref-therapist-role.json").read_text())
    v2 = dict(consent, meta={"versionId": "2"}, status="inactive")
    v1 = dict(consent, meta={"versionId": "1"})
    other = dict(consent, id="consent-9", patient={"reference": "Patient/someone-else"})
    assert outbox.put_context(v2)
    assert not outbox.put_context(v1)  # older than what is stored
    outbox.put_context(other)
    outbox.put_context(role)
    got = outbox.context_for("Patient/client-1")
    assert [(r["resourceType"], r["id"]) for r in got] == [
        ("Consent", "consent-1"),
        ("PractitionerRole", role["id"]),
    ]
    assert got[0]["status"] == "inactive"
    with pytest.raises(InputError):
        outbox.put_context({"resourceType": "Communication", "id": "x"})


def test_put_context__a_consent_reposted_under_a_new_id_replaces_the_old_one(outbox):
    """An EHR that re-posts a revoked consent gets a new server id; the gate must see one consent."""
    consent = json.loads(
        (Path(__file__).resolve().parents[1] / "data" / "delivery" / "Consent-open-ended.json").read_text()
    )
    first = dict(consent, id="srv-1")
    revoked = dict(consent, id="srv-2", status="inactive")
    patient = first["patient"]["reference"]
    outbox.put_context(first)
    outbox.put_context(revoked)
    consents = [r for r in outbox.context_for(patient) if r["resourceType"] == "Consent"]
    assert [(c["id"], c["status"]) for c in consents] == [("srv-2", "inactive")]


def test_a_consent_keyed_by_the_earlier_rule_is_rekeyed_on_upgrade_so_a_repost_replaces_it(db):
    """Before outbox-3 a Consent's key could be an identifier marked `use: old`; the new rule
    skips those, so without re-keying a re-posted (revoked) consent would sit beside the old copy."""
    consent = json.loads(
        (Path(__file__).resolve().parents[1] / "data" / "delivery" / "Consent-open-ended.json").read_text()
    )
    consent["identifier"] = [{"use": "old", "system": "urn:old", "value": "o-1"}, *consent["identifier"]]
    first = dict(consent, id="srv-1")
    outbox = Outbox(db, clock=lambda: T0)
    outbox.put_context(first)
    with db.transaction() as tx:  # as the code before outbox-3 stored it
        tx.execute("UPDATE outbox_context SET ident = 'urn:old|o-1' WHERE id = 'srv-1'")
        tx.execute("DELETE FROM schema_migrations WHERE name = 'outbox-3'")
    upgraded = Outbox(db, clock=lambda: T0)
    upgraded.put_context(dict(consent, id="srv-2", status="inactive"))
    consents = [
        r for r in upgraded.context_for(first["patient"]["reference"]) if r["resourceType"] == "Consent"
    ]
    assert [(c["id"], c["status"]) for c in consents] == [("srv-2", "inactive")]
