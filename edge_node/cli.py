"""``aidc edge ...``: run the edge agent, ask a running one for its status."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path

from .errors import EdgeError

logger = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    edge = sub.add_parser("edge", help="the edge node (site box)")
    esub = edge.add_subparsers(dest="edge_cmd", required=True)

    run = esub.add_parser("run", help="run the edge agent in the foreground")
    run.add_argument("--config", type=Path, help="JSON or TOML node config")
    run.add_argument("--node-id")
    run.add_argument("--data-dir", type=Path)
    run.add_argument("--mqtt-host")
    run.add_argument("--mqtt-port", type=int)
    run.add_argument("--topic-prefix")
    run.add_argument("--http-host")
    run.add_argument("--http-port", type=int)
    run.add_argument("--trusted-key", type=Path, action="append",
                     help="publisher public key file (repeatable)")
    run.set_defaults(func=cmd_run)

    st = esub.add_parser("status", help="status of a running edge agent")
    st.add_argument("--url", default="http://127.0.0.1:8090")
    st.set_defaults(func=cmd_status)


def _overrides(args: argparse.Namespace) -> dict:
    mqtt = {k: v for k, v in {"host": args.mqtt_host, "port": args.mqtt_port,
                              "topic_prefix": args.topic_prefix}.items() if v is not None}
    http = {k: v for k, v in {"host": args.http_host, "port": args.http_port}.items()
            if v is not None}
    out: dict = {"node_id": args.node_id, "data_dir": args.data_dir}
    if mqtt:
        out["mqtt"] = mqtt
    if http:
        out["http"] = http
    if args.trusted_key:
        out["trusted_keys"] = [str(p) for p in args.trusted_key]
    return out


def cmd_run(args: argparse.Namespace) -> int:
    from .agent import NodeAgent
    from .config import load_config

    try:
        cfg = load_config(args.config, **_overrides(args))
    except EdgeError as err:
        print(f"aidc edge run: {err}", file=sys.stderr)
        return 2
    agent = NodeAgent(cfg)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    agent.start()
    try:
        stop.wait()
    finally:
        agent.stop()
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    try:
        with urllib.request.urlopen(f"{args.url}/api/v1/status", timeout=5) as r:
            print(json.dumps(json.load(r), indent=2))
    except (urllib.error.URLError, OSError) as err:
        print(f"aidc edge status: cannot reach {args.url}: {err}", file=sys.stderr)
        return 1
    return 0
