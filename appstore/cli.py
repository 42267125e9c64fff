"""``aidc store ...``: run, publish to and operate the AppStore.

:func:`register` adds the ``store`` command to the one ``aidc`` parser; every
leaf sets ``func(args) -> int``. Errors become a message on stderr and an exit
code here, in one place (:func:`_guard`): 1 the operation failed, 2 bad config
or arguments, 3 the AppStore cannot be reached.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .client import DEFAULT_API, ApiClient
from .config import AppStoreConfig, load_config
from .errors import AppStoreError, ConfigError

logger = logging.getLogger(__name__)

Func = Callable[[argparse.Namespace], int]


def _guard(fn: Func) -> Func:
    @functools.wraps(fn)
    def run(args: argparse.Namespace) -> int:
        try:
            return fn(args)
        except AppStoreError as err:
            detail = f"\n{err.detail}" if isinstance(err.detail, str) and "\n" in err.detail \
                else (f": {err.detail}" if err.detail else "")
            print(f"error: {err.reason}{detail}", file=sys.stderr)
            return err.exit_code
        except KeyboardInterrupt:
            return 130
    return run


def _out(args: argparse.Namespace, data: Any, lines: list[str]) -> None:
    if getattr(args, "json", False):
        print(json.dumps(data, indent=2))
    else:
        print("\n".join(lines) if lines else "(none)")


def _config(args: argparse.Namespace) -> AppStoreConfig:
    return load_config(
        getattr(args, "config", None),
        data_dir=getattr(args, "data_dir", None),
        mqtt_host=getattr(args, "mqtt_host", None),
        mqtt_port=getattr(args, "mqtt_port", None),
        http_host=getattr(args, "http_host", None),
        http_port=getattr(args, "http_port", None),
        topic_prefix=getattr(args, "topic_prefix", None),
    )


#: read when no other token source is given and the file is readable (the data
#: dir of a packaged AppStore, as in docs/security.md)
DEFAULT_TOKEN_FILE = Path("/var/lib/aidc-store/admin.token")
TOKEN_ENV = "AIDC_STORE_TOKEN"


def _read_token(path: Path, what: str) -> str:
    try:
        token = path.read_text(encoding="utf-8").strip()
    except OSError as err:
        raise ConfigError("no_token", f"cannot read the API token ({what}): {err}") from err
    if not token:
        raise ConfigError("no_token", f"the API token file {path} is empty ({what})")
    return token


def _token(args: argparse.Namespace) -> tuple[str | None, str | None]:
    """The API token and where it came from, first found: ``--api-token-file``,
    env ``AIDC_STORE_TOKEN``, ``<data_dir>/admin.token`` of ``--data-dir`` /
    ``--config``, then :data:`DEFAULT_TOKEN_FILE` when it is readable."""
    if getattr(args, "api_token_file", None):
        path = Path(args.api_token_file)
        return _read_token(path, f"--api-token-file {path}"), f"--api-token-file {path}"
    if os.environ.get(TOKEN_ENV, "").strip():
        return os.environ[TOKEN_ENV].strip(), TOKEN_ENV
    if getattr(args, "config", None) or getattr(args, "data_dir", None):
        path = _config(args).admin_token_path
        if path.exists():
            return _read_token(path, str(path)), str(path)
        return None, None
    if os.access(DEFAULT_TOKEN_FILE, os.R_OK):
        return _read_token(DEFAULT_TOKEN_FILE, str(DEFAULT_TOKEN_FILE)), str(DEFAULT_TOKEN_FILE)
    return None, None


def _api_url(args: argparse.Namespace) -> str:
    """``--api``, else the http_host/http_port of ``--config``, else the default."""
    if getattr(args, "api", None):
        return str(args.api)
    if getattr(args, "config", None):
        cfg = _config(args)
        host = "127.0.0.1" if cfg.http_host in ("0.0.0.0", "::", "") else cfg.http_host
        if cfg.http_port:
            return f"http://{'[' + host + ']' if ':' in host else host}:{cfg.http_port}"
    return DEFAULT_API


def _api(args: argparse.Namespace) -> ApiClient:
    token, source = _token(args)
    return ApiClient(_api_url(args), token=token, token_source=source)


# -- local commands ----------------------------------------------------------------
def cmd_serve(args: argparse.Namespace) -> int:
    from .service import AppStoreService

    cfg = _config(args)
    if args.no_shared:
        cfg.shared_group = None
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    svc = AppStoreService(cfg).start()
    if svc.bootstrap_token:
        print(f"first start: made the operator 'admin'; its API token is in "
              f"{cfg.admin_token_path} (mode 0600)", flush=True)
    print(f"AppStore serving {svc.url}/api/v1 (Ctrl-C to stop)", flush=True)
    try:
        while not stop.wait(1.0):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        svc.stop()
    return 0


def _key_path(args: argparse.Namespace) -> Path:
    if getattr(args, "key", None):
        return Path(args.key)
    if getattr(args, "config", None) or getattr(args, "data_dir", None):
        return _config(args).signing_key_path
    raise ConfigError("no_key", "say which key: --key FILE, --data-dir DIR or --config FILE")


def cmd_keygen(args: argparse.Namespace) -> int:
    from .signing import SigningKey

    path = _key_path(args)
    if path.exists() and not args.force:
        key = SigningKey.load(path)
        print(f"key {key.key_id} already at {path} (--force makes a new one)")
        return 0
    key = SigningKey.generate()
    pub = key.save(path)
    print(f"key {key.key_id}\nprivate {path}\npublic  {pub}  (give this to nodes/other stores)")
    return 0


def cmd_sample_digits(args: argparse.Namespace) -> int:
    from .samples.digits import build_digits_sample

    out = build_digits_sample(Path(args.out), version=args.version)
    print(f"digits sample in {out}: model.onnx manifest.json labels.txt heldout.npz")
    return 0


def cmd_publish(args: argparse.Namespace) -> int:
    from .publish import build_package, load_manifest_file
    from .signing import SigningKey

    if not (args.api or args.config or args.data_dir or args.out):
        raise ConfigError("nothing_to_do", "give --api URL or --data-dir DIR to publish, "
                          "or --out FILE to only build the package")
    key = SigningKey.load(args.key) if args.key else SigningKey.load_or_create(_key_path(args))
    manifest = load_manifest_file(args.manifest)
    with tempfile.TemporaryDirectory(prefix="aidc-publish-") as tmp:
        pkg = Path(tmp) / "package.zip"
        sha, size = build_package(args.model, manifest, args.labels, key, pkg,
                                  extra_files=args.extra)
        if args.out:
            shutil.copyfile(pkg, args.out)
            print(f"built {args.out} sha256 {sha} ({size} bytes, key {key.key_id})")
        if args.api:
            info = _api(args).upload(pkg)
        elif args.config or args.data_dir:
            info = _publish_local(_config(args), pkg)
        else:
            return 0
    state = "published" if info.get("created") else "already published"
    print(f"{state} {info['name']} {info['version']} sha256 {info['sha256']} "
          f"({info['size']} bytes)")
    return 0


def _publish_local(cfg: AppStoreConfig, pkg: Path) -> dict[str, Any]:
    """Store the package straight into the data dir (no server needed)."""
    from .blobstore import ContentStore
    from .catalog import Catalog
    from .db import Store
    from .signing import SigningKey, trusted_keys

    own = SigningKey.load(cfg.signing_key_path) if cfg.signing_key_path.exists() else None
    store = Store(cfg.db_path)
    try:
        catalog = Catalog(store, ContentStore(cfg.blobs_dir),
                          lambda: trusted_keys(own, cfg.trusted_dir), cfg.max_upload_bytes)
        version, created = catalog.add_package_file(pkg)
    finally:
        store.close()
    return {**version, "created": created}


# -- REST commands -----------------------------------------------------------------
def cmd_apps(args: argparse.Namespace) -> int:
    apps = _api(args).get("/apps")["apps"]
    _out(args, apps, [f"{a['name']:<24} {a['version']:<12} {a['task']:<15} "
                      f"{a['sha256'][:12]}  versions: {', '.join(a['versions'])}" for a in apps])
    return 0


def cmd_nodes(args: argparse.Namespace) -> int:
    nodes = _api(args).get("/nodes")["nodes"]
    lines = []
    for n in nodes:
        apps = ", ".join(f"{a['name']} {a['version']} {a['status']}"
                         for a in (n["reported"] or {}).get("apps", []))
        lines.append(f"{n['node_id']:<24} {'online' if n['online'] else 'offline':<8} "
                     f"rev {n['reported_revision']}/{n['desired_revision']}  {apps}")
    _out(args, nodes, lines)
    return 0


def cmd_assign(args: argparse.Namespace) -> int:
    resources = {k: v for k, v in (("card_fraction", args.fraction),
                                   ("memory_mb", args.memory_mb), ("card", args.card))
                 if v is not None}
    ds = _api(args).assign(args.node, args.app, args.version,
                                    resources or None, args.upload)["desired"]
    print(f"node {args.node}: desired revision {ds['revision']}: "
          + ", ".join(f"{a['name']} {a['version']}" for a in ds["apps"]))
    return 0


def cmd_unassign(args: argparse.Namespace) -> int:
    ds = _api(args).unassign(args.node, args.app)["desired"]
    print(f"node {args.node}: desired revision {ds['revision']}: "
          + (", ".join(f"{a['name']} {a['version']}" for a in ds["apps"]) or "no apps"))
    return 0


_WINDOW_KEYS = {"card": "card", "days": "days", "start": "start", "end": "end",
                "fraction": "training_fraction", "yield": "yield_to_inference"}


def _window(text: str) -> dict[str, Any]:
    """``card=cpu,days=sat,sun,start=20:00,end=06:00,fraction=1[,yield=no]`` -> a
    window dict (validated by the AppStore). A bare item continues the previous
    value, so ``days=sat,sun`` keeps both days."""
    out: dict[str, Any] = {}
    last = None
    for part in filter(None, (p.strip() for p in text.split(","))):
        k, sep, v = part.partition("=")
        if not sep and last == "days":
            out["days"] += "," + part
            continue
        if not sep or k.strip() not in _WINDOW_KEYS:
            raise argparse.ArgumentTypeError(
                f"bad window item {part!r}: use " + ", ".join(f"{k}=..." for k in _WINDOW_KEYS))
        last = _WINDOW_KEYS[k.strip()]
        out[last] = v.strip()
    if "yield_to_inference" in out:
        out["yield_to_inference"] = out["yield_to_inference"].lower() in ("1", "yes", "true", "on")
    return out


def cmd_training(args: argparse.Namespace) -> int:
    api = _api(args)
    if args.clear:
        ds = api.set_training(args.node, None)["desired"]
    elif args.file or args.window:
        body: dict[str, Any] = json.loads(Path(args.file).read_text()) if args.file else {}
        if args.window:
            body["windows"] = args.window
        if args.timezone is not None:
            body["timezone"] = args.timezone or None
        ds = api.set_training(args.node, body)["desired"]
    else:  # show what is wanted and what the node runs
        node = api.get(f"/nodes/{args.node}")
        wanted = node["desired"].get("training")
        in_force = (node.get("reported") or {}).get("training")
        _out(args, {"desired": wanted, "reported": in_force}, [
            f"desired: {_fmt_training(wanted) if wanted else 'the node config'}",
            f"in force on the node: {_fmt_training(in_force) if in_force else 'unknown'}"])
        return 0
    t = ds.get("training")
    print(f"node {args.node}: desired revision {ds['revision']}: training windows "
          + (_fmt_training(t) if t else "from the node's config"))
    return 0


def _fmt_training(t: dict[str, Any]) -> str:
    ws = "; ".join(f"{w['card']} {w['days']} {w['start']}-{w['end']} x{w['training_fraction']:g}"
                   + ("" if w.get("yield_to_inference", True) else " reserved")
                   for w in t.get("windows", [])) or "none (training only when idle)"
    src = f" [{t['source']}]" if t.get("source") else ""
    return f"{ws} (tz {t.get('timezone') or 'node local'}){src}"


def cmd_dataset(args: argparse.Namespace) -> int:
    ds = _api(args).get(f"/apps/{args.app}/dataset")
    lines = [f"{ds['app']}: {ds['items']} items ({ds['heldout']} held out) from "
             f"{ds['samples']} samples; {ds['duplicates']} duplicates, {ds['conflicts']} "
             f"conflicting labels, {ds['unlabelled']} unlabelled, {ds['metadata_only']} "
             "without input (metadata-only sites), "
             f"{ds.get('features_only', 0)} with features instead of input"]
    lines += [f"  features by model {sha[:12]} ({', '.join(m['versions'])}): {m['items']} items"
              for sha, m in sorted((ds.get("features_by_model") or {}).items())]
    lines += [f"  {node}: " + ", ".join(f"{k} {v}" for k, v in sorted(c.items()))
              for node, c in sorted(ds["sites"].items())]
    lines.append("  labels: " + ", ".join(f"{k}: {v}" for k, v in sorted(ds["labels"].items())))
    _out(args, ds, lines)
    return 0


def _fmt_retrain(r: dict[str, Any]) -> str:
    m = r.get("metrics") or {}
    held = m.get("heldout") or {}
    fig = (f"; held-out {held['base']:.3f} -> {held['candidate']:.3f} (n={held['n']})"
           if held.get("base") is not None else "")
    return (f"{r['retrain_id']} {r['app']} {r['base_version']} -> {r['version']}: {r['state']}"
            f"{fig}{' -- ' + r['reason'] if r.get('reason') else ''}")


def cmd_retrain(args: argparse.Namespace) -> int:
    import time

    api = _api(args)
    if args.base is None:  # list
        rows = api.get("/retrains", app=args.app)["retrains"]
        _out(args, rows, [_fmt_retrain(r) for r in rows])
        return 0
    if not args.version:
        raise ConfigError("bad_retrain", "give --version, the version to publish")
    body = json.dumps({"base_version": args.base, "version": args.version,
                       "assign": args.assign, "by": args.by}).encode()
    r = api.request("POST", f"/apps/{args.app}/retrain", body)
    print(_fmt_retrain(r))
    while args.wait and r["state"] == "running":
        time.sleep(1.0)
        r = api.get(f"/retrains/{r['retrain_id']}")
    if args.wait:
        print(_fmt_retrain(r))
        return 0 if r["state"] == "published" else 3
    return 0


def _fmt_rollout(r: dict[str, Any]) -> str:
    waves = " ".join(f"{w['nodes']}" + (f"[{','.join(f'{k}:{v}' for k, v in w['states'].items())}]"
                                        if w["states"] else "") for w in r["waves"])
    return (f"{r['rollout_id']} {r['app']} {r['version']}: {r['state']} (wave "
            f"{r['wave'] + 1}/{len(r['waves'])}, nodes per wave {waves})"
            f"{' -- ' + r['reason'] if r.get('reason') else ''}")


def cmd_rollout(args: argparse.Namespace) -> int:
    import time

    api = _api(args)
    if args.rollout_cmd == "list":
        rows = api.get("/rollouts", app=args.app)["rollouts"]
        _out(args, rows, [_fmt_rollout(r) for r in rows])
        return 0
    if args.rollout_cmd == "start":
        target = _target(args)
        waves: dict[str, Any] = {"canary": args.canary}
        if args.wave_size:
            waves["wave_size"] = args.wave_size
        elif args.steps:
            waves["steps"] = [float(x) for x in args.steps.split(",")]
        gate = {k: v for k, v in (("bake_s", args.bake), ("ready_timeout_s", args.ready_timeout),
                                  ("max_error_rate", args.max_error_rate),
                                  ("max_p95_ms", args.max_p95_ms),
                                  ("min_accuracy", args.min_accuracy)) if v is not None}
        body = {"app": args.app, "version": args.version, "target": target, "waves": waves,
                "gate": gate, "by": args.by, "channel": args.channel}
        r = api.request("POST", "/rollouts", json.dumps(body).encode())
    elif args.rollout_cmd == "status":
        r = api.get(f"/rollouts/{args.rollout_id}")
    else:  # pause, resume, abort, rollback
        body = {"by": args.by}
        if args.rollout_cmd == "abort":
            body["rollback"] = args.rollback
        r = api.request("POST", f"/rollouts/{args.rollout_id}/{args.rollout_cmd}",
                        json.dumps(body).encode())
    last = None
    while True:
        line = _fmt_rollout(r)
        if line != last:
            if getattr(args, "json", False) and not getattr(args, "wait", False):
                print(json.dumps(r, indent=2))
            else:
                print(line)
            last = line
        if not getattr(args, "wait", False) or r["state"] in ("succeeded", "failed", "aborted"):
            break
        time.sleep(1.0)
        r = api.get(f"/rollouts/{r['rollout_id']}", nodes="0")
    if getattr(args, "wait", False):
        return 0 if r["state"] == "succeeded" else 3
    return 0


def _target(args: argparse.Namespace) -> dict[str, Any]:
    target: dict[str, Any] = {}
    if args.node:
        target["nodes"] = args.node
    for key in ("group", "site"):
        if getattr(args, key):
            target[key] = getattr(args, key)
    if args.tag:
        target["tags"] = args.tag
    if args.all:
        target["all"] = True
    return target


def cmd_channel(args: argparse.Namespace) -> int:
    api = _api(args)
    if args.version:
        api.request("PUT", f"/apps/{args.app}/channels/{args.channel}",
                    json.dumps({"version": args.version, "by": args.by}).encode())
    rows = api.get(f"/apps/{args.app}/channels")["channels"]
    _out(args, rows, [f"{r['app']}@{r['channel']} -> {r['version']} (by "
                      f"{r['updated_by'] or '?'})" for r in rows])
    return 0


def cmd_subscribe(args: argparse.Namespace) -> int:
    body = {"app": args.app, "channel": args.channel, "target": _target(args), "by": args.by}
    r = _api(args).request("POST", "/subscriptions", json.dumps(body).encode())
    print(_fmt_subscription(r))
    return 0


def _fmt_subscription(r: dict[str, Any]) -> str:
    return (f"#{r['id']} {r['app']}@{r['channel']} ({r['version']}) -> "
            f"{json.dumps(r['target'])}: {r['nodes']} nodes, {r['running']} run it, "
            f"{r['on_channel_version']} on {r['version']}")


def cmd_subscriptions(args: argparse.Namespace) -> int:
    api = _api(args)
    if args.delete is not None:
        api.request("DELETE", f"/subscriptions/{args.delete}")
    rows = api.get("/subscriptions", app=args.app)["subscriptions"]
    _out(args, rows, [_fmt_subscription(r) for r in rows])
    return 0


def cmd_labels(args: argparse.Namespace) -> int:
    body = {"site": args.site, "group": args.group, "tags": args.tag}
    r = _api(args).request("PUT", f"/nodes/{args.node}/labels",
                                    json.dumps(body).encode())
    print(f"{r['node_id']}: site={r.get('site') or '-'} group={r.get('group') or '-'} "
          f"tags={','.join(r.get('tags') or []) or '-'}")
    return 0


def cmd_feedback(args: argparse.Namespace) -> int:
    rows = _api(args).get("/feedback", app=args.app, node=args.node,
                                   version=args.version, limit=args.limit)["feedback"]
    _out(args, rows, [f"{r['msg_id'][:12]} {r['node_id']:<16} {r['app']} {r['version']} "
                      f"pred={r['prediction']['label']}@{r['prediction']['score']:.2f} "
                      f"label={r['label'] or '-'} {r['reason']}" for r in rows])
    return 0


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _duration(text: str) -> int:
    """``90``, ``45s``, ``30m``, ``1h``, ``7d`` -> seconds."""
    t = text.strip().lower()
    try:
        n = float(t[:-1]) * _UNITS[t[-1]] if t and t[-1] in _UNITS else float(t)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"bad duration {text!r}: e.g. 90, 45s, 30m, 1h, 7d")
    return int(n)


def cmd_token_create(args: argparse.Namespace) -> int:
    body = json.dumps({"ttl_s": args.ttl, "by": args.by, "note": args.note}).encode()
    t = _api(args).request("POST", "/enrolment/tokens", body)
    _out(args, t, [t["token"], f"(token {t['token_id']}, one node, once, until {t['expires']}; "
                   "it is not shown again)"])
    return 0


def cmd_token_list(args: argparse.Namespace) -> int:
    rows = _api(args).get("/enrolment/tokens")["tokens"]
    _out(args, rows, [f"{r['token_id']}  {r['state']:<7}  by {r['created_by'] or '-'}"
                      + (f"  used by {r['used_by']}" if r["used_by"] else "")
                      + (f"  {r['note']}" if r["note"] else "") for r in rows])
    return 0


def cmd_revoke(args: argparse.Namespace) -> int:
    from .client import _q

    body = json.dumps({"by": args.by}).encode()
    r = _api(args).request("POST", f"/nodes/{_q(args.node)}/revoke", body)
    state = "was already revoked" if r["already"] else "revoked"
    print(f"node {args.node} {state}; broker "
          + ("reloaded" if r["broker_reloaded"] else "NOT reloaded: reload it yourself"))
    return 0


def cmd_broker_files(args: argparse.Namespace) -> int:
    from .db import Store
    from .enrolment import Enrolment

    cfg = _config(args)
    if cfg.enrolment is None:
        raise ConfigError("enrolment_off", "the config has no 'enrolment' section")
    store = Store(cfg.db_path)
    try:
        reloaded = Enrolment(cfg, store).sync()
    finally:
        store.close()
    print(f"wrote {cfg.enrolment.password_file} and {cfg.enrolment.acl_file}"
          + ("; broker reloaded" if reloaded else ""))
    return 0


def cmd_broker_certs(args: argparse.Namespace) -> int:
    from urllib.parse import urlsplit

    from . import broker_tls

    cfg = _config(args)
    names = list(args.host or [])
    e = cfg.enrolment
    node_host = urlsplit(e.broker_url).hostname if e and e.broker_url else None
    if not names:  # the names nodes and the AppStore itself connect by
        names = list(dict.fromkeys(n for n in (node_host, cfg.mqtt_host) if n))
    group = args.group or (e.file_group if e else None)
    d = broker_tls.ensure_broker_certs(broker_tls.tls_dir(cfg), names, group=group)
    for host, who in ((node_host, "the host of enrolment.broker_url"),
                      (cfg.mqtt_host if cfg.mqtt_tls else None, "mqtt_host")):
        if host and host.lower().rstrip(".") not in d.names:
            d.warnings.append(f"{who} {host!r} is not in the certificate: clients "
                              f"connecting by it will fail the hostname check (add --host "
                              f"{host})")
    for w in d.warnings:
        print(f"warning: {w}", file=sys.stderr)
    clients = [broker_tls.issue_client_cert(d, name) for name in args.client or []]
    server = d.server + (f": {d.reason}" if d.server == "renewed" else "")
    print(f"CA      {d.ca_cert} ({'created' if d.ca_created else 'kept'}; nodes trust it)\n"
          f"server  {d.server_cert} for {', '.join(d.names)} ({server})\n\n"
          f"# Mosquitto (e.g. /etc/mosquitto/conf.d/aidc.conf), TLS 1.2 or later:\n"
          + broker_tls.listener_lines(d, args.port)
          + f"\n# the AppStore's config: mqtt_tls = true, mqtt_port = {args.port}; enrolled "
          f"nodes get {d.ca_cert.name}\n# when enrolment.broker_url is "
          f"mqtts://{d.names[0]}:{args.port}"
          + ("" if d.server == "kept" else "\n# reload the broker to use the new "
             "certificate (systemctl reload mosquitto)"))
    for cert, key in clients:
        print(f"client  {cert} and {key} (mqtt cert_file / key_file; add "
              "`require_certificate true` to the listener to ask every client for one)")
    return 0


def _arg(text: str) -> tuple[list[str], Any]:
    """``key=value`` (``a.b=value`` nests) -> (path, value); the value is read as
    JSON when it is JSON (``0.9``, ``true``, ``null``), else kept as a string."""
    k, sep, v = text.partition("=")
    if not sep or not k.strip():
        raise argparse.ArgumentTypeError(f"bad --arg {text!r}: use key=value (a.b=value nests)")
    try:
        value: Any = json.loads(v)
    except ValueError:
        value = v
    return k.strip().split("."), value


def _fmt_command(c: dict[str, Any]) -> str:
    line = f"{c['command_id']} {c['node_id']} {c['op']}: {c['state']}"
    if c.get("error"):
        line += f" -- {c['error']}"
    res = c.get("result") or {}
    if c["op"] in ("selfcheck", "doctor") and res.get("checks"):
        line += " (" + ", ".join(f"{x['name']} {'ok' if x['ok'] else 'FAILED'}"
                                 for x in res["checks"]) + ")"
    elif c["op"] == "restart_app" and res.get("new_pid"):
        line += f" (pid {res.get('old_pid')} -> {res['new_pid']})"
    if c.get("bundle_url"):
        line += f" bundle {c['bundle_url']}"
    return line


def cmd_command(args: argparse.Namespace) -> int:
    import time

    from .client import _q

    body_args: dict[str, Any] = {}
    for path, value in args.arg:
        d = body_args
        for part in path[:-1]:
            d = d.setdefault(part, {})
        d[path[-1]] = value
    body: dict[str, Any] = {"op": args.op, "args": body_args, "ttl_s": args.ttl, "by": args.by}
    if args.id:
        body["command_id"] = args.id
    api = _api(args)
    c = api.request("POST", f"/nodes/{_q(args.node)}/commands", json.dumps(body).encode())
    while args.wait and c["state"] in ("queued", "sent"):
        time.sleep(0.5)
        c = api.get(f"/commands/{_q(c['command_id'])}")
    if args.bundle and c.get("bundle_url"):
        api.download(c["bundle_url"], args.bundle)
    if getattr(args, "json", False):
        print(json.dumps(c, indent=2))
    else:
        print(_fmt_command(c))
        if args.bundle and c.get("bundle_url"):
            print(f"bundle written to {args.bundle}")
    if args.wait:
        return 0 if c["state"] == "done" else 3
    return 0


def cmd_commands(args: argparse.Namespace) -> int:
    rows = _api(args).get("/commands", node=args.node, state=args.state,
                                   limit=args.limit)["commands"]
    _out(args, rows, [_fmt_command(c) for c in rows])
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    import time

    rows = _api(args).get("/audit", node=args.node, by=args.by,
                          limit=args.limit)["audit"]

    def line(r: dict[str, Any]) -> str:
        when = f"{time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(r['ts']))}Z"
        if r["action"].startswith("operator_"):  # operator management (no node)
            what = f"{r['action']} {r['op']} {json.dumps(r.get('args') or {})}"
        else:
            what = (f"{r['op']} {r['node_id']} {r['action'].removeprefix('command_')} "
                    f"{r['command_id']}: {r['outcome']}")
        return f"{when} {r['actor'] or '-'} {what}" + (f" -- {r['detail']}"
                                                        if r.get("detail") else "")

    _out(args, rows, [line(r) for r in rows])
    return 0


# -- operators -------------------------------------------------------------------------
def _fmt_operator(r: dict[str, Any]) -> str:
    import time

    def ts(t: float | None) -> str:
        return time.strftime("%Y-%m-%d %H:%M", time.gmtime(t)) + "Z" if t else "-"

    return (f"{r['name']:<20} {r['role']:<9} {r['state']:<8} made {ts(r['created_at'])} by "
            f"{r['created_by'] or '-'}, last used {ts(r['last_used_at'])}"
            + (f", expires {ts(r['expires_at'])}" if r.get("expires_at") else "")
            + (f", revoked {ts(r['revoked_at'])} by {r['revoked_by'] or '-'}"
               if r.get("revoked_at") else ""))


def _local_operators(args: argparse.Namespace) -> bool:
    """Work on the data dir itself (no server): --data-dir/--config without --api."""
    return bool((getattr(args, "data_dir", None) or getattr(args, "config", None))
                and not getattr(args, "api", None))


def cmd_operator(args: argparse.Namespace) -> int:
    from .client import _q

    if _local_operators(args):
        from .auth import Operators, local_actor
        from .db import Store

        store = Store(_config(args).db_path)
        try:
            ops = Operators(store)
            if args.operator_cmd == "add":
                row, token = ops.add(args.name, args.role, local_actor(), args.expires)
                r = {**row, "token": token}
            elif args.operator_cmd == "revoke":
                r = ops.revoke(args.name, local_actor(), allow_last_admin=args.force)
            else:
                r = {"operators": ops.list()}
        finally:
            store.close()
    else:
        api = _api(args)
        if args.operator_cmd == "add":
            body = {"name": args.name, "role": args.role, "expires_in_s": args.expires}
            r = api.request("POST", "/operators", json.dumps(body).encode())
        elif args.operator_cmd == "revoke":
            r = api.request("POST", f"/operators/{_q(args.name)}/revoke")
        else:
            r = api.get("/operators")
    if args.operator_cmd == "add":
        _out(args, r, [r["token"], f"(API token of {r['name']}, role {r['role']}; it is not "
                       "shown again: keep it in a file of mode 0600 and use it with "
                       "--api-token-file FILE or env AIDC_STORE_TOKEN)"])
    elif args.operator_cmd == "revoke":
        _out(args, r, [f"operator {r['name']} " + ("was already revoked" if r["already"]
                                                   else "revoked")])
    else:
        _out(args, r["operators"], [_fmt_operator(o) for o in r["operators"]])
    return 0


def cmd_whoami(args: argparse.Namespace) -> int:
    r = _api(args).get("/whoami")
    if r.get("auth") == "off":
        _out(args, r, ["nobody: this AppStore has api_auth = off (every request is admin)"])
    else:
        _out(args, r, [_fmt_operator(r)])
    return 0


# -- parser ----------------------------------------------------------------------
def _local_opts(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="AppStore config file (.json or .toml)")
    p.add_argument("--data-dir", help="AppStore data directory")


def _api_opt(p: argparse.ArgumentParser, json_out: bool = False) -> None:
    p.add_argument("--api", help=f"AppStore URL (default: from --config, else {DEFAULT_API})")
    p.add_argument("--api-token-file", metavar="FILE", help="the operator's API token "
                   f"(else env {TOKEN_ENV}, else DATA_DIR/admin.token of --data-dir/--config, "
                   f"else {DEFAULT_TOKEN_FILE} when readable)")
    _local_opts(p)  # DATA_DIR/admin.token; --config also gives the URL
    if json_out:
        p.add_argument("--json", action="store_true", help="print JSON")


def _target_opts(p: argparse.ArgumentParser) -> None:
    """Which nodes (rollouts, subscriptions): read back by :func:`_target`."""
    p.add_argument("--node", action="append", default=[], help="a target node (repeatable)")
    p.add_argument("--group")
    p.add_argument("--site")
    p.add_argument("--tag", action="append", default=[], help="nodes with every tag given")
    p.add_argument("--all", action="store_true", help="the whole fleet")


def register(subparsers: Any) -> argparse.ArgumentParser:
    store = subparsers.add_parser("store", help="the cloud AppStore: serve, publish, operate")
    sub = store.add_subparsers(dest="store_cmd", metavar="COMMAND", required=True)

    p = sub.add_parser("serve", help="run the AppStore (MQTT + REST API)")
    _local_opts(p)
    p.add_argument("--mqtt-host")
    p.add_argument("--mqtt-port", type=int)
    p.add_argument("--http-host")
    p.add_argument("--http-port", type=int)
    p.add_argument("--topic-prefix")
    p.add_argument("--no-shared", action="store_true", help="broker without $share subscriptions")
    p.set_defaults(func=_guard(cmd_serve))

    p = sub.add_parser("keygen", help="create the publisher's Ed25519 signing key")
    _local_opts(p)
    p.add_argument("--key", help="key file (default DATA_DIR/keys/publisher.pem)")
    p.add_argument("--force", action="store_true", help="replace an existing key")
    p.set_defaults(func=_guard(cmd_keygen))

    p = sub.add_parser("sample-digits", help="build the digits sample app from real data")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--version", default="1.0.0")
    p.set_defaults(func=_guard(cmd_sample_digits))

    p = sub.add_parser("publish", help="build, sign and publish an app package")
    p.add_argument("--model", required=True, help="the ONNX model")
    p.add_argument("--manifest", required=True, help="manifest.json")
    p.add_argument("--labels", help="labels file, one label a line")
    p.add_argument("--extra", action="append", default=[], metavar="FILE",
                   help="another file for the package, e.g. the replay set the manifest's "
                   "learning.replay names (taken from beside the model when not given)")
    _local_opts(p)
    p.add_argument("--key", help="signing key (default DATA_DIR/keys/publisher.pem)")
    p.add_argument("--api", help="upload to this AppStore instead of the data dir")
    p.add_argument("--api-token-file", metavar="FILE", help="with --api: an admin's API "
                   f"token (else env {TOKEN_ENV}, else DATA_DIR/admin.token)")
    p.add_argument("--out", help="also keep the package file here")
    p.set_defaults(func=_guard(cmd_publish))

    for name, fn, hlp in (("apps", cmd_apps, "list the catalog"),
                          ("nodes", cmd_nodes, "list the fleet")):
        p = sub.add_parser(name, help=hlp)
        _api_opt(p, json_out=True)
        p.set_defaults(func=_guard(fn))

    p = sub.add_parser("assign", help="want APP VERSION on NODE")
    p.add_argument("node")
    p.add_argument("app")
    p.add_argument("version")
    p.add_argument("--fraction", type=float, help="override the app's card fraction (0-1]")
    p.add_argument("--memory-mb", type=int, help="override the app's memory budget")
    p.add_argument("--card", help="pin to this card, e.g. cpu or gpu0")
    p.add_argument("--upload", choices=("none", "metadata", "features", "full"),
                   help="what of the app's samples may leave the site: none, metadata "
                   "(no input), features (the head's features instead of the input) or "
                   "full (the site's own policy can only make it stricter)")
    _api_opt(p)
    p.set_defaults(func=_guard(cmd_assign))

    p = sub.add_parser("unassign", help="remove APP from NODE")
    p.add_argument("node")
    p.add_argument("app")
    _api_opt(p)
    p.set_defaults(func=_guard(cmd_unassign))

    p = sub.add_parser("training", help="show or set NODE's training windows (time division)",
                       description="Without options: what the cloud wants and what the node "
                       "runs. --window replaces the node config's windows; --clear gives "
                       "the config's back. Window: card=cpu,days=mon-fri,start=20:00,"
                       "end=06:00,fraction=1[,yield=no].")
    p.add_argument("node")
    p.add_argument("--window", action="append", metavar="SPEC", type=_window,
                   help="a window (repeatable); none given with --timezone keeps the file's")
    p.add_argument("--timezone", help="IANA zone of the windows, e.g. Europe/Paris")
    p.add_argument("--file", help="a JSON file {\"timezone\": ..., \"windows\": [...]}")
    p.add_argument("--clear", action="store_true", help="use the node config's windows again")
    _api_opt(p, json_out=True)
    p.set_defaults(func=_guard(cmd_training))

    p = sub.add_parser("dataset", help="APP's dataset: distinct labelled inputs from the "
                       "fleet, per site, duplicates and conflicts")
    p.add_argument("app")
    _api_opt(p, json_out=True)
    p.set_defaults(func=_guard(cmd_dataset))

    p = sub.add_parser("retrain", help="retrain APP from the fleet's labelled samples into a "
                       "new version (published only if it passes the gate); without --from: "
                       "list the retrains")
    p.add_argument("app")
    p.add_argument("--from", dest="base", help="the published version to start from")
    p.add_argument("--version", help="the version to publish")
    p.add_argument("--assign", action="append", default=[], metavar="NODE",
                   help="assign the new version to NODE once published (repeatable)")
    p.add_argument("--by", help=argparse.SUPPRESS)  # the token's operator is recorded
    p.add_argument("--wait", action="store_true", help="wait for the verdict (exit 0 "
                   "published, 3 refused or failed)")
    _api_opt(p, json_out=True)
    p.set_defaults(func=_guard(cmd_retrain))

    p = sub.add_parser("token", help="enrolment tokens (one node, once, expiring)")
    tsub = p.add_subparsers(dest="token_cmd", metavar="COMMAND", required=True)
    t = tsub.add_parser("create", help="a new token, printed once")
    t.add_argument("--ttl", type=_duration, help="lifetime: 90, 45s, 30m, 1h, 7d "
                   "(default enrolment.default_token_ttl_s)")
    t.add_argument("--by", help=argparse.SUPPRESS)  # the token's operator is recorded
    t.add_argument("--note", help="what it is for (recorded)")
    _api_opt(t, json_out=True)
    t.set_defaults(func=_guard(cmd_token_create))
    t = tsub.add_parser("list", help="the tokens and their state (never the secret)")
    _api_opt(t, json_out=True)
    t.set_defaults(func=_guard(cmd_token_list))

    p = sub.add_parser("revoke", help="take NODE's broker credentials away (the broker "
                       "reloads; the node cannot connect any more)")
    p.add_argument("node")
    p.add_argument("--by", help=argparse.SUPPRESS)  # the token's operator is recorded
    _api_opt(p)
    p.set_defaults(func=_guard(cmd_revoke))

    p = sub.add_parser("broker-files", help="write the broker's password and ACL files from "
                       "the database (before the broker's first start), reload it if "
                       "configured")
    _local_opts(p)
    p.set_defaults(func=_guard(cmd_broker_files))

    p = sub.add_parser("broker-certs", help="a private CA and the broker's TLS certificate "
                       "in <data_dir>/broker/tls (kept when valid; the certificate is made "
                       "again when its names change or it nears expiry)")
    _local_opts(p)
    p.add_argument("--host", action="append", metavar="NAME|IP",
                   help="a name or IP address nodes reach the broker by (repeatable; "
                   "default: enrolment.broker_url's host and mqtt_host)")
    p.add_argument("--ip", action="append", dest="host", metavar="IP",
                   help="an IP address (the same as --host IP)")
    p.add_argument("--port", type=int, default=8883, help="the TLS listener's port "
                   "(default 8883)")
    p.add_argument("--group", help="give the server key this group, mode 0640 (the "
                   "broker's, when it runs as another user); default enrolment.file_group")
    p.add_argument("--client", action="append", metavar="NAME",
                   help="also sign a client certificate NAME (mutual TLS), written to "
                   "<data_dir>/broker/tls/clients/NAME.pem and .key (repeatable)")
    p.set_defaults(func=_guard(cmd_broker_certs))

    p = sub.add_parser("label", help="where NODE sits: site, group, tags (rollout targets)")
    p.add_argument("node")
    p.add_argument("--site")
    p.add_argument("--group")
    p.add_argument("--tag", action="append", default=None, help="repeatable; replaces the tags")
    _api_opt(p)
    p.set_defaults(func=_guard(cmd_labels))

    p = sub.add_parser("channel", help="show APP's channels, or point CHANNEL to VERSION")
    p.add_argument("app")
    p.add_argument("channel", nargs="?", default="stable")
    p.add_argument("version", nargs="?")
    p.add_argument("--by", help=argparse.SUPPRESS)  # the token's operator is recorded
    _api_opt(p, json_out=True)
    p.set_defaults(func=_guard(cmd_channel))

    p = sub.add_parser("subscribe", help="give APP's channel to a target; nodes that join it "
                       "later get it too")
    p.add_argument("app")
    p.add_argument("--channel", default="stable")
    _target_opts(p)
    p.add_argument("--by", help=argparse.SUPPRESS)  # the token's operator is recorded
    _api_opt(p)
    p.set_defaults(func=_guard(cmd_subscribe))

    p = sub.add_parser("subscriptions", help="list subscriptions (--delete ID removes one)")
    p.add_argument("--app")
    p.add_argument("--delete", type=int, metavar="ID")
    _api_opt(p, json_out=True)
    p.set_defaults(func=_guard(cmd_subscriptions))

    p = sub.add_parser("rollout", help="roll a version out in waves with health gates")
    rsub = p.add_subparsers(dest="rollout_cmd", metavar="COMMAND", required=True)
    r = rsub.add_parser("start", help="APP VERSION to a target, canary first, wave by wave")
    r.add_argument("app")
    r.add_argument("version")
    _target_opts(r)
    r.add_argument("--canary", type=int, default=1, help="nodes in the first wave (default 1)")
    r.add_argument("--steps", help="cumulative percentages after the canary, e.g. 10,50,100")
    r.add_argument("--wave-size", type=int, help="instead of --steps: nodes per wave")
    r.add_argument("--bake", type=float, help="seconds each wave is watched once ready "
                   "(default 60)")
    r.add_argument("--ready-timeout", type=float, help="seconds a wave may take to be ready "
                   "(default 300)")
    r.add_argument("--max-error-rate", type=float, help="default 0.05")
    r.add_argument("--max-p95-ms", type=float)
    r.add_argument("--min-accuracy", type=float, help="field accuracy where labelled")
    r.add_argument("--channel", help="point this channel to VERSION when every wave passed")
    r.add_argument("--by", help=argparse.SUPPRESS)  # the token's operator is recorded
    r.add_argument("--wait", action="store_true", help="follow it to the end (exit 0 "
                   "succeeded, 3 failed or aborted)")
    _api_opt(r, json_out=True)
    r.set_defaults(func=_guard(cmd_rollout))
    r = rsub.add_parser("list", help="the rollouts, newest first")
    r.add_argument("--app")
    _api_opt(r, json_out=True)
    r.set_defaults(func=_guard(cmd_rollout))
    for name, hlp in (("status", "one rollout: waves, nodes, log"),
                      ("pause", "start no new wave"), ("resume", "carry on"),
                      ("abort", "stop here"), ("rollback", "every node it moved back")):
        r = rsub.add_parser(name, help=hlp)
        r.add_argument("rollout_id")
        r.add_argument("--by", help=argparse.SUPPRESS)  # the token's operator is recorded
        if name == "abort":
            r.add_argument("--rollback", action="store_true", help="and move its nodes back")
        if name in ("status", "resume"):
            r.add_argument("--wait", action="store_true", help="follow it to the end")
        _api_opt(r, json_out=True)
        r.set_defaults(func=_guard(cmd_rollout))

    p = sub.add_parser("command", help="run OP on NODE remotely: restart_app, diagnostics, "
                       "selfcheck, doctor, set_config (held for an offline node until --ttl)",
                       description="Examples: command n1 restart_app --arg app=digits; "
                       "command n1 diagnostics --wait --bundle diag.tar.gz; command n1 "
                       "set_config --arg app=digits --arg feedback.threshold=0.8")
    p.add_argument("node")
    p.add_argument("op", help="restart_app | diagnostics | selfcheck | set_config")
    p.add_argument("--arg", action="append", default=[], type=_arg, metavar="K=V",
                   help="an argument (repeatable; a.b=v nests; values read as JSON)")
    p.add_argument("--ttl", type=_duration, default=600, help="expires after: 90, 45s, "
                   "30m, 1h (default 10m)")
    p.add_argument("--id", help="command id (a repeat returns the stored command)")
    p.add_argument("--by", help="a note in the audit log's detail (the actor is the "
                   "token's operator)")
    p.add_argument("--wait", action="store_true", help="wait for the outcome (exit 0 done, "
                   "3 failed or expired)")
    p.add_argument("--bundle", metavar="FILE", help="with --wait: save a diagnostics bundle")
    _api_opt(p, json_out=True)
    p.set_defaults(func=_guard(cmd_command))

    p = sub.add_parser("commands", help="remote commands, newest first")
    p.add_argument("--node")
    p.add_argument("--state", help="queued, sent, done, failed, expired")
    p.add_argument("--limit", type=int, default=50)
    _api_opt(p, json_out=True)
    p.set_defaults(func=_guard(cmd_commands))

    p = sub.add_parser("audit", help="the audit log: who asked what, when, where, outcome")
    p.add_argument("--node")
    p.add_argument("--by", metavar="OPERATOR", help="only what OPERATOR did")
    p.add_argument("--limit", type=int, default=50)
    _api_opt(p, json_out=True)
    p.set_defaults(func=_guard(cmd_audit))

    p = sub.add_parser("operator", help="operator accounts of the REST API: add (prints "
                       "the API token once), list, revoke",
                       description="With --data-dir/--config and no --api: straight on the "
                       "AppStore's database (no server needed; for the first operators and "
                       "recovery). Otherwise through the API with an admin's token.")
    osub = p.add_subparsers(dest="operator_cmd", metavar="COMMAND", required=True)
    o = osub.add_parser("add", help="a new operator NAME with ROLE; prints its token once")
    o.add_argument("name")
    o.add_argument("--role", required=True, choices=("viewer", "operator", "admin"))
    o.add_argument("--expires", type=_duration, metavar="DURATION",
                   help="the token expires after: 3600, 30m, 12h, 90d (default never)")
    _api_opt(o, json_out=True)
    o.set_defaults(func=_guard(cmd_operator))
    o = osub.add_parser("list", help="every operator: role, state, made, last used, expiry")
    _api_opt(o, json_out=True)
    o.set_defaults(func=_guard(cmd_operator))
    o = osub.add_parser("revoke", help="revoke NAME's token (at once, on every worker)")
    o.add_argument("name")
    o.add_argument("--force", action="store_true", help="with --data-dir/--config: even the "
                   "last active admin")
    _api_opt(o, json_out=True)
    o.set_defaults(func=_guard(cmd_operator))

    p = sub.add_parser("whoami", help="the operator and role of the API token in use")
    _api_opt(p, json_out=True)
    p.set_defaults(func=_guard(cmd_whoami))

    p = sub.add_parser("feedback", help="list hard examples uploaded by the fleet")
    p.add_argument("--app")
    p.add_argument("--node")
    p.add_argument("--version")
    p.add_argument("--limit", type=int, default=50)
    _api_opt(p, json_out=True)
    p.set_defaults(func=_guard(cmd_feedback))
    return store


def main(argv: list[str] | None = None) -> int:
    """``python -m appstore store ...`` (the same commands as ``aidc store ...``)."""
    parser = argparse.ArgumentParser(prog="aidc")
    register(parser.add_subparsers(dest="cmd", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args))
