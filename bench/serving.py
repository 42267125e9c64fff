"""Serving path vs raw ONNX Runtime, one run, same model: the issue-3 serving targets.

References (raw ``onnxruntime`` in caller processes, bench/targets.OrtTarget):

- **B0**: one caller, one session with intra-op threads = all cores -> p50 latency.
- **B1**: one single-thread session per core, one caller each, pinned -> the
  throughput ceiling.
- **B2**: the same callers with every session on all cores (oversubscription).

Ours, on the same model and input:

- **in-process**: :class:`WorkerClient.infer` from threads of this process to
  one worker process (the data plane without HTTP).
- **HTTP**: ``POST /v2/models/<m>/infer`` to a server process built exactly as
  the agent builds it (Flask app with the v2 blueprint -> ``edge_node.httpd.serve``:
  the event-loop server), from caller *processes* with keep-alive
  ``http.client`` connections (bench/targets.HttpV2Target), so the load
  generator never shares the server's GIL; with one caller also from ``wrk``
  (a C client, bench/wrkclient.py; ``apt-get install wrk``), which leaves out
  Python's ~0.2 ms of client work per request. JSON tensors for digits; for the
  image model the binary-tensor extension both ways (as tritonclient sends
  with ``binary_data=True``), binary in / JSON out, and plain JSON.
- **werkzeug (before)**: the same Flask app on werkzeug's threaded server, one
  caller: what the node served with before this path existed.

Latency rows (one caller) use a worker with all cores (as B0, but no spinning); throughput rows
(``--callers`` callers) a worker with one intra-op thread (as B1). Each scenario
runs ``--reps`` times, interleaved; the table gives the median and min-max.
Before each row the run waits (``--max-busy``, ``--quiet-budget``) for other
processes to leave the CPU: the machine may be shared.

    .venv/bin/python bench/serving.py [--models digits,mobilenetv2] [--reps 3]
        [--seconds 3] [--callers 4] [--json out.json] [--max-busy 0.3]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import onnxruntime as ort  # noqa: E402

import harness  # noqa: E402
import models  # noqa: E402
import wrkclient  # noqa: E402
from targets import CallableTarget, HttpV2Target, OrtTarget, V2Error, v2_body  # noqa: E402

CORES = len(os.sched_getaffinity(0))


def app_dir_for(model: models.BenchModel, dst: Path) -> Path:
    """An app dir (manifest + model) the worker can load."""
    if model.name == "digits":
        from tests.models import build_digits_app_dir
        return build_digits_app_dir(dst)
    dst.mkdir(parents=True, exist_ok=True)
    (dst / "model.onnx").symlink_to(model.path)
    shape = [None, *model.input_shape[1:]]
    (dst / "manifest.json").write_text(json.dumps({
        "name": model.name.replace("_", "-"), "version": "1.0.0", "task": "generic",
        "model": {"file": "model.onnx",
                  "inputs": [{"name": model.input_name, "dtype": "float32", "shape": shape}],
                  "outputs": [{"name": "logits", "dtype": "float32", "shape": [None, 1000]}]}}))
    return dst


def worker_env(threads: int) -> dict:
    """Workers run with ORT's pool spinning off (the node's default). Spinning, ORT's own
    default and what B0 gets, was measured here too: on these 2 shared cores a spinning
    worker pool starves the HTTP server and the client, MobileNetV2 p50 went 16.5 -> 27.6 ms."""
    return {"AIDC_ORT_SPIN": "0"}


def serve(app_dir: Path, run_dir: Path, threads: int, frontend: str, batch: int = 1) -> None:
    """Server process: supervisor + worker + the agent's HTTP stack; prints its port."""
    from flask import Flask

    from cloud_sync.manifest import load_manifest
    from edge_node.httpd import serve as httpd_serve
    from edge_node.serving.registry import AppRegistry, ServedApp
    from edge_node.serving.v2 import make_v2_blueprint
    from edge_node.worker.supervisor import WorkerSupervisor

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    manifest = load_manifest(json.loads((app_dir / "manifest.json").read_text()))
    sup = WorkerSupervisor(run_dir)
    client = sup.start(manifest.name, app_dir, threads=threads, env=worker_env(threads))
    labels = app_dir / "labels.txt"
    registry = AppRegistry(result_callback=lambda *a: None)  # the hook runs, as in the agent
    from edge_node.serving.batching import BatchPolicy
    registry.add(ServedApp(manifest.name, manifest.version, "bench", manifest, client,
                           labels=labels.read_text().split() if labels.exists() else None,
                           batch=BatchPolicy(batch, 0.002, 1) if batch > 1 else None))
    app = Flask("bench")
    app.register_blueprint(make_v2_blueprint(registry))
    if frontend == "werkzeug":
        from werkzeug.serving import make_server
        server = make_server("127.0.0.1", 0, app, threaded=True)
        port = server.server_port
    else:
        server, _ = httpd_serve(app, "127.0.0.1", 0)
        port = server.server_port
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print(f"PORT {port}", flush=True)
    try:
        if frontend == "werkzeug":
            server.serve_forever()
        else:
            while True:
                time.sleep(3600)
    finally:
        server.shutdown()
        sup.stop_all()


