"""A notification endpoint for tests: a local HTTP server answering POSTs from a script.

`ScriptedReceiver(default_status)` answers each POST with the next `(status, headers)` of its
`script`, then `default_status`; it keeps every request as `(headers, raw body)` in `received`
(header names case-insensitive). Used for legacy rest-hooks and Subscription notifications.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class ScriptedReceiver:
    def __init__(self, default_status: int = 200, path: str = "/notify") -> None:
        self.script: list[tuple[int, dict[str, str]]] = []
        self.received: list[tuple[Any, bytes]] = []
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                with outer.lock:
                    outer.received.append((self.headers, body))
                    status, headers = outer.script.pop(0) if outer.script else (default_status, {})
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}{path}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def bodies(self) -> list[Any]:
        """Every body received, parsed as JSON, in order."""
        with self.lock:
            return [json.loads(b) for _, b in self.received]
