"""config: a truncated config file; the agent starts from the last good one, keeps
the broken one for the technician, journals and reports a config_corrupt fault."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edge_node.errors import ConfigError
from edge_node.health import FaultJournal, Monitor
from edge_node.health.config_guard import (ConfigCheck, keep_last_good, last_good_path,
                                           load_guarded)

ROOT = Path(__file__).resolve().parents[1]
AIDC = str(Path(sys.executable).parent / "aidc")


def write_cfg(path: Path, data_dir: Path, broker=None, prefix="t", **more) -> dict:
    raw = {"node_id": "site-1", "data_dir": str(data_dir),
           "mqtt": {"host": broker.host if broker else "127.0.0.1",
                    "port": broker.port if broker else 1883, "topic_prefix": prefix},
           "http": {"port": 0}, **more}
    path.write_text(json.dumps(raw, indent=2))
    os.chmod(path, 0o640)
    return raw


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_good_config_loads_and_is_kept_as_last_good(tmp_path):
    p = tmp_path / "node.json"
    write_cfg(p, tmp_path / "d")
    cfg, note = load_guarded(p)
    assert note is None and cfg.node_id == "site-1"
    assert keep_last_good(p) and not keep_last_good(p)  # unchanged: not rewritten
    lg = last_good_path(p)
    assert lg.read_bytes() == p.read_bytes()
    assert stat.S_IMODE(lg.stat().st_mode) == 0o600


def test_truncated_config_falls_back_and_the_broken_one_is_kept(tmp_path):
    p = tmp_path / "node.json"
    write_cfg(p, tmp_path / "d")
    keep_last_good(p)
    good = p.read_bytes()
    truncate(p)
    broken_bytes = p.read_bytes()
    cfg, note = load_guarded(p)
    assert cfg.node_id == "site-1"
    assert note["fault"] == "config_corrupt" and "cannot read config" in note["error"]
    broken = Path(note["broken"])
    assert broken.name.startswith("node.json.broken-") and broken.read_bytes() == broken_bytes
    assert p.read_bytes() == good  # the next start is clean
    assert stat.S_IMODE(p.stat().st_mode) == 0o640
    assert load_guarded(p)[1] is None


def test_invalid_values_fall_back_too_but_not_without_a_last_good(tmp_path):
    p = tmp_path / "node.json"
    write_cfg(p, tmp_path / "d", mqtt={"port": 99999})
    with pytest.raises(ConfigError, match="mqtt.port"):
        load_guarded(p)  # nothing good to fall back on: the error, as before
    assert p.exists() and not list(tmp_path.glob("*.broken-*"))
    write_cfg(p, tmp_path / "d")
    keep_last_good(p)
    write_cfg(p, tmp_path / "d", mqtt={"port": 99999})
    cfg, note = load_guarded(p)
    assert cfg.mqtt.port == 1883 and "mqtt.port" in note["detail"]


def test_a_bad_override_is_not_blamed_on_the_file(tmp_path):
    p = tmp_path / "node.json"
    write_cfg(p, tmp_path / "d")
    keep_last_good(p)
    with pytest.raises(ConfigError, match="node_id"):
        load_guarded(p, node_id="not a valid id!")
    assert not list(tmp_path.glob("*.broken-*"))


def test_the_check_finds_a_broken_file_while_running_and_puts_the_good_one_back(tmp_path):
    p = tmp_path / "node.json"
    write_cfg(p, tmp_path / "d")
    c = ConfigCheck(p)
    assert c.probe().ok and "no last good copy yet" in c.probe().detail
    keep_last_good(p)
    truncate(p)
    events = []
    j = FaultJournal(None)
    [f] = Monitor([c], j, lambda t, severity="info", app=None, data=None:
                  events.append((t, data))).run_all(heal=True)
    assert f.ok
    assert [t for t, _ in events] == ["fault_detected", "fault_healed"]
    assert events[0][1]["fault"] == "config_corrupt"
    assert "kept as node.json.broken-" in events[1][1]["remedy"]
    assert j.summary()["config_corrupt"]["healed"] == 1


def test_the_check_without_a_last_good_is_unhealed(tmp_path):
    p = tmp_path / "node.json"
    p.write_text("{")
    c = ConfigCheck(p)
    f = c.probe()
    assert not f.ok
    with pytest.raises(Exception, match="no last good config"):
        c.heal(f)


def test_a_real_agent_starts_from_the_last_good_config(tmp_path, shared_broker, prefix):
    """`aidc edge run` as a process: a good start keeps the last good config; after
    the file is truncated the node still starts, from the last good one, and the
    fault is in its journal (GET /api/faults) and its event outbox."""
    p = tmp_path / "node.json"
    d = tmp_path / "data"
    write_cfg(p, d, shared_broker, prefix)

    def run_once() -> dict:
        proc = subprocess.Popen(
            [AIDC, "edge", "run", "--config", str(p)], cwd=ROOT,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        lines: list[str] = []
        try:
            end = time.monotonic() + 60
            for line in proc.stdout:  # until it serves (its log line)
                lines.append(line)
                if "serving on" in line or time.monotonic() > end:
                    break
            assert any("serving on" in x for x in lines), "".join(lines)
            end = time.monotonic() + 30  # kept right after the start
            while not last_good_path(p).exists() and time.monotonic() < end:
                time.sleep(0.1)
            assert last_good_path(p).exists()
            from edge_node.health.journal import FaultJournal as J
            j = J(d / "node.db")
            try:
                return j.summary()
            finally:
                j.close()
        finally:
            proc.terminate()
            out, _ = proc.communicate(timeout=60)
            assert proc.returncode == 0, "".join(lines) + out

    assert "config_corrupt" not in run_once()
    good = p.read_bytes()
    truncate(p)
    summary = run_once()
    assert summary["config_corrupt"]["detected"] == 1
    assert summary["config_corrupt"]["healed"] == 1
    assert p.read_bytes() == good
    assert len(list(tmp_path.glob("node.json.broken-*"))) == 1
    # the event went into the node's durable outbox for the cloud
    import sqlite3
    c = sqlite3.connect(str(d / "node.db"))
    payloads = [json.loads(r[0]) for r in c.execute(
        "SELECT payload FROM cloud_sync_outbox WHERE kind = 'event'")]
    c.close()
    assert any(e["type"] == "fault_detected" and e["data"]["fault"] == "config_corrupt"
               for e in payloads)


def test_a_missing_config_is_put_back_from_the_last_good(tmp_path):
    p = tmp_path / "node.json"
    write_cfg(p, tmp_path / "d")
    keep_last_good(p)
    p.unlink()
    f = ConfigCheck(p).probe()
    assert not f.ok and f.fault == "config_missing"
    cfg, note = load_guarded(p)
    assert note["fault"] == "config_missing" and note["broken"] is None
    assert p.exists() and cfg.node_id == "site-1"
