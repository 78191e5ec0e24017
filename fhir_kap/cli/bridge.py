"""`fhir-kap serve` (the bridge under gunicorn workers that read requests whole, or Flask's server with --dev), `fhir-kap metrics` and `fhir-kap partners`.

Room: cli/ (layer 4, entry point): may import any room (heavy imports inside the handlers); nothing imports it.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any

from ._io import bounded_int, open_input

__all__ = ["register"]


def _default_workers(cpu_max: Path = Path("/sys/fs/cgroup/cpu.max")) -> int:
    """One sync worker more than the CPUs this process may use (see `register`), at most 8.

    The CPUs are the fewest of: the affinity mask, and a cgroup v2 CPU quota (`cpu.max`, what a
    container limit sets); a pod limited to 2 CPUs on a 64-core node gets 3 workers, not 65.
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    try:
        quota, period = cpu_max.read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, -(-int(quota) // int(period))))
    except (OSError, ValueError):
        pass
    return min(cores + 1, 8)


def register(subparsers: Any) -> None:
    serve = subparsers.add_parser("serve", help="run the bridge (FHIR facade + KAP API)")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8080, help="port (default 8080)")
    serve.add_argument("--config", metavar="FILE", default=argparse.SUPPRESS, help="settings file (TOML)")
    # The serving model (fhir_kap/bridge/serving.py): gunicorn's arbiter runs worker processes,
    # each an asyncio loop (uvicorn, httptools) that reads every request whole before Flask runs
    # it (on the loop's thread, or on one of the worker's few threads for a large body or a
    # slow disk), so clients that send slowly hold a socket, never a worker (sync workers were
    # starved by a handful of them: issue 14). Measurements (bench/bench_bridge.py, 2 cores,
    # load generator beside it) are in docs/performance.md.
    # --sync keeps the earlier gunicorn sync workers, for a front that buffers whole requests
    # and enforces header and body timeouts itself (nginx with proxy_request_buffering on).
    serve.add_argument(
        "--workers",
        type=int,
        default=_default_workers(),
        help="worker processes (default: usable CPUs + 1, at most 8)",
    )
    serve.add_argument(
        "--threads",
        type=int,
        default=None,
        help="threads per worker running the requests that do not run on its event loop (all "
        "of them when --inline-max-bytes is -1; default 4; concurrent writes of a worker share "
        "one commit); with --sync and N > 1, gunicorn gthread workers",
    )
    serve.add_argument(
        "--inline-max-bytes",
        type=int,
        default=None,
        metavar="N",
        help="run a request whose body is at most N bytes on the worker's event-loop thread "
        "(no thread hand-off); larger ones run on the worker's threads while the loop goes on "
        "reading; -1: every request on the threads. The console and POSTs to the FHIR base "
        "(Bundles) always run on the threads. Default: 65536 when the SQLite data disk syncs "
        "within 0.3 ms (measured at start), else -1 (also for PostgreSQL)",
    )
    serve.add_argument(
        "--read-timeout",
        type=float,
        default=15.0,
        metavar="SECONDS",
        help="a request must arrive whole (headers and body) within this time, else the "
        "connection is closed (default 15)",
    )
    serve.add_argument(
        "--keepalive",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="close a kept-alive connection idle this long (default 5)",
    )
    serve.add_argument(
        "--sync",
        action="store_true",
        help="gunicorn sync workers instead (ONLY behind a front that buffers whole requests "
        "and times out slow clients, such as nginx: sync workers wait on slow sockets)",
    )
    serve.add_argument(
        "--reuse-port",
        action="store_true",
        help="one SO_REUSEPORT listening socket per worker (the kernel spreads connections)",
    )
    serve.add_argument("--dev", action="store_true", help="Flask's development server (one process)")
    serve.add_argument(
        "--base-url",
        default=None,
        help="public base URL of /fhir, e.g. https://bridge.example/fhir (default: from each "
        "request's Host header; SMART backend services need it set)",
    )
    serve.add_argument(
        "--proxy-hops",
        type=int,
        default=0,
        choices=range(6),
        metavar="N",
        help="fronts (TLS proxies) before the bridge that set X-Forwarded-For and "
        "X-Forwarded-Proto: believe N hops of them (the console's login throttle then counts the "
        "client's address, and its same-origin check sees https); default 0: ignore them",
    )
    # /metrics lives on a listener of its own, never on the partner-facing port (bridge/metrics.py)
    serve.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        metavar="PORT",
        help="serve Prometheus metrics at http://METRICS_HOST:PORT/metrics (a listener of its own; "
        "the partner port never answers /metrics); default: no metrics listener",
    )
    serve.add_argument(
        "--metrics-host",
        default="127.0.0.1",
        help="address of the metrics listener (default 127.0.0.1: only this host's Prometheus "
        "or an agent on it can scrape)",
    )
    serve.add_argument("--bench-echo", action="store_true", help=argparse.SUPPRESS)
    serve.set_defaults(handler=_serve)

    metrics = subparsers.add_parser(
        "metrics",
        help="serve the Prometheus metrics of this host's fhir-kap processes (for a host that runs "
        "delivery workers without a bridge; `serve --metrics-port` does this beside a bridge)",
    )
    metrics.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    metrics.add_argument("--port", type=int, default=9464, help="port (default 9464)")
    metrics.set_defaults(handler=_metrics)

    partners = subparsers.add_parser("partners", help="manage bridge partners and their tokens")
    psub = partners.add_subparsers(dest="partners_command", metavar="ACTION", required=True)
    add = psub.add_parser(
        "add",
        help="register a partner and print its token (shown once); a revoked name is registered "
        "anew with the settings given",
    )
    add.add_argument("name")
    add.add_argument("--org-identifier", metavar="SYSTEM|VALUE", default=None)
    # action="extend": `--npi A B` and `--npi A --npi B` both keep every value
    add.add_argument("--npi", nargs="+", action="extend", default=[], metavar="NPI")
    add.add_argument(
        "--reference",
        nargs="+",
        action="extend",
        default=[],
        metavar="TYPE/ID",
        help="literal references naming the partner, e.g. Organization/practice-a",
    )
    add.add_argument(
        "--scopes",
        nargs="+",
        default=None,
        help="system/<Type|*>.<read|write|*>, kap/records.write, kap/referrals.write, kap/clinic "
        "(a clinic system: reads everything), kap/consent-authority (a practice that collects "
        "the client's signed releases: the Consents, Practitioners, PractitionerRoles and "
        "Organizations it posts feed the consent gate; without it they are stored but decide "
        "nothing). Default: system/*.read system/*.write",
    )
    add.add_argument("--endpoint", metavar="FHIR_BASE_URL", default=None)
    add.add_argument("--endpoint-auth", default=None, metavar="none|bearer:ENVVAR|smart:CLIENT_ID")
    add.add_argument("--webhook", metavar="URL", default=None)
    add.add_argument(
        "--subscription-origin",
        action="append",
        default=[],
        metavar="ORIGIN",
        help="http(s)://host[:port] where this partner's Subscriptions may have their endpoint, "
        "besides its --webhook URL's origin (repeat for more); the bridge posts nowhere else",
    )
    add.add_argument(
        "--jwks",
        metavar="FILE",
        default=None,
        help="the partner's PUBLIC keys (a JWKS JSON file, RS384 or ES384, each with a kid): it may "
        "then get short-lived SMART backend services tokens from /auth/token",
    )
    add.add_argument(
        "--keys-only",
        action="store_true",
        help="with --jwks: no long-lived token is shown (it is made and stored hashed, and never "
        "usable); the partner authenticates with SMART tokens only",
    )
    add.set_defaults(handler=_partners_add)
    lst = psub.add_parser("list", help="list partners (no secrets)")
    lst.set_defaults(handler=_partners_list)
    rev = psub.add_parser("revoke", help="revoke a partner's token")
    rev.add_argument("name")
    rev.set_defaults(handler=_partners_revoke)
    rot = psub.add_parser(
        "rotate", help="give a partner a new token (shown once); the old one works until --grace ends"
    )
    rot.add_argument("name")
    rot.add_argument(
        "--grace",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="how long the old token keeps working (default 0: it stops now, within the bridge's "
        "5 s token cache); at most 30 days",
    )
    rot.set_defaults(handler=_partners_rotate)
    keys = psub.add_parser("jwks", help="replace a partner's SMART public keys (key rotation)")
    keys.add_argument("name")
    keys.add_argument("file", metavar="FILE", help="a JWKS JSON file of public keys")
    keys.set_defaults(handler=_partners_jwks)
    origins = psub.add_parser(
        "subscription-origins",
        help="set the origins (http(s)://host[:port]) where a partner's Subscriptions may have their "
        "endpoint, besides its webhook's: replaces the list (none given: only the webhook's); "
        "notifications to an origin no longer listed are not sent and their Subscription turns off",
    )
    origins.add_argument("name")
    origins.add_argument(
        "origins",
        nargs="*",
        metavar="ORIGIN",
        help="http(s)://host[:port] (the default port may be left out); none: only the webhook's origin",
    )
    origins.set_defaults(handler=_partners_origins)
    hooks = psub.add_parser("webhooks", help="the rest-hook queue: list jobs, or put a dead one back")
    hooks.add_argument("--state", choices=["pending", "sending", "delivered", "dead"], default=None)
    hooks.add_argument("--limit", type=bounded_int("the limit", 1, 100_000), default=100)
    hooks.add_argument(
        "--retry",
        type=bounded_int("the job id", 1, 2**62),
        metavar="JOB_ID",
        default=None,
        help="send a dead job again (the bridge's workers pick it up within seconds)",
    )
    hooks.add_argument(
        "--retry-dead",
        action="store_true",
        help="send every dead job again (with --partner NAME: only that partner's)",
    )
    hooks.add_argument("--partner", metavar="NAME", default=None)
    hooks.set_defaults(handler=_partners_webhooks)


