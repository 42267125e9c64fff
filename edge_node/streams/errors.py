"""Errors of the camera-stream package, under the node's one exception root."""

from __future__ import annotations

from edge_node.errors import EdgeError


class StreamError(EdgeError):
    """A stream cannot be started or managed as asked; ``stream_id`` says which."""

    def __init__(self, stream_id: str, message: str) -> None:
        self.stream_id = stream_id
        super().__init__(f"stream {stream_id!r}: {message}")
