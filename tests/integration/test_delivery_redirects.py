"""Delivery never follows a redirect, over real HTTP: a partner endpoint answering
`307 Location: <elsewhere>` must not make the worker re-POST the note (patient data) there.
Two local servers (tests/testkit/brokenserver.py `FaultFront`): one redirects, the other records
whatever reaches it and must stay empty."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fhir_kap.client import FhirClient, RetryPolicy, SmartBackendAuth
from fhir_kap.errors import ServerError
from fhir_kap.exchange.delivery import Backoff, DeliveryWorker
from fhir_kap.storage.outbox import Outbox
from testkit.brokenserver import FaultFront

NOTE = json.loads(
    (
        Path(__file__).resolve().parents[1] / "data" / "delivery" / "Communication-continuity-note.json"
    ).read_text()
)


@pytest.fixture
def sink():
    with FaultFront("record") as front:
        yield front


@pytest.fixture
def redirector(sink):
    with FaultFront("redirect", redirect_to=sink.base_url) as front:
        yield front


def test_307_from_the_endpoint__the_redirect_target_receives_nothing(db, sink, redirector):
    outbox = Outbox(db)
    item, _ = outbox.enqueue(
        NOTE,
        endpoint="practice-a",
        base_url=redirector.base_url,
        recipient_ref="Practitioner/ref-therapist",
        purpose="TREAT",
    )
    worker = DeliveryWorker(
        outbox,
        lambda name: FhirClient(redirector.base_url, retry=RetryPolicy(attempts=3, base=0)),
        consent_check=lambda item: (True, "permitted"),
        worker_id="w-test",
        backoff=Backoff(base=10, cap=300, jitter=0),
    )
    stats = worker.run_once()
    dead = outbox.get(item.id)
    assert [r.method for r in redirector.received] == ["POST"]
    assert sink.received == []
    assert (stats.dead, dead.state) == (1, "dead")
    assert f"307 Temporary Redirect to 127.0.0.1:{sink.port}, refused" in dead.last_error


@pytest.mark.parametrize("call", ["create", "read", "search", "metadata"])
def test_client__no_call_follows_a_redirect(sink, redirector, call):
    client = FhirClient(redirector.base_url, retry=RetryPolicy(attempts=2, base=0))
    actions = {
        "create": lambda: client.create(NOTE, if_none_exist="identifier=x|1"),
        "read": lambda: client.read("Communication", "c1"),
        "search": lambda: list(client.search("Communication", {"identifier": "x|1"})),
        "metadata": lambda: client.capabilities(),
    }
    with pytest.raises(ServerError) as caught:
        actions[call]()
    assert caught.value.status == 307 and not caught.value.retryable
    assert len(redirector.received) == 1 and sink.received == []


def test_raw__returns_the_redirect_unfollowed_for_the_check_to_see(sink, redirector):
    resp = FhirClient(redirector.base_url).raw("POST", "Communication", json=NOTE)
    assert resp.status_code == 307 and resp.headers["Location"].startswith(sink.base_url)
    assert sink.received == []


def test_smart_token_request__never_redirected(sink, redirector):
    auth = SmartBackendAuth("kap-client", client_secret="s3cret", token_url=f"{redirector.base_url}/token")
    with pytest.raises(ServerError, match="token endpoint: 307") as caught:
        FhirClient(redirector.base_url, auth=auth).read("Patient", "p1")
    assert caught.value.status == 307
    assert sink.received == [] and len(redirector.received) == 1
