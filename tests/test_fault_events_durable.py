"""A fault's events reach the cloud even when the agent dies right after journalling it.

The monitor writes a fault journal row (``faults`` in node.db) in one commit and
its event (``fault_detected``, ``fault_healed``, ``fault_unhealed``) goes into the
outbox in another. A kill -9 between the two left a fault the cloud never heard
of. Now the row carries its events (``event``) and is marked sent (``event_sent``)
once they are queued; the next start sends every unsent row's events under msg_ids
made from the row (phase, kind, check, time), so one queued just before the kill
is kept once. Rows of before the migration count as sent.

Real SQLite, real Outbox (its table in the same node.db), the real Monitor and
FaultJournal; the last test a real agent on a real broker.
"""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path

import pytest
import sqlite_utils
from sqlite_utils.migrations import Migrations

from cloud_sync import schemas
from cloud_sync.outbox import Outbox
from edge_node import store as node_store
from edge_node.health import Check, FaultJournal, Finding, Monitor
from edge_node.health.journal import event_msg_id
from tests.models import Killed


class Flappy(Check):
    name = "flappy"
    interval_s = 60.0

    def __init__(self):
        self.broken = True

    def probe(self):
        if self.broken:
            return Finding(self.name, False, "it is broken", fault="flap", data={"x": 1})
        return Finding(self.name, True, "fine")

    def heal(self, finding):
        self.broken = False
        return "fixed it"


class Node:
    """Journal and outbox of a node on ``tmp/node.db``; ``die`` kills the agent
    ``"before"`` or ``"after"`` it queues its next event; ``fail`` makes the next
    emit raise an ordinary error (the outbox refused it)."""

    def __init__(self, tmp: Path, die: str | None = None, fail: bool = False):
        self.journal = FaultJournal(tmp / "node.db")
        self.outbox = Outbox(tmp / "node.db", conn=None, ack_topic="ack")
        self.die, self.fail = die, fail

    def emit_event(self, type, severity="info", app=None, data=None, msg_id=None):
        if self.die == "before":
            self.die = None
            raise Killed()
        if self.fail:
            self.fail = False
            raise RuntimeError("outbox refused it")
        msg = schemas.EventMessage(msg_id=msg_id or schemas.new_msg_id(), type=type,
                                   severity=severity, app=app, data=data or {})
        self.outbox.put("events", msg.to_bytes(), msg.msg_id, kind="event")
        if self.die == "after":
            self.die = None
            raise Killed()

    def start(self) -> int:
        """What the agent does at start (NodeAgent._health_start)."""
        return self.journal.send_unsent(self.emit_event)

    def events(self) -> list[dict]:
        rows = self.outbox._db.execute(
            "SELECT msg_id, payload FROM cloud_sync_outbox WHERE kind = 'event' ORDER BY seq")
        return [{"msg_id": m, **json.loads(p)} for m, p in rows]

    def close(self) -> None:
        self.outbox.close()
        self.journal.close()


def test_a_fault_journalled_just_before_a_kill_is_sent_at_the_next_start(tmp_path):
    node = Node(tmp_path, die="before")
    t = [1_767_000_000.123456]
    check = Flappy()
    with pytest.raises(Killed):  # the row is committed, then the agent dies
        Monitor([check], node.journal, node.emit_event, clock=lambda: t[0]).run_all(heal=True)
    [row] = node.journal.recent()
    assert row["phase"] == "detected" and row["ts"] == t[0]
    assert node.events() == []  # the cloud would never hear of it
    node.close()

    node = Node(tmp_path)  # the agent starts again
    assert node.start() == 1
    [ev] = node.events()
    assert ev["type"] == "fault_detected" and ev["data"]["fault"] == "flap"
    assert ev["data"]["detected_at"] == t[0] and ev["severity"] == "warning"
    assert ev["msg_id"] == event_msg_id("detected", "flap", "flappy", t[0], "fault_detected")
    assert node.journal.unsent() == []
    node.close()

    node = Node(tmp_path)  # a second start sends nothing more
    assert node.start() == 0
    assert len(node.events()) == 1
    node.close()


def test_an_event_queued_just_before_the_kill_is_kept_once(tmp_path):
    node = Node(tmp_path, die="after")
    t = [1_767_000_100.000001]
    with pytest.raises(Killed):  # queued, but the row never marked sent
        Monitor([Flappy()], node.journal, node.emit_event, clock=lambda: t[0]).run_all(
            heal=True)
    assert [e["type"] for e in node.events()] == ["fault_detected"]
    assert len(node.journal.unsent()) == 1
    node.close()

    node = Node(tmp_path)
    assert node.start() == 1  # sent again under the same msg_id: the outbox keeps one
    [ev] = node.events()
    assert ev["msg_id"] == event_msg_id("detected", "flap", "flappy", t[0], "fault_detected")
    assert node.journal.unsent() == []
    node.close()


