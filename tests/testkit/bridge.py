"""The bridge tests' builder: an app on a fresh data dir with its partners (the `bridge` fixture uses it)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DATA = Path(__file__).resolve().parents[1] / "data" / "bridge"
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


def make_bridge(
    tmp_path: Path,
    *,
    consent: str | dict[str, Any] | None = None,
    partners: dict[str, tuple[str, str] | tuple[str, str, dict[str, Any]]] | None = None,
    options: dict[str, Any] | None = None,
    **settings: Any,
) -> Bridge:
    """The bridge app on a fresh data dir with four partners (clinic, practices a and b, a reader).

    `consent`: a Consent (fixture name or resource) the clinic posts first; `partners`: more partners,
    token key -> (partner name, scopes) or (name, scopes, more `Partners.add` arguments such as its
    `references` or `npis`: the identity its author elements must name); `options`: more
    `BridgeOptions`; `settings`: passed to `load_settings`."""
    from fhir_kap.bridge import BridgeOptions, create_app
    from fhir_kap.config import load_settings
    from fhir_kap.storage.db import Database
    from fhir_kap.storage.partners import Partners

    s = load_settings(env={}, data_dir=tmp_path / "data", **settings)
    registry = Partners(Database(s.db_url))
    tokens = {
        "clinic": registry.add(
            "clinic-ehr",
            scopes="system/*.* kap/clinic kap/records.write kap/referrals.write",
            references=["Organization/kap-clinic"],  # its notes' sender, filled when missing
        )[1],
        "a": registry.add(
            "practice-a",
            npis=["1234567893"],
            references=["Practitioner/ref-therapist", "PractitionerRole/ref-therapist-role"],
        )[1],
        "b": registry.add("practice-b", npis=["1245319599"], references=["Practitioner/other-therapist"])[1],
        "reader": registry.add("reader", scopes="system/Communication.read")[1],
    }
    for key, (name, scopes, *more) in (partners or {}).items():
        tokens[key] = registry.add(name, scopes=scopes, **(more[0] if more else {}))[1]
    app = create_app(
        s, BridgeOptions(**{"base_url": "http://bridge.test/fhir", "notify": False, **(options or {})})
    )
    bridge = Bridge(app, app.test_client(), tokens)
    if consent is not None:
        resp = bridge.post("clinic", "/fhir/Consent", load(consent) if isinstance(consent, str) else consent)
        assert resp.status_code == 201, resp.get_data(as_text=True)
    return bridge


def is_outcome(resp: Any) -> bool:
    body = resp.get_json(force=True, silent=True)
    return (
        isinstance(body, dict) and body.get("resourceType") == "OperationOutcome" and bool(body.get("issue"))
    )
