"""Prometheus metrics of the bridge, the delivery worker and the consent gate (issue 16).

Room: exchange/ (layer 3, orchestration): may import layers 0-2. The pure core never counts
anything itself: the gate's callers (bridge/access.py, exchange/outbound.py) report its decisions
here, and the delivery worker reports through its `observer` (a `DeliveryObserver`).

Two kinds of numbers, each where it is correct:

- **Events** (requests, delivery attempts and their latency, consent decisions) are counters and
  histograms of `prometheus_client`, recorded by the process where they happen. With several
  processes on a host (gunicorn's workers, one or more `fhir-kap deliver`) prometheus_client's
  multiprocess mode is on when `PROMETHEUS_MULTIPROC_DIR` is set before it is first imported: each
  process writes its values to its own files there (`counter_<pid>.db`, ...), and a scrape sums the
  files of every process, live or ended (an ended worker's counts stay in the totals, so nothing
  goes backwards when a worker is replaced). `fhir-kap serve` sets the variable (default
  `<data_dir>/metrics`); a `fhir-kap deliver` on the same host records there when its environment
  names the same directory (the deployment files do). All processes writing one directory must
  share a PID namespace (one host, or containers that share one): files are named by PID.
- **Queue depths** (outbox items by state and endpoint, the age of the oldest, rest-hook jobs by
  state) are read from the database at scrape time (`QueueCollector`): the database is the one
  truth every process and host shares, so a gauge kept in some process's memory could only be
  a stale or partial copy of it.

Labels never carry ids: a route is its URL rule (`/fhir/<rtype>/<rid>`), an endpoint its
configured name (or, for an ad hoc URL, its scheme and host), a consent reason its code.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Callable, Iterable, Iterator
from functools import cache, wraps
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

__all__ = [
    "ATTEMPT_OUTCOMES",
    "CONSENT_STAGES",
    "DeliveryObserver",
    "PrometheusDelivery",
    "QueueCollector",
    "configure",
    "consent_decision",
    "delivery_observer",
    "endpoint_label",
    "exposition",
    "metrics",
    "multiprocess_dir",
    "process_ended",
    "registry",
    "request_done",
]

#: What one send attempt of one outbox item came to (the `outcome` label of the delivery metrics).
ATTEMPT_OUTCOMES = ("created", "existing", "reconciled", "retry", "dead", "lost-lease")
#: Where the consent gate decided: a partner's read at the bridge (rest-hooks included), the
#: outbox's enqueue (`fhir-kap send`, the KAP API), the delivery worker's send-time re-check.
CONSENT_STAGES = ("read", "enqueue", "send")
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
_CODE = re.compile(r"[a-z][a-z0-9-]{0,47}\Z")
log = logging.getLogger("fhir_kap.telemetry")
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


def configure(directory: Path | str) -> Path:
    """Turn on multiprocess mode in this process (and the ones it starts) with `directory` as the
    metrics directory, unless `PROMETHEUS_MULTIPROC_DIR` already names one; the directory used.

    Must run before prometheus_client is first imported (it picks its value store then); it is
    made 0700, as the data dir is."""
    chosen = Path(os.environ.get("PROMETHEUS_MULTIPROC_DIR") or directory)
    chosen.mkdir(mode=0o700, parents=True, exist_ok=True)
    import sys

    if "prometheus_client" in sys.modules and "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
        raise RuntimeError("prometheus_client was imported before the metrics directory was set")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(chosen)
    return chosen


def multiprocess_dir() -> Path | None:
    """The metrics directory when this process is in multiprocess mode, else None."""
    value = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    return Path(value) if value else None


class _Metrics:
    """The process's metric objects (prometheus_client keeps one registry per process)."""

    def __init__(self) -> None:
        from prometheus_client import Counter, Histogram

        self.requests = Counter(
            "fhir_kap_http_requests",
            "Bridge HTTP requests answered, by method, route (URL rule, never a raw path) and status.",
            ["method", "route", "status"],
        )
        self.request_seconds = Histogram(
            "fhir_kap_http_request_duration_seconds",
            "Time the bridge took to answer a request (the app's share), by method and route.",
            ["method", "route"],
            buckets=_LATENCY_BUCKETS,
        )
        self.attempts = Counter(
            "fhir_kap_delivery_attempts",
            "Send attempts of outbox items, by endpoint and outcome "
            "(created, existing, reconciled, retry, dead, lost-lease).",
            ["endpoint", "outcome"],
        )
        self.attempt_seconds = Histogram(
            "fhir_kap_delivery_duration_seconds",
            "Time of the HTTP exchange that carried an outbox item (a transaction's whole time for "
            "each of its items), by endpoint and outcome.",
            ["endpoint", "outcome"],
            buckets=_LATENCY_BUCKETS,
        )
        self.dead_letters = Counter(
            "fhir_kap_delivery_dead_letters",
            "Outbox items dead-lettered by a delivery worker, by endpoint.",
            ["endpoint"],
        )
        self.consent = Counter(
            "fhir_kap_consent_decisions",
            "Consent gate decisions, by stage (read, enqueue, send), outcome (permit, deny) and "
            "the first reason code.",
            ["stage", "outcome", "reason"],
        )


