"""Scale-out: two worker processes share one PostgreSQL queue (FOR UPDATE SKIP LOCKED) and
deliver N items to SEKMET with no duplicate sends, both doing part of the work."""

from __future__ import annotations

import json
import signal
import time
import uuid
from pathlib import Path

import pytest

from fhir_kap.client import BearerAuth, FhirClient
from fhir_kap.storage.db import Database
from fhir_kap.storage.outbox import Outbox
from testkit.delivery import enqueue_notes, server_copies, start_worker, worker_env

pytestmark = [pytest.mark.sekmet, pytest.mark.postgres, pytest.mark.slow]

N = 80


@pytest.fixture
def pg_schema_url(pg_url):
    schema = "t_" + uuid.uuid4().hex[:12]
    admin = Database(pg_url)
    admin.execute(f"CREATE SCHEMA {schema}")
    yield pg_url + ("&" if "?" in pg_url else "?") + f"options=-csearch_path%3D{schema}"
    admin.execute(f"DROP SCHEMA {schema} CASCADE")
    admin.close()


def wait_for(predicate, deadline: float, procs, logs) -> None:
    while not predicate():
        for proc, log in zip(procs, logs):
            assert proc.poll() is None, log.read_text()[-2000:]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_two_workers_on_one_postgresql_queue__no_duplicate_sends_and_both_work(
    sekmet_auth, pg_schema_url, tmp_path
):
    outbox = Outbox(Database(pg_schema_url))
    env = worker_env(tmp_path, pg_schema_url, sekmet_auth.base_url, sekmet_auth.token)
    deadline = time.monotonic() + 55
    logs = [tmp_path / "w1.log", tmp_path / "w2.log"]
    procs = [start_worker(env, f"scale-{n}", log, "--json") for n, log in zip((1, 2), logs)]
    try:
        # both workers are up and polling the empty queue before any work arrives
        wait_for(
            lambda: (
                all("started" in log.read_text() for log in logs if log.exists())
                and all(log.exists() for log in logs)
            ),
            deadline,
            procs,
            logs,
        )
        notes = enqueue_notes(outbox, sekmet_auth.base_url, N, f"SCALE-{uuid.uuid4().hex[:8]}")
        wait_for(lambda: outbox.counts()["delivered"] == N, deadline, procs, logs)
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            proc.wait(timeout=20)

    items = outbox.list(limit=N)
    assert {i.state for i in items} == {"delivered"}
    assert all(i.attempts == 1 for i in items), "an item was claimed twice"
    by_worker = {w: sum(1 for i in items if i.delivered_by == w) for w in ("scale-1", "scale-2")}
    assert all(n > 0 for n in by_worker.values()), by_worker
    assert sum(by_worker.values()) == N
    finals = [_final_json(log) for log in logs]
    assert sum(f["stats"]["delivered"] for f in finals) == N
    assert sum(f["stats"]["existing"] for f in finals) == 0  # nothing was sent twice
    client = FhirClient(sekmet_auth.base_url, auth=BearerAuth(sekmet_auth.token))
    assert [server_copies(client, r) for r in notes] == [1] * N


def _final_json(log: Path) -> dict:
    """The worker's closing `--json` report (the last JSON object in its output)."""
    text = log.read_text()
    start = text.rindex('{\n  "worker"')
    return json.loads(text[start:])
