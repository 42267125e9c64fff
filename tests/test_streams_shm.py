"""Camera frames from shared memory straight to the model worker: the agent sends a
reference (ring, slot, seq, shape), the worker reads the pixels itself.

Real capture processes on generated video files, a real worker process with the real
digits model in ONNX Runtime; plus the worker's ring cache and preprocessing on real
POSIX shared memory."""

from __future__ import annotations

import os
import signal
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from edge_node.streams import StreamConfig, StreamManager
from edge_node.streams.adapters import WorkerClassifier, encode_frame, worker_classify
from edge_node.streams.config import ring_slots
from edge_node.streams.errors import FrameOverwritten, RingGone
from edge_node.streams.proc import FrameRef
from edge_node.streams.ring import FrameRing
from edge_node.worker.errors import FrameUnavailable, WorkerError
from edge_node.worker.frames import FrameRequest, RingCache
from edge_node.worker.supervisor import WorkerSupervisor
from tests.models import build_digits_app_dir, load_test_split
from tests.streams_support import digit_frame, index_frame, shm_segments, wait_for, write_video

BUCKETS = ("processed", "failed", "dropped_capture", "dropped_inflight", "dropped_torn",
           "dropped_stopped", "lost", "unexplained", "in_flight", "in_transit")


def accounted(s: dict) -> int:
    return sum(s[k] for k in BUCKETS)


class RefOnly(WorkerClassifier):
    """The agent's wiring, with the copy path forbidden: every frame must go by reference."""

    def __init__(self, get_client, **kw) -> None:
        super().__init__(get_client, **kw)
        self.refs: list[FrameRef] = []

    def __call__(self, app, frame):
        raise AssertionError("a frame was copied out of shared memory by the agent")

    def by_ref(self, app, ref):
        self.refs.append(ref)
        return super().by_ref(app, ref)


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory):
    return build_digits_app_dir(tmp_path_factory.mktemp("digits"))


@pytest.fixture
def supervisor(digits_dir):
    sup = WorkerSupervisor(Path(tempfile.mkdtemp(prefix="aidc-w-", dir="/tmp")))
    sup.start("digits", digits_dir)
    yield sup
    sup.stop_all()


def test_frames_go_to_the_worker_by_reference_and_come_back_labelled(tmp_path, digits_dir,
                                                                     supervisor):
    """640x480 digit frames, resized by the capture process, are read by the worker from
    the stream's shared-memory ring (the agent never copies one), labelled as the copy
    path labels them, every frame accounted for; the worker maps the ring once and
    unmaps it when the stream stops."""
    X, y = load_test_split(digits_dir)
    frames = [digit_frame(X[i], (480, 640)) for i in range(20)]
    video = write_video(tmp_path / "cam.avi", frames, 10)
    client = supervisor.client("digits")
    infer = RefOnly(supervisor.client, keep_scores=True)
    results = []
    mgr = StreamManager(infer, lambda sid, app, res, ts: results.append((ts, res)))
    mgr.start([StreamConfig(id="cam", url=str(video), app="digits", fps=10, resize=(240, 320),
                            max_in_flight=2, queue_size=4)])
    try:
        wait_for(lambda: client.ping()["frame_rings"], 20, "the worker to map the ring")
        mapped = client.ping()["frame_rings"]
        wait_for(lambda: mgr.stats()["cam"]["state"] == "ended", 30, "the end of the file")
        wait_for(lambda: mgr.stats()["cam"]["in_flight"] == 0, 10, "in-flight frames")
    finally:
        s = mgr.stop()["cam"]
    assert s["captured"] == s["processed"] == s["results"] == len(results) == len(infer.refs) == 20
    assert accounted(s) == 20 and s["dropped_torn"] == s["torn_in_worker"] == 0
    ref = infer.refs[0]
    assert mapped == {ref.owner: ref.ring} and ref.ring.startswith(f"aidc{mgr.token}_cam_1_")
    assert ref.shape == (240, 320, 3) and ref.dtype == "uint8"
    assert sorted(r.seq for r in infer.refs) == list(range(20))
    labels = [res["index"] for ts, res in sorted(results, key=lambda r: r[0])]
    assert sum(int(a == b) for a, b in zip(labels, y[:20], strict=True)) >= 18
    # the same pixels sent the old way (a BMP through the socket) get the same answer
    copy = worker_classify(supervisor.client, keep_scores=True, shared_memory=False)
    first = sorted(results, key=lambda r: r[0])[0][1]
    import cv2

    by_copy = copy("digits", cv2.resize(frames[0], (320, 240), interpolation=cv2.INTER_AREA))
    assert by_copy["index"] == first["index"]
    assert np.allclose(by_copy["scores"], first["scores"], atol=0.02)
    ping = wait_for(lambda: (p := client.ping())["frame_rings"] == {} and p, 10,
                    "the worker to unmap the ring")
    assert ping["frames"] == {"read": 20, "overwritten": 0, "ring_gone": 0}
    assert shm_segments(mgr.token) == []


