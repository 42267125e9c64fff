"""Versioned message schemas for every topic, validated on receipt.

Every JSON message carries ``"v": 1``. A receiver calls :func:`parse` with the
schema class; anything that is too big, not JSON, of another version or of the
wrong shape raises :class:`~cloud_sync.errors.MessageRejected` with a stable
reason code, which the receiver counts and logs -- never a crash.

Blob chunks are binary frames (a JSON header plus raw bytes), see
:func:`encode_chunk` / :func:`decode_chunk`.
"""

from __future__ import annotations

import json
import struct
import time
import uuid
from typing import Any, Literal, TypeVar

from pydantic import (BaseModel, ConfigDict, Field, ValidationError, field_validator,
                      model_validator)

from .errors import MessageRejected
from .windows import TrainingWindow, zone

#: the largest JSON message we accept (feedback samples carry small images).
MAX_MESSAGE_BYTES = 1 << 20
#: largest data part of one blob chunk.
MAX_CHUNK_BYTES = 1 << 20
SHA256_RE = r"^[0-9a-f]{64}$"
NAME_RE = r"^[a-z0-9][a-z0-9_.-]{0,63}$"

#: what of a sample may leave the site, strictest first (docs/learning.md, data
#: residency): nothing; prediction, scores and label; those plus the features the
#: app's head consumes (the input stays home); those plus the input itself
UPLOAD_LEVELS = ("none", "metadata", "features", "full")
UploadLevel = Literal["none", "metadata", "features", "full"]
#: the most feature values one sample may carry (float32, base64: ~1 MiB message)
MAX_FEATURES = 180_000


def new_msg_id() -> str:
    return uuid.uuid4().hex


def now() -> float:
    return time.time()


class Message(BaseModel):
    """Base of every message: strict (unknown keys rejected), version 1."""

    model_config = ConfigDict(extra="forbid", frozen=False)
    v: Literal[1] = 1

    def to_bytes(self) -> bytes:
        return self.model_dump_json(exclude_none=False).encode()


# -- availability & device twin ------------------------------------------


class Availability(Message):
    status: Literal["online", "offline"]
    ts: float = Field(default_factory=now)
    agent_version: str = ""


class ResourceOverride(BaseModel):
    """An operator's per-node override of an app's resource request."""

    model_config = ConfigDict(extra="forbid")
    card_fraction: float | None = Field(default=None, gt=0, le=1)
    memory_mb: int | None = Field(default=None, ge=16)
    card: str | None = Field(default=None, max_length=32, description="e.g. 'cpu', 'gpu0'")


class AppRef(BaseModel):
    """One app version the cloud wants on a node (desired state entry)."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=NAME_RE)
    version: str = Field(min_length=1, max_length=64)
    sha256: str = Field(pattern=SHA256_RE)
    size: int = Field(ge=1)
    resources: ResourceOverride | None = None
    #: what of this app's samples may leave the site (:data:`UPLOAD_LEVELS`);
    #: the stricter of this and the site's own config applies; None: the site's
    upload: UploadLevel | None = None


#: most windows one schedule may hold (a week of hourly windows is 168; nobody
#: needs that, and a bound keeps a bad message from costing every tick)
MAX_WINDOWS = 64


class TrainingSchedule(BaseModel):
    """The cloud's training windows for one node (time division, see
    docs/scheduling.md). In the desired state it *replaces* the windows and time
    zone of the node's own config; ``training: null`` there means "use the
    node's config"."""

    model_config = ConfigDict(extra="forbid")
    #: IANA time zone of the windows (e.g. "Asia/Shanghai"); none = the node's local zone
    timezone: str | None = Field(default=None, max_length=64)
    windows: list[TrainingWindow] = Field(default_factory=list, max_length=MAX_WINDOWS)

    @field_validator("timezone")
    @classmethod
    def _tz(cls, v: str | None) -> str | None:
        zone(v)
        return v


class DesiredState(Message):
    """Retained on ``state/desired``: what the cloud wants the node to run."""

    node_id: str
    revision: int = Field(ge=0, description="monotonic; the node ignores older ones")
    #: id of the store's database: a new epoch (a rebuilt store) resets the order
    epoch: str = Field(default="", max_length=64)
    ts: float = Field(default_factory=now)
    apps: list[AppRef] = Field(default_factory=list)
    #: training windows set by the cloud; None: the node's own config applies
    training: TrainingSchedule | None = None


