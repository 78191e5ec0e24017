"""Delivery workers as real processes: their environment, a queue of notes, and counting copies on the server
(the crash and scale-out system tests)."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

from fhir_kap.client import FhirClient
from fhir_kap.storage.outbox import Outbox

ROOT = Path(__file__).resolve().parents[2]
DATA = Path(__file__).resolve().parents[1] / "data"
TOKEN_ENV = "KAP_TEST_PRACTICE_TOKEN"


def load(path: Path) -> dict:
    return json.loads(path.read_text())


def context() -> list[dict]:
    bridge = DATA / "bridge"
    return [
        load(DATA / "delivery" / "Consent-open-ended.json"),
        load(bridge / "Example-PractitionerRole-ref-therapist-role.json"),
        load(bridge / "Example-Practitioner-ref-therapist.json"),
        load(bridge / "Example-Organization-kap-clinic.json"),
    ]


def worker_env(tmp_path: Path, db_url: str, base_url: str, token: str) -> dict[str, str]:
    config = tmp_path / "fhir-kap.toml"
    config.write_text(
        f'[endpoints.practice]\nbase_url = "{base_url}"\nauth = "bearer"\ntoken_env = "{TOKEN_ENV}"\n'
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("FHIR_KAP_")}
    env.update(
        {
            "PYTHONPATH": str(ROOT),
            "FHIR_KAP_CONFIG": str(config),
            "FHIR_KAP_DATABASE_URL": db_url,
            "FHIR_KAP_DATA_DIR": str(tmp_path / "data"),
            "FHIR_KAP_BATCH_SIZE": "4",
            "FHIR_KAP_BACKOFF_BASE": "0.2",
            "FHIR_KAP_BACKOFF_MAX": "1",
            "FHIR_KAP_MAX_ATTEMPTS": "50",
            TOKEN_ENV: token,
        }
    )
    return env


def enqueue_notes(outbox: Outbox, base_url: str, n: int, prefix: str) -> list[dict]:
    for res in context():
        outbox.put_context(res)
    template = load(DATA / "delivery" / "Communication-continuity-note.json")
    notes = []
    for i in range(n):
        res = copy.deepcopy(template)
        res["identifier"][0]["value"] = f"{prefix}-{i:03d}"
        outbox.enqueue(
            res,
            endpoint="practice",
            base_url=base_url,
            recipient_ref="Practitioner/ref-therapist",
            purpose="TREAT",
        )
        notes.append(res)
    return notes


def start_worker(env: dict[str, str], worker_id: str, log_path: Path, *extra: str) -> subprocess.Popen:
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "fhir_kap.cli",
                "deliver",
                "--worker-id",
                worker_id,
                "--poll",
                "0.1",
                "--lease",
                "1.5",
                *extra,
            ],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )


def server_copies(client: FhirClient, res: dict) -> int:
    ident = res["identifier"][0]
    return len(list(client.search("Communication", {"identifier": f"{ident['system']}|{ident['value']}"})))