def test_a_frame_overwritten_before_the_worker_reads_it_is_counted_not_lost(tmp_path,
                                                                             supervisor):
    """The worker is frozen (SIGSTOP) with a frame in flight while the capture process
    goes on: by the time it reads the frame its slot holds a newer one. The worker refuses
    it (never classifies torn pixels), the stream books it in dropped_torn, the capture
    process never waits, and every frame is still accounted for."""
    video = write_video(tmp_path / "loop.avi", [index_frame(i) for i in range(40)], 20)
    cfg = StreamConfig(id="slow", url=str(video), app="digits", fps=20, loop=True,
                       max_in_flight=1, queue_size=1)
    slots = ring_slots(cfg)
    assert slots == 8  # 1 queued + 1 in flight + 2 + 0.2 s at 20 fps: 0.4 s before reuse
    client = supervisor.client("digits")
    worker_pid = client.ping()["pid"]
    mgr = StreamManager(RefOnly(supervisor.client), tick=0.1)
    mgr.start([cfg])
    try:
        wait_for(lambda: mgr.stats()["slow"]["processed"] >= 5, 20, "frames")
        captured0 = mgr.stats()["slow"]["captured"]
        os.kill(worker_pid, signal.SIGSTOP)
        try:
            time.sleep(1.5)  # > slots / fps: the in-flight frame's slot is reused
            during = mgr.stats()["slow"]
        finally:
            os.kill(worker_pid, signal.SIGCONT)
        assert during["captured"] - captured0 >= 20, "the capture process waited for the worker"
        assert during["in_flight"] == 1
        wait_for(lambda: mgr.stats()["slow"]["torn_in_worker"] >= 1, 10, "the torn frame")
        before = mgr.stats()["slow"]["processed"]
        wait_for(lambda: mgr.stats()["slow"]["processed"] >= before + 5, 20, "frames again")
    finally:
        s = mgr.stop()["slow"]
    assert s["torn_in_worker"] >= 1 and s["dropped_torn"] >= s["torn_in_worker"]
    assert s["dropped_inflight"] > 0 and s["failed"] == 0
    assert accounted(s) == s["captured"] and s["unexplained"] == s["lost"] == 0
    frames = client.ping()["frames"]
    assert frames["overwritten"] == s["torn_in_worker"]
    assert frames["read"] == s["processed"]


def test_a_ring_the_worker_cannot_attach_is_a_clear_counted_error(tmp_path, supervisor):
    """A reference to a ring that is not there: the worker answers 410 saying so (and 400
    for a malformed reference); a stream whose frames the worker cannot read counts them
    as failed with that reason, the books still balance, the worker keeps serving."""
    client = supervisor.client("digits")
    with pytest.raises(WorkerError) as err:
        client.request({"op": "classify_frame", "ring": "aidc0_gone_1_1", "owner": "aidc0_gone",
                        "gen": [1, 1], "slot": 0, "seq": 0, "shape": [8, 8, 3]})
    assert err.value.status == 410 and "'aidc0_gone_1_1' is gone" in err.value.message
    for bad in ({"ring": "/etc/passwd", "owner": "x"}, {"ring": "aidc0_a_1_1", "owner": "aidc0_b"},
                {"shape": [8, 8, 4]}, {"dtype": "float32"}, {"slot": -1}, {"gen": 3}):
        msg = {"op": "classify_frame", "ring": "aidc0_a_1_1", "owner": "aidc0_a", "gen": [1, 1],
               "slot": 0, "seq": 0, "shape": [8, 8, 3], **bad}
        with pytest.raises(WorkerError) as err:
            client.request(msg)
        assert err.value.status == 400, bad

    class Misdirected(RefOnly):
        def by_ref(self, app, ref):
            return super().by_ref(app, replace(ref, ring=ref.ring + "0"))

    video = write_video(tmp_path / "v.avi", [index_frame(i) for i in range(10)], 10)
    mgr = StreamManager(Misdirected(supervisor.client))
    mgr.start([StreamConfig(id="lost", url=str(video), app="digits", fps=10)])
    try:
        wait_for(lambda: mgr.stats()["lost"]["state"] == "ended", 20, "the end of the file")
        wait_for(lambda: mgr.stats()["lost"]["in_flight"] == 0, 10, "in-flight frames")
    finally:
        s = mgr.stop()["lost"]
    assert s["failed"] > 0 and s["processed"] == 0 and accounted(s) == s["captured"] == 10
    assert "RingGone" in s["last_infer_error"] and "is gone" in s["last_infer_error"]
    assert client.ping()["frames"]["ring_gone"] >= s["failed"]


