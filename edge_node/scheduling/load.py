"""Per-card inference load with hysteresis: *busy* and *idle* need time to flip.

Fed one sample per scheduler tick. ``busy`` turns on after the load has stayed
at or above ``busy_above`` for ``busy_for_s`` and off after it has stayed at or
below ``idle_below`` for ``idle_for_s``; ``idle`` is that same low stretch. A
sample between the marks breaks both stretches and keeps the current state.
"""

from __future__ import annotations

import logging

from .config import LoadPolicy

logger = logging.getLogger(__name__)


class LoadGate:
    def __init__(self, card_id: str, policy: LoadPolicy) -> None:
        self.card_id = card_id
        self.policy = policy
        self.busy = False
        self.last = 0.0
        self._high_since: float | None = None
        self._low_since: float | None = None

    def sample(self, load: float, mono: float) -> None:
        p = self.policy
        self.last = load
        self._high_since = (self._high_since if self._high_since is not None else mono) \
            if load >= p.busy_above else None
        self._low_since = (self._low_since if self._low_since is not None else mono) \
            if load <= p.idle_below else None
        if not self.busy and self._high_since is not None \
                and mono - self._high_since >= p.busy_for_s:
            self.busy = True
            logger.info("card %s: inference busy (load %.2f >= %.2f for %.0fs)",
                        self.card_id, load, p.busy_above, p.busy_for_s)
        elif self.busy and self.idle_at(mono):
            self.busy = False
            logger.info("card %s: inference no longer busy (load %.2f)", self.card_id, load)

    def idle_at(self, mono: float) -> bool:
        """Has the load stayed at or below ``idle_below`` for ``idle_for_s``?"""
        return self._low_since is not None and mono - self._low_since >= self.policy.idle_for_s
