"""Learn while using, on a real node: shifted digits -> hard examples ->
labelled through the API -> a fine-tune job under the scheduler -> the gate ->
shadow -> promoted with no failed request -> rolled back on command.

Real parts: the edge agent, its worker processes and ONNX Runtime, the
scheduler running the fine-tune as its own process, Mosquitto, the AppStore,
SQLite on disk; driven over HTTP.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from types import SimpleNamespace

import cv2
import numpy as np
import pytest

from edge_node.adapt import decide
from tests.appstore_support import digits_dir, wait_until  # noqa: F401
from tests.models import digit_png
from tests.test_e2e import API, assign, http, jget, loop, node_app, publish  # noqa: F401

ALWAYS = {"windows": [{"card": "cpu", "days": "*", "start": "00:00", "end": "24:00",
                       "training_fraction": 0.5}], "load": {"train_when_idle": False}}


def blur(X: np.ndarray) -> np.ndarray:
    """The site's shift: its camera is out of focus."""
    return np.stack([cv2.GaussianBlur(x.reshape(8, 8).astype(np.float32), (0, 0), 1.0,
                                      borderType=cv2.BORDER_CONSTANT).reshape(-1) for x in X])


def test_the_gate_decides_on_held_out_gain_and_replay_loss():
    gate = SimpleNamespace(min_heldout=10, min_gain=0.02, max_regression=0.02)
    ok, why = decide(gate, {"heldout": {"n": 50, "base": 0.70, "candidate": 0.90},
                            "replay": {"n": 300, "base": 0.99, "candidate": 0.98}})
    assert ok and "0.700 -> 0.900" in why
    ok, why = decide(gate, {"heldout": {"n": 50, "base": 0.70, "candidate": 0.71},
                            "replay": {"n": 300, "base": 0.99, "candidate": 0.99}})
    assert not ok and "no better" in why
    ok, why = decide(gate, {"heldout": {"n": 50, "base": 0.70, "candidate": 0.90},
                            "replay": {"n": 300, "base": 0.99, "candidate": 0.90}})
    assert not ok and "forgets" in why
    ok, why = decide(gate, {"heldout": {"n": 5, "base": 0.5, "candidate": 1.0}})
    assert not ok and "not enough held-out" in why
    # limits are inclusive, whatever float rounding does to 1.00 - 0.95 or 0.72 - 0.70
    ok, why = decide(SimpleNamespace(min_heldout=10, min_gain=0.02, max_regression=0.05),
                     {"heldout": {"n": 50, "base": 0.70, "candidate": 0.72},
                      "replay": {"n": 100, "base": 1.0, "candidate": 0.95}})
    assert ok, why


def _publish_with_gate(store, digits_dir, tmp_path, **gate):  # noqa: F811
    manifest = json.loads((digits_dir / "manifest.json").read_text())
    manifest["learning"]["gate"] = gate
    publish(store, digits_dir / "model.onnx", manifest, digits_dir / "labels.txt",
            tmp_path / "d.aidc")
    assign(store)
    wait_until(lambda: (node_app(store) or {}).get("status") == "ready", timeout=60)


def _site_samples(agent, X: np.ndarray, y: np.ndarray) -> dict[str, int]:
    """Classify the site's images as its camera would send them; sha256 of each
    image -> its true class."""
    truth = {}
    for x, label in zip(X, y):
        png = digit_png(x)
        truth[hashlib.sha256(png).hexdigest()] = int(label)
        status, body = http("POST", f"{agent.http_url}/v2/models/digits/classify", png,
                            "image/png")
        assert status == 200, body
    wait_until(lambda: agent.capture.stats["results"] >= len(X), timeout=30)
    return truth


def _label_everything(agent, truth: dict[str, int], wrong: bool = False) -> int:
    """A technician works through the queue (here: labels from the ground truth,
    or all shifted by one class when ``wrong``)."""
    edge, n = agent.http_url, 0
    while True:
        q = jget(f"{edge}{API}/labelling/queue?app=digits&limit=200")["queue"]
        if not q:
            return n
        for s in q:
            status, png = http("GET", f"{edge}{s['input_url']}")
            assert status == 200
            label = truth[hashlib.sha256(png).hexdigest()]
            if wrong:
                label = (label + 3) % 10
            status, body = http("PUT", f"{edge}{API}/samples/{s['sample_id']}/label",
                                {"label": str(label), "by": "tech-1"})
            assert status == 200, body
            n += 1


