"""The whole loop, measured: publish -> assign -> ready, and serving through the node.

In one run, on real parts (Mosquitto if installed, else the embedded broker;
the AppStore and one edge node in this process, the model in its own worker
process):

- package size and build+sign time of the digits sample;
- assign -> ready: from the PUT that assigns the app to the node reporting it
  ready, with a cold node (package not on disk) each repetition, so it covers
  desired state -> chunked fetch over MQTT -> sha256 + Ed25519 -> unpack ->
  worker start;
- infer p50/p99 of one sample over HTTP v2 through the real node, against the
  reference measured in the same run: raw ``onnxruntime`` on the same model
  with all cores (B0), in process.

    .venv/bin/python bench/loop.py [--reps 5] [--n 1000]
"""

from __future__ import annotations

import argparse
import http.client
import json
import logging
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import onnxruntime as ort  # noqa: E402

from appstore.config import AppStoreConfig  # noqa: E402
from appstore.publish import build_package  # noqa: E402
from appstore.samples.digits import build_digits_sample  # noqa: E402
from appstore.service import AppStoreService  # noqa: E402
from edge_node.agent import NodeAgent  # noqa: E402
from edge_node.config import load_config  # noqa: E402
from installer.demo import http_json, start_broker, wait_until  # noqa: E402
from installer.ports import pick_port  # noqa: E402


def timed(fn, n: int, warmup: int = 100) -> np.ndarray:
    for _ in range(warmup):
        fn()
    out = np.empty(n)
    for i in range(n):
        t = time.perf_counter()
        fn()
        out[i] = (time.perf_counter() - t) * 1000
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--n", type=int, default=1000)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    work = Path(tempfile.mkdtemp(prefix="aidc-bench-"))
    port = pick_port(0)
    broker, kind = start_broker("auto", port, work)
    store = agent = None
    try:
        store = AppStoreService(AppStoreConfig(
            data_dir=work / "cloud", mqtt_port=port, http_port=0,
            shared_group="appstore" if kind == "mosquitto" else None)).start()
        sample = build_digits_sample(work / "sample")
        manifest = json.loads((sample / "manifest.json").read_text())
        t = time.perf_counter()
        sha, size = build_package(sample / "model.onnx", manifest, sample / "labels.txt",
                                  store.key, work / "d.aidc")
        t_build = time.perf_counter() - t
        token = store.admin_token
        status, body = http_json("POST", f"{store.url}/api/v1/packages",
                                 (work / "d.aidc").read_bytes(), "application/octet-stream",
                                 token=token)
        assert status in (200, 201), body

        ready_s = []
        for rep in range(args.reps):
            edge_dir = work / f"edge{rep}"  # a cold node every time
            (edge_dir / "trusted_keys").mkdir(parents=True)
            (edge_dir / "trusted_keys" / "s.pub").write_bytes(store.key.public_pem())
            node = f"bench-{rep}"
            agent = NodeAgent(load_config(node_id=node, data_dir=edge_dir,
                                          mqtt={"port": port}, http={"port": 0}))
            agent.start()
            wait_until(lambda: agent.conn.connected.is_set(), 10, "node connected")
            t = time.perf_counter()
            http_json("PUT", f"{store.url}/api/v1/nodes/{node}/apps/digits",
                      json.dumps({"version": "1.0.0"}).encode(), token=token)

            def ready() -> bool:
                rep_ = http_json("GET", f"{store.url}/api/v1/nodes/{node}",
                                 token=token)[1].get("reported")
                return bool(rep_) and any(a["status"] == "ready" for a in rep_["apps"])

            wait_until(ready, 60, "ready", interval=0.005)
            ready_s.append(time.perf_counter() - t)
            if rep < args.reps - 1:
                agent.stop()
                agent = None

        x = np.load(sample / "heldout.npz")["X_test"][:1]
        sess = ort.InferenceSession(str(sample / "model.onnx"),
                                    providers=["CPUExecutionProvider"])
        b0 = timed(lambda: sess.run(None, {"input": x}), args.n)
        host, hport = agent.http_url.removeprefix("http://").split(":")
        conn = http.client.HTTPConnection(host, int(hport))
        conn.sock = None
        body = json.dumps({"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32",
                                       "data": x.reshape(-1).tolist()}]})

        def infer() -> None:
            conn.request("POST", "/v2/models/digits/infer", body,
                         {"Content-Type": "application/json"})
            r = conn.getresponse()
            assert r.status == 200
            r.read()

        hv2 = timed(infer, args.n)
        print(f"# {platform.machine()} {os.cpu_count()} cores, {platform.system()} "
              f"{platform.release()}; python {platform.python_version()}, onnxruntime "
              f"{ort.__version__}; broker {kind}")
        print(f"package: {size} bytes, build+sign {t_build * 1000:.0f} ms")
        print(f"assign -> ready (cold node, {args.reps} reps): median "
              f"{np.median(ready_s):.3f} s, min {min(ready_s):.3f}, max {max(ready_s):.3f}")
        for name, t in (("B0 raw onnxruntime", b0), ("HTTP v2 via edge node", hv2)):
            print(f"{name:24s} p50 {np.percentile(t, 50):.3f} ms  p99 "
                  f"{np.percentile(t, 99):.3f} ms")
        print(f"HTTP p50 overhead over B0: "
              f"{np.percentile(hv2, 50) - np.percentile(b0, 50):.3f} ms")
    finally:
        if agent:
            agent.stop()
        if store:
            store.stop()
        broker.terminate()
        broker.wait(5)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