def _partners(settings: Any) -> Any:
    from ..storage.db import Database
    from ..storage.partners import Partners

    return Partners(Database(settings.db_url))


def _partners_add(args: argparse.Namespace, settings: Any) -> int:
    from ..errors import InputError
    from ._io import write_json

    if args.keys_only and args.jwks is None:
        raise InputError(
            "--keys-only needs --jwks (the keys the partner signs its token requests with)",
            rule="partner:keys-only",
        )
    partner, token = _partners(settings).add(
        args.name,
        scopes=args.scopes,
        org_identifier=args.org_identifier,
        npis=args.npi,
        references=args.reference,
        endpoint_url=args.endpoint,
        endpoint_auth=args.endpoint_auth,
        webhook_url=args.webhook,
        jwks=None if args.jwks is None else _read_jwks(args.jwks),
        subscription_origins=args.subscription_origin,
    )
    out: dict[str, Any] = {"partner": partner.public()}
    if not args.keys_only:
        out["token"] = token
    if partner.webhook_secret:
        out["webhook_secret"] = partner.webhook_secret
    write_json(out)
    if args.keys_only:
        sys.stderr.write("No long-lived token: this partner gets SMART tokens from /auth/token only.\n")
    else:
        sys.stderr.write("The token is shown only this once: store it now.\n")
    return 0


