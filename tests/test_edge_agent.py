"""The edge agent as an operator meets it: upgrades, removals, restarts, offline."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np

from cloud_sync import schemas
from edge_node.reconciler import Reconciler
from edge_node.serving.registry import AppRegistry
from edge_node.store import NodeStore
from tests.appstore_support import digits_dir, wait_until  # noqa: F401
from tests.test_e2e import API, assign, http, jget, loop, node_app, publish, v2_infer  # noqa: F401


def _publish_version(store, digits_dir: Path, tmp_path: Path, version: str) -> str:  # noqa: F811
    manifest = json.loads((digits_dir / "manifest.json").read_text())
    manifest["version"] = version
    sha, _ = publish(store, digits_dir / "model.onnx", manifest, digits_dir / "labels.txt",
                     tmp_path / f"d-{version}.aidc")
    return sha


def _ready(store, version: str) -> bool:
    app = node_app(store) or {}
    return app.get("status") == "ready" and app.get("version") == version


def test_upgrade_without_failed_requests_then_old_versions_are_cleaned(loop, digits_dir, tmp_path):  # noqa: F811
    """Switching versions under load fails no request; the node keeps the running
    version and the one before it (for a rollback) and deletes older ones."""
    store, node = loop
    agent = node()
    shas = {v: _publish_version(store, digits_dir, tmp_path, v) for v in ("1.0.0", "1.1.0", "1.2.0")}
    assign(store, "1.0.0")
    wait_until(lambda: _ready(store, "1.0.0"), timeout=60)
    x = np.load(digits_dir / "heldout.npz")["X_test"][:1]
    failures, versions, stop = [], set(), threading.Event()

    def hammer() -> None:
        while not stop.is_set():
            status, out = v2_infer(agent.http_url, x)
            if status != 200:
                failures.append((status, out))
            else:
                versions.add(out["model_version"])

    t = threading.Thread(target=hammer)
    t.start()
    try:
        wait_until(lambda: "1.0.0" in versions or failures, timeout=30)  # a busy box is slow
        assign(store, "1.1.0")
        wait_until(lambda: _ready(store, "1.1.0"), timeout=60)
        wait_until(lambda: "1.1.0" in versions or failures, timeout=30)
    finally:
        stop.set()
        t.join()
    assert not failures, failures[:3]
    assert versions == {"1.0.0", "1.1.0"}
    assign(store, "1.2.0")
    wait_until(lambda: _ready(store, "1.2.0"), timeout=60)
    blobs = {p.name for p in (agent.cfg.data_dir / "blobs").iterdir()}
    assert shas["1.2.0"] in blobs and shas["1.1.0"] in blobs and shas["1.0.0"] not in blobs
    assert len(list((agent.cfg.data_dir / "apps" / "digits").iterdir())) == 2


def test_unassign_stops_the_app_and_its_worker(loop, digits_dir, tmp_path):  # noqa: F811
    """Removing an app from a node stops serving it and ends its worker process."""
    store, node = loop
    agent = node()
    _publish_version(store, digits_dir, tmp_path, "1.0.0")
    assign(store, "1.0.0")
    wait_until(lambda: _ready(store, "1.0.0"), timeout=60)
    pid = next(iter(agent.supervisor.status().values()))["pid"]
    status, _ = http("DELETE", f"{store.url}{API}/nodes/site-1/apps/digits")
    assert status == 200
    wait_until(lambda: http("GET", f"{agent.http_url}/v2/models/digits")[0] == 404, timeout=30)
    wait_until(lambda: not Path(f"/proc/{pid}").exists(), timeout=10)
    wait_until(lambda: jget(f"{store.url}{API}/events?node=site-1&type=app_removed")["events"],
               timeout=15)


def test_node_restarts_offline_and_serves_from_local_state(loop, digits_dir, tmp_path, broker):  # noqa: F811
    """Power comes back while the uplink is down: the node serves what it ran
    before from its own disk, and hard examples it keeps are not re-sent twice."""
    store, node = loop
    agent = node(feedback={"threshold": 1.0})
    _publish_version(store, digits_dir, tmp_path, "1.0.0")
    assign(store, "1.0.0")
    wait_until(lambda: _ready(store, "1.0.0"), timeout=60)
    X = np.load(digits_dir / "heldout.npz")["X_test"]
    assert v2_infer(agent.http_url, X[:3])[0] == 200
    wait_until(lambda: agent.capture.stats.get("samples_kept", 0) >= 2, timeout=10)
    wait_until(lambda: agent.outbox.pending() == 0, timeout=20)
    agent.stop()
    broker.stop()
    agent2 = node(feedback={"threshold": 1.0})
    wait_until(lambda: http("GET", f"{agent2.http_url}/v2/health/ready")[0] == 200, timeout=60)
    status, out = v2_infer(agent2.http_url, X[:5])
    assert status == 200 and out["model_version"] == "1.0.0"
    assert agent2.capture.stats.get("samples_requeued", 0) == 0
    assert not agent2.conn.connected.is_set()
    broker.start()


def test_a_rebuilt_store_is_obeyed_despite_lower_revisions(tmp_path):
    """A store restored from an old backup counts revisions from scratch under a
    new epoch: the node must follow it, not ignore it as stale."""
    store = NodeStore(tmp_path / "node.db")
    registry = AppRegistry()
    rec = Reconciler(node_id="n1", store=store, fetcher=None, supervisor=None, registry=registry,
                     trusted_keys=dict, blobs_dir=tmp_path, apps_dir=tmp_path,
                     on_change=lambda: None)

    def send(revision: int, epoch: str) -> None:
        rec.on_desired_message("t", schemas.DesiredState(node_id="n1", revision=revision,
                                                         epoch=epoch).to_bytes(), True)

    send(7, "a")
    send(3, "a")
    assert (rec.desired.revision, rec.desired.epoch) == (7, "a")  # stale: ignored
    send(1, "b")
    assert (rec.desired.revision, rec.desired.epoch) == (1, "b")  # new store: followed
    assert store.get_json("desired_state")["epoch"] == "b"


def test_metrics_are_prometheus_text(loop, digits_dir, tmp_path):  # noqa: F811
    """Operators scrape /metrics with Prometheus: the app's readiness, the
    management plane's and each worker's memory, and the uplink are there."""
    from prometheus_client.parser import text_string_to_metric_families

    store, node = loop
    agent = node()
    _publish_version(store, digits_dir, tmp_path, "1.0.0")
    assign(store, "1.0.0")
    wait_until(lambda: _ready(store, "1.0.0"), timeout=60)
    x = np.load(digits_dir / "heldout.npz")["X_test"][:1]
    for _ in range(3):
        assert v2_infer(agent.http_url, x)[0] == 200
    status, body = http("GET", f"{agent.http_url}/metrics")
    assert status == 200
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for fam in text_string_to_metric_families(body.decode())
               for s in fam.samples}
    assert samples[("aidc_app_ready", (("app", "digits"), ("version", "1.0.0")))] == 1
    assert samples[("aidc_mqtt_connected", ())] == 1
    assert 10e6 < samples[("aidc_agent_rss_bytes", ())] < 1e9
    assert any(name == "aidc_worker_rss_bytes" and v > 1e6 for (name, _), v in samples.items())
    assert samples[("aidc_app_requests_total", (("app", "digits"),))] >= 3
    assert samples[("aidc_app_request_seconds_count", (("app", "digits"),))] >= 3


def test_placement_refuses_oversubscription_and_places_when_capacity_frees(
        loop, digits_dir, tmp_path):  # noqa: F811
    """Two apps that each want the whole card cannot both run: the second is
    refused with what does not fit and what is free, the first keeps serving,
    and the second starts once the first is removed."""
    store, node = loop
    agent = node()
    for name in ("alpha", "beta"):
        manifest = json.loads((digits_dir / "manifest.json").read_text())
        manifest["name"] = name
        manifest["resources"] = {"card_fraction": 1.0, "memory_mb": 64}
        publish(store, digits_dir / "model.onnx", manifest, digits_dir / "labels.txt",
                tmp_path / f"{name}.aidc")
    assign(store, "1.0.0", app="alpha")
    wait_until(lambda: (node_app(store, "alpha") or {}).get("status") == "ready", timeout=60)
    assign(store, "1.0.0", app="beta")
    beta = wait_until(lambda: (a := node_app(store, "beta")) and a["status"] == "failed" and a,
                      timeout=30)
    assert "placement_refused" in beta["error"] and "free" in beta["error"], beta["error"]
    assert v2_infer_named(agent.http_url, "alpha")[0] == 200
    cards = jget(f"{store.url}{API}/nodes/site-1")["reported"]["cards"]
    assert cards[0]["id"] == "cpu" and cards[0]["allocation"]
    status, _ = http("DELETE", f"{store.url}{API}/nodes/site-1/apps/alpha")
    assert status == 200
    wait_until(lambda: (node_app(store, "beta") or {}).get("status") == "ready", timeout=90)
    assert v2_infer_named(agent.http_url, "beta")[0] == 200


def v2_infer_named(edge: str, name: str) -> tuple[int, bytes]:
    x = np.zeros((1, 64), np.float32)
    return http("POST", f"{edge}/v2/models/{name}/infer",
                {"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32",
                             "data": x.reshape(-1).tolist()}]})


def test_a_training_job_runs_in_its_window_and_reports_to_the_cloud(loop, tmp_path):  # noqa: F811
    """Time division on a real node: with a training window open, a submitted
    job runs as its own process, finishes, shows in /api/v1/training, and its
    events reach the AppStore durably."""
    from edge_node.scheduling.jobs import JobSpec

    store, node = loop
    agent = node(scheduling={"windows": [{"card": "cpu", "days": "*", "start": "00:00",
                                          "end": "24:00", "training_fraction": 0.5}],
                             "load": {"train_when_idle": False}})
    job = agent.jobs.submit(JobSpec(name="example", module="edge_node.scheduling.example_job",
                                    args=["--epochs", "2"]))
    wait_until(lambda: agent.jobs.get(job.job_id).state == "done", timeout=60)
    training = jget(f"{agent.http_url}{API}/training")
    assert any(j["job_id"] == job.job_id and j["state"] == "done" for j in training["jobs"])
    wait_until(lambda: jget(f"{store.url}{API}/events?node=site-1&type=job_done")["events"],
               timeout=20)


def test_camera_streams_run_on_the_node_and_report_status(loop, digits_dir, tmp_path,
                                                          broker, prefix):  # noqa: F811
    """A site's cameras on a real node: a video file is classified by the app's
    worker, every frame is accounted for, a dead camera is offline with why, and
    both statuses are retained on MQTT for the cloud."""
    import queue as _q

    import cv2

    from cloud_sync.connection import MqttConnection
    from cloud_sync.topics import Topics
    from tests.models import digit_png

    video = tmp_path / "digits.avi"
    X = np.load(digits_dir / "heldout.npz")["X_test"]
    w = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 10, (32, 32))
    for x in X[:20]:
        w.write(cv2.imdecode(np.frombuffer(digit_png(x), np.uint8), cv2.IMREAD_COLOR))
    w.release()
    store, node = loop
    agent = node(streams=[
        {"id": "cam-1", "url": str(video), "app": "digits", "fps": 10, "loop": True},
        {"id": "cam-dead", "url": "rtsp://127.0.0.1:1/none", "app": "digits", "fps": 5,
         "open_timeout": 2},
    ])
    _publish_version(store, digits_dir, tmp_path, "1.0.0")
    assign(store, "1.0.0")
    wait_until(lambda: _ready(store, "1.0.0"), timeout=60)
    wait_until(lambda: agent.streams.stats()["cam-1"]["processed"] >= 10, timeout=30)
    st = agent.streams.stats()
    assert st["cam-1"]["unexplained"] == 0
    assert st["cam-dead"]["state"] in ("offline", "connecting") and st["cam-dead"]["error"]
    got: _q.Queue = _q.Queue()
    probe = MqttConnection("probe-streams", broker.host, broker.port)
    probe.subscribe(Topics(prefix).all_stream_status(), lambda t, p, r: got.put((t, p)))
    probe.start()
    seen = {}
    try:
        deadline = time.monotonic() + 15
        while len(seen) < 2 and time.monotonic() < deadline:
            try:
                t, p = got.get(timeout=0.5)
            except _q.Empty:
                continue
            msg = schemas.parse(schemas.StreamStatus, p)
            seen[msg.stream_id] = msg.state
    finally:
        probe.stop()
    assert seen.get("cam-1") == "online" and seen.get("cam-dead") in ("offline", "connecting")
    wait_until(lambda: jget(f"{store.url}{API}/events?node=site-1&type=stream_label")["events"],
               timeout=20)


def test_training_windows_set_from_the_cloud(loop, tmp_path, broker):  # noqa: F811
    """Time division set by an operator in the AppStore: the cloud's windows
    replace the node config's (a queued job starts), a bad schedule is a 400
    naming the key, clearing them gives the config's back (the running job is
    preempted with a checkpoint), and they stay in force across an offline restart."""
    from edge_node.scheduling.jobs import JobSpec

    store, node = loop
    url = f"{store.url}{API}/nodes/site-1/training"
    agent = node(scheduling={"windows": [], "timezone": "UTC", "tick_s": 0.2,
                             "load": {"train_when_idle": False}})
    job = agent.jobs.submit(JobSpec(name="example", module="edge_node.scheduling.example_job",
                                    args=["--epochs", "200", "--throttle", "0.02",
                                          "--checkpoint-every", "5"]))
    time.sleep(1.0)
    assert agent.jobs.get(job.job_id).state == "queued"  # no window in the config

    status, body = http("PUT", url, {"windows": [{"card": "cpu", "days": "mon-fry",
                                                  "training_fraction": 1}]})
    assert status == 400 and json.loads(body)["error"] == "bad_training"
    assert "days" in json.loads(body)["detail"] and "mon-fry" in json.loads(body)["detail"]
    status, body = http("PUT", url, {"timezone": "Mars/Olympus", "windows": []})
    assert status == 400 and "time zone" in json.loads(body)["detail"]

    always = {"timezone": "Europe/Paris",
              "windows": [{"card": "cpu", "days": "*", "training_fraction": 0.5}]}
    status, body = http("PUT", url, always)
    assert status == 200, body
    assert json.loads(body)["desired"]["training"]["timezone"] == "Europe/Paris"
    wait_until(lambda: agent.jobs.get(job.job_id).state == "running", timeout=20)
    assert agent.scheduler.windows_in_force()["source"] == "cloud"
    # the AppStore sees what the node runs
    wait_until(lambda: (jget(f"{store.url}{API}/nodes/site-1")["reported"] or {})
               .get("training", {}).get("source") == "cloud", timeout=20)

    wait_until(lambda: (agent.scheduler.status()["cards"].get("cpu") or {}).get("job")
               and agent.jobs.get(job.job_id).progress.get("checkpoint_step"), timeout=30)
    status, _ = http("DELETE", url)
    assert status == 200
    wait_until(lambda: agent.jobs.get(job.job_id).state == "preempted", timeout=30)
    rec = agent.jobs.get(job.job_id)
    assert "outside training windows" in (rec.reason or "")
    assert agent.scheduler.windows_in_force() == {"source": "config", "timezone": "UTC",
                                                  "windows": []}

    # set again, then power-cycle the node while the uplink is down
    assert http("PUT", url, always)[0] == 200
    wait_until(lambda: agent.scheduler.windows_in_force()["source"] == "cloud", timeout=20)
    agent.stop()
    broker.stop()
    try:
        agent2 = node(scheduling={"windows": [], "timezone": "UTC", "tick_s": 0.2,
                                  "load": {"train_when_idle": False}})
        assert not agent2.conn.connected.is_set()
        inforce = agent2.scheduler.windows_in_force()
        assert inforce["source"] == "cloud" and inforce["timezone"] == "Europe/Paris"
        # the preempted job resumes from its checkpoint under the cloud's window
        wait_until(lambda: agent2.jobs.get(job.job_id).state == "running", timeout=20)
    finally:
        broker.start()
