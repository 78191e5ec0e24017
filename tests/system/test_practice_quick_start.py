"""The practice quick start (docs/operations/practice-quick-start.md) runs as written.

Its ```sh blocks, each marked by an HTML comment (`<!-- quick-start:run -->` in the practice's
terminal, `<!-- quick-start:background -->` for what runs in a terminal of its own: the bridge,
the receiver), are run in order with bash, in a directory holding a copy of
docs/operations/quick-start/: `run` blocks in one bash session (a reader's terminal: variables
carry over; `set -euo pipefail` so a failing command or an unset variable stops the run),
`background` blocks as processes of their own. Only the two ports are substituted (the doc's
8080 and 9000, in the blocks and in subscription.json), so parallel runs do not collide. Tokens
come from the doc's own `fhir-kap partners add`.

Between blocks the test waits as a reader would (the bridge ready, the receiver listening, the
receiver having printed `handshake` / `event-notification`, as `wait=` in the marker says), then
checks what the doc promises: the receiver got the handshake and the event naming the note the
clinic posted, the fetch returns that note, $status/$events replay it, the amendment answers
W/"2" and a stale If-Match 412, after the revocation the note is 404, $validate finds nothing,
the Subscription is gone. Then the error table's rows, each provoked once with curl.
"""

from __future__ import annotations

import json
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from testkit.serve import free_port

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "operations" / "practice-quick-start.md"
FILES = ROOT / "docs" / "operations" / "quick-start"
DOC_BRIDGE_PORT, DOC_HOOK_PORT = "8080", "9000"

_MARKED = re.compile(r"<!-- quick-start:(run|background)((?: [a-z]+=[\w-]+)*) -->\n```sh\n(.*?)\n```", re.S)


@dataclass
class Block:
    kind: str  # "run" or "background"
    code: str
    options: dict[str, str] = field(default_factory=dict)


def blocks(text: str) -> list[Block]:
    """The doc's marked ```sh blocks, in order."""
    found = []
    for m in _MARKED.finditer(text):
        options = dict(o.split("=", 1) for o in m.group(2).split())
        found.append(Block(m.group(1), m.group(3), options))
    return found


class Shell:
    """One bash session fed block by block, as a reader's terminal is (stderr into stdout)."""

    def __init__(self, cwd: Path, env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            ["bash", "--noprofile", "--norc"],
            cwd=cwd,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.send("set -euo pipefail")

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def send(self, code: str, timeout: float = 90) -> str:
        """Run `code`; its output. Fails if bash stops (a failing command under set -e)."""
        marker = f"@@block-done-{uuid.uuid4().hex}"
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"{code}\necho {marker}\n")
        self.proc.stdin.flush()
        out: list[str] = []
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"block timed out:\n{code}\n--- output:\n{''.join(out)}") from None
            if line is None:
                raise AssertionError(f"bash stopped in block:\n{code}\n--- output:\n{''.join(out)}")
            if marker in line:  # after output without a final newline, on the same line
                return "".join(out) + line.split(marker)[0]
            out.append(line)

    def close(self) -> None:
        _stop(self.proc)


