"""Fixtures shared by the integration tests of the operator console (test_console.py and the
red-team input tests): an operator and a logged-in client over the bridge app's test client."""

from __future__ import annotations

import pytest

from fhir_kap.bridge.app import services
from fhir_kap.storage.operators import Operators
from testkit.console import PASSWORD, login


@pytest.fixture
def console(bridge):
    """The bridge with operator alice and the console's cookie usable over the test client's http."""
    bridge.app.config["FHIR_KAP_CONSOLE_SECURE_COOKIE"] = False  # http://localhost only (loopback)
    with bridge.app.app_context():
        Operators(services().db).add("alice", PASSWORD)
    return bridge


@pytest.fixture
def op(console):
    """A client logged in as alice."""
    client = console.app.test_client()
    assert login(client).status_code == 303
    return client
