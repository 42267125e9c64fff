"""The stream package's parts on their own: config, source URLs, backoff, the
shared-memory ring (real POSIX shared memory, read from a second process)."""

from __future__ import annotations

import multiprocessing as mp
import os
import random
import subprocess
import sys

import numpy as np
import pytest
from pydantic import ValidationError

from edge_node.streams import StreamConfig, validate_streams
from edge_node.streams.backoff import Backoff
from edge_node.streams.ring import FrameRing, unlink_ring
from edge_node.streams.source import parse_source, redact


def test_config_is_strict_and_says_what_is_wrong():
    """A typo in a stream's keys or a bad value is refused with the key named."""
    ok = StreamConfig(id="gate-1", url="rtsp://cam/1", app="digits", fps=2.5, resize=(480, 640))
    assert ok.resize == (480, 640) and ok.max_in_flight == 1 and ok.queue_size == 2
    bad = [
        ({"fsp": 5}, "fsp"),
        ({"id": "a/b"}, "stream id"),
        ({"url": "ftp://cam/1"}, "unsupported source scheme"),
        ({"url": "usb:x"}, "usb:N"),
        ({"fps": 0}, "fps"),
        ({"resize": (0, 10)}, "resize"),
        ({"backoff_min": 5, "backoff_max": 1}, "backoff_max"),
    ]
    for change, needle in bad:
        with pytest.raises(ValidationError, match=needle):
            StreamConfig(**{"id": "s", "url": "usb:0", "app": "a", **change})


def test_stream_ids_must_be_unique():
    """Two streams with one id would share a status topic: the list is refused."""
    a = StreamConfig(id="a", url="usb:0", app="x")
    with pytest.raises(ValueError, match="duplicate stream id.*a"):
        validate_streams([a, a.model_copy(update={"url": "usb:1"})])
    assert validate_streams([a]) == [a]


def test_sources_are_parsed_and_passwords_never_shown():
    """Each kind of source maps to what OpenCV opens; credentials are redacted."""
    assert parse_source("usb:2").target == 2 and parse_source("usb:2").kind == "usb"
    assert parse_source("/v/a.avi").kind == "file" and not parse_source("/v/a.avi").live
    assert parse_source("file:///v/a.avi").target == "/v/a.avi"
    assert parse_source("https://h/x.mjpg").kind == "network"
    assert parse_source("rtsp://u:p@h:8554/s").live
    assert redact("rtsp://admin:hunter2@10.0.0.9:554/s") == "rtsp://admin:***@10.0.0.9:554/s"
    assert redact("http://h/x") == "http://h/x"
    with pytest.raises(ValueError, match="no host"):
        parse_source("rtsp:///x")


def test_backoff_grows_exponentially_with_jitter_up_to_its_cap():
    """Delays double from the first to the cap, each cut by a random 0-50 %; reset starts over."""
    b = Backoff(0.5, 4.0, random.Random(1))
    delays = [b.next() for _ in range(8)]
    for k, d in enumerate(delays):
        base = min(4.0, 0.5 * 2**k)
        assert base * 0.5 <= d <= base
    assert len(set(delays)) == len(delays)  # jittered: no two alike
    b.reset()
    assert b.next() <= 0.5


def _reader(name: str, slot: int, seq: int, shape, out) -> None:
    ring = FrameRing.attach(name)
    frame = ring.read(slot, seq, shape)
    out.put(None if frame is None else frame.tobytes())
    ring.close()


def test_ring_hands_pixels_to_another_process_and_detects_overwrites():
    """A frame written into the ring is read back intact by another process; a reader
    asking for a sequence number the slot no longer holds gets nothing, not torn pixels."""
    name = f"aidctest{os.getpid():x}_ring"
    frame = np.random.default_rng(0).integers(0, 256, (48, 64, 3), np.uint8)
    ring = FrameRing.create(name, 3, frame.nbytes)
    try:
        ring.write(1, 7, frame, 123.0)
        ctx = mp.get_context("spawn")
        out = ctx.Queue()
        p = ctx.Process(target=_reader, args=(name, 1, 7, frame.shape, out))
        p.start()
        assert out.get(timeout=30) == frame.tobytes()
        p.join(10)
        assert ring.read(1, 7, frame.shape).tobytes() == frame.tobytes()
        ring.write(1, 10, frame[::-1].copy(), 124.0)  # slot 1 reused for seq 10
        assert ring.read(1, 7, frame.shape) is None
        assert ring.read(5, 7, frame.shape) is None  # no such slot
        assert not ring.fits(np.zeros((49, 64, 3), np.uint8))
    finally:
        ring.close()
        ring.unlink()
    assert name not in os.listdir("/dev/shm")
    assert unlink_ring(name) is False


def test_frames_go_to_the_worker_as_bmp_without_opencv_in_the_agent():
    """The agent encodes frames for the worker with numpy alone (OpenCV stays out of the
    agent process, a memory budget item); the worker's OpenCV decodes them exactly."""
    import cv2

    from edge_node.streams.adapters import encode_frame

    rng = np.random.default_rng(0)
    for shape in [(1, 1, 3), (5, 7, 3), (48, 64, 3), (3, 5)]:
        frame = rng.integers(0, 256, shape, np.uint8)
        back = cv2.imdecode(np.frombuffer(encode_frame(frame), np.uint8), cv2.IMREAD_COLOR)
        want = frame if frame.ndim == 3 else np.repeat(frame[:, :, None], 3, axis=2)
        assert np.array_equal(back, want), shape
    code = ("import sys, edge_node.streams, edge_node.streams.adapters; "
            "assert 'cv2' not in sys.modules, 'OpenCV loaded in the agent'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_docs_list_every_stream_key_counter_and_state():
    """docs/streams.md names every StreamConfig key, every stats counter and every state,
    so an operator reading a status or a stats dump can look each one up."""
    from pathlib import Path

    from edge_node.streams.counters import REPORTED
    from edge_node.streams.stream import BUCKETS

    doc = (Path(__file__).resolve().parents[1] / "docs" / "streams.md").read_text()
    keys = list(StreamConfig.model_fields) + list(REPORTED) + list(BUCKETS)
    keys += ["in_flight", "in_transit", "last_infer_error", "pid", "fps", "processed_fps",
             "target_fps", "retry_in", "attempt", "since"]
    keys += ["connecting", "online", "offline", "ended", "failed", "stopped", "removed"]
    missing = [k for k in keys if f"`{k}`" not in doc and f'"{k}"' not in doc]
    assert not missing, f"undocumented in docs/streams.md: {missing}"
