"""Validate a resource type without a KAP meaning (a ~3 KB R4 Observation, bench/data/observation-r4.json)
beside fhir.resources `model_validate` of the same resource (its R4B model, the closest to 4.0.1),
same run; and the cold start of `fhir-kap validate` on that file."""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import orjson

HERE = Path(__file__).resolve().parent
OBSERVATION = HERE / "data" / "observation-r4.json"


def _rate(fn: Callable[[], int], min_seconds: float) -> float:
    fn()  # warm-up (imports the type's generated module, builds the model)
    done, start = 0, time.perf_counter()
    while True:
        done += fn()
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds:
            return done / elapsed


def _median_ms(cmd: list[str], n: int) -> float:
    times = []
    for _ in range(n):
        t = time.perf_counter()
        subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


def run(quick: bool = False) -> list[dict]:
    from fhir_kap.config import Release
    from fhir_kap.fhir.release import model_class
    from fhir_kap.validation import Validator

    secs = 1.0 if quick else 4.0
    blob = OBSERVATION.read_bytes()
    validator = Validator.load(Release.R4)
    model = model_class(Release.R4, "Observation")
    batch = 50

    def ours() -> int:
        for _ in range(batch):
            if validator.validate(orjson.loads(blob), profile=False):
                raise AssertionError("the benchmark Observation must be valid")
        return batch

    def plain() -> int:
        for _ in range(batch):
            model.model_validate(orjson.loads(blob))
        return batch

    ours_rate, plain_rate = _rate(ours, secs), _rate(plain, secs)
    n = 5 if quick else 15
    bare = _median_ms([sys.executable, "-c", "pass"], n)
    cli = [
        sys.executable,
        "-m",
        "fhir_kap.cli",
        "validate",
        "--no-models",
        "--profile",
        "base",
        str(OBSERVATION),
    ]
    cold = _median_ms(cli, n)
    size = len(orjson.dumps(orjson.loads(blob)))
    return [
        {
            "name": f"validate R4 Observation (non-KAP type, {size / 1024:.1f} KB, parse included)",
            "value": ours_rate,
            "unit": "resources/s",
            "baseline_name": "fhir.resources R4B Observation model_validate",
            "baseline": plain_rate,
        },
        {
            "name": "cold start fhir-kap validate --no-models --profile base (that Observation)",
            "value": cold,
            "unit": "ms (median)",
            "baseline_name": "python -c pass",
            "baseline": bare,
        },
    ]


if __name__ == "__main__":
    for row in run():
        print(row)
