"""`fhir-kap operators ...`: the console's operator accounts (add, passwd, disable, enable, list, log).

A password is read from the terminal (asked twice, not echoed) or, with `--password-stdin`, from
the first line of standard input; never from the command line, where other users of the machine
could read it in the process list and the shell keeps it in its history.

Room: cli/ (layer 4, entry point): may import any room (heavy imports inside the handlers); nothing imports it.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ..errors import InputError

__all__ = ["handler", "register"]


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "operators",
        help="operator accounts of the web console (/console)",
        description="Operator accounts of the bridge's web console: people, not partners. Passwords "
        "are hashed with argon2id; they are read from a prompt or stdin, never from argv.",
    )
    sub = p.add_subparsers(dest="operators_command", metavar="ACTION", required=True)
    for name, text in (
        ("add", "make an account (password from a prompt, or --password-stdin)"),
        ("passwd", "set a new password (ends the operator's sessions, unlocks the account)"),
    ):
        a = sub.add_parser(name, help=text)
        a.add_argument("name")
        a.add_argument(
            "--password-stdin", action="store_true", help="read the password from the first line of stdin"
        )
    for name, text in (
        ("disable", "disable an account (its sessions end at once)"),
        ("enable", "enable a disabled account"),
    ):
        sub.add_parser(name, help=text).add_argument("name")
    sub.add_parser("list", help="the accounts (names, state; never hashes)")
    log = sub.add_parser("log", help="the operator log: logins, logouts and console actions, newest first")
    log.add_argument("--operator", default=None)
    log.add_argument("--action", default=None)
    log.add_argument("--limit", type=int, default=50)
    p.set_defaults(handler=handler)


def _password(args: argparse.Namespace) -> str:
    if args.password_stdin:
        line = sys.stdin.readline()
        return line[:-1] if line.endswith("\n") else line
    import getpass

    if not sys.stdin.isatty():
        raise InputError(
            "no terminal to ask for the password on: pipe it with --password-stdin", rule="cli:argument"
        )
    first = getpass.getpass(f"Password for operator {args.name}: ")
    if getpass.getpass("Again: ") != first:
        raise InputError("the two passwords differ", rule="operator:password")
    return first


def handler(args: argparse.Namespace, settings: Any) -> int:
    from ..storage.db import Database
    from ..storage.operators import Operators
    from ._io import write_json

    operators = Operators(Database(settings.db_url))
    action = args.operators_command
    if action == "add":
        op = operators.add(args.name, _password(args))
        print(f"operator {op.name} added; log in at /console/login")
    elif action == "passwd":
        operators.set_password(args.name, _password(args))
        print(f"operator {args.name}: password changed, sessions ended")
    elif action in ("disable", "enable"):
        operators.set_disabled(args.name, action == "disable")
        print(f"operator {args.name}: {action}d")
    elif action == "list":
        write_json(
            [
                {
                    "name": o.name,
                    "created": o.created,
                    "disabled": o.disabled,
                    "locked": o.locked_until is not None,
                }
                for o in operators.list()
            ]
        )
    elif action == "log":
        from dataclasses import asdict

        if not 1 <= args.limit <= 100_000:
            raise InputError("--limit must be 1-100000", rule="cli:argument")
        write_json(
            [
                asdict(e)
                for e in operators.entries(operator=args.operator, action=args.action, limit=args.limit)
            ]
        )
    return 0
