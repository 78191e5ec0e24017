"""The delivery worker: outbox -> (consent re-check) -> FHIR server, with retries.

`run_once` claims due items, asks `consent_check` about each one at send time (a revoked
consent holds the item with the reason; nothing is sent), then sends each endpoint's items
either one by one (a conditional create: POST with `If-None-Exist: identifier=SYSTEM|VALUE`)
or together in transaction Bundles whose entries carry the same condition. A transaction the
server refuses (4xx) falls back to single creates, so one bad item cannot block the others.
Retryable failures (connection, timeout, and the answers `fhir.retry.retry_later` names: 408, 429
and any 5xx but 501/505) come back later with exponential backoff and jitter; anything else, and any item out of attempts, is dead-lettered.
A 500 is not repeated at once by the client (it may be this very request that breaks the
server) but it is tried again on the outbox's slower schedule: a server being restarted or
losing its database answers 500 too, and the conditional create makes a repeat harmless.

A redirect (3xx) is never followed (the client refuses it: a 307 would re-send the note to
wherever `Location` points) and dead-letters the item, naming the status and the Location's host.

A 2xx whose body cannot be read (garbled, truncated, not JSON, or naming no id) does not say
whether the server stored the note; the conditional create makes asking safe. The worker
reconciles with a conditional read by the same condition (`GET Type?identifier=SYSTEM|VALUE`):
exactly one match is the stored copy (delivered with its server id, logged and noted on the item
as reconciled); none means nothing was stored (tried again later: the next conditional create
cannot duplicate it); several matches, or a read that fails, dead-letter the item as before.
A transaction whose answer cannot be read falls back to single creates, which find the copies
the transaction stored.

Delivery is at-least-once on the wire (a worker killed after the POST and before the outbox
commit sends again) and exactly-once in effect (the repeated conditional create finds the
first copy). Logs name item ids, endpoints and statuses, never resource content. Each attempt's
outcome and the time of the HTTP exchange that carried it go to the worker's `observer` (the
process's Prometheus metrics by default: exchange/telemetry.py).

Room: exchange/ (layer 3, orchestration): may import layers 0-2.
"""

from __future__ import annotations

import logging
import os
import random
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from itertools import groupby
from pathlib import Path
from typing import IO, Self

from ..client import FhirClient, WriteResult, entry_results, token_query, transaction_bundle
from ..client.answers import UnreadableAnswer
from ..errors import ConfigError, KapError, ServerError
from ..fhir.retry import Backoff, retry_later
from ..storage.outbox import Outbox, OutboxItem
from .telemetry import DeliveryObserver, delivery_observer

__all__ = [
    "Backoff",
    "ConsentCheck",
    "DeliveryWorker",
    "Stats",
    "claim_worker_slot",
    "default_worker_id",
    "if_none_exist",
]

log = logging.getLogger("fhir_kap.delivery")

ConsentCheck = Callable[[OutboxItem], "tuple[bool, str]"]


@dataclass
class Stats:
    """What one or more `run_once` passes did."""

    claimed: int = 0
    delivered: int = 0  # newly created on the server
    existing: int = 0  # the server already had it (a repeated conditional create)
    retried: int = 0
    dead: int = 0
    held: int = 0
    lost_lease: int = 0  # another worker took the item over meanwhile
    transactions: int = 0
    fallbacks: int = 0  # transactions refused and re-sent as single creates
    reconciled: int = 0  # an unreadable 2xx, the stored copy found by its identifier

    def __iadd__(self, other: Stats) -> Self:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))
        return self

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def default_worker_id() -> str:
    """`host:pid`, unique among live workers (but a new one after every restart: prefer
    `claim_worker_slot`, which `fhir-kap deliver` uses)."""
    return f"{socket.gethostname()}:{os.getpid()}"


