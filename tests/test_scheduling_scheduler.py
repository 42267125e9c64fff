"""The scheduler on real job processes. Only the clock and the inference load are
faked (they are the injected seams); processes, signals, checkpoints, affinity and
SQLite are real. Every wait is bounded."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import numpy as np
import pytest

from edge_node.scheduling.clock import FakeClock
from edge_node.scheduling.config import ScheduleConfig
from edge_node.scheduling.jobs import JobRegistry, JobSpec
from edge_node.scheduling.scheduler import Scheduler

SH = ZoneInfo("Asia/Shanghai")
FRI_1959 = datetime(2025, 1, 3, 19, 59, tzinfo=SH)  # a Friday evening
EXAMPLE = "edge_node.scheduling.example_job"
EX_ARGS = ["--epochs", "4", "--checkpoint-every", "10"]  # 47 batches an epoch, 188 in all
NIGHTS = {"card": "cpu", "days": "*", "start": "20:00", "end": "06:00",
          "training_fraction": 1.0}
ALWAYS = {"card": "*", "training_fraction": 1.0}
NO_IDLE = {"train_when_idle": False}

IGNORES_SIGTERM = """
import json, signal, subprocess, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
child = subprocess.Popen(["sleep", "60"])  # inherits SIG_IGN: only SIGKILL ends it
print(json.dumps({"event": "progress", "child": child.pid}), flush=True)
time.sleep(60)
"""
CRASHES = """
import time
time.sleep(0.2)
raise ValueError("boom: bad sample")
"""
REPORTS_AFFINITY = """
import json, os, signal, sys, time
stop = []
signal.signal(signal.SIGTERM, lambda *a: stop.append(1))
status = open("/proc/self/status").read().splitlines()
cpus = [ln.split(":", 1)[1].strip() for ln in status if ln.startswith("Cpus_allowed_list")][0]
env = {k: os.environ[k] for k in ("AIDC_JOB_CORES", "AIDC_JOB_CPUS", "AIDC_JOB_FRACTION",
                                  "AIDC_JOB_CARD", "OMP_NUM_THREADS", "AIDC_JOB_RESUME")}
print(json.dumps({"event": "progress", "cpus": cpus, "env": env, "argv": sys.argv[1:]}),
      flush=True)
while not stop:
    time.sleep(0.05)
"""


class Harness:
    """A scheduler on a fake clock and a settable load, recording its events."""

    def __init__(self, tmp_path: Path, config: dict, start: datetime = FRI_1959,
                 cores=lambda card, fraction: []) -> None:
        self.tmp = tmp_path
        self.clock = FakeClock(start)
        self.load: dict[str, float] = {}
        self.events: list[tuple[str, dict]] = []
        self.reg = JobRegistry(tmp_path / "node.db", tmp_path / "jobs")
        self.sched = Scheduler(
            self.reg, ScheduleConfig.model_validate({"timezone": "Asia/Shanghai", **config}),
            inference_load=lambda card: self.load.get(card, 0.0), training_cores=cores,
            on_event=lambda type, data: self.events.append((type, data)), clock=self.clock)

    def script(self, name: str, body: str, card: str = "cpu") -> str:
        path = self.tmp / f"{name}.py"
        path.write_text(textwrap.dedent(body))
        return self.reg.submit(JobSpec(name=name, command=[sys.executable, str(path)],
                                       card=card)).job_id

    def example(self, *extra: str) -> str:
        return self.reg.submit(JobSpec(name="digits", module=EXAMPLE,
                                       args=EX_ARGS + list(extra))).job_id

    def until(self, pred, what: str, timeout: float = 30.0):
        """Tick (as the scheduler thread would) until ``pred()`` is truthy."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.sched.tick()
            value = pred()
            if value:
                return value
            time.sleep(0.05)
        raise AssertionError(f"timed out after {timeout}s waiting for {what}; "
                             f"events {[t for t, _ in self.events]}")

    def state(self, job_id: str) -> str:
        return self.reg.get(job_id).state

    def types(self) -> list[str]:
        return [t for t, _ in self.events]

    def pid(self, job_id: str) -> int:
        return self.sched.running()[job_id]


