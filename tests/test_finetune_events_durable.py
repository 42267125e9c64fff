"""A fine-tune run's events reach the cloud even when the agent dies right after a step.

A run's state is committed to ``finetune_runs`` and then, a second commit, its
event (``finetune_started``, ``model_promoted``, ``finetune_rejected``, ...) goes
into the outbox. A kill -9 between the two left a verdict the cloud never heard
of. Now the run keeps the state whose event is queued (``event_sent``); at the
next start (:meth:`SiteLearning.recover`) a state not yet sent has its event
rebuilt from the run's row, under a msg_id made from the run and the state, so
one queued just before the kill is kept once.

Real NodeStore and Outbox (the same node.db), the real SiteLearning.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cloud_sync.outbox import Outbox
from edge_node.adapt import SiteLearning
from edge_node.store import NodeStore
from tests.models import Killed, killable_emit


def _node(tmp: Path, die: str | None = None):
    store = NodeStore(tmp / "node.db")
    outbox = Outbox(tmp / "node.db", conn=None, ack_topic="ack")

    emit_event = killable_emit(outbox, die)

    learning = SiteLearning(store=store, jobs=None, scheduler=None, reconciler=None,
                            registry=None, supervisor=None, placement=None, data_dir=tmp,
                            emit_event=emit_event)
    return store, outbox, learning


def _events(outbox: Outbox) -> list[dict]:
    rows = outbox._db.execute("SELECT payload FROM cloud_sync_outbox WHERE kind = 'event' "
                              "ORDER BY seq")
    return [json.loads(p) for (p,) in rows]


def _close(store, outbox) -> None:
    outbox.close()
    store.close()


def _run(store: NodeStore) -> dict:
    store.add_run({"run_id": "r1", "app": "digits", "state": "training",
                   "requested_by": "tech-1", "base_version": "1.0.0", "base_sha256": "ab" * 32,
                   "job_id": "j1", "lineage": json.dumps({"samples": {"train": 120,
                                                                      "heldout": 30}})})
    store.update_run("r1", event_sent="training")  # its finetune_started went out
    return store.get_run("r1")


def test_a_verdict_committed_just_before_a_kill_is_sent_at_the_next_start(tmp_path):
    store, outbox, learning = _node(tmp_path, die="before")
    run = _run(store)
    with pytest.raises(Killed):
        learning._finish(run, "rejected", "no better than the base", metrics={"acc": 0.5})
    assert store.get_run("r1")["state"] == "rejected"  # committed on the node
    assert _events(outbox) == []  # the cloud would never hear of it
    _close(store, outbox)

    store, outbox, learning = _node(tmp_path)  # the agent starts again
    learning.recover()
    (ev,) = _events(outbox)
    assert ev["type"] == "finetune_rejected" and ev["app"] == "digits"
    assert ev["data"]["run_id"] == "r1" and ev["data"]["reason"] == "no better than the base"
    learning.recover()  # a second start sends nothing more
    assert len(_events(outbox)) == 1
    _close(store, outbox)


def test_a_kill_after_the_event_was_queued_sends_it_once(tmp_path):
    store, outbox, learning = _node(tmp_path, die="after")
    run = _run(store)
    with pytest.raises(Killed):
        learning._finish(run, "failed", "its training job is gone")
    assert [e["type"] for e in _events(outbox)] == ["finetune_failed"]
    assert store.get_run("r1")["event_sent"] == "training"
    _close(store, outbox)

    store, outbox, learning = _node(tmp_path)
    learning.recover()
    assert [e["type"] for e in _events(outbox)] == ["finetune_failed"]  # the same msg_id
    assert store.get_run("r1")["event_sent"] == "failed"
    _close(store, outbox)


def test_a_started_event_lost_to_a_kill_is_rebuilt_from_the_run(tmp_path):
    """The run was committed (training, its job submitted), the agent died before
    finetune_started was queued: the next start sends it, with the run's figures."""
    store, outbox, learning = _node(tmp_path)
    _run(store)
    store.update_run("r1", event_sent=None)
    # recover looks the training job up: it is still running
    learning.jobs = type("Jobs", (), {"get": staticmethod(
        lambda job_id: type("J", (), {"state": "running"})())})()
    learning.recover()
    (ev,) = _events(outbox)
    assert ev["type"] == "finetune_started"
    assert ev["data"] == {"run_id": "r1", "job_id": "j1", "base_version": "1.0.0",
                          "train": 120, "heldout": 30, "by": "tech-1"}
    _close(store, outbox)