class Server:
    """A server process (see :func:`serve`) for the duration of a ``with`` block."""

    def __init__(self, app_dir: Path, threads: int, frontend: str = "aidc",
                 batch: int = 1) -> None:
        self.args = [sys.executable, __file__, "--serve", tempfile.mkdtemp(prefix="aidc-sb-"),
                     "--app-dir", str(app_dir), "--threads", str(threads),
                     "--frontend", frontend, "--batch", str(batch)]

    def __enter__(self) -> str:
        self.proc = subprocess.Popen(self.args, stdout=subprocess.PIPE)
        line = self.proc.stdout.readline().decode()
        if not line.startswith("PORT "):
            self.proc.kill()
            raise RuntimeError(f"bench server did not start: {line!r}")
        return f"http://127.0.0.1:{int(line.split()[1])}"

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        self.proc.wait(30)


@dataclass(frozen=True)
class BinaryV2Target:
    """The binary-tensor extension both ways, as tritonclient does with binary_data=True."""

    url: str
    model: str
    input_name: str
    x: np.ndarray = field(repr=False)
    label: str = "http-binary"

    def open(self):
        import http.client
        import socket
        from urllib.parse import urlsplit
        parts = urlsplit(self.url)
        raw = np.ascontiguousarray(self.x, np.float32).tobytes()
        head = json.dumps({"inputs": [{"name": self.input_name, "shape": list(self.x.shape),
                                       "datatype": "FP32",
                                       "parameters": {"binary_data_size": len(raw)}}],
                           "parameters": {"binary_data_output": True}}).encode()
        body, path = head + raw, f"/v2/models/{self.model}/infer"
        headers = {"Content-Type": "application/octet-stream",
                   "Inference-Header-Content-Length": str(len(head))}
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
        conn.connect()
        conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        def call():
            conn.request("POST", path, body, headers)
            resp = conn.getresponse()
            data = resp.read()
            if resp.status != 200:
                raise V2Error(f"HTTP {resp.status}: {data[:200]!r}")
            n = int(resp.getheader("Inference-Header-Content-Length"))
            meta = json.loads(data[:n])
            return np.frombuffer(data, np.float32, offset=n).reshape(
                meta["outputs"][0]["shape"])

        return call


def _client_factory(client, input_name):
    return lambda: (lambda x: client.infer({input_name: x}))


