"""Training windows: when training may take which fraction of which card.

One window is a small, cron-like JSON object::

    {"card": "cpu", "days": "mon-fri", "start": "20:00", "end": "06:00",
     "training_fraction": 1.0}

- ``card``: a card id (``"cpu"``, ``"gpu0"``) or ``"*"`` for every card.
- ``days``: the days the window *opens* on: ``mon``..``sun``, ranges
  (``mon-fri``, ``fri-mon`` wraps), lists (``mon,wed,fri``, ``sat-sun,wed``),
  or ``*`` / ``daily``, ``weekdays``, ``weekends``. Default ``*``.
- ``start`` / ``end``: wall-clock ``HH:MM`` in the schedule's time zone; start
  inclusive, end exclusive. ``end`` may be ``24:00``. An ``end`` at or before
  ``start`` crosses midnight: ``fri 20:00-06:00`` runs Friday 20:00 to Saturday
  06:00. Defaults ``00:00``-``24:00``, so ``{"card": "cpu", "days": "weekends",
  "training_fraction": 1}`` is the whole weekend. ``start == end`` is refused
  (ambiguous: say ``00:00``-``24:00`` for a whole day).
- ``training_fraction``: (0, 1], the share of the card training may take.
- ``yield_to_inference`` (default true): inference load above the threshold
  still preempts training inside this window; false reserves the window.

Overlapping windows for one card give the largest fraction. Time zone: an IANA
name (``Asia/Shanghai``) or none for the system's local zone. On a daylight
saving day a boundary that falls in the skipped hour takes effect when the
clock first reaches it (the scheduler re-checks every tick anyway).

The model lives in ``cloud_sync`` because both sides use it: the node's config
(``scheduling.windows``) and the cloud's desired state
(:class:`cloud_sync.schemas.TrainingSchedule`) carry the same windows.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import UTC, date, datetime, time, timedelta, tzinfo
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator

logger = logging.getLogger(__name__)

DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_ALIASES = {"*": "mon-sun", "daily": "mon-sun", "weekdays": "mon-fri", "weekends": "sat-sun"}
CARD_RE = r"^(\*|[A-Za-z0-9][A-Za-z0-9_.:-]{0,63})$"
#: how far ahead :meth:`WindowTable.next_change` looks before giving up
HORIZON = timedelta(days=8)


def parse_days(text: str) -> frozenset[int]:
    """``"mon-fri,sun"`` -> {0, 1, 2, 3, 4, 6} (Monday is 0); ValueError if bad."""
    hint = "use mon..sun, ranges like mon-fri, lists like sat,sun, or * / weekdays / weekends"
    spec = _ALIASES.get(text.strip().lower(), text.strip().lower())
    if not spec:
        raise ValueError(f"empty days: {hint}")
    out: set[int] = set()
    for item in spec.split(","):
        item = _ALIASES.get(item.strip(), item.strip())
        ends = [p.strip() for p in item.split("-")]
        if len(ends) > 2 or any(p not in DAYS for p in ends):
            raise ValueError(f"bad day or range {item!r}: {hint}")
        a, b = DAYS.index(ends[0]), DAYS.index(ends[-1])
        out.update((a + i) % 7 for i in range((b - a) % 7 + 1))
    return frozenset(out)


def parse_hhmm(text: str, allow_24: bool = False) -> int:
    """``"06:30"`` -> 390 minutes after midnight; ``"24:00"`` only if allowed."""
    try:
        hh, mm = text.split(":")
        if len(hh) != 2 or len(mm) != 2:
            raise ValueError
        h, m = int(hh), int(mm)
    except ValueError:
        raise ValueError(f"bad time {text!r}: use HH:MM (24-hour), e.g. 06:00") from None
    if (h, m) == (24, 0) and allow_24:
        return 24 * 60
    if not (0 <= h <= 23 and 0 <= m <= 59):
        raise ValueError(f"bad time {text!r}: hours 00-23, minutes 00-59"
                         + (" (or 24:00)" if allow_24 else ""))
    return h * 60 + m


def zone(name: str | None) -> tzinfo | None:
    """The ZoneInfo for an IANA name; None (the system's local zone) for None."""
    if name is None:
        return None
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown time zone {name!r}: use an IANA name such as "
                         "'Asia/Shanghai' or 'UTC', or leave it out for local time") from None


