"""The deployment files (docs/deployment) do what they say, as far as this machine can run them.

- the systemd units pass `systemd-analyze verify` (when systemd-analyze exists; the checker is
  shown to complain about a broken unit);
- the units' own `ExecStart` lines, run with their `Environment=` (program path, `%i`/`%H`,
  ports and paths moved to this test's), start: the bridge answers /readyz and /metrics on its
  metrics listener, two delivery worker slots deliver to SEKMET, the bridge's metrics count their
  attempts, and everything stops cleanly on the units' KillSignal (SIGTERM);
- the image's entry point turns NAME_FILE secrets into NAME and refuses an unreadable file;
- the built image serves and answers /readyz (only with FHIR_KAP_TEST_IMAGE set and buildah
  present: no container runtime works here, see docs/deployment/README.md).
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import requests
import yaml
from prometheus_client.parser import text_string_to_metric_families

from fhir_kap.storage.db import Database
from fhir_kap.storage.outbox import Outbox
from testkit.delivery import ROOT, TOKEN_ENV, enqueue_notes
from testkit.serve import free_port, stop

DEPLOY = ROOT / "docs" / "deployment"
UNITS = DEPLOY / "systemd"
PROGRAM = "/opt/fhir-kap/venv/bin/fhir-kap"
VENV_PROGRAM = str(Path(sys.executable).parent / "fhir-kap")


def unit(name: str) -> dict[str, list[str]]:
    """The unit's keys (all sections), each with its values in order."""
    out: dict[str, list[str]] = {}
    for line in (UNITS / name).read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", "[")) and "=" in line:
            key, _, value = line.partition("=")
            out.setdefault(key, []).append(value)
    return out


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_the_units_pass_systemd_analyze_verify(tmp_path):
    for path in [*UNITS.glob("*.service"), *UNITS.glob("*.target")]:
        (tmp_path / path.name).write_text(path.read_text().replace(PROGRAM, VENV_PROGRAM))
    names = ["fhir-kap-bridge.service", "fhir-kap-deliver@.service", "fhir-kap.target"]
    ok = subprocess.run(["systemd-analyze", "verify", *names], cwd=tmp_path, capture_output=True, text=True)
    assert ok.returncode == 0 and not ok.stdout.strip() and not ok.stderr.strip(), ok.stdout + ok.stderr
    broken = (
        (tmp_path / "fhir-kap-bridge.service")
        .read_text()
        .replace("ProtectSystem=strict", "ProtectSystem=strickt")
    )
    (tmp_path / "broken.service").write_text(broken)
    bad = subprocess.run(
        ["systemd-analyze", "verify", "broken.service"], cwd=tmp_path, capture_output=True, text=True
    )
    assert "strickt" in bad.stdout + bad.stderr  # the check can fail


def test_the_units_are_hardened_and_never_hold_a_secret():
    for name in ("fhir-kap-bridge.service", "fhir-kap-deliver@.service"):
        keys = unit(name)
        for key, value in {
            "NoNewPrivileges": "yes",
            "ProtectSystem": "strict",
            "PrivateTmp": "yes",
            "ReadWritePaths": "/var/lib/fhir-kap",
            "User": "fhir-kap",
            "CapabilityBoundingSet": "",
            "UMask": "0077",
        }.items():
            assert keys.get(key) == [value], (name, key, keys.get(key))
        env = dict(v.partition("=")[::2] for v in keys["Environment"])
        assert env["PROMETHEUS_MULTIPROC_DIR"] == "/var/lib/fhir-kap/metrics"  # one directory, both units
        assert not any("DATABASE_URL" in k or "TOKEN" in k for k in env), env  # secrets: EnvironmentFile only
        assert keys["EnvironmentFile"] == ["/etc/fhir-kap/secrets.env"]


def _command(name: str, instance: str, ports: dict[str, int], root: Path) -> tuple[list[str], dict[str, str]]:
    """The unit's ExecStart argv and environment, moved to this test's program, ports and paths."""
    keys = unit(name)
    (line,) = keys["ExecStart"]
    line = line.replace("%i", instance).replace("%H", socket.gethostname())
    argv = shlex.split(line)
    assert argv[0] == PROGRAM
    argv[0] = VENV_PROGRAM
    for flag, port in ports.items():
        if flag in argv:
            argv[argv.index(flag) + 1] = str(port)
    moved = {"/var/lib/fhir-kap": str(root / "var-lib"), "/etc/fhir-kap": str(root / "etc")}
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FHIR_KAP_", "PROMETHEUS_"))}
    env["PYTHONPATH"] = str(ROOT)
    for value in keys["Environment"]:
        key, _, val = value.partition("=")
        for old, new in moved.items():
            val = val.replace(old, new)
        env[key] = val
    (secrets,) = keys["EnvironmentFile"]
    for old, new in moved.items():
        secrets = secrets.replace(old, new)
    for raw in Path(secrets).read_text().splitlines():
        if raw.strip() and not raw.startswith("#"):
            key, _, val = raw.partition("=")
            env[key] = val
    return argv, env


@pytest.mark.slow
def test_the_units_exec_start_lines_start_deliver_and_stop_on_sigterm(sekmet_auth, tmp_path):
    (tmp_path / "etc").mkdir()
    (tmp_path / "var-lib").mkdir(mode=0o700)
    (tmp_path / "etc" / "fhir-kap.toml").write_text(
        f'[endpoints.practice]\nbase_url = "{sekmet_auth.base_url}"\nauth = "bearer"\n'
        f'token_env = "{TOKEN_ENV}"\nrecipients = ["Practitioner/ref-therapist"]\n'
    )
    # the secrets file as systemd reads it (no database URL: SQLite in the state directory)
    (tmp_path / "etc" / "secrets.env").write_text(f"# test secrets\n{TOKEN_ENV}={sekmet_auth.token}\n")
    port, metrics_port = free_port(), free_port()
    ports = {"--port": port, "--metrics-port": metrics_port}
    bridge_argv, bridge_env = _command("fhir-kap-bridge.service", "", ports, tmp_path)
    assert "--metrics-port" in bridge_argv and "--host" in bridge_argv
    procs: list[subprocess.Popen] = []
    logs = [tmp_path / f"{n}.log" for n in ("bridge", "deliver-1", "deliver-2")]
    try:
        procs.append(
            subprocess.Popen(
                bridge_argv, env=bridge_env, stdout=open(logs[0], "wb"), stderr=subprocess.STDOUT
            )
        )
        _wait(lambda: _ok(f"http://127.0.0.1:{port}/readyz"), procs, logs)
        for n in ("1", "2"):
            argv, env = _command("fhir-kap-deliver@.service", n, ports, tmp_path)
            assert argv[-1] == f"{socket.gethostname()}:deliver-{n}"
            procs.append(
                subprocess.Popen(argv, env=env, stdout=open(logs[int(n)], "wb"), stderr=subprocess.STDOUT)
            )
        _wait(lambda: all("started" in log.read_text() for log in logs[1:]), procs, logs)
        db_url = f"sqlite:///{tmp_path / 'var-lib' / 'fhir-kap.sqlite3'}"
        outbox = Outbox(Database(db_url))
        enqueue_notes(outbox, sekmet_auth.base_url, 12, f"UNIT-{uuid.uuid4().hex[:8]}")
        _wait(lambda: outbox.counts()["delivered"] == 12, procs, logs)
        assert requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5).status_code == 404
        text = requests.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).text
        attempts = sum(
            s.value
            for f in text_string_to_metric_families(text)
            for s in f.samples
            if s.name == "fhir_kap_delivery_attempts_total" and s.labels["outcome"] == "created"
        )
        assert attempts == 12
        stop_after = max(
            float(unit(n)["TimeoutStopSec"][0])
            for n in ("fhir-kap-bridge.service", "fhir-kap-deliver@.service")
        )
        assert unit("fhir-kap-bridge.service")["KillSignal"] == ["SIGTERM"]
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        codes = [proc.wait(timeout=stop_after) for proc in procs]
        assert codes == [0, 0, 0], [log.read_text()[-800:] for log in logs]
    finally:
        stop(procs)
    assert oct((tmp_path / "var-lib" / "metrics").stat().st_mode & 0o777) == "0o700"