def test_an_emit_that_raises_leaves_the_row_unsent_and_the_monitor_goes_on(tmp_path):
    node = Node(tmp_path, fail=True)
    t = [1_767_000_200.5]
    m = Monitor([Flappy()], node.journal, node.emit_event, clock=lambda: t[0])
    [f] = m.run_all(heal=True)  # detected (its emit fails), healed (its emit works)
    assert f.ok
    assert [e["type"] for e in node.events()] == ["fault_healed"]
    [unsent] = node.journal.unsent()
    assert unsent.phase == "detected"
    node.close()

    node = Node(tmp_path)
    assert node.start() == 1
    evs = node.events()
    assert [e["type"] for e in evs] == ["fault_healed", "fault_detected"]
    assert evs[0]["msg_id"] == event_msg_id("healed", "flap", "flappy", t[0], "fault_healed")
    assert evs[1]["msg_id"] == event_msg_id("detected", "flap", "flappy", t[0],
                                            "fault_detected")
    assert node.start() == 0 and len(node.events()) == 2
    node.close()


def test_msg_ids_are_from_the_row_not_its_rowid(tmp_path):
    """The same row written into a node.db restored from a copy (another rowid) has
    the same msg_id; rows a microsecond apart have different ones."""
    a = event_msg_id("detected", "flap", "flappy", 1_767_000_000.000001, "fault_detected")
    assert a == event_msg_id("detected", "flap", "flappy", 1_767_000_000.000001,
                             "fault_detected")
    assert a != event_msg_id("detected", "flap", "flappy", 1_767_000_000.000002,
                             "fault_detected")
    assert a != event_msg_id("healed", "flap", "flappy", 1_767_000_000.000001,
                             "fault_detected")
    assert a != event_msg_id("detected", "flap", "other", 1_767_000_000.000001,
                             "fault_detected")
    j = FaultJournal(None)  # doctor's journal in memory works as before
    row = j.noted("config_corrupt", "config", "truncated", remedy="last good",
                  event=[{"type": "fault_detected", "severity": "warning", "data": {}},
                         {"type": "fault_healed", "data": {}}])
    sent: list[tuple[str, str]] = []
    assert j.send_unsent(lambda type, severity="info", data=None, msg_id=None:
                         sent.append((type, msg_id))) == 1
    assert sent == [("fault_detected", event_msg_id("noted", "config_corrupt", "config",
                                                    row.ts, "fault_detected")),
                    ("fault_healed", event_msg_id("noted", "config_corrupt", "config",
                                                  row.ts, "fault_healed"))]
    assert j.summary()["config_corrupt"]["healed"] == 1
    j.close()


def test_rows_of_before_the_migration_are_not_resent(tmp_path):
    db_path = tmp_path / "node.db"
    old = Migrations("edge_node.store")  # node.db as the code before m010 left it
    old._migrations = [m for m in node_store.migrations._migrations
                       if m.name < "m010"]
    db = sqlite_utils.Database(sqlite3.connect(str(db_path)))
    old.apply(db)
    assert "event" not in db["faults"].columns_dict
    for i, phase in enumerate(("detected", "unhealed", "healed")):
        db["faults"].insert({"ts": 1_700_000_000.0 + i, "kind": "flap", "check_name": "flappy",
                             "phase": phase, "detail": "old", "count": 1, "data": "{}"})
    db.conn.commit()
    db.conn.close()

    node = Node(tmp_path)  # the new code opens it: m010 applies
    assert node.start() == 0
    assert node.events() == []
    rows = sqlite3.connect(str(db_path)).execute(
        "SELECT event, event_sent, ts FROM faults ORDER BY id").fetchall()
    assert len(rows) == 3 and all(e is None and s == ts for e, s, ts in rows)
    assert node.journal.summary()["flap"]["healed"] == 1
    node.close()


