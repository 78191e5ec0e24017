"""Issue 14 over real HTTP: the bridge's trust boundary, driven through `fhir-kap serve`.

The same findings the Flask-client tests cover (test_bridge_authorship, test_bridge_search_bounds,
test_bridge_ehr_inbound, test_consent_authority, test_consent_psythpn, test_partners), here against
one served bridge (2 workers, its defaults) with partners registered by `fhir-kap partners add`
and the clinic's Consent posted over HTTP:

- forged authorship: a practice's note whose sender is the clinic is 403 `bridge:authorship`
  naming `Communication.sender`; what it writes as itself carries `meta.source` naming it;
- amplification: 200 denied notes addressed to practice A; A's `_count=1` search writes at most
  K = max(20, 4 × _count) AuditEvents (docs/operations/search-and-audit.md), counted in the database;
- poison resource: deeper than `MAX_DEPTH` (64) is 400 `fhir:nesting` (a single create) or
  `bridge:nesting` (a transaction entry); the deepest accepted note reads back in search and history;
- consent authorities: another authority cannot take the clinic's Consent identifier
  (403 `bridge:identifier-owner`); re-posting an old active copy never undoes a revocation;
- PSYTHPN anywhere: a note marked in an extension or modifierExtension is stored, never disclosed,
  and its denial is audited with reason `psychotherapy-note`;
- tokens: `partners rotate --grace` keeps both tokens working, then only the new one; a revoked
  name added anew gets a working token while the old ones stay 401 (the bridge caches token
  lookups 5 s per worker; a grace token's cache never outlives its expiry).
"""

from __future__ import annotations

import itertools
import json
import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import requests

from fhir_kap.jsonio import MAX_DEPTH, too_deep
from fhir_kap.storage.auditlog import reason_codes
from testkit.bridge import load
from testkit.serve import free_port, start_serve, stop

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
FHIR = "application/fhir+json"
RULE = "http://fhir-kap.example/StructureDefinition/rule"
NOTE_SYSTEM = "http://fhir-kap.example/sid/note"
CLINIC_SENDER = {"reference": "Organization/kap-clinic", "display": "KAP clinic"}
B_SENDER = {"reference": "Practitioner/other-therapist"}  # practice B writing as itself
AUTH_CACHE_SECONDS = 5.0  # BridgeOptions.auth_cache_seconds: fixed for `fhir-kap serve`
AUTHORITY_SCOPES = ("system/*.read", "system/*.write", "kap/consent-authority")
_SERIAL = itertools.count()


