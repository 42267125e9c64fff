"""Scale-out on real parts: two AppStore worker processes share one fleet.

Two ``aidc store serve`` processes on one data dir (one SQLite database, one
publisher key), each on its own HTTP port, on one real Mosquitto; the nodes are
light MQTT clients with the real durable outbox (:class:`cloud_sync.outbox.Outbox`,
as the edge agent uses it) and a twin that reports whatever it is told to run.
The workers split the nodes' feedback, events and telemetry through the
``$share/appstore/...`` subscriptions and one of them moves rollouts (the
lease). One worker is killed with SIGKILL in the middle of a stream of feedback
and in the middle of a rollout: nothing is lost or stored twice, and the other
worker finishes the rollout once the lease lapses.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pytest

from appstore.rollouts import LEASE_S
from appstore.signing import SigningKey
from cloud_sync.connection import MqttConnection
from cloud_sync.outbox import Outbox
from cloud_sync.schemas import (
    AppReport,
    AppTelemetry,
    Availability,
    DesiredState,
    EventMessage,
    FeedbackMessage,
    FeedbackSample,
    Prediction,
    ReportedState,
    Telemetry,
    parse,
)
from cloud_sync.topics import Topics
from tests.appstore_support import digits_dir, digits_package, wait_until  # noqa: F401
from tests.brokers import free_port

# the test takes about 40 s; the mark kills a hang
pytestmark = pytest.mark.timeout(90)
API = "/api/v1"
AIDC = str(Path(sys.executable).parent / "aidc")
PNG = base64.b64decode(  # a real 1x1 gray PNG
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAAAAAA6fptVAAAACklEQVR4nGNgAAAAAgABSK+kcQAAAABJRU5ErkJggg==")
N_NODES = 8
ROUNDS = 60  # per node: a feedback sample every round, an event every other round
KILL_AT = 25  # the round after which one worker is killed


class Worker:
    """One ``aidc store serve`` process."""

    def __init__(self, name: str, data_dir: Path, broker: Any, prefix: str,
                 logs: Path) -> None:
        self.name, self.data_dir = name, data_dir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = logs / f"worker-{name}.log"
        log = open(self.log_path, "wb")  # noqa: SIM115 - the child keeps it
        self.proc = subprocess.Popen(
            [AIDC, "store", "serve", "--data-dir", str(data_dir), "--mqtt-host", broker.host,
             "--mqtt-port", str(broker.port), "--http-port", str(self.port),
             "--topic-prefix", prefix],
            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        log.close()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    # -- REST -------------------------------------------------------------------------
    def _headers(self) -> dict[str, str]:
        """The operator's token once the AppStore writes one (``admin.token``)."""
        h = {"Content-Type": "application/json"}
        tok = self.data_dir / "admin.token"
        if tok.exists():
            h["Authorization"] = f"Bearer {tok.read_text().strip()}"
        return h

    def call(self, method: str, path: str, body: Any = None,
             raw: bytes | None = None) -> tuple[int, Any]:
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None
                                            else None)
        headers = self._headers()
        if raw is not None:
            headers["Content-Type"] = "application/octet-stream"
        req = urllib.request.Request(self.url + API + path, data=data, method=method,
                                     headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=20) as r:
                return r.status, json.loads(r.read() or b"null")
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read() or b"null")

    def get(self, path: str) -> Any:
        status, body = self.call("GET", path)
        assert status == 200, (self.name, path, status, body)
        return body

    def up(self) -> bool:
        assert self.proc.poll() is None, f"worker {self.name} exited:\n{self.log()[-3000:]}"
        try:
            return self.get("/stats")["mqtt"].get("connects", 0) >= 1
        except (OSError, AssertionError):
            return False

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class SimNode:
    """A node as the cloud sees it: availability, a twin that reports ready at
    whatever its desired state names, telemetry, and feedback and events through
    the real durable outbox (resent until the AppStore acks them)."""

    def __init__(self, broker: Any, prefix: str, node_id: str, tmp: Path) -> None:
        self.node_id = node_id
        self.topics = Topics(prefix=prefix)
        self.conn = MqttConnection(f"sim-{node_id}-{uuid.uuid4().hex[:4]}", broker.host,
                                   broker.port)
        self.outbox = Outbox(tmp / f"{node_id}.db", self.conn, self.topics.ack(node_id),
                             min_retry=1.0, max_retry=2.0, seed=1)
        self.revision = -1
        self.revisions: list[int] = []
        self._lock = threading.Lock()
        self.feedback_ids: list[str] = []
        self.event_ids: list[str] = []
        self.conn.subscribe(self.topics.desired(node_id), self._on_desired)

    def start(self) -> "SimNode":
        self.outbox.start()
        self.conn.start()
        assert self.conn.wait_connected(10)
        self.conn.publish(self.topics.availability(self.node_id),
                          Availability(status="online", agent_version="sim").to_bytes(),
                          qos=1, retain=True)
        self._report([], 0)
        return self

    def stop(self) -> None:
        self.outbox.close()
        self.conn.stop()

    def _report(self, apps: list[AppReport], revision: int) -> None:
        rs = ReportedState(node_id=self.node_id, agent_version="sim",
                           desired_revision=revision, apps=apps)
        self.conn.publish(self.topics.reported(self.node_id), rs.to_bytes(), qos=1,
                          retain=True)

    def _on_desired(self, topic: str, payload: bytes, retained: bool) -> None:
        ds = parse(DesiredState, payload)
        with self._lock:
            self.revisions.append(ds.revision)
            if ds.revision < self.revision:
                return  # what a real node does (edge_node/reconciler.py)
            self.revision = ds.revision
        self._report([AppReport(name=a.name, version=a.version, sha256=a.sha256,
                                status="ready") for a in ds.apps], ds.revision)

    def telemetry(self) -> None:
        tm = Telemetry(node_id=self.node_id, interval_s=1.0,
                       apps={"digits": AppTelemetry(version="0.0.1")})
        self.conn.publish(self.topics.telemetry(self.node_id), tm.to_bytes(), qos=1)

    def send_feedback(self, i: int) -> None:
        msg = FeedbackMessage(msg_id=uuid.uuid4().hex, sample=FeedbackSample(
            sample_id=f"{self.node_id}-{i:06d}", app="digits", version="1.0.0",
            created_at=time.time(),
            reason="confidence<0.6", input_type="image/png",
            input_b64=base64.b64encode(PNG).decode(),
            prediction=Prediction(label="3", index=3, score=0.41), scores=[0.1] * 10))
        assert self.outbox.put(self.topics.feedback(self.node_id), msg.to_bytes(), msg.msg_id)
        self.feedback_ids.append(msg.msg_id)

    def send_event(self, i: int) -> None:
        msg = EventMessage(msg_id=uuid.uuid4().hex, type="sim_tick", data={"i": i})
        assert self.outbox.put(self.topics.events(self.node_id), msg.to_bytes(), msg.msg_id,
                               kind="event")
        self.event_ids.append(msg.msg_id)


