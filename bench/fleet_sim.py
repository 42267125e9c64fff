"""Fleet scale: thousands of simulated nodes against the real AppStore and Mosquitto.

DESIGN.md's target: on one 2-core cloud box, >= 2,000 simulated nodes
connected, and a rollout reaches all of them within 60 s.

What runs (all real, nothing mocked on the cloud side):

- **Mosquitto**, started by the bench on a free loopback port (``persistence
  false``, ``max_connections -1``, ``sys_interval 1`` for its ``$SYS``
  counters), with ``RLIMIT_NOFILE`` raised to the hard limit;
- **the AppStore** (``python -m appstore store serve``: ``AppStoreService``,
  its REST API, its ingest thread, SQLite in a temp dir) in its own process;
- **simulated nodes**: light MQTT clients speaking the real protocol
  (``cloud_sync.topics`` and ``cloud_sync.schemas``). Each node connects with
  its own client id and a retained ``offline`` last will, publishes its
  retained ``online`` availability and a retained reported state, subscribes to
  its ``state/desired`` (and ``ack``, as the real agent's outbox does), and on
  a new :class:`DesiredState` publishes a reported state saying it now runs
  those versions (``status: ready``) -- what a real node says after installing
  them. **No package is downloaded or installed**: this bench measures the
  control plane (connections, twins, desired state, registry), not package
  transfer (``bench/loop.py`` measures one node's assign -> ready with the
  download). Nodes also send telemetry (QoS 0) every ``--heartbeat`` seconds.

How the nodes are simulated: paho-mqtt v2 (the client the product already
uses) with its *external loop* API -- ``on_socket_open/close`` and
``on_socket_register/unregister_write`` keep a :mod:`selectors` (epoll)
registration per client, and ``loop_read`` / ``loop_write`` / ``loop_misc`` are
called from one event loop per process. No thread per client: ``--procs``
worker processes (2 by default) each drive their share of the fleet; no
socketpair either (paho makes one only for its own loops), so a node costs one
file descriptor. An asyncio MQTT library (aiomqtt) would wrap paho in the same
way plus an asyncio layer, so it would cost more CPU per message on a 2-core box
that the AppStore and the broker also need, and it adds a dependency; gmqtt
and amqtt's client are less kept. Connects are paced (at most ``--connecting``
CONNACKs outstanding per process) as a fleet coming back would be by its
jittered backoff; a node that loses its connection reconnects after a jittered
delay (counted).

What is measured, per fleet size, in one run:

1. *reference, broker alone*: the same nodes against the same broker with no
   AppStore: time until every node is connected, subscribed and its two
   retained messages acknowledged; broker CPU;
2. a fresh broker and a fresh AppStore: the same connect; time until every node
   is connected (node side) and until the AppStore counts them all online
   (``GET /api/v1/stats``);
3. *rollouts* (``--rollouts`` per API, 2 by default: install 1.0.0, then
   upgrade to 1.0.1, ...): small signed packages are published to the catalog
   first (``POST /api/v1/packages``), then :func:`rollout` gives a version to
   every node through the REST API, as an operator would (``PUT
   /api/v1/nodes/<id>/apps/<app>`` over ``--assign-concurrency`` keep-alive
   connections, or one ``POST /api/v1/rollouts``). Timed from the start of the
   first call until every node has
   published (and the broker acknowledged) a reported state with the new
   version, and until the AppStore's registry shows it for every node
   (``GET /api/v1/nodes``, polled only once the nodes are done, so polling
   does not slow the rollout); also from the end of the last call;
4. an idle window (``--idle`` s) with telemetry flowing.

AppStore and broker CPU come from ``/proc/<pid>/stat`` (utime + stime) per
phase, peak RSS from ``VmHWM``; broker messages/s from ``$SYS/broker/messages/
publish/messages/received|sent`` (PUBLISH packets in + out; mean over the
phase and the highest 1-s step). The
simulator's own processes share the same 2 cores and their CPU is reported
too. Output: a table on stdout and ``bench/out/fleet-<stamp>.md`` / ``.json``.

    .venv/bin/python bench/fleet_sim.py                       # 100, 500, 1000, 2000
    .venv/bin/python bench/fleet_sim.py --sizes 2000,5000 --rollout-api per-node,rollouts
    .venv/bin/python bench/fleet_sim.py --sizes 20 --rollouts 1 --idle 1   # smoke
    .venv/bin/python bench/fleet_sim.py --profile-assign 1000   # where an assign's time goes

The rollout is one function, :func:`rollout`, that picks an entry of
:data:`ROLLOUT_APIS` (``--rollout-api``, several comma separated are
alternated within each size, so they are compared in one run): ``per-node``
(one ``PUT /api/v1/nodes/<id>/apps/<app>`` per node, as an operator's script
would) and ``rollouts`` (one ``POST /api/v1/rollouts`` naming every node, one
wave, no canary, no bake: the AppStore's rollout engine assigns and waits for
the nodes; its "succeeded" time is reported too).
"""

from __future__ import annotations

import argparse
import heapq
import importlib.metadata
import http.client
import json
import logging
import multiprocessing as mp
import os
import platform
import random
import resource
import selectors
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import paho.mqtt.client as mqtt  # noqa: E402
from paho.mqtt.enums import CallbackAPIVersion  # noqa: E402

from cloud_sync.errors import MessageRejected  # noqa: E402
from cloud_sync.schemas import (AppReport, AppTelemetry, Availability, DesiredState,  # noqa: E402
                                ReportedState, Telemetry, parse)
from cloud_sync.topics import Topics  # noqa: E402
from installer.ports import free_port, wait_port  # noqa: E402

logger = logging.getLogger("fleet_sim")
OUT = Path(__file__).resolve().parent / "out"
ROOT = Path(__file__).resolve().parents[1]
CLK = os.sysconf("SC_CLK_TCK")
APP = "digits"
AGENT_VERSION = "sim-0.1"


