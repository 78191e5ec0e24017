"""Rest-hook notifications for partners without a FHIR server of their own (exchange/, layer 3:
orchestration; imports base and storage: the job table is storage/webhooks.py).

The payload names an event and a resource id, nothing else: no patient data ever goes into a
webhook. The partner fetches the resource from the bridge with its token, which is where
consent is checked and the read audited. Each notification is signed:
`X-KAP-Signature: sha256=<hex HMAC-SHA256 of "<timestamp>.<body>">` with the partner's webhook
secret, and `X-KAP-Timestamp` (Unix seconds) so a receiver can refuse replays.

Durable, and never on the request path: `Notifier.enqueue` writes a job row into
`webhook_jobs` (storage/webhooks.py) inside the same transaction as the write it announces (so
a job exists exactly when that write is committed), and one sender thread per process claims
due jobs with a lease (storage/queue.py, as the outbox does), posts them and records the
outcome:
- 2xx: `delivered`;
- 408, 429, 5xx but 501/505 (`fhir.retry.retry_later`, the outbox's rule too), a timeout or a
  refused connection: `pending` again, after an exponential
  back-off with jitter (`fhir.retry.Backoff`, as the outbox uses; a longer `Retry-After` wins),
  `dead` after `max_attempts`;
- any other 4xx, 501, 505, a redirect (never followed: a hook must not send the bridge elsewhere), a
  partner that no longer has a webhook (revoked, removed), or a note the partner may no longer
  read (`allowed`, e.g. its consent was withdrawn since the job was queued): `dead`, with the
  status or reason in `last_error` (codes only, never a response body).
Each job gets a fresh lease right before it is posted, so a slow batch never lets another
worker take a job that is still being sent.
A crash loses nothing: a job whose sender died is claimed again once its lease runs out, so
delivery is at-least-once and a receiver may see the same (event, resource) twice.

Two kinds of job share this queue, this sender and every rule above. The legacy ones (events
`communication-available`, `referral-status-changed`) are posted as described here. A job
whose event starts with a registered `Channel`'s prefix (topic-based Subscriptions:
`subscription-handshake`, `-heartbeat`, `-event`; exchange/subscriptions.py) is posted as
that channel `prepare`s it at send time (its URL, body, headers and deadline; a later time,
the attempt not counted; or a reason to drop it: the job goes `dead` unsent, e.g. when the
Subscription's endpoint is at an origin the operator no longer registers for the partner),
and the channel hears each outcome (`delivered`, `pending` for a retry, `dead`);
each round the channel's `tick` also queues scheduled jobs (heartbeats), and the sender wakes
when the next of those is due.
"""

from __future__ import annotations

import hashlib
import hmac
import http.client
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import urlsplit

from .. import jsonio
from ..fhir.retry import Backoff, retry_after_seconds, retry_later
from ..storage.db import Database
from ..storage.webhooks import WebhookJob, WebhookJobs

__all__ = [
    "EVENT_COMMUNICATION",
    "EVENT_TASK",
    "Channel",
    "Deferred",
    "Notifier",
    "NotifyResult",
    "Prepared",
    "WebhookJob",
    "sign",
]

EVENT_COMMUNICATION = "communication-available"
EVENT_TASK = "referral-status-changed"
log = logging.getLogger("fhir_kap.notify")  # its name before the move: log filters use it


@dataclass(frozen=True)
class NotifyResult:
    delivered: bool
    status: int | None = None
    error: str | None = None
    retry_after: float | None = None


@dataclass(frozen=True)
class Prepared:
    """A channel's request for one job, built at send time: POST `body` to `url` with `headers`,
    the whole exchange within `timeout` seconds."""

    url: str
    body: bytes
    headers: dict[str, str]
    timeout: float


@dataclass(frozen=True)
class Deferred:
    """A channel's answer for a job it is not ready to send yet: due again in `seconds`, the
    attempt not counted."""

    seconds: float


class Channel(Protocol):
    """Jobs whose event starts with `prefix` are prepared and followed up by their channel."""

    prefix: str

    def prepare(self, job: WebhookJob, default_timeout: float) -> Prepared | Deferred | str:
        """The request to post now, a later time to try (Deferred), or why the job is dropped
        (it goes `dead` with that reason)."""
        ...

    def outcome(self, job: WebhookJob, state: str, status: int | None) -> None:
        """What an attempt came to: `delivered`, `pending` (tried again later) or `dead`."""
        ...

    def tick(self, now: float) -> float | None:
        """Queue the scheduled jobs due at `now`; when the next falls due (None: none)."""
        ...