@pytest.fixture
def harness(tmp_path):
    made: list[Harness] = []

    def make(config: dict, **kw) -> Harness:
        made.append(Harness(tmp_path, config, **kw))
        return made[-1]

    yield make
    for h in made:
        h.sched.stop()
        h.reg.close()


def gone(pid: int) -> bool:
    """No such process, or only a zombie waiting for a reaper."""
    try:
        return ") Z " in Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True


def reference_weights(tmp_path: Path):
    out = subprocess.run([sys.executable, "-m", EXAMPLE, *EX_ARGS, "--checkpoint-dir",
                          str(tmp_path / "reference")], capture_output=True, timeout=60)
    assert out.returncode == 0, out.stderr.decode()[-2000:]
    with np.load(tmp_path / "reference" / "final.npz") as z:
        return z["w"].copy(), z["b"].copy()


def final_weights(h: Harness, job_id: str):
    with np.load(h.reg.get(job_id).checkpoint_dir / "final.npz") as z:
        return z["w"].copy(), z["b"].copy()


def test_window_close_preempts_and_the_next_window_resumes_to_the_same_weights(harness,
                                                                               tmp_path):
    """Friday 20:00 the night window opens and the job starts; Saturday 06:00 it closes:
    the job checkpoints and exits; Saturday 20:00 it resumes from that checkpoint (not
    from zero) and ends with exactly the weights of a run that was never interrupted."""
    h = harness({"windows": [NIGHTS], "load": NO_IDLE, "grace_s": 20})
    job = h.example("--throttle", "0.02")
    h.sched.tick()
    assert h.state(job) == "queued" and h.types() == []  # 19:59: not yet

    h.clock.set(datetime(2025, 1, 3, 20, 0, tzinfo=SH))
    h.until(lambda: h.state(job) == "running", "start at 20:00")
    pid = h.pid(job)
    h.until(lambda: h.reg.get(job).progress.get("checkpoint_step", 0) >= 60,
            "a checkpoint in the second epoch")

    h.clock.set(datetime(2025, 1, 4, 6, 0, tzinfo=SH))
    h.until(lambda: h.state(job) == "preempted", "preemption at 06:00")
    rec = h.reg.get(job)
    stopped_at = rec.progress["checkpoint_step"]
    assert 60 <= stopped_at < 188 and rec.reason == "outside training windows"
    assert gone(pid) and h.types() == ["job_started", "job_preempted"]
    assert h.events[1][1]["killed"] is False and h.events[1][1]["exit_code"] == 0

    h.clock.set(datetime(2025, 1, 4, 19, 0, tzinfo=SH))
    for _ in range(5):
        h.sched.tick()
    assert h.state(job) == "preempted"  # daytime: stays down

    h.clock.set(datetime(2025, 1, 4, 20, 0, tzinfo=SH))
    h.until(lambda: h.state(job) == "done", "the resumed run to finish")
    rec = h.reg.get(job)
    assert rec.progress["resumed_from"] == stopped_at and rec.progress["step"] == 188
    assert (rec.starts, rec.preemptions, rec.kills) == (2, 1, 0)
    assert h.types() == ["job_started", "job_preempted", "job_resumed", "job_done"]
    w_ref, b_ref = reference_weights(tmp_path)
    w, b = final_weights(h, job)
    assert np.array_equal(w, w_ref) and np.array_equal(b, b_ref)


