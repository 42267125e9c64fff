"""The AppStore's own config: strict (unknown keys are errors), one file.

Loaded from a JSON or TOML file plus overrides (CLI flags); an error names the
key path, the value and what is wrong with it::

    config error: mqtt_port = 'abc': Input should be a valid integer
"""

from __future__ import annotations

import json
import logging
import tomllib
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .errors import ConfigError

logger = logging.getLogger(__name__)


class AppStoreConfig(BaseModel):
    """Every setting of one AppStore instance."""

    model_config = ConfigDict(extra="forbid")

    #: everything the store keeps: appstore.db, blobs/, samples/, keys/
    data_dir: Path
    mqtt_host: str = "127.0.0.1"
    mqtt_port: int = Field(default=1883, ge=1, le=65535)
    mqtt_username: str | None = None
    mqtt_password: str | None = None
    #: put in front of the ``aidc/v1`` root (several fleets on one broker)
    topic_prefix: str = ""
    #: shared-subscription group for feedback/events/blob requests, so several
    #: AppStore workers split one fleet; None for brokers without ``$share``
    shared_group: str | None = Field(default="appstore", pattern=r"^[A-Za-z0-9_-]{1,64}$")
    http_host: str = "127.0.0.1"
    #: 0 picks a free port (tests); the bound port is ``AppStoreService.url``
    http_port: int = Field(default=8080, ge=0, le=65535)
    #: the publisher's Ed25519 private key (PEM); default data_dir/keys/publisher.pem
    signing_key: Path | None = None
    max_upload_mb: int = Field(default=512, ge=1, le=1 << 16)
    #: feedback/events waiting for the ingest thread; beyond it, dropped unacked
    #: (and counted) so the node resends them later
    ingest_queue: int = Field(default=10000, ge=10)

    @model_validator(mode="after")
    def _defaults(self) -> "AppStoreConfig":
        if self.signing_key is None:
            self.signing_key = self.data_dir / "keys" / "publisher.pem"
        return self

    @property
    def signing_key_path(self) -> Path:
        assert self.signing_key is not None
        return self.signing_key

    @property
    def keys_dir(self) -> Path:
        return self.data_dir / "keys"

    @property
    def trusted_dir(self) -> Path:
        return self.keys_dir / "trusted"

    @property
    def db_path(self) -> Path:
        return self.data_dir / "appstore.db"

    @property
    def blobs_dir(self) -> Path:
        return self.data_dir / "blobs"

    @property
    def samples_dir(self) -> Path:
        return self.data_dir / "samples"

    @property
    def tmp_dir(self) -> Path:
        return self.data_dir / "tmp"

    @property
    def max_upload_bytes(self) -> int:
        return self.max_upload_mb << 20


def _read_file(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError("bad_config", f"cannot read {path}: {err}") from err
    try:
        if path.suffix.lower() == ".toml":
            raw = tomllib.loads(text)
        else:
            raw = json.loads(text)
    except (ValueError, tomllib.TOMLDecodeError) as err:
        kind = path.suffix[1:] or "JSON"
        raise ConfigError("bad_config", f"{path} is not valid {kind}: {err}") from err
    if not isinstance(raw, dict):
        raise ConfigError("bad_config", f"{path}: the top level must be a table/object")
    return raw


def format_errors(err: ValidationError) -> str:
    """``key.path = value: message`` per problem, one a line."""
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e.get("loc", ())) or "(top level)"
        value = e.get("input")
        if e.get("type") == "missing":
            lines.append(f"{loc}: required setting is missing")
        else:
            lines.append(f"{loc} = {value!r}: {e.get('msg')}")
    return "\n".join(lines)


def load_config(path: str | Path | None = None, **overrides: Any) -> AppStoreConfig:
    """Read ``path`` (``.toml`` or JSON) and apply ``overrides`` (None ones skipped).

    A relative ``data_dir`` in a file is taken relative to the file's folder.
    """
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        raw = _read_file(path)
        dd = raw.get("data_dir")
        if isinstance(dd, str) and not Path(dd).is_absolute():
            raw["data_dir"] = str(path.parent / dd)
    raw.update({k: v for k, v in overrides.items() if v is not None})
    try:
        cfg = AppStoreConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError("bad_config", format_errors(err)) from err
    logger.debug("config: data_dir=%s mqtt=%s:%s prefix=%r", cfg.data_dir, cfg.mqtt_host,
                 cfg.mqtt_port, cfg.topic_prefix)
    return cfg
