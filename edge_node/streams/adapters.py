"""Ready-made ``infer`` callables: a frame (BGR pixels) -> the app's classify result.

- :func:`worker_classify` (a :class:`WorkerClassifier`) for the agent:
  ``worker_classify(lambda app: supervisor.client(app))``. By default frames go
  **by reference**: the stream hands :meth:`WorkerClassifier.by_ref` a
  :class:`~edge_node.streams.proc.FrameRef` (ring name, slot, sequence number,
  shape) and the worker reads the pixels from the stream's shared-memory ring
  itself (op ``classify_frame``): the agent neither copies nor sends pixels. A
  slot the capture process overwrote before the worker read it raises
  :class:`~.errors.FrameOverwritten` (the stream counts it in ``dropped_torn``);
  a ring the worker cannot attach raises :class:`~.errors.RingGone`.
  ``shared_memory=False`` (and calling it with pixels) is the copy path: the
  frame is sent as a BMP, the same ``classify`` path as ``/v2`` image requests.
- :class:`LocalClassifier` runs the worker's own :class:`~edge_node.worker.handler.Handler`
  in this process (tests, benchmarks, a node without workers): the copy path.

On the copy path frames travel as BMP: no compression, so encoding costs a copy
(done with numpy: the agent process never loads OpenCV), and the worker's decoder
takes it like any uploaded image.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np

from edge_node.worker.errors import WorkerError, WorkerException, WorkerUnavailable

from .errors import FrameOverwritten, RingGone
from .proc import FrameRef

#: result keys kept by default (``scores`` can be thousands of floats)
RESULT_KEYS = ("label", "index", "score", "top_k")


class AppNotReady(RuntimeError):
    """The app the stream feeds has no running worker (counted as ``failed``)."""


def encode_frame(frame: np.ndarray) -> bytes:
    """A BGR (or grey) uint8 frame as an uncompressed 24-bit, top-down BMP."""
    if frame.dtype != np.uint8 or frame.ndim not in (2, 3):
        raise ValueError(f"cannot encode a {frame.dtype} frame of shape {frame.shape}")
    if frame.ndim == 2:
        frame = np.repeat(frame[:, :, None], 3, axis=2)
    h, w, c = frame.shape
    if c != 3:
        raise ValueError(f"cannot encode a frame with {c} channels")
    stride = (w * 3 + 3) & ~3
    size = stride * h
    header = struct.pack("<2sIHHI", b"BM", 54 + size, 0, 0, 54) + struct.pack(
        "<IiiHHIIiiII", 40, w, -h, 1, 24, 0, size, 2835, 2835, 0, 0)
    if stride == w * 3:
        return header + np.ascontiguousarray(frame).tobytes()
    rows = np.zeros((h, stride), np.uint8)
    rows[:, : w * 3] = frame.reshape(h, w * 3)
    return header + rows.tobytes()


def _trim(result: dict, keep_scores: bool) -> dict:
    return result if keep_scores else {k: result[k] for k in RESULT_KEYS if k in result}


class WorkerClassifier:
    """``infer`` for frames classified by the app's model worker process.

    ``get_client(app)`` is the app's :class:`~edge_node.worker.client.WorkerClient`,
    or None when the app has no running worker (:class:`AppNotReady`, counted as
    ``failed``). With ``shared_memory`` (the default) a stream calls
    :meth:`by_ref` and the worker reads the frame from shared memory; calling the
    object with pixels sends them (the copy path).
    """

    def __init__(self, get_client: Callable[[str], object | None], keep_scores: bool = False,
                 shared_memory: bool = True) -> None:
        self._get_client = get_client
        self.keep_scores = keep_scores
        self.shared_memory = shared_memory

    def _client(self, app: str):
        client = self._get_client(app)
        if client is None:
            raise AppNotReady(f"app {app!r} is not running on this node")
        return client

    def _ask(self, app: str, call: Callable[[object], dict]) -> dict:
        """``call(client)``; when the worker went away because the app's worker was
        just replaced (a new version, a fine-tuned variant promoted or rolled back:
        the new one serves before the old one stops), once more on the new one, so a
        switch costs no frame."""
        client = self._client(app)
        try:
            return call(client)
        except WorkerUnavailable:
            now = self._get_client(app)
            if now is None or now is client:
                raise
            return call(now)

    def __call__(self, app: str, frame: np.ndarray) -> dict:
        """The copy path: the frame's pixels sent to the worker as a BMP."""
        image = encode_frame(frame)
        result, _tensor = self._ask(app, lambda c: c.classify(image))
        return _trim(result, self.keep_scores)

    def by_ref(self, app: str, ref: FrameRef) -> dict:
        """The worker reads the frame at ``ref`` from shared memory and classifies it."""
        msg = {"op": "classify_frame", **ref.message(), "keep_scores": self.keep_scores}
        try:
            reply = self._ask(app, lambda c: c.request(msg))
        except WorkerError as err:
            if err.status == 409:
                raise FrameOverwritten(err.message) from None
            if err.status == 410:
                raise RingGone(err.message) from None
            raise
        return _trim(reply["result"], self.keep_scores)

    def release(self, app: str, owner: str, incarnation: int) -> None:
        """Tell the worker a stream's capture process ended: unmap the rings of ``owner``
        up to ``incarnation``. Best effort (a worker that is gone has nothing mapped)."""
        client = self._get_client(app)
        if client is None:
            return
        try:
            client.request({"op": "release_frames", "owner": owner, "incarnation": incarnation})
        except WorkerException:
            pass


def worker_classify(get_client: Callable[[str], object | None], keep_scores: bool = False,
                    shared_memory: bool = True) -> WorkerClassifier:
    """An ``infer`` for the agent: the app's worker classifies each frame, reading it
    from shared memory (``shared_memory``, the default) or sent as a BMP."""
    return WorkerClassifier(get_client, keep_scores, shared_memory)


class LocalClassifier:
    """``infer`` for apps loaded in this process: ``{app name: app dir}``."""

    def __init__(self, app_dirs: dict[str, Path], threads: int = 1,
                 keep_scores: bool = False) -> None:
        from edge_node.worker.handler import Handler
        from edge_node.worker.loader import load_app

        self.keep_scores = keep_scores
        self._handlers = {name: Handler(load_app(Path(d), threads=threads))
                          for name, d in app_dirs.items()}

    def __call__(self, app: str, frame: np.ndarray) -> dict:
        handler = self._handlers.get(app)
        if handler is None:
            raise AppNotReady(f"app {app!r} is not loaded")
        result, _tensor = handler.classify(encode_frame(frame))
        return _trim(result, self.keep_scores)
