"""Card sharing through the node's serving path: two halves, and a noisy neighbour (issue 3).

Issue 3's sharing targets, measured through our data plane, with the raw
ONNX Runtime references of bench/refs.py in the same run:

- **two halves**: app A alone on the whole card (``card_fraction`` 1.0,
  saturated) -> T_alone; then A and B at 0.5 each, both saturated in one
  window -> T_A, T_B; target T/T_alone >= 0.45.
- **noisy neighbour**: a victim app at 0.5 under open-loop Poisson arrivals at
  ``--load`` (50 %) of its own half-card capacity; p50/p99 alone, then with a
  neighbour app at 0.5 saturated by many callers; target p99 +25 % at most.
  For contrast the same without slices (both workers on all cores, no affinity).

The node under test is a separate process built the way the agent builds it
(``--serve``): the CPU card (``cards.cpu_card``) cut by ``Placement`` (the
agent's settings: ``share_cores``, 1024 MB reserve) from each app's manifest
``resources`` with the operator override ``card_fraction``
(``SliceRequest.from_manifest``, as the reconciler does), workers started by
``WorkerSupervisor.start(settings=worker_settings(slice))`` -- on 2 cores a
0.5 app gets one dedicated core by CPU affinity and 1 ORT intra-op thread, a
1.0 app both cores and 2 threads -- and one HTTP server for all apps
(``edge_node.httpd.serve`` on the Flask app with the v2 blueprint). "No
slices": the same workers with 2 intra-op threads each and no affinity (what
two whole-card apps would get), placement bypassed.

Paths, each from separate, unpinned caller processes (the load generator
shares the 2 cores with the node, as it must on this box):

- **HTTP**: ``POST /v2/models/<app>/infer`` over keep-alive ``http.client``,
  the binary-tensor extension both ways for the image models (as tritonclient's
  ``binary_data=True``), JSON for digits;
- **WorkerClient**: ``edge_node.worker.client.WorkerClient.infer`` in each
  caller process straight to the app's worker socket (the data plane without
  the HTTP front);
- **raw ORT**: bench/refs.py -- ``b1``/``b0`` alone, ``two_halves``; and the
  noisy neighbour with the same Poisson victim: a single-thread session pinned
  to core 0 serving the arrivals (M/G/1), the neighbour's single-thread
  session pinned to core 1 (sliced) or both sessions on all cores unpinned
  (shared, as refs.noisy).

Repetitions are interleaved (rep 1 of every row, then rep 2 ...), the Poisson
rate of each path is fixed from its first repetition's half-card capacity,
and each repetition uses its own arrival sequence, the same for alone and with.
Before each row the run waits for other processes to leave the CPU
(``--max-busy``, ``--quiet-budget``) and redoes a disturbed row (``--retries``);
the node's own processes are not counted as disturbance.

    .venv/bin/python bench/sharing.py [--pairs mobilenetv2+squeezenet1_1,digits+digits]
        [--reps 3] [--callers 4] [--load 0.5] [--max-busy 0.25] [--quiet-budget 900]
        [--retries 30] [--quick]

Tables go to stdout and ``bench/out/sharing-<time>.md/.json``.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # noqa: E402
import models  # noqa: E402
import refs  # noqa: E402
import report  # noqa: E402
from harness import Caller, Quiet, run  # noqa: E402
from targets import CallableTarget, HttpV2Target  # noqa: E402

CORES = refs.CORES
MEMORY_MB = 1024  #: each app's memory budget: MobileNetV2's worker is ~150 MB
#: closed-loop and Poisson windows per model (s); warm-up 0.5 s each
CLOSED_S = {"digits": 2.0, "mobilenetv2": 3.0, "squeezenet1_1": 3.0, "resnet18": 4.0}
POISSON_S = {"digits": 4.0, "mobilenetv2": 10.0, "squeezenet1_1": 10.0, "resnet18": 15.0}
POISSON_CLIENTS = 4  #: client processes carrying a victim's Poisson arrivals (HTTP, WorkerClient)
PATHS = ("http", "wc")
PATH_LABEL = {"raw": "raw ORT", "http": "HTTP v2", "wc": "WorkerClient"}


# --- the node under test (a separate process) --------------------------------


def app_dir(model: models.BenchModel, name: str, dst: Path) -> Path:
    """An app dir for ``model`` served as ``name`` (manifest with resources)."""
    resources = {"card_fraction": 0.5, "memory_mb": MEMORY_MB}
    if model.name == "digits":
        from tests.models import build_digits_app_dir, digits_manifest
        return build_digits_app_dir(dst, digits_manifest(name=name, resources=resources))
    dst.mkdir(parents=True, exist_ok=True)
    (dst / "model.onnx").symlink_to(model.path)
    (dst / "manifest.json").write_text(json.dumps({
        "name": name, "version": "1.0.0", "task": "generic", "resources": resources,
        "model": {"file": "model.onnx",
                  "inputs": [{"name": model.input_name, "dtype": "float32",
                              "shape": [None, *model.input_shape[1:]]}],
                  "outputs": [{"name": "logits", "dtype": "float32", "shape": [None, 1000]}]}}))
    return dst


def serve_node(spec: dict) -> None:
    """The node: placement -> slices -> workers -> one HTTP server, as the agent wires them.

    ``spec``: ``{"slices": bool, "run_dir": str, "apps": [{"name", "app_dir", "fraction"}]}``.
    Prints one line ``NODE <json>`` (port, pids, each app's slice, runtime and socket)."""
    from flask import Flask

    from cloud_sync.manifest import load_manifest
    from edge_node.config import ResourcesConfig
    from edge_node.httpd import serve as httpd_serve
    from edge_node.resources import Placement, SliceRequest, WorkerSettings, worker_settings
    from edge_node.resources.cards import cpu_card
    from edge_node.serving.registry import AppRegistry, ServedApp
    from edge_node.serving.v2 import make_v2_blueprint
    from edge_node.worker.supervisor import WorkerSupervisor

    logging.basicConfig(level=logging.WARNING)
    rc = ResourcesConfig()  # the agent's defaults
    card = cpu_card()
    placement = Placement([card], reserve_mb=rc.reserve_mb, share_cores=rc.share_cores,
                          gpu_context_mb=rc.gpu_context_mb, prefer=("cpu",))
    sup = WorkerSupervisor(Path(spec["run_dir"]))
    registry = AppRegistry(result_callback=lambda *a: None)
    info: dict = {"pid": os.getpid(), "apps": {}}
    for a in spec["apps"]:
        d = Path(a["app_dir"])
        manifest = load_manifest(json.loads((d / "manifest.json").read_text()))
        if spec["slices"]:
            sl = placement.place(SliceRequest.from_manifest(
                manifest.name, manifest.resources, {"card_fraction": a["fraction"]}))
            settings, where = worker_settings(sl), sl.describe()
        else:  # no slices: a whole-card worker each, no affinity
            n = len(card.cores)
            pools = {"OMP_NUM_THREADS": str(n), "OPENBLAS_NUM_THREADS": str(n)}
            settings = WorkerSettings(threads=n, cpus=None, spin=False,
                                      memory_mb=manifest.resources.memory_mb, env=pools)
            where = f"no slice: {n} threads, all cores, no affinity"
        key = f"{manifest.name}@bench"
        client = sup.start(key, d, settings=settings)
        labels = d / "labels.txt"
        registry.add(ServedApp(manifest.name, manifest.version, "bench", manifest, client,
                               labels=labels.read_text().split() if labels.exists() else None))
        st = sup.status()[key]
        info["apps"][manifest.name] = {"slice": where, "pid": st["pid"],
                                       "runtime": st["runtime"], "socket": client.socket_path,
                                       "authkey": client.authkey.hex()}
    app = Flask("bench-node")
    app.config["MAX_CONTENT_LENGTH"] = 16 << 20  # the agent's http.max_body_mb default
    app.register_blueprint(make_v2_blueprint(registry, max_body_bytes=16 << 20))
    server, _ = httpd_serve(app, "127.0.0.1", 0)
    info["port"] = server.server_port
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print("NODE " + json.dumps(info), flush=True)
    try:
        while True:
            time.sleep(3600)
    finally:
        server.shutdown()
        sup.stop_all()


class Node:
    """A node process (:func:`serve_node`) for the duration of a ``with`` block."""

    def __init__(self, apps: list[tuple[str, Path, float]], slices: bool, log: Path) -> None:
        self.spec = {"slices": slices, "run_dir": tempfile.mkdtemp(prefix="aidc-sh-"),
                     "apps": [{"name": n, "app_dir": str(d), "fraction": f} for n, d, f in apps]}
        self.log = log

    def __enter__(self) -> dict:
        with open(self.log, "ab") as err:
            self.proc = subprocess.Popen(
                [sys.executable, __file__, "--serve", json.dumps(self.spec)],
                stdout=subprocess.PIPE, stderr=err, cwd=Path(__file__).resolve().parents[1])
        line = self.proc.stdout.readline().decode()
        if not line.startswith("NODE "):
            self.proc.kill()
            raise RuntimeError(f"the bench node did not start: {line!r} (see {self.log})")
        info = json.loads(line[5:])
        info["url"] = f"http://127.0.0.1:{info['port']}"
        info["pids"] = (info["pid"], *(a["pid"] for a in info["apps"].values()))
        time.sleep(1.0)  # let the start-up burst settle
        return info

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


# --- targets -------------------------------------------------------------------


def worker_client_fn(socket_path: str, authkey_hex: str, input_name: str):
    """In a caller process: a WorkerClient on the app's worker socket -> fn(x)."""
    from edge_node.worker.client import WorkerClient
    client = WorkerClient(socket_path, bytes.fromhex(authkey_hex))
    return lambda x: client.infer({input_name: x})


def target(path: str, node: dict, app: str, model: models.BenchModel):
    x = models.sample_input(model)
    label = f"{app}/{path}"
    if path == "http":
        if model.name == "digits":
            return HttpV2Target(node["url"], app, model.input_name, x, label=label)
        from serving import BinaryV2Target
        return BinaryV2Target(node["url"], app, model.input_name, x, label=label)
    a = node["apps"][app]
    return CallableTarget(functools.partial(worker_client_fn, a["socket"], a["authkey"],
                                            model.input_name), x, label=label)


# --- one pair: the plan --------------------------------------------------------


class Pair:
    """Apps A (the victim) and B (the neighbour): models, served names, app dirs."""

    def __init__(self, spec: str, tmp: Path) -> None:
        a, b = spec.split("+")
        self.key = spec
        self.ma, self.mb = models.build(a), models.build(b)
        self.a = a.replace("_", "-")
        self.b = b.replace("_", "-") + ("-b" if a == b else "")
        self.da = app_dir(self.ma, self.a, tmp / spec / "a")
        self.db = app_dir(self.mb, self.b, tmp / spec / "b")
        self.closed_s = max(CLOSED_S[a], CLOSED_S[b])
        self.poisson_s = POISSON_S[a]


def rows_for(pair: Pair, rep: int, args, ms: dict, rates: dict) -> list[tuple[object, dict]]:
    """This repetition's rows, grouped by node configuration: [(node config, {key: scenario})].
    A node config is None (raw ORT, no node) or (apps, slices)."""
    p, n, A, B = pair.key, args.callers, pair.ma, pair.mb
    dc, dp = pair.closed_s, pair.poisson_s
    c0, c1 = refs.halves()

    def rate_of(path: str) -> float:
        if (p, path) not in rates:
            cap = ms[f"{p}/{path}/half idle"].runs[0]["a"].throughput
            rates[p, path] = args.load * cap
        return rates[p, path]

    def poisson(path: str) -> dict:  # this rep's arrivals: the same alone and with
        return {"a": harness.poisson_arrivals(rate_of(path), 0.5 + dp, seed=rep)}

    # raw ORT (bench/refs.py), no node
    raw = {f"{p}/raw/B1 {A.name}": lambda: {"a": refs.b1(A, dc)["main"]},
           f"{p}/raw/B0 {A.name}": lambda: {"a": refs.b0(A, dc)["main"]}}
    if B.name != A.name:
        raw[f"{p}/raw/B1 {B.name}"] = lambda: {"b": refs.b1(B, dc)["main"]}
        raw[f"{p}/raw/B0 {B.name}"] = lambda: {"b": refs.b0(B, dc)["main"]}
    raw[f"{p}/raw/halves"] = lambda: refs.two_halves(A, B, dc)
    victim1 = refs.ort(A, 1, label=f"{A.name} 1t")
    raw[f"{p}/raw/half idle"] = lambda: run([Caller(victim1, (c0[0],), "a")], dc)

    def raw_noisy(sliced: bool, withn: bool) -> dict:
        if sliced:
            cs = [Caller(victim1, (c0[0],), "a")]
            if withn:
                cs += [Caller(refs.ort(B, 1, label=f"{B.name} 1t"), (c,), "b") for c in c1]
        else:
            cs = [Caller(refs.ort(A, len(CORES), label=f"{A.name} all"), None, "a")]
            if withn:
                cs.append(Caller(refs.ort(B, len(CORES), label=f"{B.name} all"), None, "b"))
        return run(cs, dp, arrivals=poisson("raw"))

    for sliced in (True, False):
        for withn in (False, True):
            raw[f"{p}/raw/noisy {'sliced' if sliced else 'shared'} "
                f"{'with' if withn else 'alone'}"] = \
                functools.partial(raw_noisy, sliced, withn)
    plan: list[tuple[object, dict]] = [(None, raw)]

    # our path: nodes built as the agent builds them
    def closed(path, node, groups) -> dict:
        cs = [Caller(target(path, node, app, m), None, g)
              for g, app, m in groups for _ in range(n)]
        return run(cs, dc, own_pids=node["pids"])

    def noisy(path, node, withn, npath=None) -> dict:
        cs = [Caller(target(path, node, pair.a, A), None, "a") for _ in range(POISSON_CLIENTS)]
        if withn:
            cs += [Caller(target(npath or path, node, pair.b, B), None, "b") for _ in range(n)]
        return run(cs, dp, arrivals=poisson(path), own_pids=node["pids"])

    ga, gb = ("a", pair.a, A), ("b", pair.b, B)
    for cfg, grp in (((((pair.a, pair.da, 1.0),), True), ga),
                     ((((pair.b, pair.db, 1.0),), True), gb)):
        if grp is gb and B.name == A.name:
            continue  # the same model: B alone is A alone
        plan.append((cfg, {f"{p}/{path}/alone {grp[2].name}":
                           functools.partial(lambda path, node, grp=grp: closed(path, node, [grp]),
                                             path) for path in PATHS}))
    halves_cfg = (((pair.a, pair.da, 0.5), (pair.b, pair.db, 0.5)), True)
    flat_cfg = (((pair.a, pair.da, 1.0), (pair.b, pair.db, 1.0)), False)
    for cfg, tag in ((halves_cfg, "sliced"), (flat_cfg, "shared")):
        rows = {}
        for path in PATHS:
            if tag == "sliced":
                rows[f"{p}/{path}/half idle"] = functools.partial(
                    lambda path, node: closed(path, node, [ga]), path)
            rows[f"{p}/{path}/halves {tag}"] = functools.partial(
                lambda path, node: closed(path, node, [ga, gb]), path)
        for withn in (False, True):
            for path in PATHS:
                rows[f"{p}/{path}/noisy {tag} {'with' if withn else 'alone'}"] = \
                    functools.partial(lambda path, node, w=withn: noisy(path, node, w), path)
        if tag == "sliced":  # which part hurts the victim: the neighbour's compute or its traffic
            for path, other in (("http", "wc"), ("wc", "http")):
                rows[f"{p}/{path}/noisy sliced with, neighbour via {other}"] = functools.partial(
                    lambda path, other, node: noisy(path, node, True, other), path, other)
        plan.append((cfg, rows))
    return plan


# --- running --------------------------------------------------------------------


def once_more(fn):
    """A row whose callers failed to start (a busy box) is tried once more."""
    def go(*a, **kw):
        try:
            return fn(*a, **kw)
        except harness.HarnessError as err:
            print(f"   row failed ({err}); once more", flush=True)
            return fn(*a, **kw)
    return go


def measure(pairs: list[Pair], args, log_file: Path) -> dict[str, refs.Measured]:
    ms: dict[str, refs.Measured] = {}
    rates: dict = {}
    for rep in range(args.reps):
        for pair in pairs:
            for cfg, rows in rows_for(pair, rep, args, ms, rates):
                print(f"== rep {rep + 1}/{args.reps} {pair.key}: "
                      f"{'raw ORT' if cfg is None else describe_cfg(cfg)}", flush=True)
                if cfg is None:
                    refs.repeat({k: once_more(f) for k, f in rows.items()}, 1, args.quiet, ms,
                                log=print)
                    continue
                with Node(list(cfg[0]), cfg[1], log_file) as node:
                    if rep == 0:
                        for name, a in node["apps"].items():
                            print(f"   {name}: {a['slice']}; runtime threads "
                                  f"{a['runtime']['intra_op_threads']}, affinity "
                                  f"{a['runtime']['affinity']}", flush=True)
                    bound = {k: once_more(functools.partial(f, node=node))
                             for k, f in rows.items()}
                    refs.repeat(bound, 1, args.quiet, ms, log=print)
    args.rates = {f"{k[0]}/{k[1]}": v for k, v in rates.items()}
    return ms


def describe_cfg(cfg) -> str:
    apps, slices = cfg
    return ", ".join(f"{n} at {f:g}" for n, _, f in apps) + ("" if slices else ", no slices")


# --- tables ---------------------------------------------------------------------


def fmt(stat, nd=1) -> str:
    return report.fmt(stat, nd)


def per_rep(a: refs.Measured, ga: str, b: refs.Measured, gb: str, attr: str) -> tuple:
    r = [x / y for x, y in zip(a.values(attr, ga), b.values(attr, gb))]
    return float(np.median(r)), min(r), max(r)


def halves_table(pairs: list[Pair], ms: dict) -> list[str]:
    out = ["| pair | app | path | alone /s (whole card) | on its half, other idle /s | "
           "on its half, both saturated /s | half / alone | ≥ 0.45 | half / raw B1 |",
           "|---|---|---|---|---|---|---|---|---|"]
    for pair in pairs:
        p = pair.key
        for g, m in (("a", pair.ma), ("b", pair.mb)):
            name = m.name if g == "a" or pair.mb.name != pair.ma.name else f"{m.name} (B)"
            alone_g = g if pair.mb.name != pair.ma.name else "a"
            rows = []
            for ref in ("B1", "B0"):
                al = ms[f"{p}/raw/{ref} {m.name}"]
                rows.append((f"raw ORT, alone = {ref}", al, alone_g,
                             ms[f"{p}/raw/half idle"] if g == "a" else None,
                             ms[f"{p}/raw/halves"]))
            for path in PATHS:
                al = ms[f"{p}/{path}/alone {m.name}"]
                rows.append((f"{PATH_LABEL[path]}, slices", al, alone_g,
                             ms[f"{p}/{path}/half idle"] if g == "a" else None,
                             ms[f"{p}/{path}/halves sliced"]))
                rows.append((f"{PATH_LABEL[path]}, no slices", al, alone_g, None,
                             ms[f"{p}/{path}/halves shared"]))
            b1 = ms[f"{p}/raw/B1 {m.name}"]
            for label, al, alg, idle, both in rows:
                r = per_rep(both, g, al, alg, "throughput")
                rb1 = per_rep(both, g, b1, alg, "throughput")
                out.append(f"| {pair.ma.name} + {pair.mb.name} | {name} | {label} | "
                           f"{fmt(al.stat('throughput', alg))} | "
                           f"{fmt(idle.stat('throughput', 'a')) if idle else '—'} | "
                           f"{fmt(both.stat('throughput', g))} | {fmt(r, 3)} | "
                           f"{'met' if r[0] >= 0.45 else '**not met**'} | {fmt(rb1, 3)} |")
    return out


def noisy_table(pairs: list[Pair], ms: dict, rates: dict) -> list[str]:
    out = ["| victim ← neighbour | path | slices | offered /s | victim p50 alone | p50 with | "
           "p99 alone | p99 with | p99 change | ≤ +25 % | victim done /s with |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for pair in pairs:
        p = pair.key
        for path in ("raw", *PATHS):
            for tag in ("sliced", "shared"):
                al, wi = (ms[f"{p}/{path}/noisy {tag} {w}"] for w in ("alone", "with"))
                ch = per_rep(wi, "a", al, "a", "p99_ms")
                st = lambda m, k: fmt(m.stat(k, "a"), 2)  # noqa: E731
                verdict = "met" if ch[0] <= 1.25 else "**not met**"
                out.append(f"| {pair.ma.name} ← {pair.mb.name} | {PATH_LABEL[path]} | "
                           f"{'yes' if tag == 'sliced' else 'no'} | "
                           f"{rates[f'{p}/{path}']:.1f} | {st(al, 'p50_ms')} | "
                           f"{st(wi, 'p50_ms')} | {st(al, 'p99_ms')} | {st(wi, 'p99_ms')} | "
                           f"{report.pct(ch)} | {verdict} | "
                           f"{fmt(wi.stat('throughput', 'a'))} |")
    return out


def cross_table(pairs: list[Pair], ms: dict) -> list[str]:
    out = ["| victim ← neighbour | victim via | neighbour via | victim p50 alone | p50 with | "
           "p99 alone | p99 with | p99 change |", "|---|---|---|---|---|---|---|---|"]
    for pair in pairs:
        p = pair.key
        for path in PATHS:
            al = ms[f"{p}/{path}/noisy sliced alone"]
            for npath in PATHS:
                key = (f"{p}/{path}/noisy sliced with" if npath == path else
                       f"{p}/{path}/noisy sliced with, neighbour via {npath}")
                wi = ms[key]
                st = lambda m, k: fmt(m.stat(k, "a"), 2)  # noqa: E731
                out.append(f"| {pair.ma.name} ← {pair.mb.name} | {PATH_LABEL[path]} | "
                           f"{PATH_LABEL[npath]} | {st(al, 'p50_ms')} | {st(wi, 'p50_ms')} | "
                           f"{st(al, 'p99_ms')} | {st(wi, 'p99_ms')} | "
                           f"{report.pct(per_rep(wi, 'a', al, 'a', 'p99_ms'))} |")
    return out


def cpu_table(pairs: list[Pair], ms: dict) -> list[str]:
    out = ["| pair | row | callers' CPU (cores) | node's CPU: server + workers (cores) |",
           "|---|---|---|---|"]
    for pair in pairs:
        p = pair.key
        for key in [k for k in ms if k.startswith(p + "/") and "/raw/" not in k]:
            m = ms[key]
            cal = [next(iter(r.values())).caller_cores for r in m.runs]
            own = [next(iter(r.values())).own_cores for r in m.runs]
            out.append(f"| {p} | {key[len(p) + 1:]} | {np.median(cal):.2f} | "
                       f"{np.median(own):.2f} |")
    return out


def noise_line(ms: dict, args) -> str:
    foreign = [r.foreign_cores for m in ms.values() for run_ in m.runs for r in run_.values()]
    hit = sorted({k for k, m in ms.items() for run_ in m.runs for r in run_.values()
                  if r.foreign_cores > args.max_busy})
    errors = sum(r.errors for m in ms.values() for run_ in m.runs for r in run_.values())
    return (f"Noise: other processes used a median {np.median(foreign):.2f} cores (max "
            f"{max(foreign):.2f}) during the kept rows; "
            f"{sum(m.retries for m in ms.values())} disturbed rows were run again; "
            f"{args.quiet.waited_s:.0f} s spent waiting for a quiet machine; kept rows "
            f"disturbed by more than {args.max_busy:g} cores: "
            f"{', '.join(hit) if hit else 'none'}. Request errors: {errors}.")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pairs", default="mobilenetv2+squeezenet1_1,digits+digits",
                    help="A+B,...: A is the first app and the victim, B the neighbour")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--callers", type=int, default=2 * len(CORES),
                    help="closed-loop callers per app to saturate it")
    ap.add_argument("--load", type=float, default=0.5,
                    help="victim's Poisson rate, as a fraction of its half-card capacity")
    ap.add_argument("--max-busy", type=float, default=0.25,
                    help="wait for, and redo a row above, this many cores used by others")
    ap.add_argument("--quiet-budget", type=float, default=900.0)
    ap.add_argument("--retries", type=int, default=30)
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: 1 rep, 1 s windows, 2 s Poisson")
    ap.add_argument("--poisson-seconds", type=float, default=None,
                    help="Poisson window of every model (default: 10 s CNNs, 4 s digits)")
    ap.add_argument("--from-json", type=Path, default=None,
                    help="render the tables of an earlier run's .json instead of measuring")
    ap.add_argument("--serve", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.serve:
        serve_node(json.loads(args.serve))
        return {}
    if args.quick:
        args.reps = 1
        for d in (CLOSED_S, POISSON_S):
            for k in d:
                d[k] = 1.0 if d is CLOSED_S else 2.0
    if args.poisson_seconds:
        for k in POISSON_S:
            POISSON_S[k] = args.poisson_seconds
    args.quiet = Quiet(args.max_busy, args.quiet_budget, retries=args.retries)
    t0 = time.time()
    mach = report.machine()
    tmp = Path(tempfile.mkdtemp(prefix="aidc-sharing-"))
    models.OUT.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    log_file = models.OUT / f"sharing-{stamp}-node.log"
    if args.from_json:
        return render_json(args, tmp)
    pairs = [Pair(s, tmp) for s in args.pairs.split(",")]
    print(f"# {args.reps} reps; {args.callers} callers per saturated app; victim at "
          f"{args.load:.0%} of its half-card capacity; node log {log_file}", flush=True)
    ms = measure(pairs, args, log_file)
    mach["wall_s"] = time.time() - t0
    text = render(mach, pairs, ms, args)
    print(text)
    (models.OUT / f"sharing-{stamp}.md").write_text(text)
    data = {"machine": mach, "reps": args.reps, "callers": args.callers, "load": args.load,
            "pairs": args.pairs, "rates": args.rates, "retries": sum(m.retries for m in ms.values()),
            "quiet_wait_s": args.quiet.waited_s, "max_busy": args.max_busy,
            "measured": {k: {"retries": v.retries,
                             "runs": [{g: asdict(r) for g, r in run_.items()} for run_ in v.runs]}
                         for k, v in ms.items()}}
    (models.OUT / f"sharing-{stamp}.json").write_text(json.dumps(data, indent=1))
    print(f"wrote {models.OUT / f'sharing-{stamp}.md'} and .json ({mach['wall_s']:.0f} s)")
    return data


def render_json(args, tmp: Path) -> dict:
    """The tables of an earlier run, from its .json (``--from-json``)."""
    data = json.loads(args.from_json.read_text())
    ms = {k: refs.Measured(k, [{g: harness.RunResult(**r) for g, r in run_.items()}
                               for run_ in v["runs"]], v["retries"])
          for k, v in data["measured"].items()}
    pair_keys = data.get("pairs") or ",".join(dict.fromkeys(k.split("/")[0] for k in ms))
    pairs = [Pair(s, tmp) for s in pair_keys.split(",")]
    args.reps, args.rates = data["reps"], data["rates"]
    args.max_busy = data.get("max_busy", args.max_busy)
    args.quiet.waited_s = data.get("quiet_wait_s", float("nan"))
    print(render(data["machine"], pairs, ms, args))
    return data


def render(mach: dict, pairs: list[Pair], ms: dict, args) -> str:
    md = [report.machine_line(mach), "",
          f"Each cell: median of {args.reps} repetitions (min–max); ratios and changes are "
          "taken per repetition, then the median.", "",
          "### Two apps on half the card each vs alone", "", *halves_table(pairs, ms), "",
          "### Noisy neighbour: victim p99 under Poisson load, alone vs with a saturated "
          "neighbour", "", *noisy_table(pairs, ms, args.rates), "",
          "### Noisy neighbour, sliced: the neighbour's load over the other path", "",
          *cross_table(pairs, ms), "",
          "### Where the CPU went (median per row)", "", *cpu_table(pairs, ms), "",
          noise_line(ms, args)]
    return "\n".join(md)


if __name__ == "__main__":
    main()