class TrainingWindow(BaseModel):
    """One recurring window; see the module docstring for the syntax."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    card: str = Field(pattern=CARD_RE)
    days: str = "*"
    start: str = "00:00"
    end: str = "24:00"
    training_fraction: float = Field(gt=0, le=1)
    yield_to_inference: bool = True
    _days: frozenset[int] = PrivateAttr(default=frozenset())
    _start: int = PrivateAttr(default=0)
    _end: int = PrivateAttr(default=0)

    @field_validator("days")
    @classmethod
    def _check_days(cls, v: str) -> str:
        parse_days(v)
        return v

    @field_validator("start")
    @classmethod
    def _check_start(cls, v: str) -> str:
        parse_hhmm(v)
        return v

    @field_validator("end")
    @classmethod
    def _check_end(cls, v: str) -> str:
        parse_hhmm(v, allow_24=True)
        return v

    @model_validator(mode="after")
    def _compile(self) -> TrainingWindow:
        self._days = parse_days(self.days)
        self._start, self._end = parse_hhmm(self.start), parse_hhmm(self.end, allow_24=True)
        if self._start == self._end:
            raise ValueError(f"start == end ({self.start}) is ambiguous: use start 00:00 and "
                             "end 24:00 for whole days")
        return self

    def matches(self, card_id: str) -> bool:
        return self.card in ("*", card_id)

    def covers(self, local: datetime) -> bool:
        """Is the wall-clock time ``local`` (already in the schedule's zone) inside?"""
        wd = local.weekday()
        t = local.hour * 60 + local.minute + (local.second + local.microsecond / 1e6) / 60
        if self._start < self._end:
            return wd in self._days and self._start <= t < self._end
        return (wd in self._days and t >= self._start) or \
            ((wd - 1) % 7 in self._days and t < self._end)

    def boundaries(self, day: date) -> list[datetime]:
        """Naive wall-clock opening and closing times of the window opening on ``day``."""
        if day.weekday() not in self._days:
            return []
        midnight = datetime.combine(day, time())
        end = self._end + (24 * 60 if self._end <= self._start else 0)
        return [midnight + timedelta(minutes=self._start), midnight + timedelta(minutes=end)]


class WindowTable:
    """The windows of one schedule, compiled: what is allowed now, and until when."""

    def __init__(self, windows: Sequence[TrainingWindow], timezone: str | None = None) -> None:
        self.windows = list(windows)
        self.timezone = timezone
        self._tz = zone(timezone)

    def _local(self, now: datetime) -> datetime:
        if now.tzinfo is None:
            raise ValueError("naive datetime: pass an aware one (e.g. datetime.now(UTC))")
        return now.astimezone(self._tz)  # tz None -> the system's local zone

    def _instant(self, wall: datetime) -> datetime:
        at = wall.replace(tzinfo=self._tz) if self._tz else wall.astimezone()
        return at.astimezone(UTC)  # compare instants, not wall clocks

    def active(self, card_id: str, now: datetime) -> list[TrainingWindow]:
        local = self._local(now)
        return [w for w in self.windows if w.matches(card_id) and w.covers(local)]

    def allowed_fraction(self, card_id: str, now: datetime) -> float:
        """The share of ``card_id`` training may take at ``now`` by the windows (0..1)."""
        return max((w.training_fraction for w in self.active(card_id, now)), default=0.0)

    def next_change(self, card_id: str, now: datetime) -> datetime:
        """The first instant after ``now`` where :meth:`allowed_fraction` changes, or
        ``now + HORIZON`` when nothing changes within it (no windows, always open).
        The result is in UTC."""
        local_day = self._local(now).date()
        now = now.astimezone(UTC)
        candidates = set()
        for w in self.windows:
            if not w.matches(card_id):
                continue
            for offset in range(-1, HORIZON.days + 1):
                for wall in w.boundaries(local_day + timedelta(days=offset)):
                    at = self._instant(wall)
                    if at > now:
                        candidates.add(at)
        current = self.allowed_fraction(card_id, now)
        for at in sorted(candidates):
            if at - now > HORIZON:
                break
            if self.allowed_fraction(card_id, at) != current:
                return at
        return now + HORIZON
