"""Group commit (storage/sql/, layer 2: IO adapter; imports base only; runs the batches of
`Database.write`).

Write requests of concurrent threads are handed to one committer per process, which runs a
batch of them in ONE transaction, each inside its own SAVEPOINT (a failing unit is rolled back
alone and gets its own error), then commits once (one fsync for the batch). `write` returns
only after that commit, so nothing is acknowledged before it is durable; if the commit fails,
every unit of the batch gets the error.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from ...errors import CommitUnavailable
from .checkpoint import WalCheckpointer
from .database import Database, Tx
from .walsync import unsure

__all__ = ["GroupCommitter"]

T = TypeVar("T")
log = logging.getLogger("fhir_kap.db")

#: The committer's connections: automatic checkpoints only as a backstop (64 MB of WAL) when a
#: WalCheckpointer does the regular ones off the request path.
_BACKSTOP_AUTOCHECKPOINT = 16000


class _RolledBack(Exception):
    """Internal: rolls back a lone unit's transaction after its work failed."""


class _Unit(Generic[T]):
    __slots__ = ("work", "taken", "done", "result", "error")

    def __init__(self, work: Callable[[Tx], T]) -> None:
        self.work = work
        self.taken = False  # in a batch (committed or being committed): nobody else runs it
        self.done = False
        self.result: Any = None
        self.error: BaseException | None = None


