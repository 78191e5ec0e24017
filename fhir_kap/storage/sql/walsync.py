"""Durable commits on SQLite (storage/sql/, layer 2: IO adapter; imports base only; the one
place that syncs the WAL file).

The connections run `synchronous=NORMAL`, and every write transaction's COMMIT is followed by
`Database.sync_wal()`, an fdatasync of the `-wal` file, before `transaction()` or `write()`
returns: nothing is acknowledged before its frames are on stable storage, as with
`synchronous=FULL`. The sync runs after SQLite's write lock is released (for a batch, after
the committer's file lock and its leadership too), so the next writer, in this or another
process, writes its frames while this one waits for the disk (measured on 2 cores: about 15 %
more bridge creates per second than FULL). Why a late sync is still a sync of the commit:
SQLite rewrites the WAL from its start only after a checkpoint has copied every frame into the
database file and synced that file, it syncs a WAL header it reuses, and frame checksums are
cumulative, so a torn later write cuts off only frames after ours.
Two differences from FULL, both deliberate:
- other connections can read a commit up to one disk flush before its writer is answered (a
  power loss in that window loses a write nobody was told was kept). Nothing leaves the
  adapter in that window: the outbox and the rest-hook sender claim work in write transactions,
  whose own sync covers every earlier frame;
- a sync the disk does not confirm cannot be retried (Linux reports a writeback error once and
  may drop the pages), so the process stops taking writes (`CommitUnavailable`, 503) and
  `/readyz` says so until it is restarted, which recovers from what is on disk.
A database whose journal cannot be WAL (some network file systems) keeps `synchronous=FULL`.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

from ...errors import CommitUnavailable

__all__ = ["WalSync", "sync_latency", "unsure"]

log = logging.getLogger("fhir_kap.db")


class WalSync:
    """The `-wal` file of one `Database` and the descriptor each process syncs it through."""

    def __init__(self) -> None:
        self.path: str | None = None  # set by the Database's first connection in WAL mode
        self.current: tuple[int, int, int, int] | None = None  # (pid, fd, st_dev, st_ino)
        self._retired: list[int] = []  # descriptors of replaced WAL files, closed by close()
        self._lock = threading.Lock()
        self._failed: int | None = None  # the pid whose WAL sync failed: it takes no more writes

    def sync(self) -> None:
        """Put every WAL frame written so far on stable storage (a no-op without a WAL file).

        fdatasync of the `-wal` file (at the path SQLite itself uses) through a descriptor kept
        per process, reopened when the file is a new one (then its directory is synced too, so
        the new entry survives a power loss). Raises OSError when the disk does not confirm,
        and from then on this process takes no writes (see the module docstring); a missing
        WAL file while this process has it open is such a failure too.
        """
        if self.path is None:
            return
        pid = os.getpid()
        if self._failed == pid:
            raise OSError(errno.EIO, "an earlier WAL sync of this process failed")
        try:
            with self._lock:
                wal = self.current
                st = os.stat(self.path)
                if wal is None or wal[0] != pid or (wal[2], wal[3]) != (st.st_dev, st.st_ino):
                    if wal is not None:
                        # Another process's (inherited across fork) or a replaced file's: closed
                        # later, never under a concurrent sync. No SQLite lock lives on the WAL.
                        self._retired.append(wal[1])
                    self.current = None
                    fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
                    fst = os.fstat(fd)
                    self.current = wal = (pid, fd, fst.st_dev, fst.st_ino)
                    _fsync_dir(os.path.dirname(self.path))
            _fdatasync(wal[1])
        except OSError:
            self._failed = pid
            log.critical("wal sync failed: this process takes no more writes until it is restarted")
            raise

    @property
    def writable(self) -> bool:
        """False once a sync of this process failed."""
        return self._failed != os.getpid()

    def close(self) -> None:
        """Give back every descriptor (this process's and the retired ones)."""
        with self._lock:
            wal, self.current = self.current, None
            fds, self._retired = self._retired + ([wal[1]] if wal is not None else []), []
        for fd in fds:
            try:
                os.close(fd)
            except OSError:
                pass


_fdatasync: Callable[[int], None] = getattr(os, "fdatasync", os.fsync)  # macOS has fsync only


def _fsync_dir(path: str | Path) -> None:
    """Sync a directory (a file created in it then survives a power loss); not on Windows."""
    if os.name != "posix":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sync_latency(directory: str | Path, *, samples: int = 16, block: int = 8192) -> float:
    """Seconds a durable append takes on the disk under `directory`: the lower quartile of
    `samples` appends of `block` bytes, each followed by an fdatasync, as a WAL commit does (a
    quartile, not the median: a busy CPU delays some samples, never speeds one up), on a
    private scratch file that is removed afterwards (one name, so a probe killed halfway leaves
    one file that the next probe reuses). `fhir-kap serve` asks once at start-up to choose
    where requests run (bridge/serving.py). Raises OSError when the directory cannot take the
    file."""
    path = Path(directory) / ".fhir-kap-sync-probe"
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(path, flags | getattr(os, "O_NOFOLLOW", 0), 0o600)  # never through a planted link
    try:
        data = b"\0" * block
        times: list[float] = []
        for _ in range(max(1, samples)):
            started = time.perf_counter()
            os.write(fd, data)
            _fdatasync(fd)
            times.append(time.perf_counter() - started)
    finally:
        os.close(fd)
        path.unlink(missing_ok=True)
    times.sort()
    return times[len(times) // 4]


def unsure(exc: OSError) -> CommitUnavailable:
    """The error of a write that was committed but whose sync the disk did not confirm."""
    return CommitUnavailable(
        "The database could not confirm this write is durable; it may or may not have "
        f"been kept: retry with If-None-Exist ({type(exc).__name__})",
        rule="store:commit",
    )
