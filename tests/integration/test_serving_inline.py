"""Where `fhir-kap serve` runs a request (bridge/serving.py): a small one on the event loop's own
thread, a large one on the worker's threads while the loop goes on answering others.

Real HTTP: uvicorn with the bridge's protocol class and `BufferedWsgi`, in a thread of this
process, around a small WSGI app that says which thread ran it and, for a large body, waits
until the test lets it go. Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import socket
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any

import pytest

from fhir_kap.bridge.serving import (
    FAST_SYNC_SECONDS,
    INLINE_MAX_BYTES,
    BufferedWsgi,
    ServeLimits,
    _protocol_class,
    default_inline_max_bytes,
)
from fhir_kap.storage.sql.walsync import sync_latency

INLINE_MAX = 1_000


class _App:
    """Answers the name of the thread that ran it; a body over INLINE_MAX waits for `release`."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.entered = threading.Event()

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        body = environ["wsgi.input"].read()
        if len(body) > INLINE_MAX:
            self.entered.set()
            if not self.release.wait(10):
                start_response("504 Gateway Timeout", [("Content-Type", "text/plain")])
                return [b"never released"]
        out = json.dumps({"thread": threading.current_thread().name, "bytes": len(body)}).encode()
        start_response("200 OK", [("Content-Type", "application/json")])
        return [out]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _serve(limits: ServeLimits) -> Iterator[tuple[int, _App]]:
    import uvicorn

    app = _App()
    port = _free_port()
    config = uvicorn.Config(
        app=BufferedWsgi(app, limits),
        http=_protocol_class(limits.read_timeout),
        host="127.0.0.1",
        port=port,
        loop="asyncio",
        lifespan="off",
        log_config=None,
        log_level="warning",
        access_log=False,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=lambda: asyncio.run(server.serve()), name="serve-loop", daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start within 10 s"
        time.sleep(0.02)
    try:
        yield port, app
    finally:
        app.release.set()
        server.should_exit = True
        thread.join(10)


@pytest.fixture
def served() -> Iterator[tuple[int, _App]]:
    yield from _serve(ServeLimits(inline_max_bytes=INLINE_MAX, threads=2))


@pytest.fixture
def served_pool_only() -> Iterator[tuple[int, _App]]:
    yield from _serve(ServeLimits(inline_max_bytes=-1, threads=2))


def _post(port: int, size: int, timeout: float = 5.0) -> dict[str, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", "/x", body=b"a" * size, headers={"Content-Type": "text/plain"})
        resp = conn.getresponse()
        assert resp.status == 200, resp.read()
        return dict(json.loads(resp.read()))
    finally:
        conn.close()


def test_runs_inline__by_body_size_and_never_when_minus_one() -> None:
    limits = ServeLimits(inline_max_bytes=65_536)
    assert limits.runs_inline(0) and limits.runs_inline(65_536)
    assert limits.runs_inline(3_000, "POST", "/fhir/Communication")
    assert not limits.runs_inline(65_537)
    off = ServeLimits()  # unless told otherwise: every request on the threads
    assert off.inline_max_bytes == -1 and not off.runs_inline(0) and not off.runs_inline(10)


def test_runs_inline__never_the_console_nor_a_bundle_posted_to_the_base() -> None:
    limits = ServeLimits(inline_max_bytes=65_536)
    assert not limits.runs_inline(40, "POST", "/console/login")  # a login hashes a password
    assert not limits.runs_inline(0, "GET", "/console/outbox")
    assert not limits.runs_inline(500, "POST", "/fhir")  # a transaction or batch Bundle
    assert not limits.runs_inline(500, "POST", "/fhir/")
    assert limits.runs_inline(0, "GET", "/fhir")  # not a Bundle
    assert limits.runs_inline(500, "POST", "/fhir/Bundle")  # a Bundle resource, stored as one
    assert not limits.runs_inline(500, "POST", "/kap/records")  # NDJSON: many records


def test_heartbeat__beats_while_a_request_runs_on_the_loop_within_its_budget() -> None:
    """The loop cannot tell gunicorn's arbiter it is alive while it runs a request itself (a
    write may wait for another writer's lock); the worker's heartbeat thread does, within the
    budget, and never when the loop is free (the loop beats then)."""
    from fhir_kap.bridge.serving import worker_class

    limits = ServeLimits(inline_max_bytes=INLINE_MAX, inline_budget=30.0)
    worker = object.__new__(worker_class(limits))  # the thread's own logic, without a process
    beats: list[float] = []
    worker.notify = lambda: beats.append(time.monotonic())
    adapter = BufferedWsgi(_App(), limits)
    stop = threading.Event()
    thread = threading.Thread(target=worker._heartbeat, args=(adapter, stop), daemon=True)
    thread.start()
    try:
        time.sleep(1.3)
        assert beats == []  # no request on the loop
        adapter.inline_since = time.monotonic()  # a request on the loop, just started
        time.sleep(2.2)
        assert len(beats) >= 1
        adapter.inline_since = time.monotonic() - 31.0  # one past its budget: a hung worker
        time.sleep(0.1)
        seen = len(beats)
        time.sleep(1.3)
        assert len(beats) == seen
    finally:
        stop.set()
        thread.join(5)
    assert not thread.is_alive()


def test_default__on_the_loop_only_for_a_disk_that_syncs_fast() -> None:
    assert default_inline_max_bytes(0.00012) == INLINE_MAX_BYTES == 65_536
    assert default_inline_max_bytes(FAST_SYNC_SECONDS) == INLINE_MAX_BYTES
    assert default_inline_max_bytes(FAST_SYNC_SECONDS * 1.01) == -1  # slower disk: commits share
    assert default_inline_max_bytes(0.002) == -1
    assert default_inline_max_bytes(None) == -1  # PostgreSQL, or not measured


def test_sync_latency__measures_appends_and_leaves_nothing_behind(tmp_path: Any) -> None:
    seconds = sync_latency(tmp_path, samples=4)
    assert 0 < seconds < 5
    assert list(tmp_path.iterdir()) == []


def test_sync_latency__never_writes_through_a_planted_link(tmp_path: Any) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep me")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / ".fhir-kap-sync-probe").symlink_to(victim)
    with pytest.raises(OSError):
        sync_latency(tmp_path / "data", samples=1)
    assert victim.read_bytes() == b"keep me"


def test_sync_latency__a_directory_that_cannot_take_the_file_raises_oserror(tmp_path: Any) -> None:
    with pytest.raises(OSError):
        sync_latency(tmp_path / "missing", samples=1)


def test_small_request__runs_on_the_loop_thread_large_on_a_worker_thread(served: tuple[int, _App]) -> None:
    port, app = served
    small = _post(port, INLINE_MAX)
    assert small == {"thread": "serve-loop", "bytes": INLINE_MAX}
    app.release.set()
    large = _post(port, INLINE_MAX + 1)
    assert large["thread"].startswith("kap-app") and large["bytes"] == INLINE_MAX + 1


def test_while_a_large_request_runs__the_loop_still_answers_small_ones(served: tuple[int, _App]) -> None:
    port, app = served
    result: dict[str, Any] = {}
    large = threading.Thread(target=lambda: result.update(_post(port, 50_000, timeout=15)))
    large.start()
    assert app.entered.wait(5), "the large request never reached the app"
    started = time.monotonic()
    small = _post(port, 10, timeout=3)  # the large one is still held in the app
    assert small["thread"] == "serve-loop"
    assert time.monotonic() - started < 3
    assert large.is_alive()
    app.release.set()
    large.join(15)
    assert result["bytes"] == 50_000 and result["thread"].startswith("kap-app")


def test_inline_off__every_request_on_a_worker_thread(served_pool_only: tuple[int, _App]) -> None:
    port, _ = served_pool_only
    assert _post(port, 10)["thread"].startswith("kap-app")