class GroupCommitter:
    """Group commit for one process: concurrent write units share one transaction and one fsync.

    Leader/follower, without a thread of its own: a caller that finds no batch running becomes
    the leader and runs every queued unit (up to `max_batch`, its own first) on its own
    connection, each in its own SAVEPOINT, commits once and wakes the others; callers that
    arrive meanwhile queue up for the next batch. So a lone request pays no hand-off, and
    under load one commit serves everyone who arrived during the previous one. On SQLite an
    advisory file lock (`<db>.commit-lock`) is held around each batch so the leaders of
    several worker processes take turns at once, without SQLite's busy-wait back-off (sleeps
    of up to 100 ms, which made the tail latency).
    """

    def __init__(
        self, db: Database, *, max_batch: int = 64, wait_seconds: float = 120.0, checkpoint_rows: int = 3000
    ) -> None:
        self.db = db
        self.max_batch = max_batch
        self.wait_seconds = wait_seconds
        self.pid = os.getpid()
        self.batches = 0
        self.units = 0
        self._cond = threading.Condition()
        self._pending: list[_Unit[Any]] = []
        self._leading = False
        self._lock_file: Any = None
        self.checkpointer: WalCheckpointer | None = None
        if db.dialect == "sqlite" and db.path is not None:
            self._lock_file = open(f"{db.path}.commit-lock", "a+b")  # closed by stop()
            self.checkpointer = WalCheckpointer(db, every_rows=checkpoint_rows)
            weakref.finalize(self, self.checkpointer.signal_stop)  # an abandoned Database leaks no thread

    def run(self, work: Callable[[Tx], T]) -> T:
        """Run `work` in the next batch; return its result (or raise its error) once committed."""
        unit: _Unit[T] = _Unit(work)
        deadline = time.monotonic() + self.wait_seconds
        with self._cond:
            self._pending.append(unit)
            while not unit.done and (self._leading or unit.taken):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise CommitUnavailable(
                        "The database did not commit in time; the write may or may not "
                        "have been kept: retry with If-None-Exist",
                        rule="store:commit-timeout",
                    )
                self._cond.wait(remaining)
            if not unit.done:
                self._leading = True
                # Its own unit first (it may be anywhere in the queue, even past max_batch), then
                # the oldest others; exactly those leave the queue.
                others = [u for u in self._pending if u is not unit][: max(0, self.max_batch - 1)]
                batch = [unit, *others]
                for u in batch:
                    u.taken = True
                taken = {id(u) for u in batch}
                self._pending = [u for u in self._pending if id(u) not in taken]
        if not unit.done:
            try:
                try:
                    committed = self._run(batch)
                finally:
                    with self._cond:  # the next batch may commit while this one waits for the disk
                        self._leading = False
                        self._cond.notify_all()
                if committed:
                    self._sync(batch)
            finally:
                with self._cond:
                    for u in batch:
                        u.done = True
                    self._cond.notify_all()
        if unit.error is not None:
            raise unit.error
        return unit.result  # type: ignore[no-any-return]

    @property
    def queued(self) -> int:
        """Units waiting for the next batch."""
        with self._cond:
            return len(self._pending)

    def stop(self) -> None:
        """Stop the checkpointer thread (if one started) and release the file lock handle."""
        if self.checkpointer is not None:
            self.checkpointer.stop()
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None

    def _run(self, batch: list[_Unit[Any]]) -> bool:
        """BEGIN .. COMMIT of a batch under the file lock; whether anything was committed."""
        import fcntl

        locked = False
        conn: Any = None
        changes = 0
        try:
            if self._lock_file is not None:
                fcntl.flock(self._lock_file.fileno(), fcntl.LOCK_EX)
                locked = True
            conn = self.db.conn
            if self.checkpointer is not None:
                changes = conn.total_changes
            if self.checkpointer is not None and self.checkpointer.running:
                self._backstop_only(conn)
            if len(batch) == 1:
                self._run_alone(batch[0])
            else:
                with self.db.transaction(sync=False):  # synced by run(), outside the file lock
                    for unit in batch:
                        try:
                            with self.db.transaction() as sp:
                                unit.result = unit.work(sp)
                        except Exception as exc:  # noqa: BLE001 - handed to its own caller
                            unit.error = exc
                            unit.result = None
        except BaseException as exc:  # noqa: BLE001 - BEGIN or COMMIT failed: nothing is durable
            log.error("group commit failed", extra={"error": type(exc).__name__, "units": len(batch)})
            failure = (
                exc
                if isinstance(exc, CommitUnavailable)
                else CommitUnavailable(
                    "The database could not commit this write; nothing was kept", rule="store:commit"
                )
            )
            for unit in batch:
                if unit.error is None:
                    unit.error = failure
                unit.result = None
            self._close_conn()
        finally:
            if locked:
                fcntl.flock(self._lock_file.fileno(), fcntl.LOCK_UN)
        self.batches += 1
        self.units += len(batch)
        if self.checkpointer is not None and conn is not None:
            try:
                self.checkpointer.committed(max(0, conn.total_changes - changes))
            except sqlite3.ProgrammingError:  # the connection was closed after a failed commit
                pass
        return conn is not None and any(u.error is None for u in batch)

    def _sync(self, batch: list[_Unit[Any]]) -> None:
        """Make a committed batch durable before any of its callers is answered."""
        try:
            self.db.sync_wal()
        except OSError as exc:  # committed and visible, but the disk did not confirm it (sync_wal logged it)
            error = unsure(exc)
            for unit in batch:
                if unit.error is None:
                    unit.error = error
                    unit.result = None

    def _run_alone(self, unit: _Unit[Any]) -> None:
        """A batch of one: the unit's own transaction, without a SAVEPOINT (two statements fewer);
        its failure rolls the transaction back and is its own error, not a commit failure."""
        try:
            with self.db.transaction(sync=False) as tx:  # synced by run(), outside the file lock
                try:
                    unit.result = unit.work(tx)
                except Exception as exc:  # noqa: BLE001 - handed to its own caller
                    unit.error = exc
                    unit.result = None
                    raise _RolledBack from None
        except _RolledBack:
            pass

    def _backstop_only(self, conn: Any) -> None:
        # This thread's connection leaves regular checkpoints to the running WalCheckpointer.
        local = self.db._local
        if getattr(local, "backstop_conn", None) is not conn:
            conn.execute(f"PRAGMA wal_autocheckpoint={_BACKSTOP_AUTOCHECKPOINT}")
            local.backstop_conn = conn

    def _close_conn(self) -> None:
        local = self.db._local
        conn = getattr(local, "conn", None)
        local.depth = 0
        if conn is not None:
            try:
                conn.close()
            except Exception:  # noqa: BLE001 - it is being thrown away
                pass
            local.conn = None
