"""Salvage before restore (edge_node/health/db_salvage.py), on real SQLite files:
a node.db with real rows written after its last good copy (outbox rows, samples
and their files, labels, the twin, the fault journal) gets pages overwritten with
garbage; after the heal every row that could still be read is back, the outbox
(against a real broker) sends each message once, and the counts reported are
the rows that really went missing."""

from __future__ import annotations

import json
import os
import sqlite3
import time
from pathlib import Path

import pytest

from cloud_sync import schemas
from cloud_sync.connection import MqttConnection
from cloud_sync.outbox import TABLE, Outbox
from cloud_sync.topics import Topics
from edge_node.health import FaultJournal, db_salvage
from edge_node.health import db_integrity as dbi
from edge_node.health.db_integrity import DbIntegrityCheck
from edge_node.store import NodeStore
from tests.test_outbox import FakeCloud, event, make_conn, wait_for

KEYS = {TABLE: "msg_id", "samples": "sample_id", "kv": "key", "faults": "id"}


def leaf_pages(db: Path, table: str) -> list[int]:
    """The table's leaf pages, left to right (lowest rowids first)."""
    c = sqlite3.connect(str(db))
    try:
        return [r[0] for r in c.execute(
            "SELECT pageno FROM dbstat WHERE name = ? AND pagetype = 'leaf' ORDER BY path",
            [table])]
    finally:
        c.close()


def smash(db: Path, pages: list[int]) -> None:
    """Checkpoint (every page in the main file), then overwrite ``pages`` (1-based)."""
    c = sqlite3.connect(str(db))
    c.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    size = c.execute("PRAGMA page_size").fetchone()[0]
    c.close()
    with open(db, "r+b") as f:
        for p in pages:
            f.seek((p - 1) * size)
            f.write(os.urandom(size))
        os.fsync(f.fileno())


def snapshot(db: Path) -> dict[str, dict]:
    c = sqlite3.connect(str(db))
    c.row_factory = sqlite3.Row
    try:
        return {t: {r[k]: dict(r) for r in c.execute(f"SELECT * FROM {t}")}
                for t, k in KEYS.items()}
    finally:
        c.close()


def feedback(sid: str, app: str = "digits") -> bytes:
    s = schemas.FeedbackSample(
        sample_id=sid, app=app, version="1.2.0", created_at=time.time(), reason="margin<0.1",
        input_type="none", input_b64="", prediction=schemas.Prediction(
            label="7", index=7, score=0.4), scores=[0.1] * 10, source="api", shared="metadata")
    return schemas.FeedbackMessage(msg_id=sid, sample=s).to_bytes()


class Node:
    """A node.db with a store, an outbox and sample files, as the agent has them."""

    def __init__(self, tmp_path: Path, conn: MqttConnection | None = None,
                 topics: Topics | None = None) -> None:
        self.dir = tmp_path
        self.db = tmp_path / "node.db"
        self.samples = tmp_path / "samples"
        self.samples.mkdir(exist_ok=True)
        self.store = NodeStore(self.db)
        self.topics = topics or Topics(prefix="t")
        self.box = Outbox(self.db, conn or MqttConnection("never-started"),
                          self.topics.ack("edge-1"), min_retry=0.3, max_retry=1.0, seed=1)

    def sample(self, i: int) -> str:
        sid = f"s{i:04d}-{'x' * 8}"
        path = self.samples / f"{sid}.npy"
        path.write_bytes(b"\x93NUMPY" + bytes([i % 256]) * 600)
        self.store.add_sample({
            "sample_id": sid, "created_at": time.time(), "app": "digits", "version": "1.2.0",
            "reason": "margin<0.1", "input_type": "tensor/npy", "input_path": str(path),
            "prediction": json.dumps({"label": "7", "index": 7, "score": 0.4}),
            "scores": json.dumps([0.1] * 10), "label": None, "source": "api", "msg_id": sid,
            "nbytes": path.stat().st_size})
        self.box.put(self.topics.feedback("edge-1"), feedback(sid), sid, kind="feedback")
        self.store.mark_queued(sid)
        return sid

    def events(self, n: int) -> list[str]:
        ids = []
        for i in range(n):
            msg_id, payload = event(i)
            self.box.put(self.topics.events("edge-1"), payload, msg_id, kind="event")
            ids.append(msg_id)
        return ids

    def ack(self, msg_ids: list[str]) -> None:
        c = sqlite3.connect(str(self.db), timeout=10)
        with c:
            c.executemany(f"UPDATE {TABLE} SET state = 'acked', done_at = ?, attempts = 1 "
                          "WHERE msg_id = ?", [(time.time(), m) for m in msg_ids])
        c.close()

    def close(self) -> None:
        self.box.close()
        self.store.close()