def _stop(proc: subprocess.Popen[Any]) -> None:
    """SIGTERM the process group this test started (bash and what it runs), then SIGKILL."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=20)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()


def _wait(predicate: Any, what: str, timeout: float = 40) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return bool(resp.status == 200)
    except OSError:
        return False


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _call(url: str, token: str, method: str = "GET", body: bytes | None = None) -> tuple[int, Any]:
    req = urllib.request.Request(
        url,
        data=body,
        method=method,
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/fhir+json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=15) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"null")


def _rules(outcome: Any) -> list[str]:
    return [
        ext["valueString"]
        for issue in outcome.get("issue", [])
        for ext in issue.get("extension", [])
        if ext["url"].endswith("/rule")
    ]


def test_every_sh_block_of_the_quick_start_is_marked():
    text = DOC.read_text(encoding="utf-8")
    assert len(blocks(text)) == text.count("```sh") > 0


@pytest.mark.slow
def test_the_practice_quick_start_runs_as_written(tmp_path: Path) -> None:
    if not shutil.which("curl") or not shutil.which("bash"):
        if os.environ.get("CI"):
            pytest.fail("curl and bash are needed under CI: .ci/run must `apt-get install -y curl`")
        pytest.skip("needs curl and bash (.ci/run installs curl)")
    bridge_port, hook_port = str(free_port()), str(free_port())
    while hook_port == bridge_port:
        hook_port = str(free_port())

    def ports(text: str) -> str:
        return text.replace(DOC_BRIDGE_PORT, bridge_port).replace(DOC_HOOK_PORT, hook_port)

    text = DOC.read_text(encoding="utf-8")
    steps = blocks(text)
    assert DOC_BRIDGE_PORT in text and DOC_HOOK_PORT in text
    for src in FILES.glob("*.json"):
        (tmp_path / src.name).write_text(ports(src.read_text(encoding="utf-8")), encoding="utf-8")
    assert hook_port in (tmp_path / "subscription.json").read_text()

    env = {
        **os.environ,
        "PATH": f"{ROOT / '.venv' / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHONPATH": str(ROOT),
        "FHIR_KAP_LOG_LEVEL": "WARNING",
    }
    for name in ("FHIR_KAP_DATABASE_URL", "FHIR_KAP_DATA_DIR", "FHIR_KAP_FHIR_VERSION", "FHIR_KAP_CONFIG"):
        env.pop(name, None)
    base = f"http://127.0.0.1:{bridge_port}/fhir"
    log = tmp_path / "notifications.log"

    def received(kind: str) -> list[list[str]]:
        lines = log.read_text().splitlines() if log.exists() else []
        return [line.split() for line in lines if line.split()[:1] == [kind]]

    shell = Shell(tmp_path, env)
    background: list[subprocess.Popen[Any]] = []
    outputs: list[str] = []
    try:
        for number, step in enumerate(steps):
            code = ports(step.code)
            if step.kind == "background":
                background.append(
                    subprocess.Popen(
                        ["bash", "-c", code],
                        cwd=tmp_path,
                        env=env,
                        stdout=open(tmp_path / f"background-{number}.out", "wb"),
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )
                )
                if "fhir-kap serve" in code:
                    _wait(lambda: _ready(f"http://127.0.0.1:{bridge_port}/readyz"), "the bridge")
                else:
                    _wait(lambda: _listening(int(hook_port)), "the receiver")
                outputs.append("")
                continue
            outputs.append(shell.send(code))
            _wait_as_a_reader(step.options.get("wait"), tmp_path, base, received)
        _check(outputs, steps, base, tmp_path, received)
    finally:
        shell.close()
        for proc in background:
            _stop(proc)


def _wait_as_a_reader(wait: str | None, tmp: Path, base: str, received: Any) -> None:
    """Wait for what the marker's `wait=` names to be printed by the receiver; after the
    handshake also for the Subscription to be active (recorded right after the 200 answer)."""
    if not wait:
        return
    _wait(lambda: bool(received(wait)), f"the receiver to print {wait}")
    if wait == "handshake":
        token = json.loads((tmp / "practice-a.json").read_text())["token"]
        sid = json.loads((tmp / "subscription-sent.json").read_text())["id"]
        _wait(lambda: _call(f"{base}/Subscription/{sid}", token)[1]["status"] == "active", "active")


def _output(outputs: list[str], steps: list[Block], needle: str) -> str:
    """The output of the one run block whose code contains `needle`."""
    found = [out for out, step in zip(outputs, steps, strict=True) if needle in step.code]
    assert len(found) == 1, f"{len(found)} blocks contain {needle!r}"
    return found[0]


def _check(outputs: list[str], steps: list[Block], base: str, tmp: Path, received: Any) -> None:
    token = json.loads((tmp / "practice-a.json").read_text())["token"]
    clinic = json.loads((tmp / "clinic.json").read_text())["token"]
    out = lambda needle: _output(outputs, steps, needle)  # noqa: E731

    # 1. the topics
    assert out("$B/metadata").split() == [
        "http://fhir-kap.example/SubscriptionTopic/continuity-note-available",
        "http://fhir-kap.example/SubscriptionTopic/referral-status-changed",
    ]
    # 2, 3. the referral and the consent are stored
    assert out('-X POST "$B/ServiceRequest" -H').split() == ["201"]
    sr = json.loads((tmp / "referral-sent.json").read_text())["id"]
    assert out("@consent.json").split() == ["201"]
    # 4, 5. requested, then active after the handshake; the clinic's note is event 1, naming it
    assert out("@subscription.json").split() == ["201", '"status":"requested"']
    assert out('"$B/Subscription/$SID" -H "Authorization: Bearer $TOKEN" | grep').split() == [
        '"status":"active"'
    ]
    assert out("@note.json").split() == ["201"]
    status, found = _call(
        f"{base}/Communication?identifier=http://fhir-kap.example/sid/note|clinic-note-2026-001", clinic
    )
    assert status == 200 and found["total"] == 1, found
    note_id = found["entry"][0]["resource"]["id"]
    note_url = f"{base}/Communication/{note_id}"
    assert received("handshake") == [["handshake"]]
    assert received("event-notification") == [["event-notification", "1", note_url]]
    # 6. the fetch returns that note
    fetched = json.loads(out('curl -sS "$NOTE"'))
    assert fetched["resourceType"] == "Communication" and fetched["id"] == note_id
    # 7. $status counts one event, $events replays it with its focus
    assert out("$events").split() == [
        '"events-since-subscription-start","valueString":"1"',
        '"event-number","valueString":"1"',
        f'"focus","valueReference":{{"reference":"{note_url}"',
    ]
    # 8. amended: W/"1" -> W/"2"; the stale If-Match again is 412
    assert out("If-Match").splitlines() == ['etag: W/"1"', 'etag: W/"2"', "412"]
    status, referral = _call(f"{base}/ServiceRequest/{sr}", token)
    assert status == 200 and referral["priority"] == "urgent" and referral["meta"]["versionId"] == "2"
    # 9. the note is readable, the revocation is stored, and the note is 404 right after
    assert out("@consent-revoked.json").split() == ["200", "200", "404"]
    # 10. $validate finds nothing in the referral
    outcome = json.loads(out("$validate"))
    assert outcome["resourceType"] == "OperationOutcome" and _rules(outcome) == ["validate:ok"]
    assert [i["severity"] for i in outcome["issue"]] == ["information"]
    # 11. unsubscribed
    assert out("-X DELETE").split() == ["204", "404"]

    # The error table: each row, provoked once.
    assert [_rules(_call(f"{base}/ServiceRequest/{sr}", bad)[1]) for bad in ("", "not-a-token")] == [
        ["auth:bearer"]
    ] * 2
    other = json.loads((tmp / "referral.json").read_text())
    other["requester"] = {"reference": "Practitioner/someone-else"}
    other["identifier"][0]["value"] = "practice-a-ref-2026-002"
    status, refused = _call(f"{base}/ServiceRequest", token, "POST", json.dumps(other).encode())
    assert status == 403 and _rules(refused) == ["bridge:authorship"]
    referral["priority"] = "asap"
    status, refused = _call(f"{base}/ServiceRequest/{sr}", token, "PUT", json.dumps(referral).encode())
    assert status == 412 and _rules(refused) == ["http:if-match-required"]
    sub = json.loads((tmp / "subscription.json").read_text())
    sub["channel"]["endpoint"] = f"http://127.0.0.1:{free_port()}/notify"
    status, refused = _call(f"{base}/Subscription", token, "POST", json.dumps(sub).encode())
    assert status == 422 and _rules(refused) == ["subscription:endpoint-not-registered"]