def _wrk_rows(url: str, name: str, inp: str, x: np.ndarray, secs: float,
              digits: bool) -> dict:
    """One caller from a C client (wrk): the server's latency without Python's
    client costs (see bench/wrkclient.py)."""
    path = f"/v2/models/{name}/infer"
    if digits:
        body, _ = v2_body(inp, x)
        return {"HTTP v2 JSON, 1 caller (wrk, C client)": wrkclient.run(
            url, path, body=body, seconds=secs, label="wrk")}
    raw = np.ascontiguousarray(x, np.float32).tobytes()
    head = json.dumps({"inputs": [{"name": inp, "shape": list(x.shape), "datatype": "FP32",
                                   "parameters": {"binary_data_size": len(raw)}}],
                       "parameters": {"binary_data_output": True}}).encode()
    return {"HTTP v2 binary in+out, 1 caller (wrk, C client)": wrkclient.run(
        url, path, body=head + raw, ctype="application/octet-stream",
        headers={"Inference-Header-Content-Length": str(len(head))}, seconds=secs,
        label="wrk")}


def scenarios(model: models.BenchModel, app_dir: Path, x: np.ndarray, args) -> dict:
    """One repetition of every row for ``model``: {row: RunResult}."""
    from cloud_sync.manifest import load_manifest
    from edge_node.worker.supervisor import WorkerSupervisor

    name = load_manifest(json.loads((app_dir / "manifest.json").read_text())).name
    secs, n = args.seconds, args.callers
    p, inp = str(model.path), model.input_name
    cl = harness.closed_loop
    quiet = args.quiet.wait
    rows = {}
    quiet()
    rows["B0 raw ORT, 1 caller, all cores"] = cl(OrtTarget(p, inp, x, CORES, label="B0"), 1, secs)
    quiet()
    rows[f"B1 raw ORT, {CORES} x 1-thread, pinned"] = cl(
        OrtTarget(p, inp, x, 1, label="B1"), CORES, secs, cpus=harness.spread(CORES))
    quiet()
    rows[f"B2 raw ORT, {CORES} x all cores"] = cl(OrtTarget(p, inp, x, CORES, label="B2"),
                                                  CORES, secs)
    run_dir = Path(tempfile.mkdtemp(prefix="aidc-sb-"))
    digits = model.name == "digits"
    for threads, callers in ((CORES, 1), (1, n)):
        quiet()
        sup = WorkerSupervisor(run_dir)
        try:
            client = sup.start(name, app_dir, threads=threads, env=worker_env(threads))
            rows[f"in-process WorkerClient, {callers} thread(s)"] = cl(
                CallableTarget(_client_factory(client, inp), x, label="inproc"), callers, secs,
                mode="thread")
        finally:
            sup.stop_all()
        with Server(app_dir, threads) as url:
            if callers == 1 and wrkclient.available():
                quiet()
                rows.update(_wrk_rows(url, name, inp, x, secs, digits))
            if digits:
                quiet()
                rows[f"HTTP v2 JSON, {callers} caller(s)"] = cl(
                    HttpV2Target(url, name, inp, x, label="http"), callers, secs)
                continue
            quiet()
            rows[f"HTTP v2 binary in+out, {callers} caller(s)"] = cl(
                BinaryV2Target(url, name, inp, x), callers, secs)
            if callers == 1:
                quiet()
                rows["HTTP v2 binary in, JSON out, 1 caller"] = cl(
                    HttpV2Target(url, name, inp, x, binary=True, label="http"), 1, secs)
                quiet()
                rows["HTTP v2 JSON, 1 caller"] = cl(
                    HttpV2Target(url, name, inp, x, label="http"), 1, secs)
    # dynamic batching (off by default on CPU): the worker on all cores, requests
    # joined up to 8 rows / 2 ms while a call is in flight
    with Server(app_dir, CORES, batch=8) as url:
        quiet()
        label = "JSON" if digits else "binary in+out"
        target = (HttpV2Target(url, name, inp, x, label="http-batch") if digits
                  else BinaryV2Target(url, name, inp, x, label="http-batch"))
        rows[f"HTTP v2 {label}, {n} callers, batching 8 / 2 ms"] = cl(target, n, secs)
    with Server(app_dir, CORES, "werkzeug") as url:
        quiet()
        rows["HTTP v2 JSON werkzeug+Flask (before), 1 caller"] = cl(
            HttpV2Target(url, name, inp, x, binary=False, label="werkzeug"), 1, secs)
    return rows


