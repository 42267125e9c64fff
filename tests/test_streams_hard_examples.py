"""Hard examples from camera streams: a doubtful frame is kept with its pixels.

On real parts: capture processes reading a looped MJPG video, frames through
shared memory to the real digits worker, the agent copying a hard frame out of
the ring (seqlock-checked), the real capture thread, SQLite, and for the whole
node Mosquitto and the AppStore.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from edge_node.capture import Capture
from edge_node.config import FeedbackConfig
from edge_node.hardex import Policy
from edge_node.learning.site_job import _tensor
from edge_node.streams import StreamConfig, StreamManager
from edge_node.streams.adapters import LocalClassifier, WorkerClassifier
from edge_node.streams.snapshot import frame_png, is_frame_png
from edge_node.store import NodeStore
from edge_node.worker.preprocess import image_to_tensor, pixels_to_tensor
from edge_node.worker.supervisor import WorkerSupervisor
from tests.appstore_support import digits_dir, wait_until  # noqa: F401
from tests.streams_support import digit_frame, write_video
from tests.test_e2e import API, feedback, http, jget, loop  # noqa: F401
from tests.test_hard_examples import _serve_digits


def video_frames(path: Path) -> list[np.ndarray]:
    """Every frame of a video file as OpenCV decodes it (what a capture process sees)."""
    cap = cv2.VideoCapture(str(path), cv2.CAP_FFMPEG)
    out = []
    while True:
        ok, frame = cap.read()
        if not ok:
            return out
        out.append(frame)


def ambiguous_video(digits: Path, out: Path, n: int = 8, fps: float = 10) -> Path:
    """A video of ``n`` blends of two different digits: the model is unsure of each
    (top-1 below 0.45, well under the app's 0.6 threshold)."""
    with np.load(digits / "heldout.npz") as z:
        X, y = z["X_test"], z["y_test"]
    clf = LocalClassifier({"digits": digits})
    frames = []
    for i in range(len(X)):
        for j in range(i + 1, len(X)):
            if len(frames) == n:
                return write_video(out, frames, fps)
            f = digit_frame((X[i] + X[j]) / 2)
            if y[i] != y[j] and clf("digits", f)["score"] < 0.45:
                frames.append(f)
    raise AssertionError("not enough ambiguous blends")


def test_a_stream_of_doubtful_digits_keeps_its_frames_as_png_samples(
        loop, digits_dir, tmp_path):  # noqa: F811
    """On a real node, a camera of doubtful digits gives samples whose input is the PNG
    of the very frame the model saw (pixel for pixel), with the stream as source; they
    are in the labelling queue with the model's scores, and reach the AppStore as images."""
    video = ambiguous_video(digits_dir, tmp_path / "doubt.avi")
    decoded = video_frames(video)
    store, node = loop
    agent = _serve_digits(store, node, digits_dir, tmp_path,
                          feedback={"max_per_minute": 100000},
                          streams=[{"id": "gate-1", "url": str(video), "app": "digits",
                                    "fps": 10, "loop": True}])
    edge = agent.http_url
    wait_until(lambda: agent.capture.stats["samples_kept"] >= 6, timeout=30)
    samples = jget(f"{edge}{API}/samples?app=digits&limit=1000")["samples"]
    assert samples and {s["source"] for s in samples} == {"gate-1"}
    for s in samples[:6]:
        assert s["input_type"] == "image/png" and s["reason"] == "confidence<0.6"
        assert s["prediction"]["score"] < 0.6 and len(s["top"]) == 5  # scores came along
        status, png = http("GET", f"{edge}{API}/samples/{s['sample_id']}/input?format=png")
        assert status == 200 and png.startswith(b"\x89PNG") and is_frame_png(png)
        pixels = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_UNCHANGED)
        assert any(np.array_equal(pixels, f) for f in decoded), "not the frame the model saw"
    queue = jget(f"{edge}{API}/labelling/queue?app=digits&limit=200")["queue"]
    assert {q["sample_id"] for q in queue} >= {s["sample_id"] for s in samples[:6]}
    assert queue[0]["classes"] == [str(i) for i in range(10)]
    got = wait_until(lambda: [f for f in feedback(store) if f.get("source") == "gate-1"],
                     timeout=20)
    assert got[0]["input_type"] == "image/png"
    st = agent.streams.stats()["gate-1"]
    assert st["unexplained"] == 0 and st["result_errors"] == 0