def test_a_real_agent_sends_unsent_rows_and_its_startup_faults_once(tmp_path, shared_broker,
                                                                     prefix):
    from edge_node.agent import NodeAgent
    from edge_node.config import load_config

    cfg = load_config(node_id="site-1", data_dir=tmp_path / "edge",
                      mqtt={"host": shared_broker.host, "port": shared_broker.port,
                            "topic_prefix": prefix}, http={"port": 0})
    db = cfg.data_dir / "node.db"
    # the last run journalled a fault and was killed before its event was queued
    j = FaultJournal(db)
    lost = j.detected("flap", "flappy", "it is broken", ts=1_767_000_300.25,
                      event={"type": "fault_detected", "severity": "warning",
                             "data": {"fault": "flap", "check": "flappy"}})
    j.close()

    def outbox_events() -> list[tuple[str, str, str]]:
        c = sqlite3.connect(str(db))
        try:
            return [(m, json.loads(p)["type"], json.loads(p)["data"].get("fault"))
                    for m, p in c.execute("SELECT msg_id, payload FROM cloud_sync_outbox "
                                          "WHERE kind = 'event' ORDER BY seq")]
        finally:
            c.close()

    def faults() -> list[tuple]:
        return [x for x in outbox_events() if x[1].startswith("fault_")]

    note = {"fault": "config_corrupt", "check": "config", "detail": "truncated",
            "remedy": "started from the last good config"}
    agent = NodeAgent(cfg, startup_faults=[note])
    agent.start()
    try:
        got = faults()
    finally:
        agent.stop()
    j = FaultJournal(db)
    [noted] = [r for r in j.recent() if r["phase"] == "noted"]
    assert j.unsent() == []
    j.close()
    assert got == [  # oldest row first
        (event_msg_id("detected", "flap", "flappy", lost.ts, "fault_detected"),
         "fault_detected", "flap"),
        (event_msg_id("noted", "config_corrupt", "config", noted["ts"], "fault_detected"),
         "fault_detected", "config_corrupt"),
        (event_msg_id("noted", "config_corrupt", "config", noted["ts"], "fault_healed"),
         "fault_healed", "config_corrupt")]

    agent = NodeAgent(cfg)  # a second start sends nothing more
    agent.start()
    try:
        time.sleep(0.2)
        again = faults()
    finally:
        agent.stop()
    assert again == got


def test_a_detected_row_lost_to_a_restore_is_written_again_with_its_event_once(tmp_path):
    """A remedy that puts back a copy of node.db loses the episode's detected row (and
    the outbox row of its event); the journal writes it again with its event, sent
    under the first msg_id: kept once where it survived, sent where it did not."""
    node = Node(tmp_path)
    t = [1_767_000_400.75]

    class Restoring(Flappy):
        def heal(self, finding):
            node.journal._db.execute("DELETE FROM faults WHERE phase = 'detected'")
            node.journal._db.conn.commit()
            return super().heal(finding)

    [f] = Monitor([Restoring()], node.journal, node.emit_event,
                  clock=lambda: t[0]).run_all(heal=True)
    assert f.ok
    evs = node.events()
    assert [e["type"] for e in evs] == ["fault_detected", "fault_healed"]  # kept once
    assert evs[0]["msg_id"] == event_msg_id("detected", "flap", "flappy", t[0],
                                            "fault_detected")
    rows = {r["phase"]: r for r in node.journal.recent()}
    assert rows["detected"]["data"] == {"rewritten": True}
    assert node.journal.unsent() == []
    node.close()


def test_a_full_outbox_leaves_fault_events_and_labels_unsent_not_lost(tmp_path):
    """A node offline long enough to fill its outbox: ``emit_event`` says False, so
    a fault's journal rows stay unsent instead of being marked sent with nothing
    queued (labels, alarms and fine-tune runs check the same answer); once there
    is room, the next start sends them. A real agent, its real outbox (max_rows
    10), no broker."""
    from edge_node.agent import NodeAgent
    from edge_node.config import load_config
    from installer.ports import free_port

    cfg = load_config(node_id="full-1", data_dir=tmp_path / "edge", http={"port": 0},
                      mqtt={"host": "127.0.0.1", "port": free_port()},
                      outbox={"max_rows": 10})
    agent = NodeAgent(cfg)
    for i in range(10):  # offline: the outbox fills
        assert agent.emit_event("filler", data={"i": i}) is True
    assert agent.emit_event("one_more") is False
    m = Monitor([Flappy()], agent.fault_journal, agent.emit_event, clock=lambda: 1_767_000_400.0)
    m.run_all(heal=True)
    unsent = {r.phase for r in agent.fault_journal.unsent()}
    assert unsent == {"detected", "healed"}, unsent  # not marked sent: nothing was queued
    # room again (the cloud acknowledged the backlog): the next start sends them, once
    c = sqlite3.connect(str(cfg.data_dir / "node.db"))
    c.execute("DELETE FROM cloud_sync_outbox WHERE kind = 'event'")
    c.commit()
    c.close()
    assert agent.fault_journal.send_unsent(agent.emit_event) == 2
    assert agent.fault_journal.unsent() == []
    agent.store.close()
    agent.fault_journal.close()