def lease_owner(db_path: Path) -> str | None:
    """The rollout lease's owner (``host-pid-random``), read as an operator would."""
    with sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=10) as db:
        row = db.execute("select value from store_meta where key = 'rollout_lease'").fetchone()
    return json.loads(row[0])["owner"] if row else None


def stored_ids(worker: Worker, kind: str, node_id: str) -> list[str]:
    return [r["msg_id"] for r in worker.get(f"/{kind}?node={node_id}&limit=1000")[kind]]


def test_two_workers_split_one_fleet_and_survive_a_kill(
        broker: Any, prefix: str, tmp_path: Path, digits_dir: Path) -> None:  # noqa: F811
    """Two workers started at once on a fresh data dir; a fleet of 8 nodes; a
    rollout; one worker (the lease holder) killed -9 mid-stream and mid-rollout."""
    data = tmp_path / "store"
    # started together on an empty data dir: they must agree on one database
    # (schema) and one publisher key
    workers = [Worker(n, data, broker, prefix, tmp_path) for n in ("a", "b")]
    nodes: list[SimNode] = []
    try:
        for w in workers:
            wait_until(w.up, timeout=20, interval=0.1)
        on_disk = SigningKey.load(data / "keys" / "publisher.pem").key_id
        for w in workers:  # each signs with the key on disk (nodes trust that one)
            assert on_disk in w.get("/keys")["keys"], (w.name, on_disk, w.get("/keys"))
            assert len(w.get("/keys")["keys"]) == 1
        nodes = [SimNode(broker, prefix, f"sim-{i}", tmp_path).start() for i in range(N_NODES)]
        for n in nodes:
            n.telemetry()

        # any worker's REST API sees the whole fleet (availability and twins are
        # plain subscriptions: every worker gets them)
        for w in workers:
            wait_until(lambda w=w: sum(1 for x in w.get("/nodes")["nodes"]
                                       if x["online"] and x["node_id"].startswith("sim-"))
                       == N_NODES, timeout=10)
        wait_until(lambda: len(workers[0].get("/telemetry")["telemetry"]) == N_NODES,
                   timeout=10)

        # a package published through one worker, a rollout started through the other
        sha, _ = digits_package(digits_dir, SigningKey.load(data / "keys" / "publisher.pem"),
                                tmp_path / "d.zip")
        status, body = workers[0].call("POST", "/packages", raw=(tmp_path / "d.zip").read_bytes())
        assert status == 201, body
        owner = wait_until(lambda: lease_owner(data / "appstore.db"), timeout=10)
        leader = next(w for w in workers if f"-{w.proc.pid}-" in owner)
        survivor = next(w for w in workers if w is not leader)
        status, ro = survivor.call("POST", "/rollouts", {
            "app": "digits", "version": "1.0.0", "target": {"all": True},
            "waves": {"canary": 1, "steps": [50, 100]},
            "gate": {"ready_timeout_s": 60, "bake_s": 2.0}, "by": "test"})
        assert status == 201, ro
        rid = ro["rollout_id"]

        # a stream of feedback and events from every node; the lease holder is
        # killed in the middle of it
        before_kill: dict[str, dict] = {}
        for i in range(ROUNDS):
            for n in nodes:
                n.send_feedback(i)
                if i % 2 == 0:
                    n.send_event(i)
            if i == KILL_AT:
                wait_until(lambda: all(w.get("/stats")["ingest"].get("feedback_stored", 0)
                                       for w in workers), timeout=10)
                before_kill = {w.name: w.get("/stats")["ingest"] for w in workers}
                state = survivor.get(f"/rollouts/{rid}")["state"]
                assert state in ("waiting", "baking"), state
                # frozen first, so that the broker hands it messages it will never
                # ack (a worker dying with a batch in hand), then killed
                leader.proc.send_signal(signal.SIGSTOP)
            if i == KILL_AT + 5:
                leader.kill()
                killed_at = time.monotonic()
            time.sleep(0.05)

        # both took part before the kill
        for name, st in before_kill.items():
            assert st.get("feedback_stored", 0) > 0, (name, before_kill)

        # every node's outbox drains: all acked by the survivor (resent where the
        # killed worker took a message and died before acking it)
        wait_until(lambda: all(n.outbox.pending() == 0 for n in nodes), timeout=30,
                   interval=0.2)
        for n in nodes:
            fb = stored_ids(survivor, "feedback", n.node_id)
            ev = stored_ids(survivor, "events", n.node_id)
            assert len(fb) == len(set(fb)) == ROUNDS, (n.node_id, len(fb), len(set(fb)))
            assert set(fb) == set(n.feedback_ids)
            assert set(n.event_ids) <= set(ev) and len(ev) == len(set(ev))
            assert n.outbox.stats().get("rejected", 0) == 0
        # the killed worker did take messages it never acked: the outboxes resent them
        assert sum(n.outbox.stats().get("resent", 0) for n in nodes) > 0
        with sqlite3.connect(f"file:{data / 'appstore.db'}?mode=ro", uri=True) as db:
            dup = db.execute("select count(*) - count(distinct msg_id) from feedback").fetchone()
            assert dup == (0,)
            n_fb = db.execute("select count(*) from feedback where node_id like 'sim-%'"
                              ).fetchone()[0]
        assert n_fb == N_NODES * ROUNDS

        # the rollout started before the kill completes: the survivor takes the
        # lease once it lapsed and moves it on
        ro = wait_until(lambda: (r := survivor.get(f"/rollouts/{rid}"))["state"]
                        not in ("waiting", "baking") and r, timeout=LEASE_S + 30, interval=0.2)
        assert ro["state"] == "succeeded", ro
        assert f"-{survivor.proc.pid}-" in (lease_owner(data / "appstore.db") or "")
        assert time.monotonic() - killed_at < LEASE_S + 30
        assert "took the lease" in survivor.log()
        for n in nodes:
            rep = survivor.get(f"/nodes/{n.node_id}")["reported"]
            assert [(a["name"], a["version"], a["status"]) for a in rep["apps"]] == [
                ("digits", "1.0.0", "ready")], n.node_id
        # one desired state per change: the revisions a node saw never go back
        for n in nodes:
            assert n.revisions == sorted(n.revisions), (n.node_id, n.revisions)
        # the periodic jobs moved with the lease: a node that joins a subscription
        # now gets its channel's version from the survivor's reconcile
        status, body = survivor.call("PUT", "/apps/digits/channels/stable",
                                     {"version": "1.0.0", "by": "test"})
        assert status == 200, body
        status, body = survivor.call("POST", "/subscriptions", {
            "app": "digits", "channel": "stable", "target": {"all": True}, "by": "test"})
        assert status in (200, 201), body
        late = SimNode(broker, prefix, "sim-late", tmp_path).start()
        nodes.append(late)

        def late_runs_it() -> bool:
            status, row = survivor.call("GET", f"/nodes/{late.node_id}")
            apps = ((row.get("reported") or {}).get("apps", []) if status == 200 else [])
            return [(a["name"], a["status"]) for a in apps] == [("digits", "ready")]
        wait_until(late_runs_it, timeout=15, interval=0.2)
        assert "database is locked" not in survivor.log()
        assert "Traceback" not in survivor.log(), survivor.log()[-3000:]
    finally:
        for n in nodes:
            n.stop()
        for w in workers:
            w.stop()


