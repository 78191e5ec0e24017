"""`fhir-kap deliver` and `fhir-kap outbox ...`: end to end through the command line, against
SEKMET with bearer auth configured from a settings file and an environment variable."""

from __future__ import annotations

import copy
import json
import uuid
from pathlib import Path

import pytest

from fhir_kap.cli import main
from fhir_kap.storage.auditlog import AuditLog
from fhir_kap.storage.db import Database
from fhir_kap.storage.outbox import Outbox

DATA = Path(__file__).resolve().parents[1] / "data"
TOKEN_ENV = "KAP_CLI_TEST_TOKEN"
NOTE = json.loads((DATA / "delivery" / "Communication-continuity-note.json").read_text())
CONTEXT = [
    DATA / "delivery" / "Consent-open-ended.json",
    DATA / "bridge" / "Example-PractitionerRole-ref-therapist-role.json",
    DATA / "bridge" / "Example-Practitioner-ref-therapist.json",
    DATA / "bridge" / "Example-Organization-kap-clinic.json",
]


@pytest.fixture
def env(tmp_path, monkeypatch):
    """Settings for the CLI: a tmp SQLite outbox and one endpoint 'practice' (SEKMET, bearer)."""

    def configure(base_url: str, token: str | None) -> Outbox:
        config = tmp_path / "fhir-kap.toml"
        config.write_text(
            f'[endpoints.practice]\nbase_url = "{base_url}"\nauth = "bearer"\ntoken_env = "{TOKEN_ENV}"\n'
        )
        for name in ("FHIR_KAP_DATABASE_URL", "FHIR_KAP_BATCH_SIZE"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("FHIR_KAP_CONFIG", str(config))
        monkeypatch.setenv("FHIR_KAP_DATA_DIR", str(tmp_path / "data"))
        if token is None:
            monkeypatch.delenv(TOKEN_ENV, raising=False)
        else:
            monkeypatch.setenv(TOKEN_ENV, token)
        return Outbox(Database(f"sqlite:///{tmp_path / 'data' / 'fhir-kap.sqlite3'}"))

    return configure


def enqueue(outbox: Outbox, n: int, base_url: str, endpoint: str = "practice") -> list[int]:
    ids = []
    for _ in range(n):
        res = copy.deepcopy(NOTE)
        res["identifier"][0]["value"] = f"CLI-{uuid.uuid4().hex[:10]}"
        ids.append(
            outbox.enqueue(
                res,
                endpoint=endpoint,
                base_url=base_url,
                recipient_ref="Practitioner/ref-therapist",
                purpose="TREAT",
            )[0].id
        )
    return ids


def run(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.sekmet
def test_deliver_once__sends_with_bearer_from_env_and_audits_each_permit(sekmet_auth, env, capsys):
    outbox = env(sekmet_auth.base_url, sekmet_auth.token)
    assert run(capsys, "outbox", "add-context", *map(str, CONTEXT))[0] == 0
    ids = enqueue(outbox, 3, sekmet_auth.base_url)
    rc, out, err = run(capsys, "deliver", "--once", "--json")
    assert rc == 0, err
    report = json.loads(out)
    assert report["stats"]["delivered"] == 3 and report["outbox"]["delivered"] == 3
    assert all(outbox.get(i).server_id for i in ids)
    permits = AuditLog(outbox.db).query(resource_type="AuditEvent", outcome="0")
    assert len(permits) == 3
    assert sekmet_auth.token not in out + err


@pytest.mark.sekmet
def test_deliver_once__revoked_consent_holds_items_and_audits_the_deny(sekmet_auth, env, capsys, tmp_path):
    outbox = env(sekmet_auth.base_url, sekmet_auth.token)
    run(capsys, "outbox", "add-context", *map(str, CONTEXT))
    revoked = json.loads(CONTEXT[0].read_text())
    revoked.update(status="inactive", meta=dict(revoked["meta"], versionId="2"))
    path = tmp_path / "Consent-revoked.json"
    path.write_text(json.dumps(revoked))
    rc, out, _ = run(capsys, "outbox", "add-context", str(path))
    assert rc == 0 and "stored 1" in out
    [item_id] = enqueue(outbox, 1, sekmet_auth.base_url)
    rc, out, err = run(capsys, "deliver", "--once")
    assert rc == 0, err
    item = outbox.get(item_id)
    assert item.state == "held" and "consent re-check at send time" in item.hold_reason
    [deny] = AuditLog(outbox.db).query(resource_type="AuditEvent", outcome="4")
    assert deny["agent"][1]["who"]["reference"] == "Practitioner/ref-therapist"
    rc, out, _ = run(capsys, "outbox", "list", "--state", "held")
    assert out.splitlines()[1].split()[:2] == [str(item_id), "held"]
    # the audit table says what was decided about which resource, and why
    rc, out, _ = run(capsys, "audit", "--outcome", "deny")
    header, row = out.splitlines()[:2]
    assert header.split()[-1] == "REASON" and "RESOURCE" in header
    assert row.split()[2] == "deny" and row.split()[3].startswith("Communication")
    assert row.split()[-1] == deny["outcomeDesc"].split(": ", 1)[1]  # the gate's reason codes


def test_deliver_once__missing_token_variable_is_named_and_items_wait(env, capsys):
    outbox = env("http://127.0.0.1:9/fhir", None)
    run(capsys, "outbox", "add-context", *map(str, CONTEXT))
    [item_id] = enqueue(outbox, 1, "http://127.0.0.1:9/fhir")
    assert run(capsys, "deliver", "--once")[0] == 0
    item = outbox.get(item_id)
    assert item.state == "pending" and f"'{TOKEN_ENV}'" in item.last_error


def test_deliver_once__unknown_endpoint_names_it(env, capsys):
    outbox = env("http://127.0.0.1:9/fhir", "irrelevant")
    run(capsys, "outbox", "add-context", *map(str, CONTEXT))
    [item_id] = enqueue(outbox, 1, "http://elsewhere.test/fhir", endpoint="elsewhere")
    assert run(capsys, "deliver", "--once")[0] == 0
    assert "Endpoint 'elsewhere' is not configured" in outbox.get(item_id).last_error


def test_outbox_list__table_and_json(env, capsys):
    outbox = env("http://127.0.0.1:9/fhir", "t")
    ids = enqueue(outbox, 2, "http://127.0.0.1:9/fhir")
    outbox.hold(ids[1], "checking the recipient")
    rc, out, _ = run(capsys, "outbox", "list")
    lines = out.splitlines()
    assert rc == 0 and lines[0].split() == ["ID", "STATE", "ENDPOINT", "TYPE", "KEY", "TRIES", "WHEN", "NOTE"]
    assert lines[1].split()[:4] == [str(ids[0]), "pending", "practice", "Communication"]
    assert lines[2].split()[:2] == [str(ids[1]), "held"] and lines[2].endswith("checking the recipient")
    assert lines[-1] == "pending 1  sending 0  delivered 0  held 1  dead 0"
    rc, out, _ = run(capsys, "outbox", "list", "--state", "pending", "--json")
    data = json.loads(out)
    assert [i["id"] for i in data["items"]] == [ids[0]] and data["counts"]["held"] == 1


def test_outbox_show__hides_the_resource_unless_asked(env, capsys):
    outbox = env("http://127.0.0.1:9/fhir", "t")
    [item_id] = enqueue(outbox, 1, "http://127.0.0.1:9/fhir")
    rc, out, _ = run(capsys, "outbox", "show", str(item_id), "--json")
    assert rc == 0 and "resource" not in json.loads(out) and "Dosing session" not in out
    rc, out, _ = run(capsys, "outbox", "show", str(item_id), "--json", "--resource")
    assert json.loads(out)["resource"]["payload"] == NOTE["payload"]
    rc, out, _ = run(capsys, "outbox", "show", str(item_id))
    assert ["state", "pending"] in [line.split() for line in out.splitlines()]


def test_outbox_hold_release_retry__move_items_and_refuse_wrong_states(env, capsys):
    outbox = env("http://127.0.0.1:9/fhir", "t")
    [item_id] = enqueue(outbox, 1, "http://127.0.0.1:9/fhir")
    assert run(capsys, "outbox", "hold", str(item_id), "--reason", "wrong practice")[0] == 0
    assert outbox.get(item_id).hold_reason == "wrong practice"
    rc, _, err = run(capsys, "outbox", "hold", str(item_id))
    assert rc == 1 and "is held; only pending items can be held" in err
    rc, out, _ = run(capsys, "outbox", "release", str(item_id), "--json")
    assert rc == 0 and json.loads(out)["state"] == "pending"
    [claimed] = outbox.claim("w", now=outbox.clock())
    outbox.mark_dead(claimed, "POST Communication: 400 Bad Request")
    rc, out, _ = run(capsys, "outbox", "retry", str(item_id))
    assert rc == 0 and "pending again (attempts 0)" in out
    rc, _, err = run(capsys, "outbox", "retry", "999")
    assert rc == 1 and json.loads(err)["issue"][0]["code"] == "not-found"


def test_outbox_retry_state_dead__puts_every_dead_item_of_an_endpoint_back(env, capsys):
    """After a bad token dead-letters a batch: one command, not one per id."""
    outbox = env("http://127.0.0.1:9/fhir", "t")
    mine = enqueue(outbox, 3, "http://127.0.0.1:9/fhir")
    other = enqueue(outbox, 1, "http://127.0.0.1:9/fhir", endpoint="elsewhere")
    for item in outbox.claim("w", limit=10, now=outbox.clock()):
        outbox.mark_dead(item, "POST Communication: 401 Unauthorized")
    rc, out, _ = run(capsys, "outbox", "retry", "--state", "dead", "--endpoint", "practice", "--json")
    assert rc == 0 and json.loads(out)["retried"] == mine and json.loads(out)["skipped"] == []
    assert [outbox.get(i).state for i in mine] == ["pending"] * 3 and outbox.get(other[0]).state == "dead"
    assert all(outbox.get(i).attempts == 0 for i in mine)
    rc, out, _ = run(capsys, "outbox", "retry", "--state", "dead")
    assert rc == 0 and out.startswith("1 dead item(s) pending again")
    rc, _, err = run(capsys, "outbox", "retry", "1", "--state", "dead")
    assert rc == 2 and "one item ID or --state" in err
    rc, _, err = run(capsys, "outbox", "retry")
    assert rc == 2 and "one item ID or --state" in err


def test_outbox_purge_delivered__removes_old_delivered_items(env, capsys):
    outbox = env("http://127.0.0.1:9/fhir", "t")
    ids = enqueue(outbox, 2, "http://127.0.0.1:9/fhir")
    [first, _] = outbox.claim("w")
    outbox.mark_delivered(first, server_id="s1", now=outbox.clock() - 3 * 86_400)
    rc, out, _ = run(capsys, "outbox", "purge-delivered", "--older-than", "2")
    assert rc == 0 and out.startswith("purged 1 delivered item(s)")
    assert outbox.get(ids[0]) is None and outbox.get(ids[1]) is not None


@pytest.mark.parametrize(
    "content, rule",
    [
        (json.dumps(NOTE), "outbox:context-type"),
        ('{"resourceType": "Consent"}', "outbox:context-id"),
        ("{not json", "json:syntax"),
    ],
)
def test_outbox_add_context__bad_input_exits_2_with_operation_outcome(env, capsys, tmp_path, content, rule):
    env("http://127.0.0.1:9/fhir", "t")
    path = tmp_path / "context.json"
    path.write_text(content)
    rc, _, err = run(capsys, "outbox", "add-context", str(path))
    outcome = json.loads(err)
    assert rc == 2 and outcome["resourceType"] == "OperationOutcome"
    assert any(e["valueString"] == rule for e in outcome["issue"][0]["extension"])
    assert "Traceback" not in err


def test_worker_slots__a_restarted_worker_gets_its_id_back_and_live_ones_never_share(tmp_path):
    from fhir_kap.exchange.delivery import claim_worker_slot

    first, lock1 = claim_worker_slot(tmp_path / "workers")
    second, lock2 = claim_worker_slot(tmp_path / "workers")
    assert first.endswith(":slot-1") and second.endswith(":slot-2")
    lock1.close()  # the first worker died (its lock goes with its process)
    again, lock3 = claim_worker_slot(tmp_path / "workers")
    assert again == first  # restarted: the same id, so it recovers its own leases at once
    assert oct((tmp_path / "workers").stat().st_mode & 0o777) == "0o700"
    lock2.close()
    lock3.close()


def test_deliver_once__recovers_the_items_its_slot_leased_before_a_crash(env, capsys):
    """A worker that died mid-batch leaves items `sending`; the next `deliver` on the same host
    (no --worker-id) takes its slot's id and puts them back to work at once."""
    import socket

    outbox = env("http://127.0.0.1:9/fhir", "t")
    [item_id] = enqueue(outbox, 1, "http://127.0.0.1:9/fhir")
    outbox.claim(f"{socket.gethostname()}:slot-1", now=outbox.clock(), lease_seconds=300)
    assert outbox.get(item_id).state == "sending"
    rc, out, _ = run(capsys, "deliver", "--once", "--json")
    assert rc == 0 and json.loads(out)["worker"].endswith(":slot-1")
    assert outbox.get(item_id).state != "sending"  # recovered at once, not after the 300 s lease


def test_the_settings_example_in_the_docs_loads_as_printed_and_names_recipients(tmp_path):
    """docs/operations/settings.md's TOML is what an operator copies: it must load, and every
    endpoint in it must say whom it receives for (else every note to it is refused)."""
    import re

    from fhir_kap.config import load_settings

    text = (DATA.parents[1] / "docs" / "operations" / "settings.md").read_text()
    (block,) = re.findall(r"```toml\n(.*?)```", text, flags=re.S)
    path = tmp_path / "settings.toml"
    path.write_text(block.replace('database_url = "postgresql://kap@db.internal/kap"', "#"))
    settings = load_settings(path, env={})
    assert set(settings.endpoints) == {"practice-a", "practice-b"}
    assert all(e.recipients for e in settings.endpoints.values())
    assert "recipients" in text.split("## Endpoints and secrets")[0]  # the settings table names it
