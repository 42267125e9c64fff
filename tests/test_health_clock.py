"""clock: the wall clock (injected) jumping forward or back by more than 5 s against
the monotonic clock is a fault with its size; the remedy re-arms what waits on wall
time -- here a real scheduler thread that would otherwise sleep out its tick before
seeing that a training window has opened."""

from __future__ import annotations

import sys
import textwrap
import time
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from edge_node.health import FaultJournal, Monitor
from edge_node.health.clock import ClockCheck
from edge_node.scheduling.clock import FakeClock
from edge_node.scheduling.config import ScheduleConfig
from edge_node.scheduling.jobs import JobRegistry, JobSpec
from edge_node.scheduling.scheduler import Scheduler

SH = ZoneInfo("Asia/Shanghai")
TRAINS = """
import json, signal, time
stop = []
signal.signal(signal.SIGTERM, lambda *a: stop.append(1))
print(json.dumps({"event": "progress", "step": 1}), flush=True)
while not stop:
    time.sleep(0.05)
"""


class Wall:
    """time.time() plus a settable offset: the box's clock being stepped."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


def _monitor(check):
    events: list[tuple[str, dict]] = []
    journal = FaultJournal(None)
    mon = Monitor([check], journal, lambda type, severity="info", app=None, data=None:
                  events.append((type, data or {})))
    return mon, events, journal


@pytest.mark.parametrize("jump", [3600.0, -90.0])
def test_a_jump_is_reported_with_its_size_and_rearms(jump):
    wall = Wall()
    rearmed = []
    check = ClockCheck(wall=wall, rearm={"scheduler": lambda: rearmed.append("s"),
                                         "outbox": lambda: rearmed.append("o")})
    mon, events, journal = _monitor(check)
    assert mon.run_all(heal=True)[0].ok  # the baseline
    assert mon.run_all(heal=True)[0].ok  # no jump
    wall.offset += jump
    [after] = mon.run_all(heal=True)
    detected = [d for t, d in events if t == "fault_detected"]
    assert detected and detected[0]["fault"] == "clock_jump"
    assert abs(detected[0]["data"]["jump_s"] - jump) < 1.0
    assert ("forward" if jump > 0 else "back") in detected[0]["detail"]
    healed = [d for t, d in events if t == "fault_healed"]
    assert healed and "scheduler, outbox" in healed[0]["remedy"]
    assert after.ok and rearmed == ["s", "o"]
    assert mon.run_all(heal=True)[0].ok  # one jump, one episode
    assert journal.summary()["clock_jump"]["detected"] == 1


def test_small_drift_is_not_a_jump():
    wall = Wall()
    check = ClockCheck(wall=wall)
    check.probe()
    wall.offset += 4.0  # NTP slewing, or a small step: under the 5 s threshold
    f = check.probe()
    assert f.ok and 3.5 < f.data["jump_s"] < 4.5


def test_the_scheduler_sees_an_opened_window_at_once(tmp_path):
    """Its thread slept its whole tick (60 s) from the old time; re-armed, it starts
    the night's training job now."""
    reg = JobRegistry(tmp_path / "node.db", tmp_path / "jobs")
    sched_clock = FakeClock(datetime(2025, 1, 3, 12, 0, tzinfo=SH))
    s = Scheduler(reg, ScheduleConfig.model_validate({
        "timezone": "Asia/Shanghai", "tick_s": 60, "load": {"train_when_idle": False},
        "windows": [{"card": "cpu", "days": "*", "start": "20:00", "end": "06:00",
                     "training_fraction": 1.0}]}),
        inference_load=lambda card: 0.0, training_cores=lambda card, fraction: [],
        clock=sched_clock)
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent(TRAINS))
    job = reg.submit(JobSpec(name="night", command=[sys.executable, str(script)],
                             card="cpu")).job_id
    wall = Wall()
    check = ClockCheck(wall=wall, rearm={"scheduler": s.wake})
    mon, events, _ = _monitor(check)
    s.start()
    try:
        mon.run_all(heal=True)
        time.sleep(0.5)  # the scheduler's first pass: outside the window, sleeps 60 s
        assert reg.get(job).state == "queued"
        wall.offset += 9 * 3600  # the box's clock is stepped to 21:00
        sched_clock.set(sched_clock.now() + timedelta(hours=9))
        t0 = time.monotonic()
        mon.run_all(heal=True)
        deadline = time.monotonic() + 20
        while reg.get(job).state != "running" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert reg.get(job).state == "running"
        assert time.monotonic() - t0 < 20  # not the 60 s tick
        assert [t for t, _ in events] == ["fault_detected", "fault_healed"]
    finally:
        s.stop()
        reg.close()
