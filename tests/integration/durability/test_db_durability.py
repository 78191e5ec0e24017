"""SQLite durability: every write commit is followed by an fdatasync of the WAL before it returns,
outside the write locks; reads never sync; a failed sync is reported, never taken for success."""

from __future__ import annotations

import doctest
import errno
import fcntl
import os
import sqlite3
import threading
import time
import uuid

import pytest

from fhir_kap.errors import CommitUnavailable
from fhir_kap.fhir import identifiers
from fhir_kap.storage.db import Database
from fhir_kap.storage.sql import walsync as dbmod
from testkit.groupcommit import _insert


@pytest.fixture
def path(tmp_path):
    return tmp_path / "g.sqlite3"  # the file of test_bridge_group_commit's `db` fixture


class SyncSpy:
    """Stands in for fdatasync: records what it saw at the moment of the sync, then syncs."""

    def __init__(self, path, fail: bool = False) -> None:
        self.path = path
        self.fail = fail
        self.calls: list[dict] = []

    def __call__(self, fd: int) -> None:
        wal = os.stat(f"{self.path}-wal")
        fst = os.fstat(fd)
        other = sqlite3.connect(self.path)  # another connection: sees only what was committed
        try:
            committed = {k for (k,) in other.execute("SELECT k FROM t")}
        finally:
            other.close()
        with open(f"{self.path}.commit-lock", "a+b") as lock:  # is the committer's file lock free?
            try:
                fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                fcntl.flock(lock.fileno(), fcntl.LOCK_UN)
                lock_free = True
            except BlockingIOError:
                lock_free = False
        self.calls.append(
            {
                "same_file": (fst.st_dev, fst.st_ino) == (wal.st_dev, wal.st_ino),
                "committed": committed,
                "lock_free": lock_free,
                "thread": threading.current_thread().name,
            }
        )
        if self.fail:
            raise OSError(errno.EIO, "simulated disk error")
        os.fdatasync(fd)


def test_connections_leave_the_commit_sync_to_the_adapter(db):
    assert db.conn.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL: no sync inside COMMIT
    assert db.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_a_group_committed_write_is_synced_after_its_commit_and_outside_the_file_lock(db, path, monkeypatch):
    spy = SyncSpy(path)
    monkeypatch.setattr(dbmod, "_fdatasync", spy)
    assert db.write(_insert("a")) == "a"
    assert len(spy.calls) == 1  # exactly one sync, and write() returned only after it
    call = spy.calls[0]
    assert call["same_file"]  # the WAL SQLite wrote, not another file
    assert "a" in call["committed"]  # COMMIT came first: the sync makes a committed write durable
    assert call["lock_free"]  # other writers were not kept waiting for the disk


def test_a_plain_write_transaction_syncs_before_it_returns_and_a_read_never_does(db, path, monkeypatch):
    spy = SyncSpy(path)
    monkeypatch.setattr(dbmod, "_fdatasync", spy)
    with db.transaction() as tx:
        tx.execute("INSERT INTO t (k) VALUES ('b')")
    assert len(spy.calls) == 1 and "b" in spy.calls[0]["committed"]
    assert db.query("SELECT k FROM t") == [{"k": "b"}]
    with db.transaction(immediate=False) as tx:
        tx.execute("SELECT k FROM t")
    assert len(spy.calls) == 1  # reads: no sync
    with db.transaction(immediate=False) as tx:  # a deferred transaction that writes is a write
        tx.execute("INSERT INTO t (k) VALUES ('c')")
    assert len(spy.calls) == 2 and "c" in spy.calls[1]["committed"]


def test_a_write_transaction_that_changed_nothing_is_not_synced(db, path, monkeypatch):
    """An idle outbox claim (BEGIN IMMEDIATE, nothing due) must not cost a disk flush per poll."""
    spy = SyncSpy(path)
    monkeypatch.setattr(dbmod, "_fdatasync", spy)
    with db.transaction() as tx:
        tx.execute("SELECT k FROM t")
        tx.execute("UPDATE t SET k = k WHERE k = 'none' RETURNING k")
    assert spy.calls == []
    with db.transaction() as tx:  # a claim that takes a row is a write (RETURNING, so no `wrote` flag)
        tx.execute("INSERT INTO t (k) VALUES ('d') RETURNING k")
    assert len(spy.calls) == 1 and "d" in spy.calls[0]["committed"]


