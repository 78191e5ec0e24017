"""Shared plumbing for command modules: open inputs ('-' is stdin), write JSON out, bounded numbers.

Room: cli/ (layer 4, entry point): may import any room (heavy imports inside the handlers); nothing imports it.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import IO, Any, TypeVar

from ..errors import InputError

__all__ = ["bounded_int", "open_input", "progress", "write_json"]


def bounded_int(name: str, low: int, high: int) -> Callable[[str], int]:
    """An argparse `type`: a whole number from `low` to `high` (anything else is a usage error)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a whole number") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{name} must be between {low} and {high}")
        return value

    return parse


@contextmanager
def open_input(path: str) -> Iterator[IO[bytes]]:
    """Open a path for binary reading; '-' is stdin. Unreadable files raise InputError."""
    if path == "-":
        yield sys.stdin.buffer
        return
    try:
        fh = open(path, "rb")
    except OSError as exc:
        raise InputError(
            f"cannot read '{path}': {exc.strerror}", rule="input:unreadable", code="not-found"
        ) from None
    with fh:
        yield fh


def write_json(obj: object, *, pretty: bool = True, stream: IO[bytes] | None = None) -> None:
    from ..jsonio import dumps

    out = stream or sys.stdout.buffer
    out.write(dumps(obj, pretty=pretty))
    out.write(b"\n")
    out.flush()


T = TypeVar("T")


def progress(
    items: Iterable[T], args: argparse.Namespace, *, unit: str, total: int | None = None
) -> Iterable[T]:
    """`items`, counted on stderr (tqdm: rate and count, a bar when `total` is known) while a long
    run goes on, but only on a terminal: silent when stderr is piped or with `--quiet`, so
    nothing a script reads ever changes. tqdm is imported only when it shows."""
    if getattr(args, "quiet", False) or not sys.stderr.isatty():
        return items
    from tqdm import tqdm

    bar: Any = tqdm(
        items, total=total, unit=unit, file=sys.stderr, leave=False, mininterval=0.5, dynamic_ncols=True
    )
    return bar  # type: ignore[no-any-return]
