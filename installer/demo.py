"""``aidc demo``: the whole loop on one machine.

Starts a broker (Mosquitto when installed, else the embedded one), the cloud
AppStore and one edge node; builds the ``digits`` sample app from real data,
publishes it, assigns it to the node, waits until the node serves it and
prints the URLs and a ready-to-paste ``curl``. Ctrl-C stops everything, child
processes included. ``--check`` runs the loop once, classifies the held-out
digits over HTTP, waits for the hard examples to reach the AppStore and exits
(0 when all went right) -- the same path a user takes, for scripts and tests.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from .ports import pick_port, wait_port

logger = logging.getLogger(__name__)

NODE_ID = "demo-node-1"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="all-in-one: broker + AppStore + edge node + sample app")
    p.add_argument("--data-dir", type=Path, default=Path("var/demo"))
    p.add_argument("--mqtt-port", type=int, default=0, help="0: 1883 if free, else any")
    p.add_argument("--store-port", type=int, default=0, help="0: 8080 if free, else any")
    p.add_argument("--edge-port", type=int, default=0, help="0: 8090 if free, else any")
    p.add_argument("--broker", choices=("auto", "mosquitto", "embedded"), default="auto")
    p.add_argument("--check", action="store_true",
                   help="run the loop once, verify it end to end, exit")
    p.add_argument("--fresh", action="store_true", help="delete the data dir first")
    p.set_defaults(func=cmd_demo)


def _die_with_parent() -> None:
    """In the child, before exec: get SIGTERM when the demo process dies."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM), 0, 0, 0)  # PDEATHSIG


def _kill_stale(pidfile: Path, marker: str) -> None:
    try:
        pid = int(pidfile.read_text())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except (OSError, ValueError):
        return
    if marker in cmdline or "embedded_broker" in cmdline:
        logger.warning("stopping a broker left over by an earlier demo (pid %d)", pid)
        try:
            os.kill(pid, signal.SIGTERM)
        except OSError:
            pass
        time.sleep(0.5)


def start_broker(kind: str, port: int, workdir: Path) -> tuple[subprocess.Popen, str]:
    if kind == "auto":
        kind = "mosquitto" if shutil.which("mosquitto") else "embedded"
    log = open(workdir / "broker.log", "ab")
    if kind == "mosquitto":
        conf = workdir / "mosquitto.conf"
        conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n")
        cmd = ["mosquitto", "-c", str(conf)]
    else:
        cmd = [sys.executable, "-m", "installer.embedded_broker", "--port", str(port)]
    # Own session: a terminal Ctrl-C must not take the broker down before the
    # node and the store have said goodbye; it still dies with us (PDEATHSIG).
    # Mosquitto started as root drops to its own user, which clears PDEATHSIG:
    # a pid file lets the next demo clean up after a demo that was SIGKILLed.
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True, preexec_fn=_die_with_parent)
    (workdir / "broker.pid").write_text(str(proc.pid))
    wait_port(port, what=f"the {kind} broker")
    return proc, kind


