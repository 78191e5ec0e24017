"""Group commit: concurrent writes share one durable commit, fail alone, and survive kill -9 only if acknowledged."""

from __future__ import annotations

import itertools
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar

import pytest

from fhir_kap.exchange.webhooks import EVENT_COMMUNICATION, sign
from fhir_kap.storage.db import Database
from fhir_kap.storage.store import Store
from testkit.bridge import FHIR, load, make_bridge
from testkit.groupcommit import _insert


def _rows(db_path) -> set[str]:
    fresh = Database(f"sqlite:///{db_path}")  # another connection: sees only what was committed
    try:
        return {r["k"] for r in fresh.execute("SELECT k FROM t")}
    finally:
        fresh.close()


def _hold_first_batch(db: Database, others: int, running: threading.Event):
    """A unit that keeps its batch open until `others` units queue behind it."""

    def first(tx):
        running.set()
        tx.execute("INSERT INTO t (k) VALUES (?)", ("first",))
        deadline = time.monotonic() + 10
        while db.committer.queued < others and time.monotonic() < deadline:
            time.sleep(0.005)
        return "first"

    return first


def _run_concurrently(db: Database, units: list, running: threading.Event) -> list:
    results: list = [None] * len(units)

    def call(i: int) -> None:
        try:
            results[i] = db.write(units[i])
        except Exception as exc:  # noqa: BLE001 - compared below
            results[i] = exc

    leader = threading.Thread(target=call, args=(0,))
    leader.start()
    assert running.wait(10)  # the first batch is open: everyone else queues behind it
    rest = [threading.Thread(target=call, args=(i,)) for i in range(1, len(units))]
    for t in rest:
        t.start()
    for t in [leader, *rest]:
        t.join(timeout=30)
    return results


def test_concurrent_writes_share_one_commit_and_each_is_durable_when_answered(db, tmp_path):
    keys = [f"k{i}" for i in range(12)]
    running = threading.Event()
    results = _run_concurrently(
        db, [_hold_first_batch(db, len(keys), running), *[_insert(k) for k in keys]], running
    )
    assert results == ["first", *keys]
    assert _rows(tmp_path / "g.sqlite3") == {"first", *keys}
    assert db.committer.units == 13 and db.committer.batches == 2  # the held batch, then all twelve at once


@pytest.mark.parametrize("max_batch", [1, 2, 3])
def test_a_leader_always_runs_its_own_unit_even_when_the_queue_is_longer_than_a_batch(
    db, tmp_path, max_batch
):
    from fhir_kap.storage.sql.groupcommit import GroupCommitter

    db._committer = GroupCommitter(db, max_batch=max_batch)
    gate = threading.Event()
    results: dict[int, object] = {}

    def slow(tx):
        gate.wait(10)
        tx.execute("INSERT INTO t (k) VALUES (?)", ("k0",))
        return 0

    def call(i: int) -> None:
        try:
            results[i] = db.write(slow if i == 0 else _insert(f"k{i}"))
        except Exception as exc:  # noqa: BLE001 - compared below
            results[i] = exc

    threads = [threading.Thread(target=call, args=(i,)) for i in range(8)]
    threads[0].start()
    time.sleep(0.2)  # the first batch is open
    for t in threads[1:]:
        t.start()
    deadline = time.monotonic() + 10
    while db.committer.queued < 7 and time.monotonic() < deadline:
        time.sleep(0.005)
    gate.set()
    for t in threads:
        t.join(timeout=30)
    assert results == {0: 0, **{i: f"k{i}" for i in range(1, 8)}}  # every caller got its own result
    assert _rows(tmp_path / "g.sqlite3") == {f"k{i}" for i in range(8)}  # and every write ran, durably
    assert db.committer.units == 8


def test_a_failing_write_is_rolled_back_alone_and_gets_its_own_error(db, tmp_path):
    running = threading.Event()
    units = [_hold_first_batch(db, 3, running), _insert("ok-1"), _insert("bad", fail=True), _insert("ok-2")]
    results = _run_concurrently(db, units, running)
    assert results[0] == "first" and results[1] == "ok-1" and results[3] == "ok-2"
    assert isinstance(results[2], ValueError)
    assert _rows(tmp_path / "g.sqlite3") == {"first", "ok-1", "ok-2"}
    assert db.committer.batches == 2


