"""WAL checkpoints off the request path (storage/sql/, layer 2: IO adapter; imports base only).

A committer's connection would otherwise copy the WAL back into the SQLite database inside some
request's commit every few hundred writes (a 10-15 ms stall for every request in flight). Once
a process's committer has changed `checkpoint_rows` rows, a `WalCheckpointer` thread of its own
runs `PRAGMA wal_checkpoint(PASSIVE)` on its own connection instead, which never blocks
writers; while that thread runs, the committer's connection keeps a higher automatic threshold
only as a backstop. Durability is unchanged: a checkpoint copies what is already durable in
the WAL.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .database import Database

__all__ = ["WalCheckpointer"]

log = logging.getLogger("fhir_kap.db")


class WalCheckpointer:
    """Copies a SQLite WAL back into the database on a thread of its own (see the module docstring).

    `committed(rows)` is called by the group committer after each batch with the rows it changed
    (a proxy for WAL pages that counts a 100-entry Bundle as the 100 creates it is); once
    `every_rows` have been changed since the last signal, the thread (started on first need, so
    short-lived processes never start it) runs a PASSIVE checkpoint, and afterwards one every
    `idle_seconds` so a quiet WAL is copied back too. PASSIVE never waits for readers or writers:
    a checkpoint that finds another process's checkpoint running just returns, and the next one
    catches up. The thread opens the database read-write only (never creating it), and if it
    cannot, it ends and the next due signal starts another.
    """

    def __init__(self, db: Database, *, every_rows: int = 3000, idle_seconds: float = 1.0) -> None:
        assert db.path is not None, "WAL checkpoints are for a SQLite database file"
        self.path = db.path  # the path only: the thread must not keep the Database alive
        self.every_rows = every_rows
        self.idle_seconds = idle_seconds
        self.runs = 0
        self._since = 0
        self._wake = threading.Event()
        self._stopping = False
        self._thread: threading.Thread | None = None

    @property
    def running(self) -> bool:
        """Whether the thread is up (only then do committers leave checkpoints to it)."""
        t = self._thread
        return t is not None and t.is_alive()

    def committed(self, rows: int) -> None:
        """Count changed rows (called by one leader at a time); wake the thread when due."""
        if self._stopping:
            return
        self._since += rows
        if self._since < self.every_rows:
            return
        self._since = 0
        if not self.running:
            self._thread = threading.Thread(target=self._loop, name="kap-wal-checkpoint", daemon=True)
            self._thread.start()
        self._wake.set()

    def signal_stop(self) -> None:
        """Ask the thread to end, without waiting (when its committer is garbage-collected)."""
        self._stopping = True
        self._wake.set()

    def stop(self) -> None:
        """End the thread after the checkpoint it may be running; it is not started again."""
        self.signal_stop()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    def _connect(self) -> sqlite3.Connection:
        uri = f"{self.path.resolve().as_uri()}?mode=rw"  # a deleted database is not re-created
        conn = sqlite3.connect(uri, uri=True, timeout=30, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA synchronous=FULL")  # the checkpoint syncs what it copies
        return conn

    def _loop(self) -> None:
        try:
            conn = self._connect()
        except sqlite3.Error as exc:  # the next due signal tries again
            log.warning("wal checkpointer could not open the database", extra={"error": type(exc).__name__})
            return
        try:
            while not self._stopping:
                self._wake.wait(self.idle_seconds)
                self._wake.clear()
                if self._stopping:
                    break
                try:
                    conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                    self.runs += 1
                except sqlite3.Error as exc:  # the next round (or the backstop) catches up
                    log.warning("wal checkpoint failed", extra={"error": type(exc).__name__})
        finally:
            conn.close()
