"""The node's own config: strict (unknown keys rejected), one validated object.

Loaded from a JSON or TOML file plus explicit overrides; an error names the key
path, the value and what is wrong.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from cloud_sync import schemas
from cloud_sync.connection import Tls, TlsError
from cloud_sync.topics import validate_node_id

from .errors import ConfigError
from .scheduling.config import ScheduleConfig
from .serving.batching import BatchOverride
from .streams.config import StreamConfig, validate_streams


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class MqttConfig(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(default=1883, ge=1, le=65535)
    topic_prefix: str = ""
    username: str | None = None
    password: str | None = None
    keepalive: int = Field(default=30, ge=5, le=3600)
    #: a half-open connection is found by a QoS 1 ping every ping_interval_s whose
    #: PUBACK must come back within ping_timeout_s (detected within their sum)
    ping_interval_s: float = Field(default=10.0, ge=1, le=600)
    ping_timeout_s: float = Field(default=10.0, ge=1, le=600)
    #: TLS to the broker (TLS 1.2 or later): its certificate is checked against
    #: ca_file (none: the system's trust store) and must name ``host``
    tls: bool = False
    ca_file: Path | None = None
    #: this node's own certificate and key, for a broker that asks for one
    cert_file: Path | None = None
    key_file: Path | None = None
    #: the broker's certificate must name ``host`` (leave it on)
    tls_check_hostname: bool = True

    @model_validator(mode="after")
    def _tls(self) -> MqttConfig:
        files = [k for k in ("ca_file", "cert_file", "key_file") if getattr(self, k)]
        if files and not self.tls:
            raise ValueError(f"mqtt.{files[0]} is set but mqtt.tls is false: set "
                             "mqtt.tls = true (or remove it)")
        if self.key_file and not self.cert_file:
            raise ValueError("mqtt.key_file needs mqtt.cert_file (the client certificate)")
        return self

    def tls_options(self) -> Tls | None:
        """What :class:`cloud_sync.connection.MqttConnection` needs for TLS; None: plain."""
        if not self.tls:
            return None
        return Tls(ca_file=self.ca_file, cert_file=self.cert_file, key_file=self.key_file,
                   check_hostname=self.tls_check_hostname)


class HttpConfig(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(default=8090, ge=0, le=65535)
    max_body_mb: int = Field(default=16, ge=1, le=1024)
    #: per-app overrides of the manifest's dynamic batching:
    #: {"digits": {"enabled": true, "max_batch": 16, "max_delay_ms": 2}}
    batching: dict[str, BatchOverride] = Field(default_factory=dict)


class BlobConfig(_Strict):
    chunk_size: int = Field(default=256 * 1024, ge=4096, le=1 << 20)
    window: int = Field(default=8, ge=1, le=64)
    chunk_timeout: float = Field(default=5.0, gt=0)


class OutboxConfig(_Strict):
    """The durable uplink: resend unacked messages with jittered backoff."""

    min_retry: float = Field(default=2.0, gt=0)
    max_retry: float = Field(default=30.0, gt=0)
    max_in_flight: int = Field(default=100, ge=1)
    #: unsent messages kept at most; beyond it new samples stay local (counted)
    max_rows: int = Field(default=100_000, ge=10)


#: what of a sample may leave the site, least to most (docs/learning.md, data residency)
UPLOAD_LEVELS = schemas.UPLOAD_LEVELS  # ("none", "metadata", "features", "full")
UploadLevel = schemas.UploadLevel


class AppFeedbackConfig(_Strict):
    """Per-app overrides of the manifest's hard-example policy, and its upload level."""

    policy: Literal["confidence", "margin", "entropy", "box", "none"] | None = None
    threshold: float | None = Field(default=None, ge=0)
    box_low: float | None = Field(default=None, ge=0, le=1)
    upload: UploadLevel | None = None


