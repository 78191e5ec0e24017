"""The console's storage on SQLite and PostgreSQL: operator accounts (argon2id, the lock), sessions
(idle and absolute expiry, logout, password change), the append-only operator log, and the
queries the console pages use (keyset pages of the outbox, endpoint names, counts by endpoint, the
audit page with dates and its `before` key); then the whole console over the app on PostgreSQL."""

from __future__ import annotations

import uuid

import pytest

from fhir_kap.storage.auditlog import AuditLog
from fhir_kap.storage.operators import IDLE_SECONDS, LOCK_SECONDS, MAX_FAILURES, MAX_SECONDS, Operators
from fhir_kap.storage.outbox import Outbox
from testkit.console import PASSWORD, csrf_of, dead_letter, decision, enqueue, login


class Clock:
    def __init__(self, now: float = 1_750_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def ops(db):
    clock = Clock()
    operators = Operators(db, clock=clock)
    operators.add("alice", PASSWORD)
    return operators, clock


def test_operator__stored_as_argon2id_and_verified(ops):
    operators, _ = ops
    row = operators.db.query("SELECT password_hash FROM operators WHERE name = 'alice'")[0]
    assert row["password_hash"].startswith("$argon2id$")
    assert operators.verify("alice", PASSWORD) == (True, "ok")
    assert operators.verify("alice", PASSWORD + "x") == (False, "wrong-password")
    assert operators.verify("nobody", PASSWORD) == (False, "unknown")
    assert operators.verify("bad name!", PASSWORD) == (False, "unknown")


@pytest.mark.parametrize("password", ["short", "x" * 1025])
def test_operator__password_length_enforced(ops, password):
    operators, _ = ops
    with pytest.raises(Exception, match="password needs"):
        operators.add("bob", password)


def test_operator__locked_after_failures_then_unlocked_by_time(ops):
    operators, clock = ops
    for _ in range(MAX_FAILURES):
        assert operators.verify("alice", "wrong password here")[0] is False
    assert operators.verify("alice", PASSWORD) == (False, "locked")
    clock.now += LOCK_SECONDS + 1
    assert operators.verify("alice", PASSWORD) == (True, "ok")


def test_session__idle_and_absolute_expiry_logout_and_password_change(ops):
    operators, clock = ops
    token, session = operators.open_session("alice")
    assert operators.session(token).csrf == session.csrf
    assert operators.session(token + "x") is None and operators.session(None) is None
    clock.now += IDLE_SECONDS + 1
    assert operators.session(token) is None  # idle too long
    token, _ = operators.open_session("alice")
    for _ in range(int(MAX_SECONDS // (IDLE_SECONDS / 2)) + 1):
        clock.now += IDLE_SECONDS / 2
        operators.session(token)
    assert operators.session(token) is None  # past the absolute limit, though never idle
    token, _ = operators.open_session("alice")
    operators.close_session(token)
    assert operators.session(token) is None
    token, _ = operators.open_session("alice")
    operators.set_password("alice", PASSWORD + " new")
    assert operators.session(token) is None
    token, _ = operators.open_session("alice")
    operators.set_disabled("alice", True)
    assert operators.session(token) is None and operators.verify("alice", PASSWORD + " new") == (
        False,
        "disabled",
    )


def test_session__cookie_token_never_stored(ops):
    operators, _ = ops
    token, _ = operators.open_session("alice")
    rows = operators.db.query("SELECT * FROM operator_sessions")
    assert rows and all(token not in str(v) for r in rows for v in r.values())


def test_operator_log__append_only_in_the_database(ops):
    operators, _ = ops
    seq = operators.log("alice", "outbox-retry", "outbox/1", "ok")
    assert operators.entries(action="outbox-retry")[0].seq == seq
    for sql in ("UPDATE operator_log SET outcome = 'x'", "DELETE FROM operator_log"):
        with pytest.raises(Exception, match="append-only"):
            with operators.db.transaction() as tx:
                tx.execute(sql)
    assert operators.entries(action="outbox-retry")[0].outcome == "ok"


def test_outbox_pages__keyset_both_ways_endpoint_names_and_counts(db):
    outbox = Outbox(db)
    items = [enqueue(outbox, f"N-{i:02d}", endpoint=("ep-b" if i % 3 else "ep-a")) for i in range(12)]
    dead = dead_letter(outbox, "N-dead", endpoint="ep-c")
    ids = [i.id for i in items]
    assert [i.id for i in outbox.list(limit=5)] == ids[:5]
    assert [i.id for i in outbox.list(limit=5, after=ids[4])] == ids[5:10]
    assert [i.id for i in outbox.list(limit=5, before=ids[10])] == ids[5:10]
    assert [i.id for i in outbox.list("pending", endpoint="ep-a", limit=50)] == ids[0::3]
    assert outbox.endpoints() == ["ep-a", "ep-b", "ep-c"]
    counts = outbox.counts_by_endpoint()
    assert counts["ep-a"]["pending"] == 4 and counts["ep-b"]["pending"] == 8 and counts["ep-c"]["dead"] == 1
    assert outbox.list("dead")[0].id == dead.id


def test_audit_page__dates_and_before_key(db):
    from datetime import UTC, datetime

    audit = AuditLog(db)
    for day in (1, 2, 2, 3):
        decision(
            audit, permit=False, reason="outside-period", recorded=datetime(2026, 3, day, 12, tzinfo=UTC)
        )
    page = audit.page(outcome="4", since="2026-03-02", until="2026-03-03")
    assert len(page) == 2
    rest = audit.page(outcome="4", before=(page[0]["recorded_epoch"], page[0]["seq"]))
    assert [r["seq"] for r in rest] == [page[1]["seq"], *(r["seq"] for r in audit.page(until="2026-03-02"))]
    assert audit.query(outcome="4", since="2026-03-03")[0]["recorded"].startswith("2026-03-03")


@pytest.mark.postgres
def test_console_over_the_app_on_postgresql(pg_url, tmp_path):
    from fhir_kap.bridge.app import services
    from fhir_kap.storage.db import Database
    from testkit.bridge import make_bridge

    schema = "t_" + uuid.uuid4().hex[:12]
    admin = Database(pg_url)
    admin.execute(f"CREATE SCHEMA {schema}")
    try:
        url = pg_url + ("&" if "?" in pg_url else "?") + f"options=-csearch_path%3D{schema}"
        bridge = make_bridge(tmp_path, database_url=url)
        bridge.app.config["FHIR_KAP_CONSOLE_SECURE_COOKIE"] = False
        with bridge.app.app_context():
            sv = services()
        Operators(sv.db).add("alice", PASSWORD)
        item = dead_letter(sv.outbox, "N-pg-dead")
        decision(sv.audit, permit=False, reason="outside-period", patient="Patient/client-9")
        client = bridge.app.test_client()
        assert login(client).status_code == 303
        html = client.get("/console/outbox?state=dead").get_data(as_text=True)
        assert f'id="item-{item.id}"' in html
        resp = client.post(
            "/console/outbox/action", data={"csrf": csrf_of(html), "id": item.id, "action": "retry"}
        )
        assert resp.status_code == 303 and sv.outbox.get(item.id).state == "pending"
        denials = client.get("/console/audit?type=AuditEvent&outcome=deny&patient=Patient/client-9")
        assert "outside-period" in denials.get_data(as_text=True)
        for path in ("/console/", "/console/partners", "/console/webhooks", "/console/log"):
            assert client.get(path).status_code == 200, path
        assert [e.action for e in Operators(sv.db).entries()][:2] == ["outbox-retry", "login"]
        sv.db.close()
    finally:
        admin.execute(f"DROP SCHEMA {schema} CASCADE")
        admin.close()
