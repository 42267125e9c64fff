"""The durable outbox against a real Mosquitto and real SQLite files.

A fake "cloud" consumer in this file plays the AppStore's side of the contract:
it accepts each message once (dedupes by msg_id) and publishes an Ack.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from pathlib import Path

import pytest

from cloud_sync import schemas
from cloud_sync.connection import MqttConnection
from cloud_sync.errors import OutboxFull
from cloud_sync.outbox import TABLE, Outbox
from cloud_sync.topics import Topics

NODE = "edge-1"
REPO = Path(__file__).resolve().parents[1]


def wait_for(pred, timeout: float = 10.0, every: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(every)
    return bool(pred())


def make_conn(broker, name: str) -> MqttConnection:
    conn = MqttConnection(f"{name}-{uuid.uuid4().hex[:8]}", broker.host, broker.port,
                          min_backoff=0.05, max_backoff=0.5)
    conn.start()
    assert conn.wait_connected(5), "no connection to the test broker"
    return conn


def event(i: int) -> tuple[str, bytes]:
    msg = schemas.EventMessage(msg_id=uuid.uuid4().hex, type="test", data={"i": i})
    return msg.msg_id, msg.to_bytes()


class FakeCloud:
    """Cloud consumer: accepts each msg_id once, acks (or rejects) every copy."""

    def __init__(self, broker, topics: Topics, *, acking: bool = True) -> None:
        self.topics = topics
        self.received: list[str] = []  # every copy, in arrival order
        self.accepted: list[str] = []  # first copies only: what the cloud stored
        self.reject: dict[str, str] = {}
        self.acking = threading.Event()
        if acking:
            self.acking.set()
        self._lock = threading.Lock()
        self.conn = MqttConnection(f"cloud-{uuid.uuid4().hex[:8]}", broker.host, broker.port,
                                   min_backoff=0.05, max_backoff=0.5)
        self.conn.subscribe(topics.all_nodes("events"), self._on_event)
        self.conn.start()
        assert self.conn.wait_connected(5)
        self.ready()

    def ready(self) -> None:
        """Round-trip a probe so the subscription is surely in place."""
        probe, payload = event(-1)
        self.conn.publish(self.topics.events("probe"), payload)
        assert wait_for(lambda: probe in self.received, 5)

    def _on_event(self, topic: str, payload: bytes, retained: bool) -> None:
        node_id, _kind = self.topics.parse(topic)
        msg = schemas.parse(schemas.EventMessage, payload)
        with self._lock:
            self.received.append(msg.msg_id)
            if msg.msg_id not in self.accepted:
                self.accepted.append(msg.msg_id)
        if not self.acking.is_set() or node_id == "probe":
            return
        reason = self.reject.get(msg.msg_id)
        item = schemas.AckItem(msg_id=msg.msg_id, ok=reason is None, reason=reason)
        self.conn.publish(self.topics.ack(node_id), schemas.Ack(acks=[item]).to_bytes())

    def copies(self, msg_id: str) -> int:
        with self._lock:
            return self.received.count(msg_id)

    def stop(self) -> None:
        self.conn.stop()


@pytest.fixture
def topics(prefix) -> Topics:
    return Topics(prefix=prefix)


def new_outbox(tmp_path, conn, topics, **kw) -> Outbox:
    kw.setdefault("min_retry", 0.3)
    kw.setdefault("max_retry", 1.0)
    return Outbox(tmp_path / "node.db", conn, topics.ack(NODE), seed=1, **kw)


def test_put_is_committed_and_idempotent(tmp_path, topics):
    """A fact is on disk the moment put() returns (power loss after that loses
    nothing), and a producer retrying the same msg_id stores it only once."""
    conn = MqttConnection("never-started")
    box = new_outbox(tmp_path, conn, topics)
    msg_id, payload = event(1)
    assert box.put(topics.events(NODE), payload, msg_id, kind="event") is True
    assert box.put(topics.events(NODE), payload, msg_id, kind="event") is False
    other = sqlite3.connect(tmp_path / "node.db")
    assert other.execute(f"SELECT msg_id, state FROM {TABLE}").fetchall() == [(msg_id, "pending")]
    assert other.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert box.status(msg_id) == "pending" and box.pending() == 1
    assert box.stats()["queued"] == 1 and box.stats()["duplicate_put"] == 1
    box.close()


def test_sends_in_order_and_marks_acked(tmp_path, shared_broker, topics):
    """The normal path: every message reaches the cloud once, in the order it was
    written, and only the cloud's Ack takes it off the pending list."""
    cloud = FakeCloud(shared_broker, topics)
    conn = make_conn(shared_broker, "edge")
    box = new_outbox(tmp_path, conn, topics)
    ids = []
    for i in range(30):
        msg_id, payload = event(i)
        box.put(topics.events(NODE), payload, msg_id, kind="event")
        ids.append(msg_id)
    box.start()
    assert wait_for(lambda: box.pending() == 0, 10), box.stats()
    assert [m for m in cloud.accepted if m in ids] == ids
    assert all(box.status(m) == "acked" for m in ids)
    assert box.stats()["sent"] == 30 and box.stats()["acked"] == 30
    box.close()
    conn.stop()
    cloud.stop()