def test_a_savepoint_does_not_sync_only_its_outer_transaction_does(db, path, monkeypatch):
    spy = SyncSpy(path)
    monkeypatch.setattr(dbmod, "_fdatasync", spy)
    with db.transaction() as tx:
        tx.execute("INSERT INTO t (k) VALUES ('outer')")
        with db.transaction() as inner:
            inner.execute("INSERT INTO t (k) VALUES ('inner')")
        assert spy.calls == []
    assert len(spy.calls) == 1 and {"outer", "inner"} <= spy.calls[0]["committed"]


def test_a_lone_failing_write_is_rolled_back_with_its_own_error_and_not_synced(db, path, monkeypatch):
    spy = SyncSpy(path)
    monkeypatch.setattr(dbmod, "_fdatasync", spy)
    with pytest.raises(ValueError, match="fails after writing"):
        db.write(_insert("bad", fail=True))
    assert spy.calls == []
    assert db.query("SELECT k FROM t") == []
    assert db.write(_insert("good")) == "good"  # the connection is fine afterwards
    assert db.query("SELECT k FROM t") == [{"k": "good"}]


def test_a_sync_the_disk_does_not_confirm_is_an_error_that_says_the_write_may_exist(db, path, monkeypatch):
    monkeypatch.setattr(dbmod, "_fdatasync", SyncSpy(path, fail=True))
    with pytest.raises(CommitUnavailable) as err:
        db.write(_insert("unsure"))
    assert err.value.http_status == 503 and err.value.issues[0].rule == "store:commit"
    assert "may or may not have been kept" in str(err.value.issues[0].message)
    assert not db.writable  # Linux reports a failed writeback once: no later sync can vouch for it


def test_after_a_failed_sync_the_process_takes_no_writes_but_still_reads(db, path, monkeypatch):
    spy = SyncSpy(path, fail=True)
    monkeypatch.setattr(dbmod, "_fdatasync", spy)
    with pytest.raises(CommitUnavailable, match="may or may not"), db.transaction() as tx:
        tx.execute("INSERT INTO t (k) VALUES ('unsure')")
    spy.fail = False  # even a disk that answers again is not trusted by this process
    for attempt in (lambda: db.write(_insert("later")), lambda: db.execute("INSERT INTO t (k) VALUES ('x')")):
        with pytest.raises(CommitUnavailable) as err:
            attempt()
        assert err.value.issues[0].rule == "store:disk" and "restarted" in err.value.issues[0].message
    assert len(spy.calls) == 1
    assert db.query("SELECT k FROM t") == [{"k": "unsure"}]  # committed, only not confirmed durable
    fresh = Database(f"sqlite:///{path}")  # a restarted process recovers from what is on disk
    try:
        assert fresh.writable and fresh.write(_insert("after-restart")) == "after-restart"
    finally:
        fresh.close()


def test_a_deferred_transaction_that_only_changes_the_schema_is_synced(db, path, monkeypatch):
    spy = SyncSpy(path)
    monkeypatch.setattr(dbmod, "_fdatasync", spy)
    with db.transaction(immediate=False) as tx:
        tx.execute("CREATE TABLE u (k TEXT)")  # DDL changes no rows: total_changes stays put
    assert len(spy.calls) == 1


def test_the_wal_is_found_where_sqlite_keeps_it_behind_a_symlink(tmp_path, monkeypatch):
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    target = real / "g.sqlite3"
    spy = SyncSpy(target)
    monkeypatch.setattr(dbmod, "_fdatasync", spy)
    linked = Database(f"sqlite:///{tmp_path / 'link' / 'g.sqlite3'}")
    try:
        linked.execute("CREATE TABLE t (k TEXT PRIMARY KEY)")
        linked.write(_insert("via-link"))
        assert spy.calls and spy.calls[-1]["same_file"] and "via-link" in spy.calls[-1]["committed"]
    finally:
        linked.close()