#: What a partner name resolves to at send time: (webhook URL, secret), or None when it has none.
Resolver = Callable[[str], "tuple[str, str | None] | None"]
#: Whether a partner may still hear of a resource (partner name, "Type/id"), asked at send time.
Allowed = Callable[[str, str], bool]
#: The default back-off between attempts (a longer Retry-After wins).
_BACKOFF = Backoff(base=2.0, cap=300.0)


def sign(secret: str, timestamp: str, body: bytes) -> str:
    """The signature header value for `body` sent at `timestamp`."""
    mac = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return f"sha256={mac.hexdigest()}"


class Notifier:
    """Signed, id-only rest-hook notifications: a durable job queue and one sender thread per process.

    Without a database (`db=None`) only `notify` (one POST, no queue) is available.
    `resolve(partner)` gives the partner's current webhook URL and secret (None: it has none).
    """

    def __init__(
        self,
        timeout: float = 5.0,
        user_agent: str = "fhir-kap-bridge",
        *,
        db: Database | None = None,
        resolve: Resolver | None = None,
        allowed: Allowed | None = None,
        max_attempts: int = 15,
        backoff: Backoff = _BACKOFF,
        poll_seconds: float = 5.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.timeout = timeout
        self.user_agent = user_agent
        self.db = db
        self.resolve = resolve
        self.allowed = allowed
        self.max_attempts = max_attempts
        self.backoff = backoff
        self.poll_seconds = poll_seconds
        self.clock = clock
        self.lease_seconds = 2 * timeout + 30
        self._pid = 0
        self._wake = threading.Event()
        self._start_lock = threading.Lock()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._worker_id = ""
        self.webhook_jobs = WebhookJobs(db) if db is not None else None
        self.channels: list[Channel] = []

    def add_channel(self, channel: Channel) -> None:
        """Have `channel` prepare and follow up the jobs whose event starts with its prefix."""
        self.channels.append(channel)

    # ---- the job table (storage/webhooks.py)

    def enqueue(self, partner: str, event: str, resource_ref: str, version: str) -> bool:
        """Queue one notification of `resource_ref` at `version`; True if new (the same partner,
        event, resource and version is queued once). Inside a transaction of this thread it joins
        it (a SAVEPOINT), so the job is committed exactly when the write it announces is."""
        return self._need_jobs().enqueue(partner, event, resource_ref, version, now=self.clock())

    def jobs(
        self, state: str | None = None, limit: int = 100, *, partner: str | None = None
    ) -> list[WebhookJob]:
        """Queued notifications, oldest first (all states or one; all partners or one)."""
        return self._need_jobs().jobs(state, limit, partner=partner)

    def retry(self, job_id: int | None = None, *, partner: str | None = None) -> list[WebhookJob]:
        """Put dead jobs back in the queue: one by id, or every dead one (of `partner`, if given).

        Attempts start from zero, the job is due now, and the last status and error are cleared.
        Returns the jobs moved (none when no dead job matches)."""
        return self._need_jobs().retry(job_id, partner=partner, now=self.clock())

    def wake(self) -> None:
        """Make sure this process's sender runs, and have it look for due jobs now."""
        if self.db is None:
            return
        self._started()
        self._wake.set()

    def ensure_started(self) -> None:
        """Start this process's sender if it is not running (cheap; the bridge calls it per request,
        so jobs left by a crashed process are sent even before anything new is written)."""
        if self.db is not None:
            self._started()

    def drain(self, timeout: float = 10.0) -> bool:
        """Wait until no job is due or being sent (tests, shutdown); False on timeout.

        Jobs waiting for a later retry do not count."""
        if self.webhook_jobs is None:
            return True
        deadline = time.monotonic() + timeout
        while True:
            self.wake()
            if not self.webhook_jobs.busy(self.clock()):
                return True
            if time.monotonic() > deadline:
                return False
            time.sleep(0.02)

    def stop(self) -> None:
        """End this process's sender thread after the job it may be posting."""
        self._stopping = True
        self._wake.set()
        if self._thread is not None and self._pid == os.getpid():
            self._thread.join(timeout=self.timeout + 5)
        self._thread = None

    def run_due(self, limit: int = 20) -> int:
        """Claim and post the jobs due now (what the sender thread does each round); how many."""
        worker = self._worker_id or self._new_worker_id()
        jobs = self._need_jobs().claim(worker, limit, self.clock(), self.lease_seconds)
        for job in jobs:
            if not self._renew(job, worker):
                continue  # its lease ran out while earlier jobs were sent: another worker has it
            try:
                self._send(job, worker)
            except Exception as exc:  # noqa: BLE001 - one job's failure must not strand the others
                log.warning("webhook job failed", extra={"job": job.id, "error": type(exc).__name__})
                self._retry_or_give_up(job, worker, None, type(exc).__name__, None)
        return len(jobs)

    def _renew(self, job: WebhookJob, worker: str) -> bool:
        return self._need_jobs().renew(job, worker, self.clock() + self.lease_seconds)

    def _new_worker_id(self) -> str:
        return f"{os.getpid()}-{uuid.uuid4().hex}"

    def _channel(self, job: WebhookJob) -> Channel | None:
        return next((c for c in self.channels if job.event.startswith(c.prefix)), None)

    def _send(self, job: WebhookJob, worker: str) -> None:
        channel = self._channel(job)
        if channel is not None:
            self._send_channel(channel, job, worker)
            return
        target = self.resolve(job.partner) if self.resolve is not None else None
        if target is None:
            self._finish(job, worker, "dead", None, "partner has no webhook (revoked or removed)")
            return
        if self.allowed is not None and not self.allowed(job.partner, job.resource):
            self._finish(job, worker, "dead", None, "the partner may no longer read it (consent)")
            return
        url, secret = target
        self._settle(job, worker, self.notify(url, job.event, job.resource, secret=secret))

    def _settle(self, job: WebhookJob, worker: str, result: NotifyResult) -> str:
        """What an attempt's answer does to its job: delivered, tried again later (no answer, or
        "not now"), or dead (a redirect, never followed; any other refusal). The state it went to."""
        if result.delivered:
            self._finish(job, worker, "delivered", result.status, None)
            return "delivered"
        if result.status is None or retry_later(result.status):
            return self._retry_or_give_up(job, worker, result.status, result.error, result.retry_after)
        error = (
            f"HTTP {result.status}: redirects are not followed"
            if 300 <= result.status < 400
            else result.error
        )
        self._finish(job, worker, "dead", result.status, error)
        return "dead"

    def _send_channel(self, channel: Channel, job: WebhookJob, worker: str) -> None:
        prepared = channel.prepare(job, self.timeout)
        if isinstance(prepared, str):
            self._finish(job, worker, "dead", None, prepared)
            return
        if isinstance(prepared, Deferred):
            now = self.clock()
            self._need_jobs().defer(job, worker, next_at=now + prepared.seconds, now=now)
            return
        result = self.post(prepared)
        channel.outcome(job, self._settle(job, worker, result), result.status)

    def post(self, prepared: Prepared) -> NotifyResult:
        """POST a channel's request; never raises (as `notify`)."""
        try:
            status, retry_after = self._post(prepared.url, prepared.body, prepared.headers, prepared.timeout)
        except Exception as exc:  # noqa: BLE001 - OSError, http.client.HTTPException, ssl errors...: never raised
            log.warning("subscription notification failed", extra={"error": type(exc).__name__})
            return NotifyResult(False, None, type(exc).__name__)
        ok = 200 <= status < 300
        return NotifyResult(ok, status, None if ok else f"HTTP {status}", None if ok else retry_after)

    def _retry_or_give_up(
        self, job: WebhookJob, worker: str, status: int | None, error: str | None, retry_after: float | None
    ) -> str:
        """A failed attempt that may succeed later: again after the back-off, or dead once
        `max_attempts` are spent (whatever failed: the receiver, or this side). The state it went to."""
        if job.attempts >= self.max_attempts:
            self._finish(job, worker, "dead", status, f"{error}; gave up after {job.attempts} attempts")
            return "dead"
        self._finish(
            job,
            worker,
            "pending",
            status,
            error,
            next_at=self.clock() + self.backoff.wait(job.attempts, retry_after),
        )
        return "pending"

    def _finish(
        self,
        job: WebhookJob,
        worker: str,
        state: str,
        status: int | None,
        error: str | None,
        *,
        next_at: float | None = None,
    ) -> None:
        # only while this sender still holds the lease
        self._need_jobs().finish(
            job,
            worker,
            state,
            status,
            error,
            next_at=next_at if next_at is not None else job.next_attempt_at,
            now=self.clock(),
        )
        if state == "dead":
            log.warning("webhook given up", extra={"job": job.id, "event": job.event, "status": status})

    def _need_jobs(self) -> WebhookJobs:
        if self.webhook_jobs is None:
            raise RuntimeError("this Notifier has no database: it can only notify()")
        return self.webhook_jobs

    def _started(self) -> None:
        if self._thread is not None and self._pid == os.getpid():
            return
        with self._start_lock:
            if self._thread is None or self._pid != os.getpid():  # again in a forked worker
                self._pid = os.getpid()
                self._worker_id = self._new_worker_id()
                self._stopping = False
                self._thread = threading.Thread(target=self._run, name="fhir-kap-webhooks", daemon=True)
                self._thread.start()

    def tick(self) -> float:
        """Have each channel queue its scheduled jobs; how long the sender may sleep after."""
        wait = self.poll_seconds
        now = self.clock()
        for channel in self.channels:
            due = channel.tick(now)
            if due is not None:
                wait = min(wait, max(0.05, due - now))
        return wait

    def _run(self) -> None:
        while not self._stopping:
            wait = self.poll_seconds
            try:
                wait = self.tick()
                busy = self.run_due()
            except Exception as exc:  # noqa: BLE001 - the database may be briefly unavailable: try again
                log.warning("webhook round failed", extra={"error": type(exc).__name__})
                busy = 0
            if not busy:
                self._wake.wait(wait)
                self._wake.clear()

    @staticmethod
    def payload(event: str, resource_ref: str) -> bytes:
        """The notification body: `{"event": ..., "resource": "Type/id"}`."""
        return jsonio.dumps({"event": event, "resource": resource_ref})

    def notify(self, url: str, event: str, resource_ref: str, *, secret: str | None = None) -> NotifyResult:
        """POST the notification; never raises (a failed hook must not fail the request).

        One plain HTTP exchange with `http.client`: no redirect is followed, no proxy consulted,
        and the whole exchange has a deadline of `timeout` seconds (a hook that answers a byte at
        a time is cut off then, where a per-read timeout would wait for ever)."""
        body = self.payload(event, resource_ref)
        ts = str(int(time.time()))
        headers = {"Content-Type": "application/json", "User-Agent": self.user_agent, "X-KAP-Timestamp": ts}
        if secret:
            headers["X-KAP-Signature"] = sign(secret, ts, body)
        try:
            status, retry_after = self._post(url, body, headers)
        except Exception as exc:  # noqa: BLE001 - OSError, http.client.HTTPException, ssl errors...: never raised
            log.warning(
                "webhook failed",
                extra={"event": event, "resource": resource_ref, "error": type(exc).__name__},
            )
            return NotifyResult(False, None, type(exc).__name__)
        ok = 200 <= status < 300
        if not ok:
            log.warning("webhook refused", extra={"event": event, "resource": resource_ref, "status": status})
        return NotifyResult(ok, status, None if ok else f"HTTP {status}", None if ok else retry_after)

    def _post(
        self, url: str, body: bytes, headers: dict[str, str], timeout: float | None = None
    ) -> tuple[int, float | None]:
        timeout = self.timeout if timeout is None else timeout
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("a webhook URL is http(s)://host/...")
        conn_type = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        conn = conn_type(parts.hostname, parts.port, timeout=timeout)
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")

        def cut_off() -> None:  # the deadline: unblock whatever read or write is waiting
            sock = conn.sock
            if sock is not None:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

        deadline = threading.Timer(timeout, cut_off)
        deadline.daemon = True
        deadline.start()
        try:
            conn.request("POST", path, body=body, headers=headers)
            resp = conn.getresponse()
            resp.read(65536)  # a little of the body, never kept; the connection is closed next
            return resp.status, retry_after_seconds(resp.getheader("Retry-After"))
        finally:
            deadline.cancel()
            conn.close()
