"""The whole loop on real parts: AppStore -> MQTT -> edge node -> HTTP -> feedback.

Real Mosquitto (restarted mid-flight), real SQLite, real ONNX Runtime, real
worker processes; the test talks to both sides over HTTP as a user would.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from appstore.publish import build_package
from edge_node.agent import NodeAgent
from edge_node.config import load_config
from tests.appstore_support import auth_headers, digits_dir, start_store, wait_until  # noqa: F401
from tests.models import digit_png

API = "/api/v1"


def http(method: str, url: str, body=None, ctype: str = "application/json"):
    import urllib.error
    import urllib.request

    if isinstance(body, (dict, list)):
        body = json.dumps(body).encode()
    req = urllib.request.Request(url, data=body, method=method,
                                 headers={"Content-Type": ctype, **auth_headers(url)})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def jget(url: str):
    status, body = http("GET", url)
    assert status == 200, (url, status, body)
    return json.loads(body)


def start_node(tmp_path: Path, broker, prefix: str, store, node_id: str = "site-1",
               mqtt: dict | None = None, **over) -> NodeAgent:
    """A real edge agent trusting ``store``'s key; data in ``tmp_path/edge`` for the
    default node, ``tmp_path/<node_id>`` for others; ``mqtt`` adds to the broker's
    address (e.g. credentials)."""
    data = tmp_path / ("edge" if node_id == "site-1" else node_id)
    keys = data / "trusted_keys"
    keys.mkdir(parents=True, exist_ok=True)
    (keys / "store.pub").write_bytes(store.key.public_pem())
    cfg = load_config(node_id=node_id, data_dir=data,
                      mqtt={"host": broker.host, "port": broker.port, "topic_prefix": prefix,
                            **(mqtt or {})},
                      http={"port": 0}, **over)
    agent = NodeAgent(cfg)
    agent.start()
    return agent


def publish(store, model: Path, manifest: dict, labels: Path, out: Path) -> tuple[str, int]:
    sha, size = build_package(model, manifest, labels, store.key, out)
    status, body = http("POST", f"{store.url}{API}/packages", out.read_bytes(),
                        "application/octet-stream")
    assert status in (200, 201), body
    return sha, size


def assign(store, version: str = "1.0.0", app: str = "digits") -> None:
    status, body = http("PUT", f"{store.url}{API}/nodes/site-1/apps/{app}", {"version": version})
    assert status == 200, body


def node_app(store, name: str = "digits") -> dict | None:
    status, body = http("GET", f"{store.url}{API}/nodes/site-1")
    if status != 200:
        return None
    reported = json.loads(body).get("reported") or {}
    return next((a for a in reported.get("apps", []) if a["name"] == name), None)


def feedback(store) -> list[dict]:
    return jget(f"{store.url}{API}/feedback?node=site-1&limit=1000")["feedback"]


def v2_infer(edge: str, x: np.ndarray) -> tuple[int, dict]:
    req = {"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                       "data": x.reshape(-1).tolist()}]}
    status, body = http("POST", f"{edge}/v2/models/digits/infer", req)
    return status, json.loads(body)


@pytest.fixture
def loop(tmp_path, broker, prefix, digits_dir):  # noqa: F811
    store = start_store(tmp_path / "cloud", broker, prefix)
    agents: list[NodeAgent] = []

    def node(**over) -> NodeAgent:
        agents.append(start_node(tmp_path, broker, prefix, store, **over))
        return agents[-1]

    yield store, node
    for a in agents:
        a.stop()
    store.stop()


def test_publish_assign_serve_and_feedback(loop, digits_dir, tmp_path):  # noqa: F811
    """The user's loop: publish the sample app, assign it, the node fetches and
    serves it, held-out digits are classified right over the v2 protocol, and
    doubtful inputs come back to the AppStore as hard examples with images."""
    store, node = loop
    agent = node()
    manifest = json.loads((digits_dir / "manifest.json").read_text())
    sha, _ = publish(store, digits_dir / "model.onnx", manifest, digits_dir / "labels.txt",
                     tmp_path / "d.aidc")
    t0 = time.monotonic()
    assign(store)
    wait_until(lambda: (node_app(store) or {}).get("status") == "ready", timeout=60)
    print(f"assign -> ready (reported to the cloud): {time.monotonic() - t0:.2f}s")
    edge = agent.http_url
    assert http("GET", f"{edge}/v2/health/ready")[0] == 200
    meta = jget(f"{edge}/v2/models/digits")
    assert meta["inputs"][0]["name"] == "input"

    held = np.load(digits_dir / "heldout.npz")
    X, y = held["X_test"], held["y_test"]
    status, out = v2_infer(edge, X[:200])
    assert status == 200, out
    probs = next(o for o in out["outputs"] if o["name"] == "probabilities")
    pred = np.asarray(probs["data"]).reshape(probs["shape"]).argmax(1)
    assert (pred == y[:200]).mean() > 0.9

    # ambiguous inputs: two different digits blended -> low confidence
    pairs = [(i, j) for i in range(40) for j in range(40, 80) if y[i] != y[j]][:60]
    for i, j in pairs:
        status, body = http("POST", f"{edge}/v2/models/digits/classify",
                            digit_png((X[i] + X[j]) / 2), "image/png")
        assert status == 200, body
    kept = wait_until(lambda: agent.capture.stats.get("samples_kept", 0), timeout=10)
    time.sleep(0.5)
    kept = agent.capture.stats["samples_kept"]
    assert kept >= 5, "blended digits should give doubtful results"
    rows = wait_until(lambda: (r := feedback(store)) and len(r) >= kept and r, timeout=30)
    assert len(rows) == kept
    row = rows[0]
    assert row["app"] == "digits" and row["version"] == "1.0.0" and row["input_type"] == "image/png"
    status, png = http("GET", f"{store.url}{row['input_url']}")
    assert status == 200 and png[:8] == b"\x89PNG\r\n\x1a\n"
    assert agent.outbox.pending() == 0
    events = wait_until(
        lambda: jget(f"{store.url}{API}/events?node=site-1&type=app_ready")["events"], timeout=15)
    assert events and events[0]["app"] == "digits" and events[0]["data"]["version"] == "1.0.0"


def _padded_model(src: Path, dst: Path, mb: float) -> Path:
    """The digits model with an unused random initializer: a real, valid model
    that makes a package of several MB (compresses poorly)."""
    m = onnx.load(str(src))
    pad = np.random.default_rng(0).standard_normal(int(mb * (1 << 20) / 4)).astype(np.float32)
    m.graph.initializer.append(numpy_helper.from_array(pad, name="padding"))
    onnx.save(m, str(dst))
    replay = src.with_name("replay.npz")  # the manifest's learning.replay ships beside it
    if replay.exists():
        dst.with_name(replay.name).write_bytes(replay.read_bytes())
    return dst


def test_package_transfer_survives_a_broker_restart(loop, digits_dir, tmp_path, broker):  # noqa: F811
    """A site's uplink drops in the middle of a download: the transfer resumes
    where it was (not from zero) and the node ends up serving the app."""
    store, node = loop
    agent = node(blob={"chunk_size": 16384, "window": 2, "chunk_timeout": 2.0})
    model = _padded_model(digits_dir / "model.onnx", tmp_path / "big.onnx", 3)
    manifest = json.loads((digits_dir / "manifest.json").read_text())
    sha, size = publish(store, model, manifest, digits_dir / "labels.txt", tmp_path / "big.aidc")
    assert size > 2_500_000
    assign(store)
    wait_until(lambda: agent.fetcher.stats.get("bytes_received", 0) > size * 0.2, timeout=60,
               interval=0.005)
    got_before = agent.fetcher.stats["bytes_received"]
    assert got_before < size, "restart must happen mid-transfer"
    broker.restart(down_for=1.0)
    wait_until(lambda: (node_app(store) or {}).get("status") == "ready", timeout=90)
    assert (node_app(store) or {})["sha256"] == sha
    # resumed, not restarted: far less than twice the package came over the wire
    assert agent.fetcher.stats["bytes_received"] < size * 1.5
    held = np.load(digits_dir / "heldout.npz")
    status, out = v2_infer(agent.http_url, held["X_test"][:50])
    assert status == 200


def test_feedback_upload_survives_broker_outage_exactly_once(loop, digits_dir, tmp_path, broker):  # noqa: F811
    """The broker goes away while hard examples are being uploaded and more are
    captured while it is down: every sample reaches the AppStore exactly once."""
    store, node = loop
    agent = node(feedback={"threshold": 1.0, "max_per_minute": 100000},
                 outbox={"min_retry": 0.5, "max_retry": 3.0, "max_in_flight": 5})
    manifest = json.loads((digits_dir / "manifest.json").read_text())
    publish(store, digits_dir / "model.onnx", manifest, digits_dir / "labels.txt",
            tmp_path / "d.aidc")
    assign(store)
    wait_until(lambda: (node_app(store) or {}).get("status") == "ready", timeout=60)
    X = np.load(digits_dir / "heldout.npz")["X_test"]
    edge = agent.http_url

    def classify(rows) -> None:
        for x in rows:
            status, body = http("POST", f"{edge}/v2/models/digits/classify", digit_png(x),
                                "image/png")
            assert status == 200, body

    # the cut lands while the camera is still sending: results are gathered for up to
    # 0.2 s before they are recorded, so a finished burst could be all acked already
    import threading

    sender = threading.Thread(target=classify, args=(X[:60],))
    sender.start()
    wait_until(lambda: agent.outbox.stats().get("sent", 0) > 0
               and agent.outbox.pending() > 0, timeout=10, interval=0.002)
    broker.stop()
    pending_at_cut = agent.outbox.pending()
    sender.join(30)
    classify(X[60:100])  # captured while the broker is down
    time.sleep(1.0)
    broker.start()
    wait_until(lambda: agent.capture.stats["results"] >= 100, timeout=10)
    # results are counted on arrival, samples when their batch commits (up to 0.2 s
    # later, longer on a loaded box): wait for the count to settle
    kept = _settled(lambda: agent.capture.stats.get("samples_kept", 0))
    assert kept >= 90  # threshold 1.0: all but the (rare) exactly-certain results
    wait_until(lambda: len(feedback(store)) >= kept, timeout=60)
    wait_until(lambda: agent.outbox.pending() == 0, timeout=30)
    stored = feedback(store)
    node_ids = {s["sample_id"] for s in jget(f"{edge}{API}/samples?limit=1000")["samples"]}
    assert len(stored) == kept and {r["sample_id"] for r in stored} == node_ids
    assert pending_at_cut > 0, "the cut must happen while uploads were in flight"
    print(f"pending at cut: {pending_at_cut}, outbox: {agent.outbox.stats()}")


def _settled(read, quiet: float = 1.0, timeout: float = 20.0) -> int:
    """``read()`` once it has not changed for ``quiet`` seconds."""
    deadline = time.monotonic() + timeout
    value, since = read(), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.05)
        now = read()
        if now != value:
            value, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet:
            return value
    return value


def test_bad_input_from_the_cloud_is_counted_and_shown(loop, digits_dir, tmp_path, broker, prefix):  # noqa: F811
    """A node that does not trust the publisher refuses the package, says why in
    its reported state and keeps running; garbage on its desired-state topic is
    counted under a reason, not a crash, and the real desired state still works."""
    from cloud_sync.connection import MqttConnection
    from cloud_sync.topics import Topics

    store, node = loop
    agent = node()
    for f in (tmp_path / "edge" / "trusted_keys").glob("*.pub"):
        f.unlink()  # this node trusts nobody
    manifest = json.loads((digits_dir / "manifest.json").read_text())
    publish(store, digits_dir / "model.onnx", manifest, digits_dir / "labels.txt",
            tmp_path / "d.aidc")
    assign(store)
    app = wait_until(lambda: (a := node_app(store)) and a["status"] == "failed" and a, timeout=30)
    assert "untrusted_key" in app["error"]
    reported = jget(f"{store.url}{API}/nodes/site-1")["reported"]
    assert reported["rejected"].get("untrusted_key") == 1

    poke = MqttConnection("poker", broker.host, broker.port)
    poke.start()
    assert poke.wait_connected(10)
    topic = Topics(prefix).desired("site-1")
    poke.publish(topic, b"\x00not json")
    poke.publish(topic, b'{"v": 1, "node_id": "site-1"}')
    poke.stop()
    wait_until(lambda: {"desired_not_json", "desired_bad_schema"}
               <= set(jget(f"{store.url}{API}/nodes/site-1")["reported"]["rejected"]), timeout=15)
    assert http("GET", f"{agent.http_url}/v2/health/live")[0] == 200
