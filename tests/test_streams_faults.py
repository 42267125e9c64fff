"""Camera streams under bad input: unreachable cameras, stalls, dropped connections,
garbage -- over real sockets on 127.0.0.1, with real capture processes. Each stream
says what is wrong, retries with backoff, and the rest of the node keeps going."""

from __future__ import annotations

import time

import pytest

from edge_node.streams import StreamConfig, StreamManager
from tests.streams_support import (
    MjpegServer,
    closed_port,
    frame_index,
    index_frame,
    wait_for,
    write_video,
)

FAST = {"backoff_min": 0.2, "backoff_max": 1.0, "open_timeout": 2.0}


class Recorder:
    """on_status / on_result sinks that keep what they saw, in order."""

    def __init__(self) -> None:
        self.statuses: dict[str, list[dict]] = {}
        self.results: list[tuple] = []

    def on_status(self, sid: str, status: dict) -> None:
        self.statuses.setdefault(sid, []).append(dict(status))

    def on_result(self, sid, app, result, ts) -> None:
        self.results.append((sid, result))

    def states(self, sid: str) -> list[str]:
        return [s["state"] for s in self.statuses.get(sid, [])]

    def transitions(self, sid: str) -> list[str]:
        """The states in order, a repeat (same state, new error) folded into one."""
        out: list[str] = []
        for state in self.states(sid):
            if not out or out[-1] != state:
                out.append(state)
        return out


@pytest.fixture
def rec():
    return Recorder()


def test_unreachable_sources_go_offline_with_a_clear_error_and_retry_with_backoff(tmp_path,
                                                                                   rec):
    """A camera port nobody listens on and a missing file: each stream is offline with an
    error naming the cause, retries with growing, jittered delays, while a good stream on
    the same manager keeps delivering frames."""
    port = closed_port()
    video = write_video(tmp_path / "ok.avi", [index_frame(i) for i in range(20)], 20)
    mgr = StreamManager(lambda app, f: {"i": frame_index(f)}, rec.on_result, rec.on_status,
                        tick=0.1)
    mgr.start([
        StreamConfig(id="rtsp", url=f"rtsp://admin:secret@127.0.0.1:{port}/live", app="a",
                     **FAST),
        StreamConfig(id="file", url=str(tmp_path / "missing.avi"), app="a", **FAST),
        StreamConfig(id="good", url=str(video), app="a", fps=10, loop=True),
    ])
    try:
        seen_at: dict[int, float] = {}  # open_failures count -> when first seen

        def rtsp_failures() -> bool:
            n = mgr.stats()["rtsp"]["open_failures"]
            seen_at.setdefault(n, time.monotonic())
            return n >= 5

        wait_for(rtsp_failures, 20, "rtsp retries", every=0.01)
        wait_for(lambda: mgr.stats()["file"]["open_failures"] >= 4, 20, "file retries")
        stats = mgr.stats()
        good_before = stats["good"]["processed"]
        wait_for(lambda: mgr.stats()["good"]["processed"] >= good_before + 5, 10,
                 "the good stream to keep going")
    finally:
        mgr.stop()
    rtsp, file = stats["rtsp"], stats["file"]
    assert rtsp["state"] == file["state"] == "offline"
    assert f"connection refused by 127.0.0.1:{port}" in rtsp["error"]
    assert "secret" not in rtsp["error"] and "admin:***@" in rtsp["error"]
    assert "secret" not in str(rec.statuses["rtsp"])
    assert "file not found" in file["error"] and "missing.avi" in file["error"]
    assert stats["good"]["state"] == "online"
    # one status per change, not per retry: connecting -> offline (-> stopped)
    assert rec.states("rtsp") == ["connecting", "offline", "stopped"]
    assert rtsp["attempt"] >= 4 and 0 < rtsp["retry_in"] <= FAST["backoff_max"]
    # delays 0.1-0.2, 0.2-0.4, 0.4-0.8, 0.5-1.0 s: they grow, up to the cap
    gaps = [seen_at[k + 1] - seen_at[k] for k in range(1, 5) if k in seen_at and k + 1 in seen_at]
    assert len(gaps) >= 3 and gaps[2] > gaps[0], gaps
    assert max(gaps) < FAST["backoff_max"] + 0.5, gaps
    assert rtsp["captured"] == 0 and rtsp["unexplained"] == 0


