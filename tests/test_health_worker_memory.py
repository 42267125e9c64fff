"""worker_memory: a worker over its slice's memory quota in several readings in a
row is restarted (gracefully, counted); a spike is not -- on real worker processes
with a real ONNX model, the quota set below the worker's real resident memory."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest

from edge_node.health import FaultJournal, Monitor
from edge_node.health.worker_memory import WorkerMemoryCheck
from edge_node.resources.slices import WorkerSettings
from edge_node.worker.proc import private_rss_mb
from edge_node.worker.supervisor import WorkerSupervisor
from tests.models import load_test_split, pid_alive, worker_pids


@pytest.fixture
def sup():
    run_dir = Path(tempfile.mkdtemp(prefix="aidc-w-", dir="/tmp"))
    # as the agent builds it when this check runs: the supervisor does not enforce
    s = WorkerSupervisor(run_dir, restart_budget=(3, 60.0), memory_poll=None)
    yield s
    s.stop_all()
    assert worker_pids(str(run_dir)) == []
    shutil.rmtree(run_dir, ignore_errors=True)


def test_a_worker_over_its_quota_is_restarted_after_three_readings(sup, app_dir):
    x, y = load_test_split(app_dir)
    client = sup.start("hungry", app_dir, settings=WorkerSettings(memory_mb=16))
    pid = sup.status()["hungry"]["pid"]
    rss = private_rss_mb(pid)
    assert rss > 16  # the runtime alone holds more: the quota is below its real RSS
    check = WorkerMemoryCheck(sup, strikes=3)
    for n in (1, 2):  # one or two readings over: not yet a fault, nothing restarted
        f = check.probe()
        assert f.ok and f"({n}/3)" in f.detail, f.detail
    assert sup.status()["hungry"]["pid"] == pid
    events: list[tuple[str, dict]] = []
    journal = FaultJournal(None)
    monitor = Monitor([check], journal, lambda type, severity="info", app=None, data=None:
                      events.append((type, data or {})))
    [after] = monitor.run_all(heal=True)  # the third reading: detected, healed
    detected = [d for t, d in events if t == "fault_detected"]
    assert detected and detected[0]["fault"] == "worker_over_quota"
    info = detected[0]["data"]["workers"]["hungry"]
    assert info["pid"] == pid and info["quota_mb"] == 16 and info["rss_mb"] > 16
    healed = [d for t, d in events if t == "fault_healed"]
    assert healed and "restarted hungry" in healed[0]["remedy"], events
    assert after.ok  # the new process starts its count from zero
    st = sup.status()["hungry"]
    assert st["state"] == "ready" and st["pid"] not in (None, pid) and not pid_alive(pid)
    assert st["memory_restarts"] == 1 and st["restarts"] == 1
    assert st["last_error"].startswith("memory quota exceeded: ")
    assert st["rss_mb"] > 0 and st["memory_budget_mb"] == 16
    assert (client.infer({"input": x})["label"] == y).mean() > 0.9
    assert journal.summary()["worker_over_quota"]["healed"] == 1


def test_a_spike_is_not_a_fault_and_a_worker_within_quota_is_left_alone(sup, app_dir):
    sup.start("fine", app_dir, settings=WorkerSettings(memory_mb=4096))
    sup.start("spiky", app_dir, settings=WorkerSettings(memory_mb=4096))
    pids = {k: st["pid"] for k, st in sup.status().items()}
    readings = iter([5000, 100, 5000, 100, 5000])  # spiky's: never 3 over in a row

    def rss(pid: int) -> int | None:
        return next(readings) if pid == pids["spiky"] else private_rss_mb(pid)

    check = WorkerMemoryCheck(sup, strikes=3, rss_mb=rss)
    for _ in range(5):
        f = check.probe()
        assert f.ok, f.detail
    assert {k: st["pid"] for k, st in sup.status().items()} == pids
    assert all(st["memory_restarts"] == 0 for st in sup.status().values())
    assert 0 < f.data["workers"]["fine"]["rss_mb"] < 4096


def test_no_quota_no_reading(sup, app_dir):
    """A worker started without a memory budget (a GPU slice's is on the card) is not judged."""
    sup.start("free", app_dir)
    f = WorkerMemoryCheck(sup, strikes=1).probe()
    assert f.ok and f.data["workers"] == {}
