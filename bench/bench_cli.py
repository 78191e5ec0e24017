"""CLI cold start (`fhir-kap --help`, `fhir-kap --version`) vs a bare interpreter, same run."""

from __future__ import annotations

import statistics
import subprocess
import sys
import time


def _median_ms(cmd: list[str], n: int) -> float:
    times = []
    for _ in range(n):
        t = time.perf_counter()
        subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


def run(quick: bool = False) -> list[dict]:
    n = 5 if quick else 15
    bare = _median_ms([sys.executable, "-c", "pass"], n)
    rows = []
    for label, argv in (("fhir-kap --version", ["--version"]), ("fhir-kap --help", ["--help"])):
        ms = _median_ms([sys.executable, "-m", "fhir_kap.cli", *argv], n)
        rows.append(
            {
                "name": f"cold start {label}",
                "value": ms,
                "unit": "ms (median)",
                "baseline_name": "python -c pass",
                "baseline": bare,
            }
        )
    return rows


if __name__ == "__main__":
    for r in run():
        print(r)