def test_broker_restart_zero_loss_exactly_once(tmp_path, broker, topics):
    """The field's worst day: the broker dies with messages sent but unacked, and
    more are written while it is down. After it returns every message reaches
    the cloud and the cloud stores each exactly once (it dedupes by msg_id)."""
    cloud = FakeCloud(broker, topics, acking=False)
    conn = make_conn(broker, "edge")
    box = new_outbox(tmp_path, conn, topics, min_retry=1.0, max_retry=2.0)
    box.start()
    ids = []
    for i in range(40):
        msg_id, payload = event(i)
        box.put(topics.events(NODE), payload, msg_id, kind="event")
        ids.append(msg_id)
    assert wait_for(lambda: set(ids) <= set(cloud.accepted), 10)  # sent, never acked
    assert box.pending() == 40

    broker.stop()
    assert wait_for(lambda: not conn.connected.is_set(), 5)
    for i in range(40, 80):  # written while offline
        msg_id, payload = event(i)
        box.put(topics.events(NODE), payload, msg_id, kind="event")
        ids.append(msg_id)
    cloud.acking.set()
    broker.start()

    assert wait_for(lambda: box.pending() == 0, 12), box.stats()
    assert sorted(cloud.accepted[1:]) == sorted(ids)  # zero loss, each stored once
    assert all(cloud.copies(m) >= 2 for m in ids[:40])  # the unacked 40 came again
    stats = box.stats()
    assert stats["acked"] == 80 and stats["resent"] >= 40 and stats.get("rejected", 0) == 0
    box.close()
    conn.stop()
    cloud.stop()


def test_reconnect_resends_unacked_at_once(tmp_path, shared_broker, topics):
    """After the edge's connection drops (here: another client takes over its
    client id, as a network blip would) every unacked message is resent as soon
    as it is back, not after its backoff: min_retry is 30 s, so only the
    reconnect path can deliver them within this test's deadline."""
    cloud = FakeCloud(shared_broker, topics, acking=False)
    conn = make_conn(shared_broker, "edge")
    box = new_outbox(tmp_path, conn, topics, min_retry=30.0, max_retry=60.0)
    box.start()
    ids = []
    for i in range(10):
        msg_id, payload = event(i)
        box.put(topics.events(NODE), payload, msg_id, kind="event")
        ids.append(msg_id)
    assert wait_for(lambda: set(ids) <= set(cloud.accepted), 5)
    cloud.acking.set()

    intruder = MqttConnection(conn.client_id, shared_broker.host, shared_broker.port,
                              min_backoff=10, max_backoff=10)
    intruder.start()
    assert intruder.wait_connected(5)
    intruder.stop()
    assert wait_for(lambda: conn.stats["connects"] >= 2 and conn.connected.is_set(), 5)
    assert wait_for(lambda: box.pending() == 0, 5), box.stats()
    assert box.stats()["resent"] == 10 and sorted(cloud.accepted[1:]) == sorted(ids)
    box.close()
    conn.stop()
    cloud.stop()


KILLED_WRITER = textwrap.dedent("""
    import sys, time, uuid
    from cloud_sync import schemas
    from cloud_sync.connection import MqttConnection
    from cloud_sync.outbox import Outbox
    from cloud_sync.topics import Topics
    db, port, prefix, n = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    topics = Topics(prefix=prefix)
    conn = MqttConnection("doomed-" + uuid.uuid4().hex[:6], "127.0.0.1", port)
    conn.start()
    conn.wait_connected(5)
    box = Outbox(db, conn, topics.ack("edge-1"), min_retry=30.0, max_retry=60.0)
    box.start()
    for i in range(n):
        m = schemas.EventMessage(msg_id=uuid.uuid4().hex, type="test", data={"i": i})
        box.put(topics.events("edge-1"), m.to_bytes(), m.msg_id, kind="event")
    while box.stats().get("sent", 0) < n:
        time.sleep(0.01)
    sys.stdout.write("sent\\n")
    sys.stdout.flush()
    time.sleep(60)
""")


