"""Fleet pieces without a fleet.

- The cloud's placement check (appstore/placement.py) against the node's own
  placement (edge_node/resources/placement.py): for the same cards and slices,
  as the node reports them, the cloud must say "fits" exactly when the node
  would place the slice, counting the slice the app holds now (an upgrade
  replaces it). Real code on both sides; the cards are described, not probed
  (a GPU cannot be real here).
- The rollout engine's lease when AppStore workers share one database (real
  SQLite; the clock is injected so the lease can lapse without waiting).
"""

from __future__ import annotations

import itertools

import pytest

from appstore.placement import fits, request
from edge_node.resources.cards import Card
from edge_node.resources.placement import Placement, PlacementError, SliceRequest

CPU = Card(id="cpu", kind="cpu", name="test cpu", memory_mb=8192, cores=(0, 1, 2, 3))
GPU = Card(id="gpu0", kind="gpu", name="test gpu (described)", memory_mb=16384, index=0)


def reported(p: Placement, cards: list[Card]) -> list[dict]:
    """What the node puts in ReportedState.cards (NodeAgent.cards_state)."""
    alloc = p.snapshot()
    return [{**c.to_dict(), "allocation": alloc.get(c.id)} for c in cards]


def node_says(p: Placement, req: SliceRequest) -> bool:
    try:
        p.place(req)
    except PlacementError:
        return False
    p.release(req.app)  # leave the placement as it was for the next question
    return True


@pytest.mark.parametrize("share_cores", [False, True])
def test_the_cloud_agrees_with_the_node_on_cpu(share_cores):
    p = Placement([CPU], reserve_mb=1024, share_cores=share_cores)
    p.place(SliceRequest("a", 0.5, 1024))     # 2 cores
    p.place(SliceRequest("b", 0.125, 512))    # half a core (shared) or a whole one
    cards = reported(p, [CPU])
    for fraction, memory, app in itertools.product(
            (0.1, 0.25, 0.5, 0.75, 1.0), (256, 4096, 7000), ("new", "a", "b")):
        req = SliceRequest(app, fraction, memory)
        cloud, why = fits(cards, app, request({"resources": {"card_fraction": fraction,
                                                             "memory_mb": memory}}, None))
        node = node_says(_upgrade(p, app), req)
        assert cloud == node, (share_cores, fraction, memory, app, why)


def _upgrade(p: Placement, app: str) -> Placement:
    """The node places an upgrade in place of the app's current slice: the same
    placement without it."""
    q = Placement([CPU, GPU][:len(p.cards)], reserve_mb=p.reserve_mb,
                  share_cores=p.share_cores, gpu_context_mb=p.gpu_context_mb)
    for name, s in p._slices.items():  # noqa: SLF001 - rebuilding the node's own state
        if name != app:
            q.place(p._requests[name])  # noqa: SLF001
    return q


def test_gpu_compute_and_memory_and_a_pinned_card():
    p = Placement([CPU, GPU], reserve_mb=1024, gpu_context_mb=0, prefer=("gpu", "cpu"))
    p.place(SliceRequest("a", 0.6, 8000, card="gpu0"))
    cards = reported(p, [CPU, GPU])
    ok, why = fits(cards, "new", request({"resources": {"card_fraction": 0.5,
                                                        "memory_mb": 4000,
                                                        "card": "gpu0"}}, None))
    assert not ok and "gpu0 needs 50% compute" in why and "has 40%" in why
    ok, _ = fits(cards, "a", request({"resources": {"card_fraction": 0.9, "memory_mb": 9000,
                                                    "card": "gpu0"}}, None))
    assert ok  # an upgrade of "a" gets its own 60 % back
    ok, why = fits(cards, "new", request({"resources": {"card": "tpu"}}, None))
    assert not ok and "asks for card 'tpu'" in why
    # the assignment's override wins over the manifest
    ok, _ = fits(cards, "new", request({"resources": {"card_fraction": 0.9, "card": "gpu0"}},
                                       {"card_fraction": 0.3, "memory_mb": 1000}))
    assert ok


def test_a_node_that_reported_nothing_is_left_to_decide():
    assert fits([], "new", request({}, None))[0]


