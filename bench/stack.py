"""A whole site on one box for the fault benches (bench/faults.py, bench/chaos.py).

Real parts only: Mosquitto on a free loopback port; the AppStore
(:class:`appstore.service.AppStoreService`, SQLite in a temp dir) with the digits
app built from real data and published in two versions; one edge agent as its
own process (``aidc edge run``) reaching the broker through a
:class:`tests.faultproxy.FaultProxy` (so a link can be held half-open), and
:class:`ServiceManager`, which plays systemd for it exactly as
``installer/systemd/aidc-edge.service`` says: ``Type=notify`` (``$NOTIFY_SOCKET``),
``WatchdogSec`` (no ``WATCHDOG=1`` for that long: SIGABRT, then SIGKILL),
``Restart=always`` after ``RestartSec``. systemd cannot run here (no init); this
is the seam, and it reads its figures from the unit file.

:class:`Probe` asks the node for one inference every ``every`` seconds and keeps
the timeline (time, ok, model version) the benches read downtime from.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from installer.ports import free_port  # noqa: E402
from tests.faultproxy import FaultProxy  # noqa: E402

logger = logging.getLogger("bench.stack")
UNIT = ROOT / "installer" / "systemd" / "aidc-edge.service"
NODE_ID = "site-1"


def unit_seconds(key: str, default: float) -> float:
    m = re.search(rf"^{key}=(\d+(?:\.\d+)?)s?\s*$", UNIT.read_text(), re.M)
    return float(m.group(1)) if m else default


def http(method: str, url: str, body: bytes | dict | None = None, token: str | None = None,
         timeout: float = 10.0, ctype: str = "application/json") -> tuple[int, dict]:
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    headers = {"Content-Type": ctype}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as err:
        try:
            return err.code, json.loads(err.read() or b"{}")
        except ValueError:
            return err.code, {}
    except (OSError, ValueError) as err:
        return 0, {"error": str(err)}


def wait(pred, timeout: float, what: str, every: float = 0.1):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        v = pred()
        if v:
            return v
        time.sleep(every)
    raise TimeoutError(f"{what}: not within {timeout:g} s")


class ServiceManager:
    """systemd's part for one ``Type=notify`` service with a watchdog (see module doc)."""

    def __init__(self, cmd: list[str], workdir: Path, env: dict[str, str] | None = None,
                 log: Path | None = None) -> None:
        self.cmd, self.workdir = cmd, workdir
        self.env = {**os.environ, **(env or {})}
        self.watchdog_s = unit_seconds("WatchdogSec", 20.0)
        self.restart_s = unit_seconds("RestartSec", 2.0)
        self.log = open(log or workdir / "agent.log", "ab")
        self.sock_path = workdir / "notify.sock"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(self.sock_path))
        self.sock.settimeout(0.1)
        self.proc: subprocess.Popen | None = None
        self.ready_at: float | None = None
        self.last_ping = 0.0
        self.history: list[tuple[float, str]] = []  # (monotonic, what)
        self.starts = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()

    def note(self, what: str) -> None:
        self.history.append((time.monotonic(), what))
        logger.info("service: %s", what)

    def start(self) -> ServiceManager:
        self._spawn()
        threading.Thread(target=self._run, name="service-manager", daemon=True).start()
        return self

    def _spawn(self) -> None:
        env = {**self.env, "NOTIFY_SOCKET": str(self.sock_path),
               "WATCHDOG_USEC": str(int(self.watchdog_s * 1e6))}
        with self._lock:
            self.proc = subprocess.Popen(self.cmd, cwd=self.workdir, env=env, stdout=self.log,
                                         stderr=subprocess.STDOUT)
            self.ready_at, self.last_ping = None, time.monotonic()
            self.starts += 1
        self.note(f"started pid {self.proc.pid}")

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                msg = self.sock.recv(4096).decode()
                now = time.monotonic()
                for line in msg.splitlines():
                    if line == "READY=1":
                        self.ready_at = now
                        self.last_ping = now
                        self.note("READY=1")
                    elif line == "WATCHDOG=1":
                        self.last_ping = now
                    elif line.startswith("STATUS=unhealthy"):
                        self.note(line)
            except TimeoutError:
                pass
            except OSError:
                return
            proc = self.proc
            if proc is None or self._stop.is_set():
                continue
            rc = proc.poll()
            if rc is None and self.ready_at is not None and \
                    time.monotonic() - self.last_ping > self.watchdog_s:
                self.note(f"watchdog timeout ({self.watchdog_s:g} s without WATCHDOG=1): "
                          "SIGABRT")
                proc.send_signal(signal.SIGABRT)
                proc.send_signal(signal.SIGCONT)  # a stopped process must run to die
                try:
                    proc.wait(5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)
                rc = proc.returncode
            if rc is not None:
                self.note(f"exited {rc}; restart in {self.restart_s:g} s")
                if self._stop.wait(self.restart_s):
                    return
                self._spawn()

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc and self.proc.poll() is None else None

    def stop(self) -> None:
        self._stop.set()
        p = self.proc
        if p and p.poll() is None:
            p.send_signal(signal.SIGCONT)
            p.terminate()
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
        self.sock.close()


