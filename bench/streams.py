"""Camera streams: 8 streams x 5 fps on this machine with the digits model; every frame
accounted for ("zero unexplained drops"), CPU use per part, beside a raw OpenCV reference.

Each stream is a generated MJPG .avi (``--size``, default 640x480, 25 fps, the held-out
digits drawn full frame), looped, played in real time by its own capture process and
decimated to ``--fps``; the capture process resizes to ``--resize`` (default 120x160)
before the frame enters shared memory. Frames go to the digits model through
``--infer worker`` (the real worker process, the agent's wiring: the agent sends a
reference and the worker reads the frame from shared memory), ``--infer worker-copy``
(the copy path: the agent copies each frame out and sends it as a BMP over the socket)
or ``--infer local`` (ONNX Runtime inside this process). Measured after every stream is
online, for ``--seconds``; then everything is stopped and the books are closed.

Reference, same run: one loop in this process decoding the same files the same way (grab
every frame, retrieve one in ``25/fps``) -- the CPU floor of decoding alone.

    .venv/bin/python bench/streams.py [--streams 8] [--fps 5] [--seconds 60]
                                      [--size 480x640] [--infer worker|worker-copy|local]
                                      [--idle-seconds 20] [--json out.json]

Then, for ``--idle-seconds``, the same number of streams whose camera is down (a closed
port; they retry with backoff): what waiting costs the agent and the capture processes.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cv2  # noqa: E402
import numpy as np  # noqa: E402

from edge_node.streams import StreamConfig, StreamManager  # noqa: E402
from edge_node.streams.adapters import LocalClassifier, worker_classify  # noqa: E402
from edge_node.worker.proc import private_rss_mb  # noqa: E402
from edge_node.worker.supervisor import WorkerSupervisor  # noqa: E402
from tests.models import load_test_split  # noqa: E402

logger = logging.getLogger("bench.streams")
NATIVE_FPS = 25
CLK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` (all its threads), or 0 when it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK


def self_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def make_videos(out: Path, n: int, size: tuple[int, int], app_dir: Path) -> list[Path]:
    X, _ = load_test_split(app_dir)
    h, w = size
    paths = []
    for k in range(n):
        path = out / f"cam{k}.avi"
        vw = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), NATIVE_FPS, (w, h))
        for i in range(NATIVE_FPS * 4):  # 4 s, looped
            img = np.round(X[(k * 97 + i) % len(X)].reshape(8, 8) * (255 / 16)).astype(np.uint8)
            img = cv2.resize(img, (w, h), interpolation=cv2.INTER_NEAREST)
            vw.write(cv2.cvtColor(img, cv2.COLOR_GRAY2BGR))
        vw.release()
        paths.append(path)
    return paths


def reference(paths: list[Path], fps: float, seconds: float) -> dict:
    """Decode like the capture loops do, unpaced, in one process: CPU per kept frame."""
    step = max(1, round(NATIVE_FPS / fps))
    caps = [cv2.VideoCapture(str(p), cv2.CAP_FFMPEG) for p in paths]
    kept, t0, c0 = 0, time.monotonic(), time.process_time()
    i = 0
    while time.monotonic() - t0 < seconds:
        for cap in caps:
            if not cap.grab():
                cap.set(cv2.CAP_PROP_POS_FRAMES, 0)
                continue
            if i % step == 0:
                cap.retrieve()
                kept += 1
        i += 1
    cpu = time.process_time() - c0
    for cap in caps:
        cap.release()
    return {"kept": kept, "cpu_ms_per_kept_frame": round(1000 * cpu / max(kept, 1), 3)}


def run(args, paths: list[Path], infer, worker_pids: list[int]) -> dict:
    cfgs = [StreamConfig(id=f"cam{k}", url=str(p), app="digits", fps=args.fps, loop=True,
                         resize=args.resize) for k, p in enumerate(paths)]
    mgr = StreamManager(infer)
    t_start = time.monotonic()
    mgr.start(cfgs)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if all(s["state"] == "online" for s in mgr.stats().values()):
                break
            time.sleep(0.1)
        all_online_s = time.monotonic() - t_start
        pids = [p for p in mgr.pids().values() if p]
        time.sleep(2.0)  # settle
        s0 = mgr.stats()
        cpu0 = {"agent": self_cpu(), "capture": sum(map(cpu_seconds, pids)),
                "worker": sum(map(cpu_seconds, worker_pids))}
        t0 = time.monotonic()
        time.sleep(args.seconds)
        dt = time.monotonic() - t0
        s1 = mgr.stats()
        cpu1 = {"agent": self_cpu(), "capture": sum(map(cpu_seconds, pids)),
                "worker": sum(map(cpu_seconds, worker_pids))}
        rss = {"capture_mb_each": [private_rss_mb(p) for p in pids],
               "agent_mb": private_rss_mb(os.getpid()),
               "worker_mb": [private_rss_mb(p) for p in worker_pids]}
    finally:
        final = mgr.stop()
    cpu = {k: round(100 * (cpu1[k] - cpu0[k]) / dt, 1) for k in cpu0}
    window = {sid: {"captured_fps": round((s1[sid]["captured"] - s0[sid]["captured"]) / dt, 2),
                    "processed_fps": round((s1[sid]["processed"] - s0[sid]["processed"]) / dt,
                                           2)} for sid in s1}
    return {"all_online_s": round(all_online_s, 2), "window_s": round(dt, 1),
            "cpu_percent_of_one_core": cpu, "rss": rss, "window": window, "final": final}


def idle(n: int, seconds: float) -> dict:
    """``n`` streams whose camera is down (a closed port): what they cost while waiting."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mgr = StreamManager(lambda app, frame: None)
    mgr.start([StreamConfig(id=f"down{k}", url=f"rtsp://127.0.0.1:{port}/x", app="digits")
               for k in range(n)])
    try:
        time.sleep(5.0)  # spawned, first attempts made
        pids = [p for p in mgr.pids().values() if p]
        c0, p0, t0 = self_cpu(), sum(map(cpu_seconds, pids)), time.monotonic()
        time.sleep(seconds)
        dt = time.monotonic() - t0
        agent = 100 * (self_cpu() - c0) / dt
        capture = 100 * (sum(map(cpu_seconds, pids)) - p0) / dt
    finally:
        mgr.stop()
    return {"streams": n, "seconds": round(dt, 1), "agent_cpu_percent": round(agent, 2),
            "capture_cpu_percent_all": round(capture, 2)}