@dataclass
class Served:
    base: str
    data: Path
    env: dict[str, str]
    tokens: dict[str, str]

    def cli(self, *args: str) -> dict[str, Any]:
        done = subprocess.run(
            [sys.executable, "-m", "fhir_kap.cli", *args],
            cwd=ROOT,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr[-2000:]
        return dict(json.loads(done.stdout))

    def call(self, who: str, method: str, path: str, body: Any = None, **headers: str) -> requests.Response:
        token = self.tokens.get(who, who)  # a partner's key, or a token itself
        return requests.request(
            method,
            self.base + path,
            data=None if body is None else json.dumps(body),
            headers={"Authorization": f"Bearer {token}", "Content-Type": FHIR, "Accept": FHIR, **headers},
            timeout=30,
        )

    def audit_rows(self) -> int:
        """Rows in the append-only audit log (the data dir's SQLite database, opened read-only)."""
        with sqlite3.connect(f"file:{self.data / 'fhir-kap.sqlite3'}?mode=ro", uri=True) as db:
            return int(db.execute("SELECT COUNT(*) FROM audit_log").fetchone()[0])

    def audit_events_about(self, ref: str) -> list[tuple[str, dict[str, Any]]]:
        """(outcome column, AuditEvent) for every audit record naming `ref`."""
        with sqlite3.connect(f"file:{self.data / 'fhir-kap.sqlite3'}?mode=ro", uri=True) as db:
            rows = db.execute(
                "SELECT outcome, body FROM audit_log WHERE resource_type = 'AuditEvent' AND body LIKE ?",
                (f'%"{ref}"%',),
            ).fetchall()
        return [(str(outcome), json.loads(body)) for outcome, body in rows]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    data = tmp_path_factory.mktemp("trust-boundary")
    env = {
        **os.environ,
        "FHIR_KAP_DATA_DIR": str(data),
        "PYTHONPATH": str(ROOT),
        "FHIR_KAP_LOG_LEVEL": "WARNING",
    }
    for name in ("FHIR_KAP_DATABASE_URL", "FHIR_KAP_FHIR_VERSION", "FHIR_KAP_MAX_BODY_BYTES"):
        env.pop(name, None)
    served = Served("", data, env, {})

    def add(key: str, name: str, *args: str) -> None:
        served.tokens[key] = str(served.cli("partners", "add", name, *args)["token"])

    add(
        "clinic",
        "clinic-ehr",
        "--scopes",
        "system/*.*",
        "kap/clinic",
        "kap/records.write",
        "kap/referrals.write",
        "--reference",
        "Organization/kap-clinic",
    )
    add(
        "a",
        "practice-a",
        "--npi",
        "1234567893",
        "--reference",
        "Practitioner/ref-therapist",
        "PractitionerRole/ref-therapist-role",
    )
    add("b", "practice-b", "--npi", "1245319599", "--reference", "Practitioner/other-therapist")
    add("hub", "referrer-hub", "--npi", "1003000126", "--scopes", *AUTHORITY_SCOPES)
    port = free_port()
    proc = start_serve(env, port, data / "serve.log", "--workers", "2")
    served.base = f"http://127.0.0.1:{port}"
    try:
        # the clinic's release: session-dates to practice A's therapist, for TREAT, to 2099
        resp = served.call("clinic", "POST", "/fhir/Consent", load("Consent-open-ended.json"))
        assert resp.status_code == 201, resp.text[:1000]
        yield served
    finally:
        assert stop([proc]) == [0], (data / "serve.log").read_text()[-2000:]


def _rules(resp: requests.Response) -> list[str]:
    body = resp.json()
    assert body["resourceType"] == "OperationOutcome", body
    return [e["valueString"] for i in body["issue"] for e in i.get("extension", []) if e["url"] == RULE]


def _note(
    sender: dict[str, Any] | None = None,
    *,
    category: str = "session-dates",
    patient: str = "Patient/client-1",
    recipient: str = "Practitioner/ref-therapist",
) -> dict[str, Any]:
    """Practice A's client's note (tests/data/bridge), a business identifier of its own."""
    note = load("Example-Communication-note-1.json")
    note["identifier"] = [{"system": NOTE_SYSTEM, "value": f"served-{next(_SERIAL)}-{time.time_ns()}"}]
    note["category"][0]["coding"][0]["code"] = category
    note["subject"] = {"reference": patient}
    note["recipient"] = [{"reference": recipient}]
    if sender is None:
        note.pop("sender", None)
    else:
        note["sender"] = sender
    return note


def _created(served: Served, who: str, resource: dict[str, Any]) -> dict[str, Any]:
    resp = served.call(who, "POST", f"/fhir/{resource['resourceType']}", resource)
    assert resp.status_code == 201, resp.text[:1000]
    return dict(resp.json())


def _identifier_count(served: Served, note: dict[str, Any]) -> int:
    ident = note["identifier"][0]
    page = served.call("clinic", "GET", f"/fhir/Communication?identifier={ident['system']}|{ident['value']}")
    assert page.status_code == 200, page.text[:500]
    return int(page.json()["total"])


# --- 2. forged authorship ---------------------------------------------------------------------


def test_forged_authorship__a_practice_cannot_write_as_the_clinic(served: Served) -> None:
    forged = _note(CLINIC_SENDER)
    resp = served.call("b", "POST", "/fhir/Communication", forged)
    assert resp.status_code == 403, resp.text[:1000]
    assert "bridge:authorship" in _rules(resp)
    assert resp.json()["issue"][0]["expression"] == ["Communication.sender"]
    assert _identifier_count(served, forged) == 0  # nothing stored
    # the clinic's organisation identifier is the clinic too
    by_identifier = _note(
        {
            "type": "Organization",
            "identifier": {"system": "http://fhir-kap.example/sid/org", "value": "kap-clinic"},
        }
    )
    resp = served.call("b", "POST", "/fhir/Communication", by_identifier)
    assert resp.status_code == 403 and "bridge:authorship" in _rules(resp), resp.text[:1000]


def test_forged_authorship__what_a_practice_writes_as_itself_names_it_in_meta_source(served: Served) -> None:
    own = _note(B_SENDER)
    own["meta"]["source"] = "urn:fhir-kap:partner:clinic-ehr"  # a claim of its own is replaced
    stored = _created(served, "b", own)
    assert stored["meta"]["source"] == "urn:fhir-kap:partner:practice-b"
    assert _identifier_count(served, own) == 1  # (what the forged note's count of 0 is measured by)
    filled = _created(served, "b", _note())  # no sender: filled with the partner's own identity
    assert filled["sender"] == B_SENDER
    for rid in (stored["id"], filled["id"]):
        # the writer reads it back; the addressed practice (the clinic's consent permits
        # session-dates to its therapist) sees who wrote it: not the clinic's systems
        for reader in ("b", "a"):
            got = served.call(reader, "GET", f"/fhir/Communication/{rid}")
            assert got.status_code == 200, (reader, got.text[:500])
            assert got.json()["meta"]["source"] == "urn:fhir-kap:partner:practice-b"


# --- 3. amplification --------------------------------------------------------------------------


def test_amplification__a_count_1_search_over_200_denied_notes_audits_a_bounded_number(
    served: Served,
) -> None:
    # practice B addresses 200 notes to practice A's therapist in a category the clinic's consent
    # does not permit (safety), in one transaction
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "fullUrl": f"urn:uuid:00000000-0000-4000-8000-{i:012d}",
                "resource": _note(B_SENDER, category="safety"),
                "request": {"method": "POST", "url": "Communication"},
            }
            for i in range(200)
        ],
    }
    resp = served.call("b", "POST", "/fhir", bundle)
    assert resp.status_code == 200, resp.text[:1000]
    assert [e["response"]["status"][:3] for e in resp.json()["entry"]] == ["201"] * 200
    bound = max(20, 4 * 1)  # K = max(20, 4 × _count), docs/operations/search-and-audit.md
    for _ in range(2):  # the same search again costs the same, not more
        before = served.audit_rows()
        started = time.monotonic()
        page = served.call("a", "GET", "/fhir/Communication?_count=1")
        elapsed = time.monotonic() - started
        assert page.status_code == 200, page.text[:500]
        written = served.audit_rows() - before
        assert 0 < written <= bound, (written, elapsed)
        body = page.json()
        assert body["type"] == "searchset" and len(body.get("entry", [])) <= 1
        # not every candidate was decided: no estimated total, and a next link to go on
        assert "total" not in body
        assert any(link["relation"] == "next" for link in body["link"])
    # practice B's notes addressed elsewhere are never practice A's candidates: nothing decided
    before = served.audit_rows()
    page = served.call("a", "GET", "/fhir/Communication?recipient=Practitioner/other-therapist&_count=1")
    assert page.status_code == 200 and served.audit_rows() == before