@pytest.fixture
def node(tmp_path):
    n = Node(tmp_path)
    yield n
    n.close()


def history(node: Node) -> dict:
    """Rows before the copy, the copy, then rows and changes after it."""
    old = [node.sample(i) for i in range(100)]
    old_events = node.events(20)
    node.ack(old[:50])
    node.store.put_json("desired", {"revision": 1})
    assert dbi.make_last_good(node.db)
    new = [node.sample(i) for i in range(100, 220)]
    new_events = node.events(30)
    node.ack(old[50:80] + new[:20])
    for sid in old[:10]:
        node.store.set_label(sid, "3", "tech", "ui")
    node.store.delete_sample(old[99])  # evicted after the copy
    (node.samples / f"{old[99]}.npy").unlink()
    node.store.put_json("desired", {"revision": 2})
    j = FaultJournal(node.db)
    j.detected("clock_jump", "clock", "jumped 300 s")
    j.close()
    return {"old": old, "new": new, "old_events": old_events, "new_events": new_events}


def same(t: str, k, truth: dict, healed: dict) -> bool:
    """The healed row is the damaged file's; a sample whose upload was lost is
    marked unqueued on purpose (the next start queues it again)."""
    a, b = dict(truth[t][k]), dict(healed[t][k])
    if t == "samples" and b["queued"] is None and k not in healed[TABLE]:
        a["queued"] = None
    return a == b


def check_against(truth: dict, healed: dict, copy: dict, report: dict) -> dict:
    """Every row of the damaged file is in the healed database as it was, or is
    counted: absent ones are exactly the ``lost`` rows; changed ones (back to
    the copy's version) are among the unreadable rows."""
    figures = {}
    for t in KEYS:
        r = report["tables"][t]
        back = set(report["samples"]["ids"]) if t == "samples" else set()  # re-imported
        absent = [k for k in truth[t] if k not in healed[t] or k in back]
        changed = [k for k in truth[t] if k in healed[t] and k not in back
                   and not same(t, k, truth, healed)]
        extra = [k for k in healed[t] if k not in truth[t]]
        assert len(absent) == r["lost"], (t, absent, r)
        assert sorted(str(k) for k in absent)[:50] == sorted(r.get("lost_keys", []))[:50] \
            or t == "faults"
        assert len(absent) + len(changed) <= r["unreadable"], (t, r, [
            (k, {c: (v, healed[t][k][c]) for c, v in truth[t][k].items()
                 if healed[t][k][c] != v}) for k in changed][-3:])
        assert all(healed[t][k] == copy[t][k] for k in changed), t  # the copy's version
        # nothing comes back that the damaged file deleted, unless its page is gone
        assert len(extra) <= r["kept_from_copy"], (t, extra, r)
        figures[t] = {"rows": len(truth[t]), "salvaged": r["inserted"] + r["updated"],
                      "lost": len(absent), "back_to_copy": len(changed),
                      "reimported": len(back)}
    return figures