class _RecordingConn:
    """Stands in for the broker connection: records what is published (retained
    desired states) and lets the test act between two publishes."""

    def __init__(self, between: Any) -> None:
        self.connected = threading.Event()
        self.connected.set()
        self.published: list[tuple[str, bytes]] = []
        self.between = between

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> bool:
        self.published.append((topic, payload))
        self.between()
        return True


def test_a_republish_never_leaves_an_older_desired_state_retained(tmp_path: Path) -> None:
    """A worker republishing every desired state (at a reconnect) reads them,
    then publishes them one by one; meanwhile another worker (the lease holder,
    a rollout) changes a node and publishes its new state. The republishing
    worker must not leave its older copy as the broker's retained message, or a
    node offline now comes back to the old version."""
    from appstore.db import Store
    from appstore.fleet import Fleet
    from appstore.registry import Registry

    store = Store(tmp_path / "appstore.db")
    with store.write() as db:
        for v in ("1.0.0", "2.0.0"):
            db["app_versions"].insert({"name": "digits", "version": v, "sha256": v[0] * 64,
                                       "size": 1, "manifest": "{}", "published_at": 1.0})
    reg = Registry(store)
    for n in ("n1", "n2", "n3"):
        reg.assign(n, "digits", "1.0.0")
    other_worker = Registry(store)
    moved = []

    def between() -> None:
        if not moved:  # once, right after our first (older) copy went out
            moved.append(other_worker.assign("n1", "digits", "2.0.0"))

    class Catalog:
        def get_version(self, app: str, version: str) -> None:
            pass

    topics = Topics(prefix="p")
    conn = _RecordingConn(between)
    fleet = Fleet(conn, topics, store, reg, Catalog(), feedback=None)  # type: ignore[arg-type]

    def retained(node_id: str) -> tuple[int, list[tuple[str, str]]]:
        """What the broker keeps for the node: the last message published."""
        last = [parse(DesiredState, p) for t, p in conn.published
                if t == topics.desired(node_id)][-1]
        return last.revision, [(a.name, a.version) for a in last.apps]

    assert fleet.republish_all() == 3
    assert retained("n1") == (moved[0], [("digits", "2.0.0")])
    assert fleet.snapshot().get("desired_republished_moved") == 1
    # the same for an operator's change on this worker while the other worker's
    # rollout moves the node (committed and published in between)
    conn.between = lambda: moved.append(other_worker.unassign("n3", "digits")) \
        if len(moved) == 1 else None
    fleet.assign("n3", "digits", "2.0.0")
    assert retained("n3") == (moved[1], [])
    assert fleet.snapshot().get("desired_republished_moved") == 2
    store.close()