def test_process_kill_then_new_outbox_resends_unacked(tmp_path, shared_broker, topics):
    """A node killed (SIGKILL) with messages sent but unacked loses none of them:
    a new Outbox on the same database file resends them straight away and the
    cloud stores each exactly once."""
    cloud = FakeCloud(shared_broker, topics, acking=False)
    db = tmp_path / "node.db"
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED_WRITER, str(db), str(shared_broker.port), topics.prefix,
         "25"],
        stdout=subprocess.PIPE, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        assert proc.stdout.readline().strip() == b"sent"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(5)
    assert wait_for(lambda: len(cloud.accepted) >= 26, 5)  # 25 + the probe
    ids = list(cloud.accepted[1:])

    cloud.acking.set()
    conn = make_conn(shared_broker, "edge-reborn")
    box = Outbox(db, conn, topics.ack(NODE), min_retry=30.0, max_retry=60.0)
    assert box.pending() == 25
    box.start()
    assert wait_for(lambda: box.pending() == 0, 10), box.stats()
    assert box.stats()["resent"] == 25 and box.stats()["acked"] == 25
    assert sorted(cloud.accepted[1:]) == sorted(ids) and len(ids) == 25
    box.close()
    conn.stop()
    cloud.stop()


def test_rejected_ack_is_kept_and_not_resent(tmp_path, shared_broker, topics):
    """A message the cloud refuses for good (ok=False) must not be resent for
    ever: it is marked rejected, with its reason kept for the operator."""
    cloud = FakeCloud(shared_broker, topics)
    conn = make_conn(shared_broker, "edge")
    box = new_outbox(tmp_path, conn, topics, min_retry=0.1, max_retry=0.2)
    bad, payload = event(0)
    cloud.reject[bad] = "bad_schema"
    box.put(topics.events(NODE), payload, bad, kind="event")
    box.start()
    assert wait_for(lambda: box.status(bad) == "rejected", 5)
    time.sleep(0.6)  # several retry periods: a resend would show up now
    assert cloud.copies(bad) == 1
    stats = box.stats()
    assert stats["rejected"] == 1 and stats.get("resent", 0) == 0 and stats["pending"] == 0
    with sqlite3.connect(tmp_path / "node.db") as other:
        row = other.execute(f"SELECT reason FROM {TABLE} WHERE msg_id = ?", [bad]).fetchone()
    assert row == ("bad_schema",)
    box.close()
    conn.stop()
    cloud.stop()


def test_outbox_full_raises_and_never_drops(tmp_path, shared_broker, topics):
    """At its quota the outbox refuses loudly (OutboxFull) instead of dropping a
    message silently; once the cloud acks, there is room again."""
    conn = make_conn(shared_broker, "edge")
    box = new_outbox(tmp_path, conn, topics, max_rows=5)
    ids = []
    for i in range(5):
        msg_id, payload = event(i)
        assert box.put(topics.events(NODE), payload, msg_id, kind="event")
        ids.append(msg_id)
    extra, payload = event(5)
    with pytest.raises(OutboxFull) as err:
        box.put(topics.events(NODE), payload, extra, kind="event")
    assert err.value.pending == 5 and err.value.max_rows == 5
    assert box.put(topics.events(NODE), b"again", ids[0], kind="event") is False  # idempotent
    assert box.pending() == 5 and box.status(extra) is None and box.stats()["full"] == 1

    cloud = FakeCloud(shared_broker, topics)
    box.start()
    assert wait_for(lambda: box.pending() == 0, 10), box.stats()
    assert box.put(topics.events(NODE), payload, extra, kind="event") is True
    box.close()
    conn.stop()
    cloud.stop()


def test_in_flight_window_and_backoff_resends(tmp_path, shared_broker, topics):
    """With a silent cloud the outbox keeps at most max_in_flight messages out,
    resends them after their (jittered) backoff, and sends nothing newer until
    acks free the window -- a backlog can not flood the uplink."""
    cloud = FakeCloud(shared_broker, topics, acking=False)
    conn = make_conn(shared_broker, "edge")
    box = new_outbox(tmp_path, conn, topics, max_in_flight=5, min_retry=0.2, max_retry=0.4)
    ids = []
    for i in range(20):
        msg_id, payload = event(i)
        box.put(topics.events(NODE), payload, msg_id, kind="event")
        ids.append(msg_id)
    box.start()
    assert wait_for(lambda: all(cloud.copies(m) >= 3 for m in ids[:5]), 5), box.stats()
    assert set(cloud.accepted[1:]) == set(ids[:5])  # only the oldest five, again and again
    cloud.acking.set()
    assert wait_for(lambda: box.pending() == 0, 10), box.stats()
    assert cloud.accepted[1:] == ids
    box.close()
    conn.stop()
    cloud.stop()


