"""What a health check is: a cheap probe that says ok or names a fault, and a remedy.

A check takes plain values (paths, callables, numbers) so that ``aidc edge doctor``
runs it without an agent; the agent passes its live parts. ``probe`` has no side
effects; ``heal`` applies the remedy and says what it did, or raises
:class:`HealError` with why it could not.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Callable


@dataclass
class Finding:
    check: str                 # the check's name, e.g. "disk_space"
    ok: bool
    detail: str                # one readable line
    fault: str | None = None   # the catalogue's fault kind when not ok, e.g. "disk_low"
    data: dict = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def kind(self) -> str:
        """The fault kind to journal: the finding's, else ``<check>_failed``."""
        return self.fault or f"{self.check}_failed"


class HealError(Exception):
    """A remedy that could not be applied (the message says why)."""


class Check:
    name: str = ""
    interval_s: float = 5.0
    #: the monitor's first probe waits this long after start (a check of things the
    #: agent is still bringing up, e.g. workers, gives them time)
    start_delay_s: float = 0.0

    def probe(self) -> Finding:
        raise NotImplementedError

    def heal(self, finding: Finding) -> str:
        raise HealError("no automatic remedy")

    def after_ok(self, finding: Finding) -> None:
        """Called by the monitor's thread after an ok probe: upkeep that must only
        happen on a healthy state (e.g. the last good copy of the database)."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} every {self.interval_s:g}s>"


class FunctionCheck(Check):
    """A check made of a probe function (and optionally a remedy function), for
    checks too small for a class of their own."""

    def __init__(self, name: str, probe: Callable[[], Finding],
                 heal: Callable[[Finding], str] | None = None,
                 interval_s: float = 5.0) -> None:
        if not name:
            raise ValueError("a check needs a name")
        if interval_s <= 0:
            raise ValueError(f"check {name}: interval_s must be > 0, got {interval_s!r}")
        self.name = name
        self.interval_s = interval_s
        self._probe = probe
        self._heal = heal

    def probe(self) -> Finding:
        return self._probe()

    def heal(self, finding: Finding) -> str:
        if self._heal is None:
            raise HealError("no automatic remedy")
        return self._heal(finding)
