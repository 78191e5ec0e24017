"""`fhir-kap send`, `deliver` (the delivery worker), `audit`, and the `outbox ...` parsers (handled in cli/outbox.py).

Endpoints come from the settings (`[endpoints.NAME]` tables); their secrets only from the
environment variable each endpoint names in `token_env`, never from the command line, and
they are never printed. Every delivery re-checks consent at send time against the consent
context stored beside the outbox (`outbox add-context`), and audits the decision.

Room: cli/ (layer 4, entry point): may import any room (heavy imports inside the handlers); nothing imports it.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError, InputError
from ._io import bounded_int, progress, write_json
from .outbox import open_outbox, outbox_handler

if TYPE_CHECKING:  # heavy imports stay inside the handlers
    from ..client import FhirClient
    from ..config import EndpointConfig, Settings
    from ..storage.outbox import Outbox, OutboxItem

__all__ = ["client_factory", "consent_checker", "register"]

_count = bounded_int("the limit", 1, 100_000)
_item_id = bounded_int("the item id", 1, 2**62)


def register(subparsers: Any) -> None:
    d = subparsers.add_parser(
        "deliver",
        help="run the delivery worker (outbox -> FHIR servers)",
        description="Deliver queued resources to their FHIR endpoints: consent is re-checked at "
        "send time, creates are conditional on the business identifier, failures are "
        "retried with backoff and dead-lettered after max_attempts. Stops on SIGTERM "
        "or Ctrl-C after the current batch.",
    )
    d.add_argument("--once", action="store_true", help="deliver what is due now, then exit")
    d.add_argument(
        "--worker-id",
        metavar="ID",
        help="name of this worker (default host:slot-N: the first slot free on this host, kept "
        "while the worker runs, so a worker restarted after a crash gets its slot back); a "
        "restarted worker with the same id takes back its unfinished items at once",
    )
    d.add_argument(
        "--poll",
        type=float,
        default=1.0,
        metavar="SECONDS",
        help="wait between polls of an empty queue (default 1)",
    )
    d.add_argument(
        "--lease",
        type=float,
        default=300.0,
        metavar="SECONDS",
        help="how long a claimed item stays reserved for this worker (default 300); "
        "after that another worker may take it over",
    )
    d.add_argument(
        "--transactions",
        action="store_true",
        help="send each endpoint's items as transaction Bundles (default: one create each)",
    )
    d.add_argument("--json", action="store_true", help="print the final counts as JSON")
    d.set_defaults(handler=deliver_handler)

    snd = subparsers.add_parser(
        "send",
        help="map, validate and consent-gate records, then queue them for delivery",
        description="Each KAP record (or FHIR resource) is checked, mapped, validated and decided "
        "by the consent gate for each recipient; permitted ones are labelled and queued "
        "in the outbox (run `fhir-kap deliver`). Consents and parties become consent "
        "context. Prints one JSON line per document; exit 0 when nothing was refused, "
        "1 otherwise.",
    )
    snd.add_argument("files", nargs="+", metavar="FILE", help="JSON or NDJSON; - for stdin")
    snd.add_argument(
        "--to",
        metavar="ENDPOINT|URL",
        help="configured endpoint name, or a FHIR base URL (no auth); default: the only configured endpoint",
    )
    snd.add_argument(
        "--recipient",
        action="append",
        metavar="REF",
        help="recipient (Practitioner/x or SYSTEM|VALUE) for resources that name none",
    )
    snd.add_argument("--purpose", default="TREAT", help="v3-ActReason purpose of use (default TREAT)")
    snd.set_defaults(handler=send_handler)

    aud = subparsers.add_parser(
        "audit",
        help="query the append-only audit trail (AuditEvent, Provenance)",
        description="Newest first. Every consent decision (permit or deny) is an AuditEvent; every "
        "permitted disclosure a Provenance citing the exact Consent version.",
    )
    aud.add_argument("--type", choices=("AuditEvent", "Provenance"), dest="resource_type")
    aud.add_argument("--patient", metavar="REF", help="e.g. Patient/client-0001")
    aud.add_argument("--recipient", metavar="REF")
    aud.add_argument("--consent", metavar="REF", help="Consent/id or Consent/id/_history/v")
    aud.add_argument(
        "--outcome",
        choices=("permit", "deny", "malformed"),
        help="decision outcome (AuditEvent outcome 0 / 4 / 8)",
    )
    aud.add_argument("--since", metavar="DATE|INSTANT")
    aud.add_argument("--limit", type=_count, default=50)
    aud.add_argument("--json", action="store_true", help="print the resources as a JSON Bundle")
    aud.set_defaults(handler=audit_handler)

    o = subparsers.add_parser(
        "outbox",
        help="inspect and operate the outbox",
        description="List, show, retry, hold, release and purge queued items.",
    )
    osub = o.add_subparsers(dest="outbox_command", metavar="ACTION", required=True)
    ls = osub.add_parser("list", help="list items (newest state first by id)")
    ls.add_argument("--state", choices=("pending", "sending", "delivered", "held", "dead"))
    ls.add_argument("--endpoint", metavar="NAME")
    ls.add_argument("--limit", type=_count, default=100)
    show = osub.add_parser("show", help="one item in detail")
    show.add_argument("id", type=_item_id)
    show.add_argument(
        "--resource", action="store_true", help="include the queued resource (it holds patient data)"
    )
    retry = osub.add_parser(
        "retry",
        help="dead or held item(s) back to pending, attempts reset: one ID, or every item of "
        "--state (optionally of one --endpoint)",
    )
    retry.add_argument("id", type=_item_id, nargs="?")
    retry.add_argument("--state", choices=("dead", "held"), help="every item in this state (bulk)")
    retry.add_argument("--endpoint", metavar="NAME", help="with --state: only this endpoint's items")
    hold = osub.add_parser("hold", help="hold a pending item")
    hold.add_argument("id", type=_item_id)
    hold.add_argument("--reason", default="held by an operator")
    release = osub.add_parser("release", help="held item back to pending")
    release.add_argument("id", type=_item_id)
    purge = osub.add_parser("purge-delivered", help="delete delivered items")
    purge.add_argument(
        "--older-than",
        type=float,
        default=30.0,
        metavar="DAYS",
        help="delivered more than DAYS days ago (default 30)",
    )
    ctx = osub.add_parser(
        "add-context",
        help="store Consents / PractitionerRoles / Organizations / Practitioners "
        "/ Patients for the send-time consent re-check",
    )
    ctx.add_argument("files", nargs="+", metavar="FILE", help="FHIR JSON, NDJSON or Bundles ('-' is stdin)")
    for p in (ls, show, retry, hold, release, purge, ctx):
        p.add_argument("--json", action="store_true", help="print JSON instead of a table")
        p.set_defaults(handler=outbox_handler)


# ---------------------------------------------------------------- shared wiring


def _secret(ep: EndpointConfig, what: str, env: Any) -> str:
    if not ep.token_env:
        raise ConfigError(
            f"Endpoint '{ep.name}' ({ep.auth} auth) needs token_env: the name of the "
            f"environment variable holding its {what}",
            rule="settings:secret",
        )
    value = env.get(ep.token_env)
    if not value:
        raise ConfigError(
            f"Endpoint '{ep.name}': environment variable '{ep.token_env}' (its {what}) is not set or empty",
            rule="settings:secret",
        )
    return str(value)


def client_factory(
    settings: Settings,
    env: Any = None,
    session_factory: Callable[[], Any] | None = None,
    partner_endpoint: Callable[[str], Any] | None = None,
) -> Callable[[str], FhirClient]:
    """`client_for(endpoint_name)`: a cached FhirClient per configured endpoint, with its auth
    built from the endpoint's settings and the environment. A name the settings lack may be a
    bridge partner registered with `--endpoint` (`partner_endpoint(name)` gives its
    EndpointConfig) or, from `send --to URL`, a URL (no auth). Unknown endpoints and missing
    secrets raise ConfigError naming the endpoint or the variable (never a value)."""
    import os

    from ..client import BearerAuth, FhirClient, NoAuth, SmartBackendAuth

    env = os.environ if env is None else env
    cache: dict[str, FhirClient] = {}

    def build(ep: EndpointConfig) -> FhirClient:
        if ep.auth == "bearer":
            auth: Any = BearerAuth(_secret(ep, "bearer token", env))
        elif ep.auth == "smart":
            if not ep.client_id:
                raise ConfigError(f"Endpoint '{ep.name}': smart auth needs client_id", rule="settings")
            if ep.private_key_path:
                try:
                    with open(ep.private_key_path, "rb") as fh:
                        pem = fh.read()
                except OSError as exc:
                    raise ConfigError(
                        f"Endpoint '{ep.name}': cannot read private_key_path "
                        f"'{ep.private_key_path}' ({exc.strerror})",
                        rule="settings",
                    ) from None
                auth = SmartBackendAuth(
                    ep.client_id,
                    token_url=ep.token_url,
                    private_key_pem=pem,
                    key_id=ep.key_id,
                    alg=ep.alg,
                    scope=ep.scope,
                )
            else:
                auth = SmartBackendAuth(
                    ep.client_id,
                    token_url=ep.token_url,
                    client_secret=_secret(ep, "client secret", env),
                    scope=ep.scope,
                )
        else:
            auth = NoAuth()
        session = session_factory() if session_factory else None
        return FhirClient(
            ep.base_url, auth=auth, session=session, timeout=(5.0, float(settings.request_timeout))
        )

    def client_for(name: str) -> FhirClient:
        if name not in cache:
            ep = settings.endpoints.get(name)
            if ep is None and partner_endpoint is not None:
                ep = partner_endpoint(name)
            if ep is None and name.startswith(("http://", "https://")):
                from ..config import EndpointConfig

                ep = EndpointConfig(name=name, base_url=name)  # `send --to URL`: no auth
            if ep is None:
                raise ConfigError(
                    f"Endpoint '{name}' is not configured (add [endpoints.{name}] to the settings file)",
                    rule="settings:endpoint",
                )
            cache[name] = build(ep)
        return cache[name]

    return client_for


def consent_checker(
    outbox: Outbox, audit: Any, settings: Settings, clock: Callable[[], datetime] = lambda: datetime.now(UTC)
) -> Callable[[OutboxItem], tuple[bool, str]]:
    """The send-time consent re-check (fhir_kap.exchange.outbound.send_time_check) for these settings."""
    from ..exchange.outbound import send_time_check

    return send_time_check(outbox, audit, settings.fhir_version, clock)


def partner_endpoints(db: Any) -> Callable[[str], Any]:
    """EndpointConfig of a bridge partner's own FHIR server, from `partners add --endpoint URL
    [--endpoint-auth none|bearer:ENVVAR|smart:CLIENT_ID]`; None for other names."""
    from ..config import EndpointConfig
    from ..storage.partners import Partners

    partners = Partners(db)

    def lookup(name: str) -> EndpointConfig | None:
        partner = partners.get(name)
        if partner is None or partner.revoked or not partner.endpoint_url:
            return None
        kind, _, value = (partner.endpoint_auth or "none").partition(":")
        if kind == "bearer":
            return EndpointConfig(name=name, base_url=partner.endpoint_url, auth="bearer", token_env=value)
        if kind == "smart":
            return EndpointConfig(
                name=name,
                base_url=partner.endpoint_url,
                auth="smart",
                client_id=value,
                token_env=f"FHIR_KAP_SECRET_{name.upper().replace('-', '_')}",
            )
        return EndpointConfig(name=name, base_url=partner.endpoint_url)

    return lookup


# ---------------------------------------------------------------- audit


def audit_handler(args: argparse.Namespace, settings: Settings) -> int:
    from ..storage.auditlog import OUTCOME_CODES, OUTCOME_NAMES, disclosed, extract, reason_codes

    _, audit = open_outbox(settings)
    if args.limit < 1:
        raise InputError("--limit must be at least 1", rule="cli:argument")
    rows = audit.query(
        args.resource_type,
        args.patient,
        OUTCOME_CODES.get(args.outcome) if args.outcome else None,
        args.since,
        recipient=args.recipient,
        consent=args.consent,
        limit=args.limit,
    )
    if args.json:
        write_json(
            {
                "resourceType": "Bundle",
                "type": "searchset",
                "total": len(rows),
                "entry": [{"resource": r} for r in rows],
            }
        )
        return 0
    print(
        f"{'RECORDED':<26} {'TYPE':<11} {'OUTCOME':<8} {'RESOURCE':<34} {'PATIENT':<22} "
        f"{'RECIPIENT':<28} {'CONSENT':<24} REASON"
    )
    for r in rows:
        rec = extract(r)
        print(
            f"{rec.recorded[:26]:<26} {rec.resource_type:<11} "
            f"{OUTCOME_NAMES.get(rec.outcome or '', rec.outcome or '-'):<8} {disclosed(r) or '-':<34} "
            f"{rec.patient or '-':<22} {rec.recipient or '-':<28} {rec.consent_ref or '-':<24} "
            f"{','.join(reason_codes(r)) or '-'}"
        )
    return 0


# ---------------------------------------------------------------- send


def _target(settings: Settings, to: str | None) -> Any:
    from ..exchange.outbound import Target

    if to is None:
        if len(settings.endpoints) != 1:
            raise InputError(
                "say where to send: --to ENDPOINT or --to URL (settings name "
                f"{len(settings.endpoints)} endpoints)",
                rule="cli:argument",
            )
        to = next(iter(settings.endpoints))
    ep = settings.endpoints.get(to)
    if ep is None:
        ep = next((e for e in settings.endpoints.values() if e.base_url.rstrip("/") == to.rstrip("/")), None)
    if ep is not None:  # a configured endpoint receives only for the recipients it lists
        return Target(ep.name, ep.base_url, serves=tuple(ep.recipients))
    from urllib.parse import urlsplit

    parts = urlsplit(to)
    if parts.scheme == "https" or (
        parts.scheme == "http" and parts.hostname in ("127.0.0.1", "localhost", "::1")
    ):
        return Target(to, to)  # ad hoc: the command line names both the server and the recipients
    if parts.scheme == "http":
        raise ConfigError(
            f"Refusing plain http to '{parts.hostname}': patient data goes over https "
            "(plain http only to this machine)",
            rule="settings:endpoint",
        )
    raise ConfigError(f"Endpoint '{to}' is not configured and is not a URL", rule="settings:endpoint")


def send_handler(args: argparse.Namespace, settings: Settings) -> int:
    from ..exchange.outbound import Outbound
    from ..jsonio import iter_documents
    from ..records.pipeline import Pipeline
    from ._io import open_input

    target = _target(settings, args.to)
    outbox, audit = open_outbox(settings)
    out = Outbound(
        Pipeline.load(),
        outbox,
        audit,
        release=settings.fhir_version,
        purpose=args.purpose,
        actor="fhir-kap send",
    )
    docs = []  # read every input first: a malformed line refuses the run before anything is queued
    for path in args.files:
        with open_input(path) as stream:
            docs += list(iter_documents(stream, source="stdin" if path == "-" else path))
    refused = 0
    for label, doc in docs:
        result = out.submit(label, doc, target, recipients=args.recipient)
        refused += result.outcome == "refused"
        write_json(result.to_json(), pretty=False)
    return 1 if refused else 0


# ---------------------------------------------------------------- deliver


def deliver_handler(args: argparse.Namespace, settings: Settings) -> int:
    import logging
    import signal
    import threading

    from ..exchange import telemetry

    # Counts go to the data dir's metrics directory (unless PROMETHEUS_MULTIPROC_DIR names one),
    # which the bridge's --metrics-port listener and `fhir-kap metrics` read: before the worker,
    # whose observer loads prometheus_client.
    # (Called in-process after prometheus_client was loaded, as tests do, counts stay in memory.)
    if "prometheus_client" not in sys.modules or telemetry.multiprocess_dir() is not None:
        telemetry.configure(settings.data_dir / "metrics")
    from ..exchange.delivery import Backoff, DeliveryWorker, Stats, claim_worker_slot

    logging.basicConfig(
        level=getattr(logging, str(settings.log_level).upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if args.poll <= 0 or args.lease <= 0:
        raise InputError("--poll and --lease must be positive numbers of seconds", rule="cli:argument")
    outbox, audit = open_outbox(settings)
    # a stable id per slot on this host (kept by a lock for as long as this process runs): a worker
    # restarted after a crash recovers its own leases at once
    worker_id, _slot = (
        (args.worker_id, None) if args.worker_id else claim_worker_slot(settings.data_dir / "workers")
    )
    worker = DeliveryWorker(
        outbox,
        client_factory(settings, partner_endpoint=partner_endpoints(outbox.db)),
        consent_checker(outbox, audit, settings),
        batch_size=settings.batch_size,
        transaction_size=settings.batch_size,
        max_attempts=settings.max_attempts,
        backoff=Backoff(base=settings.backoff_base, cap=settings.backoff_max),
        worker_id=worker_id,
        use_transactions=args.transactions,
        lease_seconds=args.lease,
    )
    if args.once:
        outbox.recover(worker.worker_id)
        total = Stats()
        backlog = outbox.counts().get("pending", 0)
        for _ in progress(itertools.count(), args, unit="batch") if backlog else ():
            stats = worker.run_once()  # a draining backlog shows its batches and rate on a terminal
            total += stats
            if stats.claimed == 0:
                break
    else:
        stop = threading.Event()

        def on_signal(signum: int, frame: Any) -> None:
            stop.set()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        total = worker.run_forever(stop, args.poll)
    counts = outbox.counts()
    if args.json:
        write_json({"worker": worker.worker_id, "stats": total.as_dict(), "outbox": counts})
    else:
        done = ", ".join(f"{k} {v}" for k, v in total.as_dict().items() if v) or "nothing to do"
        print(f"worker {worker.worker_id}: {done}")
        print("outbox: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    return 0
