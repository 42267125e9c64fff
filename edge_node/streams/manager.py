"""The agent's side of camera streams: start/stop them from config, supervise, count.

``StreamManager(infer, on_result, on_status)`` runs each configured stream in
its own capture process (see :mod:`.capture`), hands the frames to
``infer(app, frame_bgr) -> dict | None``, passes each non-None result to
``on_result(stream_id, app, result, frame_ts)`` (with ``frames=True`` also
``frame``, a :class:`~.stream.FrameCopy` that copies the frame's pixels out of
shared memory if called) and every status change to
``on_status(stream_id, status)``. One monitor thread applies status messages,
restarts crashed capture processes within a budget, kills hung ones and samples
the frame rates. :meth:`stats` accounts for every frame (see :mod:`.stream`).
"""

from __future__ import annotations

import logging
import os
import secrets
import threading
import time
from collections.abc import Callable, Iterable

from .config import StreamConfig, validate_streams
from .errors import StreamError
from .stream import InferFn, ResultFn, Stream

logger = logging.getLogger(__name__)

StatusFn = Callable[[str, dict], None]


class StreamManager:
    def __init__(self, infer: InferFn, on_result: ResultFn | None = None,
                 on_status: StatusFn | None = None, *, tick: float = 0.25,
                 frames: bool = False) -> None:
        self._infer = infer
        self._on_result = on_result
        self._frames = frames
        self._on_status = on_status
        self.tick = tick
        #: names this manager's shared-memory rings: aidc<token>_<stream>_<n>_<gen>
        self.token = f"{os.getpid():x}{secrets.token_hex(2)}"
        self._streams: dict[str, Stream] = {}
        self._final: dict[str, dict] = {}
        self._lock = threading.Lock()  # guards _streams (the structure only)
        self._closing = threading.Event()
        self._monitor: threading.Thread | None = None
        self.status_errors = 0

    # -- lifecycle --------------------------------------------------------------
    def start(self, streams: Iterable[StreamConfig] = ()) -> None:
        """Start the monitor and the given streams."""
        if self._monitor is None:
            self._closing.clear()
            self._monitor = threading.Thread(target=self._monitor_loop, name="streams-monitor",
                                             daemon=True)
            self._monitor.start()
        self.apply(streams)

    def apply(self, streams: Iterable[StreamConfig]) -> None:
        """Make the running streams what ``streams`` says: add, remove, restart changed."""
        wanted = {s.id: s for s in validate_streams(list(streams)) if s.enabled}
        with self._lock:
            current = {sid: s.cfg for sid, s in self._streams.items()}
        for sid, cfg in current.items():
            if wanted.get(sid) != cfg:
                self.remove(sid)
        for sid, cfg in wanted.items():
            if current.get(sid) != cfg:
                self.add(cfg)

    def add(self, cfg: StreamConfig) -> None:
        """Start one stream; :class:`StreamError` if its id is taken."""
        with self._lock:
            if cfg.id in self._streams:
                raise StreamError(cfg.id, "a stream with this id is already running")
            stream = Stream(cfg, self.token, self._infer, self._on_result, self._frames)
            self._streams[cfg.id] = stream
            self._final.pop(cfg.id, None)
        stream.start()
        logger.info("stream %s: %s -> app %s at %g fps", cfg.id, stream.status.as_dict()["url"],
                    cfg.app, cfg.fps)
        self._notify(stream)

    def remove(self, stream_id: str) -> dict:
        """Stop one stream; its final stats (``state`` is ``removed``)."""
        with self._lock:
            stream = self._streams.pop(stream_id, None)
        if stream is None:
            raise StreamError(stream_id, "no such stream")
        return self._finish(stream, "removed")

    def stop(self) -> dict[str, dict]:
        """Stop the monitor and every stream; the final stats of each."""
        self._closing.set()
        if self._monitor is not None:
            self._monitor.join(10.0)
            self._monitor = None
        with self._lock:
            streams, self._streams = list(self._streams.values()), {}
        for stream in streams:
            stream.request_stop()
        for stream in streams:
            self._finish(stream, "stopped")
        return self.stats()

    def _finish(self, stream: Stream, state: str) -> dict:
        if stream.stop(state):
            self._notify(stream)
        final = stream.stats()
        with self._lock:
            self._final[stream.cfg.id] = final
        return final

    # -- reading ------------------------------------------------------------------
    def stats(self) -> dict[str, dict]:
        """Per stream: status, measured fps and every frame counter (see :mod:`.stream`).

        Streams stopped or removed keep their final figures here until re-added.
        """
        with self._lock:
            streams = list(self._streams.values())
            out = dict(self._final)
        out.update({s.cfg.id: s.stats() for s in streams})
        return out

    def status(self, stream_id: str) -> dict:
        with self._lock:
            stream = self._streams.get(stream_id)
        if stream is None:
            raise StreamError(stream_id, "no such stream")
        return stream.status.as_dict()

    def pids(self) -> dict[str, int | None]:
        """The capture process of each running stream."""
        with self._lock:
            return {sid: s.proc.pid for sid, s in self._streams.items()}

    def liveness(self) -> dict[str, dict]:
        """Per running stream, :meth:`~.stream.Stream.liveness` (the camera health check)."""
        with self._lock:
            streams = list(self._streams.values())
        return {s.cfg.id: s.liveness() for s in streams}

    def restart(self, stream_id: str, reason: str) -> bool:
        """Restart one stream's capture process and reader now (:meth:`~.stream.Stream.restart`);
        :class:`StreamError` for an unknown stream, False for one that is stopping."""
        with self._lock:
            stream = self._streams.get(stream_id)
        if stream is None:
            raise StreamError(stream_id, "no such stream")
        done = stream.restart(reason)
        if done:
            self._notify(stream)
        return done

    # -- supervision ------------------------------------------------------------------
    def _monitor_loop(self) -> None:
        while not self._closing.wait(self.tick):
            with self._lock:
                streams = list(self._streams.values())
            now = time.monotonic()
            for stream in streams:
                try:
                    changed = stream.poll(now)
                except Exception:
                    logger.exception("stream %s: supervision failed", stream.cfg.id)
                    continue
                if changed:
                    self._notify(stream)

    def _notify(self, stream: Stream) -> None:
        status = stream.status.as_dict()
        logger.info("stream %s: %s%s", stream.cfg.id, status["state"],
                    f" ({status['error']})" if status["error"] else "")
        if self._on_status is None:
            return
        try:
            self._on_status(stream.cfg.id, status)
        except Exception:
            self.status_errors += 1
            logger.exception("stream %s: on_status failed", stream.cfg.id)