def test_a_restarted_capture_process_is_read_from_its_new_ring(tmp_path, supervisor):
    """SIGKILL the capture process: the new one makes a new ring (a new name); the worker
    maps it in place of the old one, frames flow again, every frame accounted for."""
    video = write_video(tmp_path / "loop.avi", [index_frame(i) for i in range(20)], 20)
    client = supervisor.client("digits")
    infer = RefOnly(supervisor.client)
    mgr = StreamManager(infer, tick=0.1)
    mgr.start([StreamConfig(id="re", url=str(video), app="digits", fps=10, loop=True)])
    try:
        wait_for(lambda: mgr.stats()["re"]["processed"] >= 5, 20, "frames")
        first = client.ping()["frame_rings"]
        os.kill(mgr.pids()["re"], signal.SIGKILL)
        wait_for(lambda: mgr.stats()["re"]["restarts"] == 1, 10, "a restart")
        before = mgr.stats()["re"]["processed"]
        wait_for(lambda: mgr.stats()["re"]["processed"] >= before + 5, 20, "frames again")
        second = client.ping()["frame_rings"]
    finally:
        s = mgr.stop()["re"]
    owner = infer.refs[0].owner
    assert list(first) == list(second) == [owner]
    assert first[owner].startswith(f"{owner}_1_") and second[owner].startswith(f"{owner}_2_")
    assert accounted(s) == s["captured"] and s["unexplained"] == 0 and s["failed"] == 0
    wait_for(lambda: client.ping()["frame_rings"] == {}, 10, "the worker to unmap the ring")


# -- the parts, on real shared memory, in this process ---------------------------------


def test_the_ring_is_sized_from_the_config_so_frames_in_flight_survive():
    """Every frame that can be referenced at once (queued, in the model, being written)
    has its own slot, plus 0.2 s of frames at the stream's fps."""
    def cfg(**kw):
        return StreamConfig(id="s", url="usb:0", app="a", **kw)

    assert ring_slots(cfg()) == 2 + 1 + 2 + 1  # 6 slots: a frame is reused after 1.2 s
    assert ring_slots(cfg(fps=30, max_in_flight=4, queue_size=8)) == 8 + 4 + 2 + 6
    for c in (cfg(), cfg(fps=120), cfg(fps=0.5, queue_size=64, max_in_flight=16)):
        assert ring_slots(c) >= c.queue_size + c.max_in_flight + 2
        assert ring_slots(c) / c.fps >= 0.2


def _ring(name: str, slots: int = 3, shape=(8, 8, 3)) -> FrameRing:
    return FrameRing.create(name, slots, int(np.prod(shape)))


