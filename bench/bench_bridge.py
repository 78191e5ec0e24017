"""The bridge under `fhir-kap serve` (its defaults: cores + 1 workers reading requests whole): POST /fhir/Communication vs a JSON-only endpoint, same run.

`POST /fhir/Communication` with a 3 KB note is authenticated, parsed, profile-checked, mapped,
stored durably (SQLite WAL, synchronous=FULL) and answered 201; `/bench/echo` (only with the
app's bench option) parses the same body and answers. A bounded load generator (threads with
keep-alive http.client connections to 127.0.0.1, a fixed request count and a time cap) runs
both in four interleaved rounds (ABBA) and reports req/s and p50/p99 for each.

Targets (issue 14): the bridge >= 0.4x the JSON-only floor's req/s on these 2 shared cores (the
load generator shares them), the floor being the one the target was set on (2026-11-24, "today
0.45x"): `/bench/echo` under gunicorn sync workers (`fhir-kap serve --sync`, a second server in
the same run); and p99 <= 4x the p99 of the same endpoint on the bridge's own server (the
default workers), whose req/s is a row for information: the serving model issue 14 asked for
made it ~1.6x faster, and every microsecond saved in serving saves as much on both, so that
ratio cannot measure the bridge's own cost (on CPU alone it is capped near 0.34x; see
docs/measurements/2026-12-04-floor-target.md). SEKMET, the test FHIR server (FastAPI + SQLite),
takes the same POST in the same rounds as a peer when it is installed: the bridge should keep >=
2.5x its throughput with a p99 no higher than its p99.
Other worker models for comparison: `BENCH_BRIDGE_WORKERS=N`, `BENCH_BRIDGE_THREADS=N`,
`BENCH_BRIDGE_SERVE_ARGS="--inline-max-bytes -1"` (every request handed to a thread, which
`fhir-kap serve` itself chooses on a disk slower than 0.3 ms per sync, or PostgreSQL),
`--sync` and `--reuse-port`;
`BENCH_BRIDGE_CONNECTIONS=N` (default 4, the target's baseline) sets the load generator's
keep-alive connections: with 4 connections on 3 workers their placement decides how many workers
get work (docs/measurements/2026-12-04-post-cpu.md).
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
NOTE = ROOT / "tests" / "data" / "bridge" / "Example-Communication-note-1.json"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _body() -> bytes:
    note = json.loads(NOTE.read_text())
    text = "Dosing session completed; the client tolerated it well and integration is planned. "
    body = json.dumps(note).encode()
    note["payload"][0]["contentString"] = (text * 60)[: max(0, 3072 - len(body))]
    # every POST a note of its own: the bridge answers a resend (same identifier and content)
    # with the note it holds, without a write; _load puts a serial number in place of SERIAL
    note["identifier"][0]["value"] = SERIAL.decode()
    return json.dumps(note).encode()


SERIAL = b"bench-0000000000"
_serials = iter(range(1, 10**9))
_serial_lock = threading.Lock()


def _numbered(body: bytes) -> bytes:
    with _serial_lock:
        n = next(_serials)
    return body.replace(SERIAL, b"bench-%010d" % n, 1)


def _load(
    port: int, path: str, body: bytes, headers: dict[str, str], n: int, threads: int, cap_s: float
) -> dict[str, float]:
    latencies: list[float] = []
    errors = [0]
    lock = threading.Lock()
    per = n // threads
    deadline = time.monotonic() + cap_s

    def worker() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        mine = []
        bad = 0
        for _ in range(per):
            if time.monotonic() > deadline:
                break
            t = time.perf_counter()
            conn.request("POST", path, body=_numbered(body), headers=headers)
            resp = conn.getresponse()
            resp.read()
            mine.append(time.perf_counter() - t)
            if resp.status >= 300:
                bad += 1
        conn.close()
        with lock:
            latencies.extend(mine)
            errors[0] += bad

    pool = [threading.Thread(target=worker) for _ in range(threads)]
    start = time.perf_counter()
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    elapsed = time.perf_counter() - start
    return _summary(latencies, elapsed, errors[0])


def _summary(latencies: list[float], elapsed: float, errors: int) -> dict:
    ordered = sorted(latencies)
    return {
        "rps": len(ordered) / elapsed,
        "p50": statistics.median(ordered) * 1000,
        "p99": ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1000,
        "n": len(ordered),
        "errors": errors,
        "latencies": latencies,
        "elapsed": elapsed,
    }


Target = tuple[str, int, str, dict[str, str]]  # (name, port, path, headers)


def _rounds(
    targets: list[Target], body: bytes, n: int, threads: int, cap_s: float, rounds: int = 4
) -> dict[str, dict]:
    """The targets in interleaved rounds (ABC CBA ...): a slow spell of the shared machine then
    falls on all of them instead of on whichever ran at the time. Rates are requests over summed
    time; percentiles over all latencies of the target."""
    got: dict[str, list[dict]] = {t[0]: [] for t in targets}
    for k in range(rounds):
        for name, port, path, headers in targets if k % 2 == 0 else targets[::-1]:
            got[name].append(_load(port, path, body, headers, n // rounds, threads, cap_s / rounds))
    return {
        name: _summary(
            [x for p in parts for x in p["latencies"]],
            sum(p["elapsed"] for p in parts),
            sum(p["errors"] for p in parts),
        )
        for name, parts in got.items()
    }


def _sekmet() -> Any:
    """A SEKMET server (the test FHIR server, open, no inbound log) as the peer, or None if absent."""
    from fhir_kap.demo.testserver import SekmetServer

    try:
        return SekmetServer().start()
    except RuntimeError:
        return None


def served_env(data_dir: str) -> tuple[dict[str, str], str]:
    """The environment `fhir-kap serve` runs in for a benchmark (a fresh data dir, warnings only)
    and the bearer token of its `bench` partner, registered there."""
    env = {
        **os.environ,
        "FHIR_KAP_DATA_DIR": data_dir,
        "PYTHONPATH": str(ROOT),
        "FHIR_KAP_LOG_LEVEL": "WARNING",
    }
    env.pop("FHIR_KAP_DATABASE_URL", None)
    added = subprocess.run(
        [
            sys.executable,
            "-m",
            "fhir_kap.cli",
            "partners",
            "add",
            "bench",
            # the note is the clinic's (sender Organization/kap-clinic): the bridge takes it
            # only from a clinic system that the sender names (authorship, issue 14)
            "--reference",
            "Organization/kap-clinic",
            "--scopes",
            "system/*.read",
            "system/*.write",
            "kap/clinic",
        ],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return env, json.loads(added.stdout)["token"]


def run(quick: bool = False) -> list[dict]:
    n = 600 if quick else 4000
    threads = int(os.environ.get("BENCH_BRIDGE_CONNECTIONS", "4"))
    cap = 20.0 if quick else 60.0
    with tempfile.TemporaryDirectory(prefix="bench-bridge-") as tmp:
        env, token = served_env(tmp)
        workers = os.environ.get("BENCH_BRIDGE_WORKERS")
        serve_args = [
            *(["--workers", workers] if workers else []),
            *(
                ["--threads", os.environ["BENCH_BRIDGE_THREADS"]]
                if os.environ.get("BENCH_BRIDGE_THREADS")
                else []
            ),
            *os.environ.get("BENCH_BRIDGE_SERVE_ARGS", "").split(),
        ]
        server, port = _start(tmp, env, "serve.out", serve_args)
        sync_server: subprocess.Popen | None = None
        peer = _sekmet()
        try:
            _wait(port, server)
            # the same JSON-only endpoint under gunicorn sync workers: the floor the 0.4x target
            # was set on (2026-11-24); started once the first server has measured its disk (so
            # as not to disturb that)
            sync_server, sync_port = _start(tmp, env, "serve-sync.out", ["--sync"])
            _wait(sync_port, sync_server)
            # the serving model fhir-kap serve chose (and why), from its banner
            serving = [
                line.strip()
                for line in (Path(tmp) / "serve.out").read_text().splitlines()
                if line.strip().startswith("serving:")
            ]
            print(f"  bridge {serving[0] if serving else 'serving: (no banner)'}", file=sys.stderr)
            body = _body()
            headers = {
                "Content-Type": "application/fhir+json",
                "Authorization": f"Bearer {token}",
                "Prefer": "return=minimal",
            }
            targets: list[Target] = [
                ("floor", port, "/bench/echo", headers),
                ("bridge", port, "/fhir/Communication", headers),
                ("floor-sync", sync_port, "/bench/echo", headers),
            ]
            if peer is not None:
                peer_headers = {"Content-Type": "application/fhir+json", "Prefer": "return=minimal"}
                targets.append(("sekmet", peer.port, "/fhir/Communication", peer_headers))
            for _name, p, path, h in targets:  # warm-up
                _load(p, path, body, h, 100, threads, cap)
            got = _rounds(targets, body, n, threads, 2 * cap)
        finally:
            for proc in (server, sync_server):
                if proc is not None:
                    proc.terminate()
                    proc.wait(timeout=30)
            if peer is not None:
                peer.stop()
    floor, fhir = got["floor"], got["bridge"]
    failed = {k: v["errors"] for k, v in got.items() if v["errors"]}
    if failed:
        raise RuntimeError(f"bench requests failed: {failed}")
    size = f"{len(body) / 1024:.1f} KB"
    return [
        {
            "name": f"bridge POST /fhir/Communication ({size}, validated, stored) req/s",
            "value": fhir["rps"],
            "unit": "req/s",
            "baseline_name": "JSON-only floor as set: /bench/echo, gunicorn sync workers (--sync) req/s",
            "baseline": got["floor-sync"]["rps"],
            "target": {"ratio_min": 0.4},
        },
        {
            "name": "bridge POST /fhir/Communication req/s vs the same server's JSON-only endpoint (information)",
            "value": fhir["rps"],
            "unit": "req/s",
            "baseline_name": f"/bench/echo, same server ({' '.join(serve_args) or 'fhir-kap serve defaults'}) req/s",
            "baseline": floor["rps"],
        },
        {
            "name": "bridge POST /fhir/Communication p50",
            "value": fhir["p50"],
            "unit": "ms",
            "baseline_name": "JSON-only p50, same server",
            "baseline": floor["p50"],
        },
        {
            "name": "bridge POST /fhir/Communication p99",
            "value": fhir["p99"],
            "unit": "ms",
            "baseline_name": "JSON-only p99, same server",
            "baseline": floor["p99"],
            "target": {"ratio_max": 4},
        },
        *_peer_rows(got.get("sekmet"), fhir),
    ]


def _start(tmp: str, env: dict[str, str], out: str, args: list[str]) -> tuple[subprocess.Popen, int]:
    """`fhir-kap serve --bench-echo` on a free port with `args`; its banner goes to tmp/out."""
    port = _free_port()
    with open(Path(tmp) / out, "wb") as banner:
        proc = subprocess.Popen(
            [sys.executable, "-m", "fhir_kap.cli", "serve", "--port", str(port), "--bench-echo", *args],
            env=env,
            stdout=banner,
            stderr=subprocess.DEVNULL,
        )
    return proc, port


def _peer_rows(peer: dict | None, fhir: dict) -> list[dict]:
    """The bridge beside SEKMET doing the same POST in the same run (issue 14: >= 2.5x its
    throughput, p99 no more than its p99)."""
    if peer is None:
        return []
    return [
        {
            "name": "bridge POST /fhir/Communication req/s vs SEKMET (same POST, same run)",
            "value": fhir["rps"],
            "unit": "req/s",
            "baseline_name": "SEKMET POST /fhir/Communication req/s",
            "baseline": peer["rps"],
            "target": {"ratio_min": 2.5},
        },
        {
            "name": "bridge POST /fhir/Communication p99 vs SEKMET",
            "value": fhir["p99"],
            "unit": "ms",
            "baseline_name": "SEKMET p99",
            "baseline": peer["p99"],
            "target": {"ratio_max": 1},
        },
    ]


def _wait(port: int, server: subprocess.Popen) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError("the bridge exited during start-up")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/readyz")
            if conn.getresponse().status == 200:
                return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError("the bridge did not become ready within 30 s")


if __name__ == "__main__":
    for row in run(quick="--quick" in sys.argv):
        print(row)
