"""The wall clock jumped: fault ``clock_jump``.

Between two probes the wall clock (``time.time``) should advance as much as the
monotonic clock; the difference is a jump (NTP stepping a box that booted with
no RTC battery, an operator setting the date, a VM resumed). A jump larger than
``threshold_s`` either way is the fault, with its size in seconds (positive:
forward) in the finding and so in the episode's events.

The remedy re-arms what waits on wall time, each a callable given at
construction (``rearm``, name -> callable):

- the training scheduler's windows (:meth:`Scheduler.wake
  <edge_node.scheduling.scheduler.Scheduler.wake>`: a pass now, the next
  window boundary worked out from the new time, rather than after a sleep
  computed from the old one);
- the outbox's resends (:meth:`Outbox.retry_now <cloud_sync.outbox.Outbox.retry_now>`:
  retry times are wall-clock, so after a jump back they would lie far ahead).

Intervals timed on the monotonic clock (telemetry, the monitor itself, the
reconciler) need nothing. The probe after the remedy finds no jump (the
baseline moved with the probe that saw it), so each jump is one episode.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping

from .base import Check, Finding, HealError

logger = logging.getLogger(__name__)


class ClockCheck(Check):
    name = "clock"

    def __init__(self, *, rearm: Mapping[str, Callable[[], object]] | None = None,
                 threshold_s: float = 5.0, interval_s: float = 5.0,
                 wall: Callable[[], float] = time.time,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.rearm = dict(rearm or {})
        self.threshold_s = threshold_s
        self.interval_s = interval_s
        self.wall, self.monotonic = wall, monotonic
        self._last: tuple[float, float] | None = None
        self.jumps = 0

    def probe(self) -> Finding:
        wall, mono = self.wall(), self.monotonic()
        last, self._last = self._last, (wall, mono)
        if last is None:
            return Finding(self.name, True, "baseline taken")
        jump = (wall - last[0]) - (mono - last[1])
        data = {"jump_s": round(jump, 3), "wall": wall}
        if abs(jump) > self.threshold_s:
            self.jumps += 1
            way = "forward" if jump > 0 else "back"
            return Finding(self.name, False,
                           f"wall clock jumped {way} by {abs(jump):.1f} s "
                           f"(more than {self.threshold_s:g} s off the monotonic clock)",
                           fault="clock_jump", data=data)
        return Finding(self.name, True, f"wall clock steady ({jump:+.3f} s since last probe)",
                       data=data)

    def heal(self, finding: Finding) -> str:
        if not self.rearm:
            raise HealError("nothing depends on wall time here")
        done, failed = [], []
        for name, fn in self.rearm.items():
            try:
                fn()
                done.append(name)
            except Exception as err:
                logger.warning("clock jump: re-arming %s failed: %s", name, err)
                failed.append(f"{name} ({err})")
        if not done:
            raise HealError("re-arming failed: " + ", ".join(failed))
        out = f"re-armed after a {finding.data.get('jump_s')} s jump: {', '.join(done)}"
        return out + (f"; failed: {', '.join(failed)}" if failed else "")
