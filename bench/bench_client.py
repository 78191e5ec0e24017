"""Delivery throughput against SEKMET: single conditional POSTs vs transaction Bundles of 100,
and the client's CPU per delivered resource, all in one run.

    python bench/bench_client.py [N]      # N resources each way (default 2,000); starts its own SEKMET

Targets (issue 4): batching >= 5x single-POST throughput; the adapter is not the bottleneck
(client CPU per resource well under -- here at most half of -- the server's time per resource,
estimated as wall time minus client CPU, since client and server share the same cores).
"""

from __future__ import annotations

import json
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from fhir_kap.client import FhirClient, entry_results, identifier_query, transaction_bundle

PREFER = "return=minimal"  # what a delivery worker asks for: ids and versions, no echo
NOTE = HERE.parent / "tests" / "data" / "client" / "Communication-continuity-note.json"


def _notes(n: int, patient_ref: str) -> list[dict[str, Any]]:
    template = json.loads(NOTE.read_text())
    run = uuid.uuid4().hex[:8]
    out = []
    for i in range(n):
        note = json.loads(json.dumps(template))
        note.pop("id", None)
        note["identifier"][0]["value"] = f"bench-{run}-{i}"
        note["subject"] = {"reference": patient_ref}
        out.append(note)
    return out


def _timed(fn: Callable[[], int]) -> tuple[int, float, float]:
    w0, c0 = time.perf_counter(), time.process_time()
    delivered = fn()
    return delivered, time.perf_counter() - w0, time.process_time() - c0


def run(
    server_base_url: str | None = None, n: int = 2000, *, quick: bool = False, batch_size: int = 100
) -> list[dict[str, Any]]:
    """Rows {"name", "value", "unit", "baseline_name", "baseline", "target"} for bench/run.py."""
    if quick:
        n = min(n, 100)
    if server_base_url is None:
        from fhir_kap.demo.testserver import SekmetServer

        with SekmetServer(log_inbound=False) as server:
            return run(server.base_url, n, batch_size=batch_size)
    client = FhirClient(server_base_url)
    client.preflight(["Patient", "Communication"], transaction=True)
    patient = json.loads((NOTE.parent / "Patient-client.json").read_text())
    patient["identifier"][0]["value"] = f"bench-{uuid.uuid4().hex[:8]}"
    patient_ref = f"Patient/{client.create(patient).id}"
    for note in _notes(5, patient_ref):  # warm up connection and server caches
        client.create(note, if_none_exist=identifier_query(note))

    singles = _notes(n, patient_ref)
    batched = _notes(n, patient_ref)

    def single(part: list[dict[str, Any]]) -> int:
        return sum(client.create(r, if_none_exist=identifier_query(r), prefer=PREFER).created for r in part)

    def transactions(part: list[dict[str, Any]]) -> int:
        done = 0
        for i in range(0, len(part), batch_size):
            response = client.transaction(transaction_bundle(part[i : i + batch_size]), prefer=PREFER)
            done += sum(r.created for r in entry_results(response))
        return done

    # Interleaved rounds in ABBA order: the server's tables grow as the run goes on, and
    # neither way of sending should always meet the bigger database.
    rounds = 4
    size = -(-n // rounds)
    s_n = b_n = 0
    s_wall = s_cpu = b_wall = b_cpu = 0.0
    per_round: list[float] = []  # batching ratio of each round: how much the figure moves run to run
    for k in range(rounds):
        part = slice(k * size, (k + 1) * size)
        order = [("s", singles[part]), ("b", batched[part])]
        walls = {}
        for kind, items in order if k % 2 == 0 else order[::-1]:
            done, wall, cpu = _timed(lambda: (single if kind == "s" else transactions)(items))  # noqa: B023 - called at once
            walls[kind] = wall
            if kind == "s":
                s_n, s_wall, s_cpu = s_n + done, s_wall + wall, s_cpu + cpu
            else:
                b_n, b_wall, b_cpu = b_n + done, b_wall + wall, b_cpu + cpu
        per_round.append(walls["s"] / walls["b"])
    if s_n != n or b_n != n:
        raise RuntimeError(f"expected {n} creations each, got {s_n} single and {b_n} batched")
    s_rate, b_rate = n / s_wall, n / b_wall
    us = 1e6 / n
    return [
        {"name": "single POSTs (conditional create)", "value": s_rate, "unit": "resources/s"},
        {
            "name": f"transaction Bundles of {batch_size} (conditional)",
            "value": b_rate,
            "unit": "resources/s",
            "baseline_name": "single POSTs",
            "baseline": s_rate,
            "target": {"ratio_min": 5},
        },
        {
            "name": "batching ratio by round, median",
            "value": statistics.median(per_round),
            "unit": f"× (min {min(per_round):.2f}, max {max(per_round):.2f}; {rounds} rounds of {size})",
            "rounds": [round(r, 3) for r in per_round],
        },
        {
            "name": "client CPU per resource, single POSTs",
            "value": s_cpu * us,
            "unit": "µs",
            "baseline_name": "server time per resource (wall − client CPU)",
            "baseline": (s_wall - s_cpu) * us,
            "target": {"ratio_max": 0.5},
        },
        {
            "name": f"client CPU per resource, Bundles of {batch_size}",
            "value": b_cpu * us,
            "unit": "µs",
            "baseline_name": "server time per resource (wall − client CPU)",
            "baseline": (b_wall - b_cpu) * us,
            "target": {"ratio_max": 0.5},
        },
    ]


def _table(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'figure':<44} {'value':>12} {'unit':<12} {'baseline':>12}  ratio   target"]
    for r in rows:
        base = r.get("baseline")
        ratio = r["value"] / base if base else None
        tgt = r.get("target") or {}
        verdict = ""
        if ratio is not None and tgt:
            ok = ratio >= tgt.get("ratio_min", float("-inf")) and ratio <= tgt.get("ratio_max", float("inf"))
            sign = f"≥{tgt['ratio_min']}×" if "ratio_min" in tgt else f"≤{tgt['ratio_max']}×"
            verdict = f"{sign} {'ok' if ok else 'MISSED'}"
        lines.append(
            f"{r['name']:<44} {r['value']:>12,.1f} {r['unit']:<12} "
            f"{'' if base is None else f'{base:,.1f}':>12}  "
            f"{'' if ratio is None else f'{ratio:5.2f}×':<6}  {verdict}"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    print(_table(run(None, int(sys.argv[1])) if len(sys.argv) > 1 else run(None)))
