"""Exponential backoff with jitter, so a site's cameras do not reconnect in lockstep."""

from __future__ import annotations

import random


class Backoff:
    """Delays ``first * 2**n`` capped at ``cap``, each scaled by a random 0.5..1.0."""

    def __init__(self, first: float, cap: float, rng: random.Random | None = None) -> None:
        self.first = first
        self.cap = cap
        self.attempt = 0
        self._rng = rng or random.Random()

    def next(self) -> float:
        """The delay before the next attempt (and count this attempt)."""
        base = min(self.cap, self.first * (2 ** min(self.attempt, 30)))
        self.attempt += 1
        return base * self._rng.uniform(0.5, 1.0)

    def reset(self) -> None:
        self.attempt = 0