def claim_worker_slot(directory: Path, *, limit: int = 64) -> tuple[str, IO[bytes]]:
    """A stable worker id, `host:slot-N`, for the first free slot N under `directory` (an
    exclusive `flock` on `worker-N.lock`, held by the returned file until this process ends).

    A worker restarted after a crash takes its old slot again, so it recovers its own leased
    items at once instead of leaving them in `sending` until the lease runs out; workers running
    at the same time never share an id. The directory is made 0700 (the data dir's rule)."""
    import fcntl

    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    for n in range(1, limit + 1):
        fd = os.open(directory / f"worker-{n}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        handle = os.fdopen(fd, "r+b")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            continue
        return f"{socket.gethostname()}:slot-{n}", handle
    raise ConfigError(
        f"all {limit} delivery worker slots under {directory.name}/ are taken; give --worker-id",
        rule="deliver:worker-slot",
    )


def if_none_exist(key: str) -> str:
    """The If-None-Exist query for an idempotency key `SYSTEM|VALUE` (FHIR token escaping).

    >>> if_none_exist("http://x/sid|N 1")
    'identifier=http://x/sid|N%201'
    """
    system, _, value = key.partition("|")
    return token_query(system, value)


def _retry_later(exc: BaseException) -> bool:
    """Whether a failed send is worth another attempt on the outbox's schedule: what the client
    would have repeated, a failure on this side, or an answer `fhir.retry.retry_later` names."""
    if getattr(exc, "retryable", False) or not isinstance(exc, KapError):
        return True
    return isinstance(exc, ServerError) and exc.status is not None and retry_later(exc.status)


def _summary(exc: BaseException) -> str:
    """A one-line error summary for the outbox: the status and the server's issue codes and
    expressions — never the server's free text, which may echo the resource's content."""
    if isinstance(exc, ServerError):
        return exc.summary  # status, and the server's issue codes and locations: never its free text
    if isinstance(exc, KapError):
        return "; ".join(i.message for i in exc.issues)
    return f"internal error ({type(exc).__name__})"


@dataclass
class DeliveryWorker:
    """Delivers outbox items. All collaborators are injected; see the module docstring.

    `client_for(endpoint_name)` returns the FhirClient for an endpoint (called once per
    endpoint per pass; cache inside it if clients are costly). `consent_check(item)` returns
    (permitted, reason). `clock` is epoch seconds; `sleep` is used between idle polls only.
    """

    outbox: Outbox
    client_for: Callable[[str], FhirClient]
    consent_check: ConsentCheck
    batch_size: int = 50
    max_attempts: int = 8
    backoff: Backoff = field(default_factory=Backoff)
    clock: Callable[[], float] = time.time
    sleep: Callable[[float], None] = time.sleep
    worker_id: str = field(default_factory=default_worker_id)
    use_transactions: bool = False
    transaction_size: int = 100
    lease_seconds: float = 300.0
    rand: Callable[[], float] = random.random
    # metrics: each attempt's outcome and HTTP time, each send-time consent decision
    # (exchange/telemetry.py); `timer` measures the HTTP exchanges
    observer: DeliveryObserver = field(default_factory=delivery_observer)
    timer: Callable[[], float] = time.perf_counter
    _took: dict[int, float] = field(default_factory=dict, init=False, repr=False)

    def run_once(self) -> Stats:
        """Claim up to `batch_size` due items and deliver them; returns what happened."""
        stats = Stats()
        items = self.outbox.claim(self.worker_id, self.batch_size, self.clock(), self.lease_seconds)
        stats.claimed = len(items)
        by_endpoint = groupby(sorted(items, key=lambda i: (i.endpoint, i.id)), key=lambda i: i.endpoint)
        for endpoint, group in by_endpoint:
            self._deliver_endpoint(endpoint, list(group), stats)
        if items:
            log.info(
                "worker %s: %s",
                self.worker_id,
                ", ".join(f"{k} {v}" for k, v in stats.as_dict().items() if v),
            )
        return stats

    def run_forever(self, stop_event: threading.Event | None = None, poll_interval: float = 1.0) -> Stats:
        """Deliver until `stop_event` is set (forever without one); a pass that found less
        than a full batch waits `poll_interval` seconds (on the event, else with `sleep`).
        First gives back leases this worker id still holds from an earlier life."""
        total = Stats()
        log.info("worker %s: started, polling every %.1f s", self.worker_id, poll_interval)
        recovered = self.outbox.recover(self.worker_id)
        if recovered:
            log.info("worker %s: recovered %d item(s) from an earlier run", self.worker_id, recovered)
        while stop_event is None or not stop_event.is_set():
            stats = self.run_once()
            total += stats
            if stats.claimed < self.batch_size:
                if stop_event is None:
                    self.sleep(poll_interval)
                else:
                    stop_event.wait(poll_interval)
        return total

    # ---- per endpoint

    def _deliver_endpoint(self, endpoint: str, items: list[OutboxItem], stats: Stats) -> None:
        try:
            client = self.client_for(endpoint)
        except KapError as exc:  # endpoint missing from the settings, secret not set, ...
            for item in items:
                self._failed(item, exc, stats, retryable=True)
            return
        # Consent and lease are checked right before each send (not once per batch): a batch
        # against a slow server can outlast a revocation, or the lease.
        if self.use_transactions and len(items) > 1:
            for start in range(0, len(items), self.transaction_size):
                chunk = [i for i in items[start : start + self.transaction_size] if self._may_send(i, stats)]
                if chunk:
                    self._send_transaction(client, chunk, stats)
        else:
            for item in items:
                if self._may_send(item, stats):
                    self._send_single(client, item, stats)

    def _may_send(self, item: OutboxItem, stats: Stats) -> bool:
        if not self.outbox.renew_lease(item, self.lease_seconds, worker_id=self.worker_id, now=self.clock()):
            stats.lost_lease += 1
            log.warning("item %d: lease passed to another worker before sending; skipped", item.id)
            return False
        return self._consent_ok(item, stats)

    def _consent_ok(self, item: OutboxItem, stats: Stats) -> bool:
        try:
            ok, reason = self.consent_check(item)
        except Exception as exc:  # noqa: BLE001 - fail closed: an unreadable consent never lets data out
            ok, reason = False, f"consent re-check failed ({_summary(exc)})"
            self.observer.consent(False, ("check-failed",))
        if ok:
            return True
        if self.outbox.hold(
            item, f"consent re-check at send time: {reason}", worker_id=self.worker_id, now=self.clock()
        ):
            stats.held += 1
            log.info("item %d held: consent re-check refused delivery to %s", item.id, item.endpoint)
        else:
            stats.lost_lease += 1
        return False

    def _send_single(self, client: FhirClient, item: OutboxItem, stats: Stats) -> None:
        condition = if_none_exist(item.idempotency_key)
        try:
            with self._timed([item]):
                result = client.create(item.resource, if_none_exist=condition)
        except UnreadableAnswer as exc:
            if exc.status is not None and 200 <= exc.status < 300:
                self._reconcile(client, item, condition, exc, stats)
            else:
                self._failed(item, exc, stats)
            return
        except Exception as exc:  # noqa: BLE001 - any failure is recorded on the item, never lost
            self._failed(item, exc, stats)
            return
        if result.id is None:  # a 2xx naming no id (no body, no Location): what was stored?
            unreadable = UnreadableAnswer(
                f"POST {item.resource_type}: {result.status} answer names no id", status=result.status
            )
            self._reconcile(client, item, condition, unreadable, stats)
            return
        self._delivered(item, result, stats)

    def _reconcile(
        self, client: FhirClient, item: OutboxItem, condition: str, exc: ServerError, stats: Stats
    ) -> None:
        """After a 2xx whose answer could not be read: find what the server stored by the
        create's own condition. One match: delivered; none: try again later; else dead."""
        try:
            found = client.conditional_read(item.resource_type, condition)
        except Exception as read_exc:  # noqa: BLE001 - cannot tell: keep the item for an operator
            self._failed(
                item,
                exc,
                stats,
                retryable=False,
                note=f"; reconciling by identifier failed: {_summary(read_exc)}",
            )
            return
        if len(found) == 1:
            stored = found[0]
            meta = stored.get("meta")
            meta = meta if isinstance(meta, dict) else {}
            server_id = stored.get("id") if isinstance(stored.get("id"), str) else None
            if server_id:
                version = meta.get("versionId") if isinstance(meta.get("versionId"), str) else None
                log.warning(
                    "item %d to %s: %s; reconciled by identifier: server id %s",
                    item.id,
                    item.endpoint,
                    exc.summary,
                    server_id,
                )
                reconciled = WriteResult(
                    status=exc.status or 200,
                    id=server_id,
                    version_id=version,
                    location=None,
                    created=False,
                    resource=None,
                    outcome=None,
                )
                self._delivered(
                    item, reconciled, stats, note=f"reconciled by identifier after: {exc.summary}"
                )
                return
        if not found:
            log.warning(
                "item %d to %s: %s; no copy found by identifier, sending again later",
                item.id,
                item.endpoint,
                exc.summary,
            )
            self._failed(item, exc, stats, retryable=True, note="; no copy found by identifier")
            return
        self._failed(
            item,
            exc,
            stats,
            retryable=False,
            note=f"; reconciling by identifier found {len(found)} copies"
            if len(found) > 1
            else "; reconciling by identifier found a copy without an id",
        )

    def _send_transaction(self, client: FhirClient, items: Sequence[OutboxItem], stats: Stats) -> None:
        if len(items) == 1:
            self._send_single(client, items[0], stats)
            return
        try:
            bundle = transaction_bundle([item.resource for item in items], conditional=False)
            # each entry's condition is its outbox key, whichever identifier comes first
            for entry, item in zip(bundle["entry"], items):
                entry["request"]["ifNoneExist"] = if_none_exist(item.idempotency_key)
            stats.transactions += 1
            with self._timed(items):
                response = client.transaction(bundle)
            results = entry_results(response)
            if len(results) != len(items):
                raise ServerError(
                    f"POST transaction: {len(results)} entries answered for {len(items)} sent",
                    retryable=False,
                )
        except Exception as exc:  # noqa: BLE001 - refused or broken: retry or fall back
            if isinstance(exc, ServerError) and exc.retryable:
                for item in items:
                    self._failed(item, exc, stats)
                return
            stats.fallbacks += 1
            log.warning(
                "transaction of %d item(s) to %s refused (%s); sending them one by one",
                len(items),
                items[0].endpoint,
                getattr(exc, "status", None) or type(exc).__name__,
            )
            for item in items:
                self._send_single(client, item, stats)
            return
        for item, result in zip(items, results):
            if result.status >= 400 or result.status == 0:
                self._failed(
                    item,
                    ServerError(
                        f"transaction entry: {result.status}",
                        status=result.status,
                        remote_outcome=result.outcome,
                    ),
                    stats,
                )
            else:
                self._delivered(item, result, stats)

    # ---- outcomes

    def _delivered(
        self, item: OutboxItem, result: WriteResult, stats: Stats, *, note: str | None = None
    ) -> None:
        ok = self.outbox.mark_delivered(
            item,
            server_id=result.id,
            server_version=result.version_id,
            location=result.location,
            worker_id=self.worker_id,
            now=self.clock(),
            note=note,
        )
        if not ok:
            stats.lost_lease += 1
            log.warning("item %d: delivered but its lease had passed to another worker", item.id)
            outcome = "lost-lease"
        elif note is not None:
            stats.reconciled += 1
            outcome = "reconciled"
        elif result.created:
            stats.delivered += 1
            outcome = "created"
        else:
            stats.existing += 1
            outcome = "existing"
        self._observe(item, outcome)

    def _failed(
        self,
        item: OutboxItem,
        exc: BaseException,
        stats: Stats,
        *,
        retryable: bool | None = None,
        note: str = "",
    ) -> None:
        summary = _summary(exc) + note
        if retryable is None:
            retryable = _retry_later(exc)
        now = self.clock()
        status = getattr(exc, "status", None)
        if retryable and item.attempts < self.max_attempts:
            # A server's Retry-After beats our schedule.
            wait = self.backoff.wait(item.attempts, getattr(exc, "retry_after", None), self.rand)
            done = self.outbox.mark_retry(item, summary, now + wait, worker_id=self.worker_id, now=now)
            outcome = "retry"
            if done:
                stats.retried += 1
                log.info(
                    "item %d to %s: attempt %d failed (%s), next in %.1f s",
                    item.id,
                    item.endpoint,
                    item.attempts,
                    status or type(exc).__name__,
                    wait,
                )
        else:
            why = summary if not retryable else f"gave up after {item.attempts} attempts: {summary}"
            done = self.outbox.mark_dead(item, why, worker_id=self.worker_id, now=now)
            outcome = "dead"
            if done:
                stats.dead += 1
                log.warning(
                    "item %d to %s: dead-lettered (%s)", item.id, item.endpoint, status or type(exc).__name__
                )
        if not done:
            stats.lost_lease += 1
        self._observe(item, "lost-lease" if not done else outcome)

    @contextmanager
    def _timed(self, items: Sequence[OutboxItem]) -> Iterator[None]:
        """Time one HTTP exchange (answered or failed) for each item it carried."""
        started = self.timer()
        try:
            yield
        finally:
            took = self.timer() - started
            self._took.update((item.id, took) for item in items)

    def _observe(self, item: OutboxItem, outcome: str) -> None:
        self.observer.attempt(item.endpoint, outcome, self._took.pop(item.id, None))
