"""Errors of the camera-stream package, under the node's one exception root."""

from __future__ import annotations

from edge_node.errors import EdgeError


class StreamError(EdgeError):
    """A stream cannot be started or managed as asked; ``stream_id`` says which."""

    def __init__(self, stream_id: str, message: str) -> None:
        self.stream_id = stream_id
        super().__init__(f"stream {stream_id!r}: {message}")


class FrameGone(EdgeError):
    """The model worker could not read a frame it was sent by reference."""


class FrameOverwritten(FrameGone):
    """The frame's shared-memory slot was overwritten before the worker read it
    (counted as ``dropped_torn``)."""


class RingGone(FrameGone):
    """The frame's shared-memory ring is gone or was replaced (its capture process
    stopped or restarted) -- or the worker cannot attach it."""
