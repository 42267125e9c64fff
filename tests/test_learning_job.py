"""The fine-tune job (edge_node.learning.finetune_job) under the node's real scheduler:
real job processes, SIGTERM, checkpoints and SQLite; only the clock is faked. A job
preempted mid-way and resumed writes exactly the model of a run never interrupted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from appstore.samples.digits import SPLIT_SEED, TEST_SIZE
from edge_node.learning import finetune_job
from edge_node.learning.evaluate import evaluate_app
from edge_node.learning.train import TrainConfig
from edge_node.scheduling.clock import FakeClock
from edge_node.scheduling.config import ScheduleConfig
from edge_node.scheduling.jobs import JobRegistry, JobSpec
from edge_node.scheduling.scheduler import Scheduler
from tests.models import build_digits_app_dir, load_test_split

SH = ZoneInfo("Asia/Shanghai")
JOB = finetune_job.MODULE
NIGHTS = {"card": "cpu", "days": "*", "start": "20:00", "end": "06:00",
          "training_fraction": 1.0}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """The digits app, 150 contrast-inverted labelled site samples, 400 replay
    samples from the base model's training split, and a shifted evaluation set."""
    root = tmp_path_factory.mktemp("ft")
    app = build_digits_app_dir(root / "app")
    X, y = load_digits(return_X_y=True)
    X_train, _, y_train, _ = train_test_split(X.astype(np.float32), y, test_size=TEST_SIZE,
                                              random_state=SPLIT_SEED, stratify=y)
    X_held, y_held = load_test_split(app)
    np.savez(root / "samples.npz", X=16.0 - X_held[:150], y=y_held[:150])
    np.savez(root / "replay.npz", X=X_train[:400], y=y_train[:400])
    return {"root": root, "app": app, "eval": (16.0 - X_held[150:], y_held[150:])}


def job_args(inputs, out: Path, app: Path | None = None) -> list[str]:
    r = inputs["root"]
    return finetune_job.job_args(app or inputs["app"], r / "samples.npz", out,
                                 replay=r / "replay.npz", config=TrainConfig(max_iter=50),
                                 checkpoint_every=5)


class Harness:
    def __init__(self, tmp_path: Path) -> None:
        self.clock = FakeClock(datetime(2025, 1, 3, 19, 59, tzinfo=SH))
        self.events: list[tuple[str, dict]] = []
        self.reg = JobRegistry(tmp_path / "node.db", tmp_path / "jobs")
        self.sched = Scheduler(
            self.reg, ScheduleConfig.model_validate({
                "timezone": "Asia/Shanghai", "windows": [NIGHTS],
                "load": {"train_when_idle": False}, "grace_s": 20}),
            inference_load=lambda card: 0.0, training_cores=lambda card, fraction: [],
            on_event=lambda type, data: self.events.append((type, data)), clock=self.clock)

    def until(self, pred, what: str, timeout: float = 30.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.sched.tick()
            if pred():
                return
            time.sleep(0.02)
        raise AssertionError(f"timed out waiting for {what}; events "
                             f"{[(t, d.get('reason')) for t, d in self.events]}")

    def state(self, job_id: str) -> str:
        return self.reg.get(job_id).state


@pytest.fixture
def harness(tmp_path):
    h = Harness(tmp_path)
    yield h
    h.sched.stop()
    h.reg.close()


def test_preempted_fine_tune_resumes_to_the_same_model(harness, inputs, tmp_path):
    """The night window opens: the job extracts features, trains and checkpoints; the
    window closes mid-training: SIGTERM -> checkpoint -> exit 0 (preempted); the next
    night it resumes from that iteration (features from the checkpoint dir) and
    writes byte-for-byte the model of an uninterrupted run, plus its lineage JSON."""
    ref_out = tmp_path / "ref"
    one_core = {**os.environ, "AIDC_JOB_CORES": "1", "OMP_NUM_THREADS": "1",
                "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # as the scheduler sets
    ref = subprocess.run([sys.executable, "-m", JOB, *job_args(inputs, ref_out),
                          "--checkpoint-dir", str(tmp_path / "ref-ckpt")],
                         capture_output=True, timeout=60, env=one_core)
    assert ref.returncode == 0, ref.stderr.decode()[-2000:]

    h = harness
    out = tmp_path / "out"
    job = h.reg.submit(JobSpec(name="finetune-digits", module=JOB,
                               args=job_args(inputs, out) + ["--throttle", "0.05"])).job_id
    h.clock.set(datetime(2025, 1, 3, 20, 0, tzinfo=SH))
    h.until(lambda: h.reg.get(job).progress.get("checkpoint_step", 0) >= 10,
            "a checkpoint at iteration 10")
    h.clock.set(datetime(2025, 1, 4, 6, 0, tzinfo=SH))
    h.until(lambda: h.state(job) == "preempted", "preemption at 06:00")
    rec = h.reg.get(job)
    stopped_at = rec.progress["checkpoint_step"]
    assert rec.reason == "outside training windows" and 10 <= stopped_at < 50
    assert not (out / "finetune.json").exists()

    h.clock.set(datetime(2025, 1, 4, 20, 0, tzinfo=SH))
    h.until(lambda: h.state(job) == "done", "the resumed run to finish")
    rec = h.reg.get(job)
    assert rec.progress["resumed_from"] == stopped_at
    assert (rec.starts, rec.preemptions, rec.kills) == (2, 1, 0)
    assert [t for t, _ in h.events] == ["job_started", "job_preempted", "job_resumed",
                                        "job_done"]

    assert (out / "model.onnx").read_bytes() == (ref_out / "model.onnx").read_bytes()
    doc = json.loads((out / "finetune.json").read_text())
    ref_doc = json.loads((ref_out / "finetune.json").read_text())
    assert doc["format"] == "aidc.finetune/1" and doc["job_id"] == job
    assert doc["model"]["sha256"] == ref_doc["model"]["sha256"] != doc["base_model"]["sha256"]
    assert [r["from_iteration"] for r in doc["training"]["runs"]] == [0, stopped_at]
    assert doc["training"]["iterations"] == ref_doc["training"]["iterations"]
    assert doc["head"]["node"] == "MatMul1" and doc["inputs"]["samples"]["n"] == 150
    assert doc["validation"]["max_abs_diff"] < 1e-5
    # better on the site's (inverted) digits than the model it started from
    before = evaluate_app(inputs["app"], *inputs["eval"]).accuracy
    after = evaluate_app(inputs["app"], *inputs["eval"], model=out / "model.onnx").accuracy
    assert after > before + 0.1


def test_a_model_without_a_head_fails_with_the_reason(harness, inputs, tmp_path):
    """An app whose class scores come from a Conv cannot be fine-tuned: the job exits
    2 and the scheduler's failure reason says why."""
    app = tmp_path / "convapp"
    app.mkdir()
    graph = helper.make_graph(
        [helper.make_node("Conv", ["input", "k"], ["c"], name="conv0"),
         helper.make_node("Flatten", ["c"], ["scores"])], "conv",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [None, 1, 8, 8])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, [None, 10])],
        [numpy_helper.from_array(np.ones((10, 1, 8, 8), np.float32), "k")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]),
              str(app / "model.onnx"))
    (app / "manifest.json").write_text(json.dumps({
        "name": "conv", "version": "1.0.0", "model": {"file": "model.onnx"},
        "postprocess": {"output": "scores"}}))
    args = job_args(inputs, tmp_path / "out", app)
    h = harness
    job = h.reg.submit(JobSpec(name="finetune-conv", module=JOB, args=args)).job_id
    h.clock.set(datetime(2025, 1, 3, 20, 0, tzinfo=SH))
    h.until(lambda: h.state(job) == "failed", "the job to fail")
    assert h.reg.get(job).reason == ("exited with code 2: not fine-tunable: last op before "
                                     "'scores' is Flatten, not Gemm/MatMul")


