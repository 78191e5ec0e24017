"""Start and stop a local SEKMET FHIR R4 server (the real server used by tests, demo and bench).

SEKMET (`sekmet-fhir`, pinned in the `test` extra) runs as a child process on 127.0.0.1 with its
simulator off, its `base_url` set to the address it listens on (without it, paging links name
another host and `fhir-kap check` fails srch-08) and a fresh data directory; `start()` polls
`/fhir/metadata` until it answers. `fhir-kap testserver` starts one standalone.

Room: demo/ (layer 3, orchestration): may import layers 0-2.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["SekmetServer", "free_port"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class SekmetServer:
    """A SEKMET process. Auth: `tokens` enables static bearer; `smart_clients` enables SMART.

    smart_clients items: {"client_id": ..., "client_secret": ...} and/or
    {"client_id": ..., "jwks": {"keys": [...]}}, optional "scopes" (default "system/*.*").
    """

    data_dir: Path | None = None
    port: int = 0
    tokens: list[str] = field(default_factory=list)
    smart_clients: list[dict[str, Any]] = field(default_factory=list)
    log_inbound: bool = False
    startup_timeout: float = 60.0
    _proc: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)
    _own_dir: bool = field(default=False, init=False, repr=False)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/fhir"

    @property
    def running(self) -> bool:
        """True while the SEKMET process is alive."""
        return self._proc is not None and self._proc.poll() is None

    @property
    def root_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _settings(self) -> dict[str, Any]:
        types = []
        if self.tokens:
            types.append("bearer")
        if self.smart_clients:
            types.append("smart")
        return {
            "base_url": self.base_url,
            "host": "127.0.0.1",
            "port": self.port,
            "data_dir": str(self.data_dir),
            "simulator": {"enabled": False},
            "server_auth": {
                "types": types or ["none"],
                "tokens": list(self.tokens),
                "smart_clients": list(self.smart_clients),
            },
            "log_inbound": self.log_inbound,
            "own_private_key_path": str(Path(str(self.data_dir)) / "keys" / "sekmet_private.pem"),
        }

    def start(self) -> SekmetServer:
        if self.data_dir is None:
            self.data_dir = Path(tempfile.mkdtemp(prefix="sekmet-"))
            self._own_dir = True
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if not self.port:
            self.port = free_port()
        cfg = self.data_dir / "settings.yaml"
        cfg.write_text(json.dumps(self._settings()))  # JSON is valid YAML
        exe = shutil.which("sekmet", path=os.path.dirname(sys.executable)) or shutil.which("sekmet")
        if not exe:
            raise RuntimeError("SEKMET is not installed: pip install 'sekmet-fhir==0.1.1'")
        log = open(self.data_dir / "server.log", "wb")
        self._proc = subprocess.Popen(
            [exe, "serve", "-c", str(cfg)],
            cwd=self.data_dir,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(
                    f"SEKMET exited early (code {self._proc.returncode}); see {self.data_dir / 'server.log'}"
                )
            try:
                with urllib.request.urlopen(f"{self.base_url}/metadata", timeout=2) as r:
                    if r.status == 200:
                        return self
            except urllib.error.HTTPError as exc:  # 401 still means it is up
                if exc.code in (401, 403):
                    return self
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"SEKMET did not answer /fhir/metadata within {self.startup_timeout}s")

    def stop(self) -> None:
        if self._proc and self._proc.poll() is None:
            os.killpg(self._proc.pid, signal.SIGTERM)
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self._proc.pid, signal.SIGKILL)
                self._proc.wait()
        self._proc = None
        if self._own_dir and self.data_dir is not None:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def __enter__(self) -> SekmetServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
