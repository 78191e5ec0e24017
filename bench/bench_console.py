"""The operator console's pages under load (issue 16): p99 of each page with 100,000 outbox items
and 1,000,000 audit rows, beside a plain list query in the same run.

Seeding is a bulk insert (one transaction, `executemany`) of rows shaped like the real ones: outbox
items over four endpoints (80% delivered, 10% pending, 5% dead, 5% held) with a 1 KB note each,
and consent-decision AuditEvents as the gate writes them (R4, ~1.5 KB; 1 in 4 a deny, 20,000
patients, one year of `recorded`) with a Provenance for every permit. Each page is then asked for
`n` times through the bridge app (the Flask test client, a logged-in operator: the full request
path, session check and template included, no network). The baseline is the plain query of a list
page: `SELECT * FROM outbox_items ORDER BY id LIMIT 50`, timed the same way. Target: every page
≤ 200 ms p99 (the figure, not the ratio; the row's name says whether it was met). On SQLite,
and also on PostgreSQL (a schema of its own, ANALYZEd after the load) when FHIR_KAP_TEST_PG_URL
is set.

    python bench/bench_console.py            # 100,000 items, 1,000,000 audit rows
    python bench/bench_console.py --quick    # 10,000 / 100,000
"""

from __future__ import annotations

import json
import os
import re
import statistics
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
NOTE = ROOT / "tests" / "data" / "delivery" / "Communication-continuity-note.json"
TARGET_MS = 200.0
PASSWORD = "bench operator password"
ENDPOINTS = ("practice-a", "practice-b", "practice-c", "ehr-main")
T0 = 1_735_689_600.0  # 2025-01-01T00:00:00Z
YEAR = 365 * 86400.0


def _p99(samples: list[float]) -> float:
    return statistics.quantiles(samples, n=100, method="inclusive")[98] * 1000