# --- 4. poison resource ------------------------------------------------------------------------


def _deep_note(levels: int) -> dict[str, Any]:
    note = _note(B_SENDER)
    ext: dict[str, Any] = {"url": "https://ehr.example.org/x", "valueString": "v"}
    for _ in range(levels):
        ext = {"url": "https://ehr.example.org/x", "extension": [ext]}
    note["extension"] = [ext]
    return note


def test_poison_resource__too_deep_is_400_and_the_deepest_accepted_reads_back(served: Served) -> None:
    deepest = next(n for n in range(200) if too_deep(_deep_note(n + 1), MAX_DEPTH))
    for levels in (deepest + 1, 125):  # just past the limit, and the review's 125 levels
        note = _deep_note(levels)
        resp = served.call("b", "POST", "/fhir/Communication", note)
        assert resp.status_code == 400, resp.text[:500]
        assert "fhir:nesting" in _rules(resp) and resp.json()["issue"][0]["code"] == "too-costly"
        assert _identifier_count(served, note) == 0
    entry = {"resource": _deep_note(deepest + 1), "request": {"method": "POST", "url": "Communication"}}
    resp = served.call(
        "b", "POST", "/fhir", {"resourceType": "Bundle", "type": "transaction", "entry": [entry]}
    )
    assert resp.status_code == 400, resp.text[:500]
    assert "bridge:nesting" in _rules(resp)  # the documented rule for a Bundle entry
    # the deepest note accepted, addressed to practice A (permitted): every Bundle that wraps it
    # still answers, for its writer, its recipient and the clinic
    rid = _created(served, "b", _deep_note(deepest))["id"]
    for who in ("b", "a", "clinic"):
        search = served.call(who, "GET", f"/fhir/Communication?_id={rid}")
        assert search.status_code == 200, (who, search.text[:500])
        assert [e["resource"]["id"] for e in search.json().get("entry", [])] == [rid], who
        history = served.call(who, "GET", f"/fhir/Communication/{rid}/_history")
        assert history.status_code == 200, (who, history.text[:500])
        assert history.json()["type"] == "history"
        assert served.call(who, "GET", f"/fhir/Communication/{rid}").status_code == 200
        assert served.call(who, "GET", "/fhir/Communication?_count=50").status_code == 200


