"""Time as the scheduler sees it: wall clock for windows, monotonic for durations.

:class:`FakeClock` lets tests (and simulations) jump to 05:59 on a Saturday
without waiting; real processes still run in real time.
"""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime, timedelta
from typing import Protocol


class Clock(Protocol):
    def now(self) -> datetime:
        """The current instant, timezone-aware."""

    def monotonic(self) -> float:
        """Seconds on a clock that never goes back (for hysteresis timers)."""


class SystemClock:
    def now(self) -> datetime:
        return datetime.now(UTC)

    def monotonic(self) -> float:
        return time.monotonic()


class FakeClock:
    """A clock that moves only when told: ``advance(s)`` or ``set(dt)``."""

    def __init__(self, start: datetime) -> None:
        if start.tzinfo is None:
            raise ValueError("FakeClock needs an aware datetime")
        self._now = start
        self._mono = 1000.0
        self._lock = threading.Lock()

    def now(self) -> datetime:
        with self._lock:
            return self._now

    def monotonic(self) -> float:
        with self._lock:
            return self._mono

    def advance(self, seconds: float) -> None:
        with self._lock:
            self._now += timedelta(seconds=seconds)
            self._mono += seconds

    def set(self, when: datetime) -> None:
        """Jump to ``when`` (forward only, like time itself)."""
        with self._lock:
            delta = (when - self._now).total_seconds()
            if delta < 0:
                raise ValueError("FakeClock cannot go back")
            self._now = when
            self._mono += delta
