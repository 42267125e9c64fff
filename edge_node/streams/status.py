"""A stream's status as people see it: state, last error, measured frame rates.

States: ``connecting`` (opening, no frame yet), ``online`` (frames arrive),
``offline`` (the source failed; ``error`` says why, ``retry_in`` when the next
attempt is), ``ended`` (a file source reached its end), ``failed`` (the capture
process kept crashing; no more restarts), ``stopped`` / ``removed`` (by the
agent). Only a change of ``state`` or ``error`` counts as a change.
"""

from __future__ import annotations

import time
from collections import deque

from .config import StreamConfig
from .source import redact

#: seconds of history the measured frame rates average over
FPS_WINDOW = 5.0


class StreamStatus:
    def __init__(self, cfg: StreamConfig) -> None:
        self.cfg = cfg
        self.state = "connecting"
        self.error: str | None = None
        self.since = time.time()
        self.attempt = 0
        self.retry_in: float | None = None
        self._samples: deque[tuple[float, int, int]] = deque()

    def set(self, state: str, error: str | None = None, *, attempt: int | None = None,
            retry_in: float | None = None, ts: float | None = None) -> bool:
        """Apply a state; True when state or error changed."""
        changed = (state, error) != (self.state, self.error)
        if changed:
            self.state, self.error = state, error
            self.since = ts or time.time()
        if attempt is not None:
            self.attempt = attempt
        self.retry_in = retry_in
        return changed

    def apply(self, event: dict) -> bool:
        """Apply a status message from the capture process."""
        return self.set(str(event.get("state")), event.get("error"),
                        attempt=int(event.get("attempt") or 0), retry_in=event.get("retry_in"),
                        ts=event.get("ts"))

    def sample(self, now: float, captured: int, processed: int) -> None:
        self._samples.append((now, captured, processed))
        while len(self._samples) > 2 and now - self._samples[0][0] > FPS_WINDOW:
            self._samples.popleft()

    def rates(self) -> tuple[float, float]:
        """(captured, processed) frames a second over the last :data:`FPS_WINDOW` s."""
        if len(self._samples) < 2:
            return 0.0, 0.0
        (t0, c0, p0), (t1, c1, p1) = self._samples[0], self._samples[-1]
        dt = t1 - t0
        if dt < 0.5:
            return 0.0, 0.0
        return round((c1 - c0) / dt, 2), round((p1 - p0) / dt, 2)

    def as_dict(self) -> dict:
        fps, processed_fps = self.rates()
        return {"stream_id": self.cfg.id, "app": self.cfg.app, "url": redact(self.cfg.url),
                "state": self.state, "error": self.error, "since": self.since,
                "attempt": self.attempt, "retry_in": self.retry_in, "fps": fps,
                "processed_fps": processed_fps, "target_fps": self.cfg.fps}
