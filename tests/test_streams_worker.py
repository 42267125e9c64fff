"""A camera stream feeding the real model worker process: capture process -> shared
memory -> agent -> worker (Unix socket, the same classify path as /v2) -> result."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest

from edge_node.streams import StreamConfig, StreamManager
from edge_node.streams.adapters import AppNotReady, worker_classify
from edge_node.worker.supervisor import WorkerSupervisor
from tests.models import build_digits_app_dir, load_test_split
from tests.streams_support import digit_frame, wait_for, write_video


@pytest.fixture
def supervisor():
    sup = WorkerSupervisor(Path(tempfile.mkdtemp(prefix="aidc-w-", dir="/tmp")))
    yield sup
    sup.stop_all()


def test_frames_reach_the_worker_and_come_back_as_labelled_results(tmp_path, supervisor):
    """640x480 camera frames of handwritten digits, resized by the capture process, are
    classified by the digits worker; a stream for an app with no worker counts failures
    and says why, without disturbing the other stream."""
    app_dir = build_digits_app_dir(tmp_path / "digits")
    supervisor.start("digits", app_dir)
    X, y = load_test_split(app_dir)
    video = write_video(tmp_path / "cam.avi", [digit_frame(X[i], (480, 640)) for i in range(20)],
                        10)
    results = []
    mgr = StreamManager(worker_classify(supervisor.client),
                        lambda sid, app, res, ts: results.append((ts, res)))
    mgr.start([
        StreamConfig(id="cam", url=str(video), app="digits", fps=10, resize=(240, 320),
                     max_in_flight=4, queue_size=8),
        StreamConfig(id="orphan", url=str(video), app="nope", fps=10),
    ])
    try:
        wait_for(lambda: all(s["state"] == "ended" for s in mgr.stats().values()), 30, "the end")
        wait_for(lambda: all(s["in_flight"] == 0 for s in mgr.stats().values()), 10, "in-flight")
    finally:
        stats = mgr.stop()
    cam, orphan = stats["cam"], stats["orphan"]
    assert cam["captured"] == cam["processed"] == cam["results"] == len(results) == 20
    labels = [res["index"] for ts, res in sorted(results, key=lambda r: r[0])]
    assert sum(int(a == b) for a, b in zip(labels, y[:20], strict=True)) >= 18
    assert set(results[0][1]) == {"label", "index", "score", "top_k"}
    assert orphan["failed"] > 0 and orphan["results"] == 0
    assert AppNotReady.__name__ in orphan["last_infer_error"]
    assert "'nope' is not running" in orphan["last_infer_error"]
