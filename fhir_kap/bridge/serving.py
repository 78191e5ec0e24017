"""How `fhir-kap serve` serves the bridge: an event loop reads whole requests, then runs Flask.

Room: bridge/ (layer 4, entry point): may import any room; only cli/ imports it (uvicorn and
gunicorn are imported here, never at package import).

Why: a sync worker (the earlier default) waits on its socket while a client sends its headers
one line every few seconds, so a handful of such connections made `/readyz` and every partner
time out. Here each gunicorn worker process runs an asyncio loop (uvicorn's HTTP protocol, on
httptools) that reads requests as their bytes arrive; a request reaches the Flask app only once
its head and its whole body are in memory. A slow client then costs a socket and a few
kilobytes, never a thread, and the app's answer (the durable commit included) is what the
client receives, as before.

Where the app runs: a request whose body is at most `inline_max_bytes` (single resources,
searches, reads) runs on the loop's own thread, which pauses reading meanwhile, as
a sync worker would, but only ever for a request already whole. Handing it to a thread instead
costs ~70-110 µs of CPU per request (the hand-off and the GIL passing between the two threads):
10-25 % of the bridge's throughput on 2 cores. But a request on the loop also holds the loop
(and so the worker's other connections, `/readyz` included) while its commit waits for the
disk or for another writer's lock, and the loop has one request at a time to share a commit
with: on a disk whose sync takes ~0.5 ms or more, the threads (where a worker's concurrent
writes share one commit while the loop goes on) win instead. So `fhir-kap serve` chooses by
measuring (`default_inline_max_bytes`): 64 KB on the loop when the data disk's durable append
takes at most `FAST_SYNC_SECONDS`, every request on the threads (`-1`) on a slower disk or
PostgreSQL (every statement there is a network round trip). Measurements: docs/measurements/2026-12-04-serving-inline.md. A larger
request, a POST to the FHIR base (a transaction or batch Bundle) or to `/kap/records` (NDJSON,
many records) and the console (a login hashes a password) always run on one of the worker's
`threads`, so the loop goes on reading
and answering the worker's other connections meanwhile. The loop cannot tell the arbiter it is
alive while it runs a request, so a `kap-heartbeat` thread does, for up to `inline_budget`
(150 s: a write waiting behind another writer is answered 503 well before, unless it leads its
worker's commit and waits on the cross-process commit lock, which has no deadline); a request
on the loop longer than that gets the worker restarted by the arbiter (its timeout, 60 s,
later), as a hung one would.

The limits, each with its default in `ServeLimits`:
- `read_timeout`: a request must arrive whole (head and body) within this many seconds of its
  first byte (or of the connection, for one that sends nothing); otherwise the connection is
  closed. Kept-alive connections idle longer than `keepalive` are closed too.
- `max_body_bytes` (the settings' limit): a larger body is read and thrown away, up to
  `drain_bytes`, and then answered `413` with its OperationOutcome, so ordinary clients (that
  send their whole body before they read) see the answer instead of a connection reset. A body
  that declares more than `drain_bytes`, or announces `Expect: 100-continue`, is answered at
  once and the connection closed.
- `max_connections` per worker: beyond it new requests get `503` (uvicorn's limit).
"""

from __future__ import annotations

import asyncio
import io
import sys
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

__all__ = [
    "FAST_SYNC_SECONDS",
    "INLINE_MAX_BYTES",
    "BufferedWsgi",
    "ServeLimits",
    "default_inline_max_bytes",
    "worker_class",
]