def http_json(method: str, url: str, body: bytes | None = None,
              content_type: str = "application/json", timeout: float = 30,
              token: str | None = None) -> tuple[int, dict]:
    """``token``: an AppStore operator's API token (``Authorization: Bearer``)."""
    headers = {"Content-Type": content_type}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(url, data=body, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


def wait_until(pred, timeout: float, what: str, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        val = pred()
        if val:
            return val
        time.sleep(interval)
    raise RuntimeError(f"timed out after {timeout:.0f}s waiting for {what}")


def cmd_demo(args: argparse.Namespace) -> int:
    from appstore.config import AppStoreConfig
    from appstore.publish import build_package
    from appstore.samples.digits import build_digits_sample, digit_png
    from appstore.service import AppStoreService
    from appstore.signing import SigningKey
    from edge_node.agent import NodeAgent
    from edge_node.config import load_config

    data = args.data_dir.resolve()
    if args.fresh and data.exists():
        shutil.rmtree(data)
    data.mkdir(parents=True, exist_ok=True)
    _kill_stale(data / "broker.pid", str(data))
    mqtt_port = args.mqtt_port or pick_port(1883)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())

    broker, kind = start_broker(args.broker, mqtt_port, data)
    store = agent = None
    try:
        store_cfg = AppStoreConfig(data_dir=data / "cloud", mqtt_port=mqtt_port,
                                   http_port=args.store_port or pick_port(8080),
                                   shared_group="appstore" if kind == "mosquitto" else None)
        store = AppStoreService(store_cfg)
        store.start()
        token = store.admin_token  # made at the first start: <data>/cloud/admin.token
        if token is None:  # the file was deleted: an admin for this run only
            assert store.operators is not None
            _, token = store.operators.add(f"demo-{int(time.time())}", "admin", "demo")
        key = SigningKey.load_or_create(store_cfg.signing_key_path)
        trusted = data / "edge" / "trusted_keys"
        trusted.mkdir(parents=True, exist_ok=True)
        (trusted / "appstore.pub").write_bytes(key.public_pem())

        node_cfg = load_config(node_id=NODE_ID, data_dir=data / "edge",
                               mqtt={"port": mqtt_port},
                               http={"port": args.edge_port or pick_port(8090)})
        agent = NodeAgent(node_cfg)
        agent.start()

        t0 = time.monotonic()
        sample = build_digits_sample(data / "sample")
        manifest = json.loads((sample / "manifest.json").read_text())
        pkg = data / "sample" / "digits-1.0.0.aidc"
        sha, size = build_package(sample / "model.onnx", manifest, sample / "labels.txt",
                                  key, pkg)
        status, body = http_json("POST", f"{store.url}/api/v1/packages", pkg.read_bytes(),
                                 "application/octet-stream", token=token)
        if status >= 400 and status != 409:
            raise RuntimeError(f"publish failed: {status} {body}")
        t_assign = time.monotonic()
        was_installed = bool(agent.store.installed(sha))
        status, body = http_json("PUT", f"{store.url}/api/v1/nodes/{NODE_ID}/apps/digits",
                                 json.dumps({"version": "1.0.0"}).encode(), token=token)
        if status >= 400:
            raise RuntimeError(f"assign failed: {status} {body}")
        edge = agent.http_url
        wait_until(lambda: http_json("GET", f"{edge}/v2/models/digits/ready")[0] == 200,
                   180, "the node to serve digits")
        t_ready = time.monotonic()

        import numpy as np
        held = np.load(sample / "heldout.npz")
        examples = data / "examples"
        examples.mkdir(exist_ok=True)
        for i in range(10):
            idx = int(np.flatnonzero(held["y_test"] == i)[0])
            (examples / f"digit-{i}.png").write_bytes(digit_png(held["X_test"][idx]))
        seven = held["X_test"][int(np.flatnonzero(held["y_test"] == 7)[0])]
        ready = f"{t_ready - t_assign:.2f}s" + (" (installed before)" if was_installed else "")
        print(banner(kind, mqtt_port, store.url, edge, examples, sha, size,
                     t_assign - t0, ready, [int(v) for v in seven],
                     store_cfg.admin_token_path), flush=True)
        if args.check:
            return check(edge, store.url, held, token)
        stop.wait()
        print("\nstopping...", flush=True)
        return 0
    finally:
        if agent:
            agent.stop()
        if store:
            store.stop()
        broker.terminate()
        try:
            broker.wait(5)
        except subprocess.TimeoutExpired:
            broker.kill()


def banner(kind, mqtt_port, store_url, edge_url, examples, sha, size, t_pub, ready,
           seven, token_file) -> str:
    return f"""
==========================================================================
 aidc all-in-one demo is up
   broker      {kind} on 127.0.0.1:{mqtt_port}
   AppStore    {store_url}/api/v1/apps   (nodes: {store_url}/api/v1/nodes)
   edge node   {edge_url}/v2/models/digits  ({NODE_ID})
   app         digits 1.0.0, package {size} bytes, sha256 {sha[:16]}...
   timings     build+publish {t_pub:.1f}s, assign -> ready {ready}

 Classify a handwritten digit (an image file):
   curl -s --data-binary @{examples}/digit-7.png -H 'Content-Type: image/png' \\
        {edge_url}/v2/models/digits/classify

 The same digit through the KServe/Triton v2 protocol (8x8 pixels, values 0..16):
   curl -s {edge_url}/v2/models/digits/infer -H 'Content-Type: application/json' \\
        -d '{{"inputs":[{{"name":"input","shape":[1,64],"datatype":"FP32","data":[{",".join(map(str, seven))}]}}]}}'

 The AppStore API needs an operator's token (the admin's is in {token_file}):
   curl -s -H "Authorization: Bearer $(cat {token_file})" {store_url}/api/v1/feedback
   aidc store nodes --api {store_url} --api-token-file {token_file}
 Node status:                       curl -s {edge_url}/api/v1/status
 Press Ctrl-C to stop everything.
==========================================================================
"""


def check(edge: str, store_url: str, held, token: str | None = None) -> int:
    """Classify every held-out digit as an image over HTTP; wait for feedback."""
    from appstore.samples.digits import digit_png

    X, y = held["X_test"], held["y_test"]

    def kept() -> int:
        return http_json("GET", f"{edge}/api/v1/status")[1]["capture"].get("samples_kept", 0)

    def arrived() -> int:
        return http_json("GET", f"{store_url}/api/v1/stats",
                         token=token)[1]["counts"]["feedback"]

    before = arrived()
    correct = 0
    for x, label in zip(X, y):
        status, body = http_json("POST", f"{edge}/v2/models/digits/classify", digit_png(x),
                                 "image/png")
        if status != 200:
            print(f"classify failed: {status} {body}", file=sys.stderr)
            return 1
        correct += int(body["label"] == str(int(label)))
    acc = correct / len(y)
    print(f"check: {len(y)} held-out digits classified over HTTP, accuracy {acc:.3f}")
    time.sleep(1.0)  # the node keeps hard examples off the request path
    want = kept()
    wait_until(lambda: arrived() - before >= want, 60, f"{want} hard examples at the AppStore")
    print(f"check: {want} hard examples kept on the node, {arrived() - before} new ones "
          "stored in the AppStore")
    return 0 if acc >= 0.9 and want > 0 else 1
