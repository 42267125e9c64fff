"""The job registry (durable states in SQLite) and the example job's checkpoint resume,
run as real processes without the scheduler."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from edge_node.scheduling.errors import JobStateError, UnknownJob
from edge_node.scheduling.jobkit import load_latest, save_checkpoint
from edge_node.scheduling.jobs import JobRegistry, JobSpec

JOB = [sys.executable, "-m", "edge_node.scheduling.example_job", "--epochs", "3"]


def test_states_survive_a_restart_and_transitions_are_checked(tmp_path):
    """A node restart must not forget a job or where it was; an impossible move
    (resuming a finished job) is an error, and a failed job can be retried."""
    reg = JobRegistry(tmp_path / "node.db", tmp_path / "jobs")
    job = reg.submit(JobSpec(name="ft", module="edge_node.scheduling.example_job"))
    assert job.state == "queued" and job.checkpoint_dir.is_dir()
    reg.transition(job.job_id, "running", "window", starts=1, pid=1234)
    reg.set_progress(job.job_id, {"step": 7})
    reg.transition(job.job_id, "failed", "exited with code 1: boom")
    reg.close()

    reg = JobRegistry(tmp_path / "node.db", tmp_path / "jobs")
    again = reg.get(job.job_id)
    assert (again.state, again.reason, again.starts, again.progress) == \
        ("failed", "exited with code 1: boom", 1, {"step": 7})
    with pytest.raises(JobStateError, match="failed; cannot become running"):
        reg.transition(job.job_id, "running")
    assert reg.retry(job.job_id).state == "queued"
    assert reg.next_runnable("cpu").job_id == job.job_id
    assert reg.next_runnable("gpu0") is None
    with pytest.raises(UnknownJob):
        reg.get("nope")
    reg.close()


def test_priority_then_age_decides_what_runs_next(tmp_path):
    """A higher-priority job overtakes older ones; equal priorities run in order."""
    reg = JobRegistry(tmp_path / "node.db", tmp_path / "jobs")
    a = reg.submit(JobSpec(name="a", command=["true"]))
    reg.submit(JobSpec(name="b", command=["true"]))
    c = reg.submit(JobSpec(name="c", command=["true"], priority=5))
    assert reg.next_runnable("cpu").job_id == c.job_id
    reg.transition(c.job_id, "running")
    assert reg.next_runnable("cpu").job_id == a.job_id
    reg.close()


def test_job_spec_needs_one_target_and_one_card():
    """A spec with both or neither of module/command, or on every card, is refused."""
    with pytest.raises(ValidationError, match="exactly one"):
        JobSpec(name="x")
    with pytest.raises(ValidationError, match="exactly one"):
        JobSpec(name="x", module="m", command=["c"])
    with pytest.raises(ValidationError, match="one card"):
        JobSpec(name="x", module="m", card="*")
    spec = JobSpec(name="x", module="pkg.mod", args=["--epochs", "2"])
    assert spec.argv(Path("/c"), True) == [sys.executable, "-m", "pkg.mod", "--epochs", "2",
                                           "--checkpoint-dir", "/c", "--resume"]


def test_a_torn_checkpoint_falls_back_to_the_previous_complete_one(tmp_path):
    """Power cut mid-write: the newest file is garbage, the one before still loads."""
    save_checkpoint(tmp_path, 10, {"w": np.arange(3.0)}, {"epoch": 1})
    (tmp_path / "ckpt-0000000020.npz").write_bytes(b"PK\x03\x04 torn")
    (tmp_path / ".ckpt-x.tmp").write_bytes(b"half")
    step, arrays, meta = load_latest(tmp_path)
    assert step == 10 and meta == {"epoch": 1} and arrays["w"].tolist() == [0, 1, 2]


def _final(path):
    with np.load(path) as z:
        return z["w"].copy(), z["b"].copy()


def test_example_job_stopped_and_resumed_ends_with_the_same_weights(tmp_path):
    """SIGTERM mid-epoch -> checkpoint, exit 0; --resume continues from that batch
    (not from zero) and ends bit-for-bit where an uninterrupted run ends."""
    ref = subprocess.run(JOB + ["--checkpoint-dir", str(tmp_path / "ref")],
                         capture_output=True, timeout=60)
    assert ref.returncode == 0, ref.stderr.decode()[-2000:]

    ckpt = tmp_path / "run"
    p = subprocess.Popen(JOB + ["--checkpoint-dir", str(ckpt), "--throttle", "0.01",
                                "--checkpoint-every", "1000"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    watchdog = threading.Timer(60, p.kill)  # bound the read loop below
    watchdog.start()
    for raw in p.stdout:  # stop right after the first epoch ends, mid-way through epoch 2
        if json.loads(raw)["event"] == "progress":
            break
    watchdog.cancel()
    time.sleep(0.15)
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=30)
    assert p.returncode == 0, err.decode()[-2000:]
    lines = [json.loads(ln) for ln in out.splitlines()]
    stopped_at = lines[-1]["step"]
    assert lines[-1]["event"] == "checkpoint" and 47 < stopped_at < 94
    assert not (ckpt / "final.npz").exists()

    again = subprocess.run(JOB + ["--checkpoint-dir", str(ckpt), "--resume"],
                           capture_output=True, timeout=60)
    assert again.returncode == 0, again.stderr.decode()[-2000:]
    events = [json.loads(ln) for ln in again.stdout.splitlines()]
    assert events[0] == {"event": "resumed", "step": stopped_at, "epoch": 1,
                         "batch": stopped_at - 47}
    assert events[-1]["event"] == "done" and events[-1]["accuracy"] > 0.8
    w_ref, b_ref = _final(tmp_path / "ref" / "final.npz")
    w, b = _final(ckpt / "final.npz")
    assert np.array_equal(w, w_ref) and np.array_equal(b, b_ref)