def test_the_site_job_trains_one_and_two_layers_and_keeps_what_the_gate_prefers(
        inputs, tmp_path):
    """--layers 0 (the default): the head alone and the head with its hidden layer are
    both trained and judged on the held-out samples and the replay check (every
    third replay row, never trained on); on inverted digits the two-layer candidate
    wins and is the one in OUT. --layers 1 trains the head alone."""
    from edge_node.learning import site_job

    X_held, y_held = load_test_split(inputs["app"])
    rows = []
    for i in range(180):
        path = tmp_path / f"s{i}.npy"
        np.save(path, (16.0 - X_held[i]).astype(np.float32))
        rows.append({"sample_id": f"s{i}", "path": str(path), "input_type": "tensor/npy",
                     "label_index": int(y_held[i]), "heldout": i % 3 == 0})
    listing = tmp_path / "samples.json"
    listing.write_text(json.dumps({"samples": rows}))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}

    def run(name: str, *extra: str) -> dict:
        out = tmp_path / name
        proc = subprocess.run(
            [sys.executable, "-m", site_job.MODULE, "--app-dir", str(inputs["app"]),
             "--samples-list", str(listing), "--replay", str(inputs["root"] / "replay.npz"),
             "--out", str(out / "candidate"), "--checkpoint-dir", str(out / "ckpt"),
             "--threads", "1", *extra], capture_output=True, timeout=120, env=env)
        assert proc.returncode == 0, proc.stderr.decode()[-2000:]
        gate = json.loads((out / "candidate" / "gate.json").read_text())
        gate["finetune"] = json.loads((out / "candidate" / "finetune.json").read_text())
        return gate

    auto = run("auto")
    assert [c["layers"] for c in auto["candidates"]] == [1, 2]
    assert auto["prepared"]["replay"] == {**auto["prepared"]["replay"], "train": 267,
                                          "check": 133}
    assert auto["accuracy"]["replay"]["n"] == 133 and auto["accuracy"]["heldout"]["n"] == 60
    one, two = (c["accuracy"]["heldout"]["candidate"] for c in auto["candidates"])
    assert two > one and auto["layers"] == 2 and len(auto["finetune"]["layers"]) == 2
    assert auto["accuracy"]["heldout"]["candidate"] == two
    # the chosen model is the one in OUT: its recorded sha256 is the file's
    model = tmp_path / "auto" / "candidate" / auto["finetune"]["model"]["file"]
    assert finetune_job.sha256_file(model) == auto["finetune"]["model"]["sha256"]

    head_only = run("one", "--layers", "1")
    assert [c["layers"] for c in head_only["candidates"]] == [1]
    assert len(head_only["finetune"]["layers"]) == 1
