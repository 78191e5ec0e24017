"""Precise fault injection with `responses`: retries, Retry-After, timeouts, resets, error
mapping, token renewal, next-link loops, redirects (never followed) and garbled 2xx answers. Happy paths run against SEKMET (test_client_sekmet)."""

from __future__ import annotations

import email.utils
import json
import time
from pathlib import Path

import pytest
import requests
import responses
from responses import matchers

from fhir_kap.client import BearerAuth, FhirClient, RetryPolicy, SmartBackendAuth, identifier_query
from fhir_kap.client.answers import RedirectRefused, UnreadableAnswer
from fhir_kap.errors import ServerError

DATA = Path(__file__).resolve().parents[1] / "data" / "client"
BASE = "http://fhir.test/fhir"
TOKEN_URL = "http://fhir.test/auth/token"


def load(name: str) -> dict:
    return json.loads((DATA / name).read_text())


class Sleeps(list):
    """An injected `sleep` that records the waits instead of sleeping."""

    def __call__(self, seconds: float) -> None:
        self.append(seconds)


@pytest.fixture
def sleeps() -> Sleeps:
    return Sleeps()


@pytest.fixture
def client(sleeps) -> FhirClient:
    return FhirClient(
        BASE, sleep=sleeps, retry=RetryPolicy(attempts=4, base=0.5, cap=30, jitter=0.5), rand=lambda: 0.0
    )


@pytest.fixture
def rsps():
    with responses.RequestsMock(assert_all_requests_are_fired=True) as mock:
        yield mock


def created(rsps, status: int = 201) -> None:
    body = dict(load("Patient-client.json"), id="srv-1", meta={"versionId": "1"})
    rsps.add(
        responses.POST,
        f"{BASE}/Patient",
        json=body,
        status=status,
        headers={"Location": f"{BASE}/Patient/srv-1/_history/1", "ETag": 'W/"1"'},
    )


def test_503_then_201__is_retried_once_and_creates_one_resource(client, rsps, sleeps):
    patient = load("Patient-client.json")
    rsps.add(responses.POST, f"{BASE}/Patient", status=503)
    created(rsps)
    result = client.create(patient, if_none_exist=identifier_query(patient))
    assert (result.status, result.id, result.version_id, result.created) == (201, "srv-1", "1", True)
    assert len(rsps.calls) == 2 and sleeps == [0.5]
    assert (
        rsps.calls[1].request.headers["If-None-Exist"]
        == "identifier=http://fhir-kap.example/sid/clinic-mrn|MRN-0001"
    )
    assert rsps.calls[1].request.url == f"{BASE}/Patient"  # a header, not a query string


@pytest.mark.parametrize(
    "header, expected",
    [
        ("7", 7.0),
        ("HTTP-DATE+30", 30.0),  # built when the test runs, not when it is collected
    ],
    ids=["seconds", "http-date"],
)
def test_429__honours_retry_after(client, rsps, sleeps, header, expected):
    if header.startswith("HTTP-DATE+"):
        header = email.utils.formatdate(time.time() + int(header.split("+")[1]), usegmt=True)
    rsps.add(responses.GET, f"{BASE}/Patient/a", status=429, headers={"Retry-After": header})
    rsps.add(responses.GET, f"{BASE}/Patient/a", json={"resourceType": "Patient", "id": "a"})
    assert client.read("Patient", "a")["id"] == "a"
    assert len(sleeps) == 1 and expected - 1.5 <= sleeps[0] <= expected


def test_429__retry_after_longer_than_allowed_is_raised_as_retryable(client, rsps, sleeps):
    rsps.add(responses.GET, f"{BASE}/Patient/a", status=429, headers={"Retry-After": "3600"})
    with pytest.raises(ServerError) as err:
        client.read("Patient", "a")
    assert err.value.retryable is True and err.value.status == 429 and sleeps == []
    assert "Retry-After 3600 s" in err.value.summary