class FeedbackConfig(_Strict):
    enabled: bool = True
    #: hard examples kept per app per minute at most (excess counted, not kept)
    max_per_minute: int = Field(default=60, ge=0)
    #: override the manifest's threshold for every app
    threshold: float | None = Field(default=None, ge=0, le=1)
    #: disk quota of the kept samples: past it the oldest unlabelled are evicted
    #: (counted); when only labelled ones are left, new samples are not kept
    max_disk_mb: float = Field(default=1024, gt=0)
    max_samples: int = Field(default=100_000, ge=1)
    #: share of samples kept apart (never trained on) to judge a fine-tuned model
    heldout_fraction: float = Field(default=0.2, ge=0, lt=1)
    #: what leaves the site by default: "full" (input + prediction + label),
    #: "features" (the head's features instead of the input), "metadata" (no
    #: input), "none"; the stricter of this and the cloud's applies
    upload: UploadLevel = "full"
    apps: dict[str, AppFeedbackConfig] = Field(default_factory=dict)


class AlarmRule(_Strict):
    """Raise an alarm when at least ``n`` of a stream's last ``m`` results have one of
    ``labels`` at ``min_score`` or more (docs/alarms.md)."""

    #: 1-64 of letters, digits, ``_ - .``; unique on the node
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    app: str = Field(min_length=1, max_length=128)
    #: one stream (its id); none: every stream of the app
    stream: str | None = None
    labels: list[str] = Field(min_length=1, max_length=1000)
    min_score: float = Field(default=0.5, ge=0, le=1)
    n: int = Field(default=3, ge=1, le=1000)
    m: int = Field(default=5, ge=1, le=1000)
    severity: Literal["info", "warning", "error", "critical"] = "warning"
    #: an alarm clears itself after this long without a matching frame...
    clear_after_s: float = Field(default=30.0, gt=0)
    #: ...unless latched: then it stays until someone handles it
    latch: bool = False
    #: after an alarm ends, seconds before the same rule and stream may raise again
    cooldown_s: float = Field(default=0.0, ge=0)
    #: the app's class a false alarm's frame is labelled with when no class is given
    #: ("background", "none", ...)
    false_alarm_label: str | None = Field(default=None, min_length=1, max_length=256)

    @model_validator(mode="after")
    def _n_of_m(self) -> AlarmRule:
        if self.n > self.m:
            raise ValueError(f"n ({self.n}) cannot be more than m ({self.m})")
        return self


class AlarmsConfig(_Strict):
    rules: list[AlarmRule] = Field(default_factory=list)
    #: alarms kept on the node; past it the oldest handled or cleared ones go
    #: (their evidence too); open and acknowledged ones are never removed
    max_stored: int = Field(default=10_000, ge=10)

    @field_validator("rules")
    @classmethod
    def _unique(cls, v: list[AlarmRule]) -> list[AlarmRule]:
        names = [r.name for r in v]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"rule names must be unique: {dup}")
        return v


class ResourcesConfig(_Strict):
    """How the node's cards are cut into slices for apps."""

    #: memory kept back for the OS and the management plane
    reserve_mb: int = Field(default=1024, ge=0)
    #: fractions under one core time-share a core (one thread, no spinning);
    #: False gives every app whole dedicated cores (rounding up)
    share_cores: bool = True
    #: GPU memory counted per slice for the CUDA context
    gpu_context_mb: int = Field(default=300, ge=0)
    #: per-app overrides of the manifest's request, set on site:
    #: {"digits": {"card_fraction": 0.5, "memory_mb": 256, "card": "cpu"}};
    #: an override from the cloud (the desired state) wins over these
    apps: dict[str, dict] = Field(default_factory=dict)