# --- 5. consent authorities scoped -------------------------------------------------------------


def test_consent_authority__another_authority_cannot_take_the_clinics_consent_identifier(
    served: Served,
) -> None:
    rid = _created(served, "clinic", _note(CLINIC_SENDER))["id"]
    assert served.call("a", "GET", f"/fhir/Communication/{rid}").status_code == 200
    takeover = load("Consent-open-ended.json")  # the clinic's identifier consent-1 ...
    takeover["status"] = "inactive"  # ... as a revocation
    takeover["dateTime"] = "2025-06-01"
    resp = served.call("hub", "POST", "/fhir/Consent", takeover)
    assert resp.status_code == 403, resp.text[:500]
    assert "bridge:identifier-owner" in _rules(resp)
    assert resp.json()["issue"][0]["expression"] == ["Consent.identifier"]
    hub_consents = served.call("hub", "GET", "/fhir/Consent")
    assert hub_consents.status_code == 200 and hub_consents.json()["total"] == 0  # nothing stored
    assert served.call("a", "GET", f"/fhir/Communication/{rid}").status_code == 200  # the grant holds


def test_consent_authority__re_posting_the_old_active_copy_never_undoes_a_revocation(served: Served) -> None:
    active = load("Consent-open-ended.json")
    active["identifier"][0]["value"] = "served-monotonic"
    active["patient"] = {"reference": "Patient/client-served-2"}
    _created(served, "clinic", active)
    rid = _created(served, "clinic", _note(CLINIC_SENDER, patient="Patient/client-served-2"))["id"]
    assert served.call("a", "GET", f"/fhir/Communication/{rid}").status_code == 200
    _created(served, "clinic", dict(active, status="inactive"))
    assert served.call("a", "GET", f"/fhir/Communication/{rid}").status_code == 404
    _created(served, "clinic", active)  # the older active copy: stored (201) ...
    assert served.call("a", "GET", f"/fhir/Communication/{rid}").status_code == 404  # ... ignored
    _created(served, "clinic", dict(active, dateTime="2025-06-01"))  # signed later: reactivates
    assert served.call("a", "GET", f"/fhir/Communication/{rid}").status_code == 200


