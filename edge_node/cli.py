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

    ft = esub.add_parser("finetune", help="fine-tune an app on its labelled samples "
                         "(judged, shadowed, then promoted or refused with the reason)")
    ft.add_argument("app")
    ft.add_argument("--by", help="who asks (recorded in the lineage)")
    ft.add_argument("--layers", type=int, choices=(0, 1, 2),
                    help="1: the head alone; 2: the head and the hidden layer before it; "
                    "0 (default): both, the gate keeps the better")
    ft.add_argument("--l2", type=float)
    ft.add_argument("--max-iter", type=int)
    ft.add_argument("--wait", action="store_true", help="wait for the verdict")
    ft.add_argument("--url", default="http://127.0.0.1:8090")
    ft.set_defaults(func=cmd_finetune)

    rb = esub.add_parser("rollback", help="serve the app's package model again "
                         "(undo a promoted fine-tune)")
    rb.add_argument("app")
    rb.add_argument("--by")
    rb.add_argument("--url", default="http://127.0.0.1:8090")
    rb.set_defaults(func=cmd_rollback)

    runs = esub.add_parser("runs", help="fine-tune runs, their verdicts and metrics")
    runs.add_argument("--app")
    runs.add_argument("--json", action="store_true")
    runs.add_argument("--url", default="http://127.0.0.1:8090")
    runs.set_defaults(func=cmd_runs)

    from .enrol import register as register_enrol

    register_enrol(esub)


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


def _call(url: str, method: str = "GET", body: dict | None = None) -> tuple[int, dict]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as err:
        try:
            return err.code, json.load(err)
        except ValueError:
            return err.code, {"error": f"HTTP {err.code}"}


def _fail(cmd: str, body: dict) -> int:
    print(f"aidc edge {cmd}: {body.get('error')}: {json.dumps(body.get('detail'))}",
          file=sys.stderr)
    return 1


def _run_line(r: dict) -> str:
    m = r.get("metrics") or {}
    held = m.get("heldout") or {}
    fig = (f" held-out {held['base']:.3f} -> {held['candidate']:.3f} (n={held['n']})"
           if held.get("base") is not None else "")
    return (f"{r['run_id']}  {r['app']}  {r['state']:<11} base {r['base_version']}"
            f"{' -> ' + r['version'] if r.get('version') else ''}{fig}"
            f"{'  -- ' + r['reason'] if r.get('reason') else ''}")


def cmd_finetune(args: argparse.Namespace) -> int:
    import time

    config = {k: v for k, v in (("layers", args.layers), ("l2", args.l2),
                                ("max_iter", args.max_iter)) if v is not None}
    try:
        status, body = _call(f"{args.url}/api/v1/apps/{args.app}/finetune", "POST",
                             {"by": args.by, "config": config})
        if status != 202:
            return _fail("finetune", body)
        print(_run_line(body))
        while args.wait and body["state"] in ("training", "shadow"):
            time.sleep(1.0)
            status, body = _call(f"{args.url}/api/v1/finetune/{body['run_id']}")
        if args.wait:
            print(_run_line(body))
            return 0 if body["state"] == "promoted" else 3
    except (urllib.error.URLError, OSError) as err:
        print(f"aidc edge finetune: cannot reach {args.url}: {err}", file=sys.stderr)
        return 1
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    try:
        status, body = _call(f"{args.url}/api/v1/apps/{args.app}/rollback", "POST",
                             {"by": args.by})
    except (urllib.error.URLError, OSError) as err:
        print(f"aidc edge rollback: cannot reach {args.url}: {err}", file=sys.stderr)
        return 1
    if status != 200:
        return _fail("rollback", body)
    print(f"{args.app}: {body['rolled_back']} rolled back; the package's model serves")
    return 0


def cmd_runs(args: argparse.Namespace) -> int:
    q = f"?app={args.app}" if args.app else ""
    try:
        status, body = _call(f"{args.url}/api/v1/finetune{q}")
    except (urllib.error.URLError, OSError) as err:
        print(f"aidc edge runs: cannot reach {args.url}: {err}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(body, indent=2))
        return 0
    for r in body["runs"]:
        print(_run_line(r))
    for app, v in body.get("variants", {}).items():
        print(f"{app}: serving site variant {v['version']} (run {v['run_id']})")
    return 0
