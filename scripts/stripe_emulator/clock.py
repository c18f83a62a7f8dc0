"""A controllable clock: every object and event the emulator creates takes its ``created`` from here."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime

Instant = int | float | datetime


def to_timestamp(value: Instant) -> int:
    """Unix seconds for an int, float or aware datetime (naive datetimes are taken as UTC)."""
    if isinstance(value, datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return int(value.timestamp())
    return int(value)


class Clock:
    """Frozen at ``start`` (default: now) until advanced, so a month of activity takes a second to make.

    With ``frozen=False`` it follows wall time from ``start`` on, plus whatever ``advance`` added.
    """

    def __init__(self, start: Instant | None = None, *, frozen: bool = True) -> None:
        self._lock = threading.Lock()
        self._base = to_timestamp(start) if start is not None else int(time.time())
        self._frozen = frozen
        self._wall_origin = time.monotonic()

    def now(self) -> int:
        """The current emulator time in Unix seconds."""
        with self._lock:
            if self._frozen:
                return self._base
            return self._base + int(time.monotonic() - self._wall_origin)

    def now_datetime(self) -> datetime:
        """The current emulator time as an aware UTC datetime."""
        return datetime.fromtimestamp(self.now(), tz=UTC)

    def advance(self, seconds: float = 0, *, minutes: float = 0, hours: float = 0, days: float = 0) -> int:
        """Move time forward (never backward) and return the new now."""
        delta = int(seconds + minutes * 60 + hours * 3600 + days * 86400)
        if delta < 0:
            raise ValueError("the clock only moves forward")
        with self._lock:
            self._base += delta
        return self.now()

    def set(self, instant: Instant) -> int:
        """Jump to ``instant`` (forward only) and return it."""
        target = to_timestamp(instant)
        current = self.now()
        if target < current:
            raise ValueError(f"the clock only moves forward ({target} < {current})")
        return self.advance(target - current)
