"""Remote operations on real parts: a real Mosquitto, the AppStore, and real edge
agents (worker processes, ONNX Runtime, SQLite), driven over the AppStore's REST
API and CLI as an operator would.

- restart an app (its worker's pid changes, it serves again); a diagnostics
  bundle arrives in the AppStore with its parts and the MQTT password redacted;
  the self-check; bad requests get reasons; everything is in the audit log;
- a repeated command id is never run twice (neither through the AppStore nor
  when the same command reaches the node again);
- set_config changes an app's hard-example threshold, and an agent restart keeps it;
- a command for an offline node waits and runs when the node comes back; one
  that expires first is reported expired and never runs; a node that gets a
  command late answers expired without running it.
"""

from __future__ import annotations

import io
import json
import tarfile
import threading
import time

import numpy as np
import pytest

from appstore.cli import main as store_cli
from cloud_sync.connection import MqttConnection
from cloud_sync.schemas import Command
from cloud_sync.topics import Topics
from edge_node.agent import NodeAgent
from tests.appstore_support import (  # noqa: F401
    digits_dir, operator_token_file, start_store, wait_until)
from tests.models import digit_png
from tests.test_e2e import API, http, jget, publish, start_node

PASSWORD = "pw-Zq8-never-leaves"


@pytest.fixture
def ops(tmp_path, broker, prefix, digits_dir):  # noqa: F811
    store = start_store(tmp_path / "cloud", broker, prefix)
    agents: dict[str, NodeAgent] = {}

    def up(node_id: str) -> NodeAgent:
        # the broker lets anyone in: the credentials are here to be redacted
        agents[node_id] = start_node(
            tmp_path, broker, prefix, store, node_id,
            mqtt={"username": node_id, "password": PASSWORD}, telemetry_interval_s=5)
        return agents[node_id]

    def down(node_id: str) -> None:
        agents.pop(node_id).stop()

    manifest = json.loads((digits_dir / "manifest.json").read_text())
    publish(store, digits_dir / "model.onnx", manifest, digits_dir / "labels.txt",
            tmp_path / "d.aidc")
    up("n1")
    wait_until(lambda: jget(f"{store.url}{API}/nodes").get("nodes"), timeout=30)
    status, body = http("PUT", f"{store.url}{API}/nodes/n1/apps/digits", {"version": "1.0.0"})
    assert status == 200, body
    wait_until(lambda: _serving(store, "n1") == ("1.0.0", "ready"), timeout=60)
    yield store, agents, up, down
    for a in agents.values():
        a.stop()
    store.stop()


def _serving(store, node_id: str):
    rep = jget(f"{store.url}{API}/nodes/{node_id}").get("reported") or {}
    a = next((a for a in rep.get("apps", []) if a["name"] == "digits"), None)
    return (a["version"], a["status"]) if a else None


def _command(store, node_id: str, op: str, args: dict | None = None, **over):
    body = {"op": op, "args": args or {}, "by": "ops-1", **over}
    status, out = http("POST", f"{store.url}{API}/nodes/{node_id}/commands", body)
    return status, json.loads(out)


def _finished(store, cid: str, timeout: float = 60.0) -> dict:
    return wait_until(lambda: (c := jget(f"{store.url}{API}/commands/{cid}"))["state"]
                      in ("done", "failed", "expired") and c, timeout=timeout, interval=0.1)


def _classify(agent: NodeAgent, digit) -> int:
    status, _ = http("POST", f"{agent.http_url}/v2/models/digits/classify", digit_png(digit),
                     "image/png")
    return status