def test_two_workers_send_a_due_command_once(tmp_path: Path) -> None:
    """Both workers' command threads look for due commands; the one that claims a
    command (in a transaction) sends it, the other skips it, even when it looks
    while the first is sending."""
    from appstore.blobstore import ContentStore
    from appstore.commands import Commands
    from appstore.db import Store
    from appstore.registry import Registry

    store = Store(tmp_path / "appstore.db")
    with store.write() as db:
        db.execute("insert into nodes (node_id, online, desired_revision) values ('n1', 1, 0)")
    topics = Topics(prefix="p")
    conn_a = _RecordingConn(lambda: b._send_due())  # b looks while a is sending
    conn_b = _RecordingConn(lambda: None)
    a = Commands(store, Registry(store), conn_a, topics,  # type: ignore[arg-type]
                 ContentStore(tmp_path / "bundles"))
    b = Commands(store, Registry(store), conn_b, topics,  # type: ignore[arg-type]
                 ContentStore(tmp_path / "bundles"))
    row, created = a.create("n1", {"op": "selfcheck", "args": {}, "by": "t"})
    assert created
    a._send_due()
    b._send_due()
    sent = [t for c in (conn_a, conn_b) for t, _ in c.published]
    assert sent == [topics.commands("n1")], sent
    assert a.get(row["command_id"])["sends"] == 1
    store.close()
