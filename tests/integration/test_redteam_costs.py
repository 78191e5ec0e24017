"""Red-team findings on cost and visibility another partner can inflate (2026-12-05: F3, F5, F11 a,
F1, F4): what one partner posts never hides another's data nor makes its requests or writes cost
more. Work is counted (rows decoded, bodies parsed), never timed.
"""

from __future__ import annotations

import copy
import itertools
import json
from typing import Any

import pytest

from fhir_kap.bridge.access import OTHER_SOURCE_PARTIES
from testkit.bridge import FHIR, load, make_bridge

_SERIAL = itertools.count()
_NOTE = load("Example-Communication-note-1.json")
A_NPI = "http://hl7.org/fhir/sid/us-npi|1234567893"


def _note(recipient: str, category: str = "session-dates") -> dict[str, Any]:
    note = copy.deepcopy(_NOTE)
    note["identifier"][0]["value"] = f"costs-{next(_SERIAL)}"
    note["recipient"] = [{"reference": recipient}]
    note["category"][0]["coding"][0]["code"] = category
    return note


def _dense(n: int = 40) -> list[dict[str, Any]]:
    """Padding that makes a body costly to decode."""
    return [{"use": "official", "text": f"name {i} " * 20} for i in range(n)]


class Decodes:
    """Counts the store rows decoded (`storage.store._row`), and their types."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        import fhir_kap.storage.store as store_module

        self.n = 0
        self.types: list[str] = []
        row = store_module._row

        def counting(r: Any) -> Any:
            self.n += 1
            self.types.append(r["type"])
            return row(r)

        monkeypatch.setattr(store_module, "_row", counting)


#: A clinic-side affiliation the context-cache tests change and roll back.
_ROLE: dict[str, Any] = {
    "resourceType": "PractitionerRole",
    "id": "r1",
    "active": True,
    "practitioner": {"reference": "Practitioner/p1"},
    "organization": {"reference": "Organization/o1"},
}


def _naming_dense_parties(store: Any, tx: Any = None) -> dict[str, Any]:
    """A note to A's therapist whose recipients first name 19 large Practitioners B stored."""
    parties = [
        store.create({"resourceType": "Practitioner", "name": _dense()}, source="practice-b", tx=tx)[0].id
        for _ in range(19)
    ]
    note = _note("Practitioner/ref-therapist")
    note["recipient"] = [{"reference": f"Practitioner/{p}"} for p in parties] + note["recipient"]
    return note


# F3 ---------------------------------------------------------------------------------------------


def test_another_partners_parties_neither_crowd_out_nor_inflate_a_partners_search(tmp_path, monkeypatch):
    bridge = make_bridge(tmp_path, consent="Consent-open-ended.json")
    store = bridge.app.extensions["fhir_kap"].store
    system, value = A_NPI.split("|")
    with store.transaction() as tx:  # practice B: 205 roles naming A's therapist, 205 "A"s
        for i in range(205):
            store.create(
                {
                    "resourceType": "PractitionerRole",
                    "active": True,
                    "practitioner": {"reference": "Practitioner/ref-therapist"},
                    "code": [{"text": f"role {i} " * 50}],
                },
                source="practice-b",
                tx=tx,
            )
            store.create(
                {
                    "resourceType": "Practitioner",
                    "identifier": [{"system": system, "value": value}],
                    "name": _dense(),
                },
                source="practice-b",
                tx=tx,
            )
    role = bridge.post(
        "clinic",
        "/fhir/PractitionerRole",
        {
            "resourceType": "PractitionerRole",
            "active": True,
            "practitioner": {"reference": "Practitioner/ref-therapist"},
            "organization": {"reference": "Organization/kap-clinic"},
        },
    )
    assert role.status_code == 201, role.get_data(as_text=True)
    role_id = role.get_json(force=True)["id"]
    sent = bridge.post("clinic", "/fhir/Communication", _note(f"PractitionerRole/{role_id}"))
    assert sent.status_code == 201, sent.get_data(as_text=True)
    note_id = sent.get_json(force=True)["id"]

    decodes = Decodes(monkeypatch)
    resp = bridge.get("a", "/fhir/Communication?_count=10")
    assert resp.status_code == 200, resp.get_data(as_text=True)
    found = [e["resource"]["id"] for e in resp.get_json(force=True).get("entry", [])]
    assert note_id in found  # the clinic's later role is not crowded out by B's 205
    # B's roles decoded: at most OTHER_SOURCE_PARTIES (is it active?), whatever B posted; plus the
    # clinic's role, the note, and the gate's own reads
    assert decodes.n <= OTHER_SOURCE_PARTIES + 10
    resp = bridge.get("a", f"/fhir/PractitionerRole?_id={role_id}")
    assert resp.status_code == 200


