"""memory_pressure: MemAvailable (through an injected reader) below the low mark
sheds load -- a real training job under a real scheduler is preempted and none
starts, caches are trimmed -- and the shedding holds until memory is back above
the recover mark, when training resumes."""

from __future__ import annotations

import sys
import textwrap
import time
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from edge_node.health import FaultJournal, Monitor
from edge_node.health.memory_pressure import MemoryPressureCheck, read_meminfo
from edge_node.scheduling.clock import FakeClock
from edge_node.scheduling.config import ScheduleConfig
from edge_node.scheduling.jobs import JobRegistry, JobSpec
from edge_node.scheduling.scheduler import Scheduler

TRAINS = """
import json, signal, time
stop = []
signal.signal(signal.SIGTERM, lambda *a: stop.append(1))
print(json.dumps({"event": "progress", "step": 1}), flush=True)
while not stop:
    time.sleep(0.05)
"""
GB = 1 << 20  # in kB, as /proc/meminfo counts


class Memory:
    """An injected /proc/meminfo: a 4 GB box with ``available_mb`` free."""

    def __init__(self, available_mb: int) -> None:
        self.available_mb = available_mb

    def __call__(self) -> dict[str, int]:
        return {"MemTotal": 4 * GB, "MemAvailable": self.available_mb << 10}


@pytest.fixture
def sched(tmp_path):
    reg = JobRegistry(tmp_path / "node.db", tmp_path / "jobs")
    events: list[tuple[str, dict]] = []
    s = Scheduler(reg, ScheduleConfig.model_validate({
        "timezone": "Asia/Shanghai", "windows": [{"card": "*", "training_fraction": 1.0}]}),
        inference_load=lambda card: 0.0, training_cores=lambda card, fraction: [],
        on_event=lambda type, data: events.append((type, data)),
        clock=FakeClock(datetime(2025, 1, 3, 21, 0, tzinfo=ZoneInfo("Asia/Shanghai"))))
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent(TRAINS))
    job = reg.submit(JobSpec(name="finetune-digits", command=[sys.executable, str(script)],
                             card="cpu")).job_id
    yield s, reg, job, events
    s.stop()
    reg.close()


def until(s: Scheduler, pred, what: str, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        s.tick()
        if pred():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_low_memory_pauses_training_until_it_recovers(sched):
    s, reg, job, sched_events = sched
    until(s, lambda: reg.get(job).state == "running", "the job to run")
    mem = Memory(available_mb=3000)
    trimmed = []
    check = MemoryPressureCheck(scheduler=s, low_mb=256, meminfo=mem,
                                trim=[lambda: trimmed.append(1) or "frame cache trimmed"])
    events: list[tuple[str, dict]] = []
    journal = FaultJournal(None)
    mon = Monitor([check], journal, lambda type, severity="info", app=None, data=None:
                  events.append((type, data or {})))
    assert mon.run_all(heal=True)[0].ok
    mem.available_mb = 150  # below the mark (max(256 MB, 5% of 4 GB = 204 MB))
    [after] = mon.run_all(heal=True)
    detected = [d for t, d in events if t == "fault_detected"]
    assert detected and detected[0]["fault"] == "memory_low"
    assert detected[0]["data"]["available_mb"] == 150 and detected[0]["data"]["low_mb"] == 256
    assert not after.ok  # still low right after shedding: the episode stays open
    assert [t for t, _ in events] == ["fault_detected", "fault_unhealed"]
    assert trimmed == [1] and s.paused and s.status()["paused"].startswith("memory low")
    until(s, lambda: reg.get(job).state == "preempted", "the job to be preempted")
    assert "training paused: memory low" in reg.get(job).reason
    for _ in range(10):  # paused: nothing starts, whatever the window says
        s.tick()
        time.sleep(0.02)
    assert reg.get(job).state == "preempted" and s.running() == {}
    mem.available_mb = 300  # above the low mark, below the recover mark (384): still shedding
    assert not mon.run_all(heal=True)[0].ok and s.paused
    mem.available_mb = 1000
    assert mon.run_all(heal=True)[0].ok
    healed = [d for t, d in events if t == "fault_healed"]
    assert healed and "paused" in healed[0]["remedy"]
    assert s.paused is None and not check.shedding
    until(s, lambda: reg.get(job).state == "running", "the job to resume")
    assert "job_resumed" in [t for t, _ in sched_events]
    assert journal.summary()["memory_low"]["healed"] == 1


def test_the_real_meminfo_is_read():
    info = read_meminfo()
    assert info["MemTotal"] > 0 and 0 < info["MemAvailable"] <= info["MemTotal"]
    f = MemoryPressureCheck(low_mb=1, low_fraction=0.0).probe()
    assert f.ok and f.data["available_mb"] > 0


def test_without_a_scheduler_it_still_trims():
    check = MemoryPressureCheck(meminfo=Memory(10))
    f = check.probe()
    assert not f.ok
    assert "gc (" in check.heal(f)