# --- 7. PSYTHPN anywhere -----------------------------------------------------------------------


@pytest.mark.parametrize("element", ["modifierExtension", "extension"])
def test_psythpn_anywhere__a_marked_note_is_stored_but_never_disclosed(served: Served, element: str) -> None:
    control = _created(served, "clinic", _note(CLINIC_SENDER))["id"]
    marked = _note(CLINIC_SENDER)
    marked[element] = [
        {
            "url": "http://example.org/fhir/StructureDefinition/label",
            "valueCoding": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "PSYTHPN"},
        }
    ]
    rid = _created(served, "clinic", marked)["id"]
    assert served.call("clinic", "GET", f"/fhir/Communication/{rid}").status_code == 200  # stored
    assert served.call("a", "GET", f"/fhir/Communication/{control}").status_code == 200
    resp = served.call("a", "GET", f"/fhir/Communication/{rid}")
    assert resp.status_code == 404, resp.text[:500]
    assert resp.json()["resourceType"] == "OperationOutcome"
    search = served.call("a", "GET", f"/fhir/Communication?_id={rid},{control}")
    assert search.status_code == 200
    assert [e["resource"]["id"] for e in search.json().get("entry", [])] == [control]
    events = served.audit_events_about(f"Communication/{rid}")
    # AuditEvent outcome 4 is a deny, 0 a permit (`fhir-kap audit --outcome`): the read and the
    # search each decided it, denied it for the psychotherapy note, and never permitted it
    assert sorted(outcome for outcome, _ in events) == ["4", "4"], events
    assert all("psychotherapy-note" in reason_codes(event) for _, event in events), events


# --- 9. token rotation and re-adding a revoked name --------------------------------------------


def _status(served: Served, token: str) -> int:
    return served.call(token, "GET", "/fhir/Communication?_count=1").status_code


def _statuses(served: Served, token: str, n: int = 4) -> set[int]:
    """Several requests (new connections: both workers are likely asked)."""
    return {_status(served, token) for _ in range(n)}


def test_token_rotation_with_grace__then_revoke_and_add_the_name_again(served: Served) -> None:
    # a partner whose first token has never been used: no worker has it cached, so it works after
    # the rotation through the grace alone
    first = str(served.cli("partners", "add", "practice-r", "--reference", "Practitioner/r")["token"])
    rotated = served.cli("partners", "rotate", "practice-r", "--grace", "3")
    second = str(rotated["token"])
    valid_until = datetime.fromisoformat(rotated["old_token_valid_until"].replace("Z", "+00:00")).timestamp()
    assert valid_until - time.time() <= 3.0
    assert _statuses(served, first) == {200}  # within the grace, both work
    assert _statuses(served, second) == {200}
    # `old_token_valid_until` is given to the second; a grace token is never cached past its expiry
    time.sleep(max(0.0, valid_until + 1.2 - time.time()))
    old = served.call(first, "GET", "/fhir/Communication?_count=1")
    assert old.status_code == 401 and "auth:bearer" in _rules(old)
    assert _statuses(served, first) == {401}
    assert _statuses(served, second) == {200}
    last_used = time.monotonic()
    served.cli("partners", "revoke", "practice-r")
    third = str(served.cli("partners", "add", "practice-r", "--reference", "Practitioner/r")["token"])
    assert third not in (first, second)
    assert _statuses(served, third) == {200}  # a new token works at once (unknown ones are not cached)
    # the revoked token stops once no worker's cache (5 s from its last lookup) holds it
    time.sleep(max(0.0, last_used + AUTH_CACHE_SECONDS + 0.3 - time.monotonic()))
    assert _statuses(served, second) == {401}
    assert _statuses(served, first) == {401}
    assert _statuses(served, third) == {200}