AppStatus = Literal["pending", "fetching", "verifying", "loading", "ready", "failed"]


class AppReport(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    version: str
    sha256: str
    status: AppStatus
    error: str | None = None
    progress: float | None = Field(default=None, ge=0, le=1)
    #: the upload level in force for this app's samples on this node
    upload: UploadLevel | None = None
    #: a model fine-tuned on site serves instead of the package's: its version
    #: ("1.0.0+site.2"); None: the package's model
    variant: str | None = Field(default=None, max_length=128)


class AppTelemetry(BaseModel):
    """One app's learning figures on one node (``telemetry``)."""

    model_config = ConfigDict(extra="forbid")
    version: str = Field(max_length=128)
    variant: str | None = Field(default=None, max_length=128)
    #: labelled samples of the version now served, and how many it got right
    labelled: int = Field(default=0, ge=0)
    correct: int = Field(default=0, ge=0)
    accuracy: float | None = Field(default=None, ge=0, le=1)
    samples_kept: int = Field(default=0, ge=0)
    samples_labelled: int = Field(default=0, ge=0)
    samples_heldout: int = Field(default=0, ge=0)
    #: samples put in the outbox with their input / without it / kept home
    shared_full: int = Field(default=0, ge=0)
    shared_metadata: int = Field(default=0, ge=0)
    shared_none: int = Field(default=0, ge=0)
    #: samples put in the outbox with the head's features instead of the input
    shared_features: int = Field(default=0, ge=0)
    #: fine-tune runs on the node by state (promoted, rejected, failed, ...)
    finetunes: dict[str, int] = Field(default_factory=dict)
    #: inference at the node's HTTP front since the previous telemetry message (the
    #: interval): requests answered, those that failed (5xx), and the 95th
    #: percentile latency in ms (upper bound of its histogram bucket; None: none)
    requests: int = Field(default=0, ge=0)
    errors: int = Field(default=0, ge=0)
    latency_p95_ms: float | None = Field(default=None, ge=0)


class Telemetry(Message):
    """Periodic, QoS 0, not retained, on ``telemetry``: learning figures per app."""

    node_id: str
    ts: float = Field(default_factory=now)
    interval_s: float = Field(default=60.0, gt=0)
    apps: dict[str, AppTelemetry] = Field(default_factory=dict, max_length=256)


class ReportedState(Message):
    """Retained on ``state/reported``: what the node actually runs."""

    node_id: str
    ts: float = Field(default_factory=now)
    agent_version: str = ""
    desired_revision: int = -1
    apps: list[AppReport] = Field(default_factory=list)
    #: rejected inbound messages / packages by reason code -> count
    rejected: dict[str, int] = Field(default_factory=dict)
    #: where the node serves the v2 inference API (for operators)
    http_url: str | None = None
    #: the node's cards and how they are sliced: [{"id": "cpu", "kind": "cpu",
    #: "cores": 2, "memory_mb": 23000, "allocation": {...}}]
    cards: list[dict[str, Any]] = Field(default_factory=list)
    outbox_pending: int = 0
    #: the training windows in force: {"source": "cloud" | "config",
    #: "timezone": ..., "windows": [...]}
    training: dict[str, Any] | None = None


class StreamStatus(Message):
    """Retained on ``nodes/<id>/streams/<stream_id>/status``: one camera's state."""

    node_id: str
    stream_id: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    app: str
    url: str = Field(description="credentials masked")
    state: Literal["connecting", "online", "offline", "ended", "failed", "stopped", "removed"]
    error: str | None = None
    since: float
    ts: float = Field(default_factory=now)
    attempt: int = Field(default=0, ge=0)
    retry_in: float | None = None
    fps: float = 0.0
    processed_fps: float = 0.0
    target_fps: float


# -- durable uplink (outbox) -----------------------------------------------


class Prediction(BaseModel):
    model_config = ConfigDict(extra="forbid")
    label: str
    index: int
    score: float


class SampleFeatures(BaseModel):
    """What a sample shares at upload level ``features``: the vector the app's head
    consumes (the input stays on site), and which model made it.

    ``b64`` is base64 of ``n`` little-endian float32 values (4 n bytes).
    :meth:`values` decodes and checks it (length, finite)."""

    model_config = ConfigDict(extra="forbid")
    #: the head's input tensor in the graph (``Head.feature``)
    tensor: str = Field(min_length=1, max_length=256)
    #: the head node (the Gemm/MatMul the features feed)
    head: str = Field(min_length=1, max_length=256)
    n: int = Field(ge=1, le=MAX_FEATURES)
    dtype: Literal["float32"] = "float32"
    b64: str = Field(min_length=1, max_length=MAX_MESSAGE_BYTES)
    #: the app version whose model computed them (a site variant: "1.0.0+site.1")
    model_version: str = Field(min_length=1, max_length=128)
    #: sha256 of that model file: feature vectors are comparable only within one model
    model_sha256: str = Field(pattern=SHA256_RE)

    def values(self) -> bytes:
        """The raw little-endian float32 bytes, checked: ValueError saying why
        (not base64, a length other than ``n`` values, NaN or infinity)."""
        import base64
        import binascii
        import math
        from array import array

        try:
            raw = base64.b64decode(self.b64, validate=True)
        except (binascii.Error, ValueError) as err:
            raise ValueError(f"features are not base64: {err}") from None
        if len(raw) != 4 * self.n:
            raise ValueError(f"{len(raw)} bytes of features, n={self.n} float32 values "
                             f"need {4 * self.n}")
        vals = array("f")
        vals.frombytes(raw)
        if struct.pack("=I", 1) != struct.pack("<I", 1):  # a big-endian host
            vals.byteswap()
        bad = [i for i, v in enumerate(vals) if not math.isfinite(v)]
        if bad:
            raise ValueError(f"{len(bad)} non-finite feature values (the first at index "
                             f"{bad[0]}: {vals[bad[0]]})")
        return raw


class FeedbackSample(BaseModel):
    """A hard example: the input the model saw and what it said."""

    model_config = ConfigDict(extra="forbid")
    sample_id: str = Field(min_length=8, max_length=64)
    app: str = Field(pattern=NAME_RE)
    version: str
    created_at: float
    reason: str = Field(description="why it was kept, e.g. 'confidence<0.6'")
    #: "none" (with an empty input_b64) when the site's upload policy keeps inputs home
    input_type: Literal["image/png", "image/jpeg", "tensor/npy", "none"]
    input_b64: str = Field(default="", max_length=MAX_MESSAGE_BYTES)
    prediction: Prediction
    scores: list[float] = Field(default_factory=list, max_length=10000)
    label: str | None = Field(default=None, description="confirmed label, if any")
    source: str | None = Field(default=None, description="stream or 'api'")
    #: what the site's upload policy let travel: "full" (with the input),
    #: "features" (the head's features instead of the input) or "metadata"
    shared: Literal["full", "features", "metadata"] = "full"
    #: how informative the policy judged it (0..1): the labelling queue's order
    usefulness: float = Field(default=0.0, ge=0, le=1)
    #: kept apart on the node to judge fine-tuned models (never trained on there)
    heldout: bool = False
    #: the head's features, at shared "features" (and only then)
    features: SampleFeatures | None = None

    @model_validator(mode="after")
    def _input(self) -> FeedbackSample:
        if (self.input_type == "none") != (self.input_b64 == ""):
            raise ValueError("input_type 'none' goes with an empty input_b64, and only then")
        if self.shared in ("metadata", "features") and self.input_type != "none":
            raise ValueError(f"a {self.shared}-only sample carries no input")
        if (self.shared == "features") != (self.features is not None):
            raise ValueError("features travel with shared 'features', and only then")
        return self


class FeedbackMessage(Message):
    msg_id: str = Field(min_length=8, max_length=64)
    ts: float = Field(default_factory=now)
    sample: FeedbackSample


class EventMessage(Message):
    msg_id: str = Field(min_length=8, max_length=64)
    ts: float = Field(default_factory=now)
    type: str = Field(min_length=1, max_length=64)
    severity: Literal["debug", "info", "warning", "error", "critical"] = "info"
    app: str | None = None
    data: dict[str, Any] = Field(default_factory=dict)


class AckItem(BaseModel):
    model_config = ConfigDict(extra="forbid")
    msg_id: str
    ok: bool = True
    reason: str | None = None


class Ack(Message):
    """Cloud -> node on ``ack``: these outbox messages are stored (or refused for
    good, with a reason) and must not be sent again."""

    acks: list[AckItem] = Field(min_length=1, max_length=1000)


# -- remote operations (commands / results) ---------------------------------

#: what the cloud may ask a node to do (docs/fleet.md, Remote operations)
COMMAND_OPS = ("restart_app", "diagnostics", "selfcheck", "set_config", "doctor")
CommandOp = Literal["restart_app", "diagnostics", "selfcheck", "set_config", "doctor"]
COMMAND_ID_RE = r"^[A-Za-z0-9][A-Za-z0-9_.-]{7,63}$"
#: the largest diagnostics bundle a result may carry (base64 grows it by 4/3)
MAX_BUNDLE_BYTES = 700 * 1024


class RestartAppArgs(BaseModel):
    """``restart_app``: stop the app's worker process and start it again."""

    model_config = ConfigDict(extra="forbid")
    app: str = Field(pattern=NAME_RE)


class DiagnosticsArgs(BaseModel):
    """``diagnostics``: a bundle (logs tail, redacted config, health) back to the cloud."""

    model_config = ConfigDict(extra="forbid")
    log_lines: int = Field(default=500, ge=1, le=5000)


class SelfcheckArgs(BaseModel):
    """``selfcheck``: the node's health checks (edge_node/selfcheck.py)."""

    model_config = ConfigDict(extra="forbid")


class DoctorArgs(BaseModel):
    """``doctor``: every health check now (edge_node/health), with ``fix`` each failing
    one's remedy applied; the report and the fault journal's summary come back."""

    model_config = ConfigDict(extra="forbid")
    fix: bool = False


#: node events of the health monitor (edge_node/health/monitor.py), ``data``:
#: ``fault`` (the kind, docs/faults.md), ``check``, ``detail``, ``detected_at``; healed:
#: ``remedy``, ``seconds``, ``count``; unhealed: ``why``, ``count`` (``repeated``: a
#: persisting fault re-reported)
FAULT_EVENTS = ("fault_detected", "fault_healed", "fault_unhealed")


class HardExampleSettings(BaseModel):
    """One app's hard-example policy and upload level, as the cloud may set them
    (the node validates them again with its own config model)."""

    model_config = ConfigDict(extra="forbid")
    policy: Literal["confidence", "margin", "entropy", "box", "none"] | None = None
    threshold: float | None = Field(default=None, ge=0, le=1)
    box_low: float | None = Field(default=None, ge=0, le=1)
    upload: UploadLevel | None = None


class SetConfigArgs(BaseModel):
    """``set_config``: an app's hard-example / feedback settings; ``feedback: null``
    drops the cloud's settings (the node's own config applies again)."""

    model_config = ConfigDict(extra="forbid")
    app: str = Field(pattern=NAME_RE)
    feedback: HardExampleSettings | None


COMMAND_ARGS: dict[str, type[BaseModel]] = {
    "restart_app": RestartAppArgs, "diagnostics": DiagnosticsArgs,
    "selfcheck": SelfcheckArgs, "set_config": SetConfigArgs, "doctor": DoctorArgs,
}


class Command(Message):
    """Cloud -> node on ``commands``: run ``op`` once. Re-sent until the node
    answers; the node runs a ``command_id`` at most once and answers ``expired``
    without running it after ``expires_at``."""

    command_id: str = Field(pattern=COMMAND_ID_RE)
    node_id: str
    op: CommandOp
    args: dict[str, Any] = Field(default_factory=dict)
    issued_at: float = Field(default_factory=now)
    expires_at: float
    by: str | None = Field(default=None, max_length=64)


class CommandResult(Message):
    """Node -> cloud on ``results``, through the outbox (acked by ``msg_id``)."""

    msg_id: str = Field(default_factory=new_msg_id, min_length=8, max_length=64)
    command_id: str = Field(pattern=COMMAND_ID_RE)
    node_id: str
    op: str = Field(max_length=64)
    status: Literal["done", "failed", "expired", "rejected"]
    ts: float = Field(default_factory=now)
    started_at: float | None = None
    finished_at: float | None = None
    result: dict[str, Any] = Field(default_factory=dict)
    error: str | None = Field(default=None, max_length=4000)
    #: an answer sent again for a command id seen before (it did not run again)
    duplicate: bool = False
    #: ``diagnostics``: the bundle (tar.gz), base64, and its sha256
    bundle_b64: str | None = Field(default=None, max_length=MAX_BUNDLE_BYTES * 4 // 3 + 8)
    bundle_sha256: str | None = Field(default=None, pattern=SHA256_RE)


# -- blob transfer --------------------------------------------------------


class BlobRequest(Message):
    """Node -> cloud on ``blob/request``: send me ``length`` bytes from ``offset``."""

    msg_id: str = Field(default_factory=new_msg_id, min_length=8, max_length=64)
    sha256: str = Field(pattern=SHA256_RE)
    offset: int = Field(ge=0)
    length: int = Field(ge=1, le=64 * MAX_CHUNK_BYTES)
    chunk_size: int = Field(ge=1024, le=MAX_CHUNK_BYTES)


class ChunkHeader(Message):
    """Header of one binary chunk frame on ``blob/chunk``."""

    sha256: str = Field(pattern=SHA256_RE)
    offset: int = Field(ge=0)
    size: int = Field(ge=0, description="total size of the blob")
    length: int = Field(ge=0, description="bytes of data in this frame")
    error: str | None = Field(default=None, description="e.g. 'unknown_blob'")


_FRAME_MAGIC = b"AIDC"
_FRAME_HEAD = struct.Struct(">4sI")  # magic, header length


def encode_chunk(header: ChunkHeader, data: bytes) -> bytes:
    """``AIDC`` + u32 header length + JSON header + raw data."""
    if header.length != len(data):
        raise ValueError("header.length must equal len(data)")
    h = header.to_bytes()
    return _FRAME_HEAD.pack(_FRAME_MAGIC, len(h)) + h + data


def decode_chunk(payload: bytes) -> tuple[ChunkHeader, bytes]:
    if len(payload) > MAX_CHUNK_BYTES + 4096:
        raise MessageRejected("oversized", f"chunk frame of {len(payload)} bytes")
    if len(payload) < _FRAME_HEAD.size:
        raise MessageRejected("bad_frame", "shorter than the frame header")
    magic, hlen = _FRAME_HEAD.unpack_from(payload)
    if magic != _FRAME_MAGIC or hlen > 4096 or _FRAME_HEAD.size + hlen > len(payload):
        raise MessageRejected("bad_frame", "bad magic or header length")
    start = _FRAME_HEAD.size
    header = parse(ChunkHeader, payload[start:start + hlen])
    data = payload[start + hlen:]
    if len(data) != header.length:
        raise MessageRejected(
            "bad_frame", f"header says {header.length} bytes, frame has {len(data)}"
        )
    return header, data


# -- parsing --------------------------------------------------------------

M = TypeVar("M", bound=Message)


def parse(cls: type[M], payload: bytes | str, max_bytes: int = MAX_MESSAGE_BYTES) -> M:
    """Validate ``payload`` as ``cls``; raise :class:`MessageRejected` with a reason."""
    if isinstance(payload, str):
        payload = payload.encode()
    if len(payload) > max_bytes:
        raise MessageRejected("oversized", f"{len(payload)} bytes > {max_bytes}")
    try:
        obj = json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise MessageRejected("not_json", str(err)[:200]) from err
    if not isinstance(obj, dict):
        raise MessageRejected("bad_schema", "message is not a JSON object")
    if obj.get("v") != 1:
        raise MessageRejected("unsupported_version", f"v={obj.get('v')!r}")
    try:
        return cls.model_validate(obj)
    except ValidationError as err:
        first = err.errors()[0]
        loc = ".".join(str(p) for p in first.get("loc", ()))
        raise MessageRejected(
            "bad_schema", f"{cls.__name__}: {loc}: {first.get('msg')}"
        ) from err
