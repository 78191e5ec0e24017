"""CPU time per request of the bridge's `POST /fhir/Communication` against its JSON-only floor.

Wall-clock throughput means little on a shared machine; CPU time per request in one process
does not depend on what else runs (much). This builds the app in-process (`create_app` on a
temporary data dir, the bench partner of `bench_bridge.py`), warms it up, then posts N distinct
bench notes (`bench_bridge._body`, numbered as the benchmark numbers them) through Flask's test
client and reports `time.process_time()` per request, and the same for `/bench/echo`, in
alternating rounds (ABAB...), the median of the rounds. The test client skips the HTTP server
(uvicorn/httptools and serving.py's adapter), which both routes pay alike.

    .venv/bin/python bench/profile_post.py [-n 3000] [--rounds 6] [--profile FILE.pstats]

`--profile` writes a cProfile of one extra bridge round (tottime/cumtime views: `python -m pstats`).
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import bench_bridge


def build(tmp: Path) -> tuple[Any, dict[str, str]]:
    from fhir_kap.bridge import BridgeOptions, create_app
    from fhir_kap.config import load_settings
    from fhir_kap.storage.db import Database
    from fhir_kap.storage.partners import Partners

    settings = load_settings(env={}, data_dir=tmp / "data")
    _, token = Partners(Database(settings.db_url)).add(
        "bench",
        scopes="system/*.read system/*.write kap/clinic",
        references=["Organization/kap-clinic"],
    )
    app = create_app(
        settings, BridgeOptions(base_url="http://bridge.test/fhir", notify=False, bench_echo=True)
    )
    headers = {
        "Content-Type": "application/fhir+json",
        "Authorization": f"Bearer {token}",
        "Prefer": "return=minimal",
    }
    return app, headers


def one_round(client: Any, path: str, body: bytes, headers: dict[str, str], n: int) -> float:
    """µs of process CPU per request over n requests (each a note of its own)."""
    bodies = [bench_bridge._numbered(body) for _ in range(n)]
    gc.collect()
    t0 = os.times()
    for b in bodies:
        resp = client.post(path, data=b, headers=headers)
        if resp.status_code != 201:
            raise RuntimeError(f"{path}: {resp.status_code} {resp.get_data(as_text=True)[:300]}")
    t1 = os.times()
    SYS[path] = SYS.get(path, []) + [(t1.system - t0.system) / n * 1e6]
    return (t1.user - t0.user + t1.system - t0.system) / n * 1e6


SYS: dict[str, list[float]] = {}


def _tree_cpu(pid: int) -> float:
    """Seconds of CPU (user + system) used so far by `pid`'s children (the gunicorn workers) and itself."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    pids = [pid]
    try:
        for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
            pids.append(int(child))
    except OSError:
        pass
    for p in pids:
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
    return total


def served(args: argparse.Namespace) -> None:
    """The same comparison against `fhir-kap serve` (its defaults, as bench_bridge.py starts it):
    the CPU the server's processes use per request, read from /proc (the load generator's own
    CPU is not counted)."""
    with tempfile.TemporaryDirectory(prefix="profile-served-") as tmp:
        env, token = bench_bridge.served_env(tmp)
        server, port = bench_bridge._start(
            tmp, env, "serve.out", os.environ.get("BENCH_BRIDGE_SERVE_ARGS", "").split()
        )
        try:
            bench_bridge._wait(port, server)
            body = bench_bridge._body()
            headers = {
                "Content-Type": "application/fhir+json",
                "Authorization": f"Bearer {token}",
                "Prefer": "return=minimal",
            }
            for path in ("/bench/echo", "/fhir/Communication"):
                bench_bridge._load(port, path, body, headers, args.warmup, 4, 120)
            got: dict[str, list[float]] = {"floor": [], "bridge": []}
            rates: dict[str, list[float]] = {"floor": [], "bridge": []}
            client: dict[str, list[float]] = {"floor": [], "bridge": []}  # the load generator's CPU
            order = [("floor", "/bench/echo"), ("bridge", "/fhir/Communication")]
            for k in range(args.rounds):
                for name, path in order if k % 2 == 0 else order[::-1]:
                    before, mine = _tree_cpu(server.pid), time.process_time()
                    r = bench_bridge._load(port, path, body, headers, args.n, 4, 300)
                    got[name].append((_tree_cpu(server.pid) - before) / r["n"] * 1e6)
                    rates[name].append(r["rps"])
                    client[name].append((time.process_time() - mine) / r["n"] * 1e6)
        finally:
            server.terminate()
            server.wait(timeout=30)
    floor, bridge = statistics.median(got["floor"]), statistics.median(got["bridge"])
    for name, values in got.items():
        print(
            f"served {name:7s} µs server CPU/request: median {statistics.median(values):7.1f}  rounds "
            f"{[round(v) for v in values]}  (load generator {statistics.median(client[name]):.0f} µs/request; "
            f"wall req/s on a shared machine: {statistics.median(rates[name]):.0f})"
        )
    print(f"bridge - floor: {bridge - floor:.1f} µs; floor/bridge CPU ratio {floor / bridge:.3f}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("-n", type=int, default=3000)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=500)
    ap.add_argument("--profile", help="write a cProfile of one more bridge round here")
    ap.add_argument("--served", action="store_true", help="measure a served bridge (fhir-kap serve)")
    args = ap.parse_args()
    if args.served:
        served(args)
        return
    body = bench_bridge._body()
    with tempfile.TemporaryDirectory(prefix="profile-post-") as tmp:
        app, headers = build(Path(tmp))
        client = app.test_client()
        one_round(client, "/fhir/Communication", body, headers, args.warmup)
        one_round(client, "/bench/echo", body, headers, args.warmup)
        got: dict[str, list[float]] = {"floor": [], "bridge": []}
        for k in range(args.rounds):
            order = [("floor", "/bench/echo"), ("bridge", "/fhir/Communication")]
            for name, path in order if k % 2 == 0 else order[::-1]:
                got[name].append(one_round(client, path, body, headers, args.n))
        floor, bridge = statistics.median(got["floor"]), statistics.median(got["bridge"])
        for name, values in got.items():
            print(
                f"{name:7s} µs CPU/request: median {statistics.median(values):7.1f}  rounds {[round(v) for v in values]}"
            )
        for path, values in SYS.items():
            print(f"  of which kernel (sys) time {path}: median {statistics.median(values[1:]):.1f} µs")
        print(f"bridge - floor: {bridge - floor:.1f} µs; floor/bridge CPU ratio {floor / bridge:.3f}")
        if args.profile:
            import cProfile

            prof = cProfile.Profile()
            prof.enable()
            one_round(client, "/fhir/Communication", body, headers, args.n)
            prof.disable()
            prof.dump_stats(args.profile)
            print(f"profile written to {args.profile}")


if __name__ == "__main__":
    main()
