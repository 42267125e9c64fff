"""One stream's capture process as the agent sees it: spawn, read frames, stop, clean up.

The process writes pixels into a shared-memory ring it owns and sends only
``(gen, slot, seq, ts, shape)`` through a bounded queue; status changes come on
a second small queue; its counters live in a shared array that survives it.
:meth:`CaptureProcess.start` may be called again after the process died: the
counters carry on, the queues and ring names are new.

:meth:`CaptureProcess.get` hands a frame on either as a private copy of its
pixels (``copy=True``: in-agent inference) or as a :class:`FrameRef`, where it
sits in shared memory, for a model worker to read itself (no copy in the agent).
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import queue
from dataclasses import dataclass

import numpy as np

from . import child
from .config import StreamConfig
from .counters import NAMES, Counters, now_ms
from .ring import FrameRing, unlink_ring

logger = logging.getLogger(__name__)
_ctx = mp.get_context("spawn")
#: status messages waiting at most (they are rare: one per state change)
EVENTS_MAX = 64


@dataclass(frozen=True)
class FrameRef:
    """Where a frame sits in shared memory: all a model worker needs to read it itself."""

    ring: str  #: the shared-memory segment: ``<owner>_<incarnation>_<gen>``
    owner: str  #: the stream's ring family: ``aidc<token>_<stream id>``
    gen: tuple[int, int]  #: (incarnation, ring generation): grows with every new ring
    slot: int
    seq: int
    shape: tuple[int, ...]
    dtype: str = "uint8"

    def message(self) -> dict:
        """The reference as the worker's ``classify_frame`` op takes it."""
        return {"ring": self.ring, "owner": self.owner, "gen": list(self.gen),
                "slot": self.slot, "seq": self.seq, "shape": list(self.shape),
                "dtype": self.dtype}


@dataclass
class Frame:
    seq: int
    ts: float  #: wall-clock time the frame was captured
    image: np.ndarray | None  #: BGR pixels (a private copy); None by reference or if overwritten
    ref: FrameRef | None = None  #: where it sits in shared memory (``get(copy=False)``)
    incarnation: int = 0  #: of the capture process that captured it

    @property
    def torn(self) -> bool:
        """Overwritten (or its ring gone) before the agent got to it."""
        return self.image is None and self.ref is None


