"""Ready-made ``infer`` callables: a frame (BGR pixels) -> the app's classify result.

- :func:`worker_classify` sends the frame to the app's model worker (the same
  ``classify`` path, preprocessing and postprocessing as ``/v2`` image requests),
  for the agent: ``worker_classify(lambda app: supervisor.client(app))``.
- :class:`LocalClassifier` runs the worker's own :class:`~edge_node.worker.handler.Handler`
  in this process (tests, benchmarks, a node without workers).

Frames travel as BMP: no compression, so encoding costs a copy (done with numpy:
the agent process never loads OpenCV), and the worker's decoder takes it like any
uploaded image.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np

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


def worker_classify(get_client: Callable[[str], object | None], keep_scores: bool = False
                    ) -> Callable[[str, np.ndarray], dict]:
    """An ``infer`` that calls ``get_client(app).classify(frame as BMP)``."""

    def infer(app: str, frame: np.ndarray) -> dict:
        client = get_client(app)
        if client is None:
            raise AppNotReady(f"app {app!r} is not running on this node")
        result, _tensor = client.classify(encode_frame(frame))
        return _trim(result, keep_scores)

    return infer


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
