"""`fhir-kap check`: can this FHIR server take part in KAP exchange, and if not, exactly why.

Exit codes: 0 every required check passed, 1 a required check failed, 2 the server could not
be reached (or the command was misused). Secrets come only from environment variables and files.

Room: cli/ (layer 4, entry point): may import any room (heavy imports inside the handlers); nothing imports it.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from ..errors import ConfigError, InputError

__all__ = ["handler", "register"]

GROUP_NAMES = (
    "capability",
    "partner",
    "round-trip",
    "idempotency",
    "search",
    "errors",
    "validation",
    "security",
)
ROLE_NAMES = ("full", "clinic", "practice-receiver", "referral-sender")  # registry.ROLES (kept light here)


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "check",
        help="run conformance checks against a FHIR server",
        description="Check that a FHIR server can hold KAP referrals, sessions, consents and notes "
        "(capability, round-trip, idempotency, search, errors, validation, security). "
        "Exit 0 when every required check passes, 1 otherwise, 2 when the server "
        "cannot be reached.",
    )
    p.add_argument(
        "--server", required=True, metavar="URL", help="FHIR base URL, e.g. https://ehr.example/fhir"
    )
    p.add_argument("--auth", choices=("none", "bearer", "smart"), default="none")
    p.add_argument(
        "--token-env", metavar="VAR", help="environment variable holding the bearer token (--auth bearer)"
    )
    p.add_argument("--client-id", metavar="ID", help="SMART backend client id (--auth smart)")
    p.add_argument(
        "--client-secret-env", metavar="VAR", help="environment variable holding the SMART client secret"
    )
    p.add_argument("--private-key", metavar="FILE", help="PEM private key for SMART private_key_jwt")
    p.add_argument("--key-id", metavar="KID", help="'kid' of the registered public key (with --private-key)")
    p.add_argument(
        "--alg",
        choices=("RS384", "ES384"),
        default="RS384",
        help="signing algorithm of the private_key_jwt assertion (RSA or EC P-384 key)",
    )
    p.add_argument(
        "--scope",
        default="system/*.read system/*.write",
        help="scopes asked for with --auth smart (default: %(default)s)",
    )
    p.add_argument("--token-url", metavar="URL", help="SMART token endpoint (default: discovered)")
    p.add_argument("--fhir-version", choices=("auto", "4.0.1", "5.0.0"), default="auto")
    p.add_argument(
        "--role",
        choices=ROLE_NAMES,
        default="full",
        help="the partner whose server this is: practice-receiver (receives notes as Communications), "
        "referral-sender (holds referrals, receives notes), clinic, or full (every check; default)",
    )
    p.add_argument(
        "--read-only",
        action="store_true",
        help="run only the checks that write nothing (capability, $validate, security): for a production endpoint",
    )
    p.add_argument(
        "--only",
        nargs="+",
        choices=GROUP_NAMES,
        metavar="GROUP",
        help=f"run only these groups ({', '.join(GROUP_NAMES)})",
    )
    p.add_argument("--json", metavar="FILE", help="write the JSON report here")
    p.add_argument("--junit", metavar="FILE", help="write a JUnit XML report here (for CI)")
    p.add_argument("--html", metavar="FILE", help="write a self-contained HTML report here")
    p.add_argument(
        "--testreport",
        metavar="FILE",
        help="write a FHIR TestReport (JSON, in the server's release: R4 or R5) here",
    )
    p.add_argument("--keep-data", action="store_true", help="do not delete the test data afterwards")
    p.add_argument("--examples", metavar="DIR", help=argparse.SUPPRESS)  # tests: other example set
    p.set_defaults(handler=handler)


def _env_secret(var: str | None, what: str) -> str:
    if not var:
        raise ConfigError(f"{what}: name the environment variable that holds it", rule="check:secret")
    value = os.environ.get(var)
    if not value:
        raise ConfigError(f"{what}: environment variable '{var}' is not set or empty", rule="check:secret")
    return value


def _auth(args: argparse.Namespace) -> tuple[Any, list[str]]:
    from ..client import BearerAuth, NoAuth, SmartBackendAuth

    if args.auth == "none":
        return NoAuth(), []
    if args.auth == "bearer":
        token = _env_secret(args.token_env, "--auth bearer needs --token-env")
        return BearerAuth(token), [token]
    if not args.client_id:
        raise ConfigError("--auth smart needs --client-id", rule="check:secret")
    if args.private_key:
        try:
            pem = Path(args.private_key).read_bytes()
        except OSError as exc:
            raise InputError(
                f"cannot read private key '{args.private_key}': {exc.strerror}",
                rule="input:unreadable",
                code="not-found",
            ) from None
        return SmartBackendAuth(
            args.client_id,
            token_url=args.token_url,
            private_key_pem=pem,
            key_id=args.key_id,
            alg=args.alg,
            scope=args.scope,
        ), []
    secret = _env_secret(args.client_secret_env, "--auth smart needs --client-secret-env or --private-key")
    return SmartBackendAuth(
        args.client_id, token_url=args.token_url, client_secret=secret, scope=args.scope
    ), [secret]


class _Progress:
    """The run's progress on stderr, on a terminal only (tqdm: a bar over the checks, the one now
    running and the counts so far); silent when stderr is piped or with `fhir-kap --quiet`, so
    nothing a script or CI log reads changes. tqdm is imported only when it shows."""

    def __init__(self, stream: Any, *, quiet: bool = False) -> None:
        self.stream = stream
        self.show = not quiet and bool(getattr(stream, "isatty", lambda: False)())
        self.bar: Any = None
        self.counts = {"pass": 0, "fail": 0, "skip": 0}

    def __call__(self, done: int, total: int, result: Any, check: Any) -> None:
        if not self.show:
            return
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(
                total=total, unit="check", file=self.stream, leave=False, dynamic_ncols=True, mininterval=0.2
            )
        if result is None:
            self.bar.set_description_str(f"{check.id} {check.title[:40]}", refresh=False)
        else:
            self.counts[result.outcome] = self.counts.get(result.outcome, 0) + 1
            self.bar.set_postfix(self.counts, refresh=False)
            self.bar.n = done
            self.bar.refresh()
        if result is not None and done >= total:
            self.bar.close()
            self.bar = None


def _write(path: str, text: str) -> None:
    try:
        Path(path).write_text(text, encoding="utf-8")
    except OSError as exc:
        raise InputError(f"cannot write '{path}': {exc.strerror}", rule="output:unwritable") from None


def handler(args: argparse.Namespace, settings: Any) -> int:
    from ..config import Release
    from ..conformance import CheckConfig, run_checks
    from ..conformance.reports import console_table, html_report, junit_xml
    from ..conformance.testreport import test_report
    from ..jsonio import dumps

    auth, secrets = _auth(args)
    config = CheckConfig(
        server=args.server.rstrip("/"),
        auth=auth,
        auth_kind=args.auth,
        fhir_version=args.fhir_version,
        only=tuple(args.only or ()),
        keep_data=args.keep_data,
        secrets=tuple(secrets),
        examples_dir=Path(args.examples) if args.examples else None,
        role=args.role,
        read_only=args.read_only,
    )
    progress = _Progress(sys.stderr, quiet=bool(getattr(args, "quiet", False)))
    report = run_checks(config, progress=progress).to_dict()
    sys.stdout.write(console_table(report))
    sys.stdout.flush()
    if args.json:
        _write(args.json, dumps(report, pretty=True).decode() + "\n")
    if args.junit:
        _write(args.junit, junit_xml(report))
    if args.html:
        _write(args.html, html_report(report))
    if args.testreport:
        version = args.fhir_version if args.fhir_version != "auto" else str(report.get("fhir_version") or "")
        release = Release.R5 if version.startswith("5.") else Release.R4
        _write(args.testreport, dumps(test_report(report, release), pretty=True).decode() + "\n")
    return 0 if report["passed"] else 1
