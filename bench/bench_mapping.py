"""Map + validate + serialize KAP records to R4 JSON, beside the plain fhir.resources path
(model_validate + model_dump_json of the same FHIR resources) and the orjson floor (parse + dump)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

ROOT = Path(__file__).resolve().parent.parent
RECORDS = ROOT / "profiles" / "examples" / "records"


def _records() -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted(RECORDS.glob("*.json"))]


def _rate(fn: Callable[[], int], min_seconds: float) -> float:
    fn()  # warm-up (loads, caches)
    done, start = 0, time.perf_counter()
    while True:
        done += fn()
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds:
            return done / elapsed


def run(quick: bool = False) -> list[dict]:
    from fhir_kap.config import Release
    from fhir_kap.fhir.release import model_class
    from fhir_kap.records.pipeline import Pipeline

    secs = 1.0 if quick else 4.0
    pipeline = Pipeline.load()
    records = _records()
    raw = [orjson.dumps(r) for r in records]
    resources = [pipeline.to_fhir(r, Release.R4) for r in records]
    fhir_raw = [orjson.dumps(r) for r in resources]
    models = [model_class(Release.R4, r["resourceType"]) for r in resources]

    def ours() -> int:
        for blob in raw:
            orjson.dumps(pipeline.to_fhir(orjson.loads(blob), Release.R4))
        return len(raw)

    def plain() -> int:
        for blob, model in zip(fhir_raw, models):
            model.model_validate(orjson.loads(blob)).model_dump_json()
        return len(fhir_raw)

    def floor() -> int:
        for blob in fhir_raw:
            orjson.dumps(orjson.loads(blob))
        return len(fhir_raw)

    ours_rate, plain_rate, floor_rate = _rate(ours, secs), _rate(plain, secs), _rate(floor, secs)
    avg = sum(map(len, fhir_raw)) / len(fhir_raw)
    return [
        {
            "name": f"map+validate+serialize R4 ({len(records)} record kinds, avg {avg / 1024:.1f} KB out)",
            "value": ours_rate,
            "unit": "records/s",
            "baseline_name": "fhir.resources model_validate+model_dump_json",
            "baseline": plain_rate,
            "target": {"ratio_min": 5},
        },
        {
            "name": "map+validate+serialize R4",
            "value": ours_rate,
            "unit": "records/s",
            "baseline_name": "orjson parse+dump floor",
            "baseline": floor_rate,
        },
    ]


if __name__ == "__main__":
    for row in run():
        print(row)
