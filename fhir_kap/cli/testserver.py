"""`fhir-kap testserver`: start SEKMET, the FHIR R4 test server, standalone and the right way
(base_url set to the address it listens on, so paging links work; simulator off; 127.0.0.1 only;
a fresh data directory), print its base URL and the `fhir-kap check` command, run until Ctrl-C.

Room: cli/ (layer 4, entry point): may import any room (heavy imports inside the handlers); nothing imports it.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path
from typing import Any

from ..errors import ConfigError

__all__ = ["handler", "register"]


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "testserver",
        help="start a local SEKMET FHIR R4 test server for `fhir-kap check`",
        description="Start SEKMET (pip install 'sekmet-fhir==0.1.1') on 127.0.0.1 with its base URL "
        "set, its simulator off and a fresh data directory; print the base URL; stop on Ctrl-C.",
    )
    p.add_argument("--port", type=int, default=0, help="port to listen on (default: a free one)")
    p.add_argument(
        "--data-dir",
        metavar="DIR",
        help="a new or empty directory for its data (default: a temporary one, removed on exit)",
    )
    p.add_argument(
        "--token-env",
        metavar="VAR",
        help="require this environment variable's value as a bearer token (default: no auth)",
    )
    p.set_defaults(handler=handler)


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def handler(args: argparse.Namespace, settings: Any) -> int:
    import os

    from ..demo.testserver import SekmetServer

    data_dir = Path(args.data_dir) if args.data_dir else None
    if data_dir is not None and data_dir.exists() and any(data_dir.iterdir()):
        raise ConfigError(
            f"--data-dir '{data_dir}' is not empty: give a new or empty directory (a test server starts fresh)",
            rule="testserver:data-dir",
        )
    tokens = []
    if args.token_env:
        token = os.environ.get(args.token_env)
        if not token:
            raise ConfigError(
                f"environment variable '{args.token_env}' is not set or empty", rule="check:secret"
            )
        tokens.append(token)
    server = SekmetServer(data_dir=data_dir, port=args.port, tokens=tokens)
    try:
        server.start()
    except RuntimeError as exc:
        raise ConfigError(str(exc), rule="testserver:start") from None
    auth = f" --auth bearer --token-env {args.token_env}" if args.token_env else ""
    print(f"SEKMET FHIR R4 test server at {server.base_url} (data in {server.data_dir})", flush=True)
    print(f"check it:  fhir-kap check --server {server.base_url}{auth} --html check.html", flush=True)
    print("stop it:   Ctrl-C", flush=True)
    signal.signal(signal.SIGTERM, _interrupt)  # stop SEKMET on SIGTERM too
    try:
        while server.running:
            time.sleep(0.5)
        print("SEKMET exited", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        server.stop()
