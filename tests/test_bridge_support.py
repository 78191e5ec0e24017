"""Shared helpers for the bridge tests: an app on a fresh data dir with three partners."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DATA = Path(__file__).parent / "data" / "bridge"
FHIR = "application/fhir+json"


def load(name: str) -> dict[str, Any]:
    return json.loads((DATA / name).read_text())


@dataclass
class Bridge:
    app: Any
    client: Any
    tokens: dict[str, str]

    def h(self, who: str, **extra: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[who]}", **extra}

    def post(self, who: str, path: str, body: Any, **headers: str) -> Any:
        data = body if isinstance(body, (bytes, str)) else json.dumps(body)
        return self.client.post(path, data=data, headers=self.h(who, **{"Content-Type": FHIR, **headers}))

    def get(self, who: str, path: str, **headers: str) -> Any:
        return self.client.get(path, headers=self.h(who, **headers))


def make_bridge(tmp_path: Path, **settings: Any) -> Bridge:
    from fhir_kap.bridge import BridgeOptions, create_app
    from fhir_kap.config import load_settings
    from fhir_kap.db import Database
    from fhir_kap.partners import Partners

    s = load_settings(env={}, data_dir=tmp_path / "data", **settings)
    partners = Partners(Database(s.db_url))
    tokens = {
        "clinic": partners.add("clinic-ehr", scopes="system/*.* kap/clinic kap/records.write kap/referrals.write")[1],
        "a": partners.add("practice-a", npis=["1234567893"], references=["Practitioner/ref-therapist"])[1],
        "b": partners.add("practice-b", npis=["1245319599"], references=["Practitioner/other-therapist"])[1],
        "reader": partners.add("reader", scopes="system/Communication.read")[1],
    }
    app = create_app(s, BridgeOptions(base_url="http://bridge.test/fhir", notify=False))
    return Bridge(app, app.test_client(), tokens)


def is_outcome(resp: Any) -> bool:
    body = resp.get_json(force=True, silent=True)
    return isinstance(body, dict) and body.get("resourceType") == "OperationOutcome" and bool(body.get("issue"))
