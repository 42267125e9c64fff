"""Rollouts in waves with health gates, on real parts: a real Mosquitto, the
AppStore, and three real edge agents (worker processes, ONNX Runtime, SQLite),
driven over the AppStore's REST API as an operator would.

- a good version reaches a group canary-first, wave by wave, each wave gated on
  the nodes' readiness and their telemetry (requests, errors, latency);
- a deliberately bad version (it loads and matches its manifest, so the
  AppStore accepts it, but every inference fails) fails its canary's health
  gate on the error rate the node's telemetry reports: that wave is rolled back
  automatically, the rollout halts with the reason, and the other nodes never
  see it;
- a node offline during a rollout is not waited for and converges when it
  comes back; pause / resume / abort / rollback; bad requests get reasons.
"""

from __future__ import annotations

import json
import re
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from appstore.cli import main as store_cli
from edge_node.agent import NodeAgent
from tests.appstore_support import (  # noqa: F401
    digits_dir, operator_token_file, start_store, wait_until)
from tests.models import digit_png
from tests.test_e2e import API, http, jget, publish, start_node

NODES = ("n1", "n2", "n3")
FAST_GATE = {"bake_s": 1.0, "ready_timeout_s": 60, "min_requests": 5, "max_error_rate": 0.05}


@pytest.fixture
def fleet(tmp_path, broker, prefix, digits_dir):  # noqa: F811
    store = start_store(tmp_path / "cloud", broker, prefix)
    agents: dict[str, NodeAgent] = {}

    def up(node_id: str) -> NodeAgent:
        agents[node_id] = start_node(tmp_path, broker, prefix, store, node_id,
                                     telemetry_interval_s=0.5)
        return agents[node_id]

    for n in NODES:
        up(n)
    wait_until(lambda: sum(x["online"] for x in jget(f"{store.url}{API}/nodes")["nodes"])
               == len(NODES), timeout=30)
    for n in NODES:
        status, body = http("PUT", f"{store.url}{API}/nodes/{n}/labels",
                            {"site": "mine-a", "group": "cameras", "tags": ["x86"]})
        assert status == 200, body
    yield store, agents, up
    for a in agents.values():
        a.stop()
    store.stop()


def failing_model(src: Path, dst: Path) -> Path:
    """The digits model with a defect neither the AppStore's checks nor the node's
    start-up self-check (a blank image) can see: it loads, its tensors match the
    manifest, a blank input passes, but any real digit makes it fail. It reshapes
    the input to ``1 + 100 x sum(input)`` rows (1 for a blank image, impossible
    for anything else: ONNX Runtime fails the run) and adds 0 x that into the
    class scores."""
    import onnx
    from onnx import TensorProto, helper

    m = onnx.load(str(src))
    g = m.graph
    for n in g.node:
        for i, name in enumerate(n.output):
            if name == "probabilities":
                n.output[i] = "probabilities_inner"
        for i, name in enumerate(n.input):
            if name == "probabilities":
                n.input[i] = "probabilities_inner"
    g.initializer.extend([helper.make_tensor("hundred", TensorProto.FLOAT, [], [100.0]),
                          helper.make_tensor("one_i", TensorProto.INT64, [], [1]),
                          helper.make_tensor("one_shape", TensorProto.INT64, [1], [1]),
                          helper.make_tensor("minus_one", TensorProto.INT64, [1], [-1]),
                          helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0])])
    g.node.extend([
        helper.make_node("ReduceSum", ["cast_input"], ["in_sum"], keepdims=0),
        helper.make_node("Mul", ["in_sum", "hundred"], ["in_scaled"]),
        helper.make_node("Cast", ["in_scaled"], ["k0"], to=TensorProto.INT64),
        helper.make_node("Add", ["k0", "one_i"], ["k1"]),
        helper.make_node("Reshape", ["k1", "one_shape"], ["k"]),
        helper.make_node("Concat", ["k", "minus_one"], ["bad_shape"], axis=0),
        helper.make_node("Reshape", ["cast_input", "bad_shape"], ["bad_rows"]),
        helper.make_node("ReduceSum", ["bad_rows"], ["bad_sum"], keepdims=0),
        helper.make_node("Mul", ["bad_sum", "zero"], ["bad_zero"]),
        helper.make_node("Add", ["probabilities_inner", "bad_zero"], ["probabilities"]),
    ])
    onnx.save(m, str(dst))
    return dst


