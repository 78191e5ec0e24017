"""FHIR Period checks for consent decisions: inclusive at both ends, date/datetime aware.

A date-only (or year / year-month) bound covers its whole day (month, year); datetimes
carry a timezone and are compared as instants. A disclosure given as a date lies inside a
period only when the whole day does (fail closed at datetime bounds).

Room: consent/ (layer 1, pure core: no IO, no clock): may import the base rooms only.
"""

from __future__ import annotations

import calendar
import re
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta, timezone
from typing import Any

__all__ = ["Bound", "Period", "PeriodError", "parse_period", "parse_bound"]

_DATE = re.compile(r"^(\d{4})(?:-(\d{2})(?:-(\d{2}))?)?$", re.ASCII)
_DATETIME = re.compile(
    r"^(\d{4})-(\d{2})-(\d{2})T(\d{2}):(\d{2})(?::(\d{2})(?:\.(\d{1,9}))?)?(Z|[+-]\d{2}:\d{2})$",
    re.ASCII,
)


class PeriodError(ValueError):
    """A period bound that is not a valid FHIR date/dateTime (with timezone when timed)."""


@dataclass(frozen=True)
class Bound:
    """A period bound: a calendar date or an aware instant."""

    day: date | None = None
    instant: datetime | None = None


def parse_bound(value: Any, *, end: bool) -> Bound:
    """Parse a FHIR date/dateTime bound; partial dates widen to their first/last day."""
    if not isinstance(value, str):
        raise PeriodError("not a string")
    m = _DATE.match(value)
    try:
        if m:
            y = int(m.group(1))
            mo = int(m.group(2)) if m.group(2) else (12 if end else 1)
            if m.group(3):
                d = int(m.group(3))
            else:
                d = calendar.monthrange(y, mo)[1] if end else 1
            return Bound(day=date(y, mo, d))
        m = _DATETIME.match(value)
        if m:
            frac = (m.group(7) or "0")[:6].ljust(6, "0")
            tz = UTC if m.group(8) == "Z" else _offset(m.group(8))
            return Bound(
                instant=datetime(
                    int(m.group(1)),
                    int(m.group(2)),
                    int(m.group(3)),
                    int(m.group(4)),
                    int(m.group(5)),
                    int(m.group(6) or 0),
                    int(frac),
                    tzinfo=tz,
                )
            )
    except (ValueError, calendar.IllegalMonthError) as exc:
        raise PeriodError(str(exc)) from None
    raise PeriodError("not a FHIR date or dateTime with timezone")


def _offset(text: str) -> timezone:
    sign = -1 if text[0] == "-" else 1
    hours, minutes = int(text[1:3]), int(text[4:6])
    if hours > 14 or minutes > 59:
        raise ValueError("offset out of range")
    return timezone(sign * timedelta(hours=hours, minutes=minutes))


@dataclass(frozen=True)
class Period:
    """An inclusive period; either end may be open."""

    start: Bound | None = None
    end: Bound | None = None

    def contains(self, on: date | datetime) -> bool:
        """Whether the disclosure moment `on` (a date, or an aware datetime) lies inside."""
        return _after_start(self.start, on) and _before_end(self.end, on)


def _after_start(b: Bound | None, on: date | datetime) -> bool:
    if b is None:
        return True
    if isinstance(on, datetime):
        return on.date() >= b.day if b.day else on >= b.instant  # type: ignore[operator]
    if b.day:
        return on >= b.day
    assert b.instant is not None
    local = b.instant
    return on > local.date() or (on == local.date() and local.time() == time(0, 0))


def _before_end(b: Bound | None, on: date | datetime) -> bool:
    if b is None:
        return True
    if isinstance(on, datetime):
        return on.date() <= b.day if b.day else on <= b.instant  # type: ignore[operator]
    if b.day:
        return on <= b.day
    assert b.instant is not None
    local = b.instant
    return on < local.date() or (on == local.date() and local.time() >= time(23, 59, 59))


def parse_period(value: Any) -> Period | None:
    """A Period dict → Period (None when absent). Raises PeriodError on bad bounds or start > end."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise PeriodError("period is not an object")
    start = parse_bound(value["start"], end=False) if "start" in value else None
    end = parse_bound(value["end"], end=True) if "end" in value else None
    if start and end:
        s = start.day if start.day else start.instant.date() if start.instant else None
        e = end.day if end.day else end.instant.date() if end.instant else None
        if start.instant and end.instant and start.instant > end.instant:
            raise PeriodError("start is after end")
        if s and e and s > e and (start.day or end.day):
            raise PeriodError("start is after end")
    return Period(start, end)