# F5 ---------------------------------------------------------------------------------------------


def test_a_note_write_decodes_no_subscription_body_it_decoded_before(tmp_path, monkeypatch):
    import fhir_kap.storage.subscriptions as subs_module
    from testkit.subscriptions import FIXTURE_ORIGIN, register_origin, sub

    bridge = make_bridge(tmp_path, consent="Consent-open-ended.json")
    register_origin(bridge.app, "practice-b", FIXTURE_ORIGIN)
    for i in range(50):  # B's Subscriptions, as dense as a body may be
        body = sub("R4", "note")
        body["reason"] = f"padding {i} " * 400
        resp = bridge.post("b", "/fhir/Subscription", body)
        assert resp.status_code == 201, resp.get_data(as_text=True)
    decoded = []
    row = subs_module._row

    def counting(r: Any) -> Any:
        decoded.append(r["id"])
        return row(r)

    monkeypatch.setattr(subs_module, "_row", counting)
    per_write = []
    for _ in range(3):
        decoded.clear()
        resp = bridge.post("clinic", "/fhir/Communication", _note("Practitioner/ref-therapist"))
        assert resp.status_code == 201, resp.get_data(as_text=True)
        per_write.append(len(decoded))
    assert per_write[0] <= 50  # the first write parses each listening version once ...
    assert per_write[1:] == [0, 0]  # ... later writes none
    # a changed Subscription is read again (its new version), and only it
    sid = bridge.get("b", "/fhir/Subscription?_count=1").get_json(force=True)["entry"][0]["resource"]["id"]
    body = dict(sub("R4", "note"), id=sid, reason="changed")
    resp = bridge.client.put(
        f"/fhir/Subscription/{sid}", data=json.dumps(body), headers=bridge.h("b", **{"Content-Type": FHIR})
    )
    assert resp.status_code == 200, resp.get_data(as_text=True)
    decoded.clear()
    assert (
        bridge.post("clinic", "/fhir/Communication", _note("Practitioner/ref-therapist")).status_code == 201
    )
    assert decoded == [sid]


# F11 a ------------------------------------------------------------------------------------------


