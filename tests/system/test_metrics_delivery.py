"""/metrics during a delivery run with 2 workers (issue 16): a real `fhir-kap serve` (2 gunicorn
workers, `--metrics-port`) and 2 `fhir-kap deliver` processes delivering to SEKMET share one metrics
directory; every scrape, parsed with prometheus_client's own parser, agrees with the outbox.

- the delivery outcome counters summed over both deliver processes never run ahead of the outbox's
  delivered items and, once the run is over, equal them (and the SEKMET copies);
- each send-time consent permit is one attempt, each attempt has its latency observation;
- requests answered by the bridge's two workers add up exactly;
- the partner port never answers /metrics.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from fhir_kap.client import BearerAuth, FhirClient
from fhir_kap.storage.db import Database
from fhir_kap.storage.outbox import Outbox
from testkit.delivery import ROOT, enqueue_notes, server_copies, start_worker, worker_env
from testkit.serve import free_port, start_serve, stop

pytestmark = [pytest.mark.sekmet, pytest.mark.slow]

N = 60
DELIVERED = ("created", "existing", "reconciled")


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    resp = requests.get(url, timeout=10)
    assert resp.status_code == 200, resp.text[:500]
    out = {}
    for family in text_string_to_metric_families(resp.text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def total(samples, name: str, **match: str) -> float:
    return sum(
        v
        for (n, labels), v in samples.items()
        if n == name and all(dict(labels).get(k) == w for k, w in match.items())
    )


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db_url(request, tmp_path):
    """One host's SQLite file in the data dir, or a PostgreSQL schema of its own (several
    instances' set-up), shared by the bridge and both workers."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'data' / 'fhir-kap.sqlite3'}"
        return
    pg_url = request.getfixturevalue("pg_url")
    schema = "t_" + uuid.uuid4().hex[:12]
    admin = Database(pg_url)
    admin.execute(f"CREATE SCHEMA {schema}")
    yield pg_url + ("&" if "?" in pg_url else "?") + f"options=-csearch_path%3D{schema}"
    admin.execute(f"DROP SCHEMA {schema} CASCADE")
    admin.close()


def test_metrics_during_a_two_worker_delivery_run_agree_with_the_outbox(sekmet_auth, tmp_path, db_url):
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    outbox = Outbox(Database(db_url))
    env = worker_env(tmp_path, db_url, sekmet_auth.base_url, sekmet_auth.token)
    env["FHIR_KAP_LOG_LEVEL"] = "WARNING"
    # the bridge takes its default directory (<data dir>/metrics); the deliver processes are told
    # it, as the deployment files tell them
    deliver_env = {**env, "PROMETHEUS_MULTIPROC_DIR": str(data / "metrics")}
    port, metrics_port = free_port(), free_port()
    metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
    procs: list[subprocess.Popen] = []
    logs = [tmp_path / "w1.log", tmp_path / "w2.log"]
    try:
        procs.append(
            start_serve(
                env, port, tmp_path / "serve.log", "--workers", "2", "--metrics-port", str(metrics_port)
            )
        )
        procs += [start_worker(deliver_env, f"metrics-{n}", log, "--json") for n, log in zip((1, 2), logs)]
        assert requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5).status_code == 404
        before = scrape(metrics_url)
        for _ in range(20):  # a connection each: the kernel spreads them over both workers
            assert requests.get(f"http://127.0.0.1:{port}/healthz", timeout=5).status_code == 200
        after = scrape(metrics_url)
        healthz = {"method": "GET", "route": "/healthz", "status": "200"}
        assert (
            total(after, "fhir_kap_http_requests_total", **healthz)
            - total(before, "fhir_kap_http_requests_total", **healthz)
            == 20
        )

        notes = enqueue_notes(outbox, sekmet_auth.base_url, N, f"METRICS-{uuid.uuid4().hex[:8]}")
        deadline = time.monotonic() + 90
        scrapes = 0
        while True:
            for proc, log in zip(procs[1:], logs):
                assert proc.poll() is None, log.read_text()[-2000:]
            samples = scrape(metrics_url)
            scrapes += 1
            sent = sum(
                total(samples, "fhir_kap_delivery_attempts_total", endpoint="practice", outcome=o)
                for o in DELIVERED
            )
            in_db = total(samples, "fhir_kap_outbox_items", state="delivered", endpoint="practice")
            # the outbox commit comes before the count, and the files are read before the database
            assert sent <= in_db, (sent, in_db)
            assert total(samples, "fhir_kap_outbox_items", endpoint="practice") == N
            if in_db == N and sent == N:
                break
            assert time.monotonic() < deadline, f"timed out: {sent} counted, {in_db} delivered"
            time.sleep(0.1)
    finally:
        stop(procs)

    final = scrape_files(data / "metrics", db_url)
    items = outbox.list(limit=N)
    delivered = [i for i in items if i.state == "delivered"]
    assert len(delivered) == N
    by_worker = {w: sum(1 for i in delivered if i.delivered_by == w) for w in ("metrics-1", "metrics-2")}
    assert all(n > 0 for n in by_worker.values()), by_worker  # both deliver processes worked
    attempts = total(final, "fhir_kap_delivery_attempts_total", endpoint="practice")
    assert (
        sum(
            total(final, "fhir_kap_delivery_attempts_total", endpoint="practice", outcome=o)
            for o in DELIVERED
        )
        == N
    )
    assert attempts == sum(i.attempts for i in items)  # retries included: one count per attempt
    assert total(final, "fhir_kap_delivery_duration_seconds_count", endpoint="practice") == attempts
    assert total(final, "fhir_kap_consent_decisions_total", stage="send", outcome="permit") == attempts
    assert total(final, "fhir_kap_consent_decisions_total", stage="send", outcome="deny") == 0
    assert total(final, "fhir_kap_delivery_dead_letters_total") == 0
    pids = {p.name.rsplit("_", 1)[-1] for p in (data / "metrics").glob("counter_*.db")}
    assert len(pids) >= 3, pids  # two deliver processes and at least one bridge worker wrote here
    client = FhirClient(sekmet_auth.base_url, auth=BearerAuth(sekmet_auth.token))
    assert [server_copies(client, r) for r in notes] == [1] * N
    assert scrapes >= 1


def scrape_files(directory: Path, db_url: str) -> dict:
    """The same exposition, made after every process ended (their files stay in the totals)."""
    code = (
        "import sys\n"
        "from fhir_kap.exchange.telemetry import exposition\n"
        "from fhir_kap.storage.db import Database\n"
        f"sys.stdout.write(exposition(Database({db_url!r}))[0].decode())\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env={**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(directory), "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    samples = {}
    for family in text_string_to_metric_families(out.stdout):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples
