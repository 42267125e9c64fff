"""Camera streams: capture in a process per stream, pixels through shared memory,
frames to the app's model with bounded in-flight work, every frame accounted for.

See :class:`StreamManager` (the agent's side) and :class:`StreamConfig`.
"""

from .config import StreamConfig, validate_streams
from .errors import StreamError
from .manager import StreamManager

__all__ = ["StreamConfig", "StreamError", "StreamManager", "validate_streams"]
