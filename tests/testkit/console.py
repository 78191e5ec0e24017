"""The console tests' helpers: an operator, a logged-in client, and seeded outbox items and consent
decisions (a dead letter, a held item, a denial with its reason) — shared by the integration tests
over the app, the browser test and the screenshots."""

from __future__ import annotations

import copy
import json
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

DATA = Path(__file__).resolve().parents[1] / "data"
NOTE = json.loads((DATA / "delivery" / "Communication-continuity-note.json").read_text())
#: A note text no console page may ever show (the tests search every page for it).
SECRET_TEXT = "ZEBRA-7741 client disclosed private matter"
PASSWORD = "correct horse battery staple"


def note(value: str, text: str = SECRET_TEXT) -> dict[str, Any]:
    res = copy.deepcopy(NOTE)
    res["identifier"][0]["value"] = value
    res["payload"] = [{"contentString": text}]
    return res


def enqueue(
    outbox: Any, value: str, *, endpoint: str = "practice-a", base_url: str = "http://fhir.test/fhir"
) -> Any:
    item, _ = outbox.enqueue(
        note(value),
        endpoint=endpoint,
        base_url=base_url,
        recipient_ref="Practitioner/ref-therapist",
        purpose="TREAT",
        consent_ref="Consent/consent-1/_history/1",
    )
    return item


def dead_letter(outbox: Any, value: str, **kw: Any) -> Any:
    """An item a worker gave up on (claimed, then dead with a 401 summary)."""
    item = enqueue(outbox, value, **kw)
    claimed = [i for i in outbox.claim("w-seed", 500) if i.id == item.id]
    assert claimed, "the seeded item was not due"
    assert outbox.mark_dead(claimed[0], "401 Unauthorized (login)", worker_id="w-seed")
    outbox.recover("w-seed")  # any other item the claim took is pending again
    return outbox.get(item.id)


def decision(
    audit: Any,
    *,
    permit: bool,
    reason: str,
    patient: str = "Patient/client-1",
    resource_id: str = "note-1",
    release: str = "R4",
    recorded: datetime | None = None,
) -> None:
    """A consent decision's AuditEvent, as the gate writes it."""
    from fhir_kap.config import Release
    from fhir_kap.consent.audit import audit_event
    from fhir_kap.consent.decide import Decision, Reason
    from fhir_kap.consent.recipients import Recipient

    resource = {"resourceType": "Communication", "id": resource_id, "subject": {"reference": patient}}
    dec = Decision(permit, (Reason(reason, f"{reason} (ids only)"),), "Consent/consent-1/_history/1")
    audit.append(
        audit_event(
            dec,
            resource,
            Recipient(reference="Practitioner/ref-therapist"),
            "TREAT",
            release=Release.parse(release),
            recorded=recorded or datetime.now(UTC),
        )
    )


def csrf_of(html: str) -> str:
    m = re.search(r'name="csrf" value="([^"]+)"', html)
    assert m, "no CSRF field on the page"
    return m.group(1)


def login(client: Any, name: str = "alice", password: str = PASSWORD) -> Any:
    page = client.get("/console/login")
    return client.post(
        "/console/login",
        data={"csrf": csrf_of(page.get_data(as_text=True)), "name": name, "password": password},
    )
