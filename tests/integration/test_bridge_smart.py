"""SMART Backend Services on the bridge: the adapter's own FHIR client gets a token with a signed
assertion over real HTTP, and every malformed, replayed or over-reaching request is refused."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
import requests
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from werkzeug.serving import make_server

from fhir_kap.client import FhirClient, SmartBackendAuth
from fhir_kap.errors import InputError, ServerError
from fhir_kap.storage.db import Database
from fhir_kap.storage.partners import Partners, check_jwks
from testkit.bridge import load


def _rsa() -> Any:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _jwk(private: Any, kid: str) -> dict:
    algo = (
        jwt.algorithms.RSAAlgorithm if isinstance(private, rsa.RSAPrivateKey) else jwt.algorithms.ECAlgorithm
    )
    return {**json.loads(algo.to_jwk(private.public_key())), "kid": kid}


def _pem(private: Any) -> bytes:
    return private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


class Bridge:
    def __init__(self, base: str, app: Any, partners: Partners, keys: dict[str, Any]) -> None:
        self.base, self.app, self.partners, self.keys = base, app, partners, keys
        self.token_url = base[: -len("/fhir")] + "/auth/token"

    def assertion(
        self, *, key: str = "rsa-1", alg: str = "RS384", iss: str = "practice-a", **claims: Any
    ) -> str:
        now = int(time.time())
        body = {
            "iss": iss,
            "sub": iss,
            "aud": self.token_url,
            "iat": now,
            "exp": now + 240,
            "jti": uuid.uuid4().hex,
            **claims,
        }
        body = {k: v for k, v in body.items() if v is not None}
        return jwt.encode(body, self.keys[key], algorithm=alg, headers={"kid": key})

    def token(
        self, assertion: str, scope: str = "system/Communication.read", **form: str
    ) -> requests.Response:
        data = {
            "grant_type": "client_credentials",
            "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            "client_assertion": assertion,
            "scope": scope,
            **form,
        }
        return requests.post(self.token_url, data=data, timeout=10)


@pytest.fixture
def smart_bridge(tmp_path) -> Iterator[Bridge]:
    """The bridge served over real HTTP (token requests need its URL), with signing keys for practice-a."""
    from fhir_kap.bridge import BridgeOptions, create_app
    from fhir_kap.config import load_settings

    keys = {"rsa-1": _rsa(), "ec-1": ec.generate_private_key(ec.SECP384R1()), "stranger": _rsa()}
    settings = load_settings(env={}, data_dir=tmp_path / "data")
    partners = Partners(Database(settings.db_url))
    partners.add("clinic-ehr", scopes="system/*.* kap/clinic", references=["Organization/kap-clinic"])
    partners.add(
        "practice-a",
        npis=["1234567893"],
        references=["Practitioner/ref-therapist", "PractitionerRole/ref-therapist-role"],
        jwks={"keys": [_jwk(keys["rsa-1"], "rsa-1"), _jwk(keys["ec-1"], "ec-1")]},
    )
    server = make_server("127.0.0.1", 0, None, threaded=True)  # the port first: the app names it in aud
    base = f"http://127.0.0.1:{server.server_port}/fhir"
    app = create_app(settings, BridgeOptions(base_url=base, notify=False))
    server.app = app
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield Bridge(base, app, app.extensions["fhir_kap"].partners, keys)
    finally:
        server.shutdown()


@pytest.mark.parametrize("kid, alg", [("rsa-1", "RS384"), ("ec-1", "ES384")])
def test_the_adapters_own_client_gets_a_token_and_reads_with_it(smart_bridge, kid, alg):
    auth = SmartBackendAuth(
        "practice-a",
        private_key_pem=_pem(smart_bridge.keys[kid]),
        key_id=kid,
        alg=alg,
        scope="system/Communication.read system/ServiceRequest.write",
    )
    client = FhirClient(smart_bridge.base, auth=auth)
    found = list(client.search("Communication", {"patient": "client-1"}))
    assert found == [] and auth.token_requests == 1  # discovered, then one token for both calls below
    list(client.search("Communication", {"patient": "client-1"}))
    assert auth.token_requests == 1
    referral = client.create(load("Example-ServiceRequest-referral-1.json"))
    assert referral.created
    with pytest.raises(ServerError) as denied:  # not in the granted scopes, though the partner holds it
        client.create(load("Example-Communication-note-1.json"))
    assert denied.value.status == 403


def test_discovery_names_the_token_endpoint_and_the_capability_statement_says_smart(smart_bridge):
    conf = requests.get(f"{smart_bridge.base}/.well-known/smart-configuration", timeout=10).json()
    assert conf["token_endpoint"] == smart_bridge.token_url
    assert conf["token_endpoint_auth_methods_supported"] == ["private_key_jwt"]
    assert set(conf["token_endpoint_auth_signing_alg_values_supported"]) == {"RS384", "ES384"}
    assert {"permission-v1", "permission-v2", "client-confidential-asymmetric"} <= set(conf["capabilities"])
    cs = requests.get(f"{smart_bridge.base}/metadata", timeout=10).json()
    assert cs["rest"][0]["security"]["service"][0]["coding"][0]["code"] == "SMART-on-FHIR"


def test_a_token_carries_only_requested_scopes_the_partner_holds(smart_bridge):
    got = smart_bridge.token(
        smart_bridge.assertion(), scope="system/Communication.read kap/clinic system/Foo.bogus"
    )
    assert got.status_code == 200 and got.headers["Cache-Control"] == "no-store"
    body = got.json()
    assert body["scope"] == "system/Communication.read" and body["token_type"] == "bearer"
    assert 0 < body["expires_in"] <= 300
    partner = smart_bridge.partners.authenticate(body["access_token"])
    assert (
        partner is not None
        and partner.name == "practice-a"
        and partner.scopes == ("system/Communication.read",)
    )
    assert not partner.is_clinic


def test_smart_v2_scopes_read_by_id_and_search_separately(smart_bridge):
    """`.r` reads by id, `.s` searches, `.rs` both; each granted from the partner's v1 read."""

    def token(scope: str) -> str:
        got = smart_bridge.token(smart_bridge.assertion(), scope=scope)
        assert got.status_code == 200 and got.json()["scope"] == scope
        return got.json()["access_token"]

    def get(tok: str, path: str) -> int:
        return requests.get(
            f"{smart_bridge.base}{path}", headers={"Authorization": f"Bearer {tok}"}, timeout=10
        ).status_code

    only_read, only_search, both = (
        token("system/Communication.r"),
        token("system/Communication.s"),
        token("system/Communication.rs"),
    )
    assert get(only_read, "/Communication?patient=client-1") == 403
    assert get(only_read, "/Communication/unknown-1") == 404  # allowed to read: the usual not-found
    assert get(only_search, "/Communication?patient=client-1") == 200
    assert get(only_search, "/Communication/unknown-1") == 403
    assert (get(both, "/Communication?patient=client-1"), get(both, "/Communication/unknown-1")) == (200, 404)