def _ok(url: str) -> bool:
    try:
        return requests.get(url, timeout=2).status_code == 200
    except requests.RequestException:
        return False


def _wait(predicate, procs, logs, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        for proc, log in zip(procs, logs):
            assert proc.poll() is None, log.read_text()[-2000:]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def test_the_entrypoint_reads_secrets_from_files_and_refuses_an_unreadable_one(tmp_path):
    fake = tmp_path / "bin" / "fhir-kap"
    fake.parent.mkdir()
    fake.write_text(
        '#!/bin/sh\necho "args=$*"\necho "url=$FHIR_KAP_DATABASE_URL"\necho "file=${FHIR_KAP_DATABASE_URL_FILE:-unset}"\n'
    )
    fake.chmod(0o755)
    secret = tmp_path / "database_url"
    secret.write_text("postgresql://kap:s3cret@db:5432/kap")
    env = {"PATH": f"{fake.parent}:/usr/bin:/bin", "FHIR_KAP_DATABASE_URL_FILE": str(secret)}
    out = subprocess.run(
        ["sh", str(DEPLOY / "entrypoint.sh"), "deliver", "--once"], env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [
        "args=deliver --once",
        "url=postgresql://kap:s3cret@db:5432/kap",
        "file=unset",
    ]
    env["FHIR_KAP_DATABASE_URL_FILE"] = str(tmp_path / "missing")
    out = subprocess.run(
        ["sh", str(DEPLOY / "entrypoint.sh"), "serve"], env=env, capture_output=True, text=True
    )
    assert out.returncode == 78 and "FHIR_KAP_DATABASE_URL_FILE" in out.stderr and "args=" not in out.stdout


def test_the_compose_file_keeps_secrets_in_files_and_metrics_writers_in_one_pid_namespace():
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    bridge, deliver = services["bridge"], services["deliver"]
    assert deliver["pid"] == "service:bridge"
    for svc in (bridge, deliver):
        env = svc["environment"]
        assert env["PROMETHEUS_MULTIPROC_DIR"] == "/var/lib/fhir-kap/metrics"
        assert "metrics:/var/lib/fhir-kap/metrics" in svc["volumes"]
        assert env["FHIR_KAP_DATABASE_URL_FILE"].startswith("/run/secrets/")
        assert "FHIR_KAP_DATABASE_URL" not in env and svc["read_only"] is True and svc["cap_drop"] == ["ALL"]
    assert "127.0.0.1:9464:9464" in bridge["ports"]  # metrics published to this host only
    assert all(s["file"].startswith("./secrets/") for s in compose["secrets"].values())
    assert services["db"]["environment"]["POSTGRES_PASSWORD_FILE"].startswith("/run/secrets/")


@pytest.mark.slow
@pytest.mark.skipif(
    not os.environ.get("FHIR_KAP_TEST_IMAGE") or shutil.which("buildah") is None,
    reason="set FHIR_KAP_TEST_IMAGE to an image built from docs/deployment/Containerfile (needs buildah)",
)
def test_the_image_serves_as_its_non_root_user_and_answers_readyz(tmp_path):
    image = os.environ["FHIR_KAP_TEST_IMAGE"]
    ctr = subprocess.run(
        ["buildah", "from", image], capture_output=True, text=True, check=True
    ).stdout.strip()
    run = ["buildah", "run", "--isolation", "chroot"]
    proc = None
    port = 0
    try:
        who = subprocess.run([*run, ctr, "--", "id", "-u"], capture_output=True, text=True, check=True)
        assert who.stdout.strip() == "10001"
        port, metrics_port = free_port(), free_port()
        proc = subprocess.Popen(
            [
                *run,
                ctr,
                "--",
                "fhir-kap-entrypoint",
                "serve",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--metrics-port",
                str(metrics_port),
            ],
            stdout=open(tmp_path / "ctr.log", "wb"),
            stderr=subprocess.STDOUT,
        )
        _wait(lambda: _ok(f"http://127.0.0.1:{port}/readyz"), [proc], [tmp_path / "ctr.log"])
        assert _ok(f"http://127.0.0.1:{metrics_port}/metrics")
        assert requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5).status_code == 404
    finally:
        if proc is not None:
            # `buildah run` passes no signal on: SIGTERM the bridge processes serving this port
            for pid in _serving(port):
                os.kill(pid, signal.SIGTERM)
            proc.wait(timeout=30)
        subprocess.run(["buildah", "rm", ctr], capture_output=True)


def _serving(port: int) -> list[int]:
    """Processes whose command line is `... serve ... --port PORT` (this test's bridge in the image)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                args = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"serve" in args and b"--port" in args and str(port).encode() in args:
                found.append(int(entry.name))
    return found
