"""The consent gate's AuditEvent and Provenance are accepted by a real FHIR R4 server (SEKMET)."""

from __future__ import annotations

from datetime import date

import pytest
import requests

from fhir_kap.config import Release
from fhir_kap.consent import ConsentGate, Recipient, audit_event, provenance
from testkit.audit_cases import DIRECTORY, RECORDED, REQUESTS, load  # the same cases as the builders' tests


@pytest.mark.parametrize("consent,res,rec,purpose", REQUESTS)
def test_sekmet_accepts_audit_event_and_provenance(sekmet, consent, res, rec, purpose):
    resource = load(res)
    recipient = Recipient.parse(rec)
    decision = ConsentGate([load(consent)] + DIRECTORY).decide(resource, recipient, purpose, date(2024, 5, 1))
    docs = [audit_event(decision, resource, recipient, purpose, release=Release.R4, recorded=RECORDED)]
    if decision.permit:
        docs.append(
            provenance(
                f"{resource['resourceType']}/{resource['id']}",
                decision,
                release=Release.R4,
                recorded=RECORDED,
            )
        )
    for doc in docs:
        r = requests.post(
            f"{sekmet.base_url}/{doc['resourceType']}",
            json=doc,
            headers={"Content-Type": "application/fhir+json"},
            timeout=10,
        )
        assert r.status_code == 201, r.text[:500]
