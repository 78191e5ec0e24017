"""`fhir-kap demo`: the KAP journey end to end (see fhir_kap/demo/journey.py).

Room: cli/ (layer 4, entry point): may import any room (heavy imports inside the handlers); nothing imports it.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="play the whole KAP journey against a local FHIR server and the bridge",
        description="Starts a local SEKMET FHIR R4 server as the referring practice's EHR and the "
        "fhir-kap bridge (SQLite), plays a referral → consent → sessions → continuity "
        "notes journey through the real HTTP interfaces, prints the timeline, then keeps "
        "serving until Ctrl-C. Exit 0 when the practice's EHR holds exactly the "
        "expected notes.",
    )
    p.add_argument("--once", action="store_true", help="stop after the journey (for scripts and tests)")
    p.add_argument(
        "--dir", metavar="DIR", default=None, help="working folder, wiped first (default: <data_dir>/demo)"
    )
    p.set_defaults(handler=cmd_demo)


def cmd_demo(args: argparse.Namespace, settings: Any) -> int:
    from ..demo.journey import run_demo

    root = Path(args.dir) if args.dir else Path(settings.data_dir) / "demo"
    return run_demo(root.resolve(), once=args.once, out=lambda line: print(line, flush=True))