def _publish(store, digits_dir, tmp_path, version: str, bad: bool = False) -> None:  # noqa: F811
    manifest = json.loads((digits_dir / "manifest.json").read_text())
    manifest["version"] = version
    model = digits_dir / "model.onnx"
    if bad:  # beside a copy of the package's other files (replay set, labels)
        import shutil

        copy = tmp_path / f"bad-{version}"
        shutil.copytree(digits_dir, copy)
        model = failing_model(model, copy / "model.onnx")
    publish(store, model, manifest, digits_dir / "labels.txt", tmp_path / f"d-{version}.aidc")


def _rollout(store, version: str, **over) -> dict:
    body = {"app": "digits", "version": version, "target": {"group": "cameras"},
            "waves": {"canary": 1, "steps": [100]}, "gate": FAST_GATE, "by": "ops-1", **over}
    status, out = http("POST", f"{store.url}{API}/rollouts", body)
    assert status == 201, out
    return json.loads(out)


def _state(store, rid: str) -> dict:
    return jget(f"{store.url}{API}/rollouts/{rid}")


def _serving(store, node_id: str) -> tuple[str, str] | None:
    rep = jget(f"{store.url}{API}/nodes/{node_id}").get("reported") or {}
    a = next((a for a in rep.get("apps", []) if a["name"] == "digits"), None)
    return (a["version"], a["status"]) if a else None


def _count_fetches(agents: dict[str, NodeAgent]) -> dict[str, list[str]]:
    """Which packages each node downloads from now on (the real fetch, observed)."""
    seen: dict[str, list[str]] = {n: [] for n in agents}
    for node_id, agent in agents.items():
        fetcher = agent.reconciler.fetcher
        real = fetcher.fetch

        def fetch(sha256, *a, _real=real, _seen=seen[node_id], **kw):
            _seen.append(sha256)
            return _real(sha256, *a, **kw)

        fetcher.fetch = fetch
    return seen


class Traffic:
    """Classifies digits on every live node until stopped; counts answers by status."""

    def __init__(self, agents: dict[str, NodeAgent], digits) -> None:
        self.agents, self.digits = agents, digits
        self.codes: dict[int, int] = {}
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        i = 0
        while not self.stopped.is_set():
            for agent in list(self.agents.values()):
                if agent.http_url is None or getattr(agent, "_stopped", False):
                    continue
                png = digit_png(self.digits[i % len(self.digits)])
                i += 1
                try:
                    status, _ = http("POST", f"{agent.http_url}/v2/models/digits/classify", png,
                                     "image/png")
                except OSError:
                    continue  # a node being stopped on purpose
                self.codes[status] = self.codes.get(status, 0) + 1
            time.sleep(0.02)

    def __enter__(self) -> Traffic:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stopped.set()
        self.thread.join(10)


