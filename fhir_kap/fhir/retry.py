"""The one retry rule (layer 0, base): which HTTP answers are worth another attempt, how long
to wait, and how to read `Retry-After`.

Two kinds of repeat use it: the client's at-once repeats of one request (`RETRY_STATUSES`,
`RETRY_STATUSES_UNSAFE`) and the back-off schedule of the durable queues (`retry_later` and
`Backoff`, used by the outbox's delivery worker and by the webhook sender).

Room: fhir/ (layer 0, base): may import errors, config, jsonio and fhir/ only.
"""

from __future__ import annotations

import email.utils
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

from .digits import ascii_digits

__all__ = ["Backoff", "RETRY_STATUSES", "RETRY_STATUSES_UNSAFE", "retry_after_seconds", "retry_later"]

# Retried statuses: the server (or a proxy in front of it) says "not now", not "never".
# 500 is deliberately absent: it usually means this very request breaks the server (SEKMET
# answers 500 to invalid UTF-8, for example), so repeating it at once only repeats the
# failure; the outbox decides about later attempts with its own, much longer backoff.
RETRY_STATUSES = frozenset({429, 502, 503, 504})
# For a request that is not idempotent (a plain POST) only answers proving the server did not
# act on it are retried; a 502/504 or a broken response may come after the create happened.
RETRY_STATUSES_UNSAFE = frozenset({429, 503})


@dataclass(frozen=True)
class Backoff:
    """Wait before attempt k+1 after k failed attempts: min(cap, base * 2**(k-1)), reduced by a
    random fraction of at most `jitter` (0 none, 1 full jitter). Used by the outbox's delivery
    worker and by the bridge's rest-hook sender."""

    base: float = 1.0
    cap: float = 300.0
    jitter: float = 0.5
    max_retry_after: float = 86_400.0  # a Retry-After past this (or not finite) is taken as this

    def delay(self, attempts: int, rand: Callable[[], float] = random.random) -> float:
        d = min(self.cap, self.base * (2 ** max(0, attempts - 1)))
        return d * (1.0 - self.jitter * rand())

    def wait(
        self, attempts: int, retry_after: float | None = None, rand: Callable[[], float] = random.random
    ) -> float:
        """`delay`, unless the other side asked for longer (`Retry-After`): that wins, up to
        `max_retry_after`, so no answer can put a job off for ever."""
        wait = self.delay(attempts, rand)
        if isinstance(retry_after, (int, float)) and retry_after > wait:
            return min(float(retry_after), self.max_retry_after)
        return wait


def retry_later(status: int) -> bool:
    """Whether an HTTP answer is worth another attempt later, on a back-off schedule (the
    outbox's delivery worker, the rest-hook sender): "not now" (408, 429) or a failure on the
    server's side (5xx), except 501 and 505, which waiting does not change. The client's own
    at-once repeats (`RETRY_STATUSES`) are a subset that leaves 500 out.

    >>> [s for s in (400, 404, 408, 429, 500, 501, 503, 505) if retry_later(s)]
    [408, 429, 500, 503]
    """
    return status in (408, 429) or (500 <= status < 600 and status not in (501, 505))


def retry_after_seconds(value: str | None, now: float | None = None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or HTTP-date); None if unreadable.

    Delta-seconds are ASCII digits (RFC 9110 DIGIT): not `str.isdigit()`, which also takes `²`
    (a Latin-1 header byte, that float() refuses) or other scripts' digits (float() reads `٣` as 3).

    >>> retry_after_seconds("120"), retry_after_seconds("inf"), retry_after_seconds(None)
    (120.0, None, None)
    >>> retry_after_seconds("\u00b2"), retry_after_seconds("\u0663")
    (None, None)
    """
    if not value:
        return None
    v = value.strip()
    if ascii_digits(v, most=12):
        return float(v)
    try:
        when = email.utils.parsedate_to_datetime(v)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))
