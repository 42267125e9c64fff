"""One stream in the agent: its capture process, the frames it hands to the app, its books.

A reader thread takes frame references off the capture process's queue and hands
each frame to the model on a small thread pool -- unless ``max_in_flight`` frames
are already inside the model, in which case the frame is dropped and counted.
With an ``infer`` that takes frames by reference (``infer.shared_memory`` true
and ``infer.by_ref(app, FrameRef)``: :class:`~.adapters.WorkerClassifier`, the
agent's wiring) only the reference goes on and the model worker reads the pixels
from shared memory itself; otherwise (``infer(app, pixels)``, e.g. in-agent
inference) the reader copies the pixels out first. A frame overwritten before it
was read -- by the reader, or by the worker -- is ``dropped_torn``. Every frame
the capture process kept ends in exactly one bucket, so at any moment::

    captured == processed + failed + dropped_capture + dropped_inflight
                + dropped_torn + dropped_stopped + lost + unexplained
                + in_flight + in_transit

``in_transit`` are frames between the two processes; once a capture process
has ended and its queue is drained the remainder is ``lost`` if it crashed (its
unsent messages died with it) and ``unexplained`` if it exited cleanly (a bug).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .backoff import Backoff
from .config import StreamConfig
from .counters import REPORTED
from .errors import FrameOverwritten, RingGone
from .proc import CaptureProcess, Frame, FrameRef
from .status import StreamStatus

logger = logging.getLogger(__name__)

InferFn = Callable[[str, np.ndarray], "dict | None"]
#: ``on_result(stream_id, app, result, frame_ts)``; with ``frames=True`` also the
#: result's :class:`FrameCopy` as a fifth argument
ResultFn = Callable[..., None]

#: crashes of a capture process tolerated in RESTART_WINDOW seconds before giving up
RESTART_BUDGET = 5
RESTART_WINDOW = 60.0
#: seconds the reader waits for a frame before it looks at its stop flag (stop wakes it)
READ_WAIT = 2.0
#: extra seconds without a heartbeat, beyond the source's own timeouts, before a kill
WATCHDOG_GRACE = 10.0
BUCKETS = ("received", "processed", "results", "failed", "dropped_inflight", "dropped_torn",
           "dropped_stopped", "lost", "unexplained", "result_errors", "restarts",
           "watchdog_kills", "torn_in_worker")


class FrameCopy:
    """The frame a result came from, for ``on_result`` to keep if it wants it.

    Calling it returns a private copy of the frame's pixels (BGR or grey uint8),
    copied out of shared memory on the first call and kept for the next, or None
    when the capture process has overwritten the slot meanwhile (the ring's
    seqlock check) -- it never waits for the capture process. Only valid inside
    ``on_result``: call it there or never.

    ``ref`` is where the frame sits in shared memory (:class:`~.proc.FrameRef`,
    None on the copy path): another model worker can read the same frame by it
    (the shadow of a fine-tuned candidate) as long as the slot still holds it.
    ``pixels`` is the private copy the stream made already on the copy path
    (None by reference): using it costs nothing.
    """

    __slots__ = ("_read", "_pixels", "_done", "ref", "pixels")

    def __init__(self, read: Callable[[], np.ndarray | None], ref: FrameRef | None = None,
                 pixels: np.ndarray | None = None) -> None:
        self._read = read
        self._pixels: np.ndarray | None = None
        self._done = False
        self.ref, self.pixels = ref, pixels

    def __call__(self) -> np.ndarray | None:
        if not self._done:
            self._pixels, self._done = self._read(), True
        return self._pixels


class Stream:
    def __init__(self, cfg: StreamConfig, token: str, infer: InferFn,
                 on_result: ResultFn | None, frames: bool = False) -> None:
        self.cfg = cfg
        #: ``on_result`` also gets the frame (a :class:`FrameCopy`)
        self.frames = frames
        self.proc = CaptureProcess(cfg, token)
        self.status = StreamStatus(cfg)
        self._infer, self._on_result = infer, on_result
        by_ref = getattr(infer, "by_ref", None) if getattr(infer, "shared_memory", False) else None
        #: frames go to the model by reference (read from shared memory by the worker)
        self._by_ref = by_ref if callable(by_ref) else None
        release = getattr(infer, "release", None)
        self._release = release if self._by_ref is not None and callable(release) else None
        self._lock = threading.Lock()
        self.n: Counter[str] = Counter({k: 0 for k in BUCKETS})
        self.in_flight = 0
        self.last_infer_error: str | None = None
        self._pool = ThreadPoolExecutor(cfg.max_in_flight, thread_name_prefix=f"cam-{cfg.id}")
        self._reader: threading.Thread | None = None
        self._reading = threading.Event()
        self._crashes: deque[float] = deque()
        self._restart_backoff = Backoff(1.0, 30.0)
        self._restart_at: float | None = None
        self._watchdog_limit = max(cfg.open_timeout + 2.0, cfg.stall_timeout) + WATCHDOG_GRACE
        self._sup = threading.Lock()  # poll() and stop() never overlap
        self._stopped = False

    # -- lifecycle ------------------------------------------------------------
    def start(self) -> None:
        with self._sup:
            self._start()

    def _start(self) -> None:
        self.proc.start()
        self._reading.set()
        self._reader = threading.Thread(target=self._read_loop, name=f"cam-read-{self.cfg.id}",
                                        daemon=True)
        self._reader.start()

    def _end_incarnation(self) -> None:
        """The process has ended (or is made to): stop reading, drain, settle the books."""
        self._reading.clear()
        if self._reader is not None:
            self.proc.wake_reader()
            self._reader.join(5.0)
            self._reader = None
        if self.proc.proc is None:
            return
        self.proc.stop()
        clean = self.proc.exitcode == 0
        drained = self.proc.drain()
        with self._lock:
            self.n["received"] += drained
            self.n["dropped_stopped"] += drained
        remainder = self._in_transit()
        if remainder:
            bucket = "unexplained" if clean else "lost"
            logger.warning("stream %s: %d frame(s) %s when the capture process ended",
                           self.cfg.id, remainder, bucket)
            with self._lock:
                self.n[bucket] += remainder
        self.proc.cleanup()
        if self._release is not None:  # the worker may unmap this incarnation's ring
            threading.Thread(target=self._release_ring, args=(self.proc.incarnation,),
                             name=f"cam-release-{self.cfg.id}", daemon=True).start()

    def _release_ring(self, incarnation: int) -> None:
        """Off the supervision path: a worker that does not answer holds up nothing."""
        try:
            self._release(self.cfg.app, self.proc.owner, incarnation)
        except Exception:
            logger.debug("stream %s: releasing its ring in the worker failed", self.cfg.id,
                         exc_info=True)

    def request_stop(self) -> None:
        """Ask the capture process to stop now (so many streams stop in parallel)."""
        self.proc.request_stop()

    def stop(self, final_state: str = "stopped", wait: float = 5.0) -> bool:
        """Stop everything; True when ``state`` changed (to ``final_state``)."""
        with self._sup:
            self._stopped = True
            self._restart_at = None
            self._end_incarnation()
        deadline = time.monotonic() + wait
        while self.in_flight and time.monotonic() < deadline:
            time.sleep(0.01)
        self._pool.shutdown(wait=False)
        return self.status.set(final_state, None)

    # -- frames ---------------------------------------------------------------
    def _read_loop(self) -> None:
        copy = self._by_ref is None
        while self._reading.is_set():
            frame = self.proc.get(timeout=READ_WAIT, copy=copy)
            if frame is not None:
                self._dispatch(frame)

    def _dispatch(self, frame: Frame) -> None:
        with self._lock:
            self.n["received"] += 1
            if frame.torn:
                self.n["dropped_torn"] += 1
                return
            if self.in_flight >= self.cfg.max_in_flight:
                self.n["dropped_inflight"] += 1
                return
            self.in_flight += 1
        try:
            self._pool.submit(self._run, frame)
        except RuntimeError:  # the pool is shut down: we are stopping
            with self._lock:
                self.in_flight -= 1
                self.n["dropped_stopped"] += 1

    def _run(self, frame: Frame) -> None:
        bucket, result = "processed", None
        try:
            if frame.ref is not None:
                result = self._by_ref(self.cfg.app, frame.ref)
            else:
                result = self._infer(self.cfg.app, frame.image)
        except FrameOverwritten:  # the worker came too late: the slot holds a newer frame
            bucket = "dropped_torn"
            with self._lock:
                self.n["torn_in_worker"] += 1
        except RingGone as err:
            bucket = self._ring_gone(frame, err)
        except Exception as err:
            bucket = "failed"
            self._failed(err)
        if result is not None and self._on_result is not None:
            try:
                if self.frames:
                    self._on_result(self.cfg.id, self.cfg.app, result, frame.ts,
                                    self._frame_copy(frame))
                else:
                    self._on_result(self.cfg.id, self.cfg.app, result, frame.ts)
            except Exception:
                logger.exception("stream %s: on_result failed", self.cfg.id)
                with self._lock:
                    self.n["result_errors"] += 1
        with self._lock:
            self.n[bucket] += 1
            if result is not None:
                self.n["results"] += 1
            self.in_flight -= 1

    def _frame_copy(self, frame: Frame) -> FrameCopy:
        if frame.image is not None:  # the copy path: the reader copied it already
            image = frame.image
            return FrameCopy(lambda: image, pixels=image)
        ref = frame.ref
        return FrameCopy(lambda: self.proc.read(ref), ref=ref)

    def _failed(self, err: Exception) -> None:
        msg = f"{type(err).__name__}: {err}"
        if msg != self.last_infer_error:
            logger.warning("stream %s: app %s failed on a frame: %s", self.cfg.id,
                           self.cfg.app, msg)
        self.last_infer_error = msg

    def _ring_gone(self, frame: Frame, err: RingGone) -> str:
        """The bucket of a frame whose ring the worker could not map."""
        if frame.incarnation != self.proc.incarnation or not self._reading.is_set():
            return "dropped_stopped"  # its capture process ended (and removed the ring)
        if frame.ref.gen[1] < self.proc.counters.get("ring_gen"):
            with self._lock:
                self.n["torn_in_worker"] += 1
            return "dropped_torn"  # its ring was replaced by a bigger one: the frame went with it
        self._failed(err)  # the ring should be there: say why the worker cannot read it
        return "failed"

    # -- supervision (the manager's monitor thread) ---------------------------------
    def poll(self, now: float) -> bool:
        """Apply status messages, watch the process; True when the status changed."""
        with self._sup:
            return False if self._stopped else self._poll(now)

    def _poll(self, now: float) -> bool:
        changed = False
        if self.proc.proc is not None:
            for event in self.proc.events_pending():
                changed |= self.status.apply(event)
        if self._restart_at is not None:
            if now >= self._restart_at:
                self._restart_at = None
                with self._lock:
                    self.n["restarts"] += 1
                self._start()
                changed |= self.status.set("connecting", None)
        elif self.proc.proc is not None and not self.proc.alive():
            changed |= self._on_exit(now)
        elif self.proc.alive() and self.proc.heartbeat_age() > self._watchdog_limit:
            age = self.proc.heartbeat_age()
            logger.error("stream %s: capture process %s hung (no heartbeat for %.0fs); killing",
                         self.cfg.id, self.proc.pid, age)
            with self._lock:
                self.n["watchdog_kills"] += 1
            self.proc.kill()
            changed |= self._on_exit(now, f"capture process hung (no heartbeat for {age:.0f}s)")
        self.status.sample(now, self.proc.counters.get("captured"), self.n["processed"])
        return changed

    def _on_exit(self, now: float, why: str | None = None) -> bool:
        changed = False
        for event in self.proc.events_pending():  # sent just before it exited
            changed |= self.status.apply(event)
        code = self.proc.exitcode
        state = self.status.state
        self._end_incarnation()
        if code == 0 and why is None:
            if state == "ended":
                return changed
            return self.status.set("stopped", "capture process exited on its own")
        why = why or f"capture process died (exit status {code})"
        self._crashes.append(now)
        while self._crashes and now - self._crashes[0] > RESTART_WINDOW:
            self._crashes.popleft()
        if len(self._crashes) > RESTART_BUDGET:
            logger.error("stream %s: %s; %d crashes in %.0fs, giving up", self.cfg.id, why,
                         len(self._crashes), RESTART_WINDOW)
            return self.status.set("failed", f"{why}; gave up after {len(self._crashes)} "
                                             f"crashes in {RESTART_WINDOW:.0f}s")
        delay = self._restart_backoff.next() if len(self._crashes) > 1 else 0.0
        self._restart_at = now + delay
        logger.warning("stream %s: %s; restarting in %.1fs", self.cfg.id, why, delay)
        return self.status.set("offline", why, retry_in=round(delay, 3))

    # -- the camera health check (edge_node/health/camera.py) --------------------------
    def liveness(self) -> dict:
        """What says whether this stream's reader is stuck: its capture process alive
        and its heartbeat's age, the agent-side reader thread alive, and the
        heartbeat age past which the stream's own watchdog kills the process."""
        reader = self._reader
        return {"proc_alive": self.proc.alive(), "heartbeat_age": self.proc.heartbeat_age(),
                "reader_alive": reader is not None and reader.is_alive(),
                "restart_pending": self._restart_at is not None, "stopped": self._stopped,
                "watchdog_limit": self._watchdog_limit}

    def restart(self, reason: str) -> bool:
        """Kill the capture process and the reader and start them again now (counted in
        ``restarts``; the books settled as for a crash). A restart asked for is not a
        crash: the crash budget starts over, so a ``failed`` stream runs again.
        False when the stream is stopped."""
        with self._sup:
            if self._stopped:
                return False
            logger.warning("stream %s: restarting its capture process %s: %s", self.cfg.id,
                           self.proc.pid, reason)
            self.proc.kill()  # SIGKILL: a stopped or hung process answers nothing else
            self._end_incarnation()
            self._restart_at = None
            self._crashes.clear()
            self._restart_backoff = Backoff(1.0, 30.0)
            with self._lock:
                self.n["restarts"] += 1
            self._start()
            self.status.set("connecting", None)
            return True

    # -- books ------------------------------------------------------------------------
    def _in_transit(self) -> int:
        with self._lock:
            taken = self.n["received"] + self.n["lost"] + self.n["unexplained"]
        dropped = self.proc.counters.get("dropped_capture")
        return self.proc.counters.get("captured") - dropped - taken

    def stats(self) -> dict:
        with self._lock:
            mine = dict(self.n)
            in_flight = self.in_flight
        child = self.proc.counters.snapshot()
        child["dropped_capture"] = self.proc.counters.get("dropped_capture")
        child["captured"] = self.proc.counters.get("captured")
        out = {k: child[k] for k in REPORTED}
        out.update(mine)
        out["in_flight"] = in_flight
        out["in_transit"] = (out["captured"] - out["dropped_capture"] - mine["received"]
                             - mine["lost"] - mine["unexplained"])
        out["last_infer_error"] = self.last_infer_error
        out["pid"] = self.proc.pid
        out.update(self.status.as_dict())
        return out
