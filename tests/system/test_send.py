"""`fhir-kap send` → `fhir-kap deliver` against a real SEKMET: consent-gated, labelled, audited."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest
import requests

from fhir_kap.cli import main

ROOT = Path(__file__).resolve().parents[2]
RECORDS = ROOT / "profiles" / "examples" / "records"
DATA = Path(__file__).resolve().parents[1] / "data" / "send"
CONTEXT = [
    "client-client-0001.json",
    "practitioner-prac-ther-01.json",
    "organization-org-practice-01.json",
    "practitioner-role-role-ther-01.json",
]


def _record(name: str) -> dict:
    return json.loads((RECORDS / name).read_text())


def _consent(status: str = "active") -> dict:
    """The sample consent, valid from a month ago to a year from today."""
    today = dt.date.today()
    return dict(
        _record("consent-consent-0001.json"),
        status=status,
        period={"start": str(today - dt.timedelta(days=30)), "end": str(today + dt.timedelta(days=365))},
    )


@pytest.fixture
def env(tmp_path, monkeypatch, sekmet):
    monkeypatch.setenv("FHIR_KAP_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.delenv("FHIR_KAP_CONFIG", raising=False)
    monkeypatch.delenv("FHIR_KAP_DATABASE_URL", raising=False)
    ctx = tmp_path / "context.ndjson"
    ctx.write_text("".join(json.dumps(_record(n)) + "\n" for n in CONTEXT) + json.dumps(_consent()) + "\n")
    return tmp_path, sekmet.base_url, ctx


def _send(capsys, base: str, *files: str) -> tuple[int, list[dict]]:
    rc = main(["send", "--to", base, *files])
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.strip()]
    return rc, lines


def _on_server(base: str, system_value: str) -> list[dict]:
    bundle = requests.get(f"{base}/Communication", params={"identifier": system_value}, timeout=10).json()
    return [e["resource"] for e in bundle.get("entry") or []]


def test_send__permitted_note_is_queued_labelled_and_delivered_once(env, capsys):
    tmp, base, ctx = env
    note = str(RECORDS / "note-note-0001.json")
    rc, lines = _send(capsys, base, str(ctx), note)
    assert rc == 0
    assert [x["outcome"] for x in lines] == ["context"] * 5 + ["queued"]
    assert lines[-1]["deliveries"][0]["consent"].startswith("Consent/consent-0001")
    rc, lines = _send(capsys, base, note)  # sent again: the same outbox item, not a second one
    assert lines[0]["outcome"] == "already-queued" and lines[0]["deliveries"][0]["state"] == "pending"
    assert main(["deliver", "--once"]) == 0
    capsys.readouterr()
    held = _on_server(base, "http://fhir-kap.example/sid/note|note-0001")
    assert len(held) == 1
    labels = {(c["system"].rsplit("/", 1)[1], c["code"]) for c in held[0]["meta"]["security"]}
    assert {("v3-Confidentiality", "R"), ("v3-ActCode", "PSY")} <= labels


def test_send__every_decision_is_audited_and_a_permit_gets_a_provenance(env, capsys):
    tmp, base, ctx = env
    _send(
        capsys,
        base,
        str(ctx),
        str(RECORDS / "note-note-0002.json"),
        str(DATA / "note-to-unnamed-recipient.json"),
    )
    from fhir_kap.storage.auditlog import AuditLog
    from fhir_kap.storage.db import Database

    log = AuditLog(Database(f"sqlite:///{tmp / 'data' / 'fhir-kap.sqlite3'}"))
    events = log.query(resource_type="AuditEvent")
    assert len(events) == 2
    provenances = log.query(resource_type="Provenance")
    assert len(provenances) == 1
    assert provenances[0]["policy"][0].startswith("Consent/consent-0001")
    assert provenances[0]["target"][0]["reference"] == "Communication/note-0002"


@pytest.mark.parametrize(
    "name, rule",
    [
        ("note-transcript.json", "kap-note-1"),
        ("note-to-unnamed-recipient.json", "recipient-not-named"),
    ],
)
def test_send__refusals_are_explicit_and_nothing_is_queued(env, capsys, name, rule):
    tmp, base, ctx = env
    rc, lines = _send(capsys, base, str(ctx), str(DATA / name))
    assert rc == 1
    last = lines[-1]
    assert last["outcome"] == "refused"
    reasons = last.get("reasons") or last["deliveries"][0]["reasons"]
    assert rule in {r.get("rule") or r.get("code") for r in reasons}
    assert main(["outbox", "list", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["items"] == []


def test_send__revocation_before_delivery_holds_the_queued_note(env, capsys, tmp_path):
    tmp, base, ctx = env
    rc, lines = _send(capsys, base, str(ctx), str(RECORDS / "note-note-0003.json"))
    assert lines[-1]["outcome"] == "queued"
    revoked = tmp_path / "revoked.json"
    revoked.write_text(json.dumps(_consent("inactive")))
    _send(capsys, base, str(revoked))
    assert main(["deliver", "--once"]) == 0
    capsys.readouterr()
    assert main(["outbox", "list", "--json"]) == 0
    items = json.loads(capsys.readouterr().out)["items"]
    assert [i["state"] for i in items] == ["held"]
    assert _on_server(base, "http://fhir-kap.example/sid/note|note-0003") == []


def test_send__without_a_target_says_where_to_send(env, capsys):
    tmp, base, ctx = env
    assert main(["send", str(ctx)]) == 2
    assert "--to" in capsys.readouterr().err


def _queued_resource(capsys) -> dict:
    assert main(["outbox", "show", "1", "--resource", "--json"]) == 0
    return json.loads(capsys.readouterr().out)["resource"]


def test_send__a_fhir_resource_is_rebuilt_from_its_record__contained_text_and_note_never_leave(env, capsys):
    tmp, base, ctx = env
    hostile = ROOT / "tests" / "data" / "hostile" / "Communication-with-contained-and-text.json"
    rc, lines = _send(capsys, base, str(ctx), str(hostile))
    assert lines[-1]["outcome"] == "queued"
    queued = _queued_resource(capsys)
    assert not {"contained", "text", "note"} & set(queued)


def test_send__recipient_must_be_one_the_note_is_addressed_to(env, capsys):
    tmp, base, ctx = env
    rc = main(
        [
            "send",
            "--to",
            base,
            "--recipient",
            "Practitioner/prac-presc-01",
            str(ctx),
            str(RECORDS / "note-note-0001.json"),
        ]
    )
    last = [json.loads(x) for x in capsys.readouterr().out.splitlines()][-1]
    assert rc == 1 and last["reasons"][0]["rule"] == "outbound:recipient"


def test_send__configured_endpoint_takes_only_the_recipients_it_lists(env, capsys, monkeypatch):
    tmp, base, ctx = env
    cfg = tmp / "kap.toml"
    cfg.write_text(
        f'[endpoints.practice-b]\nbase_url = "{base}"\nrecipients = ["Practitioner/prac-other-01"]\n'
    )
    monkeypatch.setenv("FHIR_KAP_CONFIG", str(cfg))
    rc, lines = _send(capsys, "practice-b", str(ctx), str(RECORDS / "note-note-0001.json"))
    assert rc == 1 and lines[-1]["reasons"][0]["rule"] == "outbound:endpoint-recipient"


def test_send__plain_http_to_another_host_is_refused(env, capsys):
    tmp, base, ctx = env
    assert main(["send", "--to", "http://ehr.example.org/fhir", str(RECORDS / "note-note-0001.json")]) == 2
    assert "https" in capsys.readouterr().err
