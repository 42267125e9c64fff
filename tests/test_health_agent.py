"""The health monitor inside a real edge agent (real broker, real node.db, real
HTTP): a node.db damaged while the agent runs is restored live, one destroyed while
it is stopped is restored at start; the faults are journalled (GET /api/faults,
/metrics), reported as events through the outbox; ``aidc edge doctor`` reports on
a running agent and on the node's files alone; the cloud runs ``doctor``."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edge_node.agent import NodeAgent
from edge_node.config import load_config
from edge_node.health import db_integrity as dbi
from tests.appstore_support import start_store, wait_until  # noqa: F401
from tests.test_e2e import API, http, jget, start_node
from tests.test_health_db_integrity import corrupt, sample

AIDC = str(Path(sys.executable).parent / "aidc")


def make_agent(tmp_path, broker, prefix, **over) -> NodeAgent:
    cfg = load_config(node_id="site-1", data_dir=tmp_path / "edge",
                      mqtt={"host": broker.host, "port": broker.port, "topic_prefix": prefix},
                      http={"port": 0}, **over)
    return NodeAgent(cfg)


def check_of(agent: NodeAgent, name: str):
    return next(c for c in agent.health.checks if c.name == name)


def events(db: Path) -> list[dict]:
    c = sqlite3.connect(str(db))
    try:
        return [json.loads(r[0]) for r in c.execute(
            "SELECT payload FROM cloud_sync_outbox WHERE kind = 'event' ORDER BY seq")]
    finally:
        c.close()


def fault_events(db: Path, fault: str) -> list[str]:
    return [e["type"] for e in events(db) if e["type"].startswith("fault_")
            and e["data"].get("fault") == fault]


@pytest.fixture
def agents():
    started: list[NodeAgent] = []
    yield started
    for a in started:
        try:
            a.stop()
        except Exception:  # noqa: BLE001
            pass


def test_a_damaged_node_db_is_restored_live_in_a_running_agent(tmp_path, shared_broker,
                                                                prefix, agents):
    agent = make_agent(tmp_path, shared_broker, prefix)
    c = check_of(agent, "db_integrity")
    c.interval_s = c.base_interval_s = 0.5
    agent.start()
    agents.append(agent)
    db = agent.cfg.data_dir / "node.db"
    # the first ok probe makes the last good copy
    wait_until(lambda: dbi.copy_path(db).exists(), timeout=30)
    for i in range(300):
        agent.store.add_sample(sample(i))
    agent.store.put_json("probe", {"v": 1})
    check_of(agent, "db_integrity").backup_now()
    agent.store.put_json("probe", {"v": 2})  # after the copy: salvaged if its page reads
    for i in range(300, 340):
        agent.store.add_sample(sample(i))
    t0 = time.time()
    corrupt(db, first_page=3, every=2)
    def healed():
        status, raw = http("GET", f"{agent.http_url}/api/faults")
        if status != 200:  # 503 while node.db is damaged
            return None
        b = json.loads(raw)
        return b if b["summary"].get("db_corrupt", {}).get("healed") else None

    body = wait_until(healed, timeout=60, interval=0.2)
    healed_in = time.time() - t0
    s = body["summary"]["db_corrupt"]
    assert s["detected"] == 1 and s["mean_time_to_heal_s"] is not None
    row = next(r for r in body["recent"] if r["kind"] == "db_corrupt" and r["phase"] == "healed")
    assert "restored the last good copy" in row["remedy"]
    assert healed_in < 60
    # the node goes on, on the last good copy plus what the damaged file still held
    # (edge_node/health/db_salvage.py), with the same open connections
    assert dbi.quick_check(db)[0]
    salv = row["data"]["salvage"]["tables"]
    assert agent.store.get_json("probe") == ({"v": 2} if salv["kv"]["updated"] else {"v": 1})
    assert agent.store.count("samples") == 300 + salv["samples"]["inserted"]
    agent.store.add_sample(sample(999))
    assert http("GET", f"{agent.http_url}/api/v1/status")[0] == 200
    # reported to the cloud through the outbox (the healed event carries the detection)
    healed = [e for e in events(db) if e["type"] == "fault_healed"
              and e["data"]["fault"] == "db_corrupt"]
    assert healed and healed[0]["data"]["detected_at"] >= t0 - 1
    # and in /metrics
    status, text = http("GET", f"{agent.http_url}/metrics")
    assert status == 200
    assert b'aidc_faults_detected_total{kind="db_corrupt"} 1.0' in text


def test_a_node_db_destroyed_while_stopped_is_restored_at_start(tmp_path, shared_broker,
                                                                prefix, agents):
    agent = make_agent(tmp_path, shared_broker, prefix)
    agent.start()
    for i in range(50):
        agent.store.add_sample(sample(i))
    agent.stop()  # a clean stop: the last good copy, with the 50 samples
    db = agent.cfg.data_dir / "node.db"
    assert json.loads(dbi.meta_path(db).read_text())["counts"]["samples"] == 50
    corrupt(db, first_page=1)  # page 1 too: not a database any more
    again = make_agent(tmp_path, shared_broker, prefix)
    again.start()
    agents.append(again)
    assert again.store.count("samples") == 50
    s = jget(f"{again.http_url}/api/faults")["summary"]["db_corrupt"]
    assert s["detected"] == 1 and s["healed"] == 1
    assert fault_events(db, "db_corrupt") == ["fault_detected", "fault_healed"]
    assert list(db.parent.glob("node.db.corrupt-*"))


def test_doctor_on_a_running_agent_and_on_the_files_alone(tmp_path, shared_broker, prefix,
                                                          agents):
    agent = make_agent(tmp_path, shared_broker, prefix)
    agent.start()
    agents.append(agent)
    wait_until(lambda: agent.conn.connected.is_set(), timeout=30)
    cfg_file = tmp_path / "node.json"
    raw = {"node_id": "site-1", "data_dir": str(agent.cfg.data_dir),
           "mqtt": {"host": shared_broker.host, "port": shared_broker.port,
                    "topic_prefix": prefix}, "http": {"port": 0}}
    cfg_file.write_text(json.dumps(raw))

    def doctor(*extra):
        return subprocess.run([AIDC, "edge", "doctor", "--config", str(cfg_file), *extra],
                              capture_output=True, text=True, timeout=120)

    r = doctor("--url", agent.http_url)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "the running agent" in r.stdout
    for name in ("broker_connected", "workers_alive", "disk_space", "db_integrity", "outbox",
                 "config"):
        assert any(line.strip().startswith("✓ " + name) for line in r.stdout.splitlines()), \
            r.stdout
    assert "fault journal:" in r.stdout
    r = doctor("--url", agent.http_url, "--json")
    rep = json.loads(r.stdout)
    assert rep["ok"] and {c["name"] for c in rep["checks"]} >= {"disk_space", "config"}
    # the files alone (the agent not asked): the same checks on plain values
    r = doctor("--offline")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "offline" in r.stdout
    # a truncated config file: ✗ and exit 1; --fix puts the last good one back
    (tmp_path / "node.json.last-good").write_text(cfg_file.read_text())
    good = cfg_file.read_text()
    cfg_file.write_text(good[: len(good) // 2])
    r = doctor("--offline")
    assert r.returncode == 1 and "✗ config" in r.stdout and "config_corrupt" in r.stdout
    r = doctor("--offline", "--fix")
    assert r.returncode == 0, r.stdout
    assert cfg_file.read_text() == good
    assert "config_corrupt" in r.stdout  # in the journal summary now
    # no agent at that address: the report says so, exit 1
    r = doctor("--url", "http://127.0.0.1:9")
    assert r.returncode == 1 and "✗ agent_running" in r.stdout


def test_the_cloud_runs_doctor(tmp_path, broker, prefix, agents):
    store = start_store(tmp_path / "cloud", broker, prefix)
    try:
        agent = start_node(tmp_path, broker, prefix, store)
        agents.append(agent)
        wait_until(lambda: jget(f"{store.url}{API}/nodes").get("nodes"), timeout=30)
        status, out = http("POST", f"{store.url}{API}/nodes/site-1/commands",
                           {"op": "doctor", "args": {"fix": True}, "by": "ops-1"})
        assert status in (200, 201, 202), out
        cid = json.loads(out)["command_id"]
        cmd = wait_until(lambda: (c := jget(f"{store.url}{API}/commands/{cid}"))["state"]
                         in ("done", "failed") and c, timeout=60, interval=0.2)
        assert cmd["state"] == "done", cmd
        res = cmd["result"]
        assert res["fixed"] is True and "faults" in res
        assert {c["name"] for c in res["checks"]} >= {"broker_connected", "db_integrity",
                                                      "disk_space", "config"}
        status, out = http("POST", f"{store.url}{API}/nodes/site-1/commands",
                           {"op": "doctor", "args": {"fix": "maybe"}})
        cid = json.loads(out)["command_id"] if status < 300 else None
        if cid:  # the node refuses bad args with the reason
            cmd = wait_until(lambda: (c := jget(f"{store.url}{API}/commands/{cid}"))["state"]
                             in ("done", "failed") and c, timeout=60, interval=0.2)
            assert cmd["state"] == "failed" and "bad_args" in cmd["error"]
    finally:
        store.stop()


def test_a_broker_outage_is_one_episode_not_a_storm(tmp_path, broker, prefix, agents):
    """The broker stopped: the monitor finds it within its interval, says once that
    the connection heals by itself, and closes the episode when it is back."""
    agent = make_agent(tmp_path, broker, prefix)
    c = check_of(agent, "broker_connected")
    c.interval_s, c.start_delay_s = 0.3, 0.0
    agent.start()
    agents.append(agent)
    db = agent.cfg.data_dir / "node.db"
    wait_until(lambda: agent.conn.connected.is_set(), timeout=30)
    # a probe before the first connect may have found it down: that episode closes first
    wait_until(lambda: "broker_connected" not in agent.health.open_faults(), timeout=30)
    before = len(fault_events(db, "broker_unreachable"))
    n_before = agent.fault_journal.summary().get("broker_unreachable", {})
    broker.stop()
    t0 = time.monotonic()
    wait_until(lambda: "broker_connected" in agent.health.open_faults(), timeout=30)
    detected_in = time.monotonic() - t0
    time.sleep(2.0)  # several probes find it down: still one episode
    broker.start()
    wait_until(lambda: "broker_connected" not in agent.health.open_faults(), timeout=60)
    seen = [(e["type"], e["data"]) for e in events(db) if e["type"].startswith("fault_")]
    assert fault_events(db, "broker_unreachable")[before:] == [
        "fault_detected", "fault_unhealed", "fault_healed"], seen
    healed = [e for e in events(db) if e["type"] == "fault_healed"][-1]["data"]
    assert healed["remedy"] == "recovered by itself" and healed["count"] >= 2, seen
    s = agent.fault_journal.summary()["broker_unreachable"]
    assert [s[k] - n_before.get(k, 0) for k in ("detected", "healed", "unhealed")] == [1, 1, 1]
    assert detected_in < 30
