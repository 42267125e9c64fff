"""A label given on site reaches the cloud even when the agent dies right after it.

The label is committed to the node's ``samples`` table and then, as a separate
step, its ``sample_labelled`` event is put into the outbox (another connection
to the same file: they cannot share a transaction). A kill -9 between the two
left a label the node had and the cloud never heard of, and the technician's
retry (the same label) changed nothing, so sent nothing: lost for good. Now a
label not yet handed to the outbox is marked so (``label_sent`` NULL) in the
same commit as the label, and is sent at the next start or on the retry.

Real NodeStore, real Outbox (its SQLite table in the same node.db).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from cloud_sync.outbox import Outbox
from edge_node.labelling import Labeller
from edge_node.store import NodeStore
from tests.models import Killed, killable_emit


class _Registry:
    def get(self, app):
        return None


class _Capture:
    def __init__(self) -> None:
        self.stats: Counter = Counter()

    def upload_level(self, app: str) -> str:
        return "full"


def _sample(store: NodeStore, tmp: Path, sid: str = "s1") -> None:
    store.add_sample({
        "sample_id": sid, "created_at": 1.0, "app": "digits", "version": "1.0.0",
        "reason": "confidence<0.6", "input_type": "tensor/npy",
        "input_path": str(tmp / f"{sid}.npy"), "prediction": json.dumps(
            {"label": "3", "index": 3, "score": 0.4}),
        "scores": json.dumps([0.06] * 9 + [0.46]), "label": None, "source": "api",
        "msg_id": sid})
    store.mark_queued(sid)


def _node(tmp: Path, die: str | None = None):
    """A node's store and outbox on ``tmp/node.db``, and its Labeller; with
    ``die``, the agent is killed ``"before"`` or ``"after"`` it queues the event."""
    store = NodeStore(tmp / "node.db")
    outbox = Outbox(tmp / "node.db", conn=None, ack_topic="ack")

    emit_event = killable_emit(outbox, die)

    return store, outbox, Labeller(store, _Registry(), _Capture(), emit_event)


def _label_events(outbox: Outbox) -> list[dict]:
    rows = outbox._db.execute("SELECT payload FROM cloud_sync_outbox WHERE kind = 'event'")
    evs = [json.loads(p) for (p,) in rows]
    return [e["data"] for e in evs if e["type"] == "sample_labelled"]


def test_a_label_committed_just_before_a_kill_is_sent_at_the_next_start(tmp_path):
    store, outbox, lab = _node(tmp_path, die="before")
    _sample(store, tmp_path)
    with pytest.raises(Killed):
        lab.label("s1", "7", by="tech-1")
    assert store.get_sample("s1")["label"] == "7"  # committed on the node
    assert _label_events(outbox) == []  # the cloud would never hear of it
    store.close()
    outbox.close()

    store, outbox, lab = _node(tmp_path)  # the agent starts again
    ev = _label_events(outbox)
    assert len(ev) == 1 and ev[0]["sample_id"] == "s1" and ev[0]["label"] == "7"
    assert ev[0]["by"] == "tech-1" and ev[0]["labelled_at"] is not None
    # the technician's retry of the same label sends nothing more
    lab.label("s1", "7", by="tech-1")
    assert len(_label_events(outbox)) == 1
    # a third start sends nothing either
    store.close()
    outbox.close()
    store, outbox, lab = _node(tmp_path)
    assert len(_label_events(outbox)) == 1


def test_the_technicians_retry_sends_a_label_the_node_never_sent(tmp_path):
    """Queuing the event failed (the agent lived on): the technician's retry of the
    same label, which used to change nothing and send nothing, sends it."""
    store, outbox, lab = _node(tmp_path, die="before")
    _sample(store, tmp_path)
    with pytest.raises(Killed):
        lab.label("s1", "7", by="tech-1")
    lab.emit_event = _node(tmp_path)[2].emit_event  # queuing works again
    lab.label("s1", "7", by="tech-1")
    ev = _label_events(outbox)
    assert [(e["sample_id"], e["label"]) for e in ev] == [("s1", "7")]
    assert store.get_sample("s1")["label_sent"] is not None
    lab.label("s1", "7", by="tech-1")
    assert len(_label_events(outbox)) == 1


def test_a_sample_stored_with_its_label_sends_no_label_event(tmp_path):
    """A label given with the sample (a false alarm's correction) travels inside the
    sample's own message: nothing to send at the next start."""
    store, outbox, _ = _node(tmp_path)
    store.add_sample({
        "sample_id": "s2", "created_at": 1.0, "app": "digits", "version": "1.0.0",
        "reason": "false_alarm", "input_type": "image/png",
        "input_path": str(tmp_path / "s2.png"), "prediction": json.dumps(
            {"label": "3", "index": 3, "score": 0.9}),
        "scores": "[]", "label": "5", "source": "cam-1", "msg_id": "s2",
        "labelled_at": 2.0, "label_source": "alarm"})
    assert store.unsent_labels() == []
    store.close()
    outbox.close()
    _, outbox, _ = _node(tmp_path)
    assert _label_events(outbox) == []


def test_a_kill_after_the_event_was_queued_sends_it_once(tmp_path):
    """Killed after the event entered the outbox but before the label was marked
    sent: the next start sends it again under the same msg_id, kept once."""
    store, outbox, lab = _node(tmp_path, die="after")
    _sample(store, tmp_path)
    with pytest.raises(Killed):
        lab.label("s1", "7", by="tech-1")
    assert len(_label_events(outbox)) == 1
    assert store.unsent_labels() != []
    store.close()
    outbox.close()
    store, outbox, lab = _node(tmp_path)
    assert len(_label_events(outbox)) == 1  # the same msg_id: stored once
    assert store.unsent_labels() == []