# -- /proc ------------------------------------------------------------------------
def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` (all its threads), in seconds; 0 when gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK


def peak_rss_mb(pid: int) -> float:
    """VmHWM (peak resident set) of ``pid`` in MB; 0 when gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def raise_nofile() -> int:
    """Soft RLIMIT_NOFILE up to the hard limit (each node is one fd); the new soft."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def _child_setup() -> None:
    """In a child before exec: own fd limit, and SIGTERM when the bench dies."""
    raise_nofile()
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM), 0, 0, 0)


def stop_proc(p: subprocess.Popen | None, timeout: float = 10.0) -> None:
    if p is None or p.poll() is not None:
        return
    p.terminate()
    try:
        p.wait(timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait(5)


# -- the broker ---------------------------------------------------------------------
class Broker:
    """Mosquitto on a free loopback port, enough connections, $SYS every second."""

    def __init__(self, work: Path) -> None:
        if not shutil.which("mosquitto"):
            raise RuntimeError("bench/fleet_sim.py needs Mosquitto: apt-get install -y mosquitto")
        self.work = work
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Broker":
        conf = self.work / f"mosquitto-{self.port}.conf"
        me = ""
        if os.getuid() == 0:  # as root Mosquitto drops to 'mosquitto': stay root here
            me = "user root\n"
        conf.write_text(
            f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
            "max_connections -1\nsys_interval 1\nmax_queued_messages 10000\n"
            f"max_inflight_messages 100\n{me}")
        log = open(self.work / f"broker-{self.port}.log", "ab")
        self.proc = subprocess.Popen(["mosquitto", "-c", str(conf)], stdout=log,
                                     stderr=subprocess.STDOUT, preexec_fn=_child_setup)
        log.close()
        wait_port(self.port, 10)
        return self

    def stop(self) -> None:
        stop_proc(self.proc)


class SysMonitor:
    """A paho client on the broker's ``$SYS`` counters (updated every second)."""

    KEYS = ("publish/messages/received", "publish/messages/sent", "clients/connected")

    def __init__(self, port: int) -> None:
        self.values: dict[str, float] = {}
        self.history: list[tuple[float, float, float]] = []  # (t, received, sent)
        self._lock = threading.Lock()
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"sysmon-{os.getpid()}")
        c.on_connect = lambda cl, *_: cl.subscribe([(f"$SYS/broker/{k}", 0)
                                                    for k in self.KEYS])
        c.on_message = self._on_message
        c.connect("127.0.0.1", port, 30)
        c.loop_start()
        self.client = c

    def _on_message(self, client: Any, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        key = msg.topic.removeprefix("$SYS/broker/")
        try:
            v = float(msg.payload)
        except ValueError:
            return
        with self._lock:
            self.values[key] = v
            # Mosquitto publishes a $SYS value only when it changed, received before
            # sent; sent changes every second (it counts these messages too)
            if key == "publish/messages/sent":
                self.history.append((time.monotonic(),
                                     self.values.get("publish/messages/received", 0), v))
                del self.history[:-3600]

    def snapshot(self) -> tuple[float, float, float]:
        with self._lock:
            return self.history[-1] if self.history else (time.monotonic(), 0.0, 0.0)

    def fresh(self, after: float, timeout: float = 3.0) -> tuple[float, float, float]:
        """The first snapshot taken after ``after`` (monotonic), waiting for it."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            snap = self.snapshot()
            if snap[0] > after:
                return snap
            time.sleep(0.05)
        return self.snapshot()

    def rates(self, t0: float, t1: float) -> dict[str, float]:
        """PUBLISH messages in+out per second: mean over [t0, t1] and the highest
        1-s step (waits for the first update after ``t1``)."""
        self.fresh(t1)
        with self._lock:
            hist = list(self.history)
        before = [h for h in hist if h[0] <= t0]
        after = [h for h in hist if h[0] >= t1]
        if not before or not after:
            return {"msgs_per_s": 0.0, "msgs_peak_per_s": 0.0, "msgs": 0}
        span = [h for h in hist if before[-1][0] <= h[0] <= after[0][0]]
        a, b = span[0], span[-1]
        total = (b[1] - a[1]) + (b[2] - a[2])
        peak = max(((y[1] - x[1]) + (y[2] - x[2])) / max(y[0] - x[0], 1e-3)
                   for x, y in zip(span, span[1:]))
        # the counters move in 1-s steps: the mean is over the steps around the phase
        return {"msgs_per_s": total / max(b[0] - a[0], 1e-3), "msgs_peak_per_s": peak,
                "msgs": int(total)}

    def stop(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


# -- simulated nodes (run in worker processes) -------------------------------------
@dataclass
class SimOptions:
    host: str
    port: int
    prefix: str
    heartbeat_s: float = 60.0
    keepalive: int = 60
    connecting: int = 100  # CONNACKs outstanding per process at most
    seed: int = 0


class SimNode:
    """One node: a paho client driven by the worker's selector loop."""

    __slots__ = ("node_id", "w", "client", "pending", "ready_at", "revision", "epoch",
                 "apps", "applied_mid", "applied_tags", "connecting_since", "retry_at",
                 "attempts", "_t")

    def __init__(self, node_id: str, w: "Worker") -> None:
        self.node_id, self.w = node_id, w
        t = w.topics
        self._t = (t.availability(node_id), t.reported(node_id), t.desired(node_id),
                   t.ack(node_id), t.telemetry(node_id))
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"sim-{node_id}",
                        protocol=mqtt.MQTTv311, clean_session=True, userdata=self)
        c.will_set(self._t[0], Availability(status="offline", agent_version=AGENT_VERSION)
                   .to_bytes(), qos=1, retain=True)
        c.max_inflight_messages_set(20)
        c.max_queued_messages_set(1000)
        c.on_connect = _on_connect
        c.on_disconnect = _on_disconnect
        c.on_message = _on_message
        c.on_publish = _on_publish
        c.on_subscribe = _on_subscribe
        c.on_socket_open = w.sock_open
        c.on_socket_close = w.sock_close
        c.on_socket_register_write = w.sock_want_write
        c.on_socket_unregister_write = w.sock_no_write
        self.client = c
        self.pending: set[int] = set()
        self.ready_at = 0.0
        self.revision = -1
        self.epoch = ""
        self.apps: list[AppReport] = []
        self.applied_mid = -1
        self.applied_tags: tuple[str, ...] = ()
        self.connecting_since = 0.0
        self.retry_at = 0.0
        self.attempts = 0

    def connect(self) -> bool:
        self.connecting_since = time.monotonic()
        self.attempts += 1
        try:
            if self.attempts == 1:
                self.client.connect(self.w.opts.host, self.w.opts.port, self.w.opts.keepalive)
            else:
                self.client.reconnect()
            return True
        except OSError:
            self.w.stats["connect_failed"] += 1
            self.retry_at = time.monotonic() + self.w.rng.uniform(0.5, 2.0)
            return False

    def reported(self) -> ReportedState:
        return ReportedState(node_id=self.node_id, agent_version=AGENT_VERSION,
                             desired_revision=self.revision, apps=self.apps)

    def telemetry(self) -> bytes:
        apps = {a.name: AppTelemetry(version=a.version) for a in self.apps}
        return Telemetry(node_id=self.node_id, interval_s=self.w.opts.heartbeat_s,
                         apps=apps).to_bytes()

    def publish(self, idx: int, payload: bytes, qos: int, retain: bool) -> int:
        info = self.client.publish(self._t[idx], payload, qos=qos, retain=retain)
        self.w.stats["published"] += 1
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            self.w.stats["publish_failed"] += 1
        return info.mid


def _on_connect(client: Any, node: SimNode, flags: Any, rc: Any, props: Any) -> None:
    w = node.w
    w.connecting.discard(node)
    if rc.is_failure:
        w.stats["connect_refused"] += 1
        return
    w.stats["connacks"] += 1
    node.attempts = 0
    node.pending = set()
    rc_, mid = client.subscribe([(node._t[2], 1), (node._t[3], 1)])
    node.pending.add(mid)
    node.pending.add(node.publish(0, Availability(status="online", agent_version=AGENT_VERSION)
                                  .to_bytes(), 1, True))
    node.pending.add(node.publish(1, node.reported().to_bytes(), 1, True))


def _ack(node: SimNode, mid: int) -> None:
    if node.pending and mid in node.pending:
        node.pending.discard(mid)
        if not node.pending and not node.ready_at:
            node.ready_at = time.monotonic()
            node.w.ready += 1
            node.w.last_ready = node.ready_at
    if mid == node.applied_mid:
        now = time.monotonic()
        for tag in node.applied_tags:
            node.w.applied.setdefault(tag, []).append(now)
        node.applied_mid = -1


def _on_subscribe(client: Any, node: SimNode, mid: int, rcs: Any, props: Any) -> None:
    if any(getattr(r, "is_failure", False) for r in rcs or []):
        node.w.stats["subscribe_refused"] += 1
    _ack(node, mid)


def _on_publish(client: Any, node: SimNode, mid: int, rc: Any, props: Any) -> None:
    _ack(node, mid)


def _on_message(client: Any, node: SimNode, msg: mqtt.MQTTMessage) -> None:
    w = node.w
    w.stats["received"] += 1
    if msg.topic != node._t[2]:
        return  # ack: nothing to do (we send no events)
    try:
        ds = parse(DesiredState, msg.payload)
    except MessageRejected:
        w.stats["rejected"] += 1
        return
    if ds.node_id != node.node_id or (ds.epoch == node.epoch and ds.revision <= node.revision):
        w.stats["desired_ignored"] += 1
        return
    w.stats["desired"] += 1
    node.epoch, node.revision = ds.epoch, ds.revision
    # a real node fetches, verifies and loads here; the simulator says it is done
    node.apps = [AppReport(name=a.name, version=a.version, sha256=a.sha256, status="ready")
                 for a in ds.apps]
    node.applied_tags = tuple(f"{a.name}@{a.version}" for a in ds.apps)
    node.applied_mid = node.publish(1, node.reported().to_bytes(), 1, True)


def _on_disconnect(client: Any, node: SimNode, flags: Any, rc: Any, props: Any) -> None:
    w = node.w
    w.connecting.discard(node)
    if w.stopping:
        return
    w.stats["disconnected"] += 1
    if node.ready_at:
        node.ready_at = 0.0
        w.ready -= 1
    node.retry_at = time.monotonic() + w.rng.uniform(0.2, 2.0)
    w.retry.append(node)


class Worker:
    """One process's share of the fleet: a selector loop over its clients."""

    def __init__(self, node_ids: list[str], opts: SimOptions, pipe: Any) -> None:
        self.opts, self.pipe = opts, pipe
        self.topics = Topics(prefix=opts.prefix)
        self.rng = random.Random(opts.seed)
        self.sel = selectors.DefaultSelector()
        self.stats: dict[str, int] = _Counter()
        self.ready = 0
        self.last_ready = 0.0
        self.applied: dict[str, list[float]] = {}
        self.connecting: set[SimNode] = set()
        self.retry: list[SimNode] = []
        self.stopping = False
        self.nodes = [SimNode(n, self) for n in node_ids]
        self.sel.register(pipe.fileno(), selectors.EVENT_READ, None)

    # paho's socket callbacks
    def sock_open(self, client: Any, node: SimNode, sock: Any) -> None:
        self.sel.register(sock, selectors.EVENT_READ, node)

    def sock_close(self, client: Any, node: SimNode, sock: Any) -> None:
        try:
            self.sel.unregister(sock)
        except (KeyError, ValueError):
            pass

    def sock_want_write(self, client: Any, node: SimNode, sock: Any) -> None:
        try:
            self.sel.modify(sock, selectors.EVENT_READ | selectors.EVENT_WRITE, node)
        except (KeyError, ValueError):
            pass

    def sock_no_write(self, client: Any, node: SimNode, sock: Any) -> None:
        try:
            self.sel.modify(sock, selectors.EVENT_READ, node)
        except (KeyError, ValueError):
            pass

    def run(self) -> None:
        """Wait for "go", connect the nodes (paced), serve until "stop"."""
        self.pipe.send(("loaded", len(self.nodes)))
        todo = list(reversed(self.nodes))
        started = False
        heap: list[tuple[float, int]] = []
        next_misc = time.monotonic() + 1.0
        misc_i = 0
        while True:
            now = time.monotonic()
            timeout = 0.05
            for key, mask in self.sel.select(timeout):
                node = key.data
                if node is None:
                    if self._command():
                        return
                    if not started and self._go:
                        started = True
                        hb = self.opts.heartbeat_s
                        # spread over one interval, as a fleet's clocks are
                        heap = [(time.monotonic() + hb * self.rng.random(), i)
                                for i in range(len(self.nodes))]
                        heapq.heapify(heap)
                    continue
                c = node.client
                if mask & selectors.EVENT_READ:
                    c.loop_read()
                if mask & selectors.EVENT_WRITE and c.socket() is not None:
                    c.loop_write()
            if not started:
                continue
            now = time.monotonic()
            # connect, at most `connecting` outstanding
            while todo and len(self.connecting) < self.opts.connecting:
                node = todo.pop()
                if node.connect():
                    self.connecting.add(node)
                else:
                    self.retry.append(node)
            if self.retry:
                due = [n for n in self.retry if n.retry_at <= now]
                if due:
                    self.retry = [n for n in self.retry if n.retry_at > now]
                    for node in due:
                        if len(self.connecting) >= self.opts.connecting:
                            self.retry.append(node)
                            continue
                        self.stats["reconnects"] += 1
                        if node.connect():
                            self.connecting.add(node)
                        else:
                            self.retry.append(node)
            # a CONNACK that never came: drop and retry (bounded by keepalive)
            for node in [n for n in self.connecting if now - n.connecting_since > 10]:
                self.stats["connect_timeout"] += 1
                self.connecting.discard(node)
                node.client._sock_close()  # noqa: SLF001 - paho has no public abort
                node.retry_at = now + self.rng.uniform(0.2, 2.0)
                self.retry.append(node)
            # keepalives: loop_misc for a slice of the nodes each pass
            if now >= next_misc:
                n = len(self.nodes)
                for _ in range(min(n, max(1, n // 10))):
                    self.nodes[misc_i % n].client.loop_misc()
                    misc_i += 1
                next_misc = now + 0.1
            # telemetry, bounded per pass
            for _ in range(200):
                if not heap or heap[0][0] > now:
                    break
                _, i = heapq.heappop(heap)
                node = self.nodes[i]
                if node.ready_at:
                    node.publish(4, node.telemetry(), 0, False)
                    self.stats["telemetry"] += 1
                heapq.heappush(heap, (now + self.opts.heartbeat_s, i))

    _go = False

    def _command(self) -> bool:
        """Answer the parent; True on "stop"."""
        if not self.pipe.poll():
            return False
        try:
            cmd, arg = self.pipe.recv()
        except (EOFError, OSError):  # the bench is gone: so are we
            self.stopping = True
            return True
        if cmd == "go":
            self._go = True
        elif cmd == "status":
            tag, since = arg
            times = [t for t in self.applied.get(tag, []) if t >= since] if tag else []
            self.pipe.send({"ready": self.ready, "last_ready": self.last_ready,
                            "nodes": len(self.nodes), "applied": len(times),
                            "last_applied": max(times) if times else 0.0,
                            "stats": dict(self.stats), "cpu": cpu_seconds(os.getpid())})
        elif cmd == "stop":
            self.stopping = True
            for node in self.nodes:
                try:
                    node.client.disconnect()  # clean: the broker drops the will
                    if node.client.socket() is not None:
                        node.client.loop_write()
                except Exception:  # noqa: BLE001 - best effort on the way out
                    pass
            self.pipe.send({"stats": dict(self.stats), "cpu": cpu_seconds(os.getpid())})
            return True
        return False


class _Counter(dict):
    def __missing__(self, key: str) -> int:
        return 0


def _worker_main(node_ids: list[str], opts: SimOptions, pipe: Any) -> None:
    raise_nofile()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops us
    Worker(node_ids, opts, pipe).run()


class SimFleet:
    """``n`` simulated nodes split over ``procs`` worker processes."""

    def __init__(self, n: int, procs: int, opts: SimOptions, id_prefix: str = "sim") -> None:
        self.n = n
        self.node_ids = [f"{id_prefix}-{i:05d}" for i in range(n)]
        ctx = mp.get_context("spawn")
        self.procs: list[Any] = []
        self.pipes: list[Any] = []
        procs = max(1, min(procs, n))
        for k in range(procs):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=_worker_main, daemon=True, name=f"fleet-sim-{k}",
                            args=(self.node_ids[k::procs],
                                  SimOptions(**{**opts.__dict__, "seed": opts.seed + k}), child))
            p.start()
            self.procs.append(p)
            self.pipes.append(parent)
        for pipe in self.pipes:
            if not pipe.poll(60):
                raise RuntimeError("a simulator process did not start within 60 s")
            pipe.recv()
        self.t_go = 0.0
        self.cpu0 = 0.0

    def go(self) -> float:
        self.cpu0 = sum(cpu_seconds(p.pid) for p in self.procs)
        self.t_go = time.monotonic()
        for pipe in self.pipes:
            pipe.send(("go", None))
        return self.t_go

    def status(self, tag: str | None = None, since: float = 0.0) -> dict[str, Any]:
        """Totals of the workers; ``applied``: nodes that reported running ``tag``
        (``app@version``) since ``since`` (monotonic)."""
        outs = []
        for pipe in self.pipes:
            pipe.send(("status", (tag, since)))
        for pipe in self.pipes:
            if not pipe.poll(30):
                raise RuntimeError("a simulator process stopped answering")
            outs.append(pipe.recv())
        stats: dict[str, int] = {}
        for o in outs:
            for k, v in o["stats"].items():
                stats[k] = stats.get(k, 0) + v
        return {"ready": sum(o["ready"] for o in outs),
                "last_ready": max(o["last_ready"] for o in outs),
                "applied": sum(o["applied"] for o in outs),
                "last_applied": max(o["last_applied"] for o in outs),
                "stats": stats, "cpu": sum(o["cpu"] for o in outs)}

    def wait_ready(self, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            st = self.status()
            if st["ready"] >= self.n or time.monotonic() > deadline:
                return st
            time.sleep(0.05)

    def wait_applied(self, tag: str, since: float, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            st = self.status(tag, since)
            if st["applied"] >= self.n or time.monotonic() > deadline:
                return st
            time.sleep(0.05)

    def stop(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for pipe in self.pipes:
            try:
                pipe.send(("stop", None))
            except OSError:
                pass
        for pipe in self.pipes:
            try:
                if pipe.poll(10):
                    o = pipe.recv()
                    for k, v in o["stats"].items():
                        out[k] = out.get(k, 0) + v
            except (OSError, EOFError):
                pass
        for p in self.procs:
            p.join(5)
            if p.is_alive():
                p.kill()
                p.join(5)
        return out

    def __enter__(self) -> "SimFleet":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# -- the AppStore ------------------------------------------------------------------
class AppStoreProc:
    """``python -m appstore store serve`` in its own process, SQLite in ``data``."""

    def __init__(self, work: Path, mqtt_port: int, name: str = "store") -> None:
        self.data = work / name  # a fresh database: no node of an earlier size in it
        self.http_port = free_port()
        self.url = f"http://127.0.0.1:{self.http_port}"
        log = open(work / f"{name}.log", "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "appstore", "store", "serve", "--data-dir", str(self.data),
             "--mqtt-port", str(mqtt_port), "--http-port", str(self.http_port)],
            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, preexec_fn=_child_setup)
        log.close()
        self.pid = self.proc.pid
        deadline = time.monotonic() + 60
        while True:
            try:
                if self.get("/health").get("mqtt_connected"):
                    break
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the AppStore did not come up (see {work}/{name}.log)")
            time.sleep(0.1)
        # the admin's API token, written at the first start (before the API listens)
        self.token = (self.data / "admin.token").read_text().strip()

    def request(self, method: str, path: str, body: bytes | None = None,
                ctype: str = "application/json", conn: http.client.HTTPConnection | None = None,
                ) -> tuple[int, Any]:
        own = conn is None
        c = conn or http.client.HTTPConnection("127.0.0.1", self.http_port, timeout=60)
        try:
            headers = {"Authorization": f"Bearer {self.token}"} \
                if getattr(self, "token", None) else {}
            if body is not None:
                headers["Content-Type"] = ctype
            c.request(method, "/api/v1" + path, body=body, headers=headers)
            r = c.getresponse()
            data = r.read()
            return r.status, json.loads(data or b"null")
        finally:
            if own:
                c.close()

    def get(self, path: str) -> Any:
        status, body = self.request("GET", path)
        if status != 200:
            raise RuntimeError(f"GET {path}: {status} {body}")
        return body

    def cpu(self) -> float:
        return cpu_seconds(self.pid)

    def stop(self) -> None:
        stop_proc(self.proc, 15)


def publish_version(store: AppStoreProc, sample: Path, version: str, work: Path) -> dict:
    """Sign the digits sample as ``version`` with the store's key and upload it."""
    from appstore.publish import build_package
    from appstore.signing import SigningKey

    key = SigningKey.load(store.data / "keys" / "publisher.pem")
    manifest = json.loads((sample / "manifest.json").read_text())
    manifest.update(name=APP, version=version)
    out = work / f"{APP}-{version}.aidc"
    build_package(sample / "model.onnx", manifest, sample / "labels.txt", key, out)
    status, body = store.request("POST", "/packages", out.read_bytes(), "application/zip")
    if status not in (200, 201):
        raise RuntimeError(f"publishing {APP} {version}: {status} {body}")
    return body


# -- the rollout ----------------------------------------------------------------------
@dataclass
class RolloutCalls:
    t_first: float  # monotonic, start of the first call
    t_last: float  # monotonic, end of the last call
    latencies_ms: list[float] = field(default_factory=list)
    errors: int = 0
    #: the AppStore's id of a batch rollout (GET /api/v1/rollouts/<ref>), or None
    ref: str | None = None


def rollout_per_node(store: AppStoreProc, node_ids: list[str], app: str, version: str,
                     concurrency: int = 1) -> RolloutCalls:
    """Today's API: ``PUT /api/v1/nodes/<id>/apps/<app>`` for every node, over
    ``concurrency`` keep-alive connections, as an operator's script would."""
    body = json.dumps({"version": version}).encode()
    lat: list[float] = []
    errors = [0]
    lock = threading.Lock()
    chunks = [node_ids[k::concurrency] for k in range(concurrency)]

    def run(ids: list[str]) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", store.http_port, timeout=60)
        try:
            for nid in ids:
                t = time.monotonic()
                try:
                    status, _ = store.request("PUT", f"/nodes/{nid}/apps/{app}", body,
                                              conn=conn)
                except (OSError, http.client.HTTPException):
                    conn.close()
                    conn = http.client.HTTPConnection("127.0.0.1", store.http_port, timeout=60)
                    status = 0
                ms = 1000 * (time.monotonic() - t)
                with lock:
                    lat.append(ms)
                    if status != 200:
                        errors[0] += 1
        finally:
            conn.close()

    t_first = time.monotonic()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(run, chunks))
    return RolloutCalls(t_first, time.monotonic(), lat, errors[0])


def rollout_batch(store: AppStoreProc, node_ids: list[str], app: str, version: str,
                  concurrency: int = 1) -> RolloutCalls:
    """The rollout API: one ``POST /api/v1/rollouts`` naming every node, in one
    wave (no canary), no bake time: the engine assigns the version to each node
    itself and the rollout succeeds when all report it ready."""
    body = json.dumps({"app": app, "version": version, "target": {"nodes": node_ids},
                       "waves": {"canary": 0, "steps": [100]},
                       "gate": {"bake_s": 0, "ready_timeout_s": 600},
                       "by": "fleet_sim"}).encode()
    t0 = time.monotonic()
    status, resp = store.request("POST", "/rollouts", body)
    t1 = time.monotonic()
    ok = status in (200, 201) and isinstance(resp, dict)
    return RolloutCalls(t0, t1, [1000 * (t1 - t0)], 0 if ok else 1,
                        resp.get("rollout_id") if ok else None)


#: name -> fn(store, node_ids, app, version, concurrency) -> RolloutCalls.
ROLLOUT_APIS: dict[str, Callable[..., RolloutCalls]] = {"per-node": rollout_per_node,
                                                        "rollouts": rollout_batch}


def rollout(store: AppStoreProc, node_ids: list[str], app: str, version: str,
            api: str = "per-node", concurrency: int = 1) -> RolloutCalls:
    """Ask the AppStore to put ``app`` ``version`` on every node; return the call times."""
    return ROLLOUT_APIS[api](store, node_ids, app, version, concurrency)


def store_has_version(store: AppStoreProc, app: str, version: str) -> int:
    """How many nodes the AppStore's registry shows running ``app`` ``version``."""
    n = 0
    for node in store.get("/nodes")["nodes"]:
        for a in (node.get("reported") or {}).get("apps", []):
            if a["name"] == app and a["version"] == version and a["status"] == "ready":
                n += 1
    return n


# -- one fleet size --------------------------------------------------------------------
def _pct(xs: list[float], q: float) -> float:
    if not xs:
        return 0.0
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def run_reference(n: int, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """The same nodes on the same broker, no AppStore: connect time, broker CPU."""
    broker = Broker(work).start()
    opts = SimOptions("127.0.0.1", broker.port, f"ref{n}", heartbeat_s=args.heartbeat,
                      connecting=args.connecting)
    fleet = SimFleet(n, args.procs, opts, "ref")
    try:
        b0 = cpu_seconds(broker.proc.pid)
        t0 = fleet.go()
        st = fleet.wait_ready(args.connect_timeout)
        t_ready = (st["last_ready"] - t0) if st["ready"] >= n else None
        return {"ready": st["ready"], "connect_s": t_ready,
                "broker_cpu_s": cpu_seconds(broker.proc.pid) - b0,
                "broker_rss_mb": peak_rss_mb(broker.proc.pid),
                "sim_cpu_s": st["cpu"] - fleet.cpu0, "stats": st["stats"]}
    finally:
        fleet.stop()
        broker.stop()


def run_size(n: int, args: argparse.Namespace, sample: Path, work: Path) -> dict[str, Any]:
    """Broker + AppStore + ``n`` nodes: connect, register, rollouts, idle."""
    res: dict[str, Any] = {"nodes": n, "load_before": loadavg()}
    if args.reference:
        res["reference"] = run_reference(n, args, work)
    broker = Broker(work).start()
    store = fleet = mon = None
    try:
        mon = SysMonitor(broker.port)
        store = AppStoreProc(work, broker.port, f"store-{n}-{int(time.time())}")
        apis = [a for a in args.rollout_api.split(",") if a]
        plan = [(f"1.0.{k}", api) for k, api in
                enumerate(api for _ in range(args.rollouts) for api in apis)]
        versions = [v for v, _ in plan]
        for v in versions:
            publish_version(store, sample, v, work)
        opts = SimOptions("127.0.0.1", broker.port, "", heartbeat_s=args.heartbeat,
                          connecting=args.connecting, seed=n)
        fleet = SimFleet(n, args.procs, opts)
        bpid = broker.proc.pid
        s0, b0 = store.cpu(), cpu_seconds(bpid)
        t0 = fleet.go()
        # connected (node side) and registered (the AppStore counts them online)
        deadline = t0 + args.connect_timeout
        t_conn = t_reg = None
        st: dict[str, Any] = {}
        while time.monotonic() < deadline and (t_conn is None or t_reg is None):
            if t_conn is None:
                st = fleet.status()
                if st["ready"] >= n:
                    t_conn = st["last_ready"] - t0
            if t_reg is None:
                c = store.get("/stats")["counts"]
                if c["online"] >= n:
                    t_reg = time.monotonic() - t0
            time.sleep(0.1)
        t1 = time.monotonic()
        res["connect"] = {
            "ready": st.get("ready", 0), "connect_s": t_conn, "registered_s": t_reg,
            "store_cpu_s": store.cpu() - s0, "broker_cpu_s": cpu_seconds(bpid) - b0,
            **mon.rates(t0, t1)}
        if t_conn is None or t_reg is None:
            res["error"] = f"not all {n} nodes connected/registered in {args.connect_timeout} s"
            return res
        time.sleep(1.0)  # let the reported states settle before the rollouts
        res["rollouts"] = []
        for v, api in plan:
            tag = f"{APP}@{v}"
            s0, b0, f0 = store.cpu(), cpu_seconds(bpid), fleet.status()["cpu"]
            calls = rollout(store, fleet.node_ids, APP, v, api, args.assign_concurrency)
            stv = fleet.wait_applied(tag, calls.t_first, args.rollout_timeout)
            t_nodes = stv["last_applied"] if stv["applied"] >= n else None
            t_store, seen = None, 0
            if t_nodes is not None:  # now the operator's view: the registry
                end = time.monotonic() + args.rollout_timeout
                while time.monotonic() < end:
                    seen = store_has_version(store, APP, v)
                    if seen >= n:
                        t_store = time.monotonic()
                        break
                    time.sleep(0.2)
            t_engine, engine_state = None, None
            if calls.ref and t_store is not None:  # the rollout engine's own verdict
                end = time.monotonic() + args.rollout_timeout
                while time.monotonic() < end:
                    engine_state = store.get(f"/rollouts/{calls.ref}?nodes=0")["state"]
                    if engine_state in ("succeeded", "failed", "aborted"):
                        t_engine = time.monotonic()
                        break
                    time.sleep(0.2)
            t_end = time.monotonic()
            lat = calls.latencies_ms
            r = {
                "version": v, "api": api, "applied": stv["applied"], "store_seen": seen,
                "engine_state": engine_state,
                "engine_s": (t_engine - calls.t_first) if t_engine else None,
                "calls": len(lat), "errors": calls.errors,
                "calls_s": calls.t_last - calls.t_first,
                "assign_p50_ms": statistics.median(lat) if lat else 0.0,
                "assign_p99_ms": _pct(lat, 0.99),
                "nodes_s": (t_nodes - calls.t_first) if t_nodes else None,
                "nodes_after_last_call_s": (t_nodes - calls.t_last) if t_nodes else None,
                "store_s": (t_store - calls.t_first) if t_store else None,
                "store_after_last_call_s": (t_store - calls.t_last) if t_store else None,
                "store_cpu_s": store.cpu() - s0, "broker_cpu_s": cpu_seconds(bpid) - b0,
                "sim_cpu_s": fleet.status()["cpu"] - f0,
                **mon.rates(calls.t_first, t_end)}
            res["rollouts"].append(r)
            if t_store is None or (calls.ref and engine_state != "succeeded"):
                res["error"] = f"rollout {v} ({api}) did not reach all {n} nodes " \
                               f"(engine: {engine_state})"
                break
        # idle with telemetry flowing
        if args.idle > 0:
            s0, b0, f0 = store.cpu(), cpu_seconds(bpid), fleet.status()["cpu"]
            ti = time.monotonic()
            time.sleep(args.idle)
            tj = time.monotonic()
            res["idle"] = {"window_s": tj - ti,
                           "store_cpu_pct": 100 * (store.cpu() - s0) / (tj - ti),
                           "broker_cpu_pct": 100 * (cpu_seconds(bpid) - b0) / (tj - ti),
                           "sim_cpu_pct": 100 * (fleet.status()["cpu"] - f0) / (tj - ti),
                           **mon.rates(ti, tj)}
        res["store_rss_peak_mb"] = peak_rss_mb(store.pid)
        res["broker_rss_peak_mb"] = peak_rss_mb(bpid)
        res["store_stats"] = store.get("/stats")
        res["sim_stats"] = fleet.status()["stats"]
        res["load_after"] = loadavg()
        return res
    finally:
        if fleet is not None:
            fleet.stop()
        if store is not None:
            store.stop()
        if mon is not None:
            mon.stop()
        broker.stop()


# -- where one assign's time goes ------------------------------------------------------
def profile_assign(n: int, work: Path, sample: Path, top: int = 25) -> str:
    """``n`` assigns through the REST handler under cProfile, in process.

    A real broker and a real :class:`AppStoreService` (SQLite in ``work``), the
    calls made with Flask's test client on this thread (so cProfile sees the
    handler, the registry, SQLite and the publish; not the HTTP server's socket
    work, which is the measured latency less this). Returns a text report.
    """
    import cProfile
    import io
    import pstats

    from appstore.config import load_config
    from appstore.publish import build_package
    from appstore.service import AppStoreService

    broker = Broker(work).start()
    cfg = load_config(data_dir=str(work / "profile-store"), mqtt_port=broker.port, http_port=0)
    svc = AppStoreService(cfg).start()
    try:
        if not svc.wait_connected(10):
            raise RuntimeError("the in-process AppStore did not connect")
        manifest = json.loads((sample / "manifest.json").read_text())
        manifest.update(name=APP, version="1.0.0")
        pkg = work / "profile.aidc"
        build_package(sample / "model.onnx", manifest, sample / "labels.txt", svc.key, pkg)
        svc.catalog.add_package_file(pkg)
        client = svc.app.test_client()
        client.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {svc.admin_token}"
        body = json.dumps({"version": "1.0.0"})
        for i in range(min(50, n)):  # warm up (imports, first connections)
            client.put(f"/api/v1/nodes/warm-{i}/apps/{APP}", data=body,
                       content_type="application/json")
        prof = cProfile.Profile()
        c0, t0 = time.process_time(), time.perf_counter()
        prof.enable()
        for i in range(n):
            r = client.put(f"/api/v1/nodes/prof-{i:05d}/apps/{APP}", data=body,
                           content_type="application/json")
            assert r.status_code == 200, r.data
        prof.disable()
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        s = io.StringIO()
        st = pstats.Stats(prof, stream=s)
        st.sort_stats("cumulative").print_stats(top)
        st.sort_stats("tottime").print_stats(top)
        return (f"{n} assigns in process (under cProfile, which inflates Python time): "
                f"{1000 * wall / n:.2f} ms wall, {1000 * cpu / n:.2f} ms CPU (process) each\n"
                + s.getvalue())
    finally:
        svc.stop()
        broker.stop()


# -- report --------------------------------------------------------------------------
def _f(x: float | None, nd: int = 2) -> str:
    return "—" if x is None else f"{x:.{nd}f}"


def machine_line() -> str:
    mem = 0
    try:
        mem = int(Path("/proc/meminfo").read_text().split()[1]) // (1 << 20)
    except (OSError, ValueError, IndexError):
        pass
    cpu = ""
    try:
        cpu = next(ln.split(":", 1)[1].strip() for ln in
                   Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    mosq = subprocess.run(["mosquitto", "-h"], capture_output=True, text=True).stdout.split(
        "\n")[0].replace("mosquitto version ", "")
    return (f"{cpu} ({platform.machine()}), {os.cpu_count()} cores, {mem} GB, "
            f"{platform.system()} {platform.release()}, Python {platform.python_version()}, "
            f"paho-mqtt {importlib.metadata.version('paho-mqtt')}, "
            f"Mosquitto {mosq}")


def tables(results: list[dict[str, Any]], args: argparse.Namespace) -> str:
    out = []
    out.append("| nodes | connect, broker alone (ref) | connect, with AppStore | registered "
               "by AppStore | rollout (API) | calls | all nodes run it | AppStore sees all "
               "| after last call | call p50 / p99 ms |")
    out.append("|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        ref = r.get("reference", {})
        c = r.get("connect", {})
        for i, ro in enumerate(r.get("rollouts") or [{}]):
            first = i == 0
            out.append("| " + " | ".join([
                f"{r['nodes']}" if first else "",
                (_f(ref.get("connect_s")) + " s") if first and ref else "",
                (_f(c.get("connect_s")) + " s") if first else "",
                (_f(c.get("registered_s")) + " s") if first else "",
                f"{ro.get('version', '')} ({ro.get('api', '')})" if ro else "",
                f"{_f(ro.get('calls_s'))} s" if ro else "",
                f"**{_f(ro.get('nodes_s'))} s**" if ro else "",
                (f"{_f(ro.get('store_s'))} s" + (f" (engine: succeeded at "
                                                 f"{_f(ro.get('engine_s'))} s)"
                                                 if ro.get("engine_s") else ""))
                if ro else "",
                f"{_f(ro.get('store_after_last_call_s'))} s" if ro else "",
                f"{_f(ro.get('assign_p50_ms'), 1)} / {_f(ro.get('assign_p99_ms'), 1)}"
                if ro else ""]) + " |")
    out.append("")
    out.append("| nodes | phase | AppStore CPU | broker CPU | simulator CPU | broker msgs/s "
               "(mean / peak 1 s) |")
    out.append("|---|---|---|---|---|---|")
    for r in results:
        ref = r.get("reference")
        if ref:
            out.append(f"| {r['nodes']} | connect, broker alone | — | "
                       f"{_f(ref['broker_cpu_s'])} s | {_f(ref['sim_cpu_s'])} s | — |")
        c = r.get("connect")
        if c:
            out.append(f"| {r['nodes']} | connect + register | {_f(c['store_cpu_s'])} s | "
                       f"{_f(c['broker_cpu_s'])} s | — | {c['msgs_per_s']:.0f} / "
                       f"{c['msgs_peak_per_s']:.0f} |")
        for ro in r.get("rollouts", []):
            out.append(f"| {r['nodes']} | rollout {ro['version']} ({ro['api']}) | "
                       f"{_f(ro['store_cpu_s'])} s | "
                       f"{_f(ro['broker_cpu_s'])} s | {_f(ro['sim_cpu_s'])} s | "
                       f"{ro['msgs_per_s']:.0f} / {ro['msgs_peak_per_s']:.0f} |")
        idle = r.get("idle")
        if idle:
            out.append(f"| {r['nodes']} | idle {idle['window_s']:.0f} s, telemetry every "
                       f"{args.heartbeat:g} s | {idle['store_cpu_pct']:.1f} % | "
                       f"{idle['broker_cpu_pct']:.1f} % | {idle['sim_cpu_pct']:.1f} % | "
                       f"{idle['msgs_per_s']:.0f} / {idle['msgs_peak_per_s']:.0f} |")
    out.append("")
    out.append("| nodes | AppStore peak RSS | broker peak RSS | load avg before -> after | "
               "sim disconnects / reconnects |")
    out.append("|---|---|---|---|---|")
    for r in results:
        ss = r.get("sim_stats", {})
        out.append(f"| {r['nodes']} | {_f(r.get('store_rss_peak_mb'), 1)} MB | "
                   f"{_f(r.get('broker_rss_peak_mb'), 1)} MB | {r['load_before']} -> "
                   f"{r.get('load_after', '?')} | {ss.get('disconnected', 0)} / "
                   f"{ss.get('reconnects', 0)} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="100,500,1000,2000", help="fleet sizes, comma separated")
    ap.add_argument("--procs", type=int, default=2, help="simulator processes")
    ap.add_argument("--rollouts", type=int, default=2,
                    help="rollouts per size and API (versions 1.0.0, 1.0.1, ...)")
    ap.add_argument("--rollout-api", default="per-node",
                    help=f"comma separated, alternated: {', '.join(ROLLOUT_APIS)}")
    ap.add_argument("--assign-concurrency", type=int, default=1,
                    help="keep-alive connections the operator's script assigns over")
    ap.add_argument("--heartbeat", type=float, default=60.0,
                    help="telemetry interval, s (60: the edge agent's)")
    ap.add_argument("--connecting", type=int, default=100,
                    help="CONNACKs outstanding per simulator process at most")
    ap.add_argument("--idle", type=float, default=10.0, help="idle window, s (0: none)")
    ap.add_argument("--connect-timeout", type=float, default=120.0)
    ap.add_argument("--rollout-timeout", type=float, default=180.0)
    ap.add_argument("--no-reference", dest="reference", action="store_false",
                    help="skip the broker-alone connect reference")
    ap.add_argument("--out", type=Path, default=OUT, help="where fleet-<stamp>.md/.json go")
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--note", default="", help="a line for the report (e.g. which commit)")
    ap.add_argument("--profile-assign", type=int, default=0, metavar="N",
                    help="instead: profile N assigns through the REST handler in process")
    args = ap.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    bad = set(args.rollout_api.split(",")) - set(ROLLOUT_APIS)
    if bad:
        raise SystemExit(f"unknown --rollout-api {sorted(bad)}: {', '.join(ROLLOUT_APIS)}")
    nofile = raise_nofile()
    need = max(sizes) + 200
    if nofile < need:
        raise SystemExit(f"RLIMIT_NOFILE hard limit {nofile} < {need}: raise it (ulimit -Hn)")
    work = Path(tempfile.mkdtemp(prefix="aidc-fleet-"))
    say = (lambda *a: None) if args.quiet else (lambda *a: print(*a, flush=True))
    results: list[dict[str, Any]] = []
    try:
        from appstore.samples.digits import build_digits_sample

        sample = build_digits_sample(work / "sample")
        if args.profile_assign:
            print(profile_assign(args.profile_assign, work, sample))
            return []
        for n in sizes:
            say(f"-- {n} nodes (load {loadavg()})")
            t = time.monotonic()
            r = run_size(n, args, sample, work)
            r["wall_s"] = time.monotonic() - t
            results.append(r)
            say(json.dumps({k: r.get(k) for k in ("nodes", "reference", "connect", "rollouts",
                                                   "idle", "error")}, default=str))
            if r.get("error"):
                say(f"stopping: {r['error']}")
                break
    finally:
        shutil.rmtree(work, ignore_errors=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    head = (f"# Fleet scale (bench/fleet_sim.py), {time.strftime('%Y-%m-%d %H:%M')}\n\n"
            f"Machine: {machine_line()}; load average {loadavg()} at the end\n\n"
            f"{args.note + chr(10) + chr(10) if args.note else ''}Args: {vars(args)}\n\n")
    md = head + tables(results, args) + "\n"
    say("")
    say(md)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"fleet-{stamp}.md").write_text(md)
    (args.out / f"fleet-{stamp}.json").write_text(json.dumps(
        {"machine": machine_line(), "args": {k: str(v) for k, v in vars(args).items()},
         "results": results}, indent=1, default=str))
    say(f"wrote {args.out}/fleet-{stamp}.md and .json")
    return results


if __name__ == "__main__":
    # SIGTERM cleans up as Ctrl-C does (the finally blocks stop every process)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    main()