@cache
def metrics() -> _Metrics:
    """This process's metrics, made on first use (after `configure`, when it is called)."""
    directory = multiprocess_dir()
    if directory is not None:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    return _Metrics()


def _never_fails(record: Callable[..., None]) -> Callable[..., None]:
    """Counting must never stop a delivery, a request or a consent decision: a failure to
    record (an unwritable metrics directory, a full disk) is logged once per kind and dropped."""
    failed = False

    @wraps(record)
    def safe(*args: Any, **kwargs: Any) -> None:
        nonlocal failed
        try:
            record(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - metrics are never worth a failed delivery
            if not failed:
                failed = True
                log.warning(
                    "metrics: %s not recorded (%s); later failures not logged",
                    record.__name__,
                    type(exc).__name__,
                )

    return safe


@_never_fails
def request_done(method: str, route: str, status: int, seconds: float) -> None:
    """Count one bridge request; `route` is the matched URL rule (or "(unmatched)")."""
    m = metrics()
    method = method if method in _METHODS else "other"
    m.requests.labels(method, route, str(status)).inc()
    m.request_seconds.labels(method, route).observe(max(0.0, seconds))


@_never_fails
def consent_decision(stage: str, permit: bool, codes: Iterable[str] = ()) -> None:
    """Count one consent decision: its stage, outcome and first reason code (a code the gate
    does not know of, or anything not shaped like one, is counted as `other`)."""
    first = next(iter(codes), "permit" if permit else "deny")
    reason = first if _CODE.match(first) else "other"
    metrics().consent.labels(stage, "permit" if permit else "deny", reason).inc()


def endpoint_label(endpoint: str) -> str:
    """An endpoint's label: its configured name; for an ad hoc URL (`send --to URL`) only its
    scheme, host and port (never a path, query or credentials).

    >>> endpoint_label("practice-a"), endpoint_label("https://u:p@ehr.example:8443/fhir?x=1")
    ('practice-a', 'https://ehr.example:8443')
    """
    if "://" in endpoint:
        url = urlsplit(endpoint)
        port = f":{url.port}" if url.port else ""
        return f"{url.scheme}://{url.hostname or '-'}{port}"[:120]
    return endpoint[:120]


class DeliveryObserver(Protocol):
    """What the delivery worker reports: each send attempt's outcome and the time its HTTP
    exchange took (None when nothing was sent, e.g. the endpoint's client could not be made)."""

    def attempt(self, endpoint: str, outcome: str, seconds: float | None) -> None: ...

    def consent(self, permit: bool, codes: Iterable[str]) -> None: ...


class PrometheusDelivery:
    """A `DeliveryObserver` recording into this process's Prometheus metrics."""

    @_never_fails
    def attempt(self, endpoint: str, outcome: str, seconds: float | None) -> None:
        m = metrics()
        label = endpoint_label(endpoint)
        m.attempts.labels(label, outcome).inc()
        if seconds is not None:
            m.attempt_seconds.labels(label, outcome).observe(max(0.0, seconds))
        if outcome == "dead":
            m.dead_letters.labels(label).inc()

    def consent(self, permit: bool, codes: Iterable[str]) -> None:
        consent_decision("send", permit, codes)


def delivery_observer() -> DeliveryObserver:
    """The delivery worker's default observer: this process's Prometheus metrics."""
    return PrometheusDelivery()


class QueueCollector:
    """A prometheus_client collector that reads queue depths from the database at scrape time
    (read-only `COUNT`s): outbox items by state and endpoint with the age of the oldest, and
    rest-hook jobs by state and partner. `fhir_kap_database_up` is 0 when the reads fail (the
    scrape still answers)."""

    def __init__(self, db: Any, clock: Callable[[], float] = time.time) -> None:
        self.db = db
        self.clock = clock

    def describe(self) -> list[Any]:
        return []  # made at scrape time only: nothing to check at registration

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        up = GaugeMetricFamily(
            "fhir_kap_database_up", "1 when the scrape could read the queues from the database."
        )
        try:
            outbox = self.db.query(
                "SELECT state, endpoint, COUNT(*) AS n, MIN(created_at) AS oldest "
                "FROM outbox_items GROUP BY state, endpoint"
            )
        except Exception:  # noqa: BLE001 - a scrape must answer, saying the database is down
            up.add_metric([], 0)
            yield up
            return
        try:
            hooks = self.db.query(
                "SELECT state, partner, COUNT(*) AS n, "
                "SUM(CASE WHEN last_status IS NOT NULL OR last_error IS NOT NULL THEN 1 ELSE 0 END) AS failing "
                "FROM webhook_jobs GROUP BY state, partner"
            )
        except Exception:  # noqa: BLE001 - no rest-hook table yet (nothing notified): no jobs
            hooks = []
        up.add_metric([], 1)
        yield up
        now = self.clock()
        items = GaugeMetricFamily(
            "fhir_kap_outbox_items", "Outbox items by state and endpoint.", labels=["state", "endpoint"]
        )
        age = GaugeMetricFamily(
            "fhir_kap_outbox_oldest_age_seconds",
            "Age of the oldest outbox item in each state but delivered, by endpoint (since it was queued).",
            labels=["state", "endpoint"],
        )
        for row in outbox:
            endpoint = endpoint_label(str(row["endpoint"]))
            items.add_metric([row["state"], endpoint], float(row["n"]))
            if row["state"] != "delivered" and row["oldest"] is not None:
                age.add_metric([row["state"], endpoint], max(0.0, now - float(row["oldest"])))
        yield items
        yield age
        jobs = GaugeMetricFamily(
            "fhir_kap_webhook_jobs", "Rest-hook jobs by state and partner.", labels=["state", "partner"]
        )
        failing = GaugeMetricFamily(
            "fhir_kap_webhook_jobs_failed",
            "Rest-hook jobs whose last attempt failed (pending again for a retry, or dead), by state "
            "and partner.",
            labels=["state", "partner"],
        )
        for row in hooks:
            jobs.add_metric([row["state"], str(row["partner"])[:120]], float(row["n"]))
            if row["state"] in ("pending", "dead"):
                failing.add_metric([row["state"], str(row["partner"])[:120]], float(row["failing"] or 0))
        yield jobs
        yield failing


class _ThisProcess:
    """Forwards this process's default registry (when not in multiprocess mode)."""

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Iterator[Any]:
        from prometheus_client import REGISTRY

        yield from REGISTRY.collect()


def registry(db: Any) -> Any:
    """A prometheus_client registry whose every scrape reads the event metrics of all processes
    writing the metrics directory (or of this process alone, outside multiprocess mode) and the
    queue depths from `db`."""
    from prometheus_client import CollectorRegistry
    from prometheus_client.multiprocess import MultiProcessCollector

    out = CollectorRegistry(auto_describe=False)
    directory = multiprocess_dir()
    if directory is not None:
        MultiProcessCollector(out, path=str(directory))
    else:
        out.register(_ThisProcess())  # type: ignore[arg-type]
    out.register(QueueCollector(db))  # type: ignore[arg-type]
    return out


def exposition(db: Any) -> tuple[bytes, str]:
    """The Prometheus text exposition of `registry(db)` now, and its content type."""
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    return generate_latest(registry(db)), CONTENT_TYPE_LATEST


def process_ended(pid: int) -> None:
    """Forget the live gauges of an ended process (gunicorn's child_exit); its counters and
    histograms stay in the totals."""
    directory = multiprocess_dir()
    if directory is not None:
        from prometheus_client.multiprocess import mark_process_dead

        mark_process_dead(pid, str(directory))