@pytest.mark.parametrize(
    "exc",
    [
        requests.exceptions.ReadTimeout,
        requests.exceptions.ConnectTimeout,
        requests.exceptions.ConnectionError,
        requests.exceptions.ChunkedEncodingError,
    ],
)
def test_network_failure__retried_then_server_error_retryable(client, rsps, sleeps, exc):
    for _ in range(4):
        rsps.add(responses.GET, f"{BASE}/Patient/a", body=exc("boom"))
    with pytest.raises(ServerError) as err:
        client.read("Patient", "a")
    assert err.value.retryable is True and err.value.status is None
    assert len(rsps.calls) == 4 and sleeps == [0.5, 1.0, 2.0]
    assert exc.__name__ in err.value.summary and err.value.url == f"{BASE}/Patient/a"


@pytest.mark.parametrize(
    "exc",
    [
        requests.exceptions.ConnectionError("Connection reset by peer"),
        requests.exceptions.ChunkedEncodingError("Connection broken"),
    ],
    ids=["reset", "chunked"],
)
def test_reset_mid_response__then_success_returns_the_answer(client, rsps, sleeps, exc):
    rsps.add(responses.GET, f"{BASE}/Patient/a", body=exc)
    rsps.add(responses.GET, f"{BASE}/Patient/a", json={"resourceType": "Patient", "id": "a"})
    assert client.read("Patient", "a") == {"resourceType": "Patient", "id": "a"}
    assert len(sleeps) == 1


@pytest.mark.parametrize(
    "exc, retried",
    [
        (requests.exceptions.ConnectTimeout("connect"), True),  # never reached the server: safe
        (requests.exceptions.ReadTimeout("read"), False),  # the create may have happened
        (requests.exceptions.ConnectionError("Connection reset by peer"), False),
    ],
    ids=["connect-timeout", "read-timeout", "reset"],
)
def test_unconditional_create__retried_only_when_never_sent(client, rsps, sleeps, exc, retried):
    rsps.add(responses.POST, f"{BASE}/Patient", body=exc)
    if retried:
        created(rsps)
        assert client.create(load("Patient-client.json")).id == "srv-1"
    else:
        with pytest.raises(ServerError) as err:
            client.create(load("Patient-client.json"))
        assert err.value.retryable is True and len(rsps.calls) == 1 and sleeps == []


@pytest.mark.parametrize("status", [400, 404, 409, 422, 500])
def test_error_status__not_retried_and_outcome_carried(client, rsps, sleeps, status):
    outcome = load("OperationOutcome-invalid.json")
    rsps.add(responses.POST, f"{BASE}/Communication", json=outcome, status=status)
    with pytest.raises(ServerError) as err:
        client.create(load("Communication-continuity-note.json"), if_none_exist="identifier=a|b")
    e = err.value
    assert len(rsps.calls) == 1 and sleeps == []
    assert (e.status, e.retryable, e.remote_outcome) == (status, False, outcome)
    assert e.summary.startswith(f"POST Communication: {status} ")
    assert "(server issues: " in e.summary and "at Communication.status" in e.summary
    assert "minimum required" not in str(e.operation_outcome())  # the server's free text stays out
    assert e.remote_outcome["issue"][0]["diagnostics"]  # and is kept on the error object
    assert e.operation_outcome()["issue"][1]["expression"] == ["Communication.status"]
    assert "Continuity note" not in str(e)  # the request body never appears


@pytest.mark.parametrize("status", [502, 503, 504])
def test_gateway_errors__retried_to_the_limit_then_retryable_error(client, rsps, sleeps, status):
    for _ in range(4):
        rsps.add(responses.GET, f"{BASE}/Patient", status=status)
    with pytest.raises(ServerError) as err:
        client.search_bundle("Patient", {"identifier": "sys|secret-mrn"})
    assert err.value.retryable is True and err.value.status == status and len(sleeps) == 3
    assert "secret-mrn" not in str(err.value) and err.value.url == f"{BASE}/Patient"


