"""Crash safety: the worker process is SIGKILLed at random moments while it delivers, then
restarted (under a new worker id, so its old leases must expire first). In the end SEKMET
holds every resource exactly once and the outbox shows every item delivered."""
from __future__ import annotations

import copy
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fhir_kap.client import BearerAuth, FhirClient
from fhir_kap.db import Database
from fhir_kap.outbox import Outbox

pytestmark = [pytest.mark.sekmet, pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(__file__).parent / "data"
N = 60
KILLS = 4
TOKEN_ENV = "KAP_TEST_PRACTICE_TOKEN"


def load(path: Path) -> dict:
    return json.loads(path.read_text())


def context() -> list[dict]:
    bridge = DATA / "bridge"
    return [load(DATA / "delivery" / "Consent-open-ended.json"),
            load(bridge / "Example-PractitionerRole-ref-therapist-role.json"),
            load(bridge / "Example-Practitioner-ref-therapist.json"),
            load(bridge / "Example-Organization-kap-clinic.json")]


def worker_env(tmp_path: Path, db_url: str, base_url: str, token: str) -> dict[str, str]:
    config = tmp_path / "fhir-kap.toml"
    config.write_text(f'[endpoints.practice]\nbase_url = "{base_url}"\nauth = "bearer"\n'
                      f'token_env = "{TOKEN_ENV}"\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith("FHIR_KAP_")}
    env.update({"PYTHONPATH": str(ROOT), "FHIR_KAP_CONFIG": str(config),
                "FHIR_KAP_DATABASE_URL": db_url, "FHIR_KAP_DATA_DIR": str(tmp_path / "data"),
                "FHIR_KAP_BATCH_SIZE": "4", "FHIR_KAP_BACKOFF_BASE": "0.2",
                "FHIR_KAP_BACKOFF_MAX": "1", "FHIR_KAP_MAX_ATTEMPTS": "50", TOKEN_ENV: token})
    return env


def enqueue_notes(outbox: Outbox, base_url: str, n: int, prefix: str) -> list[dict]:
    for res in context():
        outbox.put_context(res)
    template = load(DATA / "delivery" / "Communication-continuity-note.json")
    notes = []
    for i in range(n):
        res = copy.deepcopy(template)
        res["identifier"][0]["value"] = f"{prefix}-{i:03d}"
        outbox.enqueue(res, endpoint="practice", base_url=base_url,
                       recipient_ref="Practitioner/ref-therapist", purpose="TREAT")
        notes.append(res)
    return notes


def start_worker(env: dict[str, str], worker_id: str, log_path: Path, *extra: str) -> subprocess.Popen:
    with open(log_path, "ab") as log:
        return subprocess.Popen([sys.executable, "-m", "fhir_kap.cli", "deliver", "--worker-id", worker_id,
                                 "--poll", "0.1", "--lease", "1.5", *extra],
                                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def server_copies(client: FhirClient, res: dict) -> int:
    ident = res["identifier"][0]
    return len(list(client.search("Communication", {"identifier": f"{ident['system']}|{ident['value']}"})))


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