class Background:
    """A loop on a thread of its own: ``start()`` runs ``_run`` (which watches
    ``self._stop``), ``stop()`` ends it and waits for it."""

    name = "background"

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self):
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 15.0) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout)

    def _run(self) -> None:
        raise NotImplementedError


class Probe(Background):
    """One inference every ``every`` s; the timeline of (t, ok, model_version)."""

    name = "probe"

    def __init__(self, url: str, x, every: float = 0.1) -> None:
        super().__init__()
        self.url = url
        self.body = {"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                                 "data": x.reshape(-1).tolist()}]}
        self.every = every
        self.timeline: list[tuple[float, bool, str | None]] = []

    def _run(self) -> None:
        while not self._stop.is_set():
            t = time.monotonic()
            status, out = http("POST", f"{self.url}/v2/models/digits/infer", self.body,
                               timeout=2.0)
            self.timeline.append((t, status == 200, out.get("model_version")))
            self._stop.wait(max(0.0, self.every - (time.monotonic() - t)))

    def serving_since(self, t0: float, version: str | None = None) -> float | None:
        """When the node answered again after ``t0`` (with ``version``), having
        failed in between or not; None if not yet."""
        for t, ok, v in self.timeline:
            if t >= t0 and ok and (version is None or v == version):
                return t
        return None

    def first_failure(self, t0: float) -> float | None:
        for t, ok, _ in self.timeline:
            if t >= t0 and not ok:
                return t
        return None

    def ok_now(self, version: str | None = None) -> bool:
        if not self.timeline:
            return False
        _, ok, v = self.timeline[-1]
        return ok and (version is None or v == version)


class Stack:
    """Broker, AppStore, the digits app in two versions, one edge agent (a process
    under :class:`ServiceManager`), a probe (one inference every ``probe_every`` s).
    ``node_over``: node config additions; ``stream``: a camera stream (below)."""

    def __init__(self, workdir: Path | None = None, node_over: dict | None = None,
                 stream: dict | None = None, probe_every: float = 0.1,
                 disk_mb: int | None = None) -> None:
        """``stream``: a camera stream of the digits app in the node config, read
        from a looping video file of held-out digits made here (:func:`digits_video`);
        its keys (``fps``, ``frames``, ...) override the stream's defaults."""
        self.dir = Path(workdir or tempfile.mkdtemp(prefix="aidc-faults-"))
        self.dir.mkdir(parents=True, exist_ok=True)
        self.node_over = node_over or {}
        self.stream = stream
        self.probe_every = probe_every
        #: the node's data dir on a tmpfs of this size (a real full disk; root only)
        self.disk_mb = disk_mb
        self.mounted: Path | None = None

    # -- bring up ----------------------------------------------------------------
    def up(self) -> Stack:
        from appstore.config import load_config
        from appstore.publish import build_package
        from appstore.samples.digits import build_digits_sample
        from appstore.service import AppStoreService
        from appstore.signing import SigningKey
        from installer.demo import start_broker

        import numpy as np

        self.mqtt_port = free_port()
        self.broker, _ = start_broker("mosquitto", self.mqtt_port, self.dir)
        self.proxy = FaultProxy(self.mqtt_port).start()
        self.store = AppStoreService(load_config(
            data_dir=str(self.dir / "cloud"), mqtt_port=self.mqtt_port, http_port=0)).start()
        self.token = self.store.admin_token
        self.api = f"{self.store.url}/api/v1"
        key = SigningKey.load_or_create(self.store.cfg.signing_key_path)
        sample = build_digits_sample(self.dir / "sample")
        self.x = np.load(sample / "heldout.npz")["X_test"][:1]
        self.held = np.load(sample / "heldout.npz")
        manifest = json.loads((sample / "manifest.json").read_text())
        self.sha = {}
        for version in ("1.0.0", "1.1.0"):
            pkg = self.dir / f"digits-{version}.aidc"
            self.sha[version], _ = build_package(sample / "model.onnx",
                                                 {**manifest, "version": version},
                                                 sample / "labels.txt", key, pkg)
            status, out = http("POST", f"{self.api}/packages", pkg.read_bytes(), self.token,
                               ctype="application/octet-stream", timeout=60)
            assert status in (200, 201, 409), (status, out)
        edge = self.dir / "edge"
        if self.disk_mb:
            edge.mkdir(parents=True, exist_ok=True)
            subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={int(self.disk_mb)}m",
                            "aidc-bench", str(edge)], check=True, capture_output=True)
            self.mounted = edge
        (edge / "trusted_keys").mkdir(parents=True, exist_ok=True)
        (edge / "trusted_keys" / "store.pub").write_bytes(key.public_pem())
        self.edge_port = free_port()
        self.config = self.dir / "node.json"
        cfg = {"node_id": NODE_ID, "data_dir": str(edge),
               "mqtt": {"host": "127.0.0.1", "port": self.proxy.port},
               "http": {"host": "127.0.0.1", "port": self.edge_port},
               "telemetry_interval_s": 5}
        for k, v in self.node_over.items():
            cfg[k] = {**cfg[k], **v} if isinstance(v, dict) and isinstance(cfg.get(k), dict) \
                else v
        if self.stream is not None:
            st = {"id": "cam-1", "app": "digits", "fps": 5, "loop": True, **self.stream}
            # the file plays at the stream's rate: no frame is skipped by decimation
            video = digits_video(sample, self.dir / "camera.avi",
                                 frames=int(st.pop("frames", 40)),
                                 video_fps=float(st.pop("video_fps", st["fps"])))
            cfg.setdefault("streams", []).append({"url": str(video), **st})
        self.config.write_text(json.dumps(cfg, indent=1))
        self.edge = f"http://127.0.0.1:{self.edge_port}"
        self.service = ServiceManager(
            [sys.executable, "-m", "installer.cli", "edge", "run", "--config",
             str(self.config)], self.dir,
            env={"PYTHONPATH": str(ROOT), "AIDC_LOG_LEVEL": "INFO"}).start()
        wait(lambda: self.service.ready_at, 90, "the agent's READY=1")
        self.assign("1.0.0")
        wait(lambda: http("GET", f"{self.edge}/v2/models/digits/ready")[0] == 200, 120,
             "the node to serve digits")
        self.sample_dir = sample
        self.probe = Probe(self.edge, self.x, self.probe_every).start()
        return self

    def down(self) -> None:
        for part in ("probe", "service", "store", "proxy"):
            obj = getattr(self, part, None)
            if obj is not None:
                try:
                    obj.stop()
                except Exception:  # noqa: BLE001 - tear down the rest anyway
                    logger.exception("stopping %s", part)
        b = getattr(self, "broker", None)
        if b is not None:
            b.terminate()
            b.wait(10)
        if self.mounted is not None:
            subprocess.run(["umount", "-l", str(self.mounted)], capture_output=True)

    # -- helpers -----------------------------------------------------------------
    def assign(self, version: str) -> None:
        status, out = http("PUT", f"{self.api}/nodes/{NODE_ID}/apps/digits",
                           {"version": version}, self.token)
        assert status == 200, (status, out)

    def node_status(self) -> dict:
        return http("GET", f"{self.edge}/api/v1/status", timeout=5)[1]

    def worker_pid(self, version: str = "1.0.0") -> int | None:
        for key, w in (self.node_status().get("workers") or {}).items():
            if key.endswith(self.sha[version][:12]) and w.get("state") == "ready":
                return w.get("pid")
        return None

    @property
    def node_db(self) -> Path:
        """The node's SQLite database (its results, samples and outbox)."""
        return self.dir / "edge" / "node.db"

    @property
    def cloud_db(self) -> Path:
        """The AppStore's SQLite database (feedback and events from the fleet)."""
        return Path(self.store.store.path)

    def faults(self) -> dict:
        return http("GET", f"{self.edge}/api/faults", timeout=5)[1]

    def restart_broker(self, down_s: float) -> float:
        """Stop Mosquitto for ``down_s`` and start it again; when it is back."""
        from installer.demo import start_broker

        self.broker.terminate()
        self.broker.wait(10)
        time.sleep(down_s)
        self.broker, _ = start_broker("mosquitto", self.mqtt_port, self.dir)
        return time.monotonic()