class SupervisionConfig(_Strict):
    """How the agent keeps its apps running (docs/faults.md)."""

    #: a worker that dies is restarted at most this many times within
    #: ``restart_window_s``; past that it is a crash loop
    restart_budget: int = Field(default=5, ge=1, le=100)
    restart_window_s: float = Field(default=60.0, gt=0, le=3600)
    #: a version becomes its app's *last known good* once it served this long with no
    #: worker restart; a crash loop of a later version rolls back to it
    stable_s: float = Field(default=60.0, ge=0, le=86400)
    #: seconds between the reconciler's checks that every app serves (a worker
    #: that gave up is found within this)
    check_interval_s: float = Field(default=2.0, gt=0, le=300)


class NodeConfig(_Strict):
    node_id: str
    data_dir: Path
    mqtt: MqttConfig = Field(default_factory=MqttConfig)
    http: HttpConfig = Field(default_factory=HttpConfig)
    blob: BlobConfig = Field(default_factory=BlobConfig)
    feedback: FeedbackConfig = Field(default_factory=FeedbackConfig)
    outbox: OutboxConfig = Field(default_factory=OutboxConfig)
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig)
    scheduling: ScheduleConfig = Field(default_factory=ScheduleConfig)
    #: camera streams, see docs/streams.md
    streams: list[StreamConfig] = Field(default_factory=list)
    #: rules that turn stream results into alarms, see docs/alarms.md
    alarms: AlarmsConfig = Field(default_factory=AlarmsConfig)
    supervision: SupervisionConfig = Field(default_factory=SupervisionConfig)
    #: seconds between two telemetry messages (per-app accuracy, samples, and the
    #: interval's requests / errors / p95 latency the cloud's rollout gates read)
    telemetry_interval_s: float = Field(default=60.0, ge=0.5, le=3600)
    #: public keys (PEM or raw-32-byte files) of publishers whose apps we run;
    #: every *.pub in <data_dir>/trusted_keys is trusted as well
    trusted_keys: list[Path] = Field(default_factory=list)

    @field_validator("node_id")
    @classmethod
    def _node_id(cls, v: str) -> str:
        return validate_node_id(v)

    @field_validator("streams")
    @classmethod
    def _streams(cls, v: list[StreamConfig]) -> list[StreamConfig]:
        return validate_streams(v)

    @model_validator(mode="after")
    def _alarm_streams(self) -> NodeConfig:
        """A rule naming a stream must name one of this node's, of the rule's app."""
        apps = {s.id: s.app for s in self.streams}
        for i, rule in enumerate(self.alarms.rules):
            where = f"alarms.rules.{i}.stream = {rule.stream!r}"
            if rule.stream is None:
                continue
            if rule.stream not in apps:
                raise ValueError(f"{where}: no such stream on this node "
                                 f"(streams: {sorted(apps)})")
            if apps[rule.stream] != rule.app:
                raise ValueError(f"{where}: the stream feeds app {apps[rule.stream]!r}, "
                                 f"not the rule's {rule.app!r}")
        return self


def _fmt(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e.get("loc", ()))
        if not loc:  # a check across keys: its message names them
            lines.append(str(e.get("msg")).removeprefix("Value error, "))
            continue
        lines.append(f"{loc} = {e.get('input')!r}: {e.get('msg')}")
    return "; ".join(lines)


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def load_config(path: str | Path | None = None, **overrides: Any) -> NodeConfig:
    """Read ``path`` (JSON or TOML) if given, apply ``overrides``, validate."""
    raw: dict = {}
    if path is not None:
        p = Path(path)
        try:
            text = p.read_text()
            raw = tomllib.loads(text) if p.suffix == ".toml" else json.loads(text)
        except (OSError, ValueError) as err:
            raise ConfigError(f"cannot read config {p}: {err}") from err
    raw = _merge(raw, {k: v for k, v in overrides.items() if v is not None})
    try:
        cfg = NodeConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(f"invalid node config: {_fmt(err)}") from err
    tls = cfg.mqtt.tls_options()
    if tls is not None:  # a CA or key that cannot be read: say so now, not at connect
        try:
            tls.context()
        except TlsError as err:
            raise ConfigError(f"invalid node config: mqtt.tls: {err}") from err
    return cfg