def test_backoff_is_exponential_with_jitter(tmp_path, topics):
    """Retry delays double up to the cap and are jittered, so a fleet that lost
    the cloud does not retry in lockstep."""
    box = new_outbox(tmp_path, MqttConnection("unused"), topics, min_retry=2.0, max_retry=60.0)
    for attempt, full in [(1, 2.0), (2, 4.0), (3, 8.0), (10, 60.0)]:
        delays = [box._delay(attempt) for _ in range(200)]
        assert all(full / 2 <= d <= full for d in delays)
        assert max(delays) - min(delays) > full / 4  # really spread
    box.close()


def test_malformed_and_unknown_acks_are_counted(tmp_path, shared_broker, topics):
    """Garbage on the ack topic, or an ack for a message we never had, is counted
    and logged; the outbox carries on delivering."""
    cloud = FakeCloud(shared_broker, topics)
    conn = make_conn(shared_broker, "edge")
    box = new_outbox(tmp_path, conn, topics)
    box.start()
    cloud.conn.publish(topics.ack(NODE), b"not json at all")
    cloud.conn.publish(topics.ack(NODE), b'{"v": 1, "acks": []}')
    unknown = schemas.Ack(acks=[schemas.AckItem(msg_id="never-sent-0001")])
    cloud.conn.publish(topics.ack(NODE), unknown.to_bytes())
    assert wait_for(lambda: box.stats().get("ack_unknown") == 1
                    and box.stats().get("ack_malformed") == 2, 5), box.stats()
    assert box.stats()["ack_malformed_not_json"] == 1
    msg_id, payload = event(1)
    box.put(topics.events(NODE), payload, msg_id, kind="event")
    assert wait_for(lambda: box.status(msg_id) == "acked", 5)
    box.close()
    conn.stop()
    cloud.stop()


def test_acked_history_is_bounded(tmp_path, shared_broker, topics):
    """Acked rows are history, not a leak: only the newest keep_acked stay, and
    what was pruned is counted."""
    cloud = FakeCloud(shared_broker, topics)
    conn = make_conn(shared_broker, "edge")
    box = new_outbox(tmp_path, conn, topics, keep_acked=5)
    ids = []
    for i in range(20):
        msg_id, payload = event(i)
        box.put(topics.events(NODE), payload, msg_id, kind="event")
        ids.append(msg_id)
    box.start()
    assert wait_for(lambda: box.stats().get("acked") == 20, 10), box.stats()
    with sqlite3.connect(tmp_path / "node.db") as other:
        kept = [r[0] for r in other.execute(f"SELECT msg_id FROM {TABLE} ORDER BY seq")]
    assert kept == ids[-5:]
    assert box.stats()["pruned_acked"] == 15 and box.status(ids[0]) is None
    box.close()
    conn.stop()
    cloud.stop()


def test_shares_the_database_with_another_writer(tmp_path, topics):
    """The outbox lives in the edge node's own database file: a put() waits out
    another writer's transaction (busy_timeout) instead of failing, and other
    migration sets in the same file are left alone."""
    db = tmp_path / "node.db"
    other = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
    other.execute("CREATE TABLE samples (id INTEGER PRIMARY KEY, note TEXT)")
    box = new_outbox(tmp_path, MqttConnection("unused"), topics)
    other.execute("BEGIN IMMEDIATE")
    other.execute("INSERT INTO samples (note) VALUES ('held')")
    threading.Timer(0.5, lambda: other.execute("COMMIT")).start()
    t0 = time.monotonic()
    msg_id, payload = event(1)
    assert box.put(topics.events(NODE), payload, msg_id, kind="event")
    assert time.monotonic() - t0 >= 0.4  # it waited for the other writer
    assert box.status(msg_id) == "pending"
    assert other.execute("SELECT note FROM samples").fetchall() == [("held",)]
    again = Outbox(db, MqttConnection("unused2"), topics.ack(NODE))  # re-open: no re-migration
    assert again.pending() == 1
    again.close()
    box.close()
    other.close()
