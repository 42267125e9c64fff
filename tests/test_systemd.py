"""The agent under systemd (``Type=notify`` + ``WatchdogSec``), on real processes.

systemd itself cannot run here (no init in CI), so the test plays its part at the
seam it uses: a real Unix datagram socket passed as ``$NOTIFY_SOCKET`` and a real
``$WATCHDOG_USEC``, exactly what systemd gives a notify service. The unit file is
checked with ``systemd-analyze verify`` where that tool exists."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edge_node.config import load_config
from installer.ports import free_port
from edge_node.systemd import Notifier, Watchdog, watchdog_interval

ROOT = Path(__file__).resolve().parents[1]


def _listen(path: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(str(path))
    return s


def _recv_all(s: socket.socket, seconds: float) -> list[str]:
    """Every datagram received within ``seconds``."""
    out, end = [], time.monotonic() + seconds
    while (left := end - time.monotonic()) > 0:
        s.settimeout(left)
        try:
            out.append(s.recv(4096).decode())
        except TimeoutError:
            break
    return out


def _wait_for(s: socket.socket, line: str, timeout: float) -> list[str]:
    got, end = [], time.monotonic() + timeout
    while time.monotonic() < end:
        got += _recv_all(s, 0.5)
        if any(line in m.splitlines() for m in got):
            return got
    raise AssertionError(f"no {line} within {timeout} s; got {got}")


@pytest.mark.timeout(120)
def test_the_agent_tells_systemd_it_is_ready_and_pings_only_while_it_runs(tmp_path):
    """READY=1 once serving (even with no broker: the node runs offline), WATCHDOG=1
    every WatchdogSec/2; a stopped (hung) agent stops pinging, so systemd would kill
    and restart it; a clean stop says STOPPING=1."""
    sock = _listen(tmp_path / "notify.sock")
    cfg = tmp_path / "node.json"
    cfg.write_text(json.dumps({
        "node_id": "sd-1", "data_dir": str(tmp_path / "data"),
        "mqtt": {"host": "127.0.0.1", "port": free_port(), "topic_prefix": "t"},
        "http": {"host": "127.0.0.1", "port": 0}}))
    env = {**os.environ, "NOTIFY_SOCKET": str(tmp_path / "notify.sock"),
           "WATCHDOG_USEC": "1000000", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "installer.cli", "edge", "run",
                             "--config", str(cfg)], env=env, cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        got = _wait_for(sock, "READY=1", 60)
        assert any(line.startswith("STATUS=serving on http://") for m in got
                   for line in m.splitlines())
        pings = [m for m in _recv_all(sock, 3.0) if m == "WATCHDOG=1"]
        assert len(pings) >= 3, pings  # every 0.5 s; generous on a loaded box

        proc.send_signal(signal.SIGSTOP)  # hung: no ping reaches systemd
        time.sleep(0.3)
        _recv_all(sock, 0.2)  # a ping sent just before the stop
        assert _recv_all(sock, 2.5) == []
        proc.send_signal(signal.SIGCONT)
        _wait_for(sock, "WATCHDOG=1", 10)

        proc.send_signal(signal.SIGTERM)
        _wait_for(sock, "STOPPING=1", 30)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        sock.close()


@pytest.mark.timeout(120)
def test_a_broken_agent_stops_pinging_and_says_why(tmp_path, monkeypatch):
    """A real agent whose HTTP server stopped answering: the watchdog sends
    STATUS=unhealthy with the reason and no WATCHDOG=1 (systemd restarts it)."""
    from edge_node.agent import NodeAgent

    sock = _listen(tmp_path / "n.sock")
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "n.sock"))
    monkeypatch.setenv("WATCHDOG_USEC", "600000")
    agent = NodeAgent(load_config(node_id="sd-2", data_dir=tmp_path / "d", http={"port": 0},
                                  mqtt={"host": "127.0.0.1", "port": free_port(),
                                        "topic_prefix": "t"}))
    assert "NOTIFY_SOCKET" not in os.environ  # workers do not inherit it
    agent.start()
    try:
        _wait_for(sock, "READY=1", 30)
        _wait_for(sock, "WATCHDOG=1", 10)
        assert agent.liveness() == []
        agent._http.shutdown()  # noqa: SLF001 - the HTTP server dies
        end, status = time.monotonic() + 20, []
        while not status and time.monotonic() < end:
            status = [m for m in _recv_all(sock, 0.5) if m.startswith("STATUS=unhealthy")]
        assert status and "thread http is not running" in status[0] and \
            "/v2/health/live" in status[0], status
        later = _recv_all(sock, 1.5)
        assert "WATCHDOG=1" not in later, later
        assert agent.watchdog.missed >= 1
    finally:
        agent._http = None  # noqa: SLF001 - already shut down
        agent.stop()
        sock.close()


def test_notifier_watchdog_units(tmp_path):
    sock = _listen(tmp_path / "u.sock")
    try:
        assert not Notifier("").notify("READY=1")  # not under systemd: a no-op
        n = Notifier(str(tmp_path / "u.sock"))
        assert n.notify("READY=1", "STATUS=x")
        assert _recv_all(sock, 0.5) == ["READY=1\nSTATUS=x"]
        assert watchdog_interval({"WATCHDOG_USEC": "20000000"}) == 10.0
        assert watchdog_interval({"WATCHDOG_USEC": "20000000", "WATCHDOG_PID": "1"}) is None
        assert watchdog_interval({"WATCHDOG_USEC": "junk"}) is None
        problems: list[str] = []
        w = Watchdog(n, 1.0, lambda: problems)
        assert w.beat() and _recv_all(sock, 0.3) == ["WATCHDOG=1"]
        problems.append("thread reconciler is not running")
        assert not w.beat()
        assert _recv_all(sock, 0.3) == ["STATUS=unhealthy: thread reconciler is not running"]
        w.probe = lambda: 1 / 0  # a probe that breaks is a problem, not a crash
        assert not w.beat() and "ZeroDivisionError" in _recv_all(sock, 0.3)[0]
        assert Notifier(str(tmp_path / "gone.sock")).notify("READY=1") is False
    finally:
        sock.close()


@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="systemd-analyze not installed")
def test_the_unit_file_is_valid(tmp_path):
    unit = (ROOT / "installer/systemd/aidc-edge.service").read_text()
    assert "Type=notify" in unit and "WatchdogSec=" in unit and "Restart=always" in unit
    # verify checks that ExecStart exists: point it at a binary that does
    f = tmp_path / "aidc-edge.service"
    f.write_text(unit.replace("/opt/aidc/venv/bin/aidc", shutil.which("true") or "/bin/true"))
    r = subprocess.run(["systemd-analyze", "verify", str(f)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