def _seed_outbox(db: Any, n: int) -> None:
    base = json.loads(NOTE.read_text())
    base["payload"][0]["contentString"] = ("Session completed; integration planned. " * 25)[:900]
    template = json.dumps(base)
    rows = []
    for i in range(n):
        r = i % 20
        state = "delivered" if r < 16 else "pending" if r < 18 else "dead" if r == 18 else "held"
        ts = T0 + i * 60.0
        body = template.replace("NOTE-TEMPLATE", f"N-{i:07d}")
        rows.append(
            (
                ENDPOINTS[(i // 7) % len(ENDPOINTS)],  # not in step with the states
                "https://fhir.example/r4",
                "Communication",
                body,
                f"http://fhir-kap.example/sid/note|N-{i:07d}",
                f"Patient/p-{i % 20000}",
                "Practitioner/ref-therapist",
                "TREAT",
                "Consent/consent-1/_history/1",
                state,
                3 if state == "dead" else 1 if state == "delivered" else 0,
                ts,
                "401 Unauthorized (login)" if state == "dead" else None,
                "consent: outside-period" if state == "held" else None,
                f"srv-{i}" if state == "delivered" else None,
                ts + 5 if state == "delivered" else None,
                ts,
                ts,
            )
        )
    with db.transaction() as tx:
        tx.executemany(
            "INSERT INTO outbox_items (endpoint, base_url, resource_type, resource, idempotency_key, patient_ref, "
            "recipient_ref, purpose, consent_ref, state, attempts, next_attempt_at, last_error, hold_reason, "
            "server_id, delivered_at, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            rows,
        )


def _seed_audit(db: Any, n: int) -> None:
    from fhir_kap.config import Release
    from fhir_kap.consent.audit import audit_event
    from fhir_kap.consent.decide import Decision, Reason
    from fhir_kap.consent.recipients import Recipient
    from fhir_kap.storage.auditlog import extract

    def event(permit: bool) -> str:
        dec = Decision(
            permit, (Reason("permitted" if permit else "outside-period", "x"),), "Consent/c-PATIENT"
        )
        res = {"resourceType": "Communication", "id": "n-NOTE", "subject": {"reference": "Patient/p-PATIENT"}}
        when = datetime(2025, 1, 1, tzinfo=UTC)
        body = audit_event(
            dec, res, Recipient("Practitioner/ref-therapist"), "TREAT", release=Release.R4, recorded=when
        )
        return json.dumps(body)

    templates = {True: event(True), False: event(False)}
    prov = json.dumps(
        {
            "resourceType": "Provenance",
            "target": [{"reference": "Communication/n-NOTE"}],
            "recorded": "RECORDED",
            "policy": ["Consent/c-PATIENT"],
            "agent": [{"who": {"reference": "Organization/kap-clinic"}}],
            "entity": [{"role": "source", "what": {"reference": "Patient/p-PATIENT"}}],
        }
    )
    rows: list[tuple[Any, ...]] = []
    chunk = 50_000
    with db.transaction() as tx:
        written = k = 0  # rows written, decisions made (each permit adds a Provenance)
        while written < n:
            permit = k % 4 != 0
            patient = str((k * 7919) % 20_000)  # every patient, spread over the year
            epoch = T0 + (written / n) * YEAR
            recorded = datetime.fromtimestamp(epoch, UTC).isoformat(timespec="seconds")
            body = (
                templates[permit]
                .replace("2025-01-01T00:00:00+00:00", recorded)
                .replace("PATIENT", patient)
                .replace("NOTE", str(k))
            )
            if k < 2:  # the columns as extract() gives them
                rec = extract(json.loads(body))
                assert rec.patient == f"Patient/p-{patient}" and rec.outcome == ("0" if permit else "4")
            rows.append(
                (
                    "AuditEvent",
                    None,
                    recorded,
                    epoch,
                    f"Patient/p-{patient}",
                    "Practitioner/ref-therapist",
                    "0" if permit else "4",
                    f"Consent/c-{patient}",
                    body,
                )
            )
            written += 1
            if permit and written < n:
                pbody = prov.replace("RECORDED", recorded).replace("PATIENT", patient).replace("NOTE", str(k))
                rows.append(
                    (
                        "Provenance",
                        None,
                        recorded,
                        epoch,
                        f"Patient/p-{patient}",
                        None,
                        None,
                        f"Consent/c-{patient}",
                        pbody,
                    )
                )
                written += 1
            k += 1
            if len(rows) >= chunk:
                tx.executemany(_AUDIT_INSERT, rows)
                rows = []
        if rows:
            tx.executemany(_AUDIT_INSERT, rows)


_AUDIT_INSERT = (
    "INSERT INTO audit_log (resource_type, resource_id, recorded, recorded_epoch, patient, recipient, outcome, "
    "consent_ref, body) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
)


def _login(app: Any) -> Any:
    client = app.test_client()
    page = client.get("/console/login").get_data(as_text=True)
    csrf = re.search(r'name="csrf" value="([^"]+)"', page).group(1)  # type: ignore[union-attr]
    resp = client.post("/console/login", data={"csrf": csrf, "name": "bench", "password": PASSWORD})
    assert resp.status_code == 303 and resp.headers["Location"].endswith("/console/"), resp.status_code
    return client


def _time(fn: Any, n: int) -> list[float]:
    fn()  # warm: templates compiled, pages cached
    out = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def _database_url(kind: str, tmp: str) -> tuple[str, Any]:
    """A fresh database: a SQLite file in `tmp`, or a PostgreSQL schema of its own; and its cleanup."""
    if kind == "sqlite":
        return f"sqlite:///{tmp}/fhir-kap.sqlite3", lambda: None
    from fhir_kap.storage.db import Database

    url = os.environ["FHIR_KAP_TEST_PG_URL"]
    schema = "bench_" + uuid.uuid4().hex[:10]
    admin = Database(url)
    admin.execute(f"CREATE SCHEMA {schema}")

    def drop() -> None:
        admin.execute(f"DROP SCHEMA {schema} CASCADE")
        admin.close()

    return url + ("&" if "?" in url else "?") + f"options=-csearch_path%3D{schema}", drop


def measure(n_items: int, n_audit: int, n: int, kind: str = "sqlite") -> dict[str, Any]:
    from fhir_kap.bridge import BridgeOptions, create_app
    from fhir_kap.config import load_settings
    from fhir_kap.storage.auditlog import AuditLog
    from fhir_kap.storage.db import Database
    from fhir_kap.storage.operators import Operators
    from fhir_kap.storage.outbox import Outbox
    from fhir_kap.storage.partners import Partners

    tmp = tempfile.TemporaryDirectory(prefix="kap-bench-console-")
    url, cleanup = _database_url(kind, tmp.name)
    settings = load_settings(env={}, data_dir=Path(tmp.name), database_url=url)
    db = Database(settings.db_url)
    Outbox(db)
    AuditLog(db)
    for name in ("practice-a", "practice-b", "ehr-main"):
        Partners(db).add(name, webhook_url=f"https://{name}.example/hook")
    t = time.perf_counter()
    _seed_outbox(db, n_items)
    _seed_audit(db, n_audit)
    seeded = time.perf_counter() - t
    Operators(db).add("bench", PASSWORD)
    if kind == "postgresql":
        db.execute("ANALYZE")  # planner statistics after a bulk load, as autovacuum would gather
    db.close()
    app = create_app(settings, BridgeOptions(notify=False))
    app.config["FHIR_KAP_CONSOLE_SECURE_COOKIE"] = False
    client = _login(app)
    with app.app_context():
        from fhir_kap.bridge.app import services

        sv = services()
    dead_id = sv.outbox.list("dead", limit=1)[0].id
    mid = datetime.fromtimestamp(T0 + YEAR / 2, UTC).strftime("%Y-%m-%d")
    pages = {
        "overview": "/console/",
        "outbox, all, first page": "/console/outbox",
        "outbox, dead letters": "/console/outbox?state=dead",
        "outbox, held, one endpoint": "/console/outbox?state=held&endpoint=practice-b",
        "outbox, delivered, deep page": f"/console/outbox?state=delivered&after={n_items * 9 // 10}",
        "outbox item": f"/console/outbox/{dead_id}",
        "audit trail, newest": "/console/audit",
        "consent denials": "/console/audit?type=AuditEvent&outcome=deny",
        "audit by patient": "/console/audit?patient=Patient/p-1234",
        "audit by date (one day)": f"/console/audit?since={mid}&until={mid}",
        "audit, Provenance denials (none)": "/console/audit?type=Provenance&outcome=deny",
        "partners": "/console/partners",
        "notification queue": "/console/webhooks",
        "operator log": "/console/log",
    }
    results: dict[str, float] = {}
    for label, path in pages.items():

        def get(path: str = path) -> None:
            resp = client.get(path)
            assert resp.status_code == 200, (path, resp.status_code)

        results[label] = _p99(_time(get, n))
    baseline = _p99(_time(lambda: db_plain(sv.db), n))
    sv.db.close()
    cleanup()
    tmp.cleanup()
    return {"pages": results, "baseline": baseline, "seeded_s": seeded}


def db_plain(db: Any) -> None:
    db.query("SELECT * FROM outbox_items ORDER BY id LIMIT 50")


def run(quick: bool = False) -> list[dict]:
    """Rows: each console page's p99 (ms) beside the plain list query's p99 of the same run."""
    n_items, n_audit, n = (10_000, 100_000, 40) if quick else (100_000, 1_000_000, 200)
    kinds = ["sqlite"] + (["postgresql"] if os.environ.get("FHIR_KAP_TEST_PG_URL") else [])
    rows = []
    for kind in kinds:
        got = measure(n_items, n_audit, n, kind)
        for label, p99 in got["pages"].items():
            verdict = "ok" if p99 <= TARGET_MS else "MISSED"
            rows.append(
                {
                    "name": f"console {label} p99 ({kind}; {n_items:,} items, {n_audit:,} audit rows; "
                    f"≤{TARGET_MS:.0f} ms: {verdict})",
                    "value": p99,
                    "unit": "ms",
                    "baseline_name": f"plain list query p99 ({kind}, 50 outbox rows)",
                    "baseline": got["baseline"],
                    "target_ms": TARGET_MS,
                    "target_met": p99 <= TARGET_MS,
                }
            )
    return rows


if __name__ == "__main__":
    quick = "--quick" in sys.argv
    started = time.perf_counter()
    rows = run(quick=quick)
    width = max(len(r["name"]) for r in rows)
    print(f"{'figure':<{width}}  {'p99 ms':>8}  {'baseline ms':>11}  ratio")
    for r in rows:
        print(
            f"{r['name']:<{width}}  {r['value']:>8.2f}  {r['baseline']:>11.3f}  {r['value'] / r['baseline']:.1f}×"
        )
    print(f"\n{len(rows)} figures in {time.perf_counter() - started:.0f}s")
