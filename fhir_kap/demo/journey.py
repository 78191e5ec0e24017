"""`fhir-kap demo`: the whole KAP journey through the real HTTP interfaces.

A local SEKMET FHIR R4 server plays the referring practice's EHR; the bridge runs under
gunicorn on SQLite; the delivery worker runs as `fhir-kap deliver --once`. The script:
the practice sends a referral and a signed release of information; the clinic moves the
referral's Task and records its sessions; continuity notes of each permitted category reach the
practice's EHR; a psychotherapy note, a note to a therapist the consent does not name, and a
note queued just before the client revokes consent are refused or held. Everything printed is
ids, codes and reasons — never clinical text.

Room: demo/ (layer 3, orchestration): may import layers 0-2.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..client import BearerAuth, FhirClient
from ..config import Settings, data_path
from ..storage.db import Database
from ..storage.partners import Partners
from .testserver import SekmetServer, free_port

__all__ = ["Journey", "run_demo", "EXPECTED_AT_PRACTICE"]

NOTE_SYSTEM = "http://fhir-kap.example/sid/note"
#: the Communications the practice's EHR must hold after the journey, and nothing else of ours
EXPECTED_AT_PRACTICE = ("note-0001", "note-0002", "note-0003", "note-0004")

PRACTICE_REFS = ["Practitioner/prac-ther-01", "Organization/org-practice-01", "PractitionerRole/role-ther-01"]
OTHER_THERAPIST = "Practitioner/prac-other-01"
CLINIC_SCOPES = ["system/*.*", "kap/clinic", "kap/records.write", "kap/referrals.write"]


@dataclass
class Event:
    seconds: float
    actor: str
    action: str
    outcome: str
    why: str = ""


@dataclass
class Journey:
    """The running demo: its servers, tokens and timeline."""

    root: Path
    out: Callable[[str], None] = print
    events: list[Event] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)
    ehr: SekmetServer | None = None
    bridge: subprocess.Popen[bytes] | None = None
    bridge_url: str = ""
    referral_id: str = ""
    env: dict[str, str] = field(default_factory=dict)

    # ---------------------------------------------------------------- plumbing

    def note(self, actor: str, action: str, outcome: str, why: str = "") -> None:
        ev = Event(time.monotonic() - self.started, actor, action, outcome, why)
        self.events.append(ev)
        self.out(f"  {ev.seconds:5.1f}s  {actor:<9} {action:<52} {outcome:<9} {why}".rstrip())

    def start(self) -> None:
        if self.root.exists():
            shutil.rmtree(self.root)
        self.root.mkdir(parents=True)
        self.out("Starting the practice's EHR (SEKMET, FHIR R4) and the fhir-kap bridge ...")
        self.ehr = SekmetServer(data_dir=self.root / "practice-ehr").start()
        data = self.root / "bridge"
        self.env = {**os.environ, "FHIR_KAP_DATA_DIR": str(data), "FHIR_KAP_FHIR_VERSION": "4.0.1"}
        for var in ("FHIR_KAP_DATABASE_URL", "FHIR_KAP_CONFIG"):
            self.env.pop(var, None)
        settings = Settings(data_dir=data)
        partners = Partners(Database(settings.db_url))
        _, self.practice_token = partners.add(
            "practice",
            scopes=["system/*.read", "system/*.write", "kap/consent-authority"],
            npis=["1234567893"],
            references=PRACTICE_REFS,
            endpoint_url=self.ehr.base_url,
            endpoint_auth="none",
        )
        _, self.other_token = partners.add(
            "other-practice",
            scopes=["system/*.read"],
            references=[OTHER_THERAPIST],
            endpoint_url=self.ehr.base_url,
            endpoint_auth="none",
        )
        _, self.clinic_token = partners.add("clinic-ehr", scopes=CLINIC_SCOPES)
        port = free_port()
        self.bridge_url = f"http://127.0.0.1:{port}"
        log = open(self.root / "bridge.log", "wb")
        self.bridge = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "fhir_kap.cli",
                "serve",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--workers",
                "1",
            ],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        probe = FhirClient(self.bridge_url)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.bridge.poll() is not None:
                raise RuntimeError(f"the bridge exited early; see {self.root / 'bridge.log'}")
            try:
                if probe.raw("GET", "/healthz").status_code == 200:
                    break
            except OSError:
                pass
            except Exception:  # noqa: BLE001 - connection refused while gunicorn boots
                pass
            time.sleep(0.2)
        else:
            raise RuntimeError("the bridge did not answer /healthz within 60 s")
        self.practice = FhirClient(self.bridge_url, auth=BearerAuth(self.practice_token))
        self.clinic = FhirClient(self.bridge_url, auth=BearerAuth(self.clinic_token))
        self.out(f"  practice EHR  {self.ehr.base_url}\n  bridge        {self.bridge_url}/fhir\n")

    def stop(self) -> None:
        if self.bridge and self.bridge.poll() is None:
            os.killpg(self.bridge.pid, signal.SIGTERM)
            try:
                self.bridge.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.bridge.pid, signal.SIGKILL)
        if self.ehr:
            self.ehr.stop()

    def fhir_post(self, who: FhirClient, actor: str, resource: dict[str, Any], label: str) -> dict[str, Any]:
        rtype = resource["resourceType"]
        resp = who.raw(
            "POST",
            f"/fhir/{rtype}",
            data=json.dumps(resource),
            headers={"Content-Type": "application/fhir+json"},
        )
        body = resp.json() if resp.content else {}
        outcome = {201: "stored", 200: "exists"}.get(resp.status_code, f"HTTP {resp.status_code}")
        self.note(
            actor, f"POST /fhir/{rtype} ({label})", outcome, _oo_text(body) if resp.status_code >= 400 else ""
        )
        return body

    def kap_post(self, records: list[dict[str, Any]], label: str) -> list[dict[str, Any]]:
        resp = self.clinic.raw(
            "POST",
            "/kap/records",
            data="\n".join(json.dumps(r) for r in records) + "\n",
            headers={"Content-Type": "application/x-ndjson"},
        )
        body = resp.json()
        if "results" not in body:
            self.note("clinic", f"POST /kap/records ({label})", f"HTTP {resp.status_code}", _oo_text(body))
            return []
        for rec, res in zip(records, body["results"]):
            self.note("clinic", f"{label}: {rec['record']} {rec['id']}", res["outcome"], _why(res))
        return list(body["results"])

    def practice_task(self) -> None:
        """What the referring practice sees of its referral: the Task's businessStatus."""
        focus = f"ServiceRequest/{self.referral_id}"
        bundle = self.practice.raw("GET", "/fhir/Task", params={"focus": focus}).json()
        status = [e["resource"]["businessStatus"]["coding"][0]["code"] for e in bundle.get("entry", [])]
        self.note("practice", "GET /fhir/Task?focus=<referral>", ",".join(status) or "none")

    def task_status(self, status: str) -> None:
        resp = self.clinic.raw(
            "POST",
            f"/kap/referrals/{self.referral_id}/status",
            data=json.dumps({"status": status}),
            headers={"Content-Type": "application/json"},
        )
        body = resp.json()
        shown = body.get("businessStatus") if resp.status_code == 200 else f"HTTP {resp.status_code}"
        self.note(
            "clinic",
            "referral Task → " + status,
            str(shown),
            "" if resp.status_code == 200 else _oo_text(body),
        )

    def deliver(self) -> dict[str, Any]:
        run = subprocess.run(
            [sys.executable, "-m", "fhir_kap.cli", "deliver", "--once", "--json"],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        try:
            stats = json.loads(run.stdout)
        except ValueError:
            stats = {"error": f"deliver exited {run.returncode}"}
        counts = stats.get("stats", stats)
        parts = [f"{k} {v}" for k, v in counts.items() if isinstance(v, int) and v and k != "claimed"]
        self.note("worker", "fhir-kap deliver --once", "ran", ", ".join(parts) or "nothing due")
        return stats

    def practice_sees(self) -> list[str]:
        """Identifier values of fhir-kap notes now held by the practice's EHR."""
        ehr = FhirClient(self.ehr.base_url if self.ehr else "")
        values = []
        for res in ehr.search("Communication", {"identifier": f"{NOTE_SYSTEM}|", "_count": "100"}):
            values += [i["value"] for i in res.get("identifier", []) if i.get("system") == NOTE_SYSTEM]
        return sorted(values)


def _oo_text(body: Any) -> str:
    if isinstance(body, dict) and body.get("resourceType") == "OperationOutcome":
        issue = (body.get("issue") or [{}])[0]
        rule = next(
            (e.get("valueString") for e in issue.get("extension", []) if e.get("url", "").endswith("/rule")),
            None,
        )
        text = (issue.get("details") or {}).get("text", "")
        return f"{rule}: {text}" if rule else text
    return ""


def _why(result: dict[str, Any]) -> str:
    reasons = list(result.get("reasons") or [])
    for d in result.get("deliveries") or []:
        reasons += d.get("reasons") or []
        if d.get("outcome") == "queued":
            return f"to {d.get('partner') or d.get('recipient')} (outbox item {d.get('outbox_item')})"
    if not reasons:
        return ""
    first = reasons[0]
    if not isinstance(first, dict):
        return str(first)
    return str(first.get("rule") or first.get("code") or "") + (
        ": " + first["message"] if first.get("message") else ""
    )


def _examples() -> tuple[Path, Path]:
    base = data_path("profiles") / "examples"
    return base / "records", base / "r4"


def _load(folder: Path, name: str) -> dict[str, Any]:
    return json.loads((folder / name).read_text())


def play(j: Journey) -> bool:
    """The scripted journey; returns True when the practice's EHR holds exactly the expected notes."""
    records, r4 = _examples()
    today = dt.date.today()
    j.out("Timeline (ids and codes only)")
    j.out(f"  {'t':>6}  {'actor':<9} {'what':<52} {'outcome':<9} why")

    for name in (
        "Patient-client-0001.json",
        "Practitioner-prac-ther-01.json",
        "Organization-org-practice-01.json",
        "PractitionerRole-role-ther-01.json",
    ):
        res = _load(r4, name)
        j.fhir_post(j.practice, "practice", res, f"{res['resourceType']}/{res['id']}")
    referral = _load(r4, "ServiceRequest-ref-0001.json")
    j.referral_id = j.fhir_post(j.practice, "practice", referral, "referral with clinical context").get(
        "id", ""
    )
    consent = _load(r4, "Consent-consent-0001.json")
    consent["dateTime"] = f"{today - dt.timedelta(days=1)}T15:00:00Z"
    consent["provision"]["period"] = {
        "start": str(today - dt.timedelta(days=1)),
        "end": str(today + dt.timedelta(days=365)),
    }
    consent_id = j.fhir_post(j.practice, "practice", consent, "signed release of information").get("id", "")
    j.practice_task()

    parties = [
        _load(records, n)
        for n in (
            "organization-org-clinic-01.json",
            "practitioner-prac-presc-01.json",
            "practitioner-prac-cther-01.json",
            "practitioner-role-role-presc-01.json",
            "practitioner-role-role-cther-01.json",
        )
    ]
    j.kap_post(parties, "clinic staff")
    j.task_status("accepted")
    sessions = [
        _load(records, f"session-{n}.json")
        for n in ("ses-intake-01", "ses-screen-01", "ses-prep-01", "ses-prep-02")
    ]
    j.kap_post(sessions, "session")
    j.task_status("scheduled")
    j.task_status("in-progress")
    j.kap_post(
        [
            _load(records, f"session-{n}.json")
            for n in ("ses-dose-01", "ses-dose-02", "ses-dose-03", "ses-integ-01", "ses-integ-02")
        ],
        "session",
    )

    notes = [_load(records, f"note-note-000{i}.json") for i in (1, 2, 3, 4)]
    for n in notes:
        n["sent"] = f"{today}T17:00:00Z"
    j.kap_post(notes, "continuity note")
    base = dict(notes[3])
    psychotherapy = dict(base, id="note-psy-01", category="psychotherapy-note")
    unnamed = dict(base, id="note-unnamed-01", recipients=[{"practitioner": "prac-other-01"}])
    j.kap_post([psychotherapy], "continuity note")
    j.kap_post([unnamed], "continuity note")
    j.deliver()

    followup = dict(base, id="note-followup-01")
    j.kap_post([followup], "continuity note")
    # the client revokes at the clinic: the clinic records a new state of that same consent
    revoked = dict(
        _load(records, "consent-consent-0001.json"),
        id=consent_id,
        status="inactive",
        period={"start": str(today - dt.timedelta(days=1)), "end": str(today + dt.timedelta(days=365))},
    )
    j.kap_post([revoked], "client revokes consent")
    j.deliver()
    j.task_status("completed")
    j.practice_task()

    held = j.practice_sees()
    ok = held == sorted(EXPECTED_AT_PRACTICE)
    j.out("")
    j.out(
        f"The practice's EHR holds {len(held)} continuity notes from fhir-kap: {', '.join(held) or 'none'}"
        f"  ({'as expected' if ok else 'UNEXPECTED: wanted ' + ', '.join(EXPECTED_AT_PRACTICE)})"
    )
    return ok


def run_demo(root: Path, *, once: bool, out: Callable[[str], None] = print) -> int:
    """Play the journey; with `once` stop everything and return, else keep serving until Ctrl-C."""
    j = Journey(root=root, out=out)
    try:
        j.start()
        ok = play(j)
        out("\nWhere to look")
        out(f"  bridge (FHIR facade)   {j.bridge_url}/fhir/metadata")
        out(f"  practice EHR           {j.ehr.base_url if j.ehr else ''}/Communication")
        me = sys.argv[0] if os.path.basename(sys.argv[0]) == "fhir-kap" else "fhir-kap"
        out(f"  outbox                 FHIR_KAP_DATA_DIR={root / 'bridge'} {me} outbox list")
        out(f"  audit trail            FHIR_KAP_DATA_DIR={root / 'bridge'} {me} audit")
        out(f"  bridge log             {root / 'bridge.log'}")
        if not once:
            out("\nServing until Ctrl-C ...")
            signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
            try:
                while True:
                    time.sleep(3600)
            except KeyboardInterrupt:
                out("stopping")
        return 0 if ok else 1
    finally:
        j.stop()