def test_worker_ring_cache_maps_one_ring_per_stream_and_lets_readers_finish():
    """The worker maps a stream's ring read-only once, replaces it with the stream's
    newer ring, refuses frames of a replaced ring, unmaps on release only what the
    ended incarnation owned, and never unmaps a ring under a reader."""
    owner = f"aidc{os.getpid():x}_cache"
    a, b = _ring(f"{owner}_1_1"), _ring(f"{owner}_2_1")
    frame = np.arange(192, dtype=np.uint8).reshape(8, 8, 3)
    a.write(0, 5, frame, 1.0)
    b.write(0, 9, frame[::-1].copy(), 2.0)

    def req(ring: str, gen, seq: int) -> FrameRequest:
        return FrameRequest.parse({"ring": ring, "owner": owner, "gen": gen, "slot": 0,
                                   "seq": seq, "shape": [8, 8, 3]})

    cache = RingCache()
    try:
        with cache.open(req(a.name, [1, 1], 5)) as ring:
            view = ring.view(0, 5, (8, 8, 3))
            assert np.array_equal(view, frame) and not view.flags.writeable
            del view
            with cache.open(req(a.name, [1, 1], 5)) as again:
                assert again is ring and cache.attached == 1
        with cache.open(req(b.name, [2, 1], 9)) as ring_b:  # the restarted stream's ring
            assert cache.names() == {owner: b.name} and cache.attached == 2
            assert ring_b.holds(0, 9) and not ring_b.holds(0, 5)
        with pytest.raises(FrameUnavailable) as err, cache.open(req(a.name, [1, 1], 5)):
            pass
        assert err.value.status == 410 and "replaced" in str(err.value)
        assert cache.release(owner, incarnation=1) is False  # incarnation 2 is still running
        with cache.open(req(b.name, [2, 1], 9)) as ring_b:
            assert cache.release(owner, incarnation=2) is True and cache.names() == {}
            view = ring_b.view(0, 9, (8, 8, 3))  # still mapped for the reader inside
            assert view[0, 0, 0] == frame[::-1][0, 0, 0]
            del view
        with pytest.raises(FrameUnavailable) as err, cache.open(req(f"{owner}_3_1", [3, 1], 0)):
            pass
        assert err.value.status == 410 and "is gone" in str(err.value)
    finally:
        cache.close()
        for r in (a, b):
            r.close()
            r.unlink()


def test_pixels_from_shared_memory_make_the_same_tensor_as_the_same_frame_sent_as_bmp(
        digits_dir):
    """The worker's preprocessing of a frame read from the ring gives the tensor its
    image path gives the same pixels as a BMP (grey within JPEG-free rounding), for
    grey, RGB and BGR manifests; the tensor never shares the ring's memory."""
    from cloud_sync.manifest import Preprocess, TensorSpec
    from edge_node.worker.preprocess import image_to_tensor, pixels_to_tensor

    rng = np.random.default_rng(0)
    frame = rng.integers(0, 256, (48, 64, 3), np.uint8)
    name = f"aidc{os.getpid():x}_px_1_1"
    ring = _ring(name, 2, frame.shape)
    ring.write(1, 3, frame, 0.0)
    reader = FrameRing.attach(name, readonly=True)
    try:
        view = reader.view(1, 3, frame.shape)
        for color, levels in (("rgb", 0), ("bgr", 0), ("gray", 1)):
            pre = Preprocess(color=color, resize=[24, 32], layout="NCHW", scale=1 / 255,
                             mean=[0.5], std=[0.25])
            spec = TensorSpec(name="x", dtype="float32",
                              shape=[1, 1 if color == "gray" else 3, 24, 32])
            want = image_to_tensor(encode_frame(frame), pre, spec)
            got = pixels_to_tensor(view, pre, spec)
            assert got.shape == want.shape == (1, spec.shape[1], 24, 32)
            assert not np.shares_memory(got, view)
            # OpenCV's grey decode of a BMP rounds a few pixels one level off cvtColor
            assert np.abs(got - want).max() <= levels / 255 / 0.25 + 1e-6, color
        del view, got
    finally:
        reader.close()
        ring.close()
        ring.unlink()


def test_frame_overwritten_and_ring_gone_map_to_the_stream_errors(supervisor):
    """The adapter turns the worker's 409 / 410 into FrameOverwritten / RingGone, the two
    errors a stream books (dropped_torn; failed or dropped_stopped)."""
    owner = f"aidc{os.getpid():x}_map"
    ring = _ring(f"{owner}_1_1", 2, (8, 8, 3))
    ring.write(0, 4, np.zeros((8, 8, 3), np.uint8), 0.0)
    infer = worker_classify(supervisor.client)
    try:
        ref = FrameRef(ring.name, owner, (1, 1), 0, 4, (8, 8, 3))
        assert infer.by_ref("digits", ref)["label"] in [str(d) for d in range(10)]
        with pytest.raises(FrameOverwritten, match="overwritten"):
            infer.by_ref("digits", replace(ref, seq=2))
        ring.write(0, 6, np.zeros((8, 8, 3), np.uint8), 0.0)
        with pytest.raises(FrameOverwritten):
            infer.by_ref("digits", ref)
        with pytest.raises(RingGone, match="is gone"):
            infer.by_ref("digits", replace(ref, ring=f"{owner}_2_1", gen=(2, 1)))
        infer.release("digits", owner, 5)
        assert supervisor.client("digits").ping()["frame_rings"] == {}
    finally:
        ring.close()
        ring.unlink()