def summarise(model: str, reps: list[dict]) -> list[dict]:
    """Median and min-max per row; ratios are taken per repetition (against that
    repetition's B0/B1, measured minutes apart at most) and then their median."""
    b0_row = next(r for r in reps[0] if r.startswith("B0"))
    b1_row = next(r for r in reps[0] if r.startswith("B1"))
    out = []
    for row in reps[0]:
        rs = [r[row] for r in reps]
        thr = [r.throughput for r in rs]
        p50 = [r.p50_ms for r in rs]
        x_b1 = [r[row].throughput / r[b1_row].throughput for r in reps]
        over = [r[row].p50_ms - r[b0_row].p50_ms for r in reps]
        out.append({"model": model, "row": row, "callers": rs[0].callers,
                    "throughput": float(np.median(thr)), "thr_min": min(thr), "thr_max": max(thr),
                    "p50_ms": float(np.median(p50)), "p50_min": min(p50), "p50_max": max(p50),
                    "p99_ms": float(np.median([r.p99_ms for r in rs])),
                    "x_B1": float(np.median(x_b1)), "x_B1_min": min(x_b1),
                    "x_B1_max": max(x_b1),
                    "p50_over_B0_ms": float(np.median(over)), "over_min": min(over),
                    "over_max": max(over),
                    "errors": sum(r.errors for r in rs)})
    return out


def print_table(rows: list[dict]) -> None:
    print(f"{'model':12} {'path':48} {'req/s (min-max)':>20} {'x B1 (min-max)':>20} "
          f"{'p50 ms (min-max)':>24} {'p50 over B0 (min-max)':>26} {'p99':>7} {'err':>4}")
    for o in rows:
        thr = f"{o['throughput']:.0f} ({o['thr_min']:.0f}-{o['thr_max']:.0f})"
        xb1 = f"{o['x_B1']:.3f} ({o['x_B1_min']:.2f}-{o['x_B1_max']:.2f})"
        p50 = f"{o['p50_ms']:.3f} ({o['p50_min']:.3f}-{o['p50_max']:.3f})"
        over = f"{o['p50_over_B0_ms']:+.3f} ({o['over_min']:+.3f}/{o['over_max']:+.3f})"
        print(f"{o['model']:12} {o['row']:48} {thr:>20} {xb1:>20} {p50:>24} {over:>26} "
              f"{o['p99_ms']:7.3f} {o['errors']:4d}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="digits,mobilenetv2")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--callers", type=int, default=2 * CORES)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--serve", type=Path, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--app-dir", type=Path, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--frontend", default="aidc", help=argparse.SUPPRESS)
    ap.add_argument("--batch", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--max-busy", type=float, default=0.3,
                    help="before each row, wait until other processes use fewer cores")
    ap.add_argument("--quiet-budget", type=float, default=300.0)
    args = ap.parse_args()
    args.quiet = harness.Quiet(args.max_busy, args.quiet_budget)
    if args.serve:
        return serve(args.app_dir, args.serve, args.threads, args.frontend, args.batch)
    tmp = Path(tempfile.mkdtemp(prefix="aidc-bench-"))
    print(f"# {platform.machine()}, {CORES} cores, {platform.system()} {platform.release()}; "
          f"python {platform.python_version()}, onnxruntime {ort.__version__}; "
          f"{args.reps} reps x {args.seconds:g} s per row, {args.callers} callers for "
          f"throughput; {time.strftime('%Y-%m-%d')}", flush=True)
    table = []
    for name in args.models.split(","):
        model = models.build(name)
        x = models.sample_input(model)
        app_dir = app_dir_for(model, tmp / name)
        reps = []
        for i in range(args.reps):
            reps.append(scenarios(model, app_dir, x, args))
            print(f"# {name}: rep {i + 1}/{args.reps} done", file=sys.stderr, flush=True)
        rows = summarise(name, reps)
        print_table(rows)
        table += rows
    print(f"# waited {args.quiet.waited_s:.0f} s in all for a quiet machine")
    if args.json:
        args.json.write_text(json.dumps(table, indent=1))


if __name__ == "__main__":
    main()
