"""Serving latency with one caller: raw ONNX Runtime (B0) vs our worker vs HTTP v2.

B0 is the DESIGN.md reference: one raw ``onnxruntime`` session using all cores,
called in-process. "worker" is :class:`WorkerClient.infer` from this process to
one worker process (all cores) over its Unix socket. "http v2 infer" is
``POST /v2/models/digits/infer`` (JSON) to a werkzeug threaded server running
in a separate server process (as the agent would), over a keep-alive
``http.client`` connection on 127.0.0.1; the client pre-serialises the request
and parses the reply. "http GET live" is the same server answering
``/v2/health/live``: the floor the HTTP server and Flask put under every request.
Same model (the sklearn digits MLP), same single-sample input, ``--n``
sequential requests after ``--warmup``, all in one run.

    .venv/bin/python bench/serving_p50.py [--n 2000] [--warmup 200] [--app-dir DIR]
"""

from __future__ import annotations

import argparse
import http.client
import json
import logging
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import onnxruntime as ort  # noqa: E402

from cloud_sync.manifest import load_manifest  # noqa: E402
from edge_node.worker.supervisor import WorkerSupervisor  # noqa: E402
from tests.models import build_digits_app_dir, load_test_split  # noqa: E402


def measure(fn, n: int, warmup: int) -> np.ndarray:
    for _ in range(warmup):
        fn()
    out = np.empty(n)
    for i in range(n):
        t0 = time.perf_counter()
        fn()
        out[i] = time.perf_counter() - t0
    return out * 1000.0


def serve(app_dir: Path, run_dir: Path, threads: int) -> None:
    """Server process: supervisor + worker + v2 blueprint on werkzeug; prints its port."""
    from flask import Flask
    from werkzeug.serving import make_server

    from edge_node.serving.registry import AppRegistry, ServedApp
    from edge_node.serving.v2 import make_v2_blueprint

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no access log per request
    manifest = load_manifest(json.loads((app_dir / "manifest.json").read_text()))
    sup = WorkerSupervisor(run_dir)
    client = sup.start("digits", app_dir, threads=threads)
    registry = AppRegistry()
    registry.add(ServedApp(manifest.name, manifest.version, "bench", manifest, client))
    app = Flask("bench")
    app.register_blueprint(make_v2_blueprint(registry))
    server = make_server("127.0.0.1", 0, app, threaded=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # -> finally: stop the worker
    print(f"PORT {server.server_port}", flush=True)
    try:
        server.serve_forever()
    finally:
        sup.stop_all()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--app-dir", type=Path, default=None)
    ap.add_argument("--serve", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    cores = os.cpu_count() or 1
    if args.serve:
        return serve(args.app_dir, args.serve, cores)
    tmp = Path(tempfile.mkdtemp(prefix="aidc-bench-", dir="/tmp"))
    app_dir = args.app_dir or build_digits_app_dir(tmp / "app")
    x1 = load_test_split(app_dir)[0][:1] if (app_dir / "test_split.npz").exists() else None
    x1 = np.zeros((1, 64), np.float32) if x1 is None else x1.astype(np.float32)
    manifest = load_manifest(json.loads((app_dir / "manifest.json").read_text()))

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = cores
    sess = ort.InferenceSession(str(app_dir / manifest.model.file), opts,
                                providers=["CPUExecutionProvider"])
    results = {"B0 raw onnxruntime": measure(lambda: sess.run(None, {"input": x1}),
                                             args.n, args.warmup)}
    sup = WorkerSupervisor(tmp / "run")
    try:
        client = sup.start("digits", app_dir, threads=cores)
        results["worker (unix socket)"] = measure(lambda: client.infer({"input": x1}),
                                                  args.n, args.warmup)
    finally:
        sup.stop_all()

    server = subprocess.Popen([sys.executable, __file__, "--serve", str(tmp / "srv"),
                               "--app-dir", str(app_dir)], stdout=subprocess.PIPE)
    try:
        port = int(server.stdout.readline().split()[1])
        conn = http.client.HTTPConnection("127.0.0.1", port)
        body = json.dumps({"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32",
                                       "data": x1.ravel().tolist()}]}).encode()
        headers = {"Content-Type": "application/json"}
        url = f"/v2/models/{manifest.name}/infer"

        def call(method: str, path: str, data: bytes | None = None) -> bytes:
            conn.request(method, path, data, headers)
            resp = conn.getresponse()
            out = resp.read()
            assert resp.status == 200, out
            return out

        results["http v2 infer"] = measure(lambda: json.loads(call("POST", url, body)),
                                           args.n, args.warmup)
        results["http GET live (floor)"] = measure(lambda: call("GET", "/v2/health/live"),
                                                   args.n, args.warmup)
    finally:
        server.terminate()
        server.wait(10)
        shutil.rmtree(tmp, ignore_errors=True)

    print(f"# {platform.machine()} {cores} cores, {platform.system()} {platform.release()}; "
          f"python {platform.python_version()}, onnxruntime {ort.__version__}; "
          f"n={args.n} sequential after {args.warmup} warm-up")
    b0 = np.percentile(results["B0 raw onnxruntime"], 50)
    print(f"{'path':24} {'p50 ms':>8} {'p99 ms':>8} {'mean ms':>8} {'p50 over B0':>12} "
          f"{'x B0':>6}")
    for name, t in results.items():
        p50, p99 = np.percentile(t, 50), np.percentile(t, 99)
        print(f"{name:24} {p50:8.3f} {p99:8.3f} {t.mean():8.3f} {p50 - b0:+12.3f} "
              f"{p50 / b0:6.1f}")


if __name__ == "__main__":
    main()
