"""Shared fixtures and the test tiers.

Tiers are folders: tests/unit (pure core, no IO fixture allowed), tests/integration (databases,
the bridge app, the CLI, local HTTP servers), tests/system (SEKMET, gunicorn, crashes, scale-out,
the demo, a browser, the benchmarks). Each test gets its tier's marker, plus `sekmet` or
`postgres` from the fixtures it uses, so `-m "not sekmet"` or `tests/unit` both work.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import pytest

from fhir_kap.demo.testserver import SekmetServer

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(__file__).resolve().parent / "data"
TIERS = ("unit", "integration", "system")
IO_FIXTURES = {"sekmet", "sekmet_auth", "pg_url", "db", "bridge"}  # never in the unit tier


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if not Path(str(item.path)).is_relative_to(here):
            continue  # e.g. doctests of the package itself: no tier
        parts = Path(str(item.path)).relative_to(here).parts
        tier = parts[0] if parts and parts[0] in TIERS else None
        if tier is None:
            raise pytest.UsageError(
                f"{item.nodeid}: tests live in tests/unit, tests/integration or tests/system"
            )
        item.add_marker(getattr(pytest.mark, tier))
        used = set(getattr(item, "fixturenames", ()))
        if used & {"sekmet", "sekmet_auth"}:
            item.add_marker(pytest.mark.sekmet)
        if "pg_url" in used:
            item.add_marker(pytest.mark.postgres)
        if tier == "unit" and used & IO_FIXTURES:
            raise pytest.UsageError(
                f"{item.nodeid} uses {sorted(used & IO_FIXTURES)}: move it out of tests/unit"
            )


@pytest.fixture
def bridge(request: pytest.FixtureRequest, tmp_path: Path):
    """The bridge app (Flask test client) on a fresh data dir with its partners: `testkit.bridge.make_bridge`.

    A module or test asks for more with `pytest.mark.bridge(...)`: `consent=` a Consent the clinic posts
    first, `partners=` extra partners, and any setting (e.g. `fhir_version="R5"`)."""
    from testkit.bridge import make_bridge

    marker = request.node.get_closest_marker("bridge")
    return make_bridge(tmp_path, **(marker.kwargs if marker else {}))


@pytest.fixture(scope="session")
def sekmet(tmp_path_factory: pytest.TempPathFactory):
    """A SEKMET server without auth (fresh data dir for this test session)."""
    with SekmetServer(data_dir=tmp_path_factory.mktemp("sekmet-open")) as server:
        yield server


@pytest.fixture(scope="session")
def sekmet_auth(tmp_path_factory: pytest.TempPathFactory):
    """A SEKMET server with bearer + SMART backend services auth.

    Attributes added: `.token` (static bearer), `.client_id`/`.client_secret` (symmetric SMART
    client), `.jwt_client_id`/`.private_key_pem` (private_key_jwt client, RS384).
    """
    import jwt
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    jwk = jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key(), as_dict=True)
    jwk.update({"kid": "kap-test-1", "alg": "RS384", "use": "sig"})
    token = secrets.token_urlsafe(24)
    secret = secrets.token_urlsafe(24)
    server = SekmetServer(
        data_dir=tmp_path_factory.mktemp("sekmet-auth"),
        tokens=[token],
        smart_clients=[
            {"client_id": "kap-secret-client", "client_secret": secret, "scopes": "system/*.*"},
            {"client_id": "kap-jwt-client", "jwks": {"keys": [jwk]}, "scopes": "system/*.*"},
        ],
    )
    with server:
        server.token = token  # type: ignore[attr-defined]
        server.client_id = "kap-secret-client"  # type: ignore[attr-defined]
        server.client_secret = secret  # type: ignore[attr-defined]
        server.jwt_client_id = "kap-jwt-client"  # type: ignore[attr-defined]
        server.private_key_pem = pem  # type: ignore[attr-defined]
        yield server


@pytest.fixture(scope="session")
def pg_url() -> str:
    """PostgreSQL URL set by .ci/run. Outside CI, tests needing it are skipped with a reason;
    under CI (CI=true) a missing database is a failure, never a skip."""
    url = os.environ.get("FHIR_KAP_TEST_PG_URL")
    if not url:
        if os.environ.get("CI"):
            pytest.fail("FHIR_KAP_TEST_PG_URL is not set under CI: .ci/run must start PostgreSQL")
        pytest.skip("PostgreSQL not configured (run tests through .ci/run)")
    return url


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db(request, tmp_path):
    """A fresh database for each test, on both backends: a SQLite file, or a PostgreSQL
    schema of its own (dropped afterwards)."""
    import uuid

    from fhir_kap.storage.db import Database

    if request.param == "sqlite":
        database = Database(f"sqlite:///{tmp_path / 'kap.sqlite3'}")
        yield database
        database.close()
        return
    url = request.getfixturevalue("pg_url")
    schema = "t_" + uuid.uuid4().hex[:12]
    admin = Database(url)
    admin.execute(f"CREATE SCHEMA {schema}")
    database = Database(url + ("&" if "?" in url else "?") + f"options=-csearch_path%3D{schema}")
    yield database
    database.close()
    admin.execute(f"DROP SCHEMA {schema} CASCADE")
    admin.close()
