"""`fhir-kap serve --metrics-port` over real sockets, in both serving models: the metrics listener
answers /metrics (and health) only, the partner port never answers /metrics, whatever the Host
header says (the listener is told by the accepting socket)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from testkit.delivery import ROOT
from testkit.serve import free_port, start_serve, stop

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("model", [[], ["--sync"]], ids=["default", "sync"])
def test_metrics_only_on_the_metrics_listener(tmp_path, model):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FHIR_KAP_", "PROMETHEUS_"))}
    env.update(
        {
            "PYTHONPATH": str(ROOT),
            "FHIR_KAP_DATA_DIR": str(tmp_path / "data"),
            "FHIR_KAP_LOG_LEVEL": "WARNING",
        }
    )
    port, metrics_port = free_port(), free_port()
    proc = start_serve(
        env, port, tmp_path / "serve.log", "--workers", "2", "--metrics-port", str(metrics_port), *model
    )
    try:
        partner = f"http://127.0.0.1:{port}"
        operator = f"http://127.0.0.1:{metrics_port}"
        spoofed = requests.get(f"{partner}/metrics", headers={"Host": f"127.0.0.1:{metrics_port}"}, timeout=5)
        assert spoofed.status_code == 404 and spoofed.json()["resourceType"] == "OperationOutcome"
        assert requests.get(f"{operator}/fhir/metadata", timeout=5).status_code == 404
        assert requests.get(f"{operator}/readyz", timeout=5).status_code == 200
        resp = requests.get(f"{operator}/metrics", timeout=5)
        assert resp.status_code == 200
        names = {f.name for f in text_string_to_metric_families(resp.text)}
        assert {"fhir_kap_http_requests", "fhir_kap_database_up", "fhir_kap_outbox_items"} <= names
        assert (tmp_path / "data" / "metrics").is_dir()  # the default multiprocess directory
        assert oct((tmp_path / "data" / "metrics").stat().st_mode & 0o777) == "0o700"
        # the counts files the workers write (prometheus_client opens them with the umask): 0600
        files = [p for p in (tmp_path / "data").rglob("*") if p.is_file() and p.name != "serve.log"]
        assert any(p.parent.name == "metrics" for p in files)
        assert {p.name: oct(p.stat().st_mode & 0o777) for p in files if p.stat().st_mode & 0o077} == {}
    finally:
        stop([proc])
    banner = (tmp_path / "serve.out").read_text()
    assert f"metrics: http://127.0.0.1:{metrics_port}/metrics" in banner


def test_metrics_port_refused_with_dev_or_on_the_partner_port(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "FHIR_KAP_DATA_DIR": str(tmp_path / "data")}
    for extra in (["--dev", "--metrics-port", "9999"], ["--port", "9998", "--metrics-port", "9998"]):
        out = subprocess.run(
            [sys.executable, "-m", "fhir_kap.cli", "serve", *extra],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode != 0
        assert "cli:argument" in out.stderr and "--metrics-port" in out.stderr


def test_a_host_without_a_bridge_exports_its_workers_counts_with_fhir_kap_metrics(sekmet_auth, tmp_path):
    import uuid

    from fhir_kap.storage.db import Database
    from fhir_kap.storage.outbox import Outbox
    from testkit.delivery import enqueue_notes, start_worker, worker_env

    db_url = f"sqlite:///{tmp_path / 'outbox.sqlite3'}"
    outbox = Outbox(Database(db_url))
    env = worker_env(tmp_path, db_url, sekmet_auth.base_url, sekmet_auth.token)
    metrics_dir = tmp_path / "data" / "metrics"  # the default under FHIR_KAP_DATA_DIR
    port = free_port()
    exporter = subprocess.Popen(
        [sys.executable, "-m", "fhir_kap.cli", "metrics", "--port", str(port)],
        cwd=ROOT,
        env=env,
        stdout=open(tmp_path / "metrics.out", "wb"),
        stderr=subprocess.STDOUT,
    )
    worker = start_worker({**env, "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)}, "lone-1", tmp_path / "w.log")
    try:
        enqueue_notes(outbox, sekmet_auth.base_url, 5, f"LONE-{uuid.uuid4().hex[:8]}")
        deadline = time.monotonic() + 60
        while outbox.counts()["delivered"] < 5:
            assert worker.poll() is None and exporter.poll() is None, (tmp_path / "w.log").read_text()[-2000:]
            assert time.monotonic() < deadline
            time.sleep(0.1)
        text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    finally:
        codes = stop([worker, exporter])
    samples = {
        (s.name, s.labels.get("outcome"), s.labels.get("state")): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
    }
    assert samples[("fhir_kap_delivery_attempts_total", "created", None)] == 5
    assert samples[("fhir_kap_outbox_items", None, "delivered")] == 5
    assert codes == [0, 0]
    assert f"http://127.0.0.1:{port}/metrics" in (tmp_path / "metrics.out").read_text()
