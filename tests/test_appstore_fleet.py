"""The fleet over real MQTT: desired state out, twins, feedback and events in, acks."""

from __future__ import annotations

import base64
import hashlib
import json
import queue
import uuid
from pathlib import Path
from typing import Any

import pytest

from cloud_sync.connection import MqttConnection
from cloud_sync.package import read_package
from cloud_sync.schemas import (
    Ack,
    AppReport,
    Availability,
    DesiredState,
    EventMessage,
    FeedbackMessage,
    FeedbackSample,
    Prediction,
    ReportedState,
    parse,
)
from cloud_sync.topics import Topics
from tests.appstore_support import (  # noqa: F401 - fixtures
    FakeNode,
    digits_dir,
    digits_package,
    start_store,
    store,
    wait_until,
)

pytestmark = pytest.mark.timeout(60)
API = "/api/v1"
PNG = base64.b64decode(  # a real 1x1 gray PNG
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAAAAAA6fptVAAAACklEQVR4nGNgAAAAAgABSK+kcQAAAABJRU5ErkJggg==")


def publish_digits(svc: Any, digits: Path, tmp: Path) -> tuple[str, int]:
    sha, size = digits_package(digits, svc.key, tmp / "d.zip")
    r = svc.app.test_client().post(f"{API}/packages", data=(tmp / "d.zip").read_bytes())
    assert r.status_code == 201, r.json
    return sha, size


def retained_desired(broker: Any, prefix: str, node_id: str, timeout: float = 5.0) -> DesiredState:
    """Subscribe afresh, as a node that just booted would, and read the retained twin."""
    got: queue.Queue[tuple[bytes, bool]] = queue.Queue()
    conn = MqttConnection(f"probe-{uuid.uuid4().hex[:6]}", broker.host, broker.port)
    conn.subscribe(Topics(prefix=prefix).desired(node_id), lambda t, p, r: got.put((p, r)))
    conn.start()
    try:
        payload, retained = got.get(timeout=timeout)
    finally:
        conn.stop()
    assert retained
    return parse(DesiredState, payload)


def feedback(msg_id: str | None = None, **sample: Any) -> FeedbackMessage:
    s = dict(sample_id=uuid.uuid4().hex, app="digits", version="1.0.0", created_at=1.0,
             reason="confidence<0.6", input_type="image/png",
             input_b64=base64.b64encode(PNG).decode(),
             prediction=Prediction(label="3", index=3, score=0.41), scores=[0.1] * 10)
    s.update(sample)
    return FeedbackMessage(msg_id=msg_id or uuid.uuid4().hex, sample=FeedbackSample(**s))


def test_assign_publishes_retained_desired_state(store: Any, shared_broker: Any, prefix: str,
                                                 digits_dir: Path, tmp_path: Path) -> None:
    """Subscribing a site to an app reaches the box even if it boots later: the
    desired state is retained, names the exact package by sha256, and every
    change gets a higher revision."""
    sha, size = publish_digits(store, digits_dir, tmp_path)
    c = store.app.test_client()
    r = c.put(f"{API}/nodes/site-7/apps/digits", json={"version": "1.0.0"})
    assert r.status_code == 200, r.json
    ds = retained_desired(shared_broker, prefix, "site-7")
    assert ds.node_id == "site-7" and ds.revision == 1
    assert [(a.name, a.version, a.sha256, a.size) for a in ds.apps] == [
        ("digits", "1.0.0", sha, size)]
    c.put(f"{API}/nodes/site-7/apps/digits", json={"version": "1.0.0"})  # no change
    assert retained_desired(shared_broker, prefix, "site-7").revision == 1
    assert c.delete(f"{API}/nodes/site-7/apps/digits").status_code == 200
    ds = retained_desired(shared_broker, prefix, "site-7")
    assert (ds.revision, ds.apps) == (2, [])
    node = c.get(f"{API}/nodes/site-7").json
    assert node["desired"]["revision"] == 2 and node["online"] is False


def test_node_availability_and_reported_state_show_in_the_registry(
        store: Any, shared_broker: Any, prefix: str) -> None:
    """Operators see which boxes are up, what they run and where they serve,
    and a box that dies (last will) turns offline."""
    node = FakeNode(shared_broker, prefix).start()
    try:
        node.publish("availability", Availability(status="online", agent_version="0.3.1")
                     .to_bytes(), retain=True)
        rs = ReportedState(node_id=node.node_id, agent_version="0.3.1", desired_revision=1,
                           http_url="http://10.0.0.7:8000", apps=[AppReport(
                               name="digits", version="1.0.0", sha256="a" * 64, status="ready")])
        node.publish("state/reported", rs.to_bytes(), retain=True)
        c = store.app.test_client()

        def seen() -> Any:
            nodes = {n["node_id"]: n for n in c.get(f"{API}/nodes").json["nodes"]}
            n = nodes.get(node.node_id)
            return n if n and n["online"] and n["reported"] else None

        n = wait_until(seen)
        assert n["agent_version"] == "0.3.1" and n["http_url"] == "http://10.0.0.7:8000"
        assert n["reported"]["apps"][0]["status"] == "ready" and n["reported_revision"] == 1
        detail = c.get(f"{API}/nodes/{node.node_id}").json
        assert detail["reported"]["apps"][0]["name"] == "digits"
        node.publish("availability", Availability(status="offline").to_bytes(), retain=True)
        wait_until(lambda: not c.get(f"{API}/nodes/{node.node_id}").json["online"])
        # a twin for another node on this node's topic is refused and counted
        node.publish("state/reported", ReportedState(node_id="someone-else").to_bytes())
        wait_until(lambda: "node_mismatch" in c.get(f"{API}/stats").json["rejections"])
    finally:
        node.stop()


def test_feedback_is_stored_once_and_acked_every_time(store: Any, shared_broker: Any,
                                                      prefix: str) -> None:
    """A hard example sent by a site must land in the dataset exactly once even
    though the node resends until it hears the ack; every copy is acked so the
    node's outbox drains."""
    node = FakeNode(shared_broker, prefix).start()
    c = store.app.test_client()
    try:
        msg = feedback(label="8")
        node.publish("feedback", msg.to_bytes())
        ack = parse(Ack, node.next(node.acks))
        assert [(a.msg_id, a.ok) for a in ack.acks] == [(msg.msg_id, True)]
        rows = c.get(f"{API}/feedback?app=digits").json["feedback"]
        assert [(r["msg_id"], r["node_id"], r["label"]) for r in rows] == [
            (msg.msg_id, node.node_id, "8")]
        assert rows[0]["prediction"]["score"] == pytest.approx(0.41)
        img = c.get(rows[0]["input_url"])
        assert img.status_code == 200 and img.mimetype == "image/png" and img.data == PNG

        node.publish("feedback", msg.to_bytes())  # the node did not get the ack in time
        again = parse(Ack, node.next(node.acks))
        assert [(a.msg_id, a.ok) for a in again.acks] == [(msg.msg_id, True)]
        assert len(c.get(f"{API}/feedback").json["feedback"]) == 1

        ev = EventMessage(msg_id=uuid.uuid4().hex, type="app_ready", app="digits",
                          data={"version": "1.0.0"})
        node.publish("events", ev.to_bytes())
        assert parse(Ack, node.next(node.acks)).acks[0].msg_id == ev.msg_id
        stats = c.get(f"{API}/stats").json
        assert stats["counts"]["feedback"] == 1 and stats["counts"]["events"] == 1
        assert stats["ingest"]["feedback_stored"] == 1
        assert stats["ingest"]["feedback_duplicate"] == 1
        assert c.get(f"{API}/feedback?node=other").json["feedback"] == []
    finally:
        node.stop()


def test_malformed_feedback_is_counted_by_reason_and_refused_for_good(
        store: Any, shared_broker: Any, prefix: str) -> None:
    """A node with a bug must not crash the store nor retry for ever: a bad
    message is counted under its reason, and when its msg_id is readable the
    node is told (ok=false + reason) so it drops it from its outbox."""
    node = FakeNode(shared_broker, prefix).start()
    c = store.app.test_client()
    try:
        node.publish("feedback", b"\xff not json")
        bad = json.loads(feedback().to_bytes())
        bad["sample"]["input_type"] = "video/mp4"
        node.publish("feedback", json.dumps(bad))
        ack = parse(Ack, node.next(node.acks))
        assert [(a.msg_id, a.ok, a.reason) for a in ack.acks] == [
            (bad["msg_id"], False, "bad_schema")]
        not_b64 = feedback(input_b64="###")
        node.publish("feedback", not_b64.to_bytes())
        ack = parse(Ack, node.next(node.acks))
        assert [(a.msg_id, a.ok, a.reason) for a in ack.acks] == [
            (not_b64.msg_id, False, "bad_input")]
        good = feedback()
        node.publish("feedback", good.to_bytes())  # the store still works
        assert parse(Ack, node.next(node.acks)).acks[0].ok is True
        rej = c.get(f"{API}/stats").json["rejections"]
        assert {k: v["count"] for k, v in rej.items()} == {
            "not_json": 1, "bad_schema": 1, "bad_input": 1}
        assert "input_type" in rej["bad_schema"]["last_detail"]
        assert [r["msg_id"] for r in c.get(f"{API}/feedback").json["feedback"]] == [good.msg_id]
    finally:
        node.stop()


def test_desired_state_survives_a_broker_restart_without_persistence(
        broker: Any, prefix: str, digits_dir: Path, tmp_path: Path) -> None:
    """A broker restarted without persistence forgets every retained message; the
    store must put each node's desired state back as soon as it reconnects, or
    new boxes would never learn what to run."""
    svc = start_store(tmp_path / "s", broker, prefix)
    try:
        sha, _ = publish_digits(svc, digits_dir, tmp_path)
        svc.app.test_client().put(f"{API}/nodes/mine-3/apps/digits", json={"version": "1.0.0"})
        assert retained_desired(broker, prefix, "mine-3").revision == 1
        republished = svc.fleet.snapshot().get("republished", 0)
        broker.restart(down_for=0.5)
        wait_until(lambda: svc.fleet.snapshot().get("republished", 0) > republished,
                   timeout=15)
        ds = retained_desired(broker, prefix, "mine-3")
        assert (ds.revision, ds.apps[0].sha256) == (1, sha)
    finally:
        svc.stop()


def test_assigned_package_downloads_over_mqtt_and_verifies(
        store: Any, shared_broker: Any, prefix: str, digits_dir: Path, tmp_path: Path) -> None:
    """A box with only an MQTT uplink fetches exactly the package its desired
    state names, and it verifies with the store's key."""
    blobs = pytest.importorskip("cloud_sync.blobs")
    sha, size = publish_digits(store, digits_dir, tmp_path)
    node = FakeNode(shared_broker, prefix)
    fetcher = blobs.BlobFetcher(node.conn, node.topics, node.node_id, tmp_path / "dl",
                                chunk_size=4096, window=4)
    fetcher.start()
    node.start()
    try:
        store.app.test_client().put(f"{API}/nodes/{node.node_id}/apps/digits",
                                    json={"version": "1.0.0"})
        payload, retained = node.next(node.desired)
        app = parse(DesiredState, payload).apps[0]
        path = fetcher.fetch(app.sha256, app.size, timeout=10)
        assert hashlib.sha256(path.read_bytes()).hexdigest() == sha
        pkg = read_package(path, {store.key.key_id: store.key.public_raw}, expected_sha256=sha)
        assert pkg.manifest.name == "digits"
    finally:
        fetcher.stop()
        node.stop()


def _collect_acks(node: FakeNode, want: set[str], timeout: float = 10.0) -> set[str]:
    got: set[str] = set()

    def drain() -> bool:
        while True:
            try:
                got.update(a.msg_id for a in parse(Ack, node.acks.get_nowait()).acks if a.ok)
            except queue.Empty:
                return want <= got

    wait_until(drain, timeout=timeout)
    return got


def test_a_burst_of_feedback_is_stored_and_acked_completely(
        store: Any, shared_broker: Any, prefix: str) -> None:
    """A site coming back from a week offline flushes its whole outbox at once:
    every sample is stored once and acked (acks may be batched)."""
    node = FakeNode(shared_broker, prefix).start()
    try:
        msgs = [feedback() for _ in range(300)]
        for m in msgs:
            node.publish("feedback", m.to_bytes())
        _collect_acks(node, {m.msg_id for m in msgs})
        rows = store.app.test_client().get(f"{API}/feedback?limit=1000").json["feedback"]
        assert sorted(r["msg_id"] for r in rows) == sorted(m.msg_id for m in msgs)
        # identical images are kept once on disk
        assert len(list(store.cfg.samples_dir.glob("*.png"))) == 1
    finally:
        node.stop()


def test_two_store_workers_split_the_fleet_through_a_shared_subscription(
        tmp_path: Path, shared_broker: Any, prefix: str) -> None:
    """A fleet that outgrows one worker adds a second on the same data: the
    broker hands each message to one of them, and nothing is stored twice."""
    if shared_broker.kind == "embedded":
        pytest.skip("the embedded demo broker has no shared subscriptions")
    a = start_store(tmp_path / "data", shared_broker, prefix)
    b = start_store(tmp_path / "data", shared_broker, prefix)
    node = FakeNode(shared_broker, prefix).start()
    try:
        msgs = [feedback() for _ in range(60)]
        for m in msgs:
            node.publish("feedback", m.to_bytes())
        _collect_acks(node, {m.msg_id for m in msgs})
        per_worker = [s.fleet.snapshot().get("feedback_stored", 0) for s in (a, b)]
        assert sum(per_worker) == 60 and min(per_worker) > 0, per_worker
        assert a.app.test_client().get(f"{API}/stats").json["counts"]["feedback"] == 60
    finally:
        node.stop()
        b.stop()
        a.stop()