def test_the_next_batch_commits_while_the_previous_one_waits_for_the_disk(db, path, monkeypatch):
    release = threading.Event()
    second_committed = threading.Event()
    calls: list[str] = []

    def slow_first_sync(fd: int) -> None:
        calls.append(threading.current_thread().name)
        if len(calls) == 1:  # the first batch's sync waits until the second batch has committed
            release.wait(10)
        os.fdatasync(fd)

    monkeypatch.setattr(dbmod, "_fdatasync", slow_first_sync)
    results: dict[str, object] = {}

    def first() -> None:
        results["first"] = db.write(_insert("first"))

    def second() -> None:
        results["second"] = db.write(_insert("second"))
        second_committed.set()

    a = threading.Thread(target=first, name="first")
    a.start()
    deadline = time.monotonic() + 10
    while not calls and time.monotonic() < deadline:
        time.sleep(0.005)
    b = threading.Thread(target=second, name="second")
    b.start()
    assert second_committed.wait(10)  # not queued behind the first batch's disk wait
    assert "first" not in results  # the first caller is still not answered: its sync is not done
    release.set()
    a.join(10)
    b.join(10)
    assert results == {"first": "first", "second": "second"} and calls == ["first", "second"]


def test_a_new_wal_file_is_reopened_and_its_directory_synced(path, monkeypatch):
    dirs: list[str] = []
    real_dir_sync = dbmod._fsync_dir
    monkeypatch.setattr(dbmod, "_fsync_dir", lambda p: (dirs.append(str(p)), real_dir_sync(p)))
    spy = SyncSpy(path)
    monkeypatch.setattr(dbmod, "_fdatasync", spy)
    first = Database(f"sqlite:///{path}")
    first.execute("CREATE TABLE t (k TEXT PRIMARY KEY)")
    first.close()  # the last connection: SQLite checkpoints and removes the WAL file
    assert not os.path.exists(f"{path}-wal")
    second = Database(f"sqlite:///{path}")
    try:
        second.execute("INSERT INTO t (k) VALUES ('after')")
        assert spy.calls[-1]["same_file"] and "after" in spy.calls[-1]["committed"]
        assert second._wal_sync.current is not None and second._wal_sync.current[0] == os.getpid()
        assert dirs == [str(path.parent), str(path.parent)]  # once per WAL file seen, never per commit
        second.execute("INSERT INTO t (k) VALUES ('again')")
        assert len(dirs) == 2
    finally:
        second.close()
    assert second._wal_sync.current is None  # close() gives the descriptor back


def test_a_forked_child_syncs_through_its_own_descriptor(db, path):
    db.write(_insert("parent"))
    parent_fd = db._wal_sync.current[1]
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        ok = b"0"
        try:
            db.write(_insert("child"))
            ok = (
                b"1"
                if db._wal_sync.current[0] == os.getpid() and db._wal_sync.current[1] != parent_fd
                else b"2"
            )
        finally:
            os.write(w, ok)
            os._exit(0)
    os.close(w)
    os.waitpid(pid, 0)
    assert os.read(r, 4) == b"1"
    assert db._wal_sync.current[0] == os.getpid() and db._wal_sync.current[1] == parent_fd
    assert {r["k"] for r in db.query("SELECT k FROM t")} == {"parent", "child"}


def test_new_ids_are_time_ordered_uuid7_hex():
    result = doctest.testmod(identifiers)
    assert result.attempted > 0 and result.failed == 0
    ids = [identifiers.new_id() for _ in range(2000)]
    assert len(set(ids)) == 2000
    for i in ids:
        u = uuid.UUID(i)
        assert u.version == 7 and u.variant == uuid.RFC_4122 and u.hex == i
    stamps = [int(i[:12], 16) for i in ids]
    assert stamps == sorted(stamps)  # millisecond prefix never goes back within a process