@pytest.mark.parametrize(
    "attempt, low, high",
    [(1, 0.5, 1.0), (2, 1.0, 2.0), (3, 2.0, 4.0), (6, 16.0, 32.0), (7, 20.0, 40.0), (20, 20.0, 40.0)],
)
def test_backoff__exponential_with_jitter_within_bounds(attempt, low, high):
    policy = RetryPolicy(base=1.0, cap=40.0, jitter=0.5)
    assert policy.backoff(attempt, lambda: 0.0) == high
    assert policy.backoff(attempt, lambda: 1.0) == low
    for _ in range(50):
        assert low <= policy.backoff(attempt) <= high


def test_backoff__client_waits_grow_exponentially(rsps, sleeps):
    c = FhirClient(BASE, sleep=sleeps, retry=RetryPolicy(attempts=5, base=1.0, cap=5.0, jitter=0.0))
    for _ in range(5):
        rsps.add(responses.GET, f"{BASE}/metadata", status=503)
    with pytest.raises(ServerError):
        c.capabilities()
    assert sleeps == [1.0, 2.0, 4.0, 5.0]


@pytest.mark.parametrize(
    "page2, message",
    [
        ("Bundle-searchset-page2-loops.json", "next links loop"),
        ("Bundle-searchset-page2-foreign.json", "another host"),
    ],
)
def test_search__refuses_a_next_link_loop_or_foreign_host(client, rsps, page2, message):
    rsps.add(
        responses.GET,
        f"{BASE}/Patient",
        json=load("Bundle-searchset-page1.json"),
        match=[matchers.query_param_matcher({"_count": "1"})],
    )
    rsps.add(
        responses.GET,
        f"{BASE}/Patient",
        json=load(page2),
        match=[matchers.query_param_matcher({"_count": "1", "_page": "2"})],
    )
    got = []
    with pytest.raises(ServerError) as err:
        for resource in client.search("Patient", {"_count": "1"}):
            got.append(resource["id"])
    assert got == ["a", "b"]  # included Organization skipped; each page read once
    assert message in err.value.summary and err.value.retryable is False


# ---- auth units


def token_reply(rsps, token: str, expires_in: int = 300) -> None:
    rsps.add(
        responses.POST,
        TOKEN_URL,
        json={"access_token": token, "token_type": "bearer", "expires_in": expires_in},
    )


def patient_reply(rsps, token: str, status: int = 200) -> None:
    rsps.add(
        responses.GET,
        f"{BASE}/Patient/a",
        status=status,
        json={"resourceType": "Patient", "id": "a"}
        if status == 200
        else load("OperationOutcome-invalid.json"),
        match=[matchers.header_matcher({"Authorization": f"Bearer {token}"})],
    )


def test_smart_token__cached_then_renewed_before_expiry(rsps):
    now = [1000.0]
    auth = SmartBackendAuth("c1", client_secret="s3cret", token_url=TOKEN_URL, clock=lambda: now[0])
    c = FhirClient(BASE, auth=auth)
    token_reply(rsps, "t1", expires_in=300)
    token_reply(rsps, "t2", expires_in=300)
    patient_reply(rsps, "t1")
    patient_reply(rsps, "t1")
    patient_reply(rsps, "t2")
    c.read("Patient", "a")
    now[0] += 269  # 300 s token, renewed 30 s (10%) early
    c.read("Patient", "a")
    now[0] += 2
    c.read("Patient", "a")
    assert auth.token_requests == 2
    token_calls = [call for call in rsps.calls if call.request.url == TOKEN_URL]
    assert token_calls[0].request.headers["Authorization"].startswith("Basic ")
    assert "grant_type=client_credentials" in token_calls[0].request.body


def test_smart_token__renewed_once_on_401(rsps):
    auth = SmartBackendAuth("c1", client_secret="s3cret", token_url=TOKEN_URL)
    c = FhirClient(BASE, auth=auth, sleep=lambda s: pytest.fail("401 must not back off"))
    token_reply(rsps, "revoked")
    patient_reply(rsps, "revoked", status=401)
    token_reply(rsps, "fresh")
    patient_reply(rsps, "fresh")
    assert c.read("Patient", "a")["id"] == "a"
    assert auth.token_requests == 2


