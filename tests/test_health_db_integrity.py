"""db_integrity: a real node.db damaged on disk (pages overwritten with garbage);
the last good copy is restored live (the store's open connection goes on) or at
start (page 1 destroyed), with every row the damaged file still gives merged in
(tests/test_health_db_salvage.py for the salvage itself); what was salvaged and
what was lost is journalled."""

from __future__ import annotations

import json
import os
import sqlite3
import time
from pathlib import Path

import pytest

from edge_node.health import FaultJournal, Monitor
from edge_node.health import db_integrity as dbi
from edge_node.health.base import HealError
from edge_node.health.db_integrity import DbIntegrityCheck
from edge_node.store import NodeStore


def corrupt(db: Path, first_page: int = 2, every: int = 1) -> None:
    """Checkpoint (so every page lives in the main file), then overwrite pages from
    ``first_page`` (1-based) with random bytes."""
    c = sqlite3.connect(str(db))
    c.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    page = c.execute("PRAGMA page_size").fetchone()[0]
    c.close()
    size = db.stat().st_size
    with open(db, "r+b") as f:
        for n in range(first_page - 1, size // page, every):
            f.seek(n * page)
            f.write(os.urandom(page))
        f.flush()
        os.fsync(f.fileno())


def sample(i: int) -> dict:
    return {"sample_id": f"s{i:04d}", "created_at": time.time(), "app": "digits",
            "version": "1", "reason": "r", "input_type": "t", "input_path": f"/x/{i}",
            "prediction": "{}", "scores": "[" + ",".join(["0.1"] * 200) + "]",
            "label": None, "source": "t", "msg_id": f"s{i:04d}"}


@pytest.fixture
def store(tmp_path):
    s = NodeStore(tmp_path / "node.db")
    yield s
    s.close()


def test_ok_database_gets_a_last_good_copy_after_an_ok_probe(store, tmp_path):
    db = tmp_path / "node.db"
    c = DbIntegrityCheck(db)
    f = c.probe()
    assert f.ok and "no last good copy yet" in f.detail
    c.after_ok(f)
    meta = json.loads(dbi.meta_path(db).read_text())
    assert dbi.copy_path(db).exists() and meta["counts"]["samples"] == 0
    assert dbi.quick_check(dbi.copy_path(db))[0]
    f2 = c.probe()
    assert f2.ok and f2.data["last_good_age_s"] < 60
    mtime = dbi.copy_path(db).stat().st_mtime_ns
    c.after_ok(f2)  # young copy: not made again
    assert dbi.copy_path(db).stat().st_mtime_ns == mtime


def test_corruption_is_detected_and_the_copy_restored_into_the_live_store(store, tmp_path):
    db = tmp_path / "node.db"
    for i in range(200):
        store.add_sample(sample(i))
    store.put_json("desired", {"revision": 7})
    assert dbi.make_last_good(db)["counts"]["samples"] == 200
    for i in range(200, 260):  # written after the copy: salvaged where readable
        store.add_sample(sample(i))
    corrupt(db, first_page=3, every=2)
    c = DbIntegrityCheck(db)
    f = c.probe()
    assert not f.ok and f.fault == "db_corrupt"
    remedy = c.heal(f)
    assert "restored the last good copy" in remedy
    assert c.probe().ok
    # the store's connection, open all along, reads the restored data and writes on
    assert store.get_json("desired") == {"revision": 7}
    sv = f.data["salvage"]["tables"]["samples"]
    assert store.count("samples") == 200 + sv["inserted"] and sv["inserted"] > 0
    assert "salvaged rows newer than the copy" in remedy
    n = store.count("samples")
    store.add_sample(sample(999))
    assert store.count("samples") == n + 1
    # the damaged file is kept for the technician
    kept = Path(f.data["kept"])
    assert kept.exists() and not dbi.quick_check(kept)[0]
    assert dbi.quick_check(db)[0]


def test_through_the_monitor_what_was_lost_is_journalled(store, tmp_path):
    db = tmp_path / "node.db"
    for i in range(100):
        store.add_sample(sample(i))
    dbi.make_last_good(db)
    for i in range(100, 150):
        store.add_sample(sample(i))
    corrupt(db, first_page=4, every=3)
    events = []
    j = FaultJournal(tmp_path / "journal.db")  # the journal must not live in the damaged file
    m = Monitor([DbIntegrityCheck(db)], j,
                lambda t, severity="info", app=None, data=None: events.append((t, data)))
    [f] = m.run_all(heal=True)
    assert f.ok, f.detail
    assert [t for t, _ in events] == ["fault_detected", "fault_healed"]
    rows = {r["phase"]: r for r in j.recent()}
    assert "restored the last good copy" in rows["healed"]["remedy"]
    assert rows["healed"]["data"]["path"] == str(db)
    sv = rows["healed"]["data"]["salvage"]["tables"]["samples"]
    assert store.count("samples") == 100 + sv["inserted"]
    assert sv["inserted"] + (sv["lost"] or 0) <= 50
    j.close()


def test_no_copy_is_an_unhealed_fault_with_the_reason(store, tmp_path):
    db = tmp_path / "node.db"
    for i in range(100):
        store.add_sample(sample(i))
    corrupt(db, first_page=3, every=2)
    c = DbIntegrityCheck(db)
    events = []
    j = FaultJournal(None)
    [f] = Monitor([c], j, lambda t, severity="info", app=None, data=None:
                  events.append((t, data))).run_all(heal=True)
    assert not f.ok
    assert events[-1][0] == "fault_unhealed"
    assert "no last good copy" in events[-1][1]["why"]
    assert not dbi.copy_path(db).exists()  # a damaged file is never copied as good
    c.after_ok(f)
    assert dbi.make_last_good(db) is None


def test_destroyed_header_is_restored_at_start(tmp_path):
    db = tmp_path / "node.db"
    s = NodeStore(db)
    for i in range(50):
        s.add_sample(sample(i))
    dbi.make_last_good(db)
    s.add_sample(sample(77))
    s.close()
    corrupt(db, first_page=1)  # page 1 too: not a database any more
    assert not dbi.quick_check(db)[0]
    note = dbi.guard_at_start(db)
    assert note["remedy"] == "restored the last good copy at start"
    assert "restored the last good copy" in note["detail"]
    assert Path(note["kept"]).exists()
    s = NodeStore(db)  # opens, migrates, serves the copy's data
    assert s.count("samples") == 50  # nothing readable without page 1: the copy alone
    s.close()
    assert dbi.guard_at_start(db) is None  # fine now


def test_damaged_at_start_without_a_copy_starts_empty(tmp_path):
    db = tmp_path / "node.db"
    s = NodeStore(db)
    s.add_sample(sample(1))
    s.close()
    corrupt(db, first_page=1)
    note = dbi.guard_at_start(db)
    assert "empty database" in note["detail"] and not db.exists()
    s = NodeStore(db)
    assert s.count("samples") == 0
    s.close()


def test_the_interval_grows_with_the_cost_of_the_check(store, tmp_path):
    c = DbIntegrityCheck(tmp_path / "node.db", interval_s=1.0)
    c.max_duty = 1e-9  # any quick_check is "expensive"
    assert c.probe().ok
    assert c.interval_s > 1.0 and c.base_interval_s == 1.0
    c.max_duty = 1.0
    c.probe()
    assert c.interval_s == 1.0


def test_a_restore_that_keeps_failing_live_restarts_the_agent(tmp_path):
    """Twice unable to restore node.db live (here: no last good copy), the check has
    the agent started again (under systemd), so the start path repairs it."""
    db = tmp_path / "node.db"
    c = sqlite3.connect(str(db))
    c.execute("create table t (x)")
    c.executemany("insert into t values (?)", [(i,) for i in range(2000)])
    c.commit()
    c.close()
    corrupt(db, first_page=2)
    asked: list[str] = []
    check = dbi.DbIntegrityCheck(db, backups=False, restart=asked.append)
    f = check.probe()
    assert not f.ok and f.fault == "db_corrupt"
    with pytest.raises(HealError):
        check.heal(f)
    assert asked == []  # once may be a passing clash with a writer: try again first
    with pytest.raises(HealError) as err:
        check.heal(f)
    assert len(asked) == 1 and "restarting the agent" in asked[0] and \
        "restarting the agent" in str(err.value)
    # without a way to restart (not under systemd) it only reports
    quiet = dbi.DbIntegrityCheck(db, backups=False)
    for _ in range(3):
        with pytest.raises(HealError):
            quiet.heal(f)
