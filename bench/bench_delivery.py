"""Outbox throughput: durable enqueue, and claiming in batches of 50 vs one item at a time.

Runs on SQLite (WAL, synchronous=FULL) and, when FHIR_KAP_TEST_PG_URL is set, on PostgreSQL
(FOR UPDATE SKIP LOCKED), each in a fresh database / schema. Items are 3 KB Communications
with distinct business identifiers. (Delivery to SEKMET itself is in bench_client.py.)
"""

from __future__ import annotations

import copy
import json
import os
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
NOTE = ROOT / "tests" / "data" / "delivery" / "Communication-continuity-note.json"


def _notes(n: int) -> list[dict[str, Any]]:
    base = json.loads(NOTE.read_text())
    base["payload"][0]["contentString"] = ("Session completed; integration planned. " * 80)[:2600]
    out = []
    for i in range(n):
        res = copy.deepcopy(base)
        res["identifier"][0]["value"] = f"BENCH-{i:06d}"
        out.append(res)
    return out


def _backend(kind: str) -> tuple[str, Callable[[], None]]:
    """A database URL of a fresh store and its cleanup."""
    if kind == "sqlite":
        tmp = tempfile.TemporaryDirectory(prefix="kap-bench-")
        return f"sqlite:///{tmp.name}/outbox.sqlite3", tmp.cleanup
    from fhir_kap.storage.db import Database

    url = os.environ["FHIR_KAP_TEST_PG_URL"]
    schema = "bench_" + uuid.uuid4().hex[:10]
    admin = Database(url)
    admin.execute(f"CREATE SCHEMA {schema}")

    def drop() -> None:
        admin.execute(f"DROP SCHEMA {schema} CASCADE")
        admin.close()

    return url + ("&" if "?" in url else "?") + f"options=-csearch_path%3D{schema}", drop


def _measure(kind: str, n: int) -> dict[str, float]:
    from fhir_kap.storage.db import Database
    from fhir_kap.storage.outbox import Outbox

    rates: dict[str, float] = {}
    notes = _notes(n)
    for mode, limit in (("batch", 50), ("single", 1)):
        url, cleanup = _backend(kind)
        db = Database(url)
        try:
            outbox = Outbox(db)
            t = time.perf_counter()
            for res in notes:
                outbox.enqueue(
                    res,
                    endpoint="bench",
                    base_url="http://bench.invalid/fhir",
                    recipient_ref="Practitioner/t",
                    purpose="TREAT",
                )
            rates.setdefault("enqueue", n / (time.perf_counter() - t))
            claimed = 0
            t = time.perf_counter()
            while claimed < n:
                got = outbox.claim("bench-worker", limit=limit)
                if not got:
                    break
                claimed += len(got)
            rates[mode] = claimed / (time.perf_counter() - t)
        finally:
            db.close()
            cleanup()
    return rates


def run(quick: bool = False) -> list[dict]:
    """Rows: enqueue/s and batched claim/s per backend, each beside its same-run baseline."""
    n = 300 if quick else 2000
    kinds = ["sqlite"] + (["postgresql"] if os.environ.get("FHIR_KAP_TEST_PG_URL") else [])
    rows = []
    for kind in kinds:
        r = _measure(kind, n)
        rows.append(
            {
                "name": f"outbox claim, batches of 50 ({kind})",
                "value": r["batch"],
                "unit": "items/s",
                "baseline_name": f"claim one at a time ({kind})",
                "baseline": r["single"],
                "ratio": r["batch"] / r["single"],
            }
        )
        rows.append(
            {
                "name": f"outbox durable enqueue ({kind})",
                "value": r["enqueue"],
                "unit": "items/s",
                "baseline_name": f"claim one at a time ({kind})",
                "baseline": r["single"],
                "ratio": r["enqueue"] / r["single"],
            }
        )
    return rows


if __name__ == "__main__":
    quick = "--quick" in sys.argv
    print(f"{'benchmark':<40} {'value':>10} {'unit':<8} {'baseline':<32} {'value':>10} {'ratio':>7}")
    for row in run(quick):
        print(
            f"{row['name']:<40} {row['value']:>10,.0f} {row['unit']:<8} {row['baseline_name']:<32} "
            f"{row['baseline']:>10,.0f} {row['ratio']:>7.1f}"
        )
