"""The capture loop that runs inside a stream's own process.

Open the source -> grab frames -> keep one every ``1/fps`` seconds (the rest are
grabbed but never decoded into pixels) -> resize -> write it into the shared
memory ring -> put ``(gen, slot, seq, ts, shape)`` into the bounded queue. When
the queue is full the oldest queued frame is evicted and counted: the loop never
waits for the agent. Any failure (open, read, stall, garbage) closes the source
and reopens it after an exponential, jittered backoff; a file source paces
itself at its own frame rate and ends (or loops) at its end.
"""

from __future__ import annotations

import logging
import math
import queue
import select
import time

import cv2
import numpy as np

from .backoff import Backoff
from .config import StreamConfig, ring_slots
from .counters import Counters, now_ms
from .ring import FrameRing
from .source import explain_open_failure, open_capture, parse_source, redact

logger = logging.getLogger(__name__)
#: a file that does not say its frame rate is paced at this many frames a second
DEFAULT_FILE_FPS = 25.0


class CaptureLoop:
    def __init__(self, cfg: StreamConfig, frames, events, counters: Counters, stop,
                 ring_prefix: str) -> None:
        self.cfg = cfg
        self.src = parse_source(cfg.url)
        self.frames = frames  # bounded multiprocessing queue of frame references
        self.events = events  # bounded multiprocessing queue of status dicts
        self.c = counters
        # the read end of a pipe: readable once the agent says stop, or dies
        self._stop_conn = stop  # kept: its fd must stay open
        self._poller = select.poll()
        self._poller.register(stop.fileno(), select.POLLIN | select.POLLHUP)
        self.terminated = False  # set by SIGTERM or a stop request
        self.ring_prefix = ring_prefix
        self.ring: FrameRing | None = None
        self.seq = 0
        self.backoff = Backoff(cfg.backoff_min, cfg.backoff_max)
        self._last: tuple | None = None
        self._last_error: str | None = None

    # -- control ------------------------------------------------------------
    def stopping(self) -> bool:
        if not self.terminated and self._poller.poll(0):
            self.terminated = True
        return self.terminated

    def _wait(self, seconds: float) -> None:
        """Sleep up to ``seconds``, waking for a stop, keeping the heartbeat fresh."""
        end = time.monotonic() + seconds
        while not self.terminated:
            self.c.beat()
            left = end - time.monotonic()
            if left <= 0:
                return
            if self._poller.poll(max(1, math.ceil(min(left, 0.5) * 1000))):
                self.terminated = True

    def status(self, state: str, error: str | None = None, retry_in: float | None = None) -> None:
        key = (state, error, self.backoff.attempt)
        if key == self._last:
            return
        self._last = key
        msg = {"state": state, "error": error, "ts": time.time(),
               "attempt": self.backoff.attempt, "retry_in": retry_in}
        try:
            self.events.put_nowait(msg)
        except queue.Full:
            self.c.add("status_dropped")

    # -- the loop -----------------------------------------------------------
    def run(self) -> str:
        """Capture until stopped or a file ends; returns ``"stopped"`` or ``"ended"``."""
        self.status("connecting")
        opened_once = looping = False
        while not self.stopping():
            self.c.beat()
            cap = open_capture(self.src, self.cfg.open_timeout, self.cfg.stall_timeout)
            if cap is None:
                self.c.add("open_failures")
                self._offline(explain_open_failure(self.src))
                continue
            if opened_once and not looping:
                self.c.add("reconnects")
            opened_once, looping = True, False
            try:
                reason, error = self._read(cap)
            finally:
                cap.release()
            if reason == "stopped":
                break
            if reason == "eof":
                if self.cfg.loop and self.seq > 0:
                    looping = True
                    continue
                if self.seq > 0:
                    self.status("ended")
                    return "ended"
                error = f"{redact(self.cfg.url)}: the file holds no readable frame"
            self._offline(error)
        return "stopped"

    def _offline(self, error: str) -> None:
        delay = self.backoff.next()
        level = logging.WARNING if error != self._last_error else logging.INFO
        self._last_error = error
        logger.log(level, "stream %s offline: %s; retry %d in %.1fs", self.cfg.id, error,
                   self.backoff.attempt, delay)
        self.status("offline", error, retry_in=round(delay, 3))
        self._wait(delay)

    def _read(self, cap) -> tuple[str, str | None]:
        """Read frames until the source fails; returns ``(reason, error)``."""
        cfg, live = self.cfg, self.src.live
        native = cap.get(cv2.CAP_PROP_FPS) if not live else 0.0
        native = native if 0 < native <= 1000 else DEFAULT_FILE_FPS
        period = 1.0 / cfg.fps
        t0 = last_frame = time.monotonic()
        idx, due, bad = 0, None, 0
        while not self.stopping():
            self.c.beat()
            if not live:  # pace a file like the camera it stands for
                wait = t0 + idx / native - time.monotonic()
                if wait > 0:
                    self._wait(wait)
                    if self.terminated:
                        break
            ok = cap.grab()
            now = time.monotonic()
            if not ok:
                if not live:
                    return "eof", None
                self.c.add("read_failures")
                bad += 1
                if now - last_frame >= cfg.stall_timeout:
                    self.c.add("stalls")
                    return "stall", (f"stalled: no frame for {now - last_frame:.1f}s "
                                     f"(stall_timeout {cfg.stall_timeout:g}s)")
                if bad >= cfg.max_bad_frames:
                    return "read_failed", (f"{bad} reads in a row failed (connection closed "
                                           "or undecodable data)")
                self._wait(min(period, 0.05))
                continue
            self.c.add("grabbed")
            t = idx / native if not live else now
            idx += 1
            if due is not None and t + 1e-6 < due:
                self.c.add("skipped")
                continue
            due = t + period if due is None or due + period <= t else due + period
            ok, frame = cap.retrieve()
            frame = _usable(frame) if ok else None
            if frame is None:
                self.c.add("garbage")
                bad += 1
                if bad >= cfg.max_bad_frames:
                    return "garbage", f"{bad} frames in a row could not be decoded"
                continue
            bad, last_frame = 0, now
            self.backoff.reset()
            self.status("online")
            self._deliver(frame)
        return "stopped", None

    # -- frames out ---------------------------------------------------------
    def _prepare(self, frame: np.ndarray) -> np.ndarray:
        if frame.ndim == 2:
            frame = cv2.cvtColor(frame, cv2.COLOR_GRAY2BGR)
        if self.cfg.resize is not None:
            h, w = self.cfg.resize
            if frame.shape[:2] != (h, w):
                shrink = h * w < frame.shape[0] * frame.shape[1]
                frame = cv2.resize(frame, (w, h), interpolation=cv2.INTER_AREA
                                   if shrink else cv2.INTER_LINEAR)
        return np.ascontiguousarray(frame)

    def _ring_for(self, frame: np.ndarray) -> FrameRing:
        if self.ring is not None and self.ring.fits(frame):
            return self.ring
        gen = self.c.get("ring_gen") + 1
        ring = FrameRing.create(f"{self.ring_prefix}_{gen}", ring_slots(self.cfg), frame.nbytes)
        self.c.set("ring_gen", gen)
        self._drop_ring()
        self.ring = ring
        return ring

    def _drop_ring(self) -> None:
        if self.ring is not None:
            self.ring.close()
            self.ring.unlink()
            self.ring = None

    def _deliver(self, frame: np.ndarray) -> None:
        frame = self._prepare(frame)
        ts = time.time()
        seq, self.seq = self.seq, self.seq + 1
        self.c.add("captured")
        self.c.set("last_frame_ms", now_ms())
        ring = self._ring_for(frame)
        if self.frames.full():  # evict the oldest: the freshest frames matter most
            try:
                self.frames.get_nowait()
                self.c.add("dropped_capture")
            except queue.Empty:
                pass
        ring.write(seq % ring.slots, seq, frame, ts)
        try:
            self.frames.put_nowait((self.c.get("ring_gen"), seq % ring.slots, seq, ts,
                                    frame.shape))
        except queue.Full:
            self.c.add("dropped_capture")

    def close(self) -> None:
        self._drop_ring()


def _usable(frame) -> np.ndarray | None:
    """``frame`` if it is an image of uint8 pixels, else None (counted as garbage)."""
    if not isinstance(frame, np.ndarray) or frame.dtype != np.uint8 or frame.size == 0:
        return None
    if frame.ndim == 3 and frame.shape[2] == 3 or frame.ndim == 2:
        return frame
    if frame.ndim == 3 and frame.shape[2] == 4:
        return cv2.cvtColor(frame, cv2.COLOR_BGRA2BGR)
    return None
