"""What the delivery worker reports to its metrics observer (each attempt's outcome and HTTP time,
send-time consent failures), the Prometheus observer it has by default, the queue collector on
both databases, and the label rules (no ids, no credentials). Faults with `responses`."""

from __future__ import annotations

import copy
import json
import uuid
from pathlib import Path

import pytest
import responses
from prometheus_client import REGISTRY

from fhir_kap.client import FhirClient, RetryPolicy
from fhir_kap.errors import ConfigError
from fhir_kap.exchange import telemetry
from fhir_kap.exchange.delivery import Backoff, DeliveryWorker
from fhir_kap.storage.outbox import Outbox
from fhir_kap.storage.webhooks import WebhookJobs

DATA = Path(__file__).resolve().parents[1] / "data" / "delivery"
NOTE = json.loads((DATA / "Communication-continuity-note.json").read_text())
FAKE = "http://fhir.test/fhir"
T0 = 1_700_000_000.0


class Recorder:
    """A DeliveryObserver that keeps what it was told."""

    def __init__(self) -> None:
        self.attempts: list[tuple[str, str, float | None]] = []
        self.consents: list[tuple[bool, tuple[str, ...]]] = []

    def attempt(self, endpoint: str, outcome: str, seconds: float | None) -> None:
        self.attempts.append((endpoint, outcome, seconds))

    def consent(self, permit: bool, codes) -> None:
        self.consents.append((permit, tuple(codes)))