def test_a_transaction_opened_inside_a_write_joins_it_as_a_savepoint(db, tmp_path):
    def work(tx):
        tx.execute("INSERT INTO t (k) VALUES ('outer')")
        with db.transaction() as inner:  # what Outbox.put_context does
            inner.execute("INSERT INTO t (k) VALUES ('inner')")
        with pytest.raises(ValueError), db.transaction() as inner:
            inner.execute("INSERT INTO t (k) VALUES ('inner-rolled-back')")
            raise ValueError
        return "done"

    assert db.write(work) == "done"
    assert _rows(tmp_path / "g.sqlite3") == {"outer", "inner"}
    with pytest.raises(ValueError):
        db.write(lambda tx: (_insert("also-outer")(tx), db.write(_insert("nested", fail=True))))
    assert _rows(tmp_path / "g.sqlite3") == {"outer", "inner"}


@pytest.mark.parametrize(
    "name, rtype",
    [
        ("Example-Communication-note-1.json", "Communication"),
        ("Example-ServiceRequest-referral-1.json", "ServiceRequest"),
        ("Consent-open-ended.json", "Consent"),
    ],
)
def test_an_accepted_post_is_exactly_one_commit_with_everything_it_writes(tmp_path, name, rtype):
    bridge = make_bridge(tmp_path)
    svc = bridge.app.extensions["fhir_kap"]
    bridge.get("clinic", "/fhir/Communication")  # the token lookup is cached from here on
    svc.partners.list()  # and the partner list (authorship reads it), as in a running bridge
    statements: list[str] = []
    svc.db.conn.set_trace_callback(statements.append)
    resp = bridge.post("clinic", f"/fhir/{rtype}", load(name))
    svc.db.conn.set_trace_callback(None)
    assert resp.status_code == 201, resp.get_data(as_text=True)
    verbs = [s.split()[0].upper() for s in statements]
    assert verbs.count("COMMIT") == 1 and verbs.count("BEGIN") == 1
    assert not any(v == "SELECT" for v in verbs[: verbs.index("BEGIN")])  # no reads before the write
    tables = " ".join(statements)
    if rtype == "ServiceRequest":
        assert tables.count("INSERT INTO fhir_current") == 2  # the referral and its Task, together
    if rtype == "Consent":
        assert "outbox_context" in tables  # the consent context joins the same commit