def test_a_replayed_assertion_is_refused(smart_bridge):
    assertion = smart_bridge.assertion()
    assert smart_bridge.token(assertion).status_code == 200
    again = smart_bridge.token(assertion)
    assert again.status_code == 400 and again.json()["error"] == "invalid_grant"


@pytest.mark.parametrize(
    "case, expect",
    [
        ("wrong audience", (401, "invalid_client")),
        ("expired", (401, "invalid_client")),
        ("exp an hour ahead", (401, "invalid_client")),
        ("no jti", (401, "invalid_client")),
        ("sub is not iss", (401, "invalid_client")),
        ("unknown client", (401, "invalid_client")),
        ("unknown kid", (401, "invalid_client")),
        ("signed with another key", (401, "invalid_client")),
        ("HS256", (401, "invalid_client")),
        ("not a JWT", (401, "invalid_client")),
        ("client secret instead", (401, "invalid_client")),
        ("authorization code grant", (400, "unsupported_grant_type")),
        ("a scope it does not hold", (400, "invalid_scope")),
    ],
)
def test_a_bad_token_request_is_refused_with_an_oauth_error(smart_bridge, case, expect):
    now = int(time.time())
    assertion = {
        "wrong audience": lambda: smart_bridge.assertion(aud="https://elsewhere.example/token"),
        "expired": lambda: smart_bridge.assertion(exp=now - 120, iat=now - 400),
        "exp an hour ahead": lambda: smart_bridge.assertion(exp=now + 3600),
        "no jti": lambda: smart_bridge.assertion(jti=None),
        "sub is not iss": lambda: smart_bridge.assertion(sub="clinic-ehr"),
        "unknown client": lambda: smart_bridge.assertion(iss="nobody"),
        "unknown kid": lambda: jwt.encode(
            {
                "iss": "practice-a",
                "sub": "practice-a",
                "aud": smart_bridge.token_url,
                "exp": now + 60,
                "jti": "x",
            },
            smart_bridge.keys["rsa-1"],
            algorithm="RS384",
            headers={"kid": "rsa-9"},
        ),
        "signed with another key": lambda: jwt.encode(
            {
                "iss": "practice-a",
                "sub": "practice-a",
                "aud": smart_bridge.token_url,
                "exp": now + 60,
                "jti": "y",
            },
            smart_bridge.keys["stranger"],
            algorithm="RS384",
            headers={"kid": "rsa-1"},
        ),
        "HS256": lambda: jwt.encode(
            {
                "iss": "practice-a",
                "sub": "practice-a",
                "aud": smart_bridge.token_url,
                "exp": now + 60,
                "jti": "z",
            },
            "a-shared-secret-of-32-bytes-long!",
            algorithm="HS256",
            headers={"kid": "rsa-1"},
        ),
        "not a JWT": lambda: "not-a-jwt",
    }.get(case, smart_bridge.assertion)()
    form: dict[str, str] = {}
    scope = "system/Communication.read"
    if case == "client secret instead":
        form["client_assertion_type"] = "client_secret_basic"
    if case == "authorization code grant":
        form["grant_type"] = "authorization_code"
    if case == "a scope it does not hold":
        scope = "kap/clinic kap/records.write"
    got = smart_bridge.token(assertion, scope=scope, **form)
    assert (got.status_code, got.json()["error"]) == expect
    assert "practice-a" not in got.json()["error_description"]  # rules, never claim values


