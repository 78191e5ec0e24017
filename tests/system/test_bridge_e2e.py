"""End to end: `fhir-kap partners add` and `fhir-kap serve` (real gunicorn) on a free port; a signed webhook."""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import ClassVar

import pytest

from fhir_kap.exchange.webhooks import EVENT_COMMUNICATION, Notifier, sign
from testkit.bridge import load


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cli(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fhir_kap.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _request(port: int, method: str, path: str, body: bytes | None = None, token: str | None = None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    headers = {"Content-Type": "application/fhir+json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    conn.request(method, path, body=body, headers=headers)
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    return resp.status, resp.headers, data  # header names are case-insensitive (HTTPMessage)


@pytest.mark.slow
def test_gunicorn_serves_the_bridge_end_to_end(tmp_path):
    env = {**os.environ, "FHIR_KAP_DATA_DIR": str(tmp_path / "data"), "PYTHONPATH": os.getcwd()}
    env.pop("FHIR_KAP_DATABASE_URL", None)
    added = _cli(
        env,
        "partners",
        "add",
        "practice-a",
        "--npi",
        "1234567893",
        "--scopes",
        "system/*.read",
        "system/*.write",
    )
    assert added.returncode == 0, added.stderr
    token = json.loads(added.stdout)["token"]
    listed = _cli(env, "partners", "list")
    assert token not in listed.stdout and json.loads(listed.stdout)[0]["name"] == "practice-a"
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "fhir_kap.cli", "serve", "--port", str(port), "--workers", "2"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if _request(port, "GET", "/readyz")[0] == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline and server.poll() is None, "bridge did not start"
            time.sleep(0.2)
        status, headers, body = _request(
            port,
            "POST",
            "/fhir/Communication",
            json.dumps(load("Example-Communication-note-1.json")).encode(),
            token,
        )
        assert status == 201, body
        location = headers["Location"]
        assert location.startswith(f"http://127.0.0.1:{port}/fhir/Communication/")
        status, _, read = _request(port, "GET", location.split(str(port), 1)[1], token=token)
        assert status == 200 and json.loads(read)["id"] == json.loads(body)["id"]
        assert _request(port, "GET", "/fhir/Communication", token="wrong")[0] == 401
        assert _request(port, "POST", "/fhir/Communication", b"{nope", token)[0] == 400
        assert _cli(env, "partners", "revoke", "practice-a").returncode == 0
        # Workers cache token lookups for BridgeOptions.auth_cache_seconds (5 s): the documented bound.
        revoked_by = time.monotonic() + 5 + 1
        while _request(port, "GET", "/fhir/Communication", token=token)[0] != 401:
            assert time.monotonic() < revoked_by, "a revocation must take effect within the cache bound"
            time.sleep(0.2)
    finally:
        server.terminate()
        _, err = server.communicate(timeout=30)
    lines = [json.loads(x) for x in err.decode().splitlines() if x.startswith("{")]
    assert any(x.get("route") == "/fhir/<rtype>" and x.get("status") == 201 for x in lines)
    assert "client-1" not in err.decode()


class _Hook(BaseHTTPRequestHandler):
    received: ClassVar[list] = []

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.received.append((self.headers, body))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_webhook_payload_is_id_only_and_signed():
    server = HTTPServer(("127.0.0.1", 0), _Hook)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        result = Notifier(timeout=5).notify(
            f"http://127.0.0.1:{server.server_port}/hook",
            EVENT_COMMUNICATION,
            "Communication/abc",
            secret="s3cret",
        )
    finally:
        server.shutdown()
        server.server_close()
    assert result.delivered and result.status == 204
    headers, body = _Hook.received[-1]
    assert json.loads(body) == {"event": "communication-available", "resource": "Communication/abc"}
    assert headers["X-KAP-Signature"] == sign("s3cret", headers["X-KAP-Timestamp"], body)


def test_an_unreachable_webhook_is_reported_not_raised():
    port = _free_port()
    result = Notifier(timeout=1).notify(
        f"http://127.0.0.1:{port}/hook", EVENT_COMMUNICATION, "Communication/x"
    )
    assert not result.delivered and result.error


@pytest.mark.parametrize(
    "cpus, cpu_max, expected",
    [
        (2, None, 3),  # no cgroup limit: one more than the cores
        (64, "200000 100000", 3),  # a container limited to 2 CPUs on a 64-core node
        (64, "150000 100000", 3),  # 1.5 CPUs round up to 2
        (64, "50000 100000", 2),
        (64, "max 100000", 8),  # unlimited: capped at 8
        (4, "garbage", 5),  # unreadable quota: ignored
    ],
)
def test_serve_default_workers_follow_the_usable_cpus(tmp_path, monkeypatch, cpus, cpu_max, expected):
    from fhir_kap.cli.bridge import _default_workers

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cpus)))
    path = tmp_path / "cpu.max"
    if cpu_max is not None:
        path.write_text(cpu_max + "\n")
    assert _default_workers(path) == expected


def test_the_bridge_logs_one_json_object_per_line_with_ids_and_codes_only():
    import logging

    from fhir_kap.bridge.app import JsonLines

    fmt = JsonLines()
    request_line = logging.makeLogRecord(
        {
            "msg": '{"event": "request", "status": 201}',
            "levelno": 20,
            "levelname": "INFO",
            "name": "fhir_kap.bridge",
        }
    )
    assert fmt.format(request_line) == '{"event": "request", "status": 201}'  # built by the bridge as it is
    try:
        raise ValueError("Client: I saw colours")  # an exception message may quote data
    except ValueError:
        import sys

        other = logging.makeLogRecord(
            {
                "msg": "webhook given up",
                "levelno": 30,
                "levelname": "WARNING",
                "name": "fhir_kap.notify",
                "job": 7,
                "status": 410,
                "exc_info": sys.exc_info(),
            }
        )
    line = json.loads(fmt.format(other))
    assert (
        line["event"] == "webhook given up"
        and line["level"] == "warning"
        and line["logger"] == "fhir_kap.notify"
    )
    assert line["job"] == 7 and line["status"] == 410 and line["error"] == "ValueError"
    assert "colours" not in json.dumps(line)