def test_smart_token__second_401_is_an_error(rsps):
    auth = SmartBackendAuth("c1", client_secret="s3cret", token_url=TOKEN_URL)
    c = FhirClient(BASE, auth=auth)
    token_reply(rsps, "t1")
    patient_reply(rsps, "t1", status=401)
    token_reply(rsps, "t2")
    patient_reply(rsps, "t2", status=401)
    with pytest.raises(ServerError) as err:
        c.read("Patient", "a")
    assert err.value.status == 401 and auth.token_requests == 2


def test_private_key_jwt__assertion_claims_and_fresh_jti(rsps):
    import jwt
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP384R1())
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    auth = SmartBackendAuth("jwt-client", private_key_pem=pem, key_id="k1", alg="ES384", token_url=TOKEN_URL)
    c = FhirClient(BASE, auth=auth)
    for t in ("t1", "t2"):
        token_reply(rsps, t)
        patient_reply(rsps, t)
        c.read("Patient", "a")
        auth.invalidate()
    forms = [
        dict(x.split("=", 1) for x in call.request.body.split("&"))
        for call in rsps.calls
        if call.request.url == TOKEN_URL
    ]
    claims = []
    for form in forms:
        assertion = requests.utils.unquote(form["client_assertion"])
        assert jwt.get_unverified_header(assertion)["kid"] == "k1"
        claims.append(jwt.decode(assertion, key.public_key(), algorithms=["ES384"], audience=TOKEN_URL))
    assert all(cl["iss"] == cl["sub"] == "jwt-client" for cl in claims)
    assert all(0 < cl["exp"] - time.time() <= 300 for cl in claims)
    assert claims[0]["jti"] != claims[1]["jti"]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({}, "exactly one of client_secret or private_key_pem"),
        ({"client_secret": "a", "private_key_pem": b"x"}, "exactly one of"),
        ({"private_key_pem": b"not a pem", "key_id": "k"}, "not an unencrypted PEM key"),
        ({"private_key_pem": b"x"}, "needs key_id"),
        ({"client_secret": "a", "alg": "HS256"}, "alg must be RS384 or ES384"),
    ],
)
def test_smart_auth__bad_configuration_is_a_config_error(kwargs, message):
    from fhir_kap.errors import ConfigError

    with pytest.raises(ConfigError) as err:
        SmartBackendAuth("c1", **kwargs)
    assert message in str(err.value)


def test_bearer_auth__sends_header_and_hides_token(rsps):
    c = FhirClient(BASE, auth=BearerAuth("tok-123"))
    patient_reply(rsps, "tok-123")
    c.read("Patient", "a")
    assert "tok-123" not in repr(c)
    headers = rsps.calls[0].request.headers
    assert headers["Accept"] == "application/fhir+json" and headers["User-Agent"].startswith("fhir-kap/")


def test_error_module_examples():
    import doctest

    from fhir_kap import errors

    result = doctest.testmod(errors)
    assert result.attempted > 0 and result.failed == 0


def test_config_module_examples():
    import doctest

    from fhir_kap import config

    result = doctest.testmod(config)
    assert result.attempted > 0 and result.failed == 0


def test_answers_module_examples():
    import doctest

    from fhir_kap.client import answers

    result = doctest.testmod(answers)
    assert result.attempted > 0 and result.failed == 0


