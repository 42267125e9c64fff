"""Camera streams from video files: real capture processes, real OpenCV, shared memory,
the real digits model -- frame rate, accounting of every frame, drops, cleanup."""

from __future__ import annotations

import os
import signal
import threading
import time

import numpy as np
import pytest

from edge_node.streams import StreamConfig, StreamManager
from edge_node.streams.adapters import LocalClassifier
from edge_node.streams.proc import CaptureProcess
from tests.models import build_digits_app_dir, load_test_split
from tests.streams_support import (
    closed_port,
    digit_frame,
    frame_index,
    index_frame,
    live_children,
    shm_segments,
    wait_for,
    write_video,
)

BUCKETS = ("processed", "failed", "dropped_capture", "dropped_inflight", "dropped_torn",
           "dropped_stopped", "lost", "unexplained", "in_flight", "in_transit")


def accounted(s: dict) -> int:
    return sum(s[k] for k in BUCKETS)


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory):
    return build_digits_app_dir(tmp_path_factory.mktemp("digits"))


@pytest.fixture
def indexed_video(tmp_path):
    """40 flat frames at 20 fps (2 s); frame i has grey level 5*i."""
    return write_video(tmp_path / "indexed.avi", [index_frame(i) for i in range(40)], 20)


def test_file_stream_runs_at_target_fps_and_the_model_sees_every_kept_frame(tmp_path,
                                                                             digits_dir):
    """A 20 fps file watched at 5 fps: the capture keeps one frame in four, paced in real
    time; the digits model labels every kept frame right; every frame is accounted for."""
    X, y = load_test_split(digits_dir)
    clf = LocalClassifier({"digits": digits_dir})
    # one correctly classified held-out example per digit
    picks = {}
    for xi, yi in zip(X, y, strict=True):
        if int(yi) not in picks and clf("digits", digit_frame(xi))["index"] == int(yi):
            picks[int(yi)] = xi
    # frame i shows digit (i // 4) % 10: the kept frames (0, 4, 8, ...) show 0, 1, 2, ...
    frames = [digit_frame(picks[(i // 4) % 10]) for i in range(40)]
    video = write_video(tmp_path / "digits.avi", frames, 20)
    results, statuses = [], []
    mgr = StreamManager(clf, lambda sid, app, res, ts: results.append((sid, app, res, ts)),
                        lambda sid, st: statuses.append((sid, st["state"])))
    mgr.start([StreamConfig(id="cam1", url=str(video), app="digits", fps=5)])
    try:
        wait_for(lambda: mgr.stats()["cam1"]["state"] == "ended", 20, "the file to end")
        wait_for(lambda: mgr.stats()["cam1"]["in_flight"] == 0, 5, "in-flight frames")
        s = mgr.stats()["cam1"]
    finally:
        final = mgr.stop()["cam1"]
    assert s["grabbed"] == 40 and s["captured"] == 10 and s["skipped"] == 30
    assert [r[2]["label"] for r in results] == [str(d) for d in range(10)]
    assert {(r[0], r[1]) for r in results} == {("cam1", "digits")}
    span = results[-1][3] - results[0][3]
    assert 4.0 <= (len(results) - 1) / span <= 6.5, f"{len(results)} frames over {span:.2f}s"
    assert s["processed"] == s["results"] == 10
    assert accounted(final) == final["captured"] == 10
    assert final["unexplained"] == final["lost"] == final["in_transit"] == 0
    assert [st for sid, st in statuses] == ["connecting", "online", "ended", "stopped"]


def test_slow_model_drops_are_counted_and_match_the_frames_it_never_saw(indexed_video):
    """A model slower than the stream: frames beyond max_in_flight are dropped, and the
    drop counters equal exactly the frames the model never received."""
    seen: list[int] = []

    def slow_infer(app, frame):
        seen.append(frame_index(frame))
        time.sleep(0.3)
        return {"label": "x"}

    mgr = StreamManager(slow_infer)
    mgr.start([StreamConfig(id="slow", url=str(indexed_video), app="a", fps=20)])
    try:
        wait_for(lambda: mgr.stats()["slow"]["state"] == "ended", 20, "the file to end")
        wait_for(lambda: mgr.stats()["slow"]["in_flight"] == 0, 5, "in-flight frames")
    finally:
        s = mgr.stop()["slow"]
    assert s["captured"] == 40
    assert len(seen) == len(set(seen)) == s["processed"]
    assert set(seen) <= set(range(40))
    drops = s["dropped_capture"] + s["dropped_inflight"] + s["dropped_torn"] + s["dropped_stopped"]
    assert drops == 40 - len(seen) and s["dropped_inflight"] > 20
    assert accounted(s) == 40 and s["unexplained"] == 0


def test_capture_never_waits_for_a_stuck_consumer_and_counts_what_it_evicts(indexed_video):
    """Nobody reads the queue for the whole file: the capture loop keeps its pace, evicts
    the oldest frames (counted) and leaves the freshest ones queued."""
    cfg = StreamConfig(id="stuck", url=str(indexed_video), app="a", fps=20, queue_size=3)
    cap = CaptureProcess(cfg, token=f"t{os.getpid():x}")
    cap.start()
    try:
        t0 = time.monotonic()
        wait_for(lambda: not cap.alive(), 20, "the file to end")
        elapsed = time.monotonic() - t0
        got = []
        for _ in range(10):
            frame = cap.get(timeout=0.5)
            if frame is None:
                break
            got.append(frame)
        c = cap.counters.snapshot()
    finally:
        cap.stop()
        cap.cleanup()
    assert elapsed < 5.0, "the capture loop was held up by its consumer"
    assert c["captured"] == 40 and c["dropped_capture"] == 37
    assert [f.seq for f in got] == [37, 38, 39]
    # the ring was unlinked when the process ended: frames still queued are gone
    assert all(f.image is None for f in got)


def test_a_crashed_capture_process_is_restarted_and_its_frames_accounted(tmp_path):
    """SIGKILL a capture process: the manager restarts it, the stream comes back online,
    frames it never sent are booked as lost, none unexplained."""
    video = write_video(tmp_path / "loop.avi", [index_frame(i) for i in range(20)], 20)
    mgr = StreamManager(lambda app, frame: {"label": "x"}, tick=0.1)
    mgr.start([StreamConfig(id="loop", url=str(video), app="a", fps=10, loop=True)])
    try:
        wait_for(lambda: mgr.stats()["loop"]["processed"] >= 5, 20, "frames")
        first = mgr.pids()["loop"]
        os.kill(first, signal.SIGKILL)
        wait_for(lambda: mgr.stats()["loop"]["restarts"] == 1, 10, "a restart")
        wait_for(lambda: mgr.stats()["loop"]["state"] == "online", 20, "online again")
        before = mgr.stats()["loop"]["processed"]
        wait_for(lambda: mgr.stats()["loop"]["processed"] >= before + 5, 20, "frames again")
        assert mgr.pids()["loop"] != first
    finally:
        s = mgr.stop()["loop"]
    assert accounted(s) == s["captured"] and s["unexplained"] == 0


def test_stopping_the_manager_leaves_no_process_and_no_shared_memory(tmp_path):
    """Streams in every state (online, offline, connecting) stop within seconds; no capture
    process, no ring in /dev/shm, no manager thread stays behind."""
    video = write_video(tmp_path / "loop.avi", [index_frame(i) for i in range(20)], 20)
    children_before = set(live_children())
    threads_before = {t.name for t in threading.enumerate()}
    mgr = StreamManager(lambda app, frame: None)
    mgr.start([
        StreamConfig(id="file", url=str(video), app="a", fps=10, loop=True),
        StreamConfig(id="dead", url=f"rtsp://127.0.0.1:{closed_port()}/x", app="a"),
        StreamConfig(id="missing", url=str(tmp_path / "nope.avi"), app="a"),
    ])
    wait_for(lambda: mgr.stats()["file"]["processed"] >= 3, 20, "frames")
    wait_for(lambda: shm_segments(mgr.token), 5, "a ring in /dev/shm")
    pids = set(mgr.pids().values())
    assert len(pids) == 3 and pids <= set(live_children())
    t0 = time.monotonic()
    final = mgr.stop()
    assert time.monotonic() - t0 < 10
    assert not pids & set(live_children())
    assert set(live_children()) <= children_before | _resource_tracker()
    assert shm_segments(mgr.token) == []
    wait_for(lambda: {t.name for t in threading.enumerate()} <= threads_before, 5,
             "stream threads to end")
    assert {s["state"] for s in final.values()} == {"stopped"}
    assert all(accounted(s) == s["captured"] and s["unexplained"] == 0 for s in final.values())


def _resource_tracker() -> set[int]:
    from multiprocessing import resource_tracker

    pid = resource_tracker._resource_tracker._pid
    return {pid} if pid else set()


def test_results_carry_the_frame_time_and_a_failing_model_is_counted(indexed_video):
    """A model that raises on some frames: those are counted as failed with the error, the
    stream keeps going, and results carry the capture time of their frame."""
    results = []

    def flaky(app, frame):
        if frame_index(frame) % 2:
            raise ValueError("odd frame")
        return {"index": frame_index(frame)}

    mgr = StreamManager(flaky, lambda sid, app, res, ts: results.append((res, ts)))
    t0 = time.time()
    mgr.start([StreamConfig(id="flaky", url=str(indexed_video), app="a", fps=20,
                            max_in_flight=4)])
    try:
        wait_for(lambda: mgr.stats()["flaky"]["state"] == "ended", 20, "the file to end")
        wait_for(lambda: mgr.stats()["flaky"]["in_flight"] == 0, 5, "in-flight frames")
    finally:
        s = mgr.stop()["flaky"]
    assert s["failed"] > 0 and s["results"] == len(results) > 0
    assert s["failed"] + s["processed"] + s["dropped_inflight"] == 40
    assert "odd frame" in s["last_infer_error"]
    assert all(t0 < ts < time.time() for _, ts in results)
    assert np.all(np.diff([ts for _, ts in results]) > 0)