def test_waves_gate_on_health_and_a_bad_version_is_rolled_back(fleet, digits_dir, tmp_path):  # noqa: F811
    store, agents, _ = fleet
    X = np.load(digits_dir / "heldout.npz")["X_test"]

    # 1.0.0 to the group: canary, then the rest, each wave ready + baked on telemetry
    _publish(store, digits_dir, tmp_path, "1.0.0")
    ro = _rollout(store, "1.0.0")
    assert [w["nodes"] for w in ro["waves"]] == [1, 2]
    wait_until(lambda: all(_serving(store, n) == ("1.0.0", "ready") for n in NODES[:1]),
               timeout=60)
    with Traffic(agents, X[:50]) as traffic:
        done = wait_until(lambda: (s := _state(store, ro["rollout_id"]))["state"] in
                          ("succeeded", "failed") and s, timeout=90)
        assert done["state"] == "succeeded", done
        assert [e["what"] for e in done["log"]] == [
            "created", "wave_started", "baking", "wave_passed", "wave_started", "baking",
            "succeeded"]
        assert all(_serving(store, n) == ("1.0.0", "ready") for n in NODES)
        # the gate read the nodes' telemetry for this version
        health = {r["node_id"]: r for r in jget(f"{store.url}{API}/telemetry?app=digits")[
            "telemetry"]}
        assert sum(h["requests"] for h in health.values()) >= 0  # interval figures present

        # 1.1.0 is broken: the canary serves it, every request fails, the error
        # rate in its telemetry fails the gate while baking; its wave goes back to
        # 1.0.0 and the rollout halts with the reason; the other nodes never see it
        _publish(store, digits_dir, tmp_path, "1.1.0", bad=True)
        sha_bad = jget(f"{store.url}{API}/apps/digits/versions/1.1.0")["sha256"]
        fetched = _count_fetches(agents)
        before = dict(traffic.codes)
        bad = _rollout(store, "1.1.0", gate={**FAST_GATE, "bake_s": 30})
        done = wait_until(lambda: (s := _state(store, bad["rollout_id"]))["state"] in
                          ("succeeded", "failed") and s, timeout=90)
        assert done["state"] == "failed", done
        # (the node closes its telemetry interval when a version starts serving, so
        # the gate sees 1.1.0's answers only: all failed)
        assert re.match(r"wave 0: error rate 1\.000 > 0\.05 \(\d+ of \d+ requests\)",
                        done["reason"]), done["reason"]
        assert "wave 0 rolled back (1 nodes)" in done["reason"]
        canary = done["nodes"][0]
        assert canary["wave"] == 0 and canary["state"] == "rolled_back"
        assert canary["prev_version"] == "1.0.0" and "error rate" in canary["reason"]
        assert all(n["state"] == "pending" for n in done["nodes"][1:])  # never touched
        wait_until(lambda: _serving(store, canary["node_id"]) == ("1.0.0", "ready"),
                   timeout=60)
        failed_during = sum(v for k, v in traffic.codes.items() if k >= 500) - \
            sum(v for k, v in before.items() if k >= 500)
        time.sleep(1.5)
        after = dict(traffic.codes)
    assert after.get(200, 0) > 50
    assert not any(k >= 500 for k in before), before  # the good version: every answer 200
    # the bad version failed requests on the canary only, until the gate pulled it
    assert failed_during >= FAST_GATE["min_requests"]
    assert sum(v for k, v in traffic.codes.items() if k >= 500) == \
        sum(v for k, v in after.items() if k >= 500)  # none once rolled back
    # the rollback needed no download: the canary fetched 1.1.0 only, it still had 1.0.0
    assert fetched[canary["node_id"]] == [sha_bad], fetched