def test_a_token_request_must_be_a_form(smart_bridge):
    got = requests.post(smart_bridge.token_url, json={"grant_type": "client_credentials"}, timeout=10)
    assert got.status_code == 400 and got.json()["error"] == "invalid_request"


def test_revoking_the_partner_ends_its_tokens_and_expired_tokens_do_nothing(smart_bridge):
    access = smart_bridge.token(smart_bridge.assertion()).json()["access_token"]
    hdr = {"Authorization": f"Bearer {access}"}
    assert requests.get(f"{smart_bridge.base}/Communication", headers=hdr, timeout=10).status_code == 200
    old = smart_bridge.partners.grant(
        smart_bridge.partners.get("practice-a"),
        ["system/Communication.read"],
        jti="old",
        assertion_expires=time.time() - 500,
        now=time.time() - 400,
    )
    stale = requests.get(
        f"{smart_bridge.base}/Communication", headers={"Authorization": f"Bearer {old}"}, timeout=10
    )
    assert stale.status_code == 401
    smart_bridge.partners.revoke("practice-a")
    assert requests.get(f"{smart_bridge.base}/Communication", headers=hdr, timeout=10).status_code == 401
    assert smart_bridge.token(smart_bridge.assertion()).json()["error"] == "invalid_client"


def test_private_key_material_is_never_accepted_as_a_partner_key(tmp_path):
    key = _rsa()
    private_jwk = {**json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key)), "kid": "k"}
    with pytest.raises(InputError) as refused:
        check_jwks({"keys": [private_jwk]})
    assert refused.value.issues[0].rule == "partner:jwks-private"
    for bad in (
        {},
        {"keys": []},
        {"keys": [{"kty": "oct", "kid": "k", "k": "c2VjcmV0"}]},
        {"keys": [_jwk(key, "k"), _jwk(key, "k")]},
        {"keys": [{**_jwk(ec.generate_private_key(ec.SECP256R1()), "p256")}]},
    ):
        with pytest.raises(InputError):
            check_jwks(bad)
    public = check_jwks({"keys": [{**_jwk(key, "k"), "use": "sig", "x5c": ["..."]}]})
    assert set(public["keys"][0]) == {"kty", "kid", "n", "e", "alg"}  # public members only


def test_partners_add_with_a_jwks_file_and_key_rotation(tmp_path, monkeypatch, capsys):
    from fhir_kap.cli import main

    monkeypatch.delenv("FHIR_KAP_DATABASE_URL", raising=False)
    monkeypatch.delenv("FHIR_KAP_CONFIG", raising=False)
    monkeypatch.setenv("FHIR_KAP_DATA_DIR", str(tmp_path / "data"))
    first, second = tmp_path / "keys.json", tmp_path / "rotated.json"
    first.write_text(json.dumps({"keys": [_jwk(_rsa(), "2026-a")]}))
    second.write_text(json.dumps({"keys": [_jwk(_rsa(), "2026-b")]}))
    assert main(["partners", "add", "practice-a", "--jwks", str(first)]) == 0
    assert json.loads(capsys.readouterr().out)["partner"]["smart_key_ids"] == ["2026-a"]
    assert main(["partners", "jwks", "practice-a", str(second)]) == 0
    assert json.loads(capsys.readouterr().out)["smart_key_ids"] == ["2026-b"]
    leaked = tmp_path / "private.json"
    leaked.write_text(
        json.dumps({"keys": [{**json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(_rsa())), "kid": "x"}]})
    )
    assert main(["partners", "jwks", "practice-a", str(leaked)]) != 0
    assert "partner:jwks-private" in capsys.readouterr().err
    assert not Path(tmp_path / "data").joinpath("private.json").exists()


