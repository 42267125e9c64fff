"""``aidc edge ...``: run the edge agent, ask a running one for its status, doctor."""

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

    add_doctor(esub)

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
    from .health.config_guard import keep_last_good, load_guarded

    overrides = _overrides(args)
    try:  # a broken config file: the last good one, the broken one kept (docs/faults.md)
        cfg, note = load_guarded(args.config, **overrides)
    except EdgeError as err:
        print(f"aidc edge run: {err}", file=sys.stderr)
        return 2
    if note:
        logger.error("config %s: %s; %s", args.config, note["detail"], note["remedy"])
    agent = NodeAgent(cfg, config_path=args.config, config_overrides=overrides,
                      startup_faults=[note] if note else None)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    agent.start()
    try:
        keep_last_good(args.config)  # it started: this config is good
    except OSError as err:
        logger.warning("config %s: no last good copy kept: %s", args.config, err)
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


# -- doctor ----------------------------------------------------------------------------
#: where the systemd unit (installer/systemd/aidc-edge.service) keeps the config
DEFAULT_CONFIG = Path("/etc/aidc/node.json")


def add_doctor(sub: argparse._SubParsersAction) -> None:
    """``doctor`` under ``aidc edge`` and, the same, at the top: ``aidc doctor``."""
    dr = sub.add_parser("doctor", help="run every health check now and print a report "
                        "(exit 0: all pass, 1: not); asks the running agent, else checks "
                        "the node's files itself")
    dr.add_argument("--config", type=Path, default=DEFAULT_CONFIG,
                    help=f"the node's config file (default {DEFAULT_CONFIG})")
    dr.add_argument("--fix", action="store_true", help="apply each failing check's remedy")
    dr.add_argument("--json", action="store_true", help="the report as JSON")
    dr.add_argument("--offline", action="store_true",
                    help="do not ask the running agent; check files and the broker directly")
    dr.add_argument("--url", help="the agent's local API (default: from the config)")
    dr.set_defaults(func=cmd_doctor)

def _marks() -> tuple[str, str]:
    try:
        "✓✗".encode(sys.stdout.encoding or "ascii")
        return "✓", "✗"
    except (UnicodeEncodeError, LookupError):
        return "ok  ", "FAIL"


def _when(ts: float | None) -> str:
    import time

    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ts)) + "Z" if ts else "-"


def format_report(rep: dict) -> str:
    """The doctor's report, one line per check, then the fault journal."""
    good, bad = _marks()
    lines = [f"aidc doctor: {rep.get('node_id', '?')} ({rep.get('source', '?')}), "
             f"{_when(rep.get('ts'))}" + ("  [--fix]" if rep.get("fixed") else "")]
    width = max((len(c["name"]) for c in rep["checks"]), default=10)
    for c in rep["checks"]:
        fault = f"  [{c['fault']}]" if not c["ok"] and c.get("fault") else ""
        lines.append(f"  {good if c['ok'] else bad} {c['name']:<{width}}  {c['detail']}{fault}")
    faults = rep.get("faults") or {}
    kinds = faults.get("kinds") or {}
    lines.append("")
    if faults.get("error"):
        lines.append(f"fault journal: cannot be read: {faults['error']}")
    elif not kinds:
        lines.append("fault journal: no faults recorded")
    else:
        lines.append(f"fault journal: {faults.get('detected', 0)} detected, "
                     f"{faults.get('healed', 0)} healed, {faults.get('unhealed', 0)} unhealed")
        for kind, k in kinds.items():
            mtth = (f"{k['mean_time_to_heal_s']:.1f} s" if k.get("mean_time_to_heal_s")
                    is not None else "-")
            lines.append(f"  {kind:<20} detected {k['detected']:>3}  healed {k['healed']:>3}  "
                         f"unhealed {k['unhealed']:>3}  mean time to heal {mtth:>7}  "
                         f"last detected {_when(k.get('last_detected'))}  "
                         f"last healed {_when(k.get('last_healed'))}")
    for name, o in (faults.get("open") or {}).items():
        lines.append(f"  open now: {o['fault']} ({name}) since {_when(o['since'])}, "
                     f"{o['count']} probe(s): {o.get('last_why') or o['detail']}")
    lines.append("")
    lines.append("all checks pass" if rep["ok"] else
                 f"{sum(not c['ok'] for c in rep['checks'])} check(s) fail")
    return "\n".join(lines)


