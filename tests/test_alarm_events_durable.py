"""An alarm's events reach the cloud even when the agent dies right after its change.

An alarm is raised (a row in ``alarms``) or moved (a history entry appended) in
one commit, and its event (``alarm_raised``, ``alarm_acknowledged``, ...) goes
into the outbox in another. A kill -9 between the two left an alarm the cloud
never heard of. Now each alarm counts the history entries whose event is queued
(``events_sent``); the next start sends the rest, rebuilt from the history,
under msg_ids made from the alarm and the entry, so one queued just before the
kill is kept once.

Real NodeStore, real Outbox (its table in the same node.db), the real Alarms.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from cloud_sync.outbox import Outbox
from edge_node.alarms import Alarms
from edge_node.capture import Capture
from edge_node.config import AlarmRule, AlarmsConfig, FeedbackConfig
from edge_node.store import NodeStore
from tests.models import Killed, killable_emit

SEVEN = {"label": "7", "score": 0.95}
RULE = AlarmRule(name="seven", app="digits", labels=["7"], min_score=0.8, n=3, m=5,
                 clear_after_s=300)


def _node(tmp: Path, die: str | None = None):
    """Store, outbox and alarms of a node on ``tmp/node.db``; with ``die`` the agent
    is killed ``"before"`` or ``"after"`` it queues an event."""
    store = NodeStore(tmp / "node.db")
    outbox = Outbox(tmp / "node.db", conn=None, ack_topic="ack")
    capture = Capture(store, None, "unused", tmp / "samples", FeedbackConfig(upload="none"))

    emit_event = killable_emit(outbox, die)

    alarms = Alarms(AlarmsConfig(rules=[RULE]), store, capture,
                    lambda app, n: [str(i) for i in range(10)], emit_event, tmp / "alarms")
    return store, outbox, alarms


def _events(outbox: Outbox) -> list[tuple[str, str]]:
    rows = outbox._db.execute("SELECT payload FROM cloud_sync_outbox WHERE kind = 'event' "
                              "ORDER BY seq")
    return [(e["type"], e["data"]["state"]) for e in (json.loads(p) for (p,) in rows)]


def _close(store, outbox, alarms) -> None:
    alarms.stop()
    outbox.close()
    store.close()


def test_an_alarm_raised_just_before_a_kill_is_sent_at_the_next_start(tmp_path):
    store, outbox, alarms = _node(tmp_path, die="before")
    now = time.time()
    raised = [x for i in range(3)
              for x in alarms.engine.observe("gate-1", "digits", SEVEN, now + i * 0.1)]
    ((what, rule, alarm),) = raised
    assert what == "raised"
    with pytest.raises(Killed):
        alarms._write(("raised", rule, alarm, "1.0.0", SEVEN, None, now))
    assert store.get_alarm(alarm.alarm_id)["state"] == "open"  # committed on the node
    assert _events(outbox) == []  # the cloud would never hear of it
    _close(store, outbox, alarms)

    store, outbox, alarms = _node(tmp_path)  # the agent starts again
    alarms.start()
    assert _events(outbox) == [("alarm_raised", "open")]
    # a technician acknowledges it; the agent dies after queuing the event
    _close(store, outbox, alarms)
    store, outbox, alarms = _node(tmp_path, die="after")
    with pytest.raises(Killed):
        alarms.act(alarm.alarm_id, "ack", by="tech-1")
    assert _events(outbox)[-1] == ("alarm_acknowledged", "acknowledged")
    _close(store, outbox, alarms)

    store, outbox, alarms = _node(tmp_path)  # sent again, the same msg_id: kept once
    alarms.start()
    assert _events(outbox) == [("alarm_raised", "open"),
                               ("alarm_acknowledged", "acknowledged")]
    assert store.alarms_unsent() == []
    # a resolve with no crash: sent and marked at once; a further start sends nothing
    alarms.act(alarm.alarm_id, "resolve", by="tech-1", note="a cat")
    _close(store, outbox, alarms)
    store, outbox, alarms = _node(tmp_path)
    alarms.start()
    evs = _events(outbox)
    assert evs[-1] == ("alarm_resolved", "resolved") and len(evs) == 3
    _close(store, outbox, alarms)


def test_a_resolve_lost_to_a_kill_is_rebuilt_from_the_history(tmp_path):
    """The event rebuilt at start says who did it, and the note."""
    store, outbox, alarms = _node(tmp_path)
    now = time.time()
    raised = [x for i in range(3)
              for x in alarms.engine.observe("gate-1", "digits", SEVEN, now + i * 0.1)]
    ((_, rule, alarm),) = raised
    alarms._write(("raised", rule, alarm, "1.0.0", SEVEN, None, now))
    _close(store, outbox, alarms)
    store, outbox, alarms = _node(tmp_path, die="before")
    with pytest.raises(Killed):
        alarms.act(alarm.alarm_id, "resolve", by="tech-2", note="a reflection")
    _close(store, outbox, alarms)
    store, outbox, alarms = _node(tmp_path)
    alarms.start()
    rows = outbox._db.execute("SELECT payload FROM cloud_sync_outbox WHERE kind = 'event' "
                              "ORDER BY seq").fetchall()
    last = json.loads(rows[-1][0])
    assert last["type"] == "alarm_resolved"
    assert last["data"]["by"] == "tech-2" and last["data"]["note"] == "a reflection"
    assert len(rows) == 2
    _close(store, outbox, alarms)