def test_every_readable_row_newer_than_the_copy_is_back(node):
    h = history(node)
    truth = snapshot(node.db)
    copy = snapshot(dbi.copy_path(node.db))
    s_leaves, o_leaves = leaf_pages(node.db, "samples"), leaf_pages(node.db, TABLE)
    # the first samples leaf (labelled since the copy), two of the newest, one of the outbox
    smash(node.db, [s_leaves[0], s_leaves[-3], s_leaves[-2], o_leaves[len(o_leaves) // 2]])
    c = DbIntegrityCheck(node.db)
    f = c.probe()
    assert not f.ok
    remedy = c.heal(f)
    assert c.probe().ok
    rep = f.data["salvage"]
    healed = snapshot(node.db)
    figures = check_against(truth, healed, copy, rep)
    s, o = rep["tables"]["samples"], rep["tables"][TABLE]
    assert s["method"] == o["method"] == "index"  # every rowid and key listed
    assert 0 < s["lost"] < 30 and 0 < o["lost"] < 30
    assert s["inserted"] == 120 - s["lost"]
    assert o["inserted"] == 150 - o["lost"] - sum(
        1 for k in h["old"] + h["old_events"] if k not in healed[TABLE])
    # the twin, the fault journal: newer than the copy, readable, back
    assert node.store.get_json("desired") == {"revision": 2}
    assert any(r["kind"] == "clock_jump" for r in healed["faults"].values())
    # the evicted sample stays evicted
    assert h["old"][99] not in healed["samples"]
    # an acked outbox row stays acked
    for m, row in truth[TABLE].items():
        if row["state"] == "acked" and m in healed[TABLE]:
            assert healed[TABLE][m]["state"] == "acked", m
    # counts in the remedy, in words
    assert f"samples {s['inserted']}" in remedy and f"samples {s['lost']}" in remedy
    # sample files whose row was lost come back, with their metadata from the outbox
    sm = rep["samples"]
    lost_new = [k for k in truth["samples"] if k not in healed["samples"]]
    assert not lost_new  # re-imported
    assert sm["reimported"] == s["lost"] and sm["reimported"] > 0
    for sid in sm["ids"]:
        row = healed["samples"][sid]
        if row["app"] == "digits":  # its feedback message was salvaged
            assert row["version"] == "1.2.0" and row["reason"] == "margin<0.1"
        else:
            assert row["app"] == "unknown" and row["shared"] == "none"
    assert sm["from_outbox"] + sm["bare"] == sm["reimported"]
    # samples whose upload was lost are queued again at the next start
    lost_uploads = [k for k in truth[TABLE] if k not in healed[TABLE]]
    for sid in lost_uploads:
        if sid in healed["samples"] and healed["samples"][sid]["shared"] != "none":
            assert healed["samples"][sid]["queued"] is None
    # the store's and the outbox's connections, open all along, go on
    node.sample(999)
    assert node.store.count("samples") == len(healed["samples"]) + 1
    print("figures", figures, sm)


def test_the_merge_is_idempotent(node, tmp_path):
    history(node)
    smash(node.db, leaf_pages(node.db, "samples")[-2:] + leaf_pages(node.db, TABLE)[-1:])
    kept = tmp_path / "damaged.db"
    node.close()
    os.replace(node.db, kept)
    out1, out2 = tmp_path / "one.db", tmp_path / "two.db"
    r1 = db_salvage.build_restore(kept, dbi.copy_path(node.db), out1, node.samples)
    assert r1["salvaged"]["samples"] > 0
    r2 = db_salvage.build_restore(kept, out1, out2, node.samples)
    for t, v in r2["tables"].items():
        assert v["inserted"] == v["updated"] == v["deleted"] == 0, (t, v)
    assert r2["samples"]["reimported"] == 0
    assert snapshot(out1) == snapshot(out2)
    node.store = NodeStore(node.db)  # for the fixture's close
    node.box = Outbox(node.db, MqttConnection("x"), "ack")


def test_damaged_indexes_too_are_bisected_and_nothing_wrong_comes_back(node):
    history(node)
    truth = snapshot(node.db)
    copy = snapshot(dbi.copy_path(node.db))
    c = sqlite3.connect(str(node.db))
    idx = [r[0] for r in c.execute(
        "SELECT pageno FROM dbstat WHERE name IN ('sqlite_autoindex_samples_1', "
        "'idx_samples_app_created_at', 'idx_samples_app_label_usefulness') ")]
    c.close()
    smash(node.db, idx + leaf_pages(node.db, "samples")[-2:-1])
    c = DbIntegrityCheck(node.db)
    f = c.probe()
    c.heal(f)
    assert c.probe().ok
    s = f.data["salvage"]["tables"]["samples"]
    assert s["method"] == "bisect"
    healed = snapshot(node.db)
    for k, row in healed["samples"].items():  # every row there is true: the damaged
        if k in truth["samples"]:             # file's, or the copy's, or re-imported
            assert row in (truth["samples"][k], copy["samples"].get(k)) \
                or row["source"] == "reimported" or row["app"] == "digits"
    assert s["inserted"] > 100  # most new rows back
    # the files of the unreadable rows are imported again: no sample disappears
    assert all(k in healed["samples"] for k in truth["samples"])


def test_at_start_the_damaged_file_is_salvaged_into_the_copy(node):
    h = history(node)
    truth = snapshot(node.db)
    node.close()
    smash(node.db, leaf_pages(node.db, "samples")[-1:] + leaf_pages(node.db, "kv"))
    note = dbi.guard_at_start(node.db)
    assert note["remedy"] == "restored the last good copy at start"
    assert "salvaged rows newer than the copy" in note["detail"]
    s = NodeStore(node.db)
    try:
        assert s.count("samples") == len(truth["samples"])  # lost rows: re-imported
        assert s.get_json("desired") == {"revision": 1}  # its page is gone: the copy's
        assert note["salvage"]["tables"]["kv"]["unreadable"] == 1
        assert note["salvage"]["samples"]["reimported"] == \
            note["salvage"]["tables"]["samples"]["lost"]
        assert s.get_sample(h["new"][0])["label"] is None
    finally:
        s.close()
    node.store = NodeStore(node.db)
    node.box = Outbox(node.db, MqttConnection("x"), "ack")


def test_the_outbox_sends_each_message_once_after_the_heal(tmp_path, shared_broker, prefix):
    topics = Topics(prefix=prefix)
    cloud = FakeCloud(shared_broker, topics)
    conn = make_conn(shared_broker, "edge")
    node = Node(tmp_path, conn, topics)
    try:
        node.box.start()
        before = node.events(30)
        assert wait_for(lambda: node.box.pending() == 0, 10)
        assert dbi.make_last_good(node.db)
        acked_after = node.events(30)
        assert wait_for(lambda: node.box.pending() == 0, 10)
        node.box.stop()  # what follows stays pending (the uplink is "down")
        pending = node.events(90)
        truth = snapshot(node.db)
        sent_before = {m: cloud.copies(m) for m in before + acked_after + pending}
        assert all(sent_before[m] == 1 for m in before + acked_after)
        assert not any(sent_before[m] for m in pending)
        leaves = leaf_pages(node.db, TABLE)
        smash(node.db, [leaves[-2], leaves[-4]])
        c = DbIntegrityCheck(node.db)
        f = c.probe()
        c.heal(f)
        assert c.probe().ok
        o = f.data["salvage"]["tables"][TABLE]
        healed = snapshot(node.db)
        lost = [m for m in truth[TABLE] if m not in healed[TABLE]]
        assert len(lost) == o["lost"] > 0
        node.box.start()
        assert wait_for(lambda: node.box.pending() == 0, 15), node.box.stats()
        time.sleep(0.5)  # any late duplicate would show now
        for m in before + acked_after:  # acked: never sent again
            assert cloud.copies(m) == 1, m
        for m in pending:  # salvaged: sent exactly once; lost: never (counted above)
            assert cloud.copies(m) == (0 if m in lost else 1), m
            if m not in lost:
                assert node.box.status(m) == "acked"
        print("outbox", {"pending": len(pending), "salvaged": o["inserted"], "lost": o["lost"]})
    finally:
        node.close()
        conn.stop()
        cloud.stop()


@pytest.mark.skipif(not db_salvage.cli_recover_available(),
                    reason="no sqlite3 command line with a working .recover")
def test_the_cli_recover_adds_what_it_finds(node):  # pragma: no cover - where available
    history(node)
    smash(node.db, leaf_pages(node.db, "samples")[-2:])
    c = DbIntegrityCheck(node.db)
    f = c.probe()
    c.heal(f)
    assert c.probe().ok and f.data["salvage"]["cli"] is True


def test_a_destroyed_schema_is_read_with_the_copys(node):
    """Page 1 (the header and the schema) gone: the copy's schema pages are spliced
    into a scratch copy of the damaged file, whose other pages are then read."""
    h = history(node)
    truth = snapshot(node.db)
    node.close()
    smash(node.db, [1])
    note = dbi.guard_at_start(node.db)
    assert note["salvage"]["schema_from_copy"] is True
    assert "read with the copy's" in note["detail"]
    s = NodeStore(node.db)
    try:
        assert s.count("samples") == len(truth["samples"])
        assert s.get_json("desired") == {"revision": 2}
        assert s.get_sample(h["old"][0])["label"] == "3"  # labelled since the copy
    finally:
        s.close()
    healed = snapshot(node.db)
    assert healed == truth
    node.store = NodeStore(node.db)
    node.box = Outbox(node.db, MqttConnection("x"), "ack")


def test_leaves_cut_off_by_a_damaged_interior_page_are_read_off_the_pages(node):
    """The samples table's root (an interior page) gone: no query reaches a single
    row, but every leaf page is whole; they are read straight off the file."""
    history(node)
    truth = snapshot(node.db)
    c = sqlite3.connect(str(node.db))
    root = c.execute("SELECT rootpage FROM sqlite_master WHERE name = 'samples'").fetchone()[0]
    kind = c.execute("SELECT pagetype FROM dbstat WHERE pageno = ?", [root]).fetchone()[0]
    c.close()
    assert kind == "internal"
    smash(node.db, [root])
    c = DbIntegrityCheck(node.db)
    f = c.probe()
    c.heal(f)
    assert c.probe().ok
    rep = f.data["salvage"]
    s = rep["tables"]["samples"]
    assert rep["leaf_rows"]["samples"] == len(truth["samples"])
    assert s["lost"] == 0 and s["inserted"] == 120 and s["deleted"] == 1  # one evicted
    assert snapshot(node.db)["samples"] == truth["samples"]


def test_append_only_tables_are_read_above_the_copy_only(node):
    """``results`` (a row per inference, never updated): only the rows newer than
    the copy are read and merged; a damaged page of older rows costs nothing."""
    row = {"ts": 1.0, "app": "digits", "version": "1", "label": "7", "score": 0.5,
           "source": "cam1"}
    node.store.add_results([row] * 3000)
    assert dbi.make_last_good(node.db)
    node.store.add_results([{**row, "ts": 2.0}] * 1000)
    leaves = leaf_pages(node.db, "results")
    smash(node.db, [leaves[3], leaves[-4]])  # one page of old rows, one of new ones
    c = DbIntegrityCheck(node.db)
    f = c.probe()
    c.heal(f)
    assert c.probe().ok
    r = f.data["salvage"]["tables"]["results"]
    assert r["read"] < 1000 and r["inserted"] == r["read"]
    assert r["lost"] == r["unreadable"] == 1000 - r["read"] > 0
    assert node.store.count("results") == 3000 + r["inserted"]


def test_rows_written_while_the_heal_runs_are_not_lost(node):
    """The agent goes on writing while the damaged file is salvaged: the live
    database's write lock is held from the copy aside to the restore, so every row
    a writer committed is either salvaged or written into the restored database."""
    import threading

    history(node)
    smash(node.db, leaf_pages(node.db, "samples")[3:4])  # old rows: in the copy
    written: list[str] = []
    failed: list[str] = []
    stop = threading.Event()

    def writer() -> None:
        i = 5000
        while not stop.is_set():
            try:
                written.append(node.sample(i))
            except sqlite3.DatabaseError:
                failed.append(str(i))
            i += 1
            time.sleep(0.001)

    t = threading.Thread(target=writer)
    t.start()
    try:
        assert wait_for(lambda: len(written) >= 20, 10)
        c = DbIntegrityCheck(node.db)
        f = c.probe()
        assert not f.ok
        c.heal(f)
        n = len(written)
        assert wait_for(lambda: len(written) >= n + 20, 10)
    finally:
        stop.set()
        t.join()
    assert c.probe().ok
    healed = snapshot(node.db)
    missing = [s for s in written if s not in healed["samples"]]
    assert not missing, (len(missing), len(written), len(failed))
    assert not [s for s in written if s not in healed[TABLE]]


def test_no_copy_at_start_what_can_be_read_is_kept(node):
    """Damaged at start with no last good copy: the node starts with what the
    damaged file still holds rather than with an empty database."""
    for i in range(60):
        node.sample(i)
    node.store.put_json("desired", {"revision": 3})
    truth = snapshot(node.db)
    node.close()
    smash(node.db, leaf_pages(node.db, "samples")[2:3])
    note = dbi.guard_at_start(node.db)
    assert note["remedy"] == "salvaged the damaged database at start"
    s = NodeStore(node.db)
    try:
        assert s.get_json("desired") == {"revision": 3}
        assert s.count("samples") == len(truth["samples"])  # the lost ones re-imported
        assert note["salvage"]["samples"]["reimported"] == \
            note["salvage"]["tables"]["samples"]["lost"] > 0
    finally:
        s.close()
    node.store = NodeStore(node.db)
    node.box = Outbox(node.db, MqttConnection("x"), "ack")
