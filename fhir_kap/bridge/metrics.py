"""Prometheus metrics at /metrics, on the operator's listener only (issue 16).

Room: bridge/ (layer 4, entry point; the only Flask user): may import any room; nothing imports it but cli/.

Every request answered on the partner-facing listener is counted by method, URL rule (never the
raw path: `/fhir/<rtype>/<rid>`, so no id reaches a label) and status, and timed. `/metrics`
itself is served only on the metrics listener (`fhir-kap serve --metrics-port N`, bound to
127.0.0.1 unless `--metrics-host` says otherwise): the serving layer tags each request with the
port of the socket that accepted it (`LOCAL_PORT` in the WSGI environ, from the socket, never
from the Host header), and anywhere else `/metrics` is a 404 like any unknown path. The metrics
listener answers nothing but `/metrics`, `/healthz` and `/readyz`. What is measured, and how
several processes add up, is in exchange/telemetry.py and docs/operations/metrics.md.
"""

from __future__ import annotations

import time

from flask import Flask, Response, current_app, g, request
from werkzeug.exceptions import NotFound

from ..exchange import telemetry
from .app import services

__all__ = ["LOCAL_PORT", "METRICS_PORT", "register"]

#: `app.config` key: the port of the metrics listener (None or absent: /metrics is served nowhere).
METRICS_PORT = "FHIR_KAP_METRICS_PORT"
#: WSGI environ key: the local port of the socket the request arrived on (set by the serving layer).
LOCAL_PORT = "fhir_kap.local_port"
_OPERATOR_PATHS = frozenset({"/metrics", "/healthz", "/readyz"})


def _on_metrics_listener() -> bool:
    port = current_app.config.get(METRICS_PORT)
    return port is not None and request.environ.get(LOCAL_PORT) == port


def register(app: Flask) -> None:
    """Add this module's routes and hooks to the bridge app."""
    telemetry.metrics()  # the families exist (HELP, TYPE) before the first request

    @app.before_request
    def operator_listener_only() -> None:
        if _on_metrics_listener() and request.path not in _OPERATOR_PATHS:
            raise NotFound()

    @app.after_request
    def count(resp: Response) -> Response:
        # counted only when a metrics listener will show it (no cost otherwise), never its own scrapes
        if current_app.config.get(METRICS_PORT) is not None and not _on_metrics_listener():
            started = g.get("started")
            telemetry.request_done(
                request.method,
                request.url_rule.rule if request.url_rule is not None else "(unmatched)",
                resp.status_code,
                0.0 if started is None else time.perf_counter() - started,
            )
        return resp

    @app.get("/metrics")
    def metrics() -> Response:
        if not _on_metrics_listener():
            raise NotFound()  # the partner-facing port has no /metrics
        body, content_type = telemetry.exposition(services().db)
        return Response(body, content_type=content_type)
