"""The AppStore's own config: strict (unknown keys are errors), one file.

Loaded from a JSON or TOML file plus overrides (CLI flags); an error names the
key path, the value and what is wrong with it::

    config error: mqtt_port = 'abc': Input should be a valid integer
"""

from __future__ import annotations

import json
import logging
import re
import tomllib
from pathlib import Path
from typing import Any

from pydantic import (BaseModel, ConfigDict, Field, ValidationError, ValidationInfo,
                      field_validator, model_validator)

from .errors import ConfigError

logger = logging.getLogger(__name__)


class EnrolmentConfig(BaseModel):
    """Node enrolment and the broker's password and ACL files (docs/security.md)."""

    model_config = ConfigDict(extra="forbid")

    #: Mosquitto's ``password_file`` and ``acl_file``, owned and rewritten by the
    #: AppStore; default data_dir/broker/passwd and data_dir/broker/acl
    password_file: Path | None = None
    acl_file: Path | None = None
    #: group the two files are given to (mode 0640), e.g. ``mosquitto`` when the
    #: broker runs as another user than the AppStore; None: the AppStore's own
    file_group: str | None = None
    #: the broker as enrolled nodes reach it (``mqtt://host:port``, or
    #: ``mqtts://host:port`` for TLS); default ``mqtt://<mqtt_host>:<mqtt_port>``
    #: (``mqtts://`` when ``mqtt_tls``)
    broker_url: str | None = Field(default=None, pattern=r"^mqtts?://[^/:]+(:\d+)?/?$")
    #: with ``mqtts://``: the CA certificate handed to nodes at enrolment; default
    #: ``mqtt_ca_file``, else data_dir/broker/tls/ca.pem (``aidc store broker-certs``)
    broker_ca_file: Path | None = None
    #: where to send SIGHUP after the files change: a pid, or the file Mosquitto
    #: writes its pid to (its ``pid_file`` option); neither: reload it yourself
    broker_pid: int | None = Field(default=None, ge=1)
    broker_pid_file: Path | None = None
    #: token lifetime when none is asked for, and the longest one allowed
    default_token_ttl_s: int = Field(default=3600, ge=1)
    max_token_ttl_s: int = Field(default=7 * 86400, ge=1)


class BrokerHooksConfig(BaseModel):
    """Auth hooks for a clustered broker (EMQX, VerneMQ): the broker asks the
    AppStore over HTTP who may connect, publish and subscribe, by the same rules
    as Mosquitto's files (appstore/broker_hooks.py, docs/fleet.md)."""

    model_config = ConfigDict(extra="forbid")

    #: the shared secret the broker sends with every call, in the
    #: ``X-Aidc-Broker-Secret`` header (or a ``secret`` query parameter where
    #: the broker cannot send a header of its own: VerneMQ's webhooks)
    secret: str = Field(min_length=16, max_length=256)


class AppStoreConfig(BaseModel):
    """Every setting of one AppStore instance."""

    model_config = ConfigDict(extra="forbid")

    #: everything the store keeps: appstore.db, blobs/, samples/, keys/
    data_dir: Path
    mqtt_host: str = "127.0.0.1"
    mqtt_port: int = Field(default=1883, ge=1, le=65535)
    mqtt_username: str | None = None
    mqtt_password: str | None = None
    #: TLS to the broker (docs/security.md, "TLS"): TLS 1.2 or later, the broker's
    #: certificate checked against mqtt_ca_file (default data_dir/broker/tls/ca.pem,
    #: the private CA of ``aidc store broker-certs``) and its name against
    #: mqtt_host; mqtt_cert_file/mqtt_key_file: a client certificate (mutual TLS)
    mqtt_tls: bool = False
    mqtt_ca_file: Path | None = None
    mqtt_cert_file: Path | None = None
    mqtt_key_file: Path | None = None
    mqtt_tls_check_hostname: bool = True
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
    #: node enrolment with per-node broker credentials and ACLs; None: off
    enrolment: EnrolmentConfig | None = None
    #: HTTP auth hooks for a clustered broker (needs enrolment: the users they
    #: check are the enrolled nodes and the AppStore's own); None: off
    broker_hooks: BrokerHooksConfig | None = None

    @model_validator(mode="after")
    def _hooks_need_enrolment(self) -> "AppStoreConfig":
        if self.broker_hooks is not None and self.enrolment is None:
            raise ValueError("broker_hooks needs enrolment: the hooks check enrolled nodes' "
                             "credentials and the AppStore's own mqtt_username/mqtt_password")
        return self
    #: operator authentication of the REST API (docs/security.md, "Operators"):
    #: "token" (default): every route but /health and /enrol needs an operator's
    #: Bearer token, and the first start writes an admin's to data_dir/admin.token;
    #: "off": no check at all, allowed only with http_host on loopback
    api_auth: str = Field(default="token", pattern=r"^(token|off)$")

    @field_validator("api_auth")
    @classmethod
    def _api_auth_safe(cls, v: str, info: ValidationInfo) -> str:
        from .auth import is_loopback

        host = info.data.get("http_host", "127.0.0.1")
        if v == "off" and not is_loopback(host):
            raise ValueError(f"with http_host = {host!r} the REST API would be open to the "
                             "network: keep api_auth = 'token', or listen on 127.0.0.1")
        return v

    @property
    def admin_token_path(self) -> Path:
        """Where the first start writes the bootstrap admin's token (mode 0600)."""
        return self.data_dir / "admin.token"

    @model_validator(mode="after")
    def _defaults(self) -> "AppStoreConfig":
        if self.signing_key is None:
            self.signing_key = self.data_dir / "keys" / "publisher.pem"
        if self.mqtt_tls and self.mqtt_ca_file is None:
            self.mqtt_ca_file = self.data_dir / "broker" / "tls" / "ca.pem"
        e = self.enrolment
        if e is not None:
            if not (self.mqtt_username and self.mqtt_password):
                raise ValueError("enrolment needs mqtt_username and mqtt_password: the "
                                 "AppStore's own broker user, written into the password file")
            if not re.match(r"^[A-Za-z0-9_.-]{1,64}$", self.mqtt_username):
                raise ValueError(f"mqtt_username {self.mqtt_username!r}: 1-64 of letters, "
                                 "digits, '_', '-', '.'")
            e.password_file = e.password_file or self.data_dir / "broker" / "passwd"
            e.acl_file = e.acl_file or self.data_dir / "broker" / "acl"
            scheme = "mqtts" if self.mqtt_tls else "mqtt"
            e.broker_url = e.broker_url or f"{scheme}://{self.mqtt_host}:{self.mqtt_port}"
            e.broker_ca_file = e.broker_ca_file or self.mqtt_ca_file \
                or self.data_dir / "broker" / "tls" / "ca.pem"
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
