"""accelerator: a GPU card the node placed an app on disappears from discovery; the
app is moved to the CPU card if it fits (a real signed package, the real reconciler
and Placement, real worker processes serving a real ONNX model), reported with why
and stopped if it does not, and moved back when the card returns.

Stand-ins, because there is no GPU here (and none in CI):

* **card discovery** -- the seam the check is built with (``discover``): NVML is
  :class:`tests.test_resources.FakeNvml`, the same fake ``test_resources.py`` uses,
  whose list of GPUs the test empties ("the card fell off the bus") and refills;
* **the worker while its app is on the fake GPU** -- this box's ONNX Runtime has
  no CUDA provider, so a worker started with a GPU slice's settings exits at once
  (``test_resources_worker.py`` proves that); while placed on ``gpu0`` the app's
  worker is a real process with CPU settings and a marker in its environment. The
  worker the check moves to the CPU card runs with the real settings of its real
  CPU slice (its CPU affinity is checked in /proc).
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from appstore.signing import SigningKey
from cloud_sync import schemas
from edge_node import reconciler as reconciler_mod
from edge_node.health import FaultJournal, Monitor
from edge_node.health.accelerator import AcceleratorCheck
from edge_node.reconciler import Reconciler
from edge_node.resources import (
    Placement,
    WorkerSettings,
    discover_cards,
    worker_settings,
)
from edge_node.serving.registry import AppRegistry
from edge_node.store import NodeStore
from edge_node.worker.supervisor import WorkerSupervisor
from tests.appstore_support import digits_package
from tests.models import _sample_dir, pid_alive, worker_pids
from tests.streams_support import wait_for
from tests.test_health_model_integrity import CloudBlobs
from tests.test_resources import FakeNvml

A2 = ("NVIDIA A2", 15360, 0, 0)
STANDIN = "AIDC_TEST_STANDIN_FOR_GPU"


def standin_settings(sl) -> WorkerSettings:
    """The real settings for a CPU slice; for a GPU slice, a CPU worker marked as such."""
    if sl.kind == "gpu":
        return WorkerSettings(threads=1, env={STANDIN: sl.card})
    return worker_settings(sl)


def cpus_allowed(pid: int) -> str:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Cpus_allowed_list:"):
            return line.split(":", 1)[1].strip()
    raise AssertionError("no Cpus_allowed_list")


def environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(e.decode().split("=", 1) for e in raw if b"=" in e)


@pytest.fixture
def make_node(tmp_path, monkeypatch):
    monkeypatch.setattr(reconciler_mod, "worker_settings", standin_settings)
    made = []

    def make(memory_mb: int | None = None, cpu_room_mb: int | None = None) -> dict:
        key = SigningKey.generate()
        cloud = tmp_path / "cloud"
        cloud.mkdir()
        sha, size = digits_package(_sample_dir(), key, tmp_path / "digits.aidcpkg")
        shutil.copyfile(tmp_path / "digits.aidcpkg", cloud / sha)
        nvml = FakeNvml([A2])
        cards = discover_cards(nvml=nvml)  # cpu, gpu0 (through the fake NVML)
        cpu = cards[0]
        reserve = cpu.memory_mb - cpu_room_mb if cpu_room_mb else 0
        placement = Placement(cards, reserve_mb=reserve, prefer=("gpu", "cpu"))
        run_dir = Path(tempfile.mkdtemp(prefix="aidc-w-", dir="/tmp"))
        sup = WorkerSupervisor(run_dir, restart_budget=(3, 60.0), memory_poll=None)
        store = NodeStore(tmp_path / "node.db")
        registry = AppRegistry()
        events: list[tuple[str, str | None, dict]] = []
        changes = []
        rec = Reconciler(node_id="n1", store=store, fetcher=CloudBlobs(cloud, tmp_path / "blobs"),
                         supervisor=sup, registry=registry,
                         trusted_keys=lambda: {key.key_id: key.public_raw},
                         blobs_dir=tmp_path / "blobs", apps_dir=tmp_path / "apps",
                         on_change=lambda: changes.append(1), placement=placement,
                         on_event=lambda t, sev, app, data: events.append((t, app, data)),
                         overrides={"digits": {"memory_mb": memory_mb}} if memory_mb else None,
                         retry_max=2.0, check_interval=0.5)
        rec.start()
        rec.on_desired_message("t", schemas.DesiredState(node_id="n1", revision=1, apps=[
            schemas.AppRef(name="digits", version="1.0.0", sha256=sha, size=size)]).to_bytes(),
            True)
        wait_for(lambda: [r for r in rec.reports() if r.status == "ready"], 60, "digits ready")
        node = {"rec": rec, "sup": sup, "registry": registry, "placement": placement,
                "nvml": nvml, "events": events, "changes": changes, "sha": sha,
                "key": f"digits@{sha[:12]}", "run_dir": run_dir, "store": store}
        made.append(node)
        return node

    yield make
    for n in made:
        n["rec"].stop()
        n["sup"].stop_all()
        assert worker_pids(str(n["run_dir"])) == []
        n["store"].close()
        shutil.rmtree(n["run_dir"], ignore_errors=True)


def monitor_of(check):
    events: list[tuple[str, dict]] = []
    journal = FaultJournal(None)
    mon = Monitor([check], journal, lambda type, severity="info", app=None, data=None:
                  events.append((type, data or {})))
    return mon, events, journal


def serves(node) -> bool:
    with np.load(_sample_dir() / "heldout.npz") as z:
        x, y = z["X_test"], z["y_test"]
    app = node["registry"].get("digits")
    return app.ready and (app.client.infer({"input": x})["label"] == y).mean() > 0.9


def test_apps_on_a_lost_gpu_move_to_the_cpu_and_back_when_it_returns(make_node):
    node = make_node()
    placement, sup, key = node["placement"], node["sup"], node["key"]
    assert placement.get("digits").card == "gpu0"
    gpu_pid = sup.status()[key]["pid"]
    assert environ(gpu_pid)[STANDIN] == "gpu0"  # the stand-in of the GPU worker
    client = node["registry"].get("digits").client
    emitted: list[tuple[str, dict]] = []
    check = AcceleratorCheck(placement, node["rec"],
                             discover=lambda: discover_cards(nvml=node["nvml"], quiet=True),
                             return_after_s=1.0,
                             emit_event=lambda t, severity="info", data=None:
                             emitted.append((t, data)))
    mon, events, journal = monitor_of(check)
    [f] = mon.run_all(heal=True)
    assert f.ok and "gpu0" in f.detail and events == []

    node["nvml"].gpus = []  # the card falls off the bus: NVML lists no GPU any more
    t0 = time.monotonic()
    [after] = mon.run_all(heal=True)
    took = time.monotonic() - t0
    assert after.ok, after.detail
    detected = [d for t, d in events if t == "fault_detected"]
    assert [t for t, _ in events] == ["fault_detected", "fault_healed"], events
    assert detected[0]["fault"] == "accelerator_lost"
    assert "gpu0 is gone from discovery with digits placed on it" in detected[0]["detail"]
    remedy = events[1][1]["remedy"]
    assert "gpu0 marked lost" in remedy and "moved digits from gpu0 to cpu" in remedy, remedy
    # the app runs on the CPU card now: a real CPU slice, its worker restarted with its settings
    sl = placement.get("digits")
    assert sl.kind == "cpu" and len(sl.cores) == 1
    st = sup.status()[key]
    assert st["state"] == "ready" and st["pid"] != gpu_pid and not pid_alive(gpu_pid)
    assert cpus_allowed(st["pid"]) == str(sl.cores[0])
    assert STANDIN not in environ(st["pid"])
    assert node["registry"].get("digits").client is client  # same client, new process
    assert serves(node)
    assert [r.status for r in node["rec"].reports()] == ["ready"]
    snap = placement.snapshot()
    assert snap["gpu0"]["lost"] is True and snap["gpu0"]["slices"] == []
    assert [s["app"] for s in snap["cpu"]["slices"]] == ["digits"]
    moved = [(t, d) for t, app, d in node["events"] if t == "app_moved"]
    assert moved and moved[-1][1]["from_card"] == "gpu0" and moved[-1][1]["to_card"] == "cpu"
    assert took < 30, took
    assert journal.summary()["accelerator_lost"]["healed"] == 1
    # while lost: ok (served elsewhere), and nothing new goes on the lost card
    f = check.probe()
    assert f.ok and "gpu0 lost; digits serve elsewhere" in f.detail, f.detail

    node["nvml"].gpus = [A2]  # the card is back
    [f] = mon.run_all(heal=True)
    assert f.ok and "gpu0 back" in f.detail and placement.get("digits").card == "cpu"
    time.sleep(1.1)  # return_after_s: present that long before the apps move back
    [f] = mon.run_all(heal=True)
    assert f.ok
    assert placement.get("digits").card == "gpu0" and "gpu0" not in placement.lost()
    st2 = sup.status()[key]
    assert st2["state"] == "ready" and environ(st2["pid"])[STANDIN] == "gpu0"
    assert serves(node)
    assert emitted == [("accelerator_returned", {
        "card": "gpu0", "moved_back": ["digits"], "stayed": {},
        "present_for_s": emitted[0][1]["present_for_s"]})]
    assert [t for t, _ in events] == ["fault_detected", "fault_healed"]  # no new episode
    assert check.stats["moved"] == 1 and check.stats["moved_back"] == 1


def test_an_app_that_does_not_fit_on_the_cpu_is_stopped_and_reported_not_half_deployed(
        make_node):
    # 2000 MB fits the 15 GB card; the CPU card has room for 500 MB only
    node = make_node(memory_mb=2000, cpu_room_mb=500)
    placement, sup, key = node["placement"], node["sup"], node["key"]
    assert placement.get("digits").card == "gpu0"
    gpu_pid = sup.status()[key]["pid"]
    check = AcceleratorCheck(placement, node["rec"], heal_wait_s=30,
                             discover=lambda: discover_cards(nvml=node["nvml"], quiet=True))
    mon, events, journal = monitor_of(check)
    node["nvml"].gpus = []
    [after] = mon.run_all(heal=True)
    assert not after.ok and "fit on no card: digits (was on gpu0)" in after.detail
    assert [t for t, _ in events] == ["fault_detected", "fault_unhealed"], events
    why = events[1][1]["why"]
    assert "digits not placed" in why and "needs 1 core and 2000 MB on cpu" in why, why
    # not half deployed: no slice, no worker, /v2 answers 503, reported failed with why
    assert placement.get("digits") is None
    assert sup.status()[key]["state"] == "stopped" and not pid_alive(gpu_pid)
    assert node["registry"].get("digits").ready is False
    [rep] = node["rec"].reports()
    assert rep.status == "failed" and "card gpu0 is lost" in rep.error
    assert "free: 1 core" in rep.error or "free: 2 cores" in rep.error, rep.error
    unplaced = [d for t, app, d in node["events"] if t == "app_unplaced"]
    assert unplaced and unplaced[0]["card"] == "gpu0"
    time.sleep(2.5)  # the reconciler retries (backoff): still nowhere to go
    assert placement.get("digits") is None

    node["nvml"].gpus = [A2]  # back: the app, serving nowhere, is placed at once
    [f] = mon.run_all(heal=True)
    assert f.ok, f.detail
    assert [t for t, _ in events][-1] == "fault_healed"
    assert "digits placed on gpu0 again" in events[-1][1]["remedy"], events[-1]
    assert placement.get("digits").card == "gpu0"
    wait_for(lambda: [r for r in node["rec"].reports() if r.status == "ready"], 30, "ready")
    assert serves(node)
    assert journal.summary()["accelerator_lost"]["healed"] == 1


def test_a_worker_that_died_with_its_card_is_neither_restarted_there_nor_rolled_back(
        make_node):
    """The card goes and takes its worker with it before the check's next probe: the
    reconciler, asking the check, reports the app waiting instead of restarting it on
    the gone card or rolling its version back as a crash loop; the remedy moves it."""
    node = make_node()
    placement, sup, key, rec = node["placement"], node["sup"], node["key"], node["rec"]
    check = AcceleratorCheck(placement, rec,
                             discover=lambda: discover_cards(nvml=node["nvml"], quiet=True))
    assert rec.card_gone == check.card_gone and not check.card_gone("gpu0")
    node["nvml"].gpus = []
    sup.stop(key)  # the worker died with the card (restarts there would fail)
    wait_for(lambda: "card gpu0 is gone" in (rec.reports()[0].error or ""), 10, "waiting")
    time.sleep(1.0)  # two more passes of the reconciler: still not restarted on gpu0
    assert sup.status()[key]["state"] == "stopped" and placement.get("digits").card == "gpu0"
    assert not rec._crash_looped
    mon, events, _ = monitor_of(check)
    [after] = mon.run_all(heal=True)
    assert after.ok and [t for t, _ in events] == ["fault_detected", "fault_healed"], events
    assert placement.get("digits").card == "cpu" and sup.status()[key]["state"] == "ready"
    assert serves(node)


def test_a_node_without_an_accelerator_passes_without_asking_nvml():
    placement = Placement(discover_cards(nvml=None))

    def discover():
        raise AssertionError("no GPU card: nothing to discover")

    f = AcceleratorCheck(placement, reconciler=None, discover=discover).probe()
    assert f.ok and f.detail == "no accelerator card"


def test_a_running_agent_reports_a_lost_gpu_in_its_cards_and_raises_the_alarm(
        tmp_path, shared_broker, prefix, monkeypatch):
    """A real agent (broker, node.db, outbox): its cards discovered through the fake
    NVML (the seam, at start and in the check); the card goes: the fault's events go
    through the outbox, the reported state's card says ``lost``; it comes back: an
    ``accelerator_returned`` event, the card ``ok`` again."""
    from edge_node import agent as agent_mod
    from tests.test_health_agent import check_of, events, make_agent

    nvml = FakeNvml([A2])
    monkeypatch.setattr(agent_mod, "discover_cards", lambda: discover_cards(nvml=nvml))
    agent = make_agent(tmp_path, shared_broker, prefix)
    check = check_of(agent, "accelerator")
    check.discover = lambda: discover_cards(nvml=nvml, quiet=True)
    check.interval_s, check.return_after_s = 0.3, 0.5
    agent.start()
    try:
        db = agent.cfg.data_dir / "node.db"

        def card(cid: str) -> dict:
            return next(c for c in agent.reported_state().cards if c["id"] == cid)

        assert card("gpu0")["state"] == "ok" and card("gpu0")["name"] == "NVIDIA A2"
        nvml.gpus = []
        wait_for(lambda: card("gpu0")["state"] == "lost", 20, "gpu0 lost in the reported state")

        def faults() -> list[dict]:
            return [e for e in events(db) if e["type"].startswith("fault_")
                    and e["data"].get("fault") == "accelerator_lost"]

        wait_for(lambda: len(faults()) >= 2, 20, "the fault's events")
        det, healed = faults()[:2]
        assert (det["type"], det["severity"]) == ("fault_detected", "warning")
        assert "gpu0 is gone from discovery" in det["data"]["detail"]
        assert healed["type"] == "fault_healed"
        assert "gpu0 marked lost; no app was placed on it" in healed["data"]["remedy"]
        assert card("gpu0")["allocation"]["lost"] is True
        assert card("cpu")["state"] == "ok"

        nvml.gpus = [A2]
        wait_for(lambda: card("gpu0")["state"] == "ok", 20, "gpu0 back")
        wait_for(lambda: [e for e in events(db) if e["type"] == "accelerator_returned"], 10,
                 "accelerator_returned")
        assert len(faults()) == 2  # one episode
        assert "lost" not in card("gpu0")["allocation"]
    finally:
        agent.stop()