class CaptureProcess:
    def __init__(self, cfg: StreamConfig, token: str) -> None:
        self.cfg = cfg
        self.token = token
        self.cells = _ctx.Array("q", len(NAMES), lock=False)
        self.counters = Counters(self.cells)
        self.incarnation = 0
        self.proc = None
        self.frames = self.events = None
        self._stop_r = self._stop_w = None  # a pipe: robust to a SIGKILLed reader
        self._rings: dict[int, FrameRing] = {}

    @property
    def owner(self) -> str:
        """What every ring of this stream is named after (a worker maps one per owner)."""
        return f"aidc{self.token}_{self.cfg.id}"

    @property
    def prefix(self) -> str:
        return f"{self.owner}_{self.incarnation}"

    @property
    def pid(self) -> int | None:
        proc = self.proc  # read once: the monitor thread may close and clear it
        try:
            return proc.pid if proc is not None else None
        except ValueError:  # closed meanwhile
            return None

    def start(self) -> None:
        self.incarnation += 1
        self.counters.set("ring_gen", 0)
        self.counters.beat()
        self.frames = _ctx.Queue(self.cfg.queue_size)
        self.events = _ctx.Queue(EVENTS_MAX)
        self._stop_r, self._stop_w = _ctx.Pipe(duplex=False)
        proc = _ctx.Process(
            target=child.main, name=f"aidc-cam:{self.cfg.id}", daemon=True,
            args=(self.cfg, self.frames, self.events, self.cells, self._stop_r, self.prefix,
                  os.getpid(), logging.getLogger("edge_node.streams").getEffectiveLevel()))
        proc.start()
        self.proc = proc
        self._stop_r.close()  # the child has its own copy
        logger.info("stream %s: capture process %d started", self.cfg.id, self.proc.pid)

    def alive(self) -> bool:
        proc = self.proc
        try:
            return proc is not None and proc.is_alive()
        except ValueError:
            return False

    @property
    def exitcode(self) -> int | None:
        proc = self.proc
        try:
            return proc.exitcode if proc is not None else None
        except ValueError:
            return None

    def heartbeat_age(self) -> float:
        """Seconds since the capture loop last showed it was alive."""
        return (now_ms() - self.counters.get("heartbeat_ms")) / 1000.0

    # -- reading --------------------------------------------------------------
    def get(self, timeout: float, copy: bool = True) -> Frame | None:
        """The next frame, or None when none came within ``timeout`` seconds.

        ``copy``: its pixels copied out of shared memory (``image``); otherwise only
        where it sits (``ref``), for a model worker to read. Either is None when the
        slot was overwritten already.
        """
        try:
            msg = self.frames.get(timeout=timeout)
        except (queue.Empty, OSError, EOFError, ValueError):
            return None
        if msg is None:  # wake_reader()'s sentinel
            return None
        gen, slot, seq, ts, shape = msg
        ring = self._ring(gen)
        if copy:
            return Frame(seq, ts, ring.read(slot, seq, shape) if ring is not None else None,
                         incarnation=self.incarnation)
        if ring is None or not ring.holds(slot, seq):
            return Frame(seq, ts, None, incarnation=self.incarnation)
        return Frame(seq, ts, None, FrameRef(ring.name, self.owner, (self.incarnation, gen), slot,
                                             seq, tuple(shape)), self.incarnation)

    def read(self, ref: FrameRef) -> np.ndarray | None:
        """A private copy of the frame at ``ref`` (the agent keeping a hard example or
        an alarm's evidence), or None when its slot was overwritten, its ring replaced
        or its capture process ended. Read-only and lock-free, through the ring the
        reader already mapped (the seqlock check is :meth:`FrameRing.read`'s): the
        capture process never waits for it. Any thread may call it."""
        incarnation, gen = ref.gen
        ring = self._rings.get(gen) if incarnation == self.incarnation else None
        if ring is None:
            return None
        try:
            return ring.read(ref.slot, ref.seq, ref.shape)
        except (ValueError, BufferError, TypeError):  # unmapped meanwhile (the stream stopped)
            return None

    def _ring(self, gen: int) -> FrameRing | None:
        ring = self._rings.get(gen)
        if ring is None:
            try:
                ring = FrameRing.attach(f"{self.prefix}_{gen}", readonly=True)
            except (FileNotFoundError, ValueError):
                return None
            for old in [g for g in self._rings if g < gen]:
                self._rings.pop(old).close()
            self._rings[gen] = ring
        return ring

    def wake_reader(self) -> None:
        """Unblock a thread waiting in :meth:`get` (it returns None)."""
        try:
            self.frames.put_nowait(None)
        except (queue.Full, OSError, ValueError, AttributeError):
            pass  # a full queue wakes the reader by itself

    def events_pending(self) -> list[dict]:
        out: list[dict] = []
        for _ in range(EVENTS_MAX):
            try:
                out.append(self.events.get_nowait())
            except (queue.Empty, OSError, EOFError, ValueError):
                break
        return out

    def drain(self) -> int:
        """Take what is left in the frame queue (after the process ended); how many."""
        n = 0
        for i in range(self.cfg.queue_size + 8):
            try:
                msg = self.frames.get(timeout=0.05 if i == 0 else 0.01)
            except (queue.Empty, OSError, EOFError, ValueError):
                break
            n += msg is not None
        return n

    # -- stopping ---------------------------------------------------------------
    def request_stop(self) -> None:
        """Ask the loop to stop without waiting (many processes stop in parallel)."""
        if self._stop_w is not None:
            try:
                self._stop_w.send_bytes(b"stop")
            except OSError:  # the process is gone already
                pass

    def stop(self, timeout: float = 2.0) -> None:
        """Ask the loop to stop, then SIGTERM, then SIGKILL; reaps the process."""
        if self.proc is None:
            return
        self.request_stop()
        self.proc.join(timeout)
        if self.proc.is_alive():
            logger.warning("stream %s: capture process %d did not stop; terminating",
                           self.cfg.id, self.proc.pid)
            self.proc.terminate()
            self.proc.join(1.0)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(2.0)

    def kill(self) -> None:
        """SIGKILL a hung process (the watchdog's last resort) and reap it."""
        if self.alive():
            self.proc.kill()
            self.proc.join(2.0)

    def cleanup(self) -> None:
        """After the process ended: unmap rings, remove any it left, close the queues."""
        for ring in self._rings.values():
            ring.close()
        self._rings.clear()
        gen = self.counters.get("ring_gen")
        for g in (gen - 1, gen):
            if g > 0 and unlink_ring(f"{self.prefix}_{g}"):
                logger.info("stream %s: removed ring %s_%d left by the capture process",
                            self.cfg.id, self.prefix, g)
        for q in (self.frames, self.events):
            if q is not None:
                q.close()
                q.join_thread()
        if self._stop_w is not None:
            self._stop_w.close()
            self._stop_w = None
        if self.proc is not None and not self.proc.is_alive():
            self.proc.close()
        self.proc = None
        self.frames = self.events = None
