"""Crash safety: the worker process is SIGKILLed at random moments while it delivers, then
restarted (under a new worker id, so its old leases must expire first). In the end SEKMET
holds every resource exactly once and the outbox shows every item delivered."""

from __future__ import annotations

import os
import random
import signal
import time

import pytest

from fhir_kap.client import BearerAuth, FhirClient
from fhir_kap.storage.db import Database
from fhir_kap.storage.outbox import Outbox
from testkit.delivery import enqueue_notes, server_copies, start_worker, worker_env

pytestmark = [pytest.mark.sekmet, pytest.mark.slow]

N = 60
KILLS = 4


def test_sigkill_at_random_moments__every_item_delivered_exactly_once(sekmet_auth, tmp_path):
    db_url = f"sqlite:///{tmp_path / 'outbox.sqlite3'}"
    outbox = Outbox(Database(db_url))
    prefix = f"CRASH-{os.getpid()}-{int(time.time())}"
    notes = enqueue_notes(outbox, sekmet_auth.base_url, N, prefix)
    env = worker_env(tmp_path, db_url, sekmet_auth.base_url, sekmet_auth.token)
    rng = random.Random(20250202)
    deadline = time.monotonic() + 55
    kills_mid_delivery = 0
    log_path = tmp_path / "worker.log"

    for round_no in range(KILLS):
        before = outbox.counts()["delivered"]
        if before == N:
            break
        proc = start_worker(env, f"crash-{round_no}", log_path)
        try:
            # wait until this life has delivered something, then kill it a random moment later
            while outbox.counts()["delivered"] == before and time.monotonic() < deadline:
                assert proc.poll() is None, log_path.read_text()[-2000:]
                time.sleep(0.02)
            time.sleep(rng.uniform(0.0, 0.15))
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        if outbox.counts()["delivered"] < N:
            kills_mid_delivery += 1

    proc = start_worker(env, "crash-final", log_path)
    try:
        while outbox.counts()["delivered"] < N and time.monotonic() < deadline:
            assert proc.poll() is None, log_path.read_text()[-2000:]
            time.sleep(0.1)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)

    assert kills_mid_delivery >= 2, "the kills should land while items were still queued"
    counts = outbox.counts()
    assert counts == {"pending": 0, "sending": 0, "delivered": N, "held": 0, "dead": 0}, counts
    client = FhirClient(sekmet_auth.base_url, auth=BearerAuth(sekmet_auth.token))
    assert [server_copies(client, r) for r in notes] == [1] * N
    server_ids = {i.server_id for i in outbox.list("delivered", limit=N)}
    assert len(server_ids) == N and None not in server_ids
    # some items were claimed by a killed worker and taken over once its lease ran out
    assert any(i.attempts > 1 for i in outbox.list(limit=N))
    assert sekmet_auth.token not in log_path.read_text()