def test_an_offline_node_converges_later_and_operators_control_rollouts(
        fleet, digits_dir, tmp_path, capsys):  # noqa: F811
    store, agents, up = fleet
    _publish(store, digits_dir, tmp_path, "1.0.0")
    _publish(store, digits_dir, tmp_path, "1.2.0")

    # bad requests get reasons
    for body, status, reason in (
            ({"app": "digits", "version": "9.9.9", "target": {"all": True}}, 404, None),
            ({"app": "digits", "version": "1.0.0", "target": {}}, 400, "bad_rollout"),
            ({"app": "digits", "version": "1.0.0", "target": {"group": "nope"}}, 400,
             "no_nodes"),
            ({"app": "digits", "version": "1.0.0", "target": {"nodes": ["ghost"]}}, 400,
             "unknown_node"),
            ({"app": "digits", "version": "1.0.0", "target": {"all": True},
              "waves": {"steps": [50]}}, 400, "bad_rollout")):
        got, out = http("POST", f"{store.url}{API}/rollouts", body)
        assert got == status, out
        if reason:
            assert json.loads(out)["error"] == reason

    # a version no node has room for: refused up front, nothing deployed
    manifest = json.loads((digits_dir / "manifest.json").read_text())
    manifest.update(version="3.0.0", resources={"card_fraction": 1.0, "memory_mb": 10 ** 7})
    publish(store, digits_dir / "model.onnx", manifest, digits_dir / "labels.txt",
            tmp_path / "huge.aidc")
    got, out = http("POST", f"{store.url}{API}/rollouts",
                    {"app": "digits", "version": "3.0.0", "target": {"all": True}})
    err = json.loads(out)
    assert got == 409 and err["error"] == "placement", out
    assert set(err["detail"]["nodes"]) == set(NODES) and "10000000 MB" in \
        err["detail"]["nodes"]["n1"]
    got, out = http("POST", f"{store.url}{API}/rollouts", {
        "app": "digits", "version": "3.0.0", "target": {"all": True}, "skip_unfit": True})
    assert got == 400 and json.loads(out)["error"] == "no_nodes"
    assert jget(f"{store.url}{API}/nodes/n1")["assignments"] == []

    # n3 goes offline; a rollout to everyone does not wait for it
    agents["n3"].stop()
    wait_until(lambda: not jget(f"{store.url}{API}/nodes/n3")["online"], timeout=30)
    gate = {**FAST_GATE, "min_requests": 0}
    # as an operator would: the CLI, following the rollout to its end
    result: dict = {}
    ops1 = operator_token_file(store, "ops-1", "operator", tmp_path)
    cli = threading.Thread(target=lambda: result.update(rc=store_cli(
        ["store", "rollout", "start", "digits", "1.0.0", "--all", "--bake", "1", "--wait",
         "--api", store.url, "--api-token-file", str(ops1)])))
    cli.start()
    ro = wait_until(lambda: jget(f"{store.url}{API}/rollouts?app=digits")["rollouts"],
                    timeout=10)[0]
    # a second rollout of the same app while one runs: 409
    got, out = http("POST", f"{store.url}{API}/rollouts",
                    {"app": "digits", "version": "1.2.0", "target": {"all": True}})
    assert got == 409 and json.loads(out)["error"] == "rollout_running"
    cli.join(120)
    assert result.get("rc") == 0, result
    printed = capsys.readouterr().out
    assert f"{ro['rollout_id']} digits 1.0.0: succeeded" in printed, printed
    done = _state(store, ro["rollout_id"])
    assert done["state"] == "succeeded" and done["created_by"] == "ops-1", done
    n3 = next(n for n in done["nodes"] if n["node_id"] == "n3")
    assert n3["state"] == "offline" and "converges" in n3["reason"]
    up("n3")  # back: its retained desired state already says 1.0.0
    wait_until(lambda: _serving(store, "n3") == ("1.0.0", "ready"), timeout=90)

    # pause holds the next wave; resume carries on; abort with rollback reverts
    ro = _rollout(store, "1.2.0", target={"all": True}, gate={**gate, "bake_s": 30})
    wait_until(lambda: _state(store, ro["rollout_id"])["state"] == "baking", timeout=60)
    got, out = http("POST", f"{store.url}{API}/rollouts/{ro['rollout_id']}/pause",
                    {"by": "ops-2"})
    assert got == 200 and json.loads(out)["state"] == "paused"
    time.sleep(1.5)
    assert _state(store, ro["rollout_id"])["wave"] == 0
    got, out = http("POST", f"{store.url}{API}/rollouts/{ro['rollout_id']}/resume", {})
    assert got == 200 and json.loads(out)["state"] == "waiting"
    got, out = http("POST", f"{store.url}{API}/rollouts/{ro['rollout_id']}/abort",
                    {"by": "ops-2", "rollback": True})
    done = json.loads(out)
    assert got == 200 and done["state"] == "aborted" and "admin" in done["reason"]
    canary = next(n for n in done["nodes"] if n["wave"] == 0)
    assert canary["state"] == "rolled_back"
    wait_until(lambda: _serving(store, canary["node_id"]) == ("1.0.0", "ready"), timeout=60)
    got, out = http("POST", f"{store.url}{API}/rollouts/{ro['rollout_id']}/resume", {})
    assert got == 409 and json.loads(out)["error"] == "not_paused"
    listed = jget(f"{store.url}{API}/rollouts?app=digits")["rollouts"]
    assert [r["state"] for r in listed] == ["aborted", "succeeded"]