class Ticks:
    """A timer that advances 0.25 s per reading."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        self.now += 0.25
        return self.now


def note() -> dict:
    res = copy.deepcopy(NOTE)
    res["identifier"][0]["value"] = f"N-{uuid.uuid4().hex[:12]}"
    return res


@pytest.fixture
def outbox(db) -> Outbox:
    return Outbox(db, clock=lambda: T0)


@pytest.fixture
def rsps():
    with responses.RequestsMock(assert_all_requests_are_fired=True) as mock:
        yield mock


def queue(outbox: Outbox, n: int, endpoint: str = "practice-a") -> list[int]:
    return [
        outbox.enqueue(
            note(),
            endpoint=endpoint,
            base_url=FAKE,
            recipient_ref="Practitioner/ref-therapist",
            purpose="TREAT",
        )[0].id
        for _ in range(n)
    ]


def client() -> FhirClient:
    return FhirClient(FAKE, sleep=lambda s: None, retry=RetryPolicy(attempts=1, base=0.5, jitter=0))


def worker(outbox, observer, **kw) -> DeliveryWorker:
    kw.setdefault("consent_check", lambda item: (True, "permitted"))
    kw.setdefault("client_for", lambda name: client())
    return DeliveryWorker(
        outbox,
        clock=lambda: T0,
        worker_id="w-metrics",
        backoff=Backoff(base=0, cap=0, jitter=0),
        observer=observer,
        timer=Ticks(),
        **kw,
    )


def answer(rsps, status: int, server_id: str = "srv-1") -> None:
    body = dict(note(), id=server_id, meta={"versionId": "1"})
    rsps.add(responses.POST, f"{FAKE}/Communication", json=body, status=status)


def test_each_attempt_reports_its_outcome_and_http_time(outbox, rsps):
    rsps.add(responses.POST, f"{FAKE}/Communication", status=503)
    answer(rsps, 201)
    answer(rsps, 200)  # the server had it already: a repeated conditional create
    rsps.add(
        responses.POST,
        f"{FAKE}/Communication",
        json={"resourceType": "OperationOutcome", "issue": []},
        status=400,
    )
    queue(outbox, 3)
    seen = Recorder()
    w = worker(outbox, seen, batch_size=3)
    w.run_once()
    w.run_once()
    assert [o for _, o, _ in seen.attempts] == ["retry", "created", "existing", "dead"]
    assert all(e == "practice-a" for e, _, _ in seen.attempts)
    assert all(s == 0.25 for _, _, s in seen.attempts)  # one timer step across each POST


def test_a_transaction_reports_each_item_with_the_bundle_time(outbox, rsps):
    entries = [
        {"response": {"status": "201 Created", "location": f"Communication/s{i}/_history/1"}}
        for i in range(2)
    ]
    rsps.add(
        responses.POST,
        FAKE,
        json={"resourceType": "Bundle", "type": "transaction-response", "entry": entries},
    )
    queue(outbox, 2)
    seen = Recorder()
    worker(outbox, seen, use_transactions=True).run_once()
    assert [(o, s) for _, o, s in seen.attempts] == [("created", 0.25), ("created", 0.25)]


def test_nothing_sent__no_latency(outbox):
    queue(outbox, 1, endpoint="unconfigured")
    seen = Recorder()

    def no_client(name: str) -> FhirClient:
        raise ConfigError(f"Endpoint '{name}' is not configured", rule="settings:endpoint")

    worker(outbox, seen, client_for=no_client).run_once()
    assert seen.attempts == [("unconfigured", "retry", None)]


def test_a_consent_check_that_fails_is_counted_as_a_send_denial(outbox):
    queue(outbox, 1)

    def broken(item):
        raise RuntimeError("context unreadable")

    seen = Recorder()
    worker(outbox, seen, consent_check=broken).run_once()
    assert seen.consents == [(False, ("check-failed",))] and seen.attempts == []


def test_the_default_observer_counts_into_prometheus(outbox, rsps):
    answer(rsps, 201)
    queue(outbox, 1, endpoint="https://u:secret@ehr.example:8443/fhir")
    labels = {"endpoint": "https://ehr.example:8443", "outcome": "created"}
    before = REGISTRY.get_sample_value("fhir_kap_delivery_attempts_total", labels) or 0.0
    w = DeliveryWorker(
        outbox, lambda name: client(), lambda item: (True, "ok"), clock=lambda: T0, worker_id="w-default"
    )
    assert isinstance(w.observer, telemetry.PrometheusDelivery)
    w.run_once()
    assert REGISTRY.get_sample_value("fhir_kap_delivery_attempts_total", labels) == before + 1
    assert REGISTRY.get_sample_value("fhir_kap_delivery_duration_seconds_count", labels) >= 1


@pytest.mark.parametrize(
    ("codes", "reason"),
    [
        (("outside-period",), "outside-period"),
        ((), "deny"),
        (("Patient/123",), "other"),  # never an id: anything not shaped like a code
        (("x" * 80,), "other"),
    ],
)
def test_consent_reasons_are_codes_or_other(codes, reason):
    labels = {"stage": "send", "outcome": "deny", "reason": reason}
    before = REGISTRY.get_sample_value("fhir_kap_consent_decisions_total", labels) or 0.0
    telemetry.consent_decision("send", False, codes)
    assert REGISTRY.get_sample_value("fhir_kap_consent_decisions_total", labels) == before + 1


def test_the_queue_collector_reads_outbox_and_rest_hook_jobs_from_the_database(db, outbox):
    ids = queue(outbox, 3)
    [claimed] = outbox.claim("w", 1, now=T0, lease_seconds=60)
    outbox.mark_dead(claimed, "400 invalid", now=T0)
    jobs = WebhookJobs(db)
    for n in range(3):
        jobs.enqueue("practice-a", "created", f"Communication/c{n}", "1", now=T0)
    [job] = jobs.claim("n", 1, T0, 60)
    jobs.finish(job, "n", "dead", 500, "500 from the webhook", next_at=T0, now=T0)
    [job] = jobs.claim("n", 1, T0, 60)
    jobs.finish(job, "n", "pending", 503, "503", next_at=T0 + 60, now=T0)
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in telemetry.QueueCollector(db, clock=lambda: T0 + 90).collect()
        for s in family.samples
    }
    assert samples[("fhir_kap_database_up", ())] == 1
    assert samples[("fhir_kap_outbox_items", (("endpoint", "practice-a"), ("state", "pending")))] == 2
    assert samples[("fhir_kap_outbox_items", (("endpoint", "practice-a"), ("state", "dead")))] == 1
    assert (
        samples[("fhir_kap_outbox_oldest_age_seconds", (("endpoint", "practice-a"), ("state", "pending")))]
        == 90
    )
    assert samples[("fhir_kap_webhook_jobs", (("partner", "practice-a"), ("state", "pending")))] == 2
    assert samples[("fhir_kap_webhook_jobs", (("partner", "practice-a"), ("state", "dead")))] == 1
    assert samples[("fhir_kap_webhook_jobs_failed", (("partner", "practice-a"), ("state", "pending")))] == 1
    assert samples[("fhir_kap_webhook_jobs_failed", (("partner", "practice-a"), ("state", "dead")))] == 1
    assert len(ids) == 3


def test_the_queue_collector_says_the_database_is_down_and_still_answers():
    class Down:
        def query(self, *args, **kwargs):
            raise OSError("connection refused")

    families = list(telemetry.QueueCollector(Down()).collect())
    assert [(f.name, [s.value for s in f.samples]) for f in families] == [("fhir_kap_database_up", [0])]


@pytest.mark.parametrize(
    ("endpoint", "label"),
    [
        ("practice-a", "practice-a"),
        ("https://u:p@ehr.example:8443/fhir/Patient/123?token=x", "https://ehr.example:8443"),
        ("http://ehr.example/fhir", "http://ehr.example"),
    ],
)
def test_endpoint_labels_name_no_path_query_or_credentials(endpoint, label):
    assert telemetry.endpoint_label(endpoint) == label


def test_a_failure_to_record_never_stops_a_delivery(outbox, rsps, monkeypatch):
    def unwritable():
        raise PermissionError("metrics directory not writable")

    monkeypatch.setattr(telemetry, "metrics", unwritable)
    answer(rsps, 201)
    [item_id] = queue(outbox, 1)
    w = DeliveryWorker(
        outbox, lambda name: client(), lambda item: (True, "ok"), clock=lambda: T0, worker_id="w-safe"
    )
    assert w.run_once().delivered == 1
    assert outbox.get(item_id).state == "delivered"
    telemetry.request_done("GET", "/healthz", 200, 0.001)  # nor a request
    telemetry.consent_decision("read", True, ("permit",))  # nor a consent decision