def doubtful_digits(sample_dir: Path, n: int, seed: int = 0, below: float = 0.5) -> list:
    """``n`` blends of two different held-out digits (8x8, 0..16) the app's model is
    unsure of (top-1 score below ``below``, under the app's 0.6 threshold: each is a
    hard example), found by running the model here."""
    import numpy as np

    from edge_node.streams.adapters import LocalClassifier
    from tests.streams_support import digit_frame

    clf = LocalClassifier({"digits": Path(sample_dir)})
    rng = np.random.default_rng(seed)
    with np.load(Path(sample_dir) / "heldout.npz") as z:
        X, y = z["X_test"], z["y_test"]
    out = []
    for _ in range(100 * n):
        i, j = rng.integers(len(X), size=2)
        x = (X[i] + X[j]) / 2
        if y[i] != y[j] and clf("digits", digit_frame(x))["score"] < below:
            out.append(x)
            if len(out) == n:
                return out
    raise RuntimeError(f"only {len(out)} doubtful blends of {n}")


def digits_video(sample_dir: Path, path: Path, frames: int = 40, video_fps: float = 10,
                 seed: int = 0) -> Path:
    """A camera's view of held-out digits (an MJPG file, 32x32 frames): clear digits
    and doubtful blends of two (:func:`doubtful_digits`: hard examples) in turn, so
    the label changes often and every other frame is a hard example."""
    import numpy as np

    from tests.streams_support import digit_frame, write_video

    rng = np.random.default_rng(seed)
    with np.load(Path(sample_dir) / "heldout.npz") as z:
        X = z["X_test"]
    blends = doubtful_digits(sample_dir, (frames + 1) // 2, seed)
    out = [digit_frame(blends[k // 2] if k % 2 else X[rng.integers(len(X))])
           for k in range(frames)]
    return write_video(path, out, video_fps)