class Load:
    """Requests against the app all along, counting any that fail."""

    def __init__(self, edge: str, X: np.ndarray, pause: float = 0.005) -> None:
        self.edge, self.X, self.pause = edge, X, pause
        self.ok = 0
        self.failed: list[tuple[int, bytes]] = []
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        i = 0
        while not self._stop.is_set():
            x = self.X[i % len(self.X)][None, :]
            req = {"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32",
                               "data": x.reshape(-1).tolist()}]}
            status, body = http("POST", f"{self.edge}/v2/models/digits/infer", req)
            if status == 200:
                self.ok += 1
            else:
                self.failed.append((status, body[:200]))
            i += 1
            self._stop.wait(self.pause)

    def stop(self) -> None:
        self._stop.set()
        self._t.join(10)


def _run_state(agent, run_id: str) -> dict:
    return jget(f"{agent.http_url}{API}/finetune/{run_id}")


def test_a_shifted_site_is_learned_promoted_without_failures_and_rolled_back(
        loop, digits_dir, tmp_path):  # noqa: F811
    store, node = loop
    agent = node(feedback={"threshold": 1.0, "max_per_minute": 100000,
                           "heldout_fraction": 0.3}, scheduling=ALWAYS)
    _publish_with_gate(store, digits_dir, tmp_path, min_gain=0.05, max_regression=0.05,
                       shadow_requests=30, min_samples=50, min_heldout=20)
    edge = agent.http_url
    held = np.load(digits_dir / "heldout.npz")
    X, y = blur(held["X_test"][:260]), held["y_test"][:260]
    truth = _site_samples(agent, X, y)

    # too early: nothing labelled yet -> 409 with the counts and what is needed
    status, body = http("POST", f"{edge}{API}/apps/digits/finetune", {"by": "tech-1"})
    err = json.loads(body)
    assert status == 409 and err["error"] == "not_enough_samples", err
    assert err["detail"]["need"] == {"train": 50, "heldout": 20}

    n = _label_everything(agent, truth)
    assert n >= 200
    status, body = http("POST", f"{edge}{API}/apps/digits/finetune", {"by": "tech-1"})
    assert status == 202, body
    run = json.loads(body)
    assert run["state"] == "training" and run["base_version"] == "1.0.0"
    status, body = http("POST", f"{edge}{API}/apps/digits/finetune", {})
    assert status == 409 and json.loads(body)["error"] == "finetune_running"

    load = Load(edge, held["X_test"][260:])  # live traffic: feeds the shadow, counts failures
    try:
        wait_until(lambda: _run_state(agent, run["run_id"])["state"] not in
                   ("training", "shadow"), timeout=120, interval=0.2)
        done = _run_state(agent, run["run_id"])
        assert done["state"] == "promoted", done
        m = done["metrics"]
        assert m["heldout"]["candidate"] >= m["heldout"]["base"] + 0.05
        assert m["shadow"]["compared"] >= 30 and m["shadow"]["errors"] == 0
        assert done["version"] == "1.0.0+site.1"
        lin = done["lineage"]
        assert lin["base"]["version"] == "1.0.0" and lin["samples"]["labelled_by"] == ["tech-1"]
        assert not set(lin["train_ids"]) & set(lin["heldout_ids"])  # kept apart
        assert len(lin["heldout_ids"]) == m["heldout"]["n"] >= 20
        # the switch: the node reports the variant; the v2 metadata names it
        wait_until(lambda: (node_app(store) or {}).get("variant") == "1.0.0+site.1",
                   timeout=30)
        wait_until(lambda: jget(f"{edge}/v2/models/digits").get("versions") == ["1.0.0+site.1"]
                   or jget(f"{edge}/v2/models/digits").get("version") == "1.0.0+site.1",
                   timeout=10)
        promoted_at = load.ok
        # the promoted model is better on the shifted site (fresh images)
        Xs, ys = blur(held["X_test"][300:450]), held["y_test"][300:450]
        req = {"inputs": [{"name": "input", "shape": [len(Xs), 64], "datatype": "FP32",
                           "data": Xs.reshape(-1).tolist()}]}
        status, body = http("POST", f"{edge}/v2/models/digits/infer", req)
        probs = next(o for o in json.loads(body)["outputs"] if o["name"] == "probabilities")
        acc_site = (np.asarray(probs["data"]).reshape(probs["shape"]).argmax(1) == ys).mean()

        # rollback on command: the package's model again, still no failed request
        status, body = http("POST", f"{edge}{API}/apps/digits/rollback", {"by": "ops"})
        assert status == 200 and json.loads(body)["rolled_back"] == "1.0.0+site.1", body
        wait_until(lambda: (node_app(store) or {}).get("variant") is None, timeout=30)
        wait_until(lambda: load.ok > promoted_at + 20, timeout=30)
        status, body = http("POST", f"{edge}/v2/models/digits/infer", req)
        probs = next(o for o in json.loads(body)["outputs"] if o["name"] == "probabilities")
        acc_base = (np.asarray(probs["data"]).reshape(probs["shape"]).argmax(1) == ys).mean()
    finally:
        load.stop()
    assert load.failed == [], load.failed[:3]
    assert load.ok > 50
    assert acc_site > acc_base + 0.05, (acc_site, acc_base)
    assert _run_state(agent, run["run_id"])["state"] == "rolled_back"
    status, body = http("POST", f"{edge}{API}/apps/digits/rollback", {})
    assert status == 409 and json.loads(body)["error"] == "nothing_to_roll_back"
    # the cloud saw it all happen
    types = {e["type"] for e in jget(f"{store.url}{API}/events?node=site-1&limit=500")["events"]}
    assert {"finetune_started", "finetune_shadow", "model_promoted",
            "model_rolled_back"} <= types
    print(f"site accuracy: base {acc_base:.3f}, promoted {acc_site:.3f}; "
          f"held-out {m['heldout']}; replay {m['replay']}; shadow {m['shadow']}; "
          f"requests during the switches: {load.ok}, failed {len(load.failed)}")


