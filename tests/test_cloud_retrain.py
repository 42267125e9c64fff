"""The cloud path of "learn while using", on real parts: two sites label
their shifted images -> the AppStore's dataset (deduplicated by content, with
each site's provenance, conflicts left out) -> a retrain job -> a new signed
version published -> assigned to both nodes and served, better on the shift.

Real Mosquitto, the real AppStore, two real edge agents with worker processes
and ONNX Runtime, the retrain as a child process; driven over HTTP.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np

from edge_node.agent import NodeAgent
from edge_node.config import load_config
from tests.appstore_support import digits_dir, start_store, wait_until  # noqa: F401
from tests.models import digit_png
from tests.test_e2e import API, http, jget, publish
from tests.test_hard_examples import _settle
from tests.test_site_learning import blur

import pytest


@pytest.fixture
def fleet(tmp_path, broker, prefix):
    store = start_store(tmp_path / "cloud", broker, prefix)
    agents: list[NodeAgent] = []

    def node(node_id: str) -> NodeAgent:
        keys = tmp_path / node_id / "trusted_keys"
        keys.mkdir(parents=True, exist_ok=True)
        (keys / "store.pub").write_bytes(store.key.public_pem())
        cfg = load_config(node_id=node_id, data_dir=tmp_path / node_id,
                          mqtt={"host": broker.host, "port": broker.port,
                                "topic_prefix": prefix},
                          http={"port": 0},
                          feedback={"threshold": 1.0, "max_per_minute": 100000})
        agents.append(NodeAgent(cfg))
        agents[-1].start()
        return agents[-1]

    yield store, node
    for a in agents:
        a.stop()
    store.stop()


def _app(store, node_id: str) -> dict:
    status, body = http("GET", f"{store.url}{API}/nodes/{node_id}")
    rep = (json.loads(body).get("reported") or {}) if status == 200 else {}
    return next((a for a in rep.get("apps", []) if a["name"] == "digits"), {})


def _accuracy(edge: str, X: np.ndarray, y: np.ndarray) -> float:
    req = {"inputs": [{"name": "input", "shape": [len(X), 64], "datatype": "FP32",
                       "data": X.reshape(-1).tolist()}]}
    status, body = http("POST", f"{edge}/v2/models/digits/infer", req)
    assert status == 200, body
    probs = next(o for o in json.loads(body)["outputs"] if o["name"] == "probabilities")
    return float((np.asarray(probs["data"]).reshape(probs["shape"]).argmax(1) == y).mean())


def _site(agent, X, y, odd_one: bytes | None = None) -> int:
    """The site's camera sends its images; a technician labels every kept one
    (the image ``odd_one`` gets a different label than the truth)."""
    truth, before = {}, agent.capture.stats["results"]
    for x, label in zip(X, y):
        png = digit_png(x)
        truth[hashlib.sha256(png).hexdigest()] = int(label)
        assert http("POST", f"{agent.http_url}/v2/models/digits/classify", png,
                    "image/png")[0] == 200
    _settle(agent, before + len(X))
    n = 0
    q = jget(f"{agent.http_url}{API}/samples?app=digits&state=unlabelled&limit=1000")
    for s in q["samples"]:
        if s["input_type"] == "image/png":  # (tensors: the test's own accuracy checks)
            png = http("GET", f"{agent.http_url}{s['input_url']}")[1]
            h = hashlib.sha256(png).hexdigest()
            label = truth[h] if odd_one is None or h != hashlib.sha256(odd_one).hexdigest() \
                else (truth[h] + 1) % 10
            assert http("PUT", f"{agent.http_url}{API}/samples/{s['sample_id']}/label",
                        {"label": str(label), "by": agent.cfg.node_id})[0] == 200
            n += 1
    return n


def test_samples_from_two_sites_become_a_dataset_then_a_new_version_served_by_both(
        fleet, digits_dir, tmp_path):  # noqa: F811
    store, node = fleet
    a, b = node("site-a"), node("site-b")
    manifest = json.loads((digits_dir / "manifest.json").read_text())
    manifest["learning"]["gate"] = {"min_gain": 0.05, "max_regression": 0.05,
                                    "min_samples": 50, "min_heldout": 15}
    publish(store, digits_dir / "model.onnx", manifest, digits_dir / "labels.txt",
            tmp_path / "d.aidc")
    for n in ("site-a", "site-b"):
        assert http("PUT", f"{store.url}{API}/nodes/{n}/apps/digits", {"version": "1.0.0"})[0] \
            == 200
    for n in ("site-a", "site-b"):
        wait_until(lambda n=n: _app(store, n).get("status") == "ready", timeout=60)
    held = np.load(digits_dir / "heldout.npz")
    X, y = blur(held["X_test"]), held["y_test"]
    Xt, yt = X[300:450], y[300:450]  # fresh site images, never sent
    base_acc = _accuracy(a.http_url, Xt, yt)

    # both sites see images 100..149 (a shared corridor camera)
    labelled = _site(a, X[:150], y[:150])
    labelled += _site(b, X[100:260], y[100:260], odd_one=digit_png(X[120]))

    def labelled_in_cloud() -> int:
        rows = jget(f"{store.url}{API}/feedback?app=digits&limit=1000")["feedback"]
        return sum(r["label"] is not None for r in rows)

    wait_until(lambda: labelled_in_cloud() >= labelled, timeout=60)
    ds = jget(f"{store.url}{API}/apps/digits/dataset")
    assert ds["samples"] >= labelled  # (plus the unlabelled tensors of our checks)
    assert ds["duplicates"] >= 40  # the shared images counted once
    assert ds["conflicts"] == 1  # the image the two sites disagree on is left out
    assert ds["items"] + ds["conflicts"] == labelled - ds["duplicates"]
    assert set(ds["sites"]) == {"site-a", "site-b"}
    assert 0 < ds["heldout"] < ds["items"]

    status, body = http("POST", f"{store.url}{API}/apps/digits/retrain", {
        "base_version": "1.0.0", "version": "1.1.0", "assign": ["site-a", "site-b"],
        "by": "ops"})
    assert status == 202, body
    rid = json.loads(body)["retrain_id"]
    status, body = http("POST", f"{store.url}{API}/apps/digits/retrain",
                        {"base_version": "1.0.0", "version": "1.1.0"})
    assert status == 409 and json.loads(body)["error"] in ("retrain_running", "version_exists")

    wait_until(lambda: jget(f"{store.url}{API}/retrains/{rid}")["state"] != "running",
               timeout=120, interval=0.3)
    rt = jget(f"{store.url}{API}/retrains/{rid}")
    assert rt["state"] == "published", rt
    m = rt["metrics"]
    assert m["heldout"]["candidate"] >= m["heldout"]["base"] + 0.05
    assert rt["lineage"]["dataset"]["by_site"].keys() == {"site-a", "site-b"}
    versions = [v["version"] for v in jget(f"{store.url}{API}/apps/digits")["versions"]]
    assert "1.1.0" in versions

    for n in ("site-a", "site-b"):
        wait_until(lambda n=n: _app(store, n).get("version") == "1.1.0"
                   and _app(store, n).get("status") == "ready", timeout=90)
    new_acc = _accuracy(b.http_url, Xt, yt)
    assert new_acc > base_acc + 0.05, (base_acc, new_acc)
    print(f"dataset {ds}; retrain {m}; fresh site images: 1.0.0 {base_acc:.3f} -> "
          f"1.1.0 {new_acc:.3f}")


def test_retrain_requests_with_bad_input_get_reasons(fleet, digits_dir, tmp_path):  # noqa: F811
    store, _ = fleet
    manifest = json.loads((digits_dir / "manifest.json").read_text())
    publish(store, digits_dir / "model.onnx", manifest, digits_dir / "labels.txt",
            tmp_path / "d.aidc")
    url = f"{store.url}{API}/apps/digits/retrain"
    cases = [
        ({"version": "1.1.0"}, 400, "bad_retrain"),
        ({"base_version": "9.9.9", "version": "1.1.0"}, 404, "unknown_version"),
        ({"base_version": "1.0.0", "version": "1.0.0"}, 409, "version_exists"),
        ({"base_version": "1.0.0", "version": "one"}, 400, "bad_version"),
        ({"base_version": "1.0.0", "version": "1.1.0"}, 409, "not_enough_samples"),
        ({"base_version": "1.0.0", "version": "1.1.0", "assign": "site-a"}, 400, "bad_retrain"),
    ]
    for body, status, reason in cases:
        got, raw = http("POST", url, body)
        assert (got, json.loads(raw)["error"]) == (status, reason), (body, raw)
    assert http("GET", f"{store.url}{API}/retrains/nope")[0] == 404
