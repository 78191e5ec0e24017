"""`fhir-kap serve` as a real process for the system tests: a free port, start until /readyz, stop."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import requests

from testkit.delivery import ROOT


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_serve(env: dict[str, str], port: int, log: Path, *extra: str) -> subprocess.Popen:
    """`fhir-kap serve --port PORT *extra`, once it answers /readyz (stdout to LOG.out, stderr to LOG)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "fhir_kap.cli", "serve", "--port", str(port), *extra],
        cwd=ROOT,
        env=env,
        stdout=open(log.with_suffix(".out"), "wb"),
        stderr=open(log, "wb"),
    )
    deadline = time.monotonic() + 40
    while True:
        assert proc.poll() is None, log.read_text()[-2000:]
        try:
            if requests.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                return proc
        except requests.RequestException:
            pass
        assert time.monotonic() < deadline, "fhir-kap serve did not become ready"
        time.sleep(0.2)


def stop(procs: list[subprocess.Popen], timeout: float = 20) -> list[int]:
    """SIGTERM each process, wait (kill after `timeout`); their exit codes."""
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    codes = []
    for proc in procs:
        try:
            codes.append(proc.wait(timeout=timeout))
        except subprocess.TimeoutExpired:
            proc.kill()
            codes.append(proc.wait())
    return codes