def test_a_stream_that_stalls_goes_offline_and_comes_back_online(rec):
    """An MJPEG camera that stops sending (connection kept open) past stall_timeout: the
    stream goes offline saying it stalled, reconnects, and is online again with frames
    once the camera resumes."""
    with MjpegServer(fps=20) as cam:
        mgr = StreamManager(lambda app, f: {"i": frame_index(f)}, rec.on_result, rec.on_status,
                            tick=0.1)
        mgr.start([StreamConfig(id="cam", url=cam.url, app="a", fps=10, stall_timeout=1.0,
                                **FAST)])
        try:
            wait_for(lambda: mgr.stats()["cam"]["processed"] >= 5, 20, "frames")
            cam.mode = "pause"
            wait_for(lambda: mgr.stats()["cam"]["state"] == "offline", 10, "offline")
            offline = mgr.stats()["cam"]
            cam.mode = "ok"
            wait_for(lambda: mgr.stats()["cam"]["state"] == "online", 15, "online again")
            before = mgr.stats()["cam"]["processed"]
            wait_for(lambda: mgr.stats()["cam"]["processed"] >= before + 5, 10, "new frames")
        finally:
            s = mgr.stop()["cam"]
    assert "stalled" in offline["error"] and offline["stalls"] == 1
    assert rec.transitions("cam")[:4] == ["connecting", "online", "offline", "online"]
    assert s["reconnects"] >= 1 and cam.connections >= 2
    assert s["unexplained"] == 0


def test_a_dropped_connection_reconnects(rec):
    """The camera closes the connection and refuses for a while: offline (read failures,
    then open failures), then online again when it accepts connections again."""
    with MjpegServer(fps=20) as cam:
        mgr = StreamManager(lambda app, f: None, rec.on_result, rec.on_status, tick=0.1)
        mgr.start([StreamConfig(id="cam", url=cam.url, app="a", fps=10, **FAST)])
        try:
            wait_for(lambda: mgr.stats()["cam"]["processed"] >= 5, 20, "frames")
            cam.mode = "close"
            wait_for(lambda: mgr.stats()["cam"]["open_failures"] >= 2, 15, "failed reopens")
            offline = mgr.stats()["cam"]
            cam.mode = "ok"
            wait_for(lambda: mgr.stats()["cam"]["state"] == "online", 15, "online again")
        finally:
            s = mgr.stop()["cam"]
    assert offline["state"] == "offline" and offline["read_failures"] >= 1
    assert "127.0.0.1" in offline["error"]
    assert rec.transitions("cam")[:4] == ["connecting", "online", "offline", "online"]
    assert s["reconnects"] >= 1 and s["unexplained"] == 0


def test_garbage_mid_stream_is_counted_and_the_stream_reconnects(rec):
    """The camera starts sending random bytes instead of JPEGs: the bad frames are counted,
    the stream goes offline and reconnects, and recovers when the data is good again."""
    with MjpegServer(fps=20) as cam:
        mgr = StreamManager(lambda app, f: None, rec.on_result, rec.on_status, tick=0.1)
        mgr.start([StreamConfig(id="cam", url=cam.url, app="a", fps=10, max_bad_frames=5,
                                **FAST)])
        try:
            wait_for(lambda: mgr.stats()["cam"]["processed"] >= 5, 20, "frames")
            cam.mode = "garbage"
            wait_for(lambda: mgr.stats()["cam"]["state"] == "offline", 10, "offline")
            offline = mgr.stats()["cam"]
            cam.mode = "ok"
            wait_for(lambda: mgr.stats()["cam"]["state"] == "online", 15, "online again")
        finally:
            s = mgr.stop()["cam"]
    assert offline["read_failures"] + offline["garbage"] >= 5
    assert "in a row" in offline["error"]
    assert s["reconnects"] >= 1 and s["unexplained"] == 0


def test_a_source_that_is_garbage_from_the_start_never_goes_online(rec):
    """An MJPEG server whose every part is random bytes: no frame is ever delivered, the
    failed reads are counted, the stream is offline saying so and keeps reconnecting."""
    with MjpegServer(fps=20) as cam:
        cam.mode = "garbage"
        mgr = StreamManager(lambda app, f: None, rec.on_result, rec.on_status, tick=0.1)
        mgr.start([StreamConfig(id="junk", url=cam.url, app="a", **FAST)])
        try:
            wait_for(lambda: mgr.stats()["junk"]["reconnects"] >= 2, 30, "reconnects")
            s = mgr.stats()["junk"]
        finally:
            mgr.stop()
    assert s["state"] == "offline" and s["captured"] == 0
    assert s["read_failures"] + s["garbage"] + s["open_failures"] >= 10
    assert "in a row failed" in s["error"] or "sends no video" in s["error"]
    assert "online" not in rec.states("junk")