def test_subscriptions_give_a_channel_to_nodes_as_they_come_and_rollouts_move_it(
        fleet, digits_dir, tmp_path, capsys):  # noqa: F811
    """A group subscribed to digits@stable: its nodes get the channel's version, a node
    labelled into the group later converges by itself, and a rollout that names the
    channel moves it when every wave passed, so later nodes get the new version."""
    store, agents, up = fleet
    _publish(store, digits_dir, tmp_path, "1.0.0")
    _publish(store, digits_dir, tmp_path, "1.2.0")
    url = f"{store.url}{API}"

    got, out = http("POST", f"{url}/subscriptions", {"app": "digits", "channel": "stable",
                                                     "target": {"group": "cameras"}})
    assert got == 400 and json.loads(out)["error"] == "unknown_channel"
    got, out = http("PUT", f"{url}/apps/digits/channels/Stable!", {"version": "1.0.0"})
    assert got == 400 and json.loads(out)["error"] == "bad_channel"
    got, out = http("PUT", f"{url}/apps/digits/channels/stable", {"version": "7.0.0"})
    assert got == 404
    # as an operator would, with the CLI
    ops1 = ["--api-token-file", str(operator_token_file(store, "ops-1", "operator", tmp_path))]
    assert store_cli(["store", "channel", "digits", "stable", "1.0.0", "--api", store.url,
                      *ops1]) == 0
    assert store_cli(["store", "subscribe", "digits", "--channel", "stable", "--group",
                      "cameras", "--api", store.url, *ops1]) == 0
    assert "digits@stable (1.0.0)" in capsys.readouterr().out
    sub = jget(f"{url}/subscriptions?app=digits")["subscriptions"][0]
    wait_until(lambda: all(_serving(store, n) == ("1.0.0", "ready") for n in NODES),
               timeout=90)

    # a node joins the group later: it converges without anyone assigning it
    up("n4")
    assert http("PUT", f"{url}/nodes/n4/labels", {"group": "cameras"})[0] == 200
    wait_until(lambda: _serving(store, "n4") == ("1.0.0", "ready"), timeout=90)

    # a rollout that names the channel moves it when it succeeds
    ro = _rollout(store, "1.2.0", channel="stable", gate={**FAST_GATE, "min_requests": 0},
                  waves={"canary": 1, "steps": [100]})
    done = wait_until(lambda: (s := _state(store, ro["rollout_id"]))["state"] in
                      ("succeeded", "failed") and s, timeout=120)
    assert done["state"] == "succeeded" and "channel stable now 1.2.0" in done["reason"], done
    chans = jget(f"{url}/apps/digits/channels")["channels"]
    assert [(c["channel"], c["version"]) for c in chans] == [("stable", "1.2.0")]
    up("n5")
    assert http("PUT", f"{url}/nodes/n5/labels", {"group": "cameras"})[0] == 200
    wait_until(lambda: _serving(store, "n5") == ("1.2.0", "ready"), timeout=90)
    listed = jget(f"{url}/subscriptions?app=digits")["subscriptions"]
    assert listed[0]["id"] == sub["id"] and listed[0]["nodes"] == 5
    wait_until(lambda: jget(f"{url}/subscriptions?app=digits")["subscriptions"][0][
        "on_channel_version"] == 5, timeout=30)
