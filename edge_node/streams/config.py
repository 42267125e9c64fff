"""One camera stream as the node config declares it (strict: unknown keys rejected).

The lead embeds it as ``streams: list[StreamConfig]`` in the node config and
checks the list with :func:`validate_streams` (ids must be unique).
"""

from __future__ import annotations

import math
import re

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .source import parse_source

#: a stream id goes into an MQTT topic level: no wildcards, no slashes
STREAM_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
#: seconds of frames the shared-memory ring keeps on top of every frame that can be
#: referenced at once: the model worker has at least this long to read a frame
RING_HOLD_S = 0.2


class StreamConfig(BaseModel):
    """A camera (or file) whose frames one app sees at ``fps`` frames a second."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: 1-64 of letters, digits, ``_ - .``; unique on the node
    id: str
    #: ``rtsp://...``, ``http(s)://...`` (MJPEG or a video file), a file path,
    #: ``file:///path`` or ``usb:N`` (the N-th V4L2 device)
    url: str = Field(min_length=1, max_length=2048)
    #: the app (by name) whose model sees every kept frame
    app: str = Field(min_length=1, max_length=128)
    #: frames a second handed to the app; a faster source is decimated
    fps: float = Field(default=5.0, gt=0, le=120)
    #: ``[height, width]`` the capture process resizes to (as the manifest's
    #: ``preprocess.resize``); none keeps the source size
    resize: tuple[int, int] | None = None
    enabled: bool = True
    #: a file source starts again at its end instead of ending
    loop: bool = False
    #: frames at most inside the app's model at once; more are dropped (counted)
    max_in_flight: int = Field(default=1, ge=1, le=16)
    #: frames at most waiting between the capture process and the agent; when
    #: full the oldest is dropped (counted) -- the capture loop never waits
    queue_size: int = Field(default=2, ge=1, le=64)
    #: seconds without a frame before a live source counts as stalled (reconnect)
    stall_timeout: float = Field(default=10.0, gt=0, le=600)
    #: seconds an open (connect + probe) may take
    open_timeout: float = Field(default=10.0, gt=0, le=600)
    #: reconnect backoff: first delay and cap in seconds (exponential, jittered)
    backoff_min: float = Field(default=0.5, gt=0, le=600)
    backoff_max: float = Field(default=30.0, gt=0, le=3600)
    #: consecutive unreadable frames before the source is reopened
    max_bad_frames: int = Field(default=5, ge=1, le=1000)

    @field_validator("id")
    @classmethod
    def _id(cls, v: str) -> str:
        if not STREAM_ID_RE.match(v):
            raise ValueError("a stream id is 1-64 of letters, digits, '_', '-', '.'")
        return v

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        parse_source(v)  # raises ValueError with what is wrong
        return v

    @field_validator("resize")
    @classmethod
    def _resize(cls, v: tuple[int, int] | None) -> tuple[int, int] | None:
        if v is not None and not all(1 <= d <= 8192 for d in v):
            raise ValueError("resize is [height, width], each 1..8192")
        return v

    @model_validator(mode="after")
    def _backoff(self) -> StreamConfig:
        if self.backoff_max < self.backoff_min:
            raise ValueError(f"backoff_max ({self.backoff_max}) < backoff_min ({self.backoff_min})")
        return self


def validate_streams(streams: list[StreamConfig]) -> list[StreamConfig]:
    """The node config's ``streams`` list: ids must be unique (ValueError naming them)."""
    seen: set[str] = set()
    dup = sorted({s.id for s in streams if s.id in seen or seen.add(s.id)})
    if dup:
        raise ValueError(f"duplicate stream id(s): {', '.join(dup)}")
    return streams


def ring_slots(cfg: StreamConfig) -> int:
    """Slots in a stream's shared-memory ring, from its config.

    A slot is reused ``slots`` frames later, i.e. ``slots / fps`` seconds after its
    frame was captured. Enough for every frame that can be referenced at once --
    ``queue_size`` queued, ``max_in_flight`` inside the model (which reads its
    frame straight from the ring), the one being written and one spare -- plus
    ``RING_HOLD_S`` seconds of frames at ``fps``: at the defaults (5 fps, queue 2,
    1 in flight) 6 slots, so a frame in flight stays readable for 1.2 s.
    """
    refs = cfg.queue_size + cfg.max_in_flight + 2
    return refs + math.ceil(cfg.fps * RING_HOLD_S)