class LateCopy(WorkerClassifier):
    """The agent's wiring with a result that takes longer than the ring holds a frame
    (the worker answered in time; the agent only gets to the copy afterwards)."""

    def by_ref(self, app, ref):
        result = super().by_ref(app, ref)
        time.sleep(0.8)  # at 30 fps the ring holds a frame for 0.37 s
        return result


def test_a_frame_overwritten_before_the_copy_is_counted_and_nothing_is_kept(
        digits_dir, tmp_path):  # noqa: F811
    """When the capture process has reused the slot by the time a hard result comes
    back, the agent's copy sees it (the ring's seqlock): nothing torn is kept, the
    loss is counted (``samples_frame_gone``), and the capture never waited."""
    video = ambiguous_video(digits_dir, tmp_path / "doubt.avi", fps=30)
    sup = WorkerSupervisor(Path(tempfile.mkdtemp(prefix="aidc-w-", dir="/tmp")))
    sup.start("digits", digits_dir)
    nodestore = NodeStore(tmp_path / "node.db")
    capture = Capture(nodestore, None, "unused", tmp_path / "samples",
                      FeedbackConfig(upload="none", max_per_minute=100000))
    capture.start()
    policy = Policy("confidence", 0.6)

    def on_result(sid, app, result, ts, frame):
        capture.on_result(app, "1.0.0", policy, result, None, None, source=sid, frame=frame)

    mgr = StreamManager(LateCopy(sup.client, keep_scores=True), on_result, frames=True)
    try:
        mgr.start([StreamConfig(id="fast", url=str(video), app="digits", fps=30, loop=True)])
        wait_until(lambda: capture.stats["samples_frame_gone"] >= 3, timeout=30)
        st = mgr.stats()["fast"]
    finally:
        mgr.stop()
        capture.stop()
        sup.stop_all()
    assert capture.stats["samples_kept"] == 0
    assert nodestore.count("samples") == 0
    assert capture.stats["results"] >= 3  # the results themselves are recorded
    assert st["dropped_capture"] + st["dropped_inflight"] > 0  # the capture ran on meanwhile
    nodestore.close()


def test_a_stream_sample_trains_on_the_tensor_the_worker_made(digits_dir):  # noqa: F811
    """The fine-tune job turns a kept camera frame into exactly the tensor the worker
    fed the model for it (from the pixels), while an uploaded PNG goes through the
    worker's image path as before."""
    from cloud_sync.manifest import load_manifest

    manifest = load_manifest(json.loads((digits_dir / "manifest.json").read_text()))
    spec = manifest.model.inputs[0]
    rng = np.random.default_rng(0)
    frame = rng.integers(0, 256, (48, 64, 3), np.uint8)  # colour: grey conversions differ
    with tempfile.TemporaryDirectory() as d:
        kept = Path(d) / "frame.png"
        kept.write_bytes(frame_png(frame))
        uploaded = Path(d) / "upload.png"
        uploaded.write_bytes(cv2.imencode(".png", frame)[1].tobytes())
        got = _tensor({"path": str(kept), "input_type": "image/png"}, manifest, spec)
        assert np.array_equal(got, pixels_to_tensor(frame, manifest.preprocess, spec)[0])
        got = _tensor({"path": str(uploaded), "input_type": "image/png"}, manifest, spec)
        assert np.array_equal(got, image_to_tensor(uploaded.read_bytes(), manifest.preprocess,
                                                   spec)[0])


def test_frame_png_is_lossless_and_marked():
    """A kept frame decodes to the same pixels (colour and grey) and is recognisable as
    a camera frame; a bad array is refused, not stored."""
    rng = np.random.default_rng(1)
    for f in (rng.integers(0, 256, (30, 40, 3), np.uint8), rng.integers(0, 256, (30, 40),
                                                                         np.uint8)):
        png = frame_png(f)
        assert is_frame_png(png)
        assert np.array_equal(cv2.imdecode(np.frombuffer(png, np.uint8),
                                           cv2.IMREAD_UNCHANGED), f)
    assert not is_frame_png(cv2.imencode(".png", f)[1].tobytes())
    with pytest.raises(ValueError):
        frame_png(np.zeros((4, 4, 3), np.float32))
