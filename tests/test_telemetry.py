"""Learning telemetry on real parts: a node's field accuracy on labelled
samples, sample counts and fine-tune outcomes reach the AppStore over MQTT
(QoS 0), which keeps the latest per node and a point each time they change.
"""

from __future__ import annotations

import json

import numpy as np

from cloud_sync import schemas
from cloud_sync.connection import MqttConnection
from cloud_sync.topics import Topics
from tests.appstore_support import digits_dir, wait_until  # noqa: F401
from tests.test_e2e import API, http, jget, loop  # noqa: F401
from tests.test_hard_examples import _all_samples, _classify, _serve_digits, _settle


def _label(agent, rows, right: bool) -> None:
    for r in rows:
        pred = r["prediction"]["label"]
        label = pred if right else str((int(pred) + 1) % 10)
        assert http("PUT", f"{agent.http_url}{API}/samples/{r['sample_id']}/label",
                    {"label": label, "by": "t"})[0] == 200


def test_field_accuracy_and_sample_counts_reach_the_cloud_over_time(
        loop, digits_dir, tmp_path, broker, prefix):  # noqa: F811
    store, node = loop
    agent = _serve_digits(store, node, digits_dir, tmp_path,
                          feedback={"threshold": 1.0, "max_per_minute": 100000})
    X = np.load(digits_dir / "heldout.npz")["X_test"]
    _classify(agent, X[:30])
    _settle(agent, 30)
    rows = _all_samples(agent)
    kept = len(rows)
    assert kept >= 20
    _label(agent, rows[:8], right=True)
    _label(agent, rows[8:10], right=False)  # the technician corrects two answers

    assert agent.telemetry.send()

    def latest():
        t = jget(f"{store.url}{API}/telemetry?node=site-1&app=digits")["telemetry"]
        return t[0] if t else None

    wait_until(lambda: (latest() or {}).get("labelled") == 10, timeout=15)
    t = latest()
    assert t["correct"] == 8 and abs(t["accuracy"] - 0.8) < 1e-9
    assert t["version"] == "1.0.0" and t["samples_kept"] == kept and t["samples_labelled"] == 10
    assert t["shared_full"] == kept

    # unchanged figures: no new point; more labels: a new point
    assert agent.telemetry.send()
    _label(agent, rows[10:20], right=True)
    assert agent.telemetry.send()
    wait_until(lambda: (latest() or {}).get("labelled") == 20, timeout=15)
    points = jget(f"{store.url}{API}/apps/digits/accuracy?node=site-1")["points"]
    # (a first point, nothing labelled yet, came when the app started serving)
    assert [(p["labelled"], p["correct"]) for p in points if p["labelled"]] == \
        [(10, 8), (20, 18)]

    # the node's own view adds the accuracy per version and day
    local = jget(f"{agent.http_url}{API}/telemetry")
    assert local["apps"]["digits"]["accuracy"] == 0.9
    assert local["by_day"][0]["n"] == 20 and local["by_day"][0]["correct"] == 18

    # telemetry claiming another node on this node's topic is refused and counted
    spy = MqttConnection("spy", broker.host, broker.port)
    spy.start()
    try:
        assert spy.wait_connected(10)
        bad = schemas.Telemetry(node_id="site-9", apps={}).to_bytes()
        spy.publish(Topics(prefix).telemetry("site-1"), bad, qos=1)
        wait_until(lambda: "node_mismatch" in jget(f"{store.url}{API}/stats")["rejections"],
                   timeout=15)
    finally:
        spy.stop()
    assert json.loads(http("GET", f"{store.url}{API}/apps/digits/accuracy?limit=x")[1])[
        "error"] == "bad_limit"
