"""Effective time periods of rule exceptions (FortiSIEM: an exception may be limited to single or
recurring periods, "for durations of time from hours to days").

A period is evaluated on an incident's event time (its ``lastSeen``), never on the wall clock, so a
replay, a retry and a rule test decide exactly as the live run did. Pure; compiled once at load.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone, tzinfo
from typing import Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

Day = Literal["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"]
DAYS: tuple[Day, ...] = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
MINUTES_PER_DAY = 24 * 60


def parse_clock(text: str) -> int:
    """``HH:MM`` (``24:00`` allowed as the end of a day) as minutes after midnight.

    Raises:
        ValueError: not ``HH:MM`` in 00:00..24:00.
    """
    hours, sep, minutes = text.partition(":")
    if not sep or len(hours) != 2 or len(minutes) != 2 or not (hours + minutes).isdigit():
        raise ValueError(f"{text!r} is not a time of day 'HH:MM'")
    value = int(hours) * 60 + int(minutes)
    if int(minutes) > 59 or value > MINUTES_PER_DAY:
        raise ValueError(f"{text!r} is not a time of day between 00:00 and 24:00")
    return value


def zone(name: str) -> tzinfo:
    """``UTC`` or an IANA zone name (``Europe/Berlin``), resolved from the host's time zone database.

    Raises:
        ValueError: an unknown zone.
    """
    if name.upper() == "UTC":
        return timezone.utc
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown time zone {name!r} (an IANA name such as 'Europe/Berlin', or 'UTC')") from None


@dataclass(frozen=True)
class Period:
    """When an exception is in effect: within ``[start_ms, end_ms)`` (single period) and, if
    ``daily`` is set, on ``days`` between ``daily[0]`` and ``daily[1]`` minutes after local midnight
    in ``tz`` (recurring). A daily span that ends before it starts runs over midnight and belongs to
    the day it starts on (``Fri 22:00-06:00`` covers Friday night until Saturday 06:00)."""

    tz: tzinfo
    days: frozenset[int]  # weekday numbers, Monday = 0
    daily: tuple[int, int] | None = None
    start_ms: int | None = None
    end_ms: int | None = None

    def contains(self, at_ms: int) -> bool:
        if self.start_ms is not None and at_ms < self.start_ms:
            return False
        if self.end_ms is not None and at_ms >= self.end_ms:
            return False
        if self.daily is None:
            return True
        local = datetime.fromtimestamp(at_ms / 1000, tz=timezone.utc).astimezone(self.tz)
        minute = local.hour * 60 + local.minute
        day = local.weekday()
        lo, hi = self.daily
        if lo < hi:
            return day in self.days and lo <= minute < hi
        return (day in self.days and minute >= lo) or ((day - 1) % 7 in self.days and minute < hi)
