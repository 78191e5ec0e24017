"""`fhir-kap check` against the fhir-kap bridge itself (R4 and R5 deployments, served by
`fhir-kap serve`): the practice-receiver, referral-sender and clinic roles pass every required
check, and so does `full` (the default: update of every KAP type); the bridge claims no delete, so rt-05 is skipped and what the
run leaves behind is reported, never counted as deleted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from fhir_kap.cli import main
from testkit.serve import free_port, start_serve, stop

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module", params=["4.0.1", "5.0.0"])
def served(request, tmp_path_factory) -> Iterator[tuple[str, str, str]]:
    """(base URL, clinic token, FHIR version) of a bridge served by `fhir-kap serve`."""
    version = request.param
    data = tmp_path_factory.mktemp(f"bridge-{version}")
    env = {
        **os.environ,
        "FHIR_KAP_DATA_DIR": str(data / "data"),
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
    port = free_port()
    server = start_serve(env, port, data / "serve.log", "--workers", "1")
    try:
        yield f"http://127.0.0.1:{port}/fhir", json.loads(added.stdout)["token"], version
    finally:
        stop([server])


def _check(served, role: str, tmp_path, monkeypatch, capsys) -> tuple[int, dict, str]:
    url, token, version = served
    monkeypatch.setenv("KAP_CHECK_BRIDGE_TOKEN", token)
    report = tmp_path / "report.json"
    code = main(
        ["check", "--server", url, "--auth", "bearer", "--token-env", "KAP_CHECK_BRIDGE_TOKEN"]
        + ["--role", role, "--json", str(report)]
    )
    out = capsys.readouterr().out
    data = json.loads(report.read_text())
    assert data["fhir_version"] == version
    return code, data, out


def _outcomes(data: dict) -> dict[str, str]:
    return {r["id"]: r["outcome"] for r in data["results"]}


@pytest.mark.parametrize("role", ["practice-receiver", "referral-sender", "clinic"])
def test_each_partner_role_passes_every_required_check_against_the_bridge(
    served, role, tmp_path, monkeypatch, capsys
):
    code, data, out = _check(served, role, tmp_path, monkeypatch, capsys)
    assert code == 0, out[-3000:]
    # the bridge keeps what partners wrote (no delete claimed): reported as left, never as deleted
    assert data["cleanup"]["remaining"] and "LEFT ON THE SERVER" in out
    if role == "clinic":
        outcomes = _outcomes(data)
        # claimed and done: update with If-Match, conditional update, $validate, the transaction
        assert {outcomes[c] for c in ("rt-04", "rt-06", "idem-02", "val-01", "val-02", "cap-08")} == {"pass"}
        assert outcomes["rt-05"] == "skip"  # no delete claimed
        cs = requests.get(served[0] + "/metadata", headers={"Authorization": f"Bearer {served[1]}"}).json()
        subscriptions = any(r["type"] == "Subscription" for r in cs["rest"][0]["resource"])
        assert outcomes["cap-09"] == ("pass" if subscriptions else "skip")


def test_the_full_role__the_default__passes_every_required_check(served, tmp_path, monkeypatch, capsys):
    code, data, out = _check(served, "full", tmp_path, monkeypatch, capsys)
    failed = {r["id"] for r in data["results"] if r["outcome"] == "fail"}
    assert code == 0 and failed == set(), out[-3000:]
    outcomes = {r["id"]: r["outcome"] for r in data["results"]}
    assert outcomes["cap-04"] == "pass" and outcomes["rt-05"] == "skip"