@dataclass(frozen=True)
class ServeLimits:
    """The serving limits (see the module docstring)."""

    max_body_bytes: int = 1_000_000
    read_timeout: float = 15.0
    keepalive: float = 5.0
    drain_bytes: int = 16_000_000
    max_connections: int = 1000
    threads: int = 4
    inline_max_bytes: int = -1
    #: paths whose requests always run on the threads, whatever their size: the console (a
    #: login hashes a password, ~0.1 s) ...
    pool_prefixes: tuple[str, ...] = ("/console",)
    #: ... and POSTs to these paths (the FHIR base: transaction and batch Bundles; KAP records
    #: as NDJSON, each mapped, validated and consent-checked)
    pool_posts: tuple[str, ...] = ("/fhir", "/kap/records")
    #: how long a request on the loop keeps the worker's heartbeat going (the loop cannot beat
    #: while it runs the app); past it the arbiter restarts the worker, as it would a hung one
    inline_budget: float = 150.0

    def runs_inline(self, body_bytes: int, method: str = "GET", path: str = "/") -> bool:
        """Whether a request with this many body bytes, method and path runs on the loop's thread."""
        if not 0 <= body_bytes <= self.inline_max_bytes:
            return False
        if path.startswith(self.pool_prefixes):
            return False
        return not (method == "POST" and path.rstrip("/") in self.pool_posts)


#: Idle-disk latency of a durable append (`Database.sync_latency`) up to which requests run on
#: the loop by default. Measured on 2 cores (bench_bridge.py, a delay added to every WAL sync):
#: the loop wins by 10-25 % at the disk's own ~0.15 ms, breaks even at ~0.35 ms, loses 14-35 %
#: at 0.65-2.15 ms.
FAST_SYNC_SECONDS = 0.0003
#: The body size up to which a request runs on the loop when it does (above: a Bundle, an import).
INLINE_MAX_BYTES = 65_536


def default_inline_max_bytes(sync_seconds: float | None) -> int:
    """`inline_max_bytes` when the operator did not choose: INLINE_MAX_BYTES where a commit's
    wait for the disk is short (`sync_seconds` <= FAST_SYNC_SECONDS), else -1 (every request on
    the threads, where concurrent writes share commits): a slower disk, one that could not be
    measured, or PostgreSQL (None)."""
    if sync_seconds is not None and sync_seconds <= FAST_SYNC_SECONDS:
        return INLINE_MAX_BYTES
    return -1


_TOO_LARGE = b'{"resourceType":"OperationOutcome","issue":[{"severity":"error","code":"too-long","diagnostics":"http:413","details":{"text":"Request body too large"}}]}'


class BufferedWsgi:
    """An ASGI app that reads each request whole, then runs a WSGI app on it.

    The WSGI app sees an ordinary environ with `wsgi.input` over the bytes read and
    `CONTENT_LENGTH` their number. It runs on the loop's thread or on the pool, as
    `limits.runs_inline` says. A body over `limits.max_body_bytes` is drained (up to
    `limits.drain_bytes`) and the app gets an empty input and the declared (or counted) length,
    so Flask's `MAX_CONTENT_LENGTH` answers 413 as it would in-process.
    """

    def __init__(self, wsgi: Callable[..., Iterable[bytes]], limits: ServeLimits) -> None:
        self.wsgi = wsgi
        self.limits = limits
        self._pool: ThreadPoolExecutor | None = None
        #: when the request now running on the loop's thread started (monotonic), else None
        self.inline_since: float | None = None

    def _executor(self) -> ThreadPoolExecutor:
        if self._pool is None:  # made in the worker process, after gunicorn forks
            self._pool = ThreadPoolExecutor(max(1, self.limits.threads), thread_name_prefix="kap-app")
        return self._pool

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        headers: list[tuple[bytes, bytes]] = scope["headers"]
        declared: int | None = None
        expect_continue = False
        for name, value in headers:
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = None
            elif name == b"expect" and value.lower() == b"100-continue":
                expect_continue = True
        limit = self.limits.max_body_bytes
        if (
            declared is not None
            and declared > limit
            and (expect_continue or declared > self.limits.drain_bytes)
        ):
            await _answer_too_large(send)  # not worth reading: answer now, the connection closes
            return
        chunks: list[bytes] = []
        size = 0
        over = declared is not None and declared > limit
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client left (or took longer than read_timeout): nothing to run
            chunk = message.get("body", b"")
            size += len(chunk)
            if not over and size > limit:
                over, chunks = True, []
            if over:
                if size > self.limits.drain_bytes:
                    await _answer_too_large(send)
                    return
            elif chunk:
                chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"" if over else b"".join(chunks)
        length = max(size, declared or 0) if over else len(body)
        environ = _environ(scope, body, length)
        if self.limits.runs_inline(len(body), scope["method"], scope["path"]):
            self.inline_since = time.monotonic()
            try:
                status, out_headers, payload = _run(self.wsgi, environ)
            finally:
                self.inline_since = None
        else:
            loop = asyncio.get_running_loop()
            status, out_headers, payload = await loop.run_in_executor(
                self._executor(), _run, self.wsgi, environ
            )
        await send({"type": "http.response.start", "status": status, "headers": out_headers})
        await send({"type": "http.response.body", "body": payload})


