"""`fhir-kap check --auth smart` against the bridge's SMART Backend Services: cap-07 finds the
discovery document (`.well-known/smart-configuration`, token endpoint discovered from it), the
checker gets its token with a signed assertion, and the clinic role passes its required checks."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from werkzeug.serving import make_server

from fhir_kap.client import SmartBackendAuth
from fhir_kap.conformance import CheckConfig, run_checks
from fhir_kap.storage.db import Database
from fhir_kap.storage.partners import Partners

KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture
def smart_bridge(tmp_path) -> Iterator[str]:
    """The bridge over real HTTP (its URL is the assertion's audience); clinic-ehr signs with KEY."""
    from fhir_kap.bridge import BridgeOptions, create_app
    from fhir_kap.config import load_settings

    settings = load_settings(env={}, data_dir=tmp_path / "data")
    jwk = {**json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(KEY.public_key())), "kid": "k1"}
    Partners(Database(settings.db_url)).add(
        "clinic-ehr",
        scopes="system/*.* kap/clinic",
        references=["Organization/kap-clinic"],
        jwks={"keys": [jwk]},
    )
    server = make_server("127.0.0.1", 0, None, threaded=True)
    base = f"http://127.0.0.1:{server.server_port}/fhir"
    server.app = create_app(settings, BridgeOptions(base_url=base, notify=False))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield base
    finally:
        server.shutdown()


def test_smart_discovery_and_the_clinic_role_pass_with_smart_auth(smart_bridge):
    pem = KEY.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    auth = SmartBackendAuth(
        "clinic-ehr", private_key_pem=pem, key_id="k1", alg="RS384", scope="system/*.read system/*.write"
    )
    report = run_checks(CheckConfig(server=smart_bridge, auth=auth, auth_kind="smart", role="clinic"))
    outcomes = {r.id: r.outcome for r in report.results}
    assert outcomes["cap-07"] == "pass", next(r.reason for r in report.results if r.id == "cap-07")
    assert report.passed, [(r.id, r.reason) for r in report.results if r.outcome == "fail"]