BUCKETS = ("processed", "failed", "dropped_capture", "dropped_inflight", "dropped_torn",
           "dropped_stopped", "lost", "unexplained", "in_flight", "in_transit")


def report(res: dict, ref: dict, args) -> None:
    print(f"\n{args.streams} streams x {args.fps:g} fps, {args.size[1]}x{args.size[0]} -> "
          f"{args.resize[1]}x{args.resize[0]}, infer={args.infer}, window {res['window_s']} s, "
          f"all online after {res['all_online_s']} s")
    cols = ("captured", "processed", "dropped_capture", "dropped_inflight", "dropped_torn",
            "torn_in_worker", "dropped_stopped", "lost", "unexplained")
    print(f"{'stream':8}" + "".join(f"{c:>17}" for c in cols) + f"{'fps(window)':>13}")
    tot = dict.fromkeys(cols, 0)
    for sid, s in sorted(res["final"].items()):
        assert sum(s[b] for b in BUCKETS) == s["captured"], f"{sid}: books do not balance"
        for c in cols:
            tot[c] += s[c]
        print(f"{sid:8}" + "".join(f"{s[c]:>17}" for c in cols)
              + f"{res['window'][sid]['processed_fps']:>13}")
    print(f"{'total':8}" + "".join(f"{tot[c]:>17}" for c in cols))
    cpu = res["cpu_percent_of_one_core"]
    kept = sum(w["captured_fps"] for w in res["window"].values())
    print(f"CPU % of one core: agent {cpu['agent']}, capture processes {cpu['capture']} "
          f"(all {len(res['window'])}), worker {cpu['worker']}; "
          f"total {round(sum(cpu.values()), 1)} of {os.cpu_count() * 100}")
    done = sum(w["processed_fps"] for w in res["window"].values())
    per_frame = round(10 * cpu["agent"] / max(done, 1e-9), 3)
    print(f"agent CPU per frame handed to the model: {per_frame} ms ({done:.1f} frames/s)")
    print(f"capture CPU per kept frame: {round(10 * cpu['capture'] / max(kept, 1e-9), 3)} ms "
          f"(reference, raw OpenCV decode in one loop: {ref['cpu_ms_per_kept_frame']} ms)")
    print(f"RSS MB: agent {res['rss']['agent_mb']}, capture each {res['rss']['capture_mb_each']}, "
          f"worker {res['rss']['worker_mb']}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--streams", type=int, default=8)
    ap.add_argument("--fps", type=float, default=5.0)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--size", default="480x640", help="source HxW")
    ap.add_argument("--resize", default="120x160", help="HxW the capture process resizes to")
    ap.add_argument("--infer", choices=("worker", "worker-copy", "local"), default="worker")
    ap.add_argument("--idle-seconds", type=float, default=20.0,
                    help="then measure --streams cameras that are down for this long (0: skip)")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()
    args.size = tuple(int(v) for v in args.size.split("x"))
    args.resize = tuple(int(v) for v in args.resize.split("x"))
    logging.basicConfig(level=logging.WARNING)
    tmp = Path(tempfile.mkdtemp(prefix="aidc-bench-streams-"))
    app_dir = tmp / "digits"
    # trained in a child process, so sklearn is not counted in this (the agent's) memory
    subprocess.run([sys.executable, "-c", "import sys; from tests.models import "
                    "build_digits_app_dir as b; b(sys.argv[1])", str(app_dir)],
                   check=True, cwd=Path(__file__).resolve().parents[1])
    paths = make_videos(tmp, args.streams, args.size, app_dir)
    ref = reference(paths, args.fps, 5.0)
    sup = None
    if args.infer in ("worker", "worker-copy"):
        sup = WorkerSupervisor(Path(tempfile.mkdtemp(prefix="aidc-w-", dir="/tmp")))
        sup.start("digits", app_dir)
        infer = worker_classify(sup.client, shared_memory=args.infer == "worker")
        worker_pids = [sup.status()["digits"]["pid"]]
    else:
        infer, worker_pids = LocalClassifier({"digits": app_dir}), []
    try:
        res = run(args, paths, infer, worker_pids)
    finally:
        if sup is not None:
            sup.stop_all()
    quiet = idle(args.streams, args.idle_seconds) if args.idle_seconds > 0 else None
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, {platform.platform()}, "
          f"Python {platform.python_version()}, OpenCV {cv2.__version__}")
    report(res, ref, args)
    if quiet:
        print(f"{quiet['streams']} cameras down (retrying) for {quiet['seconds']} s: agent "
              f"{quiet['agent_cpu_percent']} % of one core, capture processes "
              f"{quiet['capture_cpu_percent_all']} % (all)")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: v for k, v in vars(args).items()
                                                  if k != "json"}, "reference": ref,
                                         "idle": quiet, **res}, indent=1, default=str))


if __name__ == "__main__":
    main()