async def _answer_too_large(send: Any) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": 413,
            "headers": [
                (b"content-type", b"application/fhir+json; charset=utf-8"),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": _TOO_LARGE})


def _environ(scope: dict[str, Any], body: bytes, length: int) -> dict[str, Any]:
    server = scope.get("server") or ("127.0.0.1", 80)
    client = scope.get("client") or ("", 0)
    environ: dict[str, Any] = {
        "REQUEST_METHOD": scope["method"],
        "SCRIPT_NAME": scope.get("root_path", "").encode("utf-8").decode("latin-1"),
        "PATH_INFO": scope["path"].encode("utf-8").decode("latin-1"),
        "QUERY_STRING": scope.get("query_string", b"").decode("latin-1"),
        "SERVER_NAME": str(server[0]),
        "SERVER_PORT": str(server[1]) if server[1] is not None else "80",
        "SERVER_PROTOCOL": f"HTTP/{scope.get('http_version', '1.1')}",
        "REMOTE_ADDR": str(client[0]),
        "REMOTE_PORT": str(client[1]),
        "CONTENT_LENGTH": str(length),
        "wsgi.version": (1, 0),
        "wsgi.url_scheme": scope.get("scheme", "http"),
        "wsgi.input": io.BytesIO(body),
        "wsgi.errors": sys.stderr,
        "wsgi.multithread": True,
        "wsgi.multiprocess": True,
        "wsgi.run_once": False,
        "wsgi.input_terminated": True,
        # the port of the socket that accepted the request (never the Host header's): the bridge
        # answers /metrics only on the operator's metrics listener (bridge/metrics.py)
        "fhir_kap.local_port": server[1],
    }
    for raw_name, raw_value in scope["headers"]:
        name = raw_name.decode("latin-1").upper().replace("-", "_")
        value = raw_value.decode("latin-1")
        if name == "CONTENT_LENGTH" or name == "TRANSFER_ENCODING":
            continue  # the body is whole: its length is what was read
        key = "CONTENT_TYPE" if name == "CONTENT_TYPE" else f"HTTP_{name}"
        environ[key] = f"{environ[key]},{value}" if key in environ else value
    return environ


def _run(wsgi: Callable[..., Iterable[bytes]], environ: dict[str, Any]) -> tuple[int, list[Any], bytes]:
    """Call the WSGI app on this thread; its status, headers and whole body."""
    started: list[Any] = []

    def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        started[:] = [status, headers]
        return lambda data: None  # write() is never used by Flask

    result = wsgi(environ, start_response)
    try:
        payload = b"".join(result)
    finally:
        close = getattr(result, "close", None)
        if close is not None:
            close()
    status, headers = started
    return (
        int(status.split(" ", 1)[0]),
        [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers],
        payload,
    )


def _protocol_class(read_timeout: float, max_head_bytes: int = 64 * 1024) -> type:
    """uvicorn's httptools protocol with a deadline on reading each request whole."""
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    class KapHttpProtocol(HttpToolsProtocol):  # type: ignore[misc]
        _read_deadline: asyncio.TimerHandle | None = None
        _head_bytes: int | None = 0  # bytes of the request head so far; None once it is whole

        def _arm(self) -> None:
            self._disarm()
            self._read_deadline = self.loop.call_later(read_timeout, self._read_timed_out)

        def _disarm(self) -> None:
            if self._read_deadline is not None:
                self._read_deadline.cancel()
                self._read_deadline = None

        def _read_timed_out(self) -> None:
            self._read_deadline = None
            if not self.transport.is_closing():
                self.transport.close()

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            if self._head_bytes is not None:
                self._head_bytes += len(data)
            super().data_received(data)
            if self._head_bytes is not None and self._head_bytes > max_head_bytes:
                # a head that never ends (within read_timeout): 431 and close
                if not self.transport.is_closing():
                    self.transport.write(
                        b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
                        b"content-length: 0\r\nconnection: close\r\n\r\n"
                    )
                    self.transport.close()

        def on_headers_complete(self) -> None:
            self._head_bytes = None
            super().on_headers_complete()

        def on_response_complete(self) -> None:
            self._head_bytes = 0
            super().on_response_complete()

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._arm()

        def on_message_complete(self) -> None:
            self._disarm()
            super().on_message_complete()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

    return KapHttpProtocol


def worker_class(limits: ServeLimits) -> type:
    """A gunicorn worker class serving the loaded WSGI app through `BufferedWsgi` on uvicorn."""
    import signal

    from gunicorn.arbiter import Arbiter
    from gunicorn.workers.base import Worker
    from uvicorn.config import Config
    from uvicorn.server import Server

    protocol = _protocol_class(limits.read_timeout)

    class KapWorker(Worker):  # type: ignore[misc]
        def init_signals(self) -> None:
            # uvicorn's Server installs its own SIGINT/SIGTERM handlers; gunicorn's are reset
            for s in self.SIGNALS:
                signal.signal(s, signal.SIG_DFL)
            signal.signal(signal.SIGUSR1, lambda *_: self.log.reopen_files())
            signal.siginterrupt(signal.SIGUSR1, False)

        async def _serve(self) -> None:
            adapter = BufferedWsgi(self.wsgi, limits)
            stop = threading.Event()
            if limits.inline_max_bytes >= 0:  # else the loop never runs a request itself
                threading.Thread(
                    target=self._heartbeat, args=(adapter, stop), name="kap-heartbeat", daemon=True
                ).start()
            config = Config(
                app=adapter,
                http=protocol,
                loop="auto",
                lifespan="off",
                log_config=None,
                log_level="warning",
                access_log=False,
                timeout_keep_alive=max(1, int(limits.keepalive)),
                timeout_notify=self.timeout,
                callback_notify=self._notify,
                limit_concurrency=limits.max_connections,
                limit_max_requests=self.max_requests or None,
                h11_max_incomplete_event_size=self.cfg.limit_request_field_size or None,
            )
            server = Server(config=config)
            asyncio.get_running_loop().add_signal_handler(
                signal.SIGQUIT, server.handle_exit, signal.SIGQUIT, None
            )
            try:
                await server.serve(sockets=self.sockets)
            finally:
                stop.set()
            if not server.started:
                sys.exit(Arbiter.WORKER_BOOT_ERROR)

        async def _notify(self) -> None:
            self.notify()

        def _heartbeat(self, adapter: BufferedWsgi, stop: threading.Event) -> None:
            # The loop tells the arbiter it is alive between requests; while it runs one itself
            # (a write waiting for a lock can take up to the 120 s commit wait), this thread does,
            # for at most `inline_budget` seconds of one request.
            while not stop.wait(1.0):
                since = adapter.inline_since
                if since is not None and time.monotonic() - since < limits.inline_budget:
                    try:
                        self.notify()
                    except OSError:  # the worker's file is gone: the worker is exiting
                        return

        def run(self) -> None:
            try:
                import uvloop

                uvloop.run(self._serve())
            except ImportError:
                asyncio.run(self._serve())

    return KapWorker