def test_one_rollout_engine_moves_rollouts_when_workers_share_a_database(tmp_path):
    """Two AppStore workers on one SQLite file: only the lease holder ticks; when it
    stops renewing, the other takes over after the lease lapses."""
    from appstore.db import Store
    from appstore.rollouts import LEASE_S, RolloutEngine

    now = [1000.0]
    store = Store(tmp_path / "store.db")
    a, b = (RolloutEngine(store, None, None, assign=None, unassign=None,
                          clock=lambda: now[0]) for _ in range(2))
    assert a._lease() and not b._lease()  # noqa: SLF001
    now[0] += LEASE_S / 2
    assert a._lease() and not b._lease()  # noqa: SLF001 - renewed
    now[0] += LEASE_S + 1
    assert b._lease() and b.leader  # noqa: SLF001 - a stopped renewing: b takes over
    assert not a._lease() and not a.leader  # noqa: SLF001
    store.close()


class _Catalog:
    """The catalog seam: the engine asks it only for a version's manifest (the real
    catalog needs signed packages; tests/test_rollouts.py uses the real one)."""

    def get_version(self, app, version):
        return {"manifest": {"name": app, "version": version}}


def test_nodes_that_join_a_rollouts_target_midway_get_the_new_version(tmp_path):
    """A rollout's target is what it names now: a node labelled into the group while
    the rollout runs joins its last wave (gated with it); one that joins while the
    last wave runs is given the version when every wave passed. Nobody is left on
    the old version, and a rollback takes the late ones back to what they had."""
    import json

    from appstore.db import Store
    from appstore.registry import Registry
    from appstore.rollouts import RolloutEngine

    now = [1000.0]
    store = Store(tmp_path / "store.db")
    reg = Registry(store)
    eng = RolloutEngine(store, _Catalog(), reg, assign=reg.assign, unassign=reg.unassign,
                        clock=lambda: now[0])

    def ready(*nodes, version="2.0"):
        with store.write() as db:
            for n in nodes:
                db.execute("update nodes set online = 1, reported = ? where node_id = ?",
                           [json.dumps({"apps": [{"name": "cam", "version": version,
                                                  "status": "ready"}]}), n])

    for n in ("a", "b", "c"):
        reg.set_labels(n, None, "g", None)
        reg.assign(n, "cam", "1.0")
        ready(n, version="1.0")
    ro = eng.create({"app": "cam", "version": "2.0", "target": {"group": "g"},
                     "waves": {"canary": 1, "steps": [50, 100]},
                     "gate": {"bake_s": 0, "min_requests": 0}})
    rid = ro["rollout_id"]
    assert [w["nodes"] for w in ro["waves"]] == [1, 1, 1]

    def step(n=1):
        for _ in range(n):
            now[0] += 1
            eng.tick()

    def version(n):
        return {a["app"]: a["version"] for a in reg.assignments(n)}.get("cam")

    step()  # wave 0 (the canary) starts
    assert version("a") == "2.0" and version("b") == "1.0"
    ready("a")
    step(2)  # baking, passed: wave 1
    reg.set_labels("d", None, "g", None)  # joins the group mid-rollout, on the old version
    reg.assign("d", "cam", "1.0")
    ready("d", version="1.0")
    ready("b")
    step(2)  # wave 1 passed: the last wave starts, with d in it
    got = eng.get(rid)
    assert got["wave"] == 2 and [w["nodes"] for w in got["waves"]] == [1, 1, 2]
    assert version("c") == version("d") == "2.0"
    assert any(e["what"] == "joined" and "d" in e["detail"] for e in got["log"])
    reg.set_labels("e", None, "g", None)  # joins while the last wave runs
    reg.assign("e", "cam", "1.0")
    step()
    assert version("e") == "1.0" and eng.get(rid)["state"] == "waiting"  # d is not ready
    ready("c", "d")
    step(3)
    got = eng.get(rid)
    assert got["state"] == "succeeded" and "1 node(s) that joined" in got["reason"], got
    assert version("e") == "2.0"
    late = {n["node_id"]: n for n in got["nodes"]}["e"]
    assert late["state"] == "assigned" and late["prev_version"] == "1.0"
    eng.rollback(rid)
    assert {n: version(n) for n in "abcde"} == dict.fromkeys("abcde", "1.0")
    store.close()


def test_a_lost_card_has_no_room_in_the_clouds_placement_check():
    """A card the node reports lost (accelerator_lost) is not counted as room."""
    gpu = {"id": "gpu0", "kind": "gpu", "state": "lost", "memory_mb": 8192,
           "allocation": {"free": {"memory_mb": 8192, "compute_pct": 100}, "slices": []}}
    ok, why = fits([gpu], "cam", request({"resources": {"card": "gpu"}}, None))
    assert not ok and "gpu0: lost" in why
