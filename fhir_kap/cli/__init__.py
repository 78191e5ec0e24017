"""`fhir-kap` command line (layer 4, entry point): one dispatcher, one module per command group.

Each module in COMMAND_MODULES exposes `register(subparsers)` and sets `handler` on its
parsers: `handler(args, settings) -> int` (a group's handler may live in a module of its own:
`outbox` is registered by `exchange` and handled in `outbox`). Modules keep heavy imports (fhir.resources,
flask, requests) inside their handlers so `fhir-kap --help` starts fast.
Every KapError is printed as an OperationOutcome on stderr; no traceback for bad input.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

from ..errors import Issue, KapError, operation_outcome

__all__ = ["main", "build_parser"]

COMMAND_MODULES = ("records", "consent", "exchange", "bridge", "check", "testserver", "demo", "operators")


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = argparse.ArgumentParser(
        prog="fhir-kap", description="FHIR adapter for Ketamine-Assisted Psychotherapy collaborative care."
    )
    parser.add_argument("--version", action="version", version=f"fhir-kap {__version__}")
    parser.add_argument(
        "--config", metavar="FILE", default=None, help="settings file (TOML); default $FHIR_KAP_CONFIG"
    )
    parser.add_argument(
        "--quiet",
        action="store_true",
        help="no progress display on a terminal (it is never shown when stderr is piped)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(f"{__name__}.{name}").register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler = getattr(args, "handler", None)
    if handler is None:
        parser.print_help()
        return 2
    try:
        from ..config import load_settings

        settings = load_settings(getattr(args, "config", None))
        return int(handler(args, settings))
    except KapError as exc:
        print_outcome(exc.operation_outcome())
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0
    except Exception as exc:  # a bug, not bad input: say so without a traceback unless asked
        if os.environ.get("FHIR_KAP_DEBUG"):
            raise
        print_outcome(
            operation_outcome(
                [
                    Issue(
                        "fatal",
                        "exception",
                        f"internal error ({type(exc).__name__}); rerun with FHIR_KAP_DEBUG=1 for details",
                        rule="internal",
                    )
                ]
            )
        )
        return 70


def print_outcome(outcome: dict) -> None:
    from ..jsonio import dumps

    sys.stderr.write(dumps(outcome, pretty=True).decode() + "\n")
    sys.stderr.flush()
