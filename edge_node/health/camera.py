"""A lost camera: fault ``camera_lost``.

A configured stream whose source delivered no frame to the agent for more than
``lost_after_s`` (default 15 s) -- read from the stream manager's books
(:meth:`~edge_node.streams.manager.StreamManager.stats`: ``received`` is every
frame the agent took from the stream's capture process) -- or a stream that is
``failed`` (its capture process kept crashing; the stream gave up). Streams
stopped, removed or ``ended`` (a file source played to its end) are not judged.

Why no frame comes decides the remedy (:meth:`~edge_node.streams.manager.StreamManager.liveness`):

* **the source is gone** (the camera is off, unplugged, unreachable; a file
  source removed): the capture process is alive and beating, reconnecting with
  backoff by itself. Nothing to restart: the episode reports it
  (``fault_unhealed``, with the stream's own error and attempt) and closes with
  ``fault_healed`` ("recovered by itself") once frames flow again;
* **the reader is stuck**: the capture process alive but without a heartbeat
  for longer than the source's own timeouts allow (``max(open_timeout + 2,
  stall_timeout)`` plus ``stuck_grace_s``: a stopped, deadlocked or hung
  process -- sooner than the stream's own watchdog, which waits 8 s longer), the
  process gone with no restart scheduled, the agent's reader thread gone, frames
  captured that the reader does not take, or the stream ``failed``: the stream's
  capture process and reader are killed and started again
  (:meth:`~edge_node.streams.manager.StreamManager.restart`, counted in the
  stream's ``restarts``; the crash budget starts over) and the remedy waits up
  to ``heal_wait_s`` for frames to flow.
"""

from __future__ import annotations

import time
from typing import Any

from ..streams.stream import WATCHDOG_GRACE
from .base import Check, Finding, HealError

#: states in which a stream is not expected to deliver frames
NOT_JUDGED = ("ended", "stopped", "removed")


class CameraCheck(Check):
    name = "camera"

    def __init__(self, streams: Any, *, interval_s: float = 5.0, lost_after_s: float = 15.0,
                 stuck_grace_s: float = 2.0, heal_wait_s: float = 10.0) -> None:
        self.streams = streams
        self.interval_s = interval_s
        self.lost_after_s = lost_after_s
        self.stuck_grace_s = stuck_grace_s
        self.heal_wait_s = heal_wait_s
        #: stream -> (received, captured, monotonic time ``received`` last moved)
        self._seen: dict[str, tuple[int, int, float]] = {}
        self.stats = {"restarts": 0}

    def _why(self, st: dict, live: dict, captured_since: int) -> tuple[bool, str]:
        """(stuck, why) for a stream that delivers no frame."""
        if st.get("state") == "failed":
            return True, f"the stream gave up: {st.get('error')}"
        if not live.get("proc_alive"):
            if live.get("restart_pending"):
                return False, f"its capture process restarts by itself ({st.get('error')})"
            return True, "its capture process is gone and no restart is scheduled"
        stuck_after = live["watchdog_limit"] - WATCHDOG_GRACE + self.stuck_grace_s
        age = live["heartbeat_age"]
        if age > stuck_after:
            return True, (f"its capture process {st.get('pid')} is hung: no heartbeat for "
                          f"{age:.0f} s (> {stuck_after:g} s)")
        if not live.get("reader_alive"):
            return True, "the agent's reader of its frames is gone"
        if captured_since > 0:
            return True, (f"{captured_since} frame(s) captured that the agent's reader "
                          "did not take")
        what = f"{st.get('state')}"
        if st.get("error"):
            what += f": {st['error']}"
        return False, (f"the source delivers nothing ({what}); the stream reconnects by "
                       f"itself (attempt {st.get('attempt', 0)}, "
                       f"{st.get('open_failures', 0)} failed opens)")

    def probe(self) -> Finding:
        stats = self.streams.stats()
        live = self.streams.liveness()
        now = time.monotonic()
        for sid in [s for s in self._seen if s not in live]:
            del self._seen[sid]
        lost, flowing = {}, []
        for sid, lv in live.items():
            st = stats.get(sid) or {}
            if st.get("state") in NOT_JUDGED or lv.get("stopped"):
                self._seen.pop(sid, None)
                continue
            rec, cap = int(st.get("received", 0)), int(st.get("captured", 0))
            prev = self._seen.get(sid)
            if prev is None or rec != prev[0]:
                self._seen[sid] = prev = (rec, cap, now)
            idle = now - prev[2]
            if idle <= self.lost_after_s and st.get("state") != "failed":
                flowing.append(sid)
                continue
            stuck, why = self._why(st, lv, cap - prev[1])
            lost[sid] = {"idle_s": round(idle, 1), "state": st.get("state"),
                         "error": st.get("error"), "stuck": stuck, "why": why,
                         "received": rec, "pid": st.get("pid"), "url": st.get("url")}
        if lost:
            detail = "; ".join(f"{sid}: no frame for {i['idle_s']:g} s, {i['why']}"
                               for sid, i in sorted(lost.items()))
            return Finding(self.name, False, detail, fault="camera_lost",
                           data={"streams": lost, "flowing": flowing})
        return Finding(self.name, True, f"{len(flowing)} stream(s) delivering frames",
                       data={"flowing": flowing})

    def heal(self, finding: Finding) -> str:
        lost = finding.data.get("streams") or {}
        restarted, waiting = [], []
        for sid, info in sorted(lost.items()):
            if not info.get("stuck"):
                waiting.append(f"{sid}: {info['why']}")
                continue
            try:
                done = self.streams.restart(sid, f"camera health check: {info['why']}")
            except Exception as err:  # noqa: BLE001 - removed meanwhile
                waiting.append(f"{sid}: not restarted ({err})")
                continue
            if done:
                self.stats["restarts"] += 1
                restarted.append(sid)
        if not restarted:
            raise HealError("; ".join(waiting) or "nothing to restart")
        deadline = time.monotonic() + self.heal_wait_s
        flowing: list[str] = []
        while time.monotonic() < deadline:
            stats = self.streams.stats()
            flowing = [sid for sid in restarted
                       if int((stats.get(sid) or {}).get("received", 0))
                       > self._seen.get(sid, (0, 0, 0.0))[0]]
            if len(flowing) == len(restarted):
                break
            time.sleep(0.1)
        out = "restarted the capture process and reader of " + ", ".join(
            f"{sid} ({lost[sid]['why']})" for sid in restarted)
        if flowing:
            out += f"; frames flow again: {', '.join(flowing)}"
        if len(flowing) < len(restarted):
            out += ("; no frame yet after " f"{self.heal_wait_s:g} s: "
                    + ", ".join(s for s in restarted if s not in flowing))
        if waiting:
            out += "; " + "; ".join(waiting)
        return out