def test_inference_load_preempts_and_idle_resumes_with_hysteresis(harness):
    """Outside any window a job trains only once inference has been idle for a while;
    a short spike or a middling load does not stop it, a sustained high load does, and
    it resumes from its checkpoint only after the load has been low long enough again."""
    h = harness({"load": {"idle_fraction": 1.0, "idle_below": 0.2, "idle_for_s": 30,
                          "busy_above": 0.6, "busy_for_s": 5}, "grace_s": 20})
    job = h.example("--throttle", "0.02")
    h.load["cpu"] = 0.1
    h.sched.tick()
    h.clock.advance(20)
    h.sched.tick()
    assert h.state(job) == "queued"  # idle for 20 s is not enough
    h.clock.advance(11)
    h.until(lambda: h.state(job) == "running", "start after 31 s idle")
    assert h.events[0][1]["basis"] == "idle" and h.events[0][1]["fraction"] == 1.0
    h.until(lambda: h.reg.get(job).progress.get("checkpoint_step", 0) >= 10, "a checkpoint")

    h.load["cpu"] = 0.4  # between the marks, for a long time
    for _ in range(3):
        h.sched.tick()
        h.clock.advance(60)
    h.load["cpu"] = 0.9  # a 3 s spike
    h.sched.tick()
    h.clock.advance(3)
    h.sched.tick()
    h.load["cpu"] = 0.3
    h.sched.tick()
    assert h.state(job) == "running" and h.types() == ["job_started"]

    h.load["cpu"] = 0.9  # sustained
    h.sched.tick()
    h.clock.advance(5)
    h.until(lambda: h.state(job) == "preempted", "preemption by load")
    rec = h.reg.get(job)
    assert rec.reason.startswith("inference busy (load 0.90")
    stopped_at = rec.progress["checkpoint_step"]

    h.load["cpu"] = 0.1
    h.sched.tick()
    h.clock.advance(20)
    for _ in range(3):
        h.sched.tick()
    assert h.state(job) == "preempted"  # not idle long enough yet
    h.clock.advance(10)
    h.until(lambda: h.state(job) == "done", "resume and finish once idle")
    assert h.reg.get(job).progress["resumed_from"] == stopped_at > 0
    assert h.types() == ["job_started", "job_preempted", "job_resumed", "job_done"]


def test_a_job_that_ignores_sigterm_is_killed_after_the_grace_period(harness):
    """Closing the window must free the card even from a job that will not stop: after
    grace_s the whole process group (children too) is SIGKILLed and the job is marked."""
    h = harness({"windows": [NIGHTS], "load": NO_IDLE, "grace_s": 1.0},
                start=datetime(2025, 1, 3, 21, 0, tzinfo=SH))
    job = h.script("stubborn", IGNORES_SIGTERM)
    child = h.until(lambda: h.reg.get(job).progress.get("child"), "the child's pid")
    pid = h.pid(job)
    h.clock.set(datetime(2025, 1, 4, 6, 0, tzinfo=SH))
    t0 = time.monotonic()
    h.until(lambda: h.state(job) == "preempted", "the kill", timeout=10)
    assert 0.9 <= time.monotonic() - t0 < 5
    rec = h.reg.get(job)
    assert rec.kills == 1 and "ignored SIGTERM, killed after 1s" in rec.reason
    assert h.events[-1][0] == "job_preempted" and h.events[-1][1]["killed"] is True
    h.until(lambda: gone(pid) and gone(child), "job and child gone", timeout=5)


def test_a_crashing_job_fails_with_its_reason(harness):
    """A job that raises is 'failed' with the exit code and its last stderr line, so
    the operator sees why; it is not restarted in a loop."""
    h = harness({"windows": [ALWAYS]})
    job = h.script("crashy", CRASHES)
    h.until(lambda: h.state(job) == "failed", "the failure")
    rec = h.reg.get(job)
    assert rec.reason == "exited with code 1: ValueError: boom: bad sample"
    assert h.types() == ["job_started", "job_failed"]
    assert h.events[-1][1]["reason"] == rec.reason
    for _ in range(5):
        h.sched.tick()
    assert h.reg.get(job).starts == 1


def test_stop_leaves_no_process_behind_and_a_restart_resumes(harness):
    """Stopping the node stops every job (a polite one and one that ignores SIGTERM,
    with its child) within the grace period and marks them preempted; a new scheduler
    on the same database resumes them."""
    h = harness({"windows": [ALWAYS], "grace_s": 1.0, "tick_s": 0.05})
    polite = h.example("--throttle", "0.05")
    stubborn = h.script("stubborn", IGNORES_SIGTERM, card="gpu0")
    h.sched.start()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not (
            h.reg.get(stubborn).progress.get("child")
            and h.reg.get(polite).progress.get("checkpoint_step")):
        time.sleep(0.05)
    child = h.reg.get(stubborn).progress["child"]
    pids = [h.pid(polite), h.pid(stubborn), child]
    t0 = time.monotonic()
    h.sched.stop()
    assert time.monotonic() - t0 < 6
    assert all(gone(p) for p in pids[:2])
    h.until(lambda: gone(child), "the stubborn job's child", timeout=5)
    assert not [t for t in threading.enumerate() if t.name == "scheduler"]
    assert [h.state(j) for j in (polite, stubborn)] == ["preempted", "preempted"]
    assert h.reg.get(polite).reason == "node stopping"

    again = harness({"windows": [ALWAYS], "grace_s": 1.0})
    again.until(lambda: again.state(polite) == "running", "resume after restart")
    assert again.types()[0] == "job_resumed"