def test_an_assertion_replayed_inside_the_expiry_leeway_is_still_refused(smart_bridge):
    now = int(time.time())
    assertion = smart_bridge.assertion(exp=now - 10, iat=now - 200)  # expired, but within the 30 s leeway
    assert smart_bridge.token(assertion).status_code == 200
    smart_bridge.token(smart_bridge.assertion())  # another grant purges what has expired
    again = smart_bridge.token(assertion)
    assert again.status_code == 400 and again.json()["error"] == "invalid_grant"


def test_unknown_keys_and_forged_signatures_get_the_same_answer(smart_bridge):
    now = int(time.time())
    claims = {"iss": "practice-a", "sub": "practice-a", "aud": smart_bridge.token_url, "exp": now + 60}
    forged = jwt.encode(
        {**claims, "jti": "f"}, smart_bridge.keys["stranger"], algorithm="RS384", headers={"kid": "rsa-1"}
    )
    unknown = jwt.encode(
        {**claims, "jti": "u"}, smart_bridge.keys["rsa-1"], algorithm="RS384", headers={"kid": "nope"}
    )
    nobody = smart_bridge.assertion(iss="nobody")
    answers = {smart_bridge.token(a).json()["error_description"] for a in (forged, unknown, nobody)}
    assert len(answers) == 1


def test_without_a_public_base_url_there_is_no_token_endpoint(tmp_path):
    """`aud` must be checked against a configured URL, never against the caller's Host header."""
    from fhir_kap.bridge import BridgeOptions, create_app
    from fhir_kap.config import load_settings

    app = create_app(load_settings(env={}, data_dir=tmp_path / "data"), BridgeOptions(notify=False))
    client = app.test_client()
    token = client.post(
        "/auth/token",
        data={"grant_type": "client_credentials"},
        headers={"Host": "other-smart_bridge.example"},
    )
    assert token.status_code == 404 and token.get_json(force=True)["resourceType"] == "OperationOutcome"
    assert client.get("/fhir/.well-known/smart-configuration").status_code == 404


def test_an_access_token_is_never_accepted_past_its_expiry_even_from_the_cache(tmp_path):
    partners = Partners(Database(f"sqlite:///{tmp_path / 'p.sqlite3'}"), cache_seconds=60)
    partner, _ = partners.add("practice-a")
    token = partners.grant(
        partner, ["system/Communication.read"], jti="j", assertion_expires=time.time(), now=time.time() - 299
    )  # one second left
    assert partners.authenticate(token) is not None  # and now cached ...
    time.sleep(1.3)
    assert partners.authenticate(token) is None  # ... but not past the token's own expiry


def test_a_key_that_cannot_verify_anything_is_refused_at_registration():
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    with pytest.raises(InputError, match="2048"):
        check_jwks({"keys": [_jwk(weak, "weak")]})
    with pytest.raises(InputError, match="usable"):
        check_jwks({"keys": [{"kty": "RSA", "kid": "junk", "n": "AQAB", "e": "!!"}]})


def test_a_wildcard_action_is_granted_to_a_partner_that_may_read_and_write(smart_bridge):
    got = smart_bridge.token(smart_bridge.assertion(), scope="system/Consent.* system/*.*").json()
    assert got["scope"] == "system/Consent.* system/*.*"  # practice-a holds system/*.read and system/*.write
    assert (
        smart_bridge.token(smart_bridge.assertion(), scope="")
        .json()["error_description"]
        .startswith("a scope is required")
    )


def test_keys_only_partners_get_no_long_lived_token(tmp_path, monkeypatch, capsys):
    from fhir_kap.cli import main

    monkeypatch.delenv("FHIR_KAP_DATABASE_URL", raising=False)
    monkeypatch.delenv("FHIR_KAP_CONFIG", raising=False)
    monkeypatch.setenv("FHIR_KAP_DATA_DIR", str(tmp_path / "data"))
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps({"keys": [_jwk(_rsa(), "k1")]}))
    assert main(["partners", "add", "practice-c", "--jwks", str(keys), "--keys-only"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert "token" not in out and out["partner"]["smart_key_ids"] == ["k1"]
    assert main(["partners", "add", "practice-d", "--keys-only"]) != 0  # nothing to sign with
    assert "partner:keys-only" in capsys.readouterr().err
