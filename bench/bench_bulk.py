"""Bulk mapping: N records as NDJSON streamed through `fhir-kap map --ndjson`, with peak memory,
beside a streamed orjson parse+dump of the same file (same process shape, same run)."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RECORDS = ROOT / "profiles" / "examples" / "records"

FLOOR = (
    "import sys, orjson\n"
    "out = sys.stdout.buffer\n"
    "for line in sys.stdin.buffer:\n"
    "    out.write(orjson.dumps(orjson.loads(line)) + b'\\n')\n"
)


def _make(path: Path, n: int) -> None:
    base = [
        json.loads(p.read_text())
        for p in sorted(RECORDS.glob("*.json"))
        if json.loads(p.read_text())["record"] in ("session", "note")
    ]
    with path.open("w") as fh:
        for i in range(n):
            rec = dict(base[i % len(base)])
            rec["id"] = f"{rec['id']}-{i}"
            fh.write(json.dumps(rec) + "\n")


def _run(cmd: list[str], src: Path) -> tuple[float, float]:
    """(seconds, peak RSS MiB) of one child process."""
    code = (
        "import resource, subprocess, sys, time\n"
        "t = time.perf_counter()\n"
        f"p = subprocess.run({cmd!r}, stdin=open({str(src)!r}, 'rb'), stdout=subprocess.DEVNULL)\n"
        "el = time.perf_counter() - t\n"
        "rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024\n"
        "print(p.returncode, el, rss)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    rc, el, rss = out.stdout.split()
    if rc != "0":
        raise RuntimeError(f"{cmd[0]} exited {rc}")
    return float(el), float(rss)


def run(quick: bool = False) -> list[dict]:
    n = 10_000 if quick else 100_000
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "records.ndjson"
        _make(src, n)
        env_py = [sys.executable, "-m", "fhir_kap.cli", "map", "--ndjson", "-"]
        ours_s, ours_mb = _run(env_py, src)
        floor_s, floor_mb = _run([sys.executable, "-c", FLOOR], src)
    return [
        {
            "name": f"bulk map {n:,} records (NDJSON streamed, R4)",
            "value": n / ours_s,
            "unit": "records/s",
            "baseline_name": "orjson parse+dump stream",
            "baseline": n / floor_s,
        },
        {
            "name": f"bulk map {n:,} records: peak memory",
            "value": ours_mb,
            "unit": "MiB RSS",
            "baseline_name": "orjson stream peak",
            "baseline": floor_mb,
        },
    ]


if __name__ == "__main__":
    for row in run():
        print(row)
