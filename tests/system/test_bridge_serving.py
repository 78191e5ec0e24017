"""`fhir-kap serve` over real HTTP: slow clients starve nobody, an oversized body gets a readable
413, and `POST /fhir/` is `POST /fhir` (issue 14).

Each test drives a real `fhir-kap serve` subprocess (its default serving model) on a free port.
`FHIR_KAP_TEST_SERVE_ARGS="--sync"` runs the same tests against the earlier sync workers (they
fail there: that is what the serving model fixes).
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from testkit.serve import free_port, start_serve, stop

ROOT = Path(__file__).resolve().parents[2]
MAX_BODY = 100_000


@dataclass
class Served:
    port: int
    token: str
    data: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    data = tmp_path_factory.mktemp("serve")
    env = {
        **os.environ,
        "FHIR_KAP_DATA_DIR": str(data),
        "PYTHONPATH": str(ROOT),
        "FHIR_KAP_LOG_LEVEL": "WARNING",
        "FHIR_KAP_MAX_BODY_BYTES": str(MAX_BODY),
    }
    env.pop("FHIR_KAP_DATABASE_URL", None)
    added = subprocess.run(
        [sys.executable, "-m", "fhir_kap.cli", "partners", "add", "practice-a"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    token = json.loads(added.stdout)["token"]
    port = free_port()
    extra = os.environ.get("FHIR_KAP_TEST_SERVE_ARGS", "").split()
    proc = start_serve(env, port, data / "serve.log", "--workers", "2", *extra)
    try:
        yield Served(port, token, data)
    finally:
        stop([proc])


def _slowloris(port: int, stop: threading.Event, opened: list[socket.socket]) -> None:
    """One connection sending its headers one line every 2 s, never finishing them."""
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    opened.append(s)
    try:
        s.sendall(b"GET /readyz HTTP/1.1\r\nHost: x\r\n")
        n = 0
        while not stop.wait(2.0):
            s.sendall(b"X-Slow-%d: 1\r\n" % n)
            n += 1
    except OSError:
        pass  # the server closed it (read timeout): fine


@pytest.mark.slow
def test_slow_clients__readyz_and_partners_still_answer_within_2s(served: Served) -> None:
    stop = threading.Event()
    opened: list[socket.socket] = []
    slow = [
        threading.Thread(target=_slowloris, args=(served.port, stop, opened), daemon=True) for _ in range(6)
    ]
    for t in slow:
        t.start()
    try:
        time.sleep(3)  # every slow client connected and mid-headers
        for _ in range(3):
            started = time.monotonic()
            ready = requests.get(f"{served.url}/readyz", timeout=2)
            read = requests.get(
                f"{served.url}/fhir/Communication/no-such-note",
                headers={"Authorization": f"Bearer {served.token}"},
                timeout=2,
            )
            assert ready.status_code == 200
            assert read.status_code == 404  # authenticated, answered (a 401 would mean no token check)
            assert read.json()["resourceType"] == "OperationOutcome"
            assert time.monotonic() - started < 2
            time.sleep(1)
    finally:
        stop.set()
        for s in opened:
            s.close()
        for t in slow:
            t.join(timeout=5)


def test_oversized_body__requests_reads_the_413_operation_outcome(served: Served) -> None:
    body = b'{"resourceType": "Communication", "x": "' + b"a" * (40 * MAX_BODY) + b'"}'
    with requests.Session() as session:
        resp = session.post(
            f"{served.url}/fhir/Communication",
            data=body,
            headers={"Content-Type": "application/fhir+json", "Authorization": f"Bearer {served.token}"},
            timeout=10,
        )
        assert resp.status_code == 413
        outcome = resp.json()
        assert outcome["resourceType"] == "OperationOutcome"
        assert outcome["issue"][0]["code"] == "too-long"
        # the same session goes on working
        assert session.get(f"{served.url}/readyz", timeout=5).status_code == 200


def test_oversized_body__urllib_reads_the_413(served: Served) -> None:
    req = urllib.request.Request(
        f"{served.url}/fhir/Communication",
        data=b"{" + b" " * (30 * MAX_BODY) + b"}",
        headers={"Content-Type": "application/fhir+json", "Authorization": f"Bearer {served.token}"},
        method="POST",
    )
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=10)
    assert err.value.code == 413
    assert json.loads(err.value.read())["resourceType"] == "OperationOutcome"


def test_oversized_chunked_body__413(served: Served) -> None:
    def chunks() -> Iterator[bytes]:
        for _ in range(30):
            yield b" " * 10_000

    resp = requests.post(
        f"{served.url}/fhir/Communication",
        data=chunks(),  # Transfer-Encoding: chunked, no Content-Length
        headers={"Content-Type": "application/fhir+json", "Authorization": f"Bearer {served.token}"},
        timeout=10,
    )
    assert resp.status_code == 413
    assert resp.json()["resourceType"] == "OperationOutcome"


def test_body_within_the_limit__reaches_the_app_whole(served: Served) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", served.port, timeout=10)
    conn.request(
        "POST",
        "/fhir/Communication",
        body=b"{not json",
        headers={"Content-Type": "application/fhir+json", "Authorization": f"Bearer {served.token}"},
    )
    resp = conn.getresponse()
    assert resp.status == 400  # the app parsed the body it was given (json:syntax)
    assert b"OperationOutcome" in resp.read()
    conn.close()


@pytest.mark.parametrize("path", ["/fhir", "/fhir/"])
def test_post_base__with_or_without_trailing_slash_takes_a_transaction(served: Served, path: str) -> None:
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": []}
    resp = requests.post(
        served.url + path,
        data=json.dumps(bundle),
        headers={"Content-Type": "application/fhir+json", "Authorization": f"Bearer {served.token}"},
        timeout=10,
        allow_redirects=False,
    )
    assert resp.status_code == 200, resp.text[:500]
    assert resp.json()["type"] == "transaction-response"


def test_serve_says_where_it_listens_and_on_what_never_a_credential(served: Served) -> None:
    banner = (served.data / "serve.out").read_text()
    assert f"bridge on http://127.0.0.1:{served.port}/fhir (FHIR 4.0.1)" in banner
    assert "database: sqlite " in banner and "serving: 2 worker(s)" in banner
    assert "fhir-kap " in banner.splitlines()[0]


def test_the_banner_shows_a_postgresql_database_without_its_credentials() -> None:
    import argparse

    from fhir_kap.cli.bridge import _banner, _inline_choice
    from fhir_kap.config import load_settings

    settings = load_settings(
        env={"FHIR_KAP_DATABASE_URL": "postgresql://kap:s3cret@db.internal:5433/kap?sslmode=require"}
    )
    args = argparse.Namespace(
        host="0.0.0.0",
        port=8443,
        dev=False,
        sync=False,
        workers=3,
        threads=None,
        inline_max_bytes=65_536,
        read_timeout=15.0,
        base_url=None,
    )
    text = _banner(args, settings)
    assert "postgresql db.internal:5433/kap" in text and "s3cret" not in text and "kap:" not in text
    assert "bodies up to 65,536 bytes on the loop, larger on 4 threads" in text
    args.inline_max_bytes, args.inline_reason = _inline_choice(settings)  # what serve does unasked
    assert args.inline_max_bytes == -1
    assert (
        "requests read whole (read timeout 15 s), every request on 4 threads "
        "(PostgreSQL: concurrent writes share commits)"
    ) in _banner(args, settings)


def test_serve_chooses_where_requests_run_by_measuring_the_data_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fhir_kap.cli.bridge import _inline_choice
    from fhir_kap.config import load_settings
    from fhir_kap.storage.db import Database

    settings = load_settings(env={}, data_dir=tmp_path / "data")
    assert Database(settings.db_url).sync_latency() is not None  # this disk, really measured
    monkeypatch.setattr(Database, "sync_latency", lambda self: 0.00012)
    assert _inline_choice(settings) == (65_536, " (the data disk syncs in 0.12 ms)")
    monkeypatch.setattr(Database, "sync_latency", lambda self: 0.0021)
    assert _inline_choice(settings) == (
        -1,
        " (the data disk syncs in 2.10 ms: concurrent writes share commits)",
    )

    def unmeasurable(self: Database) -> float:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Database, "sync_latency", unmeasurable)
    assert _inline_choice(settings) == (-1, " (the data disk could not be measured: Permission denied)")


def test_the_choice_reaches_the_workers_limits(tmp_path: Path) -> None:
    import argparse

    from fhir_kap.cli.bridge import _limits
    from fhir_kap.config import load_settings

    settings = load_settings(env={}, data_dir=tmp_path / "data")
    args = argparse.Namespace(read_timeout=15.0, keepalive=5.0, threads=None, inline_max_bytes=65_536)
    assert _limits(args, settings).inline_max_bytes == 65_536
    assert _limits(args, settings).threads == 4
    args.inline_max_bytes = -1
    assert _limits(args, settings).inline_max_bytes == -1
    args.inline_max_bytes = None  # not chosen: every request on the threads
    assert _limits(args, settings).inline_max_bytes == -1


@pytest.mark.parametrize("model", ["--sync", "--dev"])
def test_inline_max_bytes_is_refused_with_a_model_that_has_no_loop(tmp_path: Path, model: str) -> None:
    env = {**os.environ, "FHIR_KAP_DATA_DIR": str(tmp_path), "PYTHONPATH": str(ROOT)}
    env.pop("FHIR_KAP_DATABASE_URL", None)
    out = subprocess.run(
        [sys.executable, "-m", "fhir_kap.cli", "serve", model, "--inline-max-bytes", "1000"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode != 0
    assert "--inline-max-bytes is for the default workers" in out.stdout + out.stderr


def test_the_served_banner_says_where_requests_run(served: Served) -> None:
    text = (served.data / "serve.out").read_text()
    assert "requests read whole (read timeout 15 s), " in text
    assert ("bodies up to 65,536 bytes on the loop (the data disk syncs in " in text) or (
        "every request on 4 threads (the data disk syncs in " in text
    )