def test_restart_diagnostics_selfcheck_audit_and_no_second_run(  # noqa: F811
        ops, digits_dir, capsys, tmp_path):
    store, agents, _, _ = ops
    n1 = agents["n1"]
    X = np.load(digits_dir / "heldout.npz")["X_test"]

    # bad requests get their reasons; nothing is queued for them
    for node, body, want, reason in (
            ("n1", {"op": "reboot"}, 400, "bad_op"),
            ("n1", {"op": "restart_app", "args": {}}, 400, "bad_args"),
            ("n1", {"op": "restart_app", "args": {"app": "digits", "force": True}}, 400,
             "bad_args"),
            ("n1", {"op": "set_config", "args": {"app": "digits",
                                                 "feedback": {"threshold": 7}}}, 400,
             "bad_args"),
            ("n1", {"op": "selfcheck", "ttl_s": 0}, 400, "bad_ttl"),
            ("n1", {"op": "selfcheck", "command_id": "x"}, 400, "bad_command_id"),
            ("ghost", {"op": "selfcheck"}, 404, "unknown_node")):
        status, out = http("POST", f"{store.url}{API}/nodes/{node}/commands", body)
        assert status == want and json.loads(out)["error"] == reason, (body, out)
    assert jget(f"{store.url}{API}/commands")["commands"] == []

    # restart_app: a new worker process, and the app serves again
    key = n1.reconciler.serving("digits")["key"]
    pid = n1.supervisor.status()[key]["pid"]
    assert _classify(n1, X[0]) == 200
    status, cmd = _command(store, "n1", "restart_app", {"app": "digits"},
                           command_id="restart-0001")
    assert status == 201 and cmd["state"] in ("queued", "sent"), cmd
    done = _finished(store, "restart-0001")
    assert done["state"] == "done", done
    new_pid = n1.supervisor.status()[key]["pid"]
    assert new_pid and new_pid != pid
    assert done["result"] == {"app": "digits", "worker": key, "old_pid": pid, "new_pid": new_pid}
    assert _classify(n1, X[1]) == 200

    # the same command id again: the stored command, not a second restart
    status, again = _command(store, "n1", "restart_app", {"app": "digits"},
                             command_id="restart-0001")
    assert status == 200 and again["state"] == "done" and again["result"] == done["result"]
    status, out = _command(store, "n1", "selfcheck", command_id="restart-0001")
    assert status == 409 and out["error"] == "command_id_conflict"
    # ... and when the node receives it again (a resend): answered, not run
    topics = Topics(prefix=n1.cfg.mqtt.topic_prefix)
    probe = MqttConnection("probe-resend", n1.cfg.mqtt.host, n1.cfg.mqtt.port)
    probe.start()
    assert probe.wait_connected(10)
    resend = Command(command_id="restart-0001", node_id="n1", op="restart_app",
                     args={"app": "digits"}, expires_at=time.time() + 60, by="ops-1")
    assert probe.publish(topics.commands("n1"), resend.to_bytes(), qos=1)
    wait_until(lambda: jget(f"{store.url}{API}/commands/restart-0001")["duplicates"] >= 1,
               timeout=20)
    assert n1.supervisor.status()[key]["pid"] == new_pid  # not restarted twice
    row = n1.remote.get("restart-0001")
    assert row["runs"] == 1 and row["repeats"] >= 1 and row["state"] == "done"
    # a command addressed to another node on n1's topic is refused and never run
    other = Command(command_id="other-00001", node_id="n2", op="restart_app",
                    args={"app": "digits"}, expires_at=time.time() + 60)
    assert probe.publish(topics.commands("n1"), other.to_bytes(), qos=1)
    wait_until(lambda: n1.reconciler.rejected.get("command_wrong_node"), timeout=10)
    assert n1.remote.get("other-00001") is None
    assert n1.supervisor.status()[key]["pid"] == new_pid
    probe.stop()

    # selfcheck: the node's health checks, all passing
    status, cmd = _command(store, "n1", "selfcheck")
    done = _finished(store, cmd["command_id"])
    assert done["state"] == "done", done
    checks = {c["name"]: c for c in done["result"]["checks"]}
    assert set(checks) >= {"broker_connected", "workers_alive", "disk_free", "db_integrity"}
    assert done["result"]["ok"] and all(c["ok"] for c in checks.values()), checks
    assert checks["workers_alive"]["data"]["pids"][key] == new_pid

    # diagnostics, through the CLI: the bundle arrives in the AppStore
    ops2 = ["--api-token-file", str(operator_token_file(store, "ops-2", "operator", tmp_path))]
    rc = store_cli(["store", "command", "n1", "diagnostics", "--arg", "log_lines=200",
                    "--wait", "--bundle", str(tmp_path / "diag.tar.gz"), "--api", store.url,
                    *ops2])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    diag = jget(f"{store.url}{API}/commands?node=n1&limit=1")["commands"][0]
    assert diag["op"] == "diagnostics" and diag["state"] == "done", diag
    assert f"{diag['command_id']} n1 diagnostics: done" in printed, printed
    status, raw = http("GET", f"{store.url}{API}/commands/{diag['command_id']}/bundle")
    assert status == 200
    import hashlib

    assert hashlib.sha256(raw).hexdigest() == diag["bundle_sha256"]
    assert (tmp_path / "diag.tar.gz").read_bytes() == raw  # the CLI's --bundle, with its token
    with tarfile.open(fileobj=io.BytesIO(raw), mode="r:gz") as tar:
        parts = {m.name.split("/", 1)[1]: tar.extractfile(m).read() for m in tar.getmembers()}
    assert set(parts) == {"manifest.json", "logs.txt", "workers.txt", "config.json",
                          "health.json", "selfcheck.json"}
    assert f"== {key} (ready, pid {new_pid})".encode() in parts["workers.txt"]
    config = json.loads(parts["config.json"])
    assert config["mqtt"]["password"] == "***" and config["mqtt"]["username"] == "n1"
    assert all(PASSWORD.encode() not in data for data in parts.values())
    health = json.loads(parts["health.json"])
    assert health["reported"]["node_id"] == "n1"
    assert health["workers"][key]["pid"] == new_pid
    assert "pending" in health["outbox"] and health["disk"]["free_mb"] > 0
    assert health["versions"]["agent"] and health["versions"]["onnxruntime"]
    assert json.loads(parts["selfcheck.json"])["ok"] is True
    status, out = http("GET", f"{store.url}{API}/commands/restart-0001/bundle")
    assert status == 404 and json.loads(out)["error"] == "no_bundle"

    # the audit log: who asked what, when, for which node, and the outcome
    audit = jget(f"{store.url}{API}/audit?node=n1")["audit"]
    restart = [a for a in audit if a["command_id"] == "restart-0001"]
    assert [a["action"] for a in reversed(restart)] == [
        "command_requested", "command_finished", "command_repeated", "command_repeated"] \
        or [a["action"] for a in reversed(restart)][:3] == [
            "command_requested", "command_finished", "command_repeated"], restart
    # the actor is the authenticated operator; the request's "by" only a note
    assert all(a["actor"] == "admin" and a["ts"] > 0 for a in restart)
    assert "by 'ops-1'" in restart[-1]["detail"], restart
    assert restart[-1]["args"] == {"app": "digits"}
    finished = next(a for a in restart if a["action"] == "command_finished")
    assert finished["outcome"] == "done"
    assert any(a["actor"] == "ops-2" and a["op"] == "diagnostics"
               and a["outcome"] == "done" for a in audit)
    assert store_cli(["store", "audit", "--node", "n1", "--api", store.url, *ops2]) == 0
    assert "ops-2 diagnostics n1" in capsys.readouterr().out
    assert store_cli(["store", "commands", "--node", "n1", "--api", store.url, *ops2]) == 0
    listed = capsys.readouterr().out
    assert f"restart-0001 n1 restart_app: done (pid {pid} -> {new_pid})" in listed, listed
    assert "selfcheck: done (broker_connected ok, workers_alive ok" in listed, listed