class _SlowHook(BaseHTTPRequestHandler):
    received: ClassVar[list] = []

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        time.sleep(1.5)
        self.received.append((self.headers, body))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_webhooks_run_after_the_commit_off_the_request_and_stay_id_only_and_signed(tmp_path):
    from fhir_kap.bridge import BridgeOptions, create_app
    from fhir_kap.config import load_settings
    from fhir_kap.storage.partners import Partners

    server = ThreadingHTTPServer(("127.0.0.1", 0), _SlowHook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        settings = load_settings(env={}, data_dir=tmp_path / "data")
        partners = Partners(Database(settings.db_url))
        _, sender = partners.add(
            "clinic-ehr", scopes="system/*.* kap/clinic", references=["Organization/kap-clinic"]
        )
        hooked, _ = partners.add(
            "practice-a",
            npis=["1234567893"],
            references=["Practitioner/ref-therapist"],
            webhook_url=f"http://127.0.0.1:{server.server_port}/hook",
        )
        app = create_app(settings, BridgeOptions(base_url="http://bridge.test/fhir"))
        consent = app.test_client().post(
            "/fhir/Consent",
            data=json.dumps(load("Consent-open-ended.json")),
            headers={"Authorization": f"Bearer {sender}", "Content-Type": FHIR},
        )
        assert consent.status_code == 201  # the hook fires only for a note the practice may read
        started = time.monotonic()
        resp = app.test_client().post(
            "/fhir/Communication",
            data=json.dumps(load("Example-Communication-note-1.json")),
            headers={"Authorization": f"Bearer {sender}", "Content-Type": FHIR},
        )
        assert resp.status_code == 201 and time.monotonic() - started < 1.0  # the 1.5 s hook is not awaited
        assert app.extensions["fhir_kap"].inbound.notifier.drain(timeout=10)
        ((headers, body),) = _SlowHook.received
        assert json.loads(body) == {
            "event": EVENT_COMMUNICATION,
            "resource": f"Communication/{resp.get_json()['id']}",
        }
        assert headers["X-KAP-Signature"] == sign(hooked.webhook_secret, headers["X-KAP-Timestamp"], body)
    finally:
        server.shutdown()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_kill_9_during_concurrent_posts_loses_no_acknowledged_write(tmp_path):
    import http.client

    env = {
        **os.environ,
        "FHIR_KAP_DATA_DIR": str(tmp_path / "data"),
        "PYTHONPATH": os.getcwd(),
        "FHIR_KAP_LOG_LEVEL": "WARNING",
    }
    env.pop("FHIR_KAP_DATABASE_URL", None)
    added = subprocess.run(
        [
            sys.executable,
            "-m",
            "fhir_kap.cli",
            "partners",
            "add",
            "practice-a",
            "--reference",
            "Practitioner/ref-therapist",  # its notes' sender (authorship), filled when missing
        ],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    token = json.loads(added.stdout)["token"]
    port = _free_port()
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fhir_kap.cli",
            "serve",
            "--port",
            str(port),
            "--workers",
            "2",
            "--threads",
            "8",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    acknowledged: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()
    note = load("Example-Communication-note-1.json")
    serial = itertools.count()

    def client() -> None:
        while not stop.is_set():
            # each POST a note of its own: the same identifier and content twice is one note (a resend)
            note_n = dict(
                note, identifier=[{"system": note["identifier"][0]["system"], "value": f"n-{next(serial)}"}]
            )
            body = json.dumps(note_n).encode()
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
                conn.request(
                    "POST",
                    "/fhir/Communication",
                    body=body,
                    headers={
                        "Authorization": f"Bearer {token}",
                        "Content-Type": FHIR,
                        "Prefer": "return=minimal",
                    },
                )
                resp = conn.getresponse()
                resp.read()
                if resp.status == 201:
                    with lock:
                        acknowledged.append(resp.headers["Location"].split("/")[-3])
            except OSError:
                time.sleep(0.05)

    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
                conn.request("GET", "/readyz")
                if conn.getresponse().status == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline and server.poll() is None, "bridge did not start"
            time.sleep(0.2)
        clients = [threading.Thread(target=client) for _ in range(6)]
        for t in clients:
            t.start()
        while len(acknowledged) < 150 and time.monotonic() < deadline + 30:
            time.sleep(0.01)
        os.killpg(server.pid, signal.SIGKILL)  # master and workers, mid-batch
    finally:
        stop.set()
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
        server.wait(timeout=30)
    for t in clients:
        t.join(timeout=15)
    assert len(acknowledged) >= 150
    store = Store(Database(f"sqlite:///{tmp_path / 'data' / 'fhir-kap.sqlite3'}"))
    missing = [rid for rid in acknowledged if store.get("Communication", rid) is None]
    assert missing == []
    # and nothing half-written: every current row has its history version and its index rows
    rows = store.db.execute(
        "SELECT c.id FROM fhir_current c LEFT JOIN fhir_history h ON h.seq = c.seq "
        "WHERE h.seq IS NULL OR NOT EXISTS (SELECT 1 FROM fhir_index i "
        "WHERE i.type = c.type AND i.id = c.id)"
    )
    assert rows == []


def test_wal_checkpoints_run_on_their_own_thread_not_inside_a_commit(db, tmp_path):
    from fhir_kap.storage.sql.groupcommit import GroupCommitter

    db._committer = committer = GroupCommitter(db, checkpoint_rows=20)
    checkpointer = committer.checkpointer
    assert checkpointer is not None
    for i in range(19):
        db.write(_insert(f"a{i}"))
    assert checkpointer.runs == 0 and not checkpointer.running  # not due yet: no thread at all
    # Until the thread runs, the committer's connection checkpoints at the usual 4000 pages.
    assert db.conn.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 4000
    unchecked = os.path.getsize(db.path)  # in WAL mode the database file grows only at a checkpoint
    db.write(_insert("a19"))
    deadline = time.monotonic() + 10
    while checkpointer.runs == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert checkpointer.runs >= 1 and checkpointer.running
    # The committed pages were copied into the database file, and the next writes start the
    # WAL over instead of growing it.
    assert os.path.getsize(db.path) > unchecked
    assert _rows(tmp_path / "g.sqlite3") == {f"a{i}" for i in range(20)}
    before = os.path.getsize(f"{db.path}-wal")
    for i in range(5):
        db.write(_insert(f"b{i}"))
    assert os.path.getsize(f"{db.path}-wal") <= before
    # Now the committing connection leaves checkpoints to the thread (64 MB backstop only).
    assert db.conn.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 16000
    committer.stop()
    assert not checkpointer.running
    for i in range(25):  # a stopped checkpointer is not started again
        db.write(_insert(f"c{i}"))
    assert not checkpointer.running


def test_a_bundle_counts_as_the_rows_it_writes_toward_the_next_checkpoint(db):
    from fhir_kap.storage.sql.groupcommit import GroupCommitter

    db._committer = committer = GroupCommitter(db, checkpoint_rows=50)

    def bundle(tx):
        for i in range(60):
            tx.execute("INSERT INTO t (k) VALUES (?)", (f"bundle-{i}",))

    db.write(bundle)  # one unit of work, sixty rows: due at once
    assert committer.checkpointer.running
    committer.stop()


def test_the_checkpointer_never_creates_a_database_that_is_gone(tmp_path):
    from fhir_kap.storage.sql.checkpoint import WalCheckpointer

    database = Database(f"sqlite:///{tmp_path / 'gone.sqlite3'}")
    checkpointer = WalCheckpointer(database, every_rows=1)
    checkpointer.committed(1)  # the file was never made: the thread cannot open it and ends
    deadline = time.monotonic() + 10
    while checkpointer.running and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not checkpointer.running and not (tmp_path / "gone.sqlite3").exists()
    database.execute("CREATE TABLE t (k TEXT)")  # now it exists: the next due signal starts a thread
    checkpointer.committed(1)
    while checkpointer.runs == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert checkpointer.runs >= 1
    checkpointer.stop()
    database.close()


def test_a_forked_child_opens_its_own_connection(db, tmp_path):
    parent_conn = db.conn
    db.write(_insert("parent"))
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: a new connection, and writes that work
        ok = 0
        try:
            ok = int(db.conn is not parent_conn)
            db.write(_insert("child"))
            ok += int(db.execute("SELECT COUNT(*) AS n FROM t")[0]["n"] == 2)
        finally:
            os.write(w, str(ok).encode())
            os._exit(0)
    os.close(w)
    os.waitpid(pid, 0)
    assert os.read(r, 8) == b"2"
    assert db.conn is parent_conn  # the parent keeps its own
    assert _rows(tmp_path / "g.sqlite3") == {"parent", "child"}


def test_an_abandoned_database_leaves_no_checkpoint_thread_behind(tmp_path):
    import gc

    from fhir_kap.storage.sql.groupcommit import GroupCommitter

    database = Database(f"sqlite:///{tmp_path / 'abandoned.sqlite3'}")
    database.execute("CREATE TABLE t (k TEXT PRIMARY KEY)")
    database._committer = GroupCommitter(database, checkpoint_rows=1)
    database.write(_insert("x"))
    thread = database._committer.checkpointer._thread
    assert thread is not None and thread.is_alive()
    del database
    gc.collect()
    thread.join(timeout=10)
    assert not thread.is_alive()


def test_a_read_never_waits_for_the_write_lock(db):
    """Database.query is a deferred transaction: it reads while another connection holds the
    write lock (Database.execute, a write transaction, would wait for it)."""
    db.write(_insert("seen"))
    other = Database(f"sqlite:///{db.path}")
    holder = other.conn
    holder.execute("BEGIN IMMEDIATE")  # another writer holds the lock
    try:
        db.conn.execute("PRAGMA busy_timeout=50")
        assert db.query("SELECT k FROM t") == [{"k": "seen"}]
        with pytest.raises(sqlite3.OperationalError):
            db.execute("SELECT k FROM t")
    finally:
        holder.execute("ROLLBACK")
        other.close()