def test_agent_crash_recovery_stops_the_orphan_and_resumes_it(harness):
    """If the agent died with a job running, the next start finds the orphan by its
    pid and job id, stops it, and resumes the job instead of running it twice."""
    first = harness({"windows": [ALWAYS], "grace_s": 5.0})
    job = first.example("--throttle", "0.05")
    first.until(lambda: first.reg.get(job).progress.get("checkpoint_step"), "a checkpoint")
    orphan = first.pid(job)  # 'first' now plays dead: no stop()

    second = harness({"windows": [ALWAYS], "grace_s": 5.0, "enabled": False})
    second.sched.start()  # recovery runs before its loop
    assert gone(orphan)
    rec = second.reg.get(job)
    assert (rec.state, rec.reason) == ("preempted", "agent restarted")

    second.sched.set_config(ScheduleConfig.model_validate(
        {"windows": [ALWAYS], "grace_s": 5.0, "tick_s": 0.05}))
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not second.types():  # its thread starts it
        time.sleep(0.05)
    assert second.types() == ["job_resumed"]
    assert second.state(job) == "running" and second.reg.get(job).starts == 2
    assert second.pid(job) != orphan


def test_affinity_and_thread_env_are_in_effect(harness):
    """The cores a fraction maps to are the job's real CPU affinity from its first
    instruction (/proc/<pid>/status), and its thread env matches; the agent's own
    affinity is untouched."""
    last = max(os.sched_getaffinity(0))
    asked = []

    def cores(card, fraction):
        asked.append((card, fraction))
        return [last]

    h = harness({"windows": [{**NIGHTS, "training_fraction": 0.5}], "load": NO_IDLE},
                start=datetime(2025, 1, 3, 21, 0, tzinfo=SH), cores=cores)
    before = os.sched_getaffinity(0)
    job = h.script("pinned", REPORTS_AFFINITY)
    seen = h.until(lambda: h.reg.get(job).progress.get("cpus"), "the job's report")
    status = Path(f"/proc/{h.pid(job)}/status").read_text()
    assert f"Cpus_allowed_list:\t{last}\n" in status
    assert seen == str(last) and asked == [("cpu", 0.5)]
    env = h.reg.get(job).progress["env"]
    assert env == {"AIDC_JOB_CORES": "1", "AIDC_JOB_CPUS": str(last), "AIDC_JOB_FRACTION": "0.5",
                   "AIDC_JOB_CARD": "cpu", "OMP_NUM_THREADS": "1", "AIDC_JOB_RESUME": "0"}
    argv = h.reg.get(job).progress["argv"]
    assert argv == ["--checkpoint-dir", str(h.reg.get(job).checkpoint_dir)]
    assert os.sched_getaffinity(0) == before
    assert json.loads(json.dumps(h.sched.status()))["cards"]["cpu"]["cores"] == [last]


def test_cancel_stops_a_running_job_for_good_and_retry_resumes_it(harness):
    """An operator's cancel ends a running job as failed/'cancelled' (no restart even
    with the window open); a retry queues it again and it starts with --resume."""
    h = harness({"windows": [ALWAYS], "grace_s": 5.0})
    job = h.script("pinned", REPORTS_AFFINITY)
    h.until(lambda: h.reg.get(job).progress.get("argv"), "the job to run")
    pid = h.pid(job)
    h.sched.cancel(job)
    h.until(lambda: h.state(job) == "failed", "the cancel")
    assert h.reg.get(job).reason == "cancelled" and gone(pid)
    for _ in range(5):
        h.sched.tick()
    assert h.state(job) == "failed" and h.types() == ["job_started", "job_failed"]

    h.reg.retry(job)
    h.until(lambda: h.state(job) == "running", "the retried job")
    h.until(lambda: h.reg.get(job).progress.get("env", {}).get("AIDC_JOB_RESUME") == "1",
            "the resumed run's report")
    assert h.reg.get(job).progress["argv"][-1] == "--resume"
    assert h.types()[-1] == "job_resumed"