def test_a_fine_tune_that_makes_things_worse_is_not_promoted(loop, digits_dir, tmp_path):  # noqa: F811
    """Labels that are wrong (every one off by three classes): the candidate
    learns them, loses on the held-out set and the replay set, and is refused
    with the reason; the node keeps serving the package's model."""
    store, node = loop
    agent = node(feedback={"threshold": 1.0, "max_per_minute": 100000,
                           "heldout_fraction": 0.3}, scheduling=ALWAYS)
    _publish_with_gate(store, digits_dir, tmp_path, min_samples=30, min_heldout=10,
                       shadow_requests=0)
    held = np.load(digits_dir / "heldout.npz")
    truth = _site_samples(agent, held["X_test"][:120], held["y_test"][:120])
    _label_everything(agent, truth, wrong=True)
    status, body = http("POST", f"{agent.http_url}{API}/apps/digits/finetune", {})
    assert status == 202, body
    run_id = json.loads(body)["run_id"]
    wait_until(lambda: _run_state(agent, run_id)["state"] != "training", timeout=120,
               interval=0.2)
    done = _run_state(agent, run_id)
    assert done["state"] == "rejected", done
    assert "forgets the base distribution" in done["reason"] or "no better" in done["reason"]
    assert agent.reconciler.variant("digits") is None
    assert (node_app(store) or {}).get("variant") is None
    events = jget(f"{store.url}{API}/events?node=site-1&type=finetune_rejected")
    wait_until(lambda: jget(f"{store.url}{API}/events?node=site-1&type=finetune_rejected")
               ["events"], timeout=20)
    assert events is not None


