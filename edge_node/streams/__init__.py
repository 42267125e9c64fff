"""Camera streams: capture in a process per stream, pixels through shared memory,
frames to the app's model with bounded in-flight work, every frame accounted for.

See :class:`StreamManager` (the agent's side) and :class:`StreamConfig`.
:class:`StreamManager` is imported on first use, so a model worker that reads
frames from a ring (:mod:`.ring`) does not load the agent's side.
"""

from .config import StreamConfig, validate_streams
from .errors import StreamError

__all__ = ["StreamConfig", "StreamError", "StreamManager", "validate_streams"]


def __getattr__(name: str):
    if name == "StreamManager":
        from .manager import StreamManager

        return StreamManager
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
