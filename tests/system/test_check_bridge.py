"""`fhir-kap check` against the fhir-kap bridge itself (R4 and R5 deployments): the
practice-receiver role passes its required checks, and what the run leaves behind (the bridge
answers DELETE with 404) is reported, not counted as deleted."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from fhir_kap.cli import main

ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("version", ["4.0.1", "5.0.0"])
def test_the_practice_receiver_role_passes_against_the_bridge(tmp_path, monkeypatch, capsys, version):
    env = {
        **os.environ,
        "FHIR_KAP_DATA_DIR": str(tmp_path / "data"),
        "FHIR_KAP_FHIR_VERSION": version,
        "PYTHONPATH": str(ROOT),
        "FHIR_KAP_LOG_LEVEL": "WARNING",
    }
    env.pop("FHIR_KAP_DATABASE_URL", None)
    added = subprocess.run(
        [
            sys.executable,
            "-m",
            "fhir_kap.cli",
            "partners",
            "add",
            "clinic-ehr",
            "--scopes",
            "system/*.* kap/clinic",
        ]
        + ["--reference", "Organization/kap-clinic"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    monkeypatch.setenv("KAP_CHECK_BRIDGE_TOKEN", json.loads(added.stdout)["token"])
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "fhir_kap.cli", "serve", "--port", str(port), "--workers", "1"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            assert server.poll() is None, "fhir-kap serve exited"
            try:
                if requests.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            assert time.monotonic() < deadline, "fhir-kap serve did not become ready"
            time.sleep(0.2)
        report = tmp_path / "report.json"
        code = main(
            [
                "check",
                "--server",
                f"http://127.0.0.1:{port}/fhir",
                "--auth",
                "bearer",
                "--token-env",
                "KAP_CHECK_BRIDGE_TOKEN",
                "--role",
                "practice-receiver",
                "--json",
                str(report),
            ]
        )
        out = capsys.readouterr().out
        assert code == 0, out[-3000:]
        data = json.loads(report.read_text())
        assert data["fhir_version"] == version
        # the bridge keeps what partners wrote (DELETE is 404): reported as left, never as deleted
        assert data["cleanup"]["remaining"] and "LEFT ON THE SERVER" in out
    finally:
        server.terminate()
        server.wait(timeout=20)