def _read_jwks(path: str) -> Any:
    from .. import jsonio

    with open_input(path) as fh:
        return jsonio.loads(fh.read(), source="jwks")


def _partners_jwks(args: argparse.Namespace, settings: Any) -> int:
    from ._io import write_json

    write_json(_partners(settings).set_jwks(args.name, _read_jwks(args.file)).public())
    return 0


def _partners_origins(args: argparse.Namespace, settings: Any) -> int:
    from ._io import write_json

    write_json(_partners(settings).set_subscription_origins(args.name, args.origins).public())
    return 0


def _partners_list(args: argparse.Namespace, settings: Any) -> int:
    from ._io import write_json

    write_json([p.public() for p in _partners(settings).list()])
    return 0


def _partners_revoke(args: argparse.Namespace, settings: Any) -> int:
    from ._io import write_json

    write_json(_partners(settings).revoke(args.name).public())
    return 0


def _partners_rotate(args: argparse.Namespace, settings: Any) -> int:
    import time
    from datetime import UTC, datetime

    from ._io import write_json

    now = time.time()
    partner, token = _partners(settings).rotate(args.name, grace_seconds=args.grace, now=now)
    until = datetime.fromtimestamp(now + args.grace, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    write_json({"partner": partner.public(), "token": token, "old_token_valid_until": until})
    sys.stderr.write("The new token is shown only this once: store it now.\n")
    return 0


def _partners_webhooks(args: argparse.Namespace, settings: Any) -> int:
    from dataclasses import asdict

    from ..errors import NotFound
    from ..exchange.webhooks import Notifier
    from ..storage.db import Database
    from ._io import write_json

    notifier = Notifier(db=Database(settings.db_url))
    if args.retry is not None:
        moved = notifier.retry(args.retry, partner=args.partner)
        if not moved:
            raise NotFound(f"no dead webhook job {args.retry}", rule="webhook:not-dead")
        write_json(asdict(moved[0]))
        return 0
    if args.retry_dead:
        write_json([asdict(j) for j in notifier.retry(partner=args.partner)])
        return 0
    write_json([asdict(j) for j in notifier.jobs(args.state, limit=args.limit, partner=args.partner)])
    return 0


def _banner(args: argparse.Namespace, settings: Any) -> str:
    """What `serve` says on start: where it listens, the FHIR version, the database (never its
    credentials), the serving model and the version."""
    from urllib.parse import urlsplit

    from .. import __version__

    url = urlsplit(settings.db_url)
    if url.scheme.startswith("sqlite"):
        # sqlite:///relative/path, sqlite:////absolute/path: the file is what follows "///"
        database = (
            f"sqlite {settings.db_url.split(':///', 1)[-1] if ':///' in settings.db_url else settings.db_url}"
        )
    else:  # host, port and database name only: no user, no password, no query (may hold secrets)
        database = f"{url.scheme.split('+')[0]} {url.hostname or 'localhost'}{f':{url.port}' if url.port else ''}{url.path}"
    if args.dev:
        model = "Flask development server (one process; not for production)"
    elif args.sync:
        model = f"{args.workers} sync worker(s){f' x {args.threads} threads' if (args.threads or 1) > 1 else ''} (behind a buffering front only)"
    else:
        threads = 4 if args.threads is None else args.threads
        why = getattr(args, "inline_reason", "")
        inline = (
            f"bodies up to {args.inline_max_bytes:,} bytes on the loop{why}, larger on {threads} threads"
            if args.inline_max_bytes is not None and args.inline_max_bytes >= 0
            else f"every request on {threads} threads{why}"
        )
        model = (
            f"{args.workers} worker(s), requests read whole (read timeout {args.read_timeout:g} s), {inline}"
        )
    public = f"\n  public base: {args.base_url}" if args.base_url else ""
    metrics_port = getattr(args, "metrics_port", None)
    metrics = (
        f"\n  metrics: http://{_address(args.metrics_host, metrics_port)}/metrics"
        if metrics_port is not None
        else ""
    )
    return (
        f"fhir-kap {__version__} bridge on http://{args.host}:{args.port}/fhir (FHIR {settings.fhir_version.value})"
        f"\n  database: {database}\n  serving: {model}{public}{metrics}"
    )


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _tag_local_port(wsgi: Any) -> Any:
    """The WSGI app, with the local port of the accepting socket in the environ (gunicorn's sync
    workers; the default workers set it in bridge/serving.py): /metrics is answered on the metrics
    listener only, told by the socket, never by the Host header."""
    from ..bridge.metrics import LOCAL_PORT

    def tagged(environ: dict[str, Any], start_response: Any) -> Any:
        sock = environ.get("gunicorn.socket")
        if LOCAL_PORT not in environ and sock is not None:
            try:
                environ[LOCAL_PORT] = sock.getsockname()[1]
            except (OSError, IndexError, TypeError):
                pass
        return wsgi(environ, start_response)

    return tagged


def _inline_choice(settings: Any) -> tuple[int, str]:
    """The default `--inline-max-bytes`, chosen by measuring the data disk once (see
    bridge/serving.py), and the reason the banner gives for it."""
    from ..bridge.serving import default_inline_max_bytes
    from ..storage.db import Database

    try:
        seconds = Database(settings.db_url).sync_latency()
    except OSError as exc:
        return default_inline_max_bytes(None), f" (the data disk could not be measured: {exc.strerror})"
    if seconds is None:
        return default_inline_max_bytes(None), " (PostgreSQL: concurrent writes share commits)"
    chosen = default_inline_max_bytes(seconds)
    if chosen >= 0:
        return chosen, f" (the data disk syncs in {seconds * 1000:.2f} ms)"
    return chosen, f" (the data disk syncs in {seconds * 1000:.2f} ms: concurrent writes share commits)"


def _limits(args: argparse.Namespace, settings: Any) -> Any:
    """The default workers' ServeLimits from `serve`'s arguments (`inline_max_bytes` as given,
    or as `_inline_choice` chose: None means every request on the threads)."""
    from ..bridge.serving import ServeLimits

    return ServeLimits(
        max_body_bytes=settings.max_body_bytes,
        read_timeout=args.read_timeout,
        keepalive=args.keepalive,
        threads=max(1, 4 if args.threads is None else args.threads),
        inline_max_bytes=max(-1, -1 if args.inline_max_bytes is None else args.inline_max_bytes),
    )


def _serve(args: argparse.Namespace, settings: Any) -> int:
    from ..errors import InputError

    if args.metrics_port is not None and args.dev:
        raise InputError(
            "--metrics-port needs the worker serving model (not --dev: one listener only)",
            rule="cli:argument",
        )
    if args.metrics_port is not None and args.metrics_port == args.port:
        raise InputError(
            "--metrics-port must differ from --port (metrics stay off the partner port)",
            rule="cli:argument",
        )
    if (args.dev or args.sync) and args.inline_max_bytes is not None:
        raise InputError(
            "--inline-max-bytes is for the default workers (not --sync or --dev, which run "
            "every request on their own threads)",
            rule="cli:argument",
        )
    # Every file the bridge's processes create is its owner's only (the metrics files hold
    # counts by partner; the database, its WAL and lock files are made 0600 by storage anyway).
    os.umask(0o077)
    if args.metrics_port is not None and not args.dev:
        # before prometheus_client is first imported (by the bridge's modules): every worker
        # then writes its counts to this directory, and /metrics adds up all of them
        from ..exchange import telemetry

        telemetry.configure(settings.data_dir / "metrics")
    from ..bridge import BridgeOptions, create_app
    from ..bridge.app import JsonLines

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonLines())
    logging.basicConfig(
        level=getattr(logging, str(settings.log_level).upper(), logging.INFO), handlers=[handler]
    )
    options = BridgeOptions(base_url=args.base_url, bench_echo=args.bench_echo, proxy_hops=args.proxy_hops)
    if not args.dev and not args.sync and args.inline_max_bytes is None:
        args.inline_max_bytes, args.inline_reason = _inline_choice(settings)
    print(_banner(args, settings), flush=True)
    if args.dev:
        create_app(settings, options).run(host=args.host, port=args.port, threaded=True)
        return 0
    from gunicorn.app.base import BaseApplication

    from ..bridge.serving import worker_class

    limits = _limits(args, settings)

    class _Gunicorn(BaseApplication):  # type: ignore[misc]
        def load_config(self) -> None:
            threads = max(1, args.threads or 1)
            if args.sync:
                kind: Any = "gthread" if threads > 1 else "sync"
            else:
                kind = worker_class(limits)
            binds = [_address(args.host, args.port)]
            if args.metrics_port is not None:
                binds.append(_address(args.metrics_host, args.metrics_port))
            cfg = {
                "bind": binds,
                "workers": max(1, args.workers),
                "worker_class": kind,
                "threads": threads if args.sync else 1,
                "accesslog": None,
                "errorlog": "-",
                "loglevel": "warning",
                "timeout": 60,
                "keepalive": max(1, int(args.keepalive)),
                "reuse_port": bool(args.reuse_port),
                "child_exit": _child_exit,
            }
            for key, value in cfg.items():
                self.cfg.set(key, value)

        def load(self) -> Any:
            app = create_app(settings, options)
            if args.metrics_port is not None:
                from ..bridge.metrics import METRICS_PORT

                app.config[METRICS_PORT] = args.metrics_port
                app.wsgi_app = _tag_local_port(app.wsgi_app)  # type: ignore[method-assign]
            return app

    _Gunicorn().run()
    return 0


def _metrics(args: argparse.Namespace, settings: Any) -> int:
    """`fhir-kap metrics`: a small HTTP server answering every path with the metrics of the
    processes writing this host's metrics directory (PROMETHEUS_MULTIPROC_DIR, else
    <data_dir>/metrics) and the queue depths of the database. Stops on SIGTERM or Ctrl-C."""
    import signal
    import threading

    from ..exchange import telemetry

    directory = telemetry.configure(settings.data_dir / "metrics")  # before prometheus_client loads
    from prometheus_client import start_http_server

    from ..storage.db import Database

    server, thread = start_http_server(args.port, args.host, telemetry.registry(Database(settings.db_url)))
    print(
        f"fhir-kap metrics on http://{_address(args.host, args.port)}/metrics (from {directory})", flush=True
    )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stop.wait()
    server.shutdown()
    thread.join(timeout=5)
    return 0


def _child_exit(server: Any, worker: Any) -> None:
    """gunicorn's hook when a worker ends: its live gauges leave the metrics (its counts stay)."""
    from ..exchange import telemetry

    telemetry.process_ended(worker.pid)
