"""``aidc edge enrol``: spend an enrolment token on this node's broker credentials.

Asks the AppStore (``POST /api/v1/enrol``) and writes the node id, the broker
and the credentials into the node's JSON config, merged with what is there,
checked as a whole and written atomically with mode 0600 (the file now holds a
password).

When the broker speaks TLS the answer carries ``mqtt.tls = true`` and the CA
certificate (``mqtt.ca_pem``) the node must trust: it is written next to the
config as ``broker-ca.pem`` (0644) and the config gets ``mqtt.tls`` and
``mqtt.ca_file``, so the node's next start connects over TLS. An answer that
says ``tls = false`` turns the node's TLS off; an answer without ``tls`` (an
AppStore from before TLS) leaves the node's TLS settings as they are.
"""

from __future__ import annotations

import argparse
import json
import os
import ssl
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from cloud_sync.atomic import write_atomic

from .config import NodeConfig, _fmt, _merge
from .errors import ConfigError


class EnrolError(Exception):
    """The AppStore refused (``reason``, ``detail``) or could not be reached."""

    def __init__(self, reason: str, detail: Any = "") -> None:
        self.reason, self.detail = reason, detail
        super().__init__(f"{reason}: {detail}")


def request_enrolment(store_url: str, token: str, node_id: str, site: str | None = None,
                      group: str | None = None, timeout: float = 30.0) -> dict[str, Any]:
    body = {"token": token, "node_id": node_id, "site": site, "group": group}
    req = urllib.request.Request(f"{store_url.rstrip('/')}/api/v1/enrol",
                                 data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.load(r)
    except urllib.error.HTTPError as err:
        try:
            info = json.load(err)
        except ValueError:
            info = {}
        raise EnrolError(info.get("error", f"http_{err.code}"), info.get("detail", "")) from err
    except (urllib.error.URLError, OSError) as err:
        raise EnrolError("unreachable", f"cannot reach the AppStore at {store_url}: "
                         f"{getattr(err, 'reason', err)}") from err


def _read(path: Path) -> dict[str, Any]:
    if path.suffix == ".toml":
        raise ConfigError(f"{path}: enrol writes JSON configs; give --config FILE.json "
                          "(copy the TOML settings into it)")
    if not path.exists():
        return {}
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(f"cannot read config {path}: {err}") from err
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be an object")
    return raw


#: the broker's CA, as enrolment writes it next to the node's config
CA_FILE_NAME = "broker-ca.pem"


def ca_path(config: Path) -> Path:
    """Where enrolment puts the broker's CA certificate for the config ``config``."""
    return config.resolve().parent / CA_FILE_NAME


def merged_config(path: Path, enrolled: dict[str, Any],
                  data_dir: Path | None = None) -> dict[str, Any]:
    """The config at ``path`` with the enrolment merged in, validated."""
    raw = _read(path)
    m = enrolled["mqtt"]
    mqtt: dict[str, Any] = {
        "host": m["host"], "port": m["port"], "topic_prefix": m["topic_prefix"],
        "username": m["username"], "password": m["password"]}
    tls = m.get("tls")  # None: an AppStore from before TLS, leave the node's settings
    if tls:
        mqtt["tls"] = True
        if m.get("ca_pem"):  # else the system's trust store (a public certificate)
            mqtt["ca_file"] = str(ca_path(path))
    elif tls is not None:
        mqtt["tls"] = False
    over: dict[str, Any] = {"node_id": enrolled["node_id"], "mqtt": mqtt}
    if data_dir is not None:
        over["data_dir"] = str(data_dir)
    raw = _merge(raw, over)
    if tls is not None and not tls:  # plain MQTT: no certificate files either
        for k in ("ca_file", "cert_file", "key_file"):
            raw["mqtt"].pop(k, None)
    try:
        NodeConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(f"the enrolled config would be invalid: {_fmt(err)}") from err
    return raw


def write_config(path: Path, enrolled: dict[str, Any], data_dir: Path | None = None) -> None:
    """Merge the enrolment into the config at ``path``; validate; write it 0600
    (and the broker's CA beside it, 0644, when the answer has one)."""
    raw = merged_config(path, enrolled, data_dir)
    m = enrolled["mqtt"]
    if m.get("tls") and m.get("ca_pem"):
        pem = m["ca_pem"]
        try:
            if not isinstance(pem, str):
                raise ValueError("not a string")
            ssl.create_default_context(cadata=pem)
        except (ssl.SSLError, ValueError) as err:
            raise ConfigError(f"the AppStore sent a broker CA certificate that cannot be "
                              f"used ({err}); nothing written") from err
        write_atomic(ca_path(path), pem, mode=0o644)
    write_atomic(path, json.dumps(raw, indent=2) + "\n", mode=0o600)


def _check_writable(path: Path) -> None:
    """The config's folder (or the first one of its parents that exists) can be
    written: checked before the token is spent."""
    d = path.resolve().parent
    while not d.exists() and d != d.parent:
        d = d.parent
    if not os.access(d, os.W_OK | os.X_OK):
        raise ConfigError(f"cannot write into {d} (the config and the broker's CA go there)")


def register(esub: argparse._SubParsersAction) -> None:
    p = esub.add_parser("enrol", help="enrol this node with a one-time token: write its "
                        "broker credentials into its config (mode 0600)")
    p.add_argument("--store", required=True, help="the AppStore's URL, e.g. http://cloud:8080")
    p.add_argument("--token", required=True, help="the token from `aidc store token create`")
    p.add_argument("--config", type=Path, required=True, help="the node's JSON config "
                   "(created when missing, else updated)")
    p.add_argument("--node-id", help="default: node_id in the config")
    p.add_argument("--data-dir", type=Path, help="set data_dir (needed for a new config)")
    p.add_argument("--site")
    p.add_argument("--group")
    p.set_defaults(func=cmd_enrol)


def cmd_enrol(args: argparse.Namespace) -> int:
    try:
        node_id = args.node_id or _read(args.config).get("node_id")
        if not node_id:
            raise ConfigError("say which node: --node-id ID (the config has no node_id)")
        if not args.data_dir and not _read(args.config).get("data_dir"):
            raise ConfigError("a new config needs --data-dir DIR")
        # check the config would be valid before the token is spent
        merged_config(args.config, {"node_id": node_id, "mqtt": {
            "host": "x", "port": 1883, "topic_prefix": "", "username": "x", "password": "x"}},
            args.data_dir)
        _check_writable(args.config)
        enrolled = request_enrolment(args.store, args.token, node_id, args.site, args.group)
        write_config(args.config, enrolled, args.data_dir)
    except ConfigError as err:
        print(f"aidc edge enrol: {err}", file=sys.stderr)
        return 2
    except EnrolError as err:
        print(f"aidc edge enrol: refused: {err.reason}: {err.detail}", file=sys.stderr)
        return 3 if err.reason == "unreachable" else 1
    m = enrolled["mqtt"]
    tls = (f"; TLS, trusting the broker CA in {ca_path(args.config)}"
           if m.get("tls") and m.get("ca_pem") else "; TLS" if m.get("tls") else "")
    print(f"node {node_id} enrolled: broker {m['url']} as user {m['username']}{tls}; "
          f"credentials written to {args.config} (mode 0600)"
          + ("" if enrolled.get("broker_reloaded") else
             "\nwarning: the AppStore could not reload the broker; the node may be refused "
             "until it is reloaded"))
    return 0