def test_concurrent_subscription_creates_never_pass_the_per_partner_limit(tmp_path, monkeypatch):
    import threading

    from fhir_kap.bridge.subscriptions import MAX_PER_PARTNER
    from fhir_kap.storage.subscriptions import Subscriptions
    from testkit.subscriptions import FIXTURE_ORIGIN, register_origin, sub

    bridge = make_bridge(tmp_path)
    register_origin(bridge.app, "practice-b", FIXTURE_ORIGIN)
    for _ in range(MAX_PER_PARTNER - 2):
        assert bridge.post("b", "/fhir/Subscription", sub("R4", "note")).status_code == 201
    burst = 8
    # Every request of the burst reads what it already holds at the same moment (a barrier after
    # any read of the partner's Subscriptions; harmless where nothing reads there).
    gate = threading.Barrier(burst, timeout=2)
    of_partner = Subscriptions.of_partner

    def in_step(self: Any, *a: Any, **k: Any) -> Any:
        got = of_partner(self, *a, **k)
        try:
            gate.wait()
        except threading.BrokenBarrierError:
            pass
        return got

    monkeypatch.setattr(Subscriptions, "of_partner", in_step)
    codes: list[int] = []

    def create() -> None:
        client = bridge.app.test_client()
        resp = client.post(
            "/fhir/Subscription",
            data=json.dumps(sub("R4", "note")),
            headers=bridge.h("b", **{"Content-Type": FHIR}),
        )
        codes.append(resp.status_code)

    threads = [threading.Thread(target=create) for _ in range(burst)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    monkeypatch.undo()
    held = bridge.app.extensions["fhir_kap"].events.subs.of_partner("practice-b", limit=1000)
    assert len(held) == MAX_PER_PARTNER
    assert len(codes) == burst and codes.count(201) == 2  # the others refused (subscription:limit)
    assert all(400 <= c < 500 for c in codes if c != 201)


# F1 ---------------------------------------------------------------------------------------------


class ContextDecodes:
    """Counts the consent-context bodies decoded (`jsonio.loads(..., source="outbox context")`)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        from fhir_kap import jsonio

        self.n = 0
        loads = jsonio.loads

        def counting(text: Any, *a: Any, **k: Any) -> Any:
            if k.get("source") == "outbox context":
                self.n += 1
            return loads(text, *a, **k)

        monkeypatch.setattr(jsonio, "loads", counting)


def test_a_read_does_not_decode_the_context_parties_again_when_none_changed(tmp_path, monkeypatch):
    bridge = make_bridge(tmp_path, consent="Consent-open-ended.json")
    outbox = bridge.app.extensions["fhir_kap"].outbox
    for i in range(60):  # an authority's dense Practitioners, all in the consent context
        outbox.put_context({"resourceType": "Practitioner", "id": f"dense-{i}", "name": _dense()})
    sent = bridge.post("clinic", "/fhir/Communication", _note("Practitioner/ref-therapist"))
    assert sent.status_code == 201, sent.get_data(as_text=True)
    note_id = sent.get_json(force=True)["id"]
    decodes = ContextDecodes(monkeypatch)
    assert bridge.get("a", f"/fhir/Communication/{note_id}").status_code == 200
    assert bridge.get("a", f"/fhir/Communication/{note_id}").status_code == 200
    decodes.n = 0
    assert bridge.get("a", f"/fhir/Communication/{note_id}").status_code == 200
    assert decodes.n <= 2  # the client's Consent (and Patient): none of the 60 parties
    outbox.put_context({"resourceType": "Practitioner", "id": "dense-7", "name": _dense(2)})
    decodes.n = 0
    assert bridge.get("a", f"/fhir/Communication/{note_id}").status_code == 200
    assert decodes.n <= 3  # ... and the one that changed


@pytest.mark.parametrize("same_process", [True, False])
def test_a_changed_party_counts_at_the_next_decision_even_at_the_same_clock(db, same_process):
    from fhir_kap.storage.context import ConsentContext
    from fhir_kap.storage.outbox import Outbox

    Outbox(db, clock=lambda: 0.0)  # the outbox migrations create outbox_context
    reader = ConsentContext(db, clock=lambda: 5.0)
    writer = reader if same_process else ConsentContext(db, clock=lambda: 5.0)
    role = dict(_ROLE)
    writer.put(role)
    assert [r.get("active") for r in reader.for_patient("Patient/x")] == [True]
    writer.put(dict(role, active=False))  # no versionId, the same clock reading
    assert [r.get("active") for r in reader.for_patient("Patient/x")] == [False]
    writer.put(dict(role, active=True, organization={"reference": "Organization/o2"}))
    got = reader.for_patient("Patient/x")
    assert [(r.get("active"), r["organization"]["reference"]) for r in got] == [(True, "Organization/o2")]


def test_a_party_change_rolled_back_is_never_remembered(db):
    """The gate also runs inside a write's transaction (the Subscription fan-out): a party change
    of that same transaction is seen there, but never cached, since a rollback leaves no commit
    with it and a later commit may carry the same version and time (a clock at or behind the
    row's). The cache kept it and served the rolled-back body after another writer's commit."""
    from fhir_kap.storage.context import ConsentContext
    from fhir_kap.storage.outbox import Outbox

    Outbox(db, clock=lambda: 0.0)
    reader = ConsentContext(db, clock=lambda: 5.0)
    other = ConsentContext(db, clock=lambda: 5.0)  # another process
    role = dict(_ROLE)
    reader.put(role)
    assert [r.get("active") for r in reader.for_patient("Patient/x")] == [True]
    with pytest.raises(RuntimeError), db.transaction():
        reader.put(dict(role, active=False))
        assert [r.get("active") for r in reader.for_patient("Patient/x")] == [False]  # its own write
        raise RuntimeError("rolled back")
    other.put(dict(role, active=True, organization={"reference": "Organization/o2"}))
    got = reader.for_patient("Patient/x")
    assert [(r.get("active"), r["organization"]["reference"]) for r in got] == [(True, "Organization/o2")]


def test_parties_read_inside_a_write_are_remembered_unless_that_write_changed_them(db, monkeypatch):
    """A note write decides its fan-out inside its own transaction: the parties it did not
    change are committed and are remembered there too (before, nothing read in a transaction was,
    so the benchmarked POST decoded every party on every decision)."""
    from fhir_kap.storage import context as context_module
    from fhir_kap.storage.context import ConsentContext
    from fhir_kap.storage.outbox import Outbox

    Outbox(db, clock=lambda: 0.0)
    ctx = ConsentContext(db)
    for i in range(5):
        ctx.put({"resourceType": "Practitioner", "id": f"p{i}"})
    decoded: list[str] = []
    loads = context_module.jsonio.loads

    def counting(text: Any, *a: Any, **k: Any) -> Any:
        decoded.append("x")
        return loads(text, *a, **k)

    monkeypatch.setattr(context_module.jsonio, "loads", counting)
    with db.transaction():
        ctx.put(dict(_ROLE))  # this write's own party
        ctx.for_patient("Patient/x")
        assert len(decoded) == 6
        decoded.clear()
        ctx.for_patient("Patient/x")
        assert len(decoded) == 1  # only the uncommitted role again
    decoded.clear()
    ctx.for_patient("Patient/x")
    assert len(decoded) == 1  # the role, now committed, once; then remembered
    decoded.clear()
    ctx.for_patient("Patient/x")
    assert decoded == []


def test_two_concurrent_puts_of_one_party_keep_the_newer_version(db, monkeypatch):
    """Both writers read the stored row before either writes (held there on purpose): on
    PostgreSQL nothing serialised them, so version 2 could overwrite version 3 (a revocation
    undone). Each put now holds the context's write lock for its transaction (SQLite: BEGIN
    IMMEDIATE; PostgreSQL: an advisory lock)."""
    import threading
    import time

    from fhir_kap.storage.context import ConsentContext
    from fhir_kap.storage.outbox import Outbox
    from fhir_kap.storage.sql import database as dbm

    Outbox(db, clock=lambda: 0.0)

    def role(version: str, org: str) -> dict[str, Any]:
        return {
            "resourceType": "PractitionerRole",
            "id": "r1",
            "meta": {"versionId": version},
            "active": True,
            "practitioner": {"reference": "Practitioner/p1"},
            "organization": {"reference": f"Organization/{org}"},
        }

    ConsentContext(db).put(role("1", "o1"))
    execute = dbm.Tx.execute

    def slow(self: Any, sql: str, params: Any = ()) -> Any:
        rows = execute(self, sql, params)
        if sql.startswith("SELECT version, updated_at FROM outbox_context"):
            time.sleep(0.3)  # the other writer reads the same old row meanwhile, unless serialised
        return rows

    monkeypatch.setattr(dbm.Tx, "execute", slow)

    def put(version: str, org: str, delay: float) -> None:
        time.sleep(delay)
        ConsentContext(db).put(role(version, org))

    writers = [
        threading.Thread(target=put, args=("3", "newest", 0.0)),
        threading.Thread(target=put, args=("2", "older", 0.1)),
    ]
    for t in writers:
        t.start()
    for t in writers:
        t.join(timeout=30)
    monkeypatch.setattr(dbm.Tx, "execute", execute)
    (row,) = db.query("SELECT version FROM outbox_context WHERE type = 'PractitionerRole'")
    assert str(row["version"]) == "3"


def test_the_decoded_parties_a_process_keeps_are_bounded_and_answers_stay_whole(db, monkeypatch):
    """The party cache had no bound: an authority's 60 parties of 900 KB held ~700 MB in each
    worker. It keeps at most PARTY_CACHE_BYTES of their JSON now (the oldest filed go first; a
    party larger than the whole budget is decoded each time, never held); every gate still gets
    every party."""
    from fhir_kap.storage import context as context_module
    from fhir_kap.storage.context import ConsentContext
    from fhir_kap.storage.outbox import Outbox

    Outbox(db, clock=lambda: 0.0)
    monkeypatch.setattr(context_module, "PARTY_CACHE_BYTES", 10_000)
    ctx = ConsentContext(db)
    for i in range(20):  # ~2 KB each: 40 KB in all, four times the budget
        ctx.put({"resourceType": "Practitioner", "id": f"p{i}", "name": [{"text": "x" * 2000}]})
    ctx.put({"resourceType": "Practitioner", "id": "huge", "name": [{"text": "y" * 20_000}]})
    for _ in range(2):
        got = {r["id"] for r in ctx.for_patient("Patient/x")}
        assert got == {f"p{i}" for i in range(20)} | {"huge"}
        assert ctx._party_bytes <= 10_000 and ("Practitioner", "huge") not in ctx._parties
        assert ctx._party_bytes == sum(held[3] for held in ctx._parties.values())


def test_finding_a_partners_parties_counts_no_other_writers_rows(tmp_path, monkeypatch):
    """`partner_refs` reads a bounded window per writer; it used to COUNT every matching row of each
    writer too (B's 100,000 Practitioners carrying A's NPI counted on every A search)."""
    from fhir_kap.storage.sql import database as dbm

    bridge = make_bridge(tmp_path)
    svc = bridge.app.extensions["fhir_kap"]
    store = svc.store
    with store.transaction() as tx:
        for _ in range(30):
            store.create(
                {
                    "resourceType": "Practitioner",
                    "identifier": [dict(zip(("system", "value"), A_NPI.split("|"), strict=True))],
                },
                source="practice-b",
                tx=tx,
            )
    counted: list[str] = []
    execute = dbm.Tx.execute

    def spy(self: Any, sql: str, params: Any = ()) -> Any:
        if "COUNT(" in sql:
            counted.append(sql)
        return execute(self, sql, params)

    monkeypatch.setattr(dbm.Tx, "execute", spy)
    refs = svc.access.partner_refs(svc.partners.get("practice-a"))
    assert counted == []
    assert sum(r.startswith("Practitioner/") for r in refs) >= 20  # B's, within its bound


# F4 ---------------------------------------------------------------------------------------------


def test_a_search_reads_each_recipient_party_once_however_many_notes_name_it(tmp_path, monkeypatch):
    bridge = make_bridge(tmp_path, consent="Consent-open-ended.json")
    store = bridge.app.extensions["fhir_kap"].store
    with store.transaction() as tx:
        note = _naming_dense_parties(store, tx)
        for i in range(100):  # 19 of B's dense Practitioners, then A's therapist
            copy_ = dict(note, identifier=[dict(note["identifier"][0], value=f"dense-{i}")])
            store.create(copy_, source="practice-b", tx=tx)
    read = Decodes(monkeypatch).types
    resp = bridge.get("a", "/fhir/Communication?_count=100")
    assert resp.status_code == 200, resp.get_data(as_text=True)
    assert resp.get_json(force=True)["total"] == 100
    assert read.count("Communication") == 100
    assert read.count("Practitioner") == 19  # each party once, not once per note


def test_a_note_write_reads_each_recipient_party_once_for_every_subscribed_partner(tmp_path, monkeypatch):
    from testkit.subscriptions import FIXTURE_ORIGIN, register_origin, sub

    bridge = make_bridge(
        tmp_path, consent="Consent-open-ended.json", partners={"c": ("practice-c", "system/*.*")}
    )
    store = bridge.app.extensions["fhir_kap"].store
    for who, name in (("a", "practice-a"), ("c", "practice-c")):
        register_origin(bridge.app, name, FIXTURE_ORIGIN)
        assert bridge.post(who, "/fhir/Subscription", sub("R4", "note")).status_code == 201
    note = _naming_dense_parties(store)
    read = Decodes(monkeypatch).types
    resp = bridge.post("b", "/fhir/Communication", note)
    assert resp.status_code == 201, resp.get_data(as_text=True)
    assert read.count("Practitioner") == 19  # A (addressed, then the gate) and C share one read each


def test_a_note_write_reads_each_recipient_party_once_for_the_rest_hook_partners(tmp_path, monkeypatch):
    """The legacy rest-hook fan-out (a partner registered with a webhook URL) asks, for each
    hooked partner, whether the note is addressed to it and then the consent gate: each of the
    note's recipient parties is read once for the whole write, not once per partner and check."""

    hooked = {
        k: (name, "system/*.*", {"references": [ref], "webhook_url": "http://127.0.0.1:9/hook"})
        for k, name, ref in (
            ("c", "practice-c", "Practitioner/c-therapist"),
            ("d", "practice-d", "Practitioner/d-therapist"),
        )
    }
    bridge = make_bridge(
        tmp_path, consent="Consent-open-ended.json", partners=hooked, options={"notify": True}
    )
    svc = bridge.app.extensions["fhir_kap"]
    try:
        note = _naming_dense_parties(svc.store)
        read = Decodes(monkeypatch).types
        resp = bridge.post("b", "/fhir/Communication", note)
        assert resp.status_code == 201, resp.get_data(as_text=True)
        assert read.count("Practitioner") <= 19  # C and D: each party read once for the write
    finally:
        svc.inbound.notifier.stop()
