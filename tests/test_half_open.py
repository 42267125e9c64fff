"""A half-open broker connection is found by the application-level ping and made
again, on real parts: Mosquitto, a TCP proxy that holds the connection open but
moves nothing (tests/faultproxy.py), the AppStore and a real edge agent."""

from __future__ import annotations

import time

import pytest

from cloud_sync.connection import MqttConnection
from tests.appstore_support import start_store, wait_until
from tests.faultproxy import FaultProxy
from tests.test_e2e import API, jget, start_node


@pytest.mark.timeout(60)
def test_the_ping_finds_a_half_open_connection_and_reconnects(broker):
    proxy = FaultProxy(broker.port).start()
    conn = MqttConnection("half-open-1", "127.0.0.1", proxy.port, keepalive=60,
                          ping_topic="t/aidc/v1/service/half-open-1/ping", ping_interval=1.0,
                          ping_timeout=1.0, min_backoff=0.05, max_backoff=0.2)
    conn.start()
    try:
        assert conn.wait_connected(10)
        wait_until(lambda: conn.ping_rtt_ms is not None, timeout=10)  # pings are answered
        assert proxy.freeze() == 1
        t0 = time.monotonic()
        wait_until(lambda: conn.stats["half_open"] >= 1, timeout=10)
        detected = time.monotonic() - t0
        wait_until(lambda: conn.connected.is_set() and proxy.accepted >= 2, timeout=10)
        back = time.monotonic() - t0
        # keepalive is 60 s: without the ping this would go unseen for 90-120 s
        assert detected <= 1.0 + 1.0 + 2.0, detected
        assert "half-open" in (conn.last_error or "half-open")
        print(f"half-open connection: detected in {detected:.1f} s, connected again in "
              f"{back:.1f} s (ping every 1 s, 1 s to answer)")
    finally:
        conn.stop()
        proxy.stop()


@pytest.mark.timeout(120)
def test_an_agent_behind_a_half_open_link_reconnects_and_loses_nothing(tmp_path, broker,
                                                                       prefix):
    """Events emitted while the link is half-open reach the AppStore once, after the
    node found the dead link itself and connected again; the node ends online."""
    store = start_store(tmp_path / "cloud", broker, prefix)
    proxy = FaultProxy(broker.port).start()
    agent = start_node(tmp_path, type("B", (), {"host": "127.0.0.1", "port": proxy.port})(),
                       prefix, store, node_id="ho-1",
                       mqtt={"ping_interval_s": 2, "ping_timeout_s": 2, "keepalive": 60})
    try:
        wait_until(lambda: agent.conn.connected.is_set(), timeout=30)
        wait_until(lambda: jget(f"{store.url}{API}/nodes/ho-1").get("online"), timeout=30)
        proxy.freeze()
        t0 = time.monotonic()
        for i in range(5):
            agent.emit_event("half_open_probe", data={"i": i})
        wait_until(lambda: agent.conn.stats["half_open"] >= 1, timeout=20)
        detected = time.monotonic() - t0
        assert detected <= 2 + 2 + 3, detected
        wait_until(lambda: agent.conn.connected.is_set(), timeout=20)

        def probes():
            evs = jget(f"{store.url}{API}/events?node=ho-1&type=half_open_probe&limit=50")
            return evs["events"]
        got = wait_until(lambda: len(probes()) >= 5 and probes(), timeout=60)
        time.sleep(2)
        assert sorted(e["data"]["i"] for e in probes()) == list(range(5))  # once each
        wait_until(lambda: jget(f"{store.url}{API}/nodes/ho-1").get("online"), timeout=60)
        assert got
    finally:
        agent.stop()
        proxy.stop()
        store.stop()
