"""Rest-hook notifications for partners without a FHIR server of their own.

The payload names an event and a resource id, nothing else: no patient data ever goes into a
webhook. The partner fetches the resource from the bridge with its token, which is where
consent is checked and the read audited. Each notification is signed:
`X-KAP-Signature: sha256=<hex HMAC-SHA256 of "<timestamp>.<body>">` with the partner's webhook
secret, and `X-KAP-Timestamp` (Unix seconds) so a receiver can refuse replays.

No request waits for a webhook: the bridge hands notification jobs to `Notifier.submit`,
which runs them on one background thread per process, after the write they announce is
committed. Delivery is best effort (a bounded in-memory queue: a full queue drops the job
with a log line, a crash loses what was queued); a partner that must not miss a note polls
`GET /fhir/Communication?recipient=...&_lastUpdated=gt...`.
"""
from __future__ import annotations

import hashlib
import hmac
import logging
import os
import queue
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass

from . import jsonio

__all__ = ["EVENT_COMMUNICATION", "EVENT_TASK", "Notifier", "NotifyResult", "sign"]

EVENT_COMMUNICATION = "communication-available"
EVENT_TASK = "referral-status-changed"
log = logging.getLogger("fhir_kap.notify")


@dataclass(frozen=True)
class NotifyResult:
    delivered: bool
    status: int | None = None
    error: str | None = None


def sign(secret: str, timestamp: str, body: bytes) -> str:
    """The signature header value for `body` sent at `timestamp`."""
    mac = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return f"sha256={mac.hexdigest()}"


class Notifier:
    """Posts id-only notifications to registered rest-hooks (best effort, bounded by a timeout)."""

    def __init__(self, timeout: float = 5.0, user_agent: str = "fhir-kap-bridge", *,
                 queue_size: int = 10_000) -> None:
        self.timeout = timeout
        self.user_agent = user_agent
        self.queue_size = queue_size
        self._queue: queue.Queue[Callable[[], object]] | None = None
        self._pid = 0
        self._start_lock = threading.Lock()

    def submit(self, job: Callable[[], object]) -> bool:
        """Run `job` (which calls `notify`) on the background thread; False when the queue is full.

        A job must not raise; anything it raises is logged (type only) and dropped.
        """
        q = self._started()
        try:
            q.put_nowait(job)
        except queue.Full:
            log.warning("webhook queue full; notification dropped")
            return False
        return True

    def drain(self, timeout: float = 10.0) -> bool:
        """Wait until every submitted job has run (tests, shutdown); False on timeout."""
        q = self._queue
        if q is None or self._pid != os.getpid():
            return True
        deadline = time.monotonic() + timeout
        while q.unfinished_tasks:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        return True

    def _started(self) -> "queue.Queue[Callable[[], object]]":
        if self._queue is None or self._pid != os.getpid():  # again in a forked worker
            with self._start_lock:
                if self._queue is None or self._pid != os.getpid():
                    q: queue.Queue[Callable[[], object]] = queue.Queue(self.queue_size)
                    threading.Thread(target=self._run, args=(q,), name="fhir-kap-webhooks", daemon=True).start()
                    self._queue, self._pid = q, os.getpid()
        assert self._queue is not None
        return self._queue

    @staticmethod
    def _run(q: "queue.Queue[Callable[[], object]]") -> None:
        while True:
            job = q.get()
            try:
                job()
            except Exception as exc:  # noqa: BLE001 - one bad job must not stop the others
                log.warning("webhook job failed", extra={"error": type(exc).__name__})
            finally:
                q.task_done()

    @staticmethod
    def payload(event: str, resource_ref: str) -> bytes:
        """The notification body: `{"event": ..., "resource": "Type/id"}`."""
        return jsonio.dumps({"event": event, "resource": resource_ref})

    def notify(self, url: str, event: str, resource_ref: str, *, secret: str | None = None) -> NotifyResult:
        """POST the notification; never raises (a failed hook must not fail the request)."""
        body = self.payload(event, resource_ref)
        ts = str(int(time.time()))
        headers = {"Content-Type": "application/json", "User-Agent": self.user_agent, "X-KAP-Timestamp": ts}
        if secret:
            headers["X-KAP-Signature"] = sign(secret, ts, body)
        req = urllib.request.Request(url, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                status = resp.status
        except urllib.error.HTTPError as exc:
            status = exc.code
        except (urllib.error.URLError, OSError, ValueError) as exc:
            log.warning("webhook failed", extra={"event": event, "resource": resource_ref,
                                                 "error": type(exc).__name__})
            return NotifyResult(False, None, type(exc).__name__)
        ok = 200 <= status < 300
        if not ok:
            log.warning("webhook refused", extra={"event": event, "resource": resource_ref, "status": status})
        return NotifyResult(ok, status, None if ok else f"HTTP {status}")