@pytest.mark.parametrize("bad", ["config", "json"])
def test_bad_finetune_requests_get_a_reason(loop, digits_dir, tmp_path, bad):  # noqa: F811
    store, node = loop
    agent = node()
    _publish_with_gate(store, digits_dir, tmp_path)
    url = f"{agent.http_url}{API}/apps/digits/finetune"
    if bad == "config":
        status, body = http("POST", url, {"config": {"learning_rate": 1}})
        assert status == 400 and json.loads(body)["error"] == "bad_config"
    else:
        status, body = http("POST", url, b"[1, 2")
        assert status == 400 and json.loads(body)["error"] == "bad_json"
    status, body = http("POST", f"{agent.http_url}{API}/apps/nope/finetune", {})
    assert status == 404 and json.loads(body)["error"] == "unknown_app"
    status, body = http("GET", f"{agent.http_url}{API}/finetune/nope")
    assert status == 404


def test_a_model_with_no_head_to_tune_says_so_and_keeps_serving(loop, digits_dir, tmp_path):  # noqa: F811
    """The manifest points at a head the graph does not have: the job ends with
    'not fine-tunable' and why, the run says so, and the app serves on."""
    store, node = loop
    agent = node(feedback={"threshold": 1.0, "max_per_minute": 100000,
                           "heldout_fraction": 0.3}, scheduling=ALWAYS)
    manifest = json.loads((digits_dir / "manifest.json").read_text())
    manifest["learning"]["head"] = "NoSuchNode"
    manifest["learning"]["gate"] = {"min_samples": 5, "min_heldout": 2}
    publish(store, digits_dir / "model.onnx", manifest, digits_dir / "labels.txt",
            tmp_path / "d.aidc")
    assign(store)
    wait_until(lambda: (node_app(store) or {}).get("status") == "ready", timeout=60)
    held = np.load(digits_dir / "heldout.npz")
    truth = _site_samples(agent, held["X_test"][:30], held["y_test"][:30])
    _label_everything(agent, truth)
    status, body = http("POST", f"{agent.http_url}{API}/apps/digits/finetune", {})
    assert status == 202, body
    run_id = json.loads(body)["run_id"]
    wait_until(lambda: _run_state(agent, run_id)["state"] != "training", timeout=60,
               interval=0.2)
    done = _run_state(agent, run_id)
    assert done["state"] == "failed" and done["reason"].startswith("not fine-tunable"), done
    assert "NoSuchNode" in done["reason"]
    status, _ = http("POST", f"{agent.http_url}/v2/models/digits/classify",
                     digit_png(held["X_test"][0]), "image/png")
    assert status == 200


def test_with_no_live_requests_the_shadow_times_out_and_the_gate_decides_alone(
        loop, digits_dir, tmp_path):  # noqa: F811
    """No live traffic during the shadow (no request, no camera frame): after
    shadow_timeout_s the gate's verdict stands alone, and says so. (Camera frames
    do feed a shadow: tests/test_learning_stream.py.)"""
    store, node = loop
    agent = node(feedback={"threshold": 1.0, "max_per_minute": 100000,
                           "heldout_fraction": 0.3}, scheduling=ALWAYS)
    _publish_with_gate(store, digits_dir, tmp_path, min_gain=0.05, max_regression=0.05,
                       shadow_requests=30, shadow_timeout_s=2, min_samples=50,
                       min_heldout=20)
    held = np.load(digits_dir / "heldout.npz")
    truth = _site_samples(agent, blur(held["X_test"][:260]), held["y_test"][:260])
    _label_everything(agent, truth)
    status, body = http("POST", f"{agent.http_url}{API}/apps/digits/finetune", {})
    assert status == 202, body
    run_id = json.loads(body)["run_id"]
    wait_until(lambda: _run_state(agent, run_id)["state"] not in ("training", "shadow"),
               timeout=120, interval=0.2)
    done = _run_state(agent, run_id)
    assert done["state"] == "promoted", done
    assert "promoted on the gate alone" in done["reason"]
    assert done["metrics"]["shadow"]["timed_out"] and done["metrics"]["shadow"]["compared"] == 0
    wait_until(lambda: (node_app(store) or {}).get("variant") == "1.0.0+site.1", timeout=30)