# ---- redirects (issue 14): never followed, by any call


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_create__a_redirect_is_an_error_naming_the_location_host_only(client, rsps, sleeps, status):
    rsps.add(
        responses.POST,
        f"{BASE}/Patient",
        status=status,
        headers={"Location": "http://evil.test/collect/Patient?identifier=mrn|MRN-0001"},
    )
    rsps.add(responses.POST, "http://evil.test/collect/Patient", status=201, json={"resourceType": "Patient"})
    rsps.add(responses.GET, "http://evil.test/collect/Patient", status=200, json={"resourceType": "Patient"})
    rsps.assert_all_requests_are_fired = False
    patient = load("Patient-client.json")
    with pytest.raises(RedirectRefused) as err:
        client.create(patient, if_none_exist=identifier_query(patient))
    assert len(rsps.calls) == 1 and sleeps == []
    e = err.value
    assert (e.status, e.retryable, e.location_host, e.downgrade) == (status, False, "evil.test", False)
    assert "to evil.test, refused (redirects are never followed)" in e.summary
    assert "collect" not in e.summary and "MRN-0001" not in e.summary and "MRN" not in str(e.url)


@pytest.mark.parametrize(
    "location, host, downgrade",
    [
        ("http://fhir.test/fhir/Patient", "fhir.test", True),  # same host, plain http
        ("https://fhir.test:8443/fhir/Patient", "fhir.test:8443", False),
        ("/other/Patient", "fhir.test", False),  # relative: resolved against the request
        (None, None, False),
    ],
)
def test_https_redirect__a_downgrade_is_named(rsps, location, host, downgrade):
    base = "https://fhir.test/fhir"
    rsps.add(
        responses.GET, f"{base}/Patient/a", status=308, headers={"Location": location} if location else {}
    )
    with pytest.raises(RedirectRefused) as err:
        FhirClient(base).read("Patient", "a")
    assert (err.value.location_host, err.value.downgrade) == (host, downgrade)
    assert ("https to plain http" in err.value.summary) is downgrade


def test_raw__returns_a_redirect_without_following_it(rsps):
    rsps.add(responses.GET, f"{BASE}/metadata", status=302, headers={"Location": "http://evil.test/x"})
    resp = FhirClient(BASE).raw("GET", "metadata")
    assert resp.status_code == 302 and len(rsps.calls) == 1


@pytest.mark.parametrize("where", ["discovery", "token"])
def test_smart_auth__discovery_and_token_requests_never_follow_a_redirect(rsps, where):
    evil = "http://evil.test/token"
    if where == "discovery":
        rsps.add(
            responses.GET,
            f"{BASE}/.well-known/smart-configuration",
            status=307,
            headers={"Location": "http://evil.test/.well-known/smart-configuration"},
        )
        auth = SmartBackendAuth("c1", client_secret="s3cret")
    else:
        rsps.add(responses.POST, TOKEN_URL, status=307, headers={"Location": evil})
        auth = SmartBackendAuth("c1", client_secret="s3cret", token_url=TOKEN_URL)
    with pytest.raises(RedirectRefused, match="evil.test, refused"):
        FhirClient(BASE, auth=auth).read("Patient", "a")
    assert len(rsps.calls) == 1


def test_conditional_read__asks_the_if_none_exist_condition_and_returns_the_matches(client, rsps):
    patient = load("Patient-client.json")
    query = identifier_query(patient)
    rsps.add(
        responses.GET,
        f"{BASE}/Patient",
        json={
            "resourceType": "Bundle",
            "type": "searchset",
            "entry": [
                {"resource": {"resourceType": "Patient", "id": "p1"}, "search": {"mode": "match"}},
                {"resource": {"resourceType": "Organization", "id": "o1"}, "search": {"mode": "include"}},
            ],
        },
        match=[
            matchers.query_param_matcher({"identifier": "http://fhir-kap.example/sid/clinic-mrn|MRN-0001"})
        ],
    )
    assert [r["id"] for r in client.conditional_read("Patient", query)] == ["p1"]


def test_garbled_2xx__is_an_unreadable_answer_carrying_its_status(client, rsps):
    rsps.add(
        responses.POST,
        f"{BASE}/Patient",
        status=201,
        body=b"\xff{garbled",
        content_type="application/fhir+json",
    )
    with pytest.raises(UnreadableAnswer) as err:
        client.create(load("Patient-client.json"), if_none_exist="identifier=x|1")
    assert err.value.status == 201 and "not JSON" in err.value.summary