def _ask_agent(url: str, fix: bool) -> dict | None:
    """The running agent's own doctor (its live parts); None when it does not answer."""
    try:
        status, body = _call(f"{url}/api/doctor", "POST" if fix else "GET",
                             {} if fix else None)
    except (urllib.error.URLError, OSError):
        return None
    if status != 200 or "checks" not in body:
        return None
    return body


def offline_doctor(config: Path, fix: bool = False, agent_url: str | None = None) -> dict:
    """Every check on the node's files and the broker, without the agent: plain
    values (the data dir, node.db, the config file, the broker's address)."""
    import socket
    import sqlite3
    import time

    from .config import load_config
    from .health import FaultJournal, Finding, FunctionCheck, Monitor
    from .health.config_guard import ConfigCheck, last_good_path
    from .health.db_integrity import DbIntegrityCheck
    from .health.disk_space import DiskSpaceCheck
    from .selfcheck import outbox_flowing, report

    checks: list = [ConfigCheck(config)]
    try:
        cfg = load_config(config)
    except EdgeError:
        try:  # the checks below still run, on the last good config's values
            cfg = load_config(last_good_path(config))
        except EdgeError:
            cfg = None
    findings: list[Finding] = []
    journal = None
    if cfg is not None:
        d = cfg.data_dir
        db = d / "node.db"

        def broker() -> Finding:
            h, p = cfg.mqtt.host, cfg.mqtt.port
            try:
                socket.create_connection((h, p), timeout=3).close()
            except OSError as err:
                return Finding("broker_connected", False, f"{h}:{p} unreachable: {err}",
                               fault="broker_unreachable")
            return Finding("broker_connected", True, f"{h}:{p} accepts connections (TCP)")

        def agent() -> Finding:
            where = agent_url or "its local API"
            return Finding("agent_running", False, f"the agent does not answer at {where}",
                           fault="agent_down")

        def outbox() -> Finding:
            if not db.exists():
                return Finding("outbox", True, "no node.db yet")
            c = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
            try:
                n = c.execute("SELECT count(*) FROM cloud_sync_outbox "
                              "WHERE state = 'pending'").fetchone()[0]
            except sqlite3.Error as err:
                return Finding("outbox", False, f"cannot read the outbox: {err}",
                               fault="outbox_unreadable")
            finally:
                c.close()
            return outbox_flowing({}, n, cfg.outbox.max_rows)

        checks = [FunctionCheck("broker_connected", broker),
                  FunctionCheck("agent_running", agent),
                  DiskSpaceCheck(d), DbIntegrityCheck(db, backups=False),
                  FunctionCheck("outbox", outbox), *checks]
        try:
            journal = FaultJournal(db if db.exists() else None)
        except Exception:  # noqa: BLE001 - a damaged node.db: the report still comes
            journal = FaultJournal(None)
    else:  # nothing to run the other checks on
        journal = FaultJournal(None)
        checks.append(FunctionCheck("node", lambda: Finding(
            "node", False, "no config (neither the file nor its last good copy) to find "
            "the data dir and the broker by", fault="config_missing")))
    try:
        findings = Monitor(checks, journal, None).run_all(heal=fix)
        try:
            faults = journal.stats()
        except Exception as err:  # noqa: BLE001
            faults = {"error": str(err)}
    finally:
        journal.close()
    rep = report(findings, legacy=False)
    rep.update(node_id=cfg.node_id if cfg else "?", source="offline: the node's files",
               fixed=fix, faults=faults, ts=time.time())
    return rep


def cmd_doctor(args: argparse.Namespace) -> int:
    from .config import load_config
    from .health.config_guard import last_good_path

    url = args.url
    if url is None:
        for p in (args.config, last_good_path(args.config)):
            try:
                c = load_config(p)
            except EdgeError:
                continue
            if c.http.port:
                url = f"http://{c.http.host}:{c.http.port}"
            break
    rep = None if args.offline or not url else _ask_agent(url, args.fix)
    if rep is not None:
        rep["source"] = f"the running agent at {url}"
        try:
            rep["node_id"] = load_config(args.config).node_id
        except EdgeError:
            pass
    else:
        rep = offline_doctor(args.config, fix=args.fix, agent_url=url)
        if args.offline:  # asked not to look for the agent: not a failure of the node
            rep["checks"] = [c for c in rep["checks"] if c["name"] != "agent_running"]
            rep["ok"] = all(c["ok"] for c in rep["checks"])
    print(json.dumps(rep, indent=2, default=str) if args.json else format_report(rep))
    return 0 if rep["ok"] else 1