def test_set_config_changes_the_threshold_and_survives_a_restart(ops, tmp_path, broker,
                                                                 prefix):
    store, agents, up, down = ops
    served = agents["n1"].registry.get("digits")
    before = agents["n1"]._policy(served).threshold
    assert before != 0.93
    status, cmd = _command(store, "n1", "set_config",
                           {"app": "digits", "feedback": {"threshold": 0.93,
                                                          "policy": "margin"}})
    assert status == 201, cmd
    done = _finished(store, cmd["command_id"])
    assert done["state"] == "done", done
    assert done["result"]["effective"]["policy"]["threshold"] == 0.93
    assert done["result"]["effective"]["policy"]["kind"] == "margin"
    p = agents["n1"]._policy(served)
    assert (p.kind, p.threshold) == ("margin", 0.93)

    # the agent restarts: the cloud's setting is still in force
    down("n1")
    n1 = up("n1")
    wait_until(lambda: n1.registry.get("digits") is not None
               and n1.registry.get("digits").ready, timeout=60)
    p = n1._policy(n1.registry.get("digits"))
    assert (p.kind, p.threshold) == ("margin", 0.93)
    assert n1.cfg.feedback.apps["digits"].threshold == 0.93

    # feedback: null gives the node's own config back
    status, cmd = _command(store, "n1", "set_config", {"app": "digits", "feedback": None})
    assert _finished(store, cmd["command_id"])["state"] == "done"
    assert n1._policy(n1.registry.get("digits")).threshold == before


def test_offline_node_runs_a_held_command_and_an_expired_one_never(ops):
    store, agents, up, down = ops
    down("n1")
    wait_until(lambda: not jget(f"{store.url}{API}/nodes/n1")["online"], timeout=30)
    status, held = _command(store, "n1", "selfcheck", ttl_s=120)
    assert status == 201
    status, short = _command(store, "n1", "restart_app", {"app": "digits"}, ttl_s=2)
    assert status == 201
    time.sleep(1.0)
    assert jget(f"{store.url}{API}/commands/{held['command_id']}")["state"] == "queued"
    gone = _finished(store, short["command_id"], timeout=15)
    assert gone["state"] == "expired" and "offline" in gone["error"], gone
    audit = jget(f"{store.url}{API}/audit?node=n1")["audit"]
    assert any(a["command_id"] == short["command_id"] and a["outcome"] == "expired"
               for a in audit)

    n1 = up("n1")  # back: the held command runs, the expired one never does
    done = _finished(store, held["command_id"], timeout=60)
    assert done["state"] == "done" and done["sends"] >= 1, done
    time.sleep(1.0)
    assert n1.remote.get(short["command_id"]) is None
    assert n1.remote.stats.get("run_restart_app", 0) == 0

    # a command that reaches the node after its expiry: answered expired, not run
    wait_until(lambda: n1.registry.get("digits") is not None, timeout=60)
    topics = Topics(prefix=n1.cfg.mqtt.topic_prefix)
    probe = MqttConnection("probe-late", n1.cfg.mqtt.host, n1.cfg.mqtt.port)
    probe.start()
    assert probe.wait_connected(10)
    late = Command(command_id="late-000001", node_id="n1", op="restart_app",
                   args={"app": "digits"}, issued_at=time.time() - 120,
                   expires_at=time.time() - 60)
    assert probe.publish(topics.commands("n1"), late.to_bytes(), qos=1)
    row = wait_until(lambda: n1.remote.get("late-000001"), timeout=10)
    assert row["state"] == "expired" and row["runs"] == 0
    assert n1.remote.stats.get("run_restart_app", 0) == 0
    probe.stop()
