"""Management-plane footprint: the agent's memory and CPU at idle with N apps.

Runs a real broker, the AppStore (in its own process, so it is not counted)
and one edge agent in its own process with N apps assigned (the digits
sample published under N names, each in its own worker process); waits until
all are ready, lets the node idle, and samples the agent's RSS and CPU time
from /proc. Workers are the data plane and are reported apart.

Targets (DESIGN.md): <= 100 MB RSS and <= 2 % of a core at idle with 4 apps
and 4 streams; the published bar for this class is 1 core / 1 GB, and the
Java Greengrass nucleus's floor is 96 MB.

    .venv/bin/python bench/footprint.py [--apps 4] [--streams 4] [--idle 60] [--threads]

``--threads`` also splits the agent's CPU by thread (utime + stime of each
``/proc/<pid>/task``), named with ``py-spy dump`` when py-spy is installed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from appstore.publish import build_package  # noqa: E402
from appstore.samples.digits import build_digits_sample  # noqa: E402
from appstore.signing import SigningKey  # noqa: E402
from edge_node.metrics import proc_usage  # noqa: E402
from installer.demo import http_json, start_broker, wait_until  # noqa: E402
from installer.ports import pick_port, wait_port  # noqa: E402


def children(pid: int) -> list[int]:
    """Child processes of every thread of ``pid`` (workers are forked by a thread)."""
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out += [int(p) for p in (task / "children").read_text().split()]
        except OSError:
            continue
    return out


CLK = os.sysconf("SC_CLK_TCK")


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds (utime + stime) of every thread of ``pid``, by thread id."""
    out = {}
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[task.name] = (int(fields[11]) + int(fields[12])) / CLK
    return out


def thread_names(pid: int) -> dict[str, str]:
    """Thread id -> Python thread name and where it runs, from ``py-spy dump`` (or {})."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    try:
        dump = subprocess.run([spy, "dump", "-p", str(pid)], capture_output=True, text=True,
                              timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return {}
    names = {}
    for block in re.split(r"\n(?=Thread )", dump):
        m = re.match(r'Thread (\d+) \(\w+\): "([^"]*)"', block)
        if m:
            frames = [ln.strip() for ln in block.splitlines()[1:] if ln.strip()]
            where = next((f for f in frames if "edge_node" in f or "cloud_sync" in f),
                         frames[0] if frames else "")
            names[m.group(1)] = f"{m.group(2)} ({where})"
    return names


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--apps", type=int, default=4)
    ap.add_argument("--idle", type=float, default=60.0)
    ap.add_argument("--streams", type=int, default=4, help="camera streams (video files, 5 fps)")
    ap.add_argument("--threads", action="store_true", help="split the agent's CPU by thread")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="aidc-fp-"))
    port, sport, eport = pick_port(0), pick_port(0), pick_port(0)
    broker, kind = start_broker("auto", port, work)
    aidc = [sys.executable, "-m", "installer.cli", "--log-level", "WARNING"]
    procs = []
    try:
        store = subprocess.Popen(aidc + ["store", "serve", "--data-dir", str(work / "cloud"),
                                         "--mqtt-port", str(port), "--http-port", str(sport)]
                                 + ([] if kind == "mosquitto" else ["--no-shared"]))
        procs.append(store)
        wait_port(sport, 30)
        url = f"http://127.0.0.1:{sport}"
        token = (work / "cloud" / "admin.token").read_text().strip()  # first start's admin
        key = SigningKey.load(work / "cloud" / "keys" / "publisher.pem")
        (work / "edge" / "trusted_keys").mkdir(parents=True)
        (work / "edge" / "trusted_keys" / "s.pub").write_bytes(key.public_pem())
        streams = []
        if args.streams:
            import cv2
            import numpy as np

            video = work / "cam.avi"
            w = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 5, (320, 240))
            rng = np.random.default_rng(0)
            for _ in range(50):
                w.write(rng.integers(0, 255, (240, 320, 3), dtype=np.uint8))
            w.release()
            streams = [{"id": f"cam-{i}", "url": str(video), "app": f"digits-{i % args.apps}",
                        "fps": 5, "loop": True} for i in range(args.streams)]
        cfg = work / "node.json"
        cfg.write_text(json.dumps({"node_id": "fp", "data_dir": str(work / "edge"),
                                   "mqtt": {"port": port}, "http": {"port": eport},
                                   "streams": streams}))
        agent = subprocess.Popen(aidc + ["edge", "run", "--config", str(cfg)])
        procs.append(agent)
        wait_port(eport, 30)
        sample = build_digits_sample(work / "sample")
        for i in range(args.apps):
            m = json.loads((sample / "manifest.json").read_text())
            m["name"] = f"digits-{i}"
            out = work / f"d{i}.aidc"
            build_package(sample / "model.onnx", m, sample / "labels.txt", key, out)
            status, body = http_json("POST", f"{url}/api/v1/packages", out.read_bytes(),
                                     "application/octet-stream", token=token)
            assert status in (200, 201), body
            http_json("PUT", f"{url}/api/v1/nodes/fp/apps/digits-{i}",
                      json.dumps({"version": "1.0.0"}).encode(), token=token)
        edge = f"http://127.0.0.1:{eport}"
        wait_until(lambda: http_json("GET", f"{edge}/v2/health/ready")[0] == 200
                   and len(http_json("GET", f"{edge}/v2/models")[1].get("models", [])) == args.apps,
                   120, "all apps ready")
        time.sleep(5)  # let start-up work settle
        rss0, cpu0 = proc_usage(agent.pid)
        threads0 = thread_cpu(agent.pid)
        t0 = time.monotonic()
        peak = rss0
        while time.monotonic() - t0 < args.idle:
            time.sleep(1)
            peak = max(peak, proc_usage(agent.pid)[0])
        rss1, cpu1 = proc_usage(agent.pid)
        threads1 = thread_cpu(agent.pid)
        wall = time.monotonic() - t0
        names = thread_names(agent.pid) if args.threads else {}
        kids = children(agent.pid)
        workers = [u for p in kids if (u := proc_usage(p)) and b"edge_node.worker" in
                   Path(f"/proc/{p}/cmdline").read_bytes()]
        print(f"# {platform.machine()} {os.cpu_count()} cores, {platform.system()} "
              f"{platform.release()}; python {platform.python_version()}; broker {kind}")
        print(f"apps: {args.apps} ready; streams: {args.streams} x 5 fps; window {wall:.0f} s")
        print(f"management plane (agent): RSS {rss1 / 1e6:.1f} MB (peak {peak / 1e6:.1f} MB), "
              f"CPU {100 * (cpu1 - cpu0) / wall:.2f} % of one core")
        print(f"data plane: {len(workers)} workers, RSS "
              f"{sum(w[0] for w in workers) / 1e6:.1f} MB total")
        print("reference: 1 core / 1 GB published bar; 96 MB Greengrass nucleus floor; "
              "target <= 100 MB and <= 2 % of a core")
        if args.threads:
            used = sorted(((c - threads0.get(tid, 0.0), tid) for tid, c in threads1.items()),
                          reverse=True)
            print("agent CPU by thread (% of one core):")
            for sec, tid in used:
                if sec > 0:
                    print(f"  {100 * sec / wall:5.2f}  {names.get(tid, tid)}")
    finally:
        for p in reversed(procs):
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
        broker.terminate()
        broker.wait(5)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
